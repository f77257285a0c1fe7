//! The TCP transport: works between any two machines. Blocks go from the cache to the socket with
//! vectored writes (one range per run) and from the socket into the cache with vectored reads; a cache in GPU
//! memory goes through pinned staging buffers ([`staging`]).
//!
//! The decode's half ([`TcpReceiver`]) listens on a data port of its own; the handshake tells the prefill that
//! port, how many data connections to open (the lower of both sides' `KVCACHE_TCP_CONNECTIONS`) and a random
//! session name, which the prefill's half ([`TcpLink`]) presents on each of them. A large write is split over
//! the connections, one thread sending each piece: one TCP stream is bounded by the one core that copies its
//! bytes (see [`crate::transport::frame`]).

mod io;
mod receiver;
mod sender;
mod staging;

pub use receiver::{Session, TcpReceiver};
pub use sender::{DataPort, TcpLink};

use crate::config::{Config, Timeouts, MAX_TCP_CONNECTIONS};
use crate::error::{Error, Result};
use crate::net;
use crate::memory::CacheLayout;
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, PendingLink, Transport};
use crate::wire::TransportKind;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The registry entry.
pub struct Tcp;

/// What the decode's half answers: where its data port is, and how many connections the link opens there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct TcpDetails {
    port: u16,
    connections: u32,
}

/// What the prefill's half offers: the connections it would open (one where it offers nothing).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct TcpOffer {
    connections: u32,
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
        Ok(Arc::new(TcpReceiver::start(
            env.listen_ips,
            env.cache.clone(),
            env.log.clone(),
            env.config.timeouts,
            env.config.max_peers,
            env.config.tcp_connections,
        )?))
    }

    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>> {
        Ok(Arc::new(TcpConnector { cache: env.cache.clone(), timeouts: env.config.timeouts, connections: env.config.tcp_connections }))
    }
}

impl Acceptor for TcpReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn accept(&self, admission: &Admission<'_>) -> Result<Accepted> {
        // A prefill that offers nothing opens one connection.
        let offer: Option<TcpOffer> = transport::from_details(TransportKind::Tcp, admission.details)?;
        let offered = offer.map_or(1, |o| o.connections);
        if !(1..=MAX_TCP_CONNECTIONS).contains(&offered) {
            return Err(Error::protocol(format!("the prefill offers {offered} TCP data connections (1 to {MAX_TCP_CONNECTIONS})")));
        }
        let connections = offered.min(self.connections());
        let session = Session { peer: admission.peer.to_string(), geometry: admission.geometry, tensors: admission.tensors, connections };
        let session = self.admit(session, admission.proof);
        Ok(Accepted { session, details: transport::to_details(&TcpDetails { port: self.port(), connections }) })
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
    connections: u32,
}

impl Connector for TcpConnector {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn prepare(&self) -> Result<Box<dyn PendingLink>> {
        Ok(Box::new(TcpPending { cache: self.cache.clone(), timeouts: self.timeouts, connections: self.connections }))
    }
}

struct TcpPending {
    cache: Arc<CacheLayout>,
    timeouts: Timeouts,
    connections: u32,
}

impl PendingLink for TcpPending {
    fn offer(&self) -> serde_json::Value {
        transport::to_details(&TcpOffer { connections: self.connections })
    }

    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>> {
        let details: TcpDetails = transport::from_details(TransportKind::Tcp, answer.details)?;
        if !(1..=self.connections).contains(&details.connections) {
            return Err(Error::protocol(format!(
                "{} asks for {} TCP data connections (this prefill offered 1 to {})",
                answer.peer, details.connections, self.connections
            )));
        }
        let data = DataPort { host: answer.host, port: details.port, connections: details.connections };
        Ok(Box::new(TcpLink::connect(data, answer.session, answer.proof, self.cache, answer.deadline, self.timeouts.stall)?))
    }
}
