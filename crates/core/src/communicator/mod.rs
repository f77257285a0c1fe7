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
//! The prefill side (`prefill`) keeps its decode peers and their links; the decode side (`decode`)
//! listens and answers handshakes; both follow the rules of `crate::control::negotiation`, which does no I/O.

mod decode;
pub mod peer_events;
mod prefill;
pub mod requests;
mod workers;

use self::decode::DecodeSide;
use self::prefill::PrefillSide;
use crate::sync::lock;
use crate::config::{Config, LogLevel, TransportChoice};
use crate::error::{Error, ErrorCode, Result};
use crate::log::{Fields, Logger};
use crate::memory::CacheLayout;
use crate::metrics::{Instruments, Levels, Raised, Stats};
use crate::plan::SliceGeometry;
use crate::transport::{self, Environment, Transport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use self::requests::{Notification, Status};
pub use crate::channel::RequestId;
pub use crate::wire::{Role, TransportKind};

/// Whether an asynchronous call may still be cancelled: it is either cancelled before it starts, or started
/// (and then runs to its end), never both.
#[derive(Debug, Default)]
pub struct Cancel(std::sync::atomic::AtomicU8);

impl Cancel {
    const PENDING: u8 = 0;
    const STARTED: u8 = 1;
    const CANCELLED: u8 = 2;

    /// Cancels the call if it has not started; `true` if it will not start.
    pub fn cancel(&self) -> bool {
        let was = self.0.compare_exchange(Self::PENDING, Self::CANCELLED, Ordering::AcqRel, Ordering::Acquire);
        was.is_ok() || was == Err(Self::CANCELLED)
    }

    /// Starts the call unless it was cancelled; `false` if it must not run.
    fn start(&self) -> bool {
        self.0.compare_exchange(Self::PENDING, Self::STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// What a call that failed was about: the fields of its log line.
#[derive(Default, Clone, Copy)]
struct About<'a> {
    peer: Option<(&'a str, u16)>,
    request: Option<&'a RequestId>,
    layer: Option<u32>,
}

/// A number naming one wait of this process ([`Communicator::wait_for`]).
pub fn next_wait_token() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 52);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

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
    metrics: Arc<Instruments>,
    closed: AtomicBool,
    /// The outcome of the close, once it has ended: a second caller waits for it.
    close_outcome: (Mutex<Option<Result<()>>>, std::sync::Condvar),
    side: Side,
}

enum Side {
    Prefill(PrefillSide),
    Decode(DecodeSide),
}

impl Communicator {
    /// Validates the cache, sets up the transports and, for a decode communicator, starts listening.
    pub fn new(spec: CommunicatorSpec, mut config: Config) -> Result<Communicator> {
        let log = Arc::new(Logger::new(&config, format!("{}:{}", spec.role.as_str(), spec.gpu_idx))?);
        // The logger holds the hook from here on, and lets go of it at close: the configuration kept does not.
        config.log_hook = None;
        let built = Communicator::build(spec, config, log.clone());
        if let Err(e) = &built {
            log.error(format!("cannot create the communicator: {e}"));
            log.unhook();
        }
        built
    }

    fn build(spec: CommunicatorSpec, config: Config, log: Arc<Logger>) -> Result<Communicator> {
        let cache = Arc::new(spec.cache);
        let kinds = crate::control::negotiation::candidates(config.transport, cache.location())?;
        let listen_ips = match spec.role {
            Role::Decode => crate::net::listen_addrs(config.socket_ifname.as_deref())?,
            Role::Prefill => Vec::new(),
        };
        // Before any transport is set up (memory registered, ports bound).
        let open = listen_ips.iter().find(|ip| !ip.is_loopback()).filter(|_| config.auth_token.is_none());
        if let Some(ip) = open.filter(|_| config.refuse_open_listen && !config.insecure) {
            return Err(Error::config(format!(
                "this decode would listen on {ip} without KVCACHE_AUTH_TOKEN, where any host that reaches the port could \
                 write into its cache: set authToken (KVCACHE_AUTH_TOKEN) on both sides, listen on loopback only \
                 (socketIfname: 'lo'), or accept the risk with insecure: true (KVCACHE_INSECURE=1)"
            )));
        }
        let env = Environment { cache: &cache, config: &config, gpu_idx: spec.gpu_idx, log: &log, listen_ips: &listen_ips };
        let metrics = Arc::new(Instruments::new(spec.role));
        let side = match spec.role {
            Role::Prefill => {
                SliceGeometry::for_ranks(spec.tp_size, spec.tp_idx, 1)?;
                let connectors = set_up(&env, &kinds, |t| t.connector(&env))?;
                Side::Prefill(PrefillSide::new(connectors, spec.tp_size, spec.tp_idx, metrics.clone()))
            }
            Role::Decode => {
                let acceptors = set_up(&env, &kinds, |t| t.acceptor(&env))?;
                Side::Decode(DecodeSide::listen(spec.port, &env, acceptors, metrics.clone())?)
            }
        };
        let comm = Communicator { role: spec.role, gpu_idx: spec.gpu_idx, cache, config, log, metrics, closed: AtomicBool::new(false), close_outcome: Default::default(), side };
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

    /// What this communicator has counted (see [`crate::metrics`]): cheap enough to call every second, and
    /// still readable after `close`.
    pub fn stats(&self) -> Stats {
        let levels = match &self.side {
            Side::Decode(d) => d.levels(),
            Side::Prefill(_) => Levels::default(),
        };
        self.metrics.snapshot(levels)
    }

    /// Connects to the decode communicator at `ip:port` (whose tensor-parallel size is `dst_tp_size`).
    /// Connecting to a connected peer does nothing.
    pub fn connect(&self, ip: &str, port: u16, dst_tp_size: u32) -> Result<()> {
        let result = self.prefill("connecting").and_then(|p| {
            let connected = p.connect(self, ip, port, dst_tp_size);
            if let Err(e) = &connected {
                p.metrics_of(ip, port).failed(e.code());
            }
            connected
        });
        self.logged(About { peer: Some((ip, port)), ..About::default() }, || format!("connect to {ip}:{port}"), result)
    }

    /// [`Communicator::connect`] on a thread of the library's own, one per peer: returns at once, and `done`
    /// runs on that thread with the outcome. A connect cancelled ([`Cancel::cancel`]) before it starts does
    /// nothing and fails with `ABORTED`; once started, it runs to its end.
    pub fn connect_then(
        self: &Arc<Self>,
        ip: &str,
        port: u16,
        dst_tp_size: u32,
        cancel: Option<Arc<Cancel>>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let (comm, host) = (self.clone(), ip.to_string());
        let work = move || {
            if cancel.is_some_and(|c| !c.start()) {
                return Err(Error::new(ErrorCode::Aborted, "the connect was cancelled before it started: no connection was made"));
            }
            comm.connect(&host, port, dst_tp_size)
        };
        self.on_peer_thread(ip, port, work, done);
    }

    /// [`Communicator::write_request`] on the peer's own thread: returns at once, and `done` runs on that thread
    /// with the outcome. Calls to one peer run in the order they were made. A call cancelled ([`Cancel::cancel`])
    /// before it starts moves nothing and fails with `ABORTED`; once started, a write is never abandoned halfway.
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache_then(
        self: &Arc<Self>,
        ip: &str,
        port: u16,
        local: Vec<u32>,
        remote: Vec<u32>,
        layer: u32,
        request: Option<RequestId>,
        cancel: Option<Arc<Cancel>>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let (comm, host) = (self.clone(), ip.to_string());
        // Counted as queued (for a connected peer) until it starts, or is dropped without running (the
        // communicator closed).
        let queued = self.prefill("writing").ok().and_then(|p| p.known_metrics(ip, port)).map(|m| Raised::new(m, |m| &m.queued));
        let work = move || {
            drop(queued);
            if cancel.is_some_and(|c| !c.start()) {
                return Err(Error::new(ErrorCode::Aborted, "the write was cancelled before it started: nothing was written"));
            }
            comm.write_request(&host, port, &local, &remote, layer, request.as_ref())
        };
        self.on_peer_thread(ip, port, work, done);
    }

    /// Tells the decode at `ip:port` that `request` will not complete: its `wait_for` fails with `ABORTED`.
    /// Later writes of the request to that peer fail with `ABORTED`.
    pub fn abort_request(&self, ip: &str, port: u16, request: &RequestId, reason: &str) -> Result<()> {
        let result = self.prefill("aborting a request").and_then(|p| p.abort(self, ip, port, request, reason));
        let about = About { peer: Some((ip, port)), request: Some(request), ..About::default() };
        self.logged(about, || format!("abort of request {request:?} at {ip}:{port}"), result)
    }

    /// Ends the connection to the decode at `ip:port`, after the write in flight; a later `connect` makes a new
    /// one. `NOT_CONNECTED` where there is none.
    pub fn disconnect(&self, ip: &str, port: u16) -> Result<()> {
        let result = self.prefill("ending a connection").and_then(|p| p.disconnect(ip, port));
        self.logged(About { peer: Some((ip, port)), ..About::default() }, || format!("end of the connection to {ip}:{port}"), result)
    }

    /// [`Communicator::disconnect`] on the peer's own thread, after the calls queued before it.
    pub fn disconnect_then(self: &Arc<Self>, ip: &str, port: u16, done: impl FnOnce(Result<()>) + Send + 'static) {
        let (comm, host) = (self.clone(), ip.to_string());
        self.on_peer_thread(ip, port, move || comm.disconnect(&host, port), done);
    }

    /// Prefill: where [`peer_events::PeerEvent`]s go from now on (`None`: nowhere), until the communicator closes.
    /// The sink runs on the thread that saw the change and must not block.
    pub fn on_peer_events(&self, sink: Option<peer_events::PeerEventSink>) -> Result<()> {
        self.prefill("telling peer events")?.on_peer_events(sink);
        Ok(())
    }

    /// Decode: the prefill links whose request channel is open, each as `(name, transport)`.
    pub fn peers(&self) -> Result<Vec<(String, TransportKind)>> {
        Ok(self.decode("listing prefill links")?.peers())
    }

    /// [`Communicator::abort_request`] on the peer's own thread, after the calls queued before it.
    pub fn abort_request_then(
        self: &Arc<Self>,
        ip: &str,
        port: u16,
        request: RequestId,
        reason: String,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let (comm, host) = (self.clone(), ip.to_string());
        self.on_peer_thread(ip, port, move || comm.abort_request(&host, port, &request, &reason), done);
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
        self.write_request(ip, port, local, remote, layer, None)
    }

    /// [`Communicator::write_cache`] as part of `request`: once the bytes are in the decode's memory, the
    /// decode gets a notification (in the order of this peer's writes) and its [`Communicator::wait_for`] sees
    /// the layer. Fails with `REVOKED` (moving nothing) once the decode has revoked the request, and with
    /// `ABORTED` once this side aborted it.
    pub fn write_request(&self, ip: &str, port: u16, local: &[u32], remote: &[u32], layer: u32, request: Option<&RequestId>) -> Result<()> {
        let result = self.prefill("writing").and_then(|p| p.write(self, ip, port, local, remote, layer, request));
        let about = About { peer: Some((ip, port)), request, layer: Some(layer) };
        self.logged(about, || format!("write to {ip}:{port} (layer {layer}, {} blocks)", local.len()), result)
    }

    /// Waits until the `layers` of `request` (every layer, for `None`) have arrived from every prefill rank that
    /// writes into this decode, at most `timeout`. Fails with the request's end if it fails (`TRANSPORT`), is
    /// aborted (`ABORTED`) or revoked (`REVOKED`) first; with `TIMEOUT` when the time runs out.
    pub fn wait_for(&self, request: &RequestId, layers: Option<Vec<u32>>, timeout: std::time::Duration) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let token = next_wait_token();
        self.wait_for_then(token, request, layers, move |r| {
            let _ = tx.send(r);
        });
        match rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(_) => {
                let why = Error::new(ErrorCode::Timeout, format!("request {request:?} did not arrive within {} ms", timeout.as_millis()));
                self.cancel_wait(token, why.clone());
                // It may have settled just now.
                rx.try_recv().unwrap_or(Err(why))
            }
        }
    }

    /// [`Communicator::wait_for`] without blocking: `done` runs (on the thread that completes it) with the
    /// outcome. `token` names the wait for [`Communicator::cancel_wait`].
    pub fn wait_for_then(&self, token: u64, request: &RequestId, layers: Option<Vec<u32>>, done: impl FnOnce(Result<()>) + Send + 'static) {
        match self.decode("waiting for a request") {
            Ok(d) => d.requests().wait(token, request, layers, Box::new(done)),
            Err(e) => done(Err(e)),
        }
    }

    /// Ends the wait `token` with `why`; `false` if it had settled already.
    pub fn cancel_wait(&self, token: u64, why: Error) -> bool {
        match &self.side {
            Side::Decode(d) => d.requests().cancel(token, why),
            Side::Prefill(_) => false,
        }
    }

    /// Hands the notifications that arrived since the last call (waiting for one if none has) to `take`. The
    /// first call starts collecting them; after `close`, `take` gets an empty batch.
    pub fn next_notifications_then(&self, take: impl FnOnce(Vec<Notification>) + Send + 'static) {
        match self.decode("notifications") {
            Ok(d) => d.requests().next_then(Box::new(take)),
            Err(_) => take(Vec::new()),
        }
    }

    /// Revokes `request`: returns once no write of it can land in this cache any more. Every prefill link
    /// confirms that it stopped and drained the request's writes, or is cut off within the timeout; from then
    /// on their writes of it fail with `REVOKED`. Waits for it fail with `REVOKED`.
    pub fn revoke(&self, request: &RequestId) -> Result<()> {
        let result = self.decode("revoking").and_then(|d| d.revoke(request));
        self.logged(About { request: Some(request), ..About::default() }, || format!("revoke of request {request:?}"), result)
    }

    /// [`Communicator::revoke`] on a thread of its own; `done` runs there with the outcome.
    pub fn revoke_then(self: &Arc<Self>, request: RequestId, done: impl FnOnce(Result<()>) + Send + 'static) {
        let comm = self.clone();
        let done = Arc::new(Mutex::new(Some(done)));
        let settle = done.clone();
        let spawned = std::thread::Builder::new().name("kvtransfer-revoke".into()).spawn(move || {
            let outcome = Error::catch_panic(|| comm.revoke(&request));
            if let Some(done) = lock(&settle).take() {
                done(outcome)
            }
        });
        if let Err(e) = spawned {
            if let Some(done) = lock(&done).take() {
                done(Err(Error::io("starting a thread to revoke", e)))
            }
        }
    }

    /// Closes every connection; a decode communicator stops listening and, once this returns, writes
    /// nothing more into its cache (except from the same-host links a `TIMEOUT` error names). Later calls of
    /// other methods fail with `CLOSED`; a second close waits for the first and returns its outcome.
    pub fn close(&self) -> Result<()> {
        let (outcome, ended) = &self.close_outcome;
        if self.closed.swap(true, Ordering::AcqRel) {
            let mut done = lock(&outcome);
            while done.is_none() {
                done = ended.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            return done.clone().expect("set before it was signalled");
        }
        let result = self.stop();
        *lock(&outcome) = Some(result.clone());
        ended.notify_all();
        result
    }

    fn stop(&self) -> Result<()> {
        let uncut = Error::catch_panic(|| {
            Ok(match &self.side {
                Side::Prefill(p) => {
                    p.close();
                    Vec::new()
                }
                Side::Decode(d) => d.close(),
            })
        });
        self.log.debug("closed");
        // Nothing is told to the binding's hook after close: it (and what it holds) is let go, however the
        // close ended; a later line goes to standard error or the log files.
        self.log.unhook();
        let uncut = uncut?;
        if uncut.is_empty() {
            self.cache.release_owners();
            return Ok(());
        }
        // A same-host link that lives on may still write into the cache: what owns its memory is never let go.
        self.cache.quarantine_owners();
        Err(Error::new(
            ErrorCode::Timeout,
            format!(
                "closed, but {} did not confirm within {} ms that it stopped writing, and a same-host link cannot be \
                 cut off while its process lives: do not reuse the cache's memory until that process ends",
                uncut.join(", "),
                self.config.timeouts.confirm.as_millis()
            ),
        ))
    }

    /// [`Communicator::close`] on a thread of its own; `done` gets its result (on this thread, where none can
    /// be started).
    pub fn close_then<F: FnOnce(Result<()>) + Send + 'static>(self: &Arc<Self>, done: F) {
        fn run<F: FnOnce(Result<()>)>(job: &Mutex<Option<(Arc<Communicator>, F)>>) {
            if let Some((comm, done)) = lock(&job).take() {
                done(Error::catch_panic(|| comm.close()));
            }
        }
        let job = Arc::new(Mutex::new(Some((self.clone(), done))));
        let theirs = job.clone();
        if std::thread::Builder::new().name("kvtransfer-close".into()).spawn(move || run(&theirs)).is_err() {
            run(&job);
        }
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

    fn decode(&self, op: &str) -> Result<&DecodeSide> {
        self.check_open()?;
        match &self.side {
            Side::Decode(d) => Ok(d),
            Side::Prefill(_) => Err(Error::invalid(format!("{op} is for decode communicators; this one is prefill"))),
        }
    }

    fn prefill(&self, op: &str) -> Result<&PrefillSide> {
        self.check_open()?;
        match &self.side {
            Side::Prefill(p) => Ok(p),
            Side::Decode(_) => Err(Error::invalid(format!("{op} is for prefill communicators; this one is decode"))),
        }
    }

    /// Logs a failure, with its fields; `what` names the operation and is only formatted when there is one to
    /// log. The caller gets the error; the debug log says it too (the caller decides what else to log).
    fn logged<T>(&self, about: About<'_>, what: impl FnOnce() -> String, result: Result<T>) -> Result<T> {
        if let (Err(e), true) = (&result, self.log.debug_enabled()) {
            let peer = about.peer.map(|(ip, port)| format!("{ip}:{port}"));
            let request = about.request.map(|r| r.to_string());
            let fields = Fields { peer: peer.as_deref(), request: request.as_deref(), layer: about.layer, code: Some(e.code()) };
            self.log.log(LogLevel::Debug, fields, format!("{} failed: {e}", what()));
        }
        result
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let _ = self.close();
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
