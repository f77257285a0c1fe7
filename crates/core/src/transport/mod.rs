//! Transports: how a prefill moves a [`BlockPlan`]'s bytes into a decode's cache.
//!
//! Each transport is one folder with its two halves: the decode's accepting half ([`Acceptor`]) and the
//! prefill's connecting half ([`Connector`]), both made by its [`Transport`] entry in [`REGISTRY`]. Adding a
//! transport is one folder and one line there. The handshake carries each transport's own details as an opaque
//! value ([`crate::wire::Offer::details`], [`crate::wire::Welcome::details`]) that only the transport reads.
//!
//! Transports never import each other, the control plane or the communicator.

pub mod cuda_ipc;
pub mod frame;
pub mod rdma;
pub mod shm;
pub mod tcp;

use crate::config::Config;
use crate::cuda::MemoryKind;
use crate::error::{Error, Result};
use crate::log::Logger;
use crate::memory::{CacheLayout, TensorSet};
use crate::plan::{BlockPlan, PlanForm, SliceGeometry};
use crate::wire::TransportKind;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::Arc;

/// Every transport, fastest first: the one place that lists them.
pub static REGISTRY: [&dyn Transport; 4] = [&cuda_ipc::CudaIpc, &shm::Shm, &rdma::Rdma, &tcp::Tcp];

/// The registry entry of `kind`.
pub fn transport(kind: TransportKind) -> &'static dyn Transport {
    *REGISTRY.iter().find(|t| t.kind() == kind).expect("every transport kind is registered")
}

/// What either half of a transport is set up with.
pub struct Environment<'a> {
    /// The communicator's cache.
    pub cache: &'a Arc<CacheLayout>,
    pub config: &'a Config,
    /// The GPU index the communicator was given (picks the RDMA NIC).
    pub gpu_idx: u32,
    pub log: &'a Arc<Logger>,
    /// The addresses the decode's listeners bind, all on one port each (empty for prefill).
    pub listen_ips: &'a [IpAddr],
}

/// One transport: makes its two halves for a communicator.
pub trait Transport: Sync {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;

    /// Whether it can move a cache that lives in `location`.
    fn serves(&self, location: MemoryKind) -> bool {
        let _ = location;
        true
    }

    /// Whether it can be used on this machine with `config`: what it would use (a NIC, an interface), or why
    /// it cannot be used. Changes nothing; `kvtransfer info` asks every transport.
    fn probe(&self, config: &Config) -> std::result::Result<String, String>;

    /// The decode's half, serving `env.cache`.
    fn acceptor(&self, env: &Environment<'_>) -> Result<Arc<dyn Acceptor>>;

    /// The prefill's half, writing from `env.cache`.
    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>>;
}

/// A prefill peer the handshake has agreed with, as its transport sees it.
pub struct Admission<'a> {
    /// The peer, for logs.
    pub peer: &'a str,
    /// Where its blocks land inside ours.
    pub geometry: SliceGeometry,
    /// The tensors it sends.
    pub tensors: TensorSet,
    /// What the prefill's half of this transport sent with its offer.
    pub details: &'a Value,
    /// The prefill's process, for a peer of this host (as the kernel named it).
    pub pid: Option<u32>,
    /// The proof a connection of this session must open with ([`crate::admission`]), from its token; `None`
    /// without `KVCACHE_AUTH_TOKEN`.
    pub proof: &'a dyn Fn(u64) -> Option<crate::auth::Tag>,
}

/// What the accepting half answers an admission with.
pub struct Accepted {
    /// The session's name: random, so that only the peer it was sent to can present it.
    pub session: u64,
    /// What the prefill's half needs to reach this one.
    pub details: Value,
}

/// The decode's half of a transport: lets agreed prefill peers write into the cache.
pub trait Acceptor: Send + Sync {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Sets up the data path for one prefill peer. `Unavailable`: not for this peer, another transport may be.
    fn accept(&self, admission: &Admission<'_>) -> Result<Accepted>;
    /// Stops `session`'s data path: once this returns `true`, nothing more of it lands in the cache. `false`
    /// where the transport cannot stop a peer that writes on its own (a same-host one).
    fn cut_off(&self, session: u64) -> bool {
        let _ = session;
        false
    }
    /// Whether `session` has evidence of its own that a write of exactly `blocks` of `layer` arrived (for a
    /// `Done` that names it). `true` where it has none to give: the writer's completed copy is the evidence
    /// (shared memory, CUDA IPC), or the mark is (RDMA, see [`Acceptor::watch`]).
    fn delivered(&self, session: u64, layer: u32, blocks: &[u32]) -> bool {
        let _ = (session, layer, blocks);
        true
    }
    /// The device this half uses, where it has one (the RDMA NIC).
    fn device(&self) -> Option<&str> {
        None
    }
    /// Stops every session's data path: once this returns nothing more lands in the cache through this half
    /// (where the transport can stop its peers; see [`Acceptor::cut_off`]).
    fn close(&self) {}
    /// Where this half reports the marks its sessions receive ([`Link::write_marked`]), for transports whose
    /// writes the decode's side cannot otherwise see land (RDMA).
    fn watch(&self, marks: MarkSink) {
        let _ = marks;
    }
}

/// Hears `(session, mark)` each time a session's mark arrives: everything written before it is in the cache.
pub type MarkSink = Arc<dyn Fn(u64, u32) + Send + Sync>;

/// The prefill's half of a transport: opens links to decode peers.
pub trait Connector: Send + Sync {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Prepares one connection; what it offers goes into the hello.
    fn prepare(&self) -> Result<Box<dyn PendingLink>>;
    /// The device this half uses, where it has one (the RDMA NIC).
    fn device(&self) -> Option<&str> {
        None
    }
}

/// The decode's welcome, as the prefill's half of the chosen transport reads it.
pub struct Answer<'a> {
    /// The decode peer (`ip:port`), for messages.
    pub peer: &'a str,
    /// The host the decode was reached at.
    pub host: &'a str,
    /// The decode's name for this connection.
    pub session: u64,
    /// What the decode's half of the transport answered.
    pub details: &'a Value,
    /// Where this prefill's blocks land inside the decode's.
    pub geometry: SliceGeometry,
    /// Blocks per tensor of the decode's cache.
    pub remote_blocks: u32,
    /// What a connection of this session opens with ([`crate::admission`]): the proof over `session` (zeros
    /// without `KVCACHE_AUTH_TOKEN`).
    pub proof: crate::auth::Tag,
    /// When this attempt to connect ends (the connect timeout, for the whole handshake).
    pub deadline: std::time::Instant,
}

/// A connection being set up: offered in the hello, finished with the decode's answer.
pub trait PendingLink: Send {
    /// What this half tells the decode's half in the hello.
    fn offer(&self) -> Value {
        Value::Null
    }
    /// Opens the link to the decode's half described by `answer`, checking everything it says.
    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>>;
}

/// The prefill end of one connection to a decode peer.
pub trait Link: Send {
    /// Which transport this is.
    fn transport(&self) -> TransportKind;

    /// The form this link takes calls in.
    fn plan_form(&self) -> PlanForm {
        PlanForm::Runs
    }

    /// Moves every tensor of the plan's blocks into the peer. Returns once the bytes are in the peer's
    /// memory.
    fn write(&mut self, plan: &BlockPlan) -> Result<()>;

    /// [`Link::write`], then `mark` where the decode's half sees it only after the bytes (RDMA: a send on the
    /// same queue pair). Where the decode's half cannot see writes land (RDMA), it believes a write done only
    /// once its mark has come; elsewhere the write's return is enough and the mark is not sent.
    ///
    /// `meanwhile` runs at most once: while the bytes are on their way where the link waits for them (RDMA,
    /// CUDA IPC), so that what the caller prepares for after the write costs it no time; before the write
    /// elsewhere. A write may fail after it ran, or before (then it does not run); one that succeeds ran it. A
    /// panic in it becomes the write's error (`INTERNAL`) once nothing of the write can still read the cache.
    fn write_marked(&mut self, plan: &BlockPlan, mark: u32, meanwhile: &mut dyn FnMut()) -> Result<()> {
        let _ = mark;
        meanwhile();
        self.write(plan)
    }
}

/// A transport's details as the handshake carries them.
pub fn to_details<T: Serialize>(details: &T) -> Value {
    serde_json::to_value(details).expect("transport details are plain data")
}

/// Reads the details a peer's half of transport `kind` sent; anything malformed is a protocol error.
pub fn from_details<T: DeserializeOwned>(kind: TransportKind, details: &Value) -> Result<T> {
    T::deserialize(details).map_err(|e| Error::protocol(format!("the peer's {kind} details are malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_registered_once_fastest_first() {
        let kinds: Vec<TransportKind> = REGISTRY.iter().map(|t| t.kind()).collect();
        assert_eq!(kinds, TransportKind::ALL);
        for kind in TransportKind::ALL {
            assert_eq!(transport(kind).kind(), kind);
        }
    }

    #[test]
    fn random_numbers_differ_and_are_never_zero() {
        let a: Vec<u64> = (0..64).map(|_| crate::auth::random_u64()).collect();
        assert!(a.iter().all(|&n| n != 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len());
    }

    #[test]
    fn malformed_details_are_protocol_errors() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Port {
            port: u16,
        }
        let err = from_details::<Port>(TransportKind::Tcp, &serde_json::json!({ "port": 70000 })).unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::Protocol);
        assert!(err.message().contains("tcp details"), "{err}");
        assert_eq!(from_details::<Port>(TransportKind::Tcp, &serde_json::json!({ "port": 7 })).unwrap().port, 7);
    }
}
