//! The decode side: the control server that answers handshakes, and the accepting half of each transport
//! set up for the cache.

use super::negotiation;
use crate::control::ControlServer;
use crate::error::Result;
use crate::log::Logger;
use crate::memory::CacheLayout;
use crate::net;
use crate::transport::{Acceptor, Admission, Environment};
use crate::wire::{self, Reply, TransportKind, Welcome, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex};

pub(super) struct DecodeSide {
    port: u16,
    transports: Vec<TransportKind>,
    device: Option<String>,
    /// `None` once closed.
    listening: Mutex<Option<Listening>>,
}

/// A decode side's servers. Fields drop in order: the control server first (it holds the other references to
/// the accepting halves), then the accepting halves, which stop their data paths.
struct Listening {
    _control: ControlServer,
    _acceptors: Vec<Arc<dyn Acceptor>>,
}

impl DecodeSide {
    /// Starts answering handshakes on `port` (0: any free port) for the transports of `acceptors`.
    pub(super) fn listen(port: u16, env: &Environment<'_>, acceptors: Vec<Arc<dyn Acceptor>>) -> Result<DecodeSide> {
        let log = env.log;
        if env.config.socket_ifname.is_none() && log.debug_enabled() {
            let first = net::first_usable_interface().map(|(n, ip)| format!("{n} {ip}")).unwrap_or_else(|| "none".into());
            log.debug(format!("KVCACHE_SOCKET_IFNAME unset: listening on all interfaces (first usable: {first})"));
        }
        let handshake = Handshake { cache: env.cache.clone(), host: net::host_id(), acceptors: acceptors.clone(), log: log.clone() };
        let zmq = zmq::Context::new();
        let control = ControlServer::bind(&zmq, &env.listen_ip.to_string(), port, move |req| wire::encode(&handshake.answer(req)))?;
        Ok(DecodeSide {
            port: control.port(),
            transports: acceptors.iter().map(|a| a.kind()).collect(),
            device: acceptors.iter().find_map(|a| a.device().map(str::to_string)),
            listening: Mutex::new(Some(Listening { _control: control, _acceptors: acceptors })),
        })
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    pub(super) fn transports(&self) -> Vec<TransportKind> {
        self.transports.clone()
    }

    pub(super) fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Stops the control server, then the data paths: nothing lands after this returns.
    pub(super) fn close(&self) {
        drop(self.listening.lock().unwrap().take());
    }
}

/// The decode side's half of the handshake.
struct Handshake {
    cache: Arc<CacheLayout>,
    /// This host ([`net::host_id`]); same-host transports are offered only to prefills that share it.
    host: Option<String>,
    acceptors: Vec<Arc<dyn Acceptor>>,
    log: Arc<Logger>,
}

impl Handshake {
    fn answer(&self, request: &[u8]) -> Reply {
        match self.accept(request) {
            Ok(welcome) => Reply::Welcome(welcome),
            Err(e) => {
                self.log.error(format!("refused a connection: {e}"));
                Reply::reject(&e)
            }
        }
    }

    fn accept(&self, request: &[u8]) -> Result<Welcome> {
        let hello = wire::decode_hello(request)?;
        let agreed = negotiation::check_hello(&hello, &self.cache)?;
        let same_host = self.host.is_some() && hello.host == self.host;
        let offers: Vec<TransportKind> = hello.offers.iter().map(|o| o.transport).collect();
        let ours: Vec<TransportKind> = self.acceptors.iter().map(|a| a.kind()).collect();
        let kind = negotiation::choose(&offers, &ours, same_host)?;
        let acceptor = self.acceptors.iter().find(|a| a.kind() == kind).expect("chosen among ours");
        let offer = hello.offers.iter().find(|o| o.transport == kind).expect("chosen among the offers");
        let peer = format!("prefill tp {}/{}", hello.tp_idx, hello.tp_size);
        let accepted = acceptor.accept(&Admission {
            peer: &peer,
            geometry: agreed.geometry,
            tensors: agreed.tensors,
            details: &offer.details,
            replaces: hello.replaces,
        })?;
        self.log.debug(format!(
            "accepted {peer} over {kind} with {} blocks (slice {} of {} per block)",
            hello.block_number, agreed.geometry.slot, agreed.geometry.ratio
        ));
        Ok(Welcome {
            protocol: PROTOCOL_VERSION,
            block_number: self.cache.block_number(),
            transport: kind,
            session: accepted.session,
            details: accepted.details,
        })
    }
}
