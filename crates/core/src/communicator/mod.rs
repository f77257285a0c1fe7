//! The communicator: one per engine rank. A decode communicator registers its cache and listens; a prefill
//! communicator connects to decode peers and writes blocks into them.
//!
//! ```
//! use kvtransfer::{Communicator, CommunicatorSpec, Config, Role};
//! use kvtransfer::memory::{CacheLayout, CacheSpec, HostAllocation};
//!
//! let (blocks, bytes) = (8u32, 256u64);
//! let mut src = HostAllocation::new((blocks as u64 * bytes) as usize).unwrap();
//! let dst = HostAllocation::new((blocks as u64 * bytes) as usize).unwrap();
//! src.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
//! let spec = |role, addr| CommunicatorSpec {
//!     role, gpu_idx: 0, port: 0, tp_size: 1, tp_idx: 0,
//!     // SAFETY: both allocations hold `blocks` blocks and outlive the communicators (dropped first, below).
//!     cache: unsafe { CacheLayout::new(CacheSpec { key: vec![addr], block_number: blocks, block_bytes: bytes, ..Default::default() }) }.unwrap(),
//! };
//! let decode = Communicator::new(spec(Role::Decode, dst.addr()), Config::default()).unwrap();
//! let port = decode.port();
//! let prefill = Communicator::new(spec(Role::Prefill, src.addr()), Config::default()).unwrap();
//! prefill.connect("127.0.0.1", port, 1).unwrap();
//! prefill.write_cache("127.0.0.1", port, &[2, 3], &[0, 5], 0).unwrap();
//! assert_eq!(&dst.as_slice()[..256], &src.as_slice()[512..768]);
//! assert_eq!(&dst.as_slice()[1280..1536], &src.as_slice()[768..1024]);
//! ```
//!
//! The prefill side ([`prefill`]) keeps its decode peers and their links; the decode side ([`decode`])
//! listens and answers handshakes; both follow the rules of [`negotiation`], which does no I/O.

mod decode;
pub mod negotiation;
mod prefill;
mod workers;

use self::decode::DecodeSide;
use self::prefill::PrefillSide;
use crate::config::{Config, TransportChoice};
use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use crate::memory::CacheLayout;
use crate::plan::SliceGeometry;
use crate::transport::{self, Environment, Transport};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use crate::wire::{Role, TransportKind};

/// Everything a communicator is built from, besides its configuration.
#[derive(Debug, Clone)]
pub struct CommunicatorSpec {
    pub role: Role,
    /// Picks the RDMA NIC (`KVCACHE_RDMA_NICS[gpu_idx % n]`).
    pub gpu_idx: u32,
    /// The decode side's control port (0 picks a free one; see [`Communicator::port`]). Unused by prefill.
    pub port: u16,
    /// The cache: made from raw addresses by the `unsafe` [`CacheLayout::new`].
    pub cache: CacheLayout,
    /// This rank's tensor-parallel size and index (prefill side; 1 and 0 for decode).
    pub tp_size: u32,
    pub tp_idx: u32,
}

/// One side of KV-cache transfers. Safe to share between threads: writes to different peers run in
/// parallel, writes to one peer one after another.
pub struct Communicator {
    role: Role,
    gpu_idx: u32,
    cache: Arc<CacheLayout>,
    config: Config,
    log: Arc<Logger>,
    closed: AtomicBool,
    side: Side,
}

enum Side {
    Prefill(PrefillSide),
    Decode(DecodeSide),
}

impl Communicator {
    /// Validates the cache, sets up the transports and, for a decode communicator, starts listening.
    pub fn new(spec: CommunicatorSpec, config: Config) -> Result<Communicator> {
        let log = Arc::new(Logger::new(&config, format!("{}:{}", spec.role.as_str(), spec.gpu_idx))?);
        let built = Communicator::build(spec, config, log.clone());
        if let Err(e) = &built {
            log.error(format!("cannot create the communicator: {e}"));
        }
        built
    }

    fn build(spec: CommunicatorSpec, config: Config, log: Arc<Logger>) -> Result<Communicator> {
        let cache = Arc::new(spec.cache);
        let kinds = negotiation::candidates(config.transport, cache.location())?;
        let listen_ip = match spec.role {
            Role::Decode => crate::net::listen_addr(config.socket_ifname.as_deref())?,
            Role::Prefill => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let env = Environment { cache: &cache, config: &config, gpu_idx: spec.gpu_idx, log: &log, listen_ip };
        let side = match spec.role {
            Role::Prefill => {
                SliceGeometry::for_ranks(spec.tp_size, spec.tp_idx, 1)?;
                let connectors = set_up(&env, &kinds, |t| t.connector(&env))?;
                Side::Prefill(PrefillSide::new(connectors, spec.tp_size, spec.tp_idx))
            }
            Role::Decode => {
                let acceptors = set_up(&env, &kinds, |t| t.acceptor(&env))?;
                Side::Decode(DecodeSide::listen(spec.port, &env, acceptors)?)
            }
        };
        let comm = Communicator { role: spec.role, gpu_idx: spec.gpu_idx, cache, config, log, closed: AtomicBool::new(false), side };
        comm.log.debug(format!(
            "{} communicator ready: {} layers of {:?}, {} blocks of {} bytes, transports {}{}",
            comm.role.as_str(),
            comm.cache.layers(),
            comm.cache.tensors().iter().map(|t| t.name()).collect::<Vec<_>>(),
            comm.cache.block_number(),
            comm.cache.kv_block_bytes(),
            names(&comm.transports()),
            match &comm.side {
                Side::Decode(d) => format!(", control port {}", d.port()),
                Side::Prefill(p) => format!(", tp {}", p.tp_description()),
            }
        ));
        Ok(comm)
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The GPU index given at construction.
    pub fn gpu_idx(&self) -> u32 {
        self.gpu_idx
    }
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The transports this side set up, preferred first.
    pub fn transports(&self) -> Vec<TransportKind> {
        match &self.side {
            Side::Prefill(p) => p.transports(),
            Side::Decode(d) => d.transports(),
        }
    }
    /// The preferred transport: the one connections use unless the peer lacks it.
    pub fn transport(&self) -> TransportKind {
        self.transports()[0]
    }
    /// The RDMA device in use, if any.
    pub fn rdma_device(&self) -> Option<&str> {
        match &self.side {
            Side::Prefill(p) => p.device(),
            Side::Decode(d) => d.device(),
        }
    }
    /// The registered cache.
    pub fn cache(&self) -> &CacheLayout {
        &self.cache
    }
    /// The control port a decode communicator listens on (0 for prefill).
    pub fn port(&self) -> u16 {
        match &self.side {
            Side::Decode(d) => d.port(),
            Side::Prefill(_) => 0,
        }
    }

    /// Connects to the decode communicator at `ip:port` (whose tensor-parallel size is `dst_tp_size`).
    /// Connecting to a connected peer does nothing.
    pub fn connect(&self, ip: &str, port: u16, dst_tp_size: u32) -> Result<()> {
        let result = self.prefill("connect").and_then(|p| p.connect(self, ip, port, dst_tp_size));
        self.logged(|| format!("connect to {ip}:{port}"), result)
    }

    /// [`Communicator::connect`] on a thread of the library's own, one per peer: returns at once, and `done`
    /// runs on that thread with the outcome.
    pub fn connect_then(self: &Arc<Self>, ip: &str, port: u16, dst_tp_size: u32, done: impl FnOnce(Result<()>) + Send + 'static) {
        let (comm, host) = (self.clone(), ip.to_string());
        self.on_peer_thread(ip, port, move || comm.connect(&host, port, dst_tp_size), done);
    }

    /// [`Communicator::write_cache`] on the peer's own thread: returns at once, and `done` runs on that thread
    /// with the outcome. Calls to one peer run in the order they were made.
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache_then(
        self: &Arc<Self>,
        ip: &str,
        port: u16,
        local: Vec<u32>,
        remote: Vec<u32>,
        layer: u32,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let (comm, host) = (self.clone(), ip.to_string());
        self.on_peer_thread(ip, port, move || comm.write_cache(&host, port, &local, &remote, layer), done);
    }

    fn on_peer_thread(
        &self,
        ip: &str,
        port: u16,
        work: impl FnOnce() -> Result<()> + Send + 'static,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        match &self.side {
            Side::Prefill(p) => p.workers().submit(&format!("{ip}:{port}"), work, done),
            // The call itself says why (a decode communicator does not connect or write).
            Side::Decode(_) => done(work()),
        }
    }

    /// The transport of the connection to `ip:port` (`None` when there is none, or it broke).
    pub fn connected_transport(&self, ip: &str, port: u16) -> Option<TransportKind> {
        match &self.side {
            Side::Prefill(p) => p.connected_transport(ip, port),
            Side::Decode(_) => None,
        }
    }

    /// Whether a working connection to `ip:port` exists.
    pub fn is_connected(&self, ip: &str, port: u16) -> bool {
        self.connected_transport(ip, port).is_some()
    }

    /// Writes blocks `local[i]` of layer `layer` (key and value, and scales if any) into blocks `remote[i]`
    /// of the peer at `ip:port`. Returns once every byte is in the peer's memory. Nothing moves if any
    /// argument is refused.
    pub fn write_cache(&self, ip: &str, port: u16, local: &[u32], remote: &[u32], layer: u32) -> Result<()> {
        let result = self.prefill("writeCache").and_then(|p| p.write(self, ip, port, local, remote, layer));
        self.logged(|| format!("writeCache to {ip}:{port} (layer {layer}, {} blocks)", local.len()), result)
    }

    /// Closes every connection; a decode communicator stops listening and, once this returns, writes
    /// nothing more into its cache. Later calls fail with `CLOSED`.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.side {
            Side::Prefill(p) => p.close(),
            Side::Decode(d) => d.close(),
        }
        self.log.debug("closed");
    }

    /// Writes a line to this communicator's error log: for refusals a binding makes before calling in.
    pub fn log_error(&self, message: &str) {
        self.log.error(message);
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorCode::Closed, "the communicator is closed"));
        }
        Ok(())
    }

    fn prefill(&self, op: &str) -> Result<&PrefillSide> {
        self.check_open()?;
        match &self.side {
            Side::Prefill(p) => Ok(p),
            Side::Decode(_) => Err(Error::invalid(format!("{op} is for prefill communicators; this one is decode"))),
        }
    }

    /// Logs a failure; `what` names the operation and is only formatted when there is one to log.
    fn logged<T>(&self, what: impl FnOnce() -> String, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.log.error(format!("{} failed: {e}", what()));
        }
        result
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sets up one half (`open`) of each transport in `kinds`. A transport chosen by name must work; under `auto`
/// one that cannot be set up here is left out, and the debug log says why.
fn set_up<H>(env: &Environment<'_>, kinds: &[TransportKind], open: impl Fn(&dyn Transport) -> Result<H>) -> Result<Vec<H>> {
    if let TransportChoice::Only(kind) = env.config.transport {
        let half = open(transport::transport(kind))
            .map_err(|e| Error::new(e.code(), format!("KVCACHE_TRANSPORT={kind}: {}", e.message())))?;
        return Ok(vec![half]);
    }
    let mut halves = Vec::with_capacity(kinds.len());
    let (mut used, mut left_out) = (Vec::new(), Vec::new());
    for &kind in kinds {
        match open(transport::transport(kind)) {
            Ok(half) => {
                halves.push(half);
                used.push(kind);
            }
            Err(e) => left_out.push(e),
        }
    }
    if halves.is_empty() {
        return Err(left_out.pop().expect("auto has candidates"));
    }
    for e in left_out {
        env.log.debug(format!("transport auto: {}; using {}", e.message(), names(&used)));
    }
    Ok(halves)
}

/// `a`, `a and b`, `a, b and c`.
fn names(kinds: &[TransportKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    match names.split_last() {
        None => "none".into(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}
