//! The TCP transport: works between any two machines. Blocks go from the cache to the socket with
//! vectored writes (one range per run) and from the socket into the cache with vectored reads; a cache in GPU
//! memory goes through pinned staging buffers ([`staging`]).
//!
//! The decode's half ([`TcpReceiver`]) listens on a data port of its own; the handshake tells the prefill that
//! port and a random session name, which the prefill's half ([`TcpLink`]) presents when it connects.

pub mod frame;
mod io;
mod receiver;
mod sender;
mod staging;

pub use receiver::{Session, TcpReceiver};
pub use sender::TcpLink;

use crate::config::{Config, Timeouts};
use crate::error::Result;
use crate::net;
use crate::memory::CacheLayout;
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, PendingLink, Transport};
use crate::wire::TransportKind;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The registry entry.
pub struct Tcp;

/// What the decode's half answers: where its data port is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct TcpDetails {
    port: u16,
}

impl Transport for Tcp {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn probe(&self, config: &Config) -> std::result::Result<String, String> {
        match (&config.socket_ifname, net::listen_addrs(config.socket_ifname.as_deref())) {
            (_, Err(e)) => Err(e.message().to_string()),
            (Some(name), Ok(ips)) => Ok(format!("decode listens on {name} ({})", ips[0])),
            (None, Ok(_)) => Ok(match net::first_usable_interface() {
                Some((name, ip)) => format!("decode listens on {name} ({ip}), the first usable interface, and on loopback"),
                None => "decode listens on loopback (no other interface is up)".into(),
            }),
        }
    }

    fn acceptor(&self, env: &Environment<'_>) -> Result<Arc<dyn Acceptor>> {
        Ok(Arc::new(TcpReceiver::start(env.listen_ips, env.cache.clone(), env.log.clone(), env.config.timeouts, env.config.max_peers)?))
    }

    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>> {
        Ok(Arc::new(TcpConnector { cache: env.cache.clone(), timeouts: env.config.timeouts }))
    }
}

impl Acceptor for TcpReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn accept(&self, admission: &Admission<'_>) -> Result<Accepted> {
        let session =
            self.admit(Session { peer: admission.peer.to_string(), geometry: admission.geometry, tensors: admission.tensors }, admission.proof);
        Ok(Accepted { session, details: transport::to_details(&TcpDetails { port: self.port() }) })
    }

    fn cut_off(&self, session: u64) -> bool {
        TcpReceiver::cut_off(self, session)
    }

    fn delivered(&self, session: u64, layer: u32, blocks: &[u32]) -> bool {
        TcpReceiver::delivered(self, session, layer, blocks)
    }

    fn close(&self) {
        TcpReceiver::close(self);
    }
}

/// The prefill's half.
struct TcpConnector {
    cache: Arc<CacheLayout>,
    timeouts: Timeouts,
}

impl Connector for TcpConnector {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn prepare(&self) -> Result<Box<dyn PendingLink>> {
        Ok(Box::new(TcpPending { cache: self.cache.clone(), timeouts: self.timeouts }))
    }
}

struct TcpPending {
    cache: Arc<CacheLayout>,
    timeouts: Timeouts,
}

impl PendingLink for TcpPending {
    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>> {
        let details: TcpDetails = transport::from_details(TransportKind::Tcp, answer.details)?;
        Ok(Box::new(TcpLink::connect(answer.host, details.port, answer.session, answer.proof, self.cache, answer.deadline, self.timeouts.stall)?))
    }
}
