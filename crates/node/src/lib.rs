//! The Node.js binding of kvtransfer: argument conversion and completion of promises only. All behaviour lives
//! in the `kvtransfer` crate.
//!
//! - Errors cross with their code: a failed call throws an `Error` whose `code` is the [`ErrorCode`]'s name,
//!   and an asynchronous call resolves with a [`NativeFailure`] (or `null`), which the wrapper rejects with.
//! - A panic never unwinds into Node.js: every entry point runs under [`guarded`], which turns it into an
//!   `INTERNAL` error, and asynchronous calls run on the library's own threads, which do the same.
//! - This file is the one place where a JavaScript caller's promise about raw addresses (that they name memory
//!   which stays valid until `close()`) becomes the core's `unsafe` contract ([`NativeCommunicator::new`]).

mod allocations;

use kvtransfer::communicator::peer_events::{PeerEvent, PeerEventSink};
use kvtransfer::communicator::{Cancel, Notification, RequestId};
use kvtransfer::memory::{CacheLayout, CacheSpec, DeviceAllocation, HostAllocation};
use kvtransfer::metrics::{HistogramSnapshot, PeerStats, Stats};
use kvtransfer::config::{LogHook, LogRecord};
use kvtransfer::{Communicator, CommunicatorSpec, Config, Error, ErrorCode, Role, Setting, SettingValue};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi_derive::napi;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn to_napi(e: Error) -> napi::Error<ErrorCode> {
    napi::Error::new(e.code(), e.message().to_string())
}

/// Runs an entry point's body; a panic becomes an `INTERNAL` error instead of aborting the process. An entry
/// point's error carries its code: JavaScript sees the [`ErrorCode`]'s name as `err.code`.
fn guarded<T>(body: impl FnOnce() -> kvtransfer::Result<T>) -> Result<T, ErrorCode> {
    Error::catch_panic(body).map_err(to_napi)
}

fn invalid(message: String) -> Error {
    Error::invalid(message)
}

fn addresses(name: &str, list: &[BigInt]) -> kvtransfer::Result<Vec<u64>> {
    list.iter()
        .enumerate()
        .map(|(i, b)| match b.get_u64() {
            (false, v, true) => Ok(v),
            _ => Err(invalid(format!("{name}[{i}] is not an address (a non-negative 64-bit integer)"))),
        })
        .collect()
}

fn port(p: u32) -> kvtransfer::Result<u16> {
    u16::try_from(p).map_err(|_| invalid(format!("port {p} is outside [0, 65535]")))
}

/// The settings a communicator may be given, with the types JavaScript gives them.
#[napi(object)]
#[derive(Default)]
pub struct NativeSettings {
    pub gid_index: Option<f64>,
    pub rdma_nics: Option<Either<String, Vec<String>>>,
    pub ib_timeout: Option<f64>,
    pub relax_ordering: Option<bool>,
    pub socket_ifname: Option<String>,
    pub debug: Option<bool>,
    pub debug_file: Option<String>,
    pub error_file: Option<String>,
    pub gdrcopy_flush_enable: Option<bool>,
    pub transport: Option<String>,
    pub auth_token: Option<String>,
    pub timeout_ms: Option<f64>,
    pub connect_timeout_ms: Option<f64>,
    pub stall_timeout_ms: Option<f64>,
    pub confirm_timeout_ms: Option<f64>,
    pub max_peers: Option<f64>,
    pub tcp_connections: Option<f64>,
    pub request_ttl_ms: Option<f64>,
    pub instance_id: Option<String>,
    pub insecure: Option<bool>,
    pub answers_to: Option<Either<String, Vec<String>>>,
    pub reconnect_retries: Option<f64>,
    pub reconnect_backoff_ms: Option<f64>,
    pub log_format: Option<String>,
}

impl NativeSettings {
    fn into_overrides(self) -> Vec<(Setting, SettingValue)> {
        let number = |v: Option<f64>| v.map(SettingValue::Number);
        let flag = |v: Option<bool>| v.map(SettingValue::Flag);
        let text = |v: Option<String>| v.map(SettingValue::Text);
        let list = |v: Option<Either<String, Vec<String>>>| {
            v.map(|v| match v {
                Either::A(text) => SettingValue::Text(text),
                Either::B(list) => SettingValue::List(list),
            })
        };
        [
            (Setting::GidIndex, number(self.gid_index)),
            (Setting::RdmaNics, list(self.rdma_nics)),
            (Setting::IbTimeout, number(self.ib_timeout)),
            (Setting::RelaxOrdering, flag(self.relax_ordering)),
            (Setting::SocketIfname, text(self.socket_ifname)),
            (Setting::Debug, flag(self.debug)),
            (Setting::DebugFile, text(self.debug_file)),
            (Setting::ErrorFile, text(self.error_file)),
            (Setting::GdrcopyFlushEnable, flag(self.gdrcopy_flush_enable)),
            (Setting::Transport, text(self.transport)),
            (Setting::AuthToken, text(self.auth_token)),
            (Setting::TimeoutMs, number(self.timeout_ms)),
            (Setting::ConnectTimeoutMs, number(self.connect_timeout_ms)),
            (Setting::StallTimeoutMs, number(self.stall_timeout_ms)),
            (Setting::ConfirmTimeoutMs, number(self.confirm_timeout_ms)),
            (Setting::MaxPeers, number(self.max_peers)),
            (Setting::TcpConnections, number(self.tcp_connections)),
            (Setting::RequestTtlMs, number(self.request_ttl_ms)),
            (Setting::InstanceId, text(self.instance_id)),
            (Setting::Insecure, flag(self.insecure)),
            (Setting::AnswersTo, list(self.answers_to)),
            (Setting::ReconnectRetries, number(self.reconnect_retries)),
            (Setting::ReconnectBackoffMs, number(self.reconnect_backoff_ms)),
            (Setting::LogFormat, text(self.log_format)),
        ]
        .into_iter()
        .filter_map(|(setting, value)| value.map(|v| (setting, v)))
        .collect()
    }
}

/// Everything the constructor takes, already type-checked by the wrapper.
#[napi(object)]
pub struct NativeInit {
    pub role: String,
    pub gpu_idx: u32,
    pub port: u32,
    pub key_ptrs: Vec<BigInt>,
    pub value_ptrs: Vec<BigInt>,
    pub key_scale_ptrs: Vec<BigInt>,
    pub value_scale_ptrs: Vec<BigInt>,
    pub block_number: u32,
    pub block_bytes: i64,
    pub scale_block_bytes: i64,
    pub prefill_tp_size: u32,
    pub prefill_tp_idx: u32,
    pub settings: NativeSettings,
    /// The API is secure by default (`Communicator.decode`): see `Config::refuse_open_listen`.
    pub secure_default: Option<bool>,
}

/// Why an asynchronous call failed: what its promise resolves with instead of `null`.
#[napi(object)]
pub struct NativeFailure {
    /// The [`ErrorCode`]'s name (`"TIMEOUT"`, ...).
    pub code: String,
    pub message: String,
}

/// A promise that resolves with `null` on success and with a [`NativeFailure`] otherwise; `start` hands its
/// completion to the library's threads. It settles exactly once, even when `start` panics (with `INTERNAL`).
/// What completes an asynchronous call.
type Settle = Box<dyn FnOnce(kvtransfer::Result<()>) + Send>;

fn promise<'env>(env: &'env Env, start: impl FnOnce(Settle)) -> Result<Object<'env>, ErrorCode> {
    let (deferred, promise) = env.create_deferred().map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))?;
    let deferred = Arc::new(std::sync::Mutex::new(Some(deferred)));
    let settle = {
        let deferred = deferred.clone();
        move |outcome: kvtransfer::Result<()>| {
            if let Some(d) = deferred.lock().unwrap_or_else(|p| p.into_inner()).take() {
                d.resolve(move |_| Ok(outcome.err().map(|e| NativeFailure { code: e.code().as_str().into(), message: e.message().into() })))
            }
        }
    };
    let settle_on_panic = settle.clone();
    if let Err(e) = Error::catch_panic(|| {
        start(Box::new(settle));
        Ok(())
    }) {
        settle_on_panic(Err(e));
    }
    Ok(promise)
}

/// A promise that resolves with what `start`'s completion is handed (on any thread).
fn promise_of<'env, T: ToNapiValue + Send + 'static>(env: &'env Env, start: impl FnOnce(Box<dyn FnOnce(T) + Send>)) -> Result<Object<'env>, ErrorCode> {
    let (deferred, promise) = env.create_deferred().map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))?;
    start(Box::new(move |value: T| deferred.resolve(move |_| Ok(value))));
    Ok(promise)
}

/// A prefill link of a decode (`PeerSummary` in the wrapper).
#[napi(object)]
pub struct NativePeerSummary {
    /// `prefill tp i/n at ip`.
    pub name: String,
    pub transport: String,
}

/// A named count (a failure code, a refusal reason, a request's end).
#[napi(object)]
pub struct NativeCount {
    pub name: String,
    pub count: f64,
}

/// A latency histogram: power-of-two buckets, each with its exclusive upper bound and its samples (not
/// cumulative), up to the last with any.
#[napi(object)]
pub struct NativeHistogram {
    pub count: f64,
    pub sum_seconds: f64,
    pub bounds_seconds: Vec<f64>,
    pub counts: Vec<f64>,
}

impl From<&HistogramSnapshot> for NativeHistogram {
    fn from(h: &HistogramSnapshot) -> Self {
        NativeHistogram {
            count: h.count as f64,
            sum_seconds: h.sum.as_secs_f64(),
            bounds_seconds: h.buckets.iter().map(|(b, _)| b.as_secs_f64()).collect(),
            counts: h.buckets.iter().map(|(_, n)| *n as f64).collect(),
        }
    }
}

/// One peer's instruments (`PeerStats` in the wrapper).
#[napi(object)]
pub struct NativePeerStats {
    pub peer: String,
    pub transport: Option<String>,
    pub writes: f64,
    pub blocks: f64,
    pub bytes: f64,
    pub failures: Vec<NativeCount>,
    pub connects: f64,
    pub reconnects: f64,
    /// `started`, `done`, `failed`, `aborted`, `revoked`, `expired`.
    pub requests: Vec<NativeCount>,
    pub queued: f64,
    pub in_flight: f64,
    pub write_time: NativeHistogram,
    pub handshake_time: NativeHistogram,
    pub layer_time: NativeHistogram,
}

/// One transport's counters (`TransportStats` in the wrapper).
#[napi(object)]
pub struct NativeTransportStats {
    pub transport: String,
    pub writes: f64,
    pub blocks: f64,
    pub bytes: f64,
}

/// A communicator's instruments (`Stats` in the wrapper).
#[napi(object)]
pub struct NativeStats {
    pub role: String,
    pub peers: Vec<NativePeerStats>,
    pub transports: Vec<NativeTransportStats>,
    pub refusals: Vec<NativeCount>,
    pub revokes: f64,
    pub revoke_cutoffs: f64,
    pub requests_held: f64,
    pub notifications_dropped: f64,
}

fn count(name: &str, n: u64) -> NativeCount {
    NativeCount { name: name.into(), count: n as f64 }
}

impl From<Stats> for NativeStats {
    fn from(s: Stats) -> Self {
        let peer = |p: &PeerStats| {
            let r = p.requests;
            NativePeerStats {
                peer: p.peer.clone(),
                transport: p.transport.map(|t| t.as_str().into()),
                writes: p.writes as f64,
                blocks: p.blocks as f64,
                bytes: p.bytes as f64,
                failures: p.failures.iter().map(|(c, n)| count(c.as_str(), *n)).collect(),
                connects: p.connects as f64,
                reconnects: p.reconnects as f64,
                requests: [("started", r.started), ("done", r.done), ("failed", r.failed), ("aborted", r.aborted), ("revoked", r.revoked), ("expired", r.expired)]
                    .iter()
                    .map(|(name, n)| count(name, *n))
                    .collect(),
                queued: p.queued as f64,
                in_flight: p.in_flight as f64,
                write_time: (&p.write_time).into(),
                handshake_time: (&p.handshake_time).into(),
                layer_time: (&p.layer_time).into(),
            }
        };
        NativeStats {
            role: s.role.as_str().into(),
            peers: s.peers.iter().map(peer).collect(),
            transports: s
                .transports
                .iter()
                .map(|t| NativeTransportStats { transport: t.transport.as_str().into(), writes: t.writes as f64, blocks: t.blocks as f64, bytes: t.bytes as f64 })
                .collect(),
            refusals: s.refusals.iter().map(|(r, n)| count(r.as_str(), *n)).collect(),
            revokes: s.revokes as f64,
            revoke_cutoffs: s.revoke_cutoffs as f64,
            requests_held: s.requests_held as f64,
            notifications_dropped: s.notifications_dropped as f64,
        }
    }
}

/// A change in a prefill's connection to a decode peer (`PeerEvent` in the wrapper).
#[napi(object)]
pub struct NativePeerEvent {
    /// `'connected'`, `'disconnected'` or `'reconnecting'`.
    pub kind: String,
    /// `host:port`.
    pub peer: String,
    /// `'connected'`: the transport taken, and whether the connection was rebuilt.
    pub transport: Option<String>,
    pub reconnected: Option<bool>,
    /// `'reconnecting'`: this attempt, of how many.
    pub attempt: Option<u32>,
    pub attempts: Option<u32>,
    /// `'disconnected'`, `'reconnecting'`: why.
    pub cause: Option<NativeFailure>,
}

impl From<&PeerEvent> for NativePeerEvent {
    fn from(e: &PeerEvent) -> Self {
        let failure = |e: &Error| Some(NativeFailure { code: e.code().as_str().into(), message: e.message().into() });
        let event = |kind: &str, peer: &str| NativePeerEvent {
            kind: kind.into(),
            peer: peer.into(),
            transport: None,
            reconnected: None,
            attempt: None,
            attempts: None,
            cause: None,
        };
        match e {
            PeerEvent::Connected { peer, transport, reconnected } => {
                NativePeerEvent { transport: Some(transport.as_str().into()), reconnected: Some(*reconnected), ..event("connected", peer) }
            }
            PeerEvent::Disconnected { peer, cause } => NativePeerEvent { cause: failure(cause), ..event("disconnected", peer) },
            PeerEvent::Reconnecting { peer, attempt, attempts, cause } => NativePeerEvent {
                attempt: Some(*attempt),
                attempts: Some(*attempts),
                cause: failure(cause),
                ..event("reconnecting", peer)
            },
        }
    }
}

/// One event of a request, as the decode engine sees it (`Notification` in the wrapper).
#[napi(object)]
pub struct NativeNotification {
    pub request_id: String,
    /// The layer written (`'done'` only).
    pub layer_idx: Option<u32>,
    /// This decode's blocks the write filled (`'done'` only).
    pub block_ids: Vec<u32>,
    pub peer: String,
    /// `'done'`, `'failed'` or `'aborted'`.
    pub status: String,
    pub reason: Option<String>,
}

impl From<Notification> for NativeNotification {
    fn from(n: Notification) -> Self {
        NativeNotification {
            request_id: n.request_id,
            layer_idx: n.layer,
            block_ids: n.block_ids,
            peer: n.peer,
            status: n.status.as_str().to_string(),
            reason: n.reason,
        }
    }
}

fn request_id_of(id: String) -> kvtransfer::Result<RequestId> {
    RequestId::new(id)
}

fn code_named(name: &str) -> ErrorCode {
    ErrorCode::ALL.into_iter().find(|c| c.as_str() == name).unwrap_or(ErrorCode::Internal)
}

/// The native communicator behind the wrapper's classes.
#[napi]
pub struct NativeCommunicator {
    inner: Arc<Communicator>,
    /// Cancellation flags of asynchronous writes, by the wrapper's ticket, until they settle.
    tickets: Arc<Mutex<HashMap<u32, Arc<Cancel>>>>,
}

/// What a communicator is made of, checked on the calling thread (where the caller's arrays and memory are):
/// its spec, cache included, and its configuration.
fn made_of(init: NativeInit) -> kvtransfer::Result<(CommunicatorSpec, Config)> {
    let role: Role = init.role.parse()?;
    let config = Config { refuse_open_listen: init.secure_default.unwrap_or(false), ..Config::load(&init.settings.into_overrides())? };
    let non_negative = |name: &str, v: i64| u64::try_from(v).map_err(|_| invalid(format!("{name} must not be negative")));
    let spec = CacheSpec {
        key: addresses("keyPtrs", &init.key_ptrs)?,
        value: addresses("valuePtrs", &init.value_ptrs)?,
        key_scale: addresses("keyScalePtrs", &init.key_scale_ptrs)?,
        value_scale: addresses("valueScalePtrs", &init.value_scale_ptrs)?,
        block_number: init.block_number,
        block_bytes: non_negative("blockBytes", init.block_bytes)?,
        scale_block_bytes: non_negative("scaleBlockBytes", init.scale_block_bytes)?,
    };
    // SAFETY: the JavaScript caller's promise, stated in the wrapper's documentation: every address names
    // memory of this process that holds `blockNumber` blocks per tensor and stays valid (and, for a
    // decode, writable by the transports) until the communicator is closed.
    let cache = unsafe { CacheLayout::new(spec) }?;
    // Memory of a HostBuffer or DeviceBuffer stays allocated while the communicator may use it, however it was given.
    allocations::hold_for(&cache)?;
    let spec = CommunicatorSpec { role, gpu_idx: init.gpu_idx, port: port(init.port)?, cache, tp_size: init.prefill_tp_size, tp_idx: init.prefill_tp_idx };
    Ok((spec, config))
}

/// One log line (`LogRecord` in the wrapper).
#[napi(object)]
pub struct NativeLogRecord {
    /// `'error'`, `'warn'` or `'debug'`.
    pub level: String,
    pub message: String,
    /// Milliseconds since the epoch, when it was logged.
    pub time: f64,
    /// Each field of the line (`comm`, `pid`, and where they apply `peer`, `request`, `layer`, `code`) as text.
    pub fields: HashMap<String, String>,
}

/// Lines queued for the event loop at most; past that (an event loop stalled under a flood of lines) a line is
/// dropped rather than memory growing.
const LOG_QUEUE: usize = 4096;

/// Routes a communicator's log lines to `listener` (queued for the event loop: the thread that logs never
/// waits for JavaScript). The listener does not keep the process alive; the communicator lets go of it at close.
fn log_hook(listener: Function<NativeLogRecord, ()>) -> kvtransfer::Result<LogHook> {
    let tsfn = listener
        .build_threadsafe_function()
        .callee_handled::<false>()
        .weak::<true>()
        .max_queue_size::<LOG_QUEUE>()
        .build()
        .map_err(|e| Error::new(ErrorCode::Internal, e.reason))?;
    Ok(LogHook(Arc::new(move |r: &LogRecord| {
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let fields = r.fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let record = NativeLogRecord { level: r.level.as_str().into(), message: r.message.clone(), time, fields };
        tsfn.call(record, ThreadsafeFunctionCallMode::NonBlocking);
    })))
}

/// What a communicator is made of, with its log lines routed to `on_log` where one is given.
fn hooked(init: NativeInit, on_log: Option<Function<NativeLogRecord, ()>>) -> kvtransfer::Result<(CommunicatorSpec, Config)> {
    let (spec, mut config) = made_of(init)?;
    config.log_hook = on_log.map(log_hook).transpose()?;
    Ok((spec, config))
}

fn made((spec, config): (CommunicatorSpec, Config)) -> kvtransfer::Result<NativeCommunicator> {
    Ok(NativeCommunicator { inner: Arc::new(Communicator::new(spec, config)?), tickets: Arc::default() })
}

/// A communicator made on a thread of its own (registering memory with an RDMA NIC or a GPU driver can take
/// seconds): resolves with it, or with why it could not be made. The cache and settings are checked here first.
#[napi(
    ts_args_type = "init: NativeInit, onLog?: ((record: NativeLogRecord) => void) | null",
    ts_return_type = "Promise<NativeCommunicator | NativeFailure>"
)]
pub fn open_communicator<'env>(env: &'env Env, init: NativeInit, on_log: Option<Function<NativeLogRecord, ()>>) -> Result<Object<'env>, ErrorCode> {
    let parts = guarded(|| hooked(init, on_log))?;
    let (deferred, promise) = env.create_deferred().map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))?;
    let deferred = Arc::new(Mutex::new(Some(deferred)));
    let settle = move |outcome: kvtransfer::Result<NativeCommunicator>| {
        if let Some(d) = deferred.lock().unwrap_or_else(|p| p.into_inner()).take() {
            d.resolve(move |_| {
                Ok(match outcome {
                    Ok(communicator) => Either::A(communicator),
                    Err(e) => Either::B(NativeFailure { code: e.code().as_str().into(), message: e.message().into() }),
                })
            })
        }
    };
    let on_thread = settle.clone();
    let spawned = std::thread::Builder::new().name("kvtransfer-open".into()).spawn(move || on_thread(Error::catch_panic(|| made(parts))));
    if let Err(e) = spawned {
        settle(Err(Error::io("starting a thread to open the communicator", e)));
    }
    Ok(promise)
}

#[napi]
impl NativeCommunicator {
    #[napi(constructor, ts_args_type = "init: NativeInit, onLog?: ((record: NativeLogRecord) => void) | null")]
    pub fn new(init: NativeInit, on_log: Option<Function<NativeLogRecord, ()>>) -> Result<Self, ErrorCode> {
        guarded(|| made(hooked(init, on_log)?))
    }

    /// The control port a decode communicator listens on (0 for prefill).
    #[napi(getter)]
    pub fn port(&self) -> Result<u32, ErrorCode> {
        guarded(|| Ok(self.inner.port() as u32))
    }

    /// The preferred transport (`"cuda-ipc"`, `"shm"`, `"rdma"` or `"tcp"`).
    #[napi(getter)]
    pub fn transport(&self) -> Result<&'static str, ErrorCode> {
        guarded(|| Ok(self.inner.transport().as_str()))
    }

    /// The RDMA device in use, if any.
    #[napi(getter)]
    pub fn rdma_device(&self) -> Result<Option<String>, ErrorCode> {
        guarded(|| Ok(self.inner.rdma_device().map(str::to_string)))
    }

    #[napi]
    pub fn connect(&self, ip: String, port: u32, dst_tp_size: u32) -> Result<(), ErrorCode> {
        guarded(|| self.inner.connect(&ip, self::port(port)?, dst_tp_size))
    }

    /// Connects on the peer's own thread; `ticket` (non-zero) names the call for
    /// [`NativeCommunicator::cancel_call`].
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn connect_async<'env>(&self, env: &'env Env, ip: String, port: u32, dst_tp_size: u32, ticket: Option<u32>) -> Result<Object<'env>, ErrorCode> {
        let port = guarded(|| self::port(port))?;
        promise(env, |done| {
            let (cancel, done) = self.ticketed(ticket, done);
            self.inner.connect_then(&ip, port, dst_tp_size, cancel, done)
        })
    }

    /// The cancellation flag of the call `ticket` (non-zero), registered until the call settles, and the
    /// call's completion, which forgets it first.
    fn ticketed(&self, ticket: Option<u32>, done: Settle) -> (Option<Arc<Cancel>>, Settle) {
        let Some(t) = ticket.filter(|&t| t != 0) else { return (None, done) };
        let flag = Arc::new(Cancel::default());
        self.tickets.lock().unwrap_or_else(|p| p.into_inner()).insert(t, flag.clone());
        let tickets = self.tickets.clone();
        let settle = move |outcome| {
            tickets.lock().unwrap_or_else(|p| p.into_inner()).remove(&t);
            done(outcome)
        };
        (Some(flag), Box::new(settle))
    }

    /// Whether a working connection exists; never waits for a transfer.
    #[napi]
    pub fn is_connected(&self, ip: String, port: u32) -> Result<bool, ErrorCode> {
        guarded(|| Ok(u16::try_from(port).is_ok_and(|p| self.inner.is_connected(&ip, p))))
    }

    /// The transport of the connection to `ip:port`, if there is one.
    #[napi]
    pub fn connected_transport(&self, ip: String, port: u32) -> Result<Option<&'static str>, ErrorCode> {
        guarded(|| Ok(u16::try_from(port).ok().and_then(|p| self.inner.connected_transport(&ip, p)).map(|k| k.as_str())))
    }

    #[napi]
    pub fn write_cache(&self, ip: String, port: u32, local: Uint32Array, remote: Uint32Array, layer: u32) -> Result<(), ErrorCode> {
        guarded(|| self.inner.write_cache(&ip, self::port(port)?, &local, &remote, layer))
    }

    /// Writes on the peer's own thread; calls to one peer run in the order they were made. With a request id
    /// the decode is notified once the bytes are there. `ticket` (non-zero) names the call for
    /// [`NativeCommunicator::cancel_write`].
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    #[allow(clippy::too_many_arguments)]
    pub fn write_cache_async<'env>(
        &self,
        env: &'env Env,
        ip: String,
        port: u32,
        local: Uint32Array,
        remote: Uint32Array,
        layer: u32,
        request_id: Option<String>,
        ticket: Option<u32>,
    ) -> Result<Object<'env>, ErrorCode> {
        let (port, request) = guarded(|| Ok((self::port(port)?, request_id.map(request_id_of).transpose()?)))?;
        let (local, remote) = (local.to_vec(), remote.to_vec());
        promise(env, |done| {
            let (cancel, done) = self.ticketed(ticket, done);
            self.inner.write_cache_then(&ip, port, local, remote, layer, request, cancel, done)
        })
    }

    /// Cancels the asynchronous write or connect `ticket` if it has not started: it then does nothing (and its
    /// promise later resolves with `ABORTED`). Returns whether it was cancelled: `false` once it has started.
    #[napi]
    pub fn cancel_call(&self, ticket: u32) -> Result<bool, ErrorCode> {
        guarded(|| {
            let flag = self.tickets.lock().unwrap_or_else(|p| p.into_inner()).get(&ticket).cloned();
            Ok(flag.is_some_and(|f| f.cancel()))
        })
    }

    /// Tells the decode at `ip:port` that the request will not complete, after the calls queued before.
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn abort_request_async<'env>(&self, env: &'env Env, ip: String, port: u32, request_id: String, reason: String) -> Result<Object<'env>, ErrorCode> {
        let (port, request) = guarded(|| Ok((self::port(port)?, request_id_of(request_id)?)))?;
        promise(env, |done| self.inner.abort_request_then(&ip, port, request, reason, done))
    }

    /// Ends the connection to `ip:port` after the calls queued before.
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn disconnect_async<'env>(&self, env: &'env Env, ip: String, port: u32) -> Result<Object<'env>, ErrorCode> {
        let port = guarded(|| self::port(port))?;
        promise(env, |done| self.inner.disconnect_then(&ip, port, done))
    }

    /// Prefill: calls `listener` with each change in a peer's connection from now on (`null`: stops). The
    /// listener does not keep the process alive.
    #[napi(ts_args_type = "listener: ((event: NativePeerEvent) => void) | null")]
    pub fn on_peer_events(&self, listener: Option<Function<NativePeerEvent, ()>>) -> Result<(), ErrorCode> {
        let sink: Option<PeerEventSink> = match listener {
            None => None,
            Some(listener) => {
                let tsfn = listener
                    .build_threadsafe_function()
                    .callee_handled::<false>()
                    .weak::<true>()
                    .build()
                    .map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))?;
                Some(Arc::new(move |event: &PeerEvent| {
                    // Queued for the event loop; never blocks the thread that saw the change.
                    tsfn.call(NativePeerEvent::from(event), ThreadsafeFunctionCallMode::NonBlocking);
                }))
            }
        };
        guarded(|| self.inner.on_peer_events(sink))
    }

    /// What the communicator has counted; readable after close.
    #[napi]
    pub fn stats(&self) -> Result<NativeStats, ErrorCode> {
        guarded(|| Ok(self.inner.stats().into()))
    }

    /// Decode: the prefill links whose request channel is open.
    #[napi]
    pub fn peers(&self) -> Result<Vec<NativePeerSummary>, ErrorCode> {
        guarded(|| Ok(self.inner.peers()?.into_iter().map(|(name, transport)| NativePeerSummary { name, transport: transport.as_str().into() }).collect()))
    }

    /// Resolves once the listed layers (every layer, for `null`) of the request have arrived; `token` names the
    /// wait for [`NativeCommunicator::cancel_wait`].
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn wait_for<'env>(&self, env: &'env Env, token: u32, request_id: String, layers: Option<Vec<u32>>) -> Result<Object<'env>, ErrorCode> {
        let request = guarded(|| request_id_of(request_id))?;
        promise(env, |done| self.inner.wait_for_then(token as u64, &request, layers, done))
    }

    /// Ends the wait `token` with an error of code `code` (`TIMEOUT`, `ABORTED`); `false` if it had settled.
    #[napi]
    pub fn cancel_wait(&self, token: u32, code: String, message: String) -> Result<bool, ErrorCode> {
        guarded(|| Ok(self.inner.cancel_wait(token as u64, Error::new(code_named(&code), message))))
    }

    /// The notifications that arrived since the last call, once there is at least one (an empty list once the
    /// communicator is closed).
    #[napi(ts_return_type = "Promise<NativeNotification[]>")]
    pub fn next_notifications<'env>(&self, env: &'env Env) -> Result<Object<'env>, ErrorCode> {
        promise_of(env, |done: Box<dyn FnOnce(Vec<NativeNotification>) + Send>| {
            self.inner.next_notifications_then(move |batch| done(batch.into_iter().map(NativeNotification::from).collect()))
        })
    }

    /// Revokes the request: resolves once no write of it can land any more.
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn revoke_async<'env>(&self, env: &'env Env, request_id: String) -> Result<Object<'env>, ErrorCode> {
        let request = guarded(|| request_id_of(request_id))?;
        promise(env, |done| self.inner.revoke_then(request, done))
    }

    /// Records a refusal made by the wrapper in the error log.
    #[napi]
    pub fn log_error(&self, message: String) -> Result<(), ErrorCode> {
        guarded(|| Ok(self.inner.log_error(&message)))
    }

    /// Closes on the calling thread (the seed API's `close`).
    #[napi]
    pub fn close(&self) -> Result<(), ErrorCode> {
        guarded(|| self.inner.close())
    }

    /// Closes on a thread of its own: resolves once every link has stopped (or failed to, which it says).
    #[napi(ts_return_type = "Promise<NativeFailure | null>")]
    pub fn close_async<'env>(&self, env: &'env Env) -> Result<Object<'env>, ErrorCode> {
        promise(env, |done| self.inner.close_then(done))
    }
}

/// A ceiling's warm-up: `calls` untimed calls at least, going on (where there are any) for `ms`.
fn warm_up(calls: u32, ms: u32) -> kvtransfer::ceilings::Warmup {
    kvtransfer::ceilings::Warmup { calls: calls as usize, at_least: std::time::Duration::from_millis(ms as u64) }
}

/// `kvtransfer bench`'s ceiling: one TCP stream over loopback moving `bytes` per call in writes of `chunk`;
/// seconds per timed call.
#[napi]
pub fn ceiling_tcp_stream(bytes: f64, chunk: u32, warmup: u32, warmup_ms: u32, calls: u32) -> Result<Vec<f64>, ErrorCode> {
    guarded(|| {
        let bytes = whole_bytes("bytes", bytes)?;
        let times = kvtransfer::ceilings::tcp_stream(bytes, chunk as usize, warm_up(warmup, warmup_ms), calls as usize)?;
        Ok(times.iter().map(|t| t.as_secs_f64()).collect())
    })
}

/// `kvtransfer bench`'s ceiling: `memcpy` of the scattered blocks `local[i]` → `remote[i]` of `tensors` tensors
/// and `layers` layers in turn, on up to `threads` threads. Blocks the event loop while it runs (the bench's own
/// writes do too).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn ceiling_scattered_copy(
    block_bytes: u32,
    local: Vec<u32>,
    remote: Vec<u32>,
    tensors: u32,
    layers: u32,
    threads: u32,
    warmup: u32,
    warmup_ms: u32,
    calls: u32,
) -> Result<NativeCopyTimes, ErrorCode> {
    guarded(|| {
        let (threads, times) = kvtransfer::ceilings::scattered_copy(
            block_bytes as usize,
            &local,
            &remote,
            tensors as usize,
            layers as usize,
            threads as usize,
            warm_up(warmup, warmup_ms),
            calls as usize,
        )?;
        Ok(NativeCopyTimes { threads: threads as u32, seconds: times.iter().map(|t| t.as_secs_f64()).collect() })
    })
}

/// The threads a ceiling's copy used, and the seconds of each timed call.
#[napi(object)]
pub struct NativeCopyTimes {
    pub threads: u32,
    pub seconds: Vec<f64>,
}

/// The threads the shared-memory transport splits one large write over, here.
#[napi]
pub fn copy_threads() -> u32 {
    kvtransfer::ceilings::copy_threads() as u32
}

/// What this process holds through kvtransfer, all communicators together (`Resources` in the wrapper).
#[napi(object)]
pub struct NativeResources {
    pub rdma_queue_pairs: u32,
    pub rdma_memory_regions: u32,
    pub tcp_data_connections: u32,
    pub shm_rings: u32,
}

/// This process's live queue pairs, registered regions, data connections and shared rings (`resources()` in the wrapper).
#[napi]
pub fn resources() -> NativeResources {
    let r = &kvtransfer::metrics::RESOURCES;
    let n = |g: &kvtransfer::metrics::Gauge| g.get().min(u32::MAX as u64) as u32;
    NativeResources {
        rdma_queue_pairs: n(&r.rdma_queue_pairs),
        rdma_memory_regions: n(&r.rdma_memory_regions),
        tcp_data_connections: n(&r.tcp_data_connections),
        shm_rings: n(&r.shm_rings),
    }
}

fn whole_bytes(name: &str, v: f64) -> kvtransfer::Result<usize> {
    if v.fract() != 0.0 || !(0.0..=(1u64 << 40) as f64).contains(&v) {
        return Err(invalid(format!("{name} must be a whole number of bytes up to 1 TiB")));
    }
    Ok(v as usize)
}

/// Page-aligned, zero-filled host memory as a `Buffer`; the memory is released when the buffer is
/// collected or detached (see [`host_free`]).
#[napi]
pub fn host_alloc(env: &Env, bytes: i64) -> Result<BufferSlice<'_>, ErrorCode> {
    let len = guarded(|| usize::try_from(bytes).ok().filter(|&n| n > 0).ok_or_else(|| invalid(format!("cannot allocate {bytes} bytes"))))?;
    let mut memory = guarded(|| HostAllocation::new(len))?;
    let data = memory.as_mut_slice().as_mut_ptr();
    let memory = Arc::new(memory);
    allocations::register(memory.addr(), memory.len(), "HostBuffer", &memory);
    // SAFETY: `data` is `len` bytes owned by `memory` (a mapping that never moves), a reference to which moves
    // into the finaliser: it lives at least as long as the buffer's backing store (longer while a communicator
    // holds it too).
    unsafe { BufferSlice::from_external(env, data, len, memory, |_, memory| drop(memory)) }
        .map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))
}

/// The address of a buffer's first byte.
#[napi]
pub fn buffer_address(buffer: BufferSlice) -> Result<BigInt, ErrorCode> {
    guarded(|| Ok(BigInt::from(buffer.as_ptr() as u64)))
}

/// Detaches a buffer's memory from JavaScript: the buffer reads as empty afterwards and its memory goes
/// back to the system as soon as the engine lets go of it. `IN_USE` while an open communicator uses it.
#[napi]
pub fn host_free(env: &Env, buffer: Unknown) -> Result<(), ErrorCode> {
    let mut arraybuffer = std::ptr::null_mut();
    let mut data = std::ptr::null_mut();
    // SAFETY: `buffer` is a live value of this env; napi checks it is a typed array and fails otherwise; it
    // writes the data pointer and the array buffer into locals of this frame.
    let status = unsafe {
        napi::sys::napi_get_typedarray_info(
            env.raw(),
            buffer.raw(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut data,
            &mut arraybuffer,
            std::ptr::null_mut(),
        )
    };
    if status != napi::sys::Status::napi_ok {
        return Err(to_napi(invalid("free() expects the Buffer of a HostBuffer".into())));
    }
    guarded(|| allocations::check_free(data as u64))?;
    // SAFETY: `arraybuffer` was just returned by napi for this env.
    let status = unsafe { napi::sys::napi_detach_arraybuffer(env.raw(), arraybuffer) };
    if status != napi::sys::Status::napi_ok {
        return Err(to_napi(invalid("this buffer's memory cannot be detached".into())));
    }
    Ok(())
}

/// Zeroed memory of one GPU (`DeviceBuffer` in the wrapper): its bytes go in and out by copies. Freed by
/// [`NativeDeviceBuffer::free`] or when collected (the engine does not know its size: call `free()`), but never
/// while a communicator holds it.
#[napi]
pub struct NativeDeviceBuffer {
    memory: Option<Arc<DeviceAllocation>>,
}

#[napi]
impl NativeDeviceBuffer {
    /// `bytes` (at least 1) on GPU `gpu`: `UNAVAILABLE` without a CUDA driver, that GPU or the memory.
    #[napi(constructor)]
    pub fn new(gpu: u32, bytes: f64) -> Result<NativeDeviceBuffer, ErrorCode> {
        guarded(|| {
            let len = whole_bytes("bytes", bytes)?;
            let memory = Arc::new(DeviceAllocation::new(gpu, len)?);
            allocations::register(memory.addr(), memory.len(), "DeviceBuffer", &memory);
            Ok(NativeDeviceBuffer { memory: Some(memory) })
        })
    }

    fn memory(&self) -> kvtransfer::Result<&Arc<DeviceAllocation>> {
        self.memory.as_ref().ok_or_else(|| invalid("this DeviceBuffer was freed".into()))
    }

    /// The device address of its first byte.
    #[napi(getter)]
    pub fn ptr(&self) -> Result<BigInt, ErrorCode> {
        guarded(|| Ok(BigInt::from(self.memory()?.addr())))
    }

    /// Copies `data` in from byte `offset`.
    #[napi]
    pub fn write(&self, offset: f64, data: Uint8Array) -> Result<(), ErrorCode> {
        guarded(|| self.memory()?.write(whole_bytes("offset", offset)?, &data))
    }

    /// A copy of `length` bytes from byte `offset`.
    #[napi]
    pub fn read(&self, offset: f64, length: f64) -> Result<Buffer, ErrorCode> {
        guarded(|| Ok(self.memory()?.read(whole_bytes("offset", offset)?, whole_bytes("length", length)?)?.into()))
    }

    /// Gives the memory back; `IN_USE` while an open communicator uses it. Twice is harmless.
    #[napi]
    pub fn free(&mut self) -> Result<(), ErrorCode> {
        guarded(|| {
            if let Some(memory) = &self.memory {
                allocations::check_free(memory.addr())?;
            }
            self.memory = None;
            Ok(())
        })
    }
}

/// `kvtransfer bench`'s ceiling for CUDA IPC: one device copy of `bytes` from GPU `from` to GPU `to`; seconds
/// per timed call.
#[napi]
pub fn ceiling_device_copy(from: u32, to: u32, bytes: f64, warmup: u32, warmup_ms: u32, calls: u32) -> Result<Vec<f64>, ErrorCode> {
    guarded(|| {
        let bytes = whole_bytes("bytes", bytes)?;
        let times = kvtransfer::ceilings::device_copy(from, to, bytes, warm_up(warmup, warmup_ms), calls as usize)?;
        Ok(times.iter().map(|t| t.as_secs_f64()).collect())
    })
}

/// The RDMA devices this machine has, with their ports and GIDs (`RdmaDevice[]` in the wrapper). Fails with
/// `UNAVAILABLE`, saying why, where there is none.
#[napi(ts_return_type = "unknown")]
pub fn rdma_devices(env: &Env) -> Result<Unknown<'_>, ErrorCode> {
    let devices = guarded(kvtransfer::rdma_devices)?;
    env.to_js_value(&devices).map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))
}

/// What this machine offers kvtransfer (`kvtransfer info`, `SystemInfo` in the wrapper): the settings in force
/// with bad values flagged, each transport and why it cannot be used, the RDMA devices and the GPUs.
#[napi(ts_return_type = "unknown")]
pub fn system_report(env: &Env) -> Result<Unknown<'_>, ErrorCode> {
    let report = guarded(|| Ok(kvtransfer::system::SystemReport::gather()))?;
    env.to_js_value(&report).map_err(|e| to_napi(Error::new(ErrorCode::Internal, e.reason)))
}

/// Panics inside a native call, on the calling thread (`"sync"`) or on a peer's thread (`"async"`): how the
/// tests prove that a panic becomes an `INTERNAL` error and never takes the process down. Not part of the API.
#[napi(js_name = "__panicForTests", ts_return_type = "Promise<NativeFailure | null> | void")]
pub fn panic_for_tests<'env>(env: &'env Env, on: String) -> Result<Option<Object<'env>>, ErrorCode> {
    if on == "async" {
        // As the library's peer threads do: the call runs under `catch_panic`, its completion resolves the promise.
        return promise(env, |done| {
            std::thread::spawn(move || done(Error::catch_panic(|| panic!("a deliberate panic on another thread"))));
        })
        .map(Some);
    }
    guarded(|| -> kvtransfer::Result<Option<Object<'env>>> { panic!("a deliberate panic on the calling thread") })
}
