//! The communicator: one per engine rank. A decode communicator registers its cache and listens; a prefill
//! communicator connects to decode peers and writes blocks into them.
//!
//! ```
//! use kvtransfer::{Communicator, CommunicatorSpec, Config, Role};
//! use kvtransfer::memory::{CacheSpec, HostAllocation};
//!
//! let (blocks, bytes) = (8u32, 256u64);
//! let mut src = HostAllocation::new((blocks as u64 * bytes) as usize).unwrap();
//! let dst = HostAllocation::new((blocks as u64 * bytes) as usize).unwrap();
//! src.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
//! let spec = |role, addr| CommunicatorSpec {
//!     role, gpu_idx: 0, port: 0, tp_size: 1, tp_idx: 0,
//!     cache: CacheSpec { key: vec![addr], block_number: blocks, block_bytes: bytes, ..Default::default() },
//! };
//! let decode = Communicator::new(spec(Role::Decode, dst.addr()), Config::default()).unwrap();
//! let port = decode.port();
//! let prefill = Communicator::new(spec(Role::Prefill, src.addr()), Config::default()).unwrap();
//! prefill.connect("127.0.0.1", port, 1).unwrap();
//! prefill.write_cache("127.0.0.1", port, &[2, 3], &[0, 5], 0).unwrap();
//! assert_eq!(&dst.as_slice()[..256], &src.as_slice()[512..768]);
//! assert_eq!(&dst.as_slice()[1280..1536], &src.as_slice()[768..1024]);
//! ```

use crate::config::{Config, TransportChoice};
use crate::control::{self, ControlServer, Hello, Reply, Welcome, PROTOCOL_VERSION};
use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use crate::memory::{CacheLayout, CacheSpec, TensorSet};
use crate::net;
use crate::plan::{BlockPlan, SliceGeometry};
use crate::cuda::MemoryKind;
use crate::transport::cuda_ipc::{self, CudaIpcLink, IpcWelcome};
use crate::transport::rdma::{RdmaContext, RdmaTarget, RdmaWelcome};
use crate::transport::shm::{ShmLink, ShmTarget};
use crate::transport::tcp::{Session, TcpLink, TcpReceiver};
use crate::transport::Link;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Which side of the transfer a communicator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Owns finished KV blocks and writes them out.
    Prefill,
    /// Owns the cache the blocks are written into; listens on its port.
    Decode,
}

impl Role {
    /// `"prefill"` or `"decode"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            _ => Err(Error::invalid(format!("role must be \"prefill\" or \"decode\", not {s:?}"))),
        }
    }
}

/// Everything a communicator is built from, besides its configuration.
#[derive(Debug, Clone)]
pub struct CommunicatorSpec {
    pub role: Role,
    /// Picks the RDMA NIC (`KVCACHE_RDMA_NICS[gpu_idx % n]`).
    pub gpu_idx: u32,
    /// The decode side's control port (0 picks a free one; see [`Communicator::port`]). Unused by prefill.
    pub port: u16,
    pub cache: CacheSpec,
    /// This rank's tensor-parallel size and index (prefill side; 1 and 0 for decode).
    pub tp_size: u32,
    pub tp_idx: u32,
}

/// The transport a communicator settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Rdma,
    Shm,
    CudaIpc,
}

impl TransportKind {
    /// The transport's name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Shm => "shm",
            TransportKind::CudaIpc => "cuda-ipc",
        }
    }
}

/// One side of KV-cache transfers. Safe to share between threads: writes to different peers run in
/// parallel, writes to one peer one after another.
pub struct Communicator {
    role: Role,
    gpu_idx: u32,
    tp_size: u32,
    tp_idx: u32,
    cache: Arc<CacheLayout>,
    config: Config,
    /// Transports this side can use, preferred first.
    transports: Vec<TransportKind>,
    rdma: Option<Arc<RdmaContext>>,
    log: Arc<Logger>,
    closed: AtomicBool,
    side: Side,
}

enum Side {
    Prefill { zmq: zmq::Context, peers: Mutex<HashMap<String, Arc<Mutex<Peer>>>> },
    Decode { port: u16, listening: Mutex<Option<Listening>> },
}

/// A decode side's servers. Fields drop in order: the control server first (it holds the last other
/// references to the others), then the data paths.
struct Listening {
    _control: ControlServer,
    _tcp: Option<Arc<TcpReceiver>>,
    _rdma: Option<Arc<RdmaTarget>>,
    _shm: Option<Arc<ShmTarget>>,
}

/// A decode peer, as the prefill side sees it.
struct Peer {
    /// `None` after a failure broke it: the next call rebuilds it with a new handshake.
    link: Option<Box<dyn Link>>,
    plan: BlockPlan,
    remote_blocks: u32,
    dst_tp_size: u32,
    /// The decode side's name for this connection.
    token: u64,
}

impl Communicator {
    /// Validates the cache, resolves the transport and, for a decode communicator, starts listening.
    pub fn new(spec: CommunicatorSpec, config: Config) -> Result<Communicator> {
        let log = Arc::new(Logger::new(&config, format!("{}:{}", spec.role.as_str(), spec.gpu_idx))?);
        let built = Communicator::build(spec, config, log.clone());
        if let Err(e) = &built {
            log.error(format!("cannot create the communicator: {e}"));
        }
        built
    }

    fn build(spec: CommunicatorSpec, config: Config, log: Arc<Logger>) -> Result<Communicator> {
        let cache = Arc::new(CacheLayout::new(spec.cache)?);
        let (tp_size, tp_idx) = match spec.role {
            Role::Prefill => {
                SliceGeometry::for_ranks(spec.tp_size, spec.tp_idx, 1)?;
                (spec.tp_size, spec.tp_idx)
            }
            Role::Decode => (1, 0),
        };
        let (transports, rdma) = resolve_transports(&config, spec.gpu_idx, spec.role, &cache, &log)?;
        let side = match spec.role {
            Role::Prefill => Side::Prefill { zmq: zmq::Context::new(), peers: Mutex::new(HashMap::new()) },
            Role::Decode => listen(spec.port, &cache, &config, &transports, rdma.clone(), &log)?,
        };
        log.debug(format!(
            "{} communicator ready: {} layers of {:?}, {} blocks of {} bytes, transports {:?}{}{}",
            spec.role.as_str(),
            cache.layers(),
            cache.tensors().iter().map(|t| t.name()).collect::<Vec<_>>(),
            cache.block_number(),
            cache.kv_block_bytes(),
            transports.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            match &rdma {
                Some(r) => format!(" (RDMA on {}, cache registered as {:?})", r.device().name(), r.registration_path()),
                None => String::new(),
            },
            match &side {
                Side::Decode { port, .. } => format!(", control port {port}"),
                Side::Prefill { .. } => format!(", tp {tp_idx}/{tp_size}"),
            }
        ));
        Ok(Communicator {
            role: spec.role,
            gpu_idx: spec.gpu_idx,
            tp_size,
            tp_idx,
            cache,
            config,
            transports,
            rdma,
            log,
            closed: AtomicBool::new(false),
            side,
        })
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
    /// The preferred transport: the one connections use unless the peer lacks it.
    pub fn transport(&self) -> TransportKind {
        self.transports[0]
    }
    /// The RDMA device in use, if any.
    pub fn rdma_device(&self) -> Option<&str> {
        self.rdma.as_ref().map(|r| r.device().name())
    }
    /// The registered cache.
    pub fn cache(&self) -> &CacheLayout {
        &self.cache
    }
    /// The control port a decode communicator listens on (0 for prefill).
    pub fn port(&self) -> u16 {
        match &self.side {
            Side::Decode { port, .. } => *port,
            Side::Prefill { .. } => 0,
        }
    }

    /// Connects to the decode communicator at `ip:port` (whose tensor-parallel size is `dst_tp_size`).
    /// Connecting to a connected peer does nothing.
    pub fn connect(&self, ip: &str, port: u16, dst_tp_size: u32) -> Result<()> {
        let result = self.try_connect(ip, port, dst_tp_size);
        self.logged(|| format!("connect to {ip}:{port}"), result)
    }

    fn try_connect(&self, ip: &str, port: u16, dst_tp_size: u32) -> Result<()> {
        let (_, peers) = self.prefill_side("connect")?;
        let key = peer_key(ip, port);
        let existing = peers.lock().unwrap().get(&key).cloned();
        if let Some(peer) = existing {
            // Connected, or broken and due for a rebuild.
            let mut state = peer.lock().unwrap();
            if state.link.is_none() {
                if let Err(e) = self.rebuild(ip, port, &mut state) {
                    forget(peers, &key, &peer);
                    return Err(e);
                }
            }
            return Ok(());
        }
        SliceGeometry::for_ranks(self.tp_size, self.tp_idx, dst_tp_size)?;
        let peer = self.handshake(ip, port, dst_tp_size, None)?;
        self.check_open()?;
        peers.lock().unwrap().entry(key).or_insert_with(|| Arc::new(Mutex::new(peer)));
        Ok(())
    }

    /// Runs the handshake with the decode at `ip:port` and opens the data path it chose. When a same-host
    /// transport was chosen but cannot be opened (another container, memory the driver cannot share), the
    /// handshake runs again without it.
    fn handshake(&self, ip: &str, port: u16, dst_tp_size: u32, replaces: Option<u64>) -> Result<Peer> {
        let mut offers = self.transports.clone();
        loop {
            match self.handshake_offering(ip, port, dst_tp_size, replaces, &offers) {
                Err((e, Some(local))) if offers.len() > 1 => {
                    self.log.debug(format!("{local} to {ip}:{port} cannot be opened ({e}); offering the others", local = local.as_str()));
                    offers.retain(|&t| t != local);
                }
                other => return other.map_err(|(e, _)| e),
            }
        }
    }

    /// One handshake offering `offers`. A failure to open a same-host transport names it.
    fn handshake_offering(
        &self,
        ip: &str,
        port: u16,
        dst_tp_size: u32,
        replaces: Option<u64>,
        offers: &[TransportKind],
    ) -> std::result::Result<Peer, (Error, Option<TransportKind>)> {
        let (zmq, _) = self.prefill_side("connect").map_err(|e| (e, None))?;
        let pending = match (&self.rdma, offers.contains(&TransportKind::Rdma)) {
            (Some(rdma), true) => Some(rdma.prepare().map_err(|e| (e, None))?),
            _ => None,
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Prefill.as_str().into(),
            layers: self.cache.layers(),
            tensors: self.cache.tensors().bits(),
            block_bytes: self.cache.kv_block_bytes(),
            scale_block_bytes: self.cache.scale_block_bytes(),
            block_number: self.cache.block_number(),
            tp_size: self.tp_size,
            tp_idx: self.tp_idx,
            dst_tp_size,
            transports: offers.iter().map(|t| t.as_str().to_string()).collect(),
            rdma: pending.as_ref().map(|p| p.endpoint()),
            replaces,
            host: net::host_id(),
        };
        let reply = control::request(zmq, ip, port, &control::encode(&hello), self.config.timeout).map_err(|e| (e, None))?;
        let welcome = control::decode_reply(&reply).map_err(|e| (e, None))?;
        let key = peer_key(ip, port);
        let geometry = SliceGeometry::for_ranks(self.tp_size, self.tp_idx, dst_tp_size).map_err(|e| (e, None))?;
        let offered = |t: TransportKind| offers.contains(&t);
        let link: Box<dyn Link> = match (welcome.transport.as_str(), pending, &welcome.rdma, &welcome.cuda_ipc, &welcome.shm) {
            ("tcp", ..) if offered(TransportKind::Tcp) => Box::new(
                TcpLink::connect(ip, welcome.tcp_port, welcome.token, self.cache.clone(), self.config.timeout).map_err(|e| (e, None))?,
            ),
            ("rdma", Some(pending), Some(answer), ..) => {
                Box::new(pending.finish(key.clone(), answer, geometry, welcome.block_number).map_err(|e| (e, None))?)
            }
            ("cuda-ipc", _, _, Some(answer), _) if offered(TransportKind::CudaIpc) => Box::new(
                CudaIpcLink::open(key.clone(), self.cache.clone(), answer, geometry, welcome.block_number)
                    .map_err(|e| (e, Some(TransportKind::CudaIpc)))?,
            ),
            ("shm", _, _, _, Some(answer)) if offered(TransportKind::Shm) => Box::new(
                ShmLink::open(key.clone(), self.cache.clone(), answer, geometry, welcome.block_number)
                    .map_err(|e| (e, Some(TransportKind::Shm)))?,
            ),
            (other, ..) => {
                return Err((
                    Error::protocol(format!(
                        "the decode peer chose transport {other:?}, which was not offered (or came without its details)"
                    )),
                    None,
                ))
            }
        };
        self.log.debug(format!(
            "connected to {key} over {}: its cache has {} blocks{}",
            link.transport(),
            welcome.block_number,
            if replaces.is_some() { " (rebuilt after a failure)" } else { "" }
        ));
        Ok(Peer { plan: BlockPlan::new(link.plan_form()), link: Some(link), remote_blocks: welcome.block_number, dst_tp_size, token: welcome.token })
    }

    /// Replaces a broken connection with a new one to the same peer.
    fn rebuild(&self, ip: &str, port: u16, peer: &mut Peer) -> Result<()> {
        let fresh = self.handshake(ip, port, peer.dst_tp_size, Some(peer.token)).map_err(|e| {
            Error::new(e.code(), format!("the connection broke earlier and could not be rebuilt: {}", e.message()))
        })?;
        *peer = fresh;
        Ok(())
    }

    /// The transport of the connection to `ip:port` (`None` when there is none, or it broke).
    pub fn connected_transport(&self, ip: &str, port: u16) -> Option<&'static str> {
        match &self.side {
            Side::Prefill { peers, .. } => {
                let peer = peers.lock().unwrap().get(&peer_key(ip, port)).cloned()?;
                let state = peer.lock().unwrap();
                state.link.as_ref().map(|l| l.transport())
            }
            Side::Decode { .. } => None,
        }
    }

    /// Whether a connection to `ip:port` exists.
    pub fn is_connected(&self, ip: &str, port: u16) -> bool {
        match &self.side {
            Side::Prefill { peers, .. } => {
                let peer = peers.lock().unwrap().get(&peer_key(ip, port)).cloned();
                peer.is_some_and(|p| p.lock().unwrap().link.is_some())
            }
            Side::Decode { .. } => false,
        }
    }

    /// Writes blocks `local[i]` of layer `layer` (key and value, and scales if any) into blocks `remote[i]`
    /// of the peer at `ip:port`. Returns once every byte is in the peer's memory. Nothing moves if any
    /// argument is refused.
    pub fn write_cache(&self, ip: &str, port: u16, local: &[u32], remote: &[u32], layer: u32) -> Result<()> {
        let result = self.try_write(ip, port, local, remote, layer);
        self.logged(|| format!("writeCache to {ip}:{port} (layer {layer}, {} blocks)", local.len()), result)
    }

    fn try_write(&self, ip: &str, port: u16, local: &[u32], remote: &[u32], layer: u32) -> Result<()> {
        let (_, peers) = self.prefill_side("writeCache")?;
        let key = peer_key(ip, port);
        let peer = peers.lock().unwrap().get(&key).cloned().ok_or_else(|| {
            Error::new(ErrorCode::NotConnected, format!("not connected to {key}: call connect first"))
        })?;
        let mut guard = peer.lock().unwrap();
        let peer_state = &mut *guard;
        let cache = &*self.cache;
        let plan = |p: &mut Peer| p.plan.build(local, remote, layer, cache.layers(), cache.block_number(), p.remote_blocks);
        // The call is checked before anything else happens, a broken connection's rebuild included.
        plan(peer_state)?;
        if peer_state.plan.is_empty() {
            return Ok(());
        }
        if peer_state.link.is_none() {
            if let Err(e) = self.rebuild(ip, port, peer_state) {
                forget(peers, &key, &peer);
                return Err(e);
            }
            // The new connection may take calls in another form, or have another number of blocks.
            plan(peer_state)?;
        }
        let result = peer_state.link.as_mut().expect("connected").write(&peer_state.plan);
        if let Err(e) = &result {
            if matches!(e.code(), ErrorCode::Transport | ErrorCode::Timeout | ErrorCode::Protocol) {
                // The connection's state is unknown now: drop it; the next call rebuilds it.
                peer_state.link = None;
            }
        }
        result
    }

    /// Closes every connection; a decode communicator stops listening and, once this returns, writes
    /// nothing more into its cache. Later calls fail with `CLOSED`.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.side {
            Side::Prefill { peers, .. } => peers.lock().unwrap().clear(),
            Side::Decode { listening, .. } => {
                // Stops the control server, then the data paths: nothing lands after this.
                drop(listening.lock().unwrap().take());
            }
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

    #[allow(clippy::type_complexity)]
    fn prefill_side(&self, op: &str) -> Result<(&zmq::Context, &Mutex<HashMap<String, Arc<Mutex<Peer>>>>)> {
        self.check_open()?;
        match &self.side {
            Side::Prefill { zmq, peers } => Ok((zmq, peers)),
            Side::Decode { .. } => Err(Error::invalid(format!("{op} is for prefill communicators; this one is decode"))),
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

/// Drops a peer whose connection could not be rebuilt, so later calls say `NOT_CONNECTED`; a newer peer
/// under the same key (from a concurrent `connect`) stays.
fn forget(peers: &Mutex<HashMap<String, Arc<Mutex<Peer>>>>, key: &str, peer: &Arc<Mutex<Peer>>) {
    let mut map = peers.lock().unwrap();
    if map.get(key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
        map.remove(key);
    }
}

fn peer_key(ip: &str, port: u16) -> String {
    format!("{ip}:{port}")
}

/// The transports this side offers, preferred first, and the RDMA resources if RDMA is among them.
fn resolve_transports(
    config: &Config,
    gpu_idx: u32,
    role: Role,
    cache: &Arc<CacheLayout>,
    log: &Logger,
) -> Result<(Vec<TransportKind>, Option<Arc<RdmaContext>>)> {
    let open = || RdmaContext::open(cache.clone(), config, gpu_idx, role == Role::Decode);
    let on_gpu = matches!(cache.location(), MemoryKind::Device { .. });
    let unavailable = |why: &str| Err(Error::new(ErrorCode::Unavailable, format!("KVCACHE_TRANSPORT={}: {why}", config.transport.as_str())));
    match config.transport {
        TransportChoice::Tcp => Ok((vec![TransportKind::Tcp], None)),
        TransportChoice::Shm if on_gpu => unavailable("the cache is in GPU memory, shm moves host memory (use cuda-ipc)"),
        TransportChoice::Shm => Ok((vec![TransportKind::Shm], None)),
        TransportChoice::CudaIpc if !on_gpu => unavailable("the cache is in host memory, cuda-ipc moves GPU memory (use shm)"),
        TransportChoice::CudaIpc => Ok((vec![TransportKind::CudaIpc], None)),
        TransportChoice::Rdma => {
            let rdma = open().map_err(|e| Error::new(e.code(), format!("KVCACHE_TRANSPORT=rdma: {}", e.message())))?;
            Ok((vec![TransportKind::Rdma], Some(rdma)))
        }
        TransportChoice::Auto => {
            let same_host = if on_gpu { TransportKind::CudaIpc } else { TransportKind::Shm };
            match open() {
                Ok(rdma) => Ok((vec![same_host, TransportKind::Rdma, TransportKind::Tcp], Some(rdma))),
                Err(e) => {
                    log.debug(format!(
                        "transport auto: RDMA is not usable for GPU {gpu_idx} (NIC {}): {e}; using {} and tcp",
                        config.nic_for_gpu(gpu_idx).unwrap_or("any, KVCACHE_RDMA_NICS is unset"),
                        same_host.as_str()
                    ));
                    Ok((vec![same_host, TransportKind::Tcp], None))
                }
            }
        }
    }
}

fn listen(
    port: u16,
    cache: &Arc<CacheLayout>,
    config: &Config,
    transports: &[TransportKind],
    rdma: Option<Arc<RdmaContext>>,
    log: &Arc<Logger>,
) -> Result<Side> {
    let ip = net::listen_addr(config.socket_ifname.as_deref())?;
    if config.socket_ifname.is_none() && log.debug_enabled() {
        let first = net::first_usable_interface().map(|(n, ip)| format!("{n} {ip}")).unwrap_or_else(|| "none".into());
        log.debug(format!("KVCACHE_SOCKET_IFNAME unset: listening on all interfaces (first usable: {first})"));
    }
    let tcp = match transports.contains(&TransportKind::Tcp) {
        true => Some(Arc::new(TcpReceiver::start(ip, cache.clone(), log.clone(), config.timeout)?)),
        false => None,
    };
    let rdma = rdma.map(|r| Arc::new(RdmaTarget::new(r)));
    // Same-host transports are prepared once; under auto, one that cannot be is left out (and logged).
    fn prepared<T>(kind: TransportKind, explicit: bool, log: &Logger, result: Result<T>) -> Result<Option<T>> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(e) if explicit => Err(e),
            Err(e) => {
                log.debug(format!("{} is not offered: {e}", kind.as_str()));
                Ok(None)
            }
        }
    }
    let explicit = transports.len() == 1;
    let cuda_ipc = match transports.contains(&TransportKind::CudaIpc) {
        true => prepared(TransportKind::CudaIpc, explicit, log, cuda_ipc::export(cache))?,
        false => None,
    };
    let shm = match transports.contains(&TransportKind::Shm) {
        true => prepared(TransportKind::Shm, explicit, log, ShmTarget::new(cache).map(Arc::new))?,
        false => None,
    };
    let handshake = Handshake {
        cache: cache.clone(),
        host: net::host_id(),
        tcp: tcp.clone(),
        rdma: rdma.clone(),
        cuda_ipc,
        shm: shm.clone(),
        log: log.clone(),
    };
    let zmq = zmq::Context::new();
    let control = ControlServer::bind(&zmq, &ip.to_string(), port, move |req| control::encode(&handshake.answer(req)))?;
    let port = control.port();
    Ok(Side::Decode { port, listening: Mutex::new(Some(Listening { _control: control, _tcp: tcp, _rdma: rdma, _shm: shm })) })
}

/// The decode side's half of the handshake.
struct Handshake {
    cache: Arc<CacheLayout>,
    /// This host ([`net::host_id`]); same-host transports are offered only to prefills that share it.
    host: Option<String>,
    tcp: Option<Arc<TcpReceiver>>,
    rdma: Option<Arc<RdmaTarget>>,
    cuda_ipc: Option<IpcWelcome>,
    shm: Option<Arc<ShmTarget>>,
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
        let hello = control::decode_hello(request)?;
        let cache = &*self.cache;
        if hello.role != Role::Prefill.as_str() {
            return Err(Error::protocol(format!("a {:?} communicator cannot connect to a decode one", hello.role)));
        }
        if hello.layers != cache.layers() {
            return Err(Error::invalid(format!(
                "layer count mismatch: the prefill cache has {} layers, this decode cache has {}",
                hello.layers,
                cache.layers()
            )));
        }
        let theirs = TensorSet::from_bits(hello.tensors).ok_or_else(|| Error::protocol("bad tensor mask"))?;
        if theirs != cache.tensors() {
            let names = |s: TensorSet| s.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
            return Err(Error::invalid(format!(
                "tensor mismatch: the prefill cache has [{}], this decode cache has [{}] (key-only on one side only?)",
                names(theirs),
                names(cache.tensors())
            )));
        }
        let geometry = SliceGeometry::for_ranks(hello.tp_size, hello.tp_idx, hello.dst_tp_size)?;
        let ratio = geometry.ratio as u64;
        for (what, theirs, ours) in [
            ("blockBytes", hello.block_bytes, cache.kv_block_bytes()),
            ("scaleBlockBytes", hello.scale_block_bytes, cache.scale_block_bytes()),
        ] {
            if theirs.checked_mul(ratio) != Some(ours) {
                return Err(Error::invalid(format!(
                    "block geometry mismatch: prefill {what} {theirs} × {ratio} slice(s) per decode block \
                     (prefillTpSize {} / dstTpSize {}) ≠ this decode's {what} {ours}",
                    hello.tp_size, hello.dst_tp_size
                )));
            }
        }
        let peer = format!("prefill tp {}/{}", hello.tp_idx, hello.tp_size);
        let same_host = self.host.is_some() && hello.host == self.host;
        for offered in &hello.transports {
            match (offered.as_str(), &self.rdma, &hello.rdma, &self.tcp) {
                ("cuda-ipc", ..) if same_host && self.cuda_ipc.is_some() => {
                    self.log.debug(format!("accepted {peer} over cuda-ipc with {} blocks", hello.block_number));
                    let mut welcome = self.welcome(TransportKind::CudaIpc, 0, 0, None);
                    welcome.cuda_ipc = self.cuda_ipc.clone();
                    return Ok(welcome);
                }
                ("shm", ..) if same_host && self.shm.is_some() => {
                    self.log.debug(format!("accepted {peer} over shm with {} blocks", hello.block_number));
                    let mut welcome = self.welcome(TransportKind::Shm, 0, 0, None);
                    welcome.shm = self.shm.as_ref().map(|s| s.welcome());
                    return Ok(welcome);
                }
                ("rdma", Some(rdma), Some(endpoint), _) => {
                    let (token, answer) = rdma.accept(endpoint, hello.replaces)?;
                    self.log.debug(format!(
                        "accepted {peer} over rdma on {} with {} blocks (slice {} of {} per block; {} sessions)",
                        rdma.device_name(),
                        hello.block_number,
                        geometry.slot,
                        geometry.ratio,
                        rdma.sessions()
                    ));
                    return Ok(self.welcome(TransportKind::Rdma, 0, token, Some(answer)));
                }
                ("tcp", _, _, Some(tcp)) => {
                    let token = tcp.admit(Session { peer: peer.clone(), geometry, tensors: theirs });
                    self.log.debug(format!(
                        "accepted {peer} over tcp with {} blocks (slice {} of {} per block)",
                        hello.block_number, geometry.slot, geometry.ratio
                    ));
                    return Ok(self.welcome(TransportKind::Tcp, tcp.port(), token, None));
                }
                _ => {}
            }
        }
        let ours: Vec<&str> = [
            self.cuda_ipc.as_ref().map(|_| "cuda-ipc"),
            self.shm.as_ref().map(|_| "shm"),
            self.rdma.as_ref().map(|_| "rdma"),
            self.tcp.as_ref().map(|_| "tcp"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let hosts = match same_host {
            true => "",
            false => " (cuda-ipc and shm only between processes of one host and pid namespace)",
        };
        Err(Error::new(
            ErrorCode::Unavailable,
            format!("no common transport: the prefill offers {:?}, this decode has {ours:?}{hosts}", hello.transports),
        ))
    }

    fn welcome(&self, transport: TransportKind, tcp_port: u16, token: u64, rdma: Option<RdmaWelcome>) -> Welcome {
        Welcome {
            protocol: PROTOCOL_VERSION,
            block_number: self.cache.block_number(),
            transport: transport.as_str().into(),
            tcp_port,
            token,
            rdma,
            cuda_ipc: None,
            shm: None,
        }
    }
}
