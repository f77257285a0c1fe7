//! The RDMA transport: one-sided `RDMA_WRITE`s over a reliable-connected queue pair per peer.
//!
//! Both sides register their cache ([`registration`]) when the communicator is created. At connect the
//! prefill side creates a queue pair and sends its address in the handshake; the decode side creates its
//! own, connects it, and answers with its address and the keys of its cache regions; the prefill side
//! connects its queue pair and from then on writes blocks straight into the decode's memory ([`post`]),
//! without the decode's CPU.
//!
//! Folders show the layers: [`device`] → [`registration`] → [`queue_pair`] → [`post`].

pub mod device;
pub mod post;
pub mod queue_pair;
pub mod registration;

use self::device::Device;
use self::post::{layer_keys, WriteChain};
use self::queue_pair::{PathOptions, QpEndpoint, QueuePair};
use self::registration::{check_remote, Access, CacheRegions, MemoryRegion, ProtectionDomain, RegistrationPath, RemoteRegion};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::{CacheLayout, HostAllocation};
use crate::plan::{BlockPlan, SliceGeometry};
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, MarkSink, PendingLink, Transport};
use crate::wire::TransportKind;
use rdma_mummy_sys as ibv;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

pub use self::device::{devices, DeviceInfo, GidInfo, PortInfo};

/// Send queue depth asked for (capped by the device): lists of half of it are posted at a time.
const SEND_QUEUE_DEPTH: u32 = 8192;
/// A decode queue pair sends nothing of its own (the device answers reads and acknowledges writes).
const DECODE_SEND_DEPTH: u32 = 2;
/// Receive requests a decode queue pair keeps posted for marks ([`RdmaLink::write_marked`]); a prefill that
/// sends more before the decode reposts waits (receiver-not-ready retries), it does not fail.
const MARK_RECEIVES: u32 = 256;
/// How long a decode's mark thread sleeps at most before it looks whether its session was cut off.
const MARK_POLL: Duration = Duration::from_millis(100);
/// Transport retries before a write fails (the IB maximum).
const RETRY_COUNT: u8 = 7;
/// Bytes the flush read fetches.
const FLUSH_BYTES: u32 = 8;
/// What a decode's flush target holds (the flush read brings it back).
pub const FLUSH_WORD: [u8; FLUSH_BYTES as usize] = *b"kvtflush";

/// What the flush reads target: a word in the cache's own kind of memory (a host page, or memory of the
/// cache's GPU, so that reading it flushes the NIC's writes into that GPU). It is the only region of a
/// decode that a peer may read: the cache itself is registered for remote writes only.
enum FlushMemory {
    Host(HostAllocation),
    Device(crate::cuda::gpu::DeviceBuffer),
}

impl FlushMemory {
    fn new(cache: &CacheLayout) -> Result<FlushMemory> {
        match cache.location() {
            crate::cuda::MemoryKind::Device { ordinal } => {
                let gpu = crate::cuda::Gpu::get(ordinal)?;
                Ok(FlushMemory::Device(crate::cuda::gpu::DeviceBuffer::with_bytes(gpu, &FLUSH_WORD)?))
            }
            _ => {
                let mut page = HostAllocation::new(4096)?;
                page.as_mut_slice()[..FLUSH_WORD.len()].copy_from_slice(&FLUSH_WORD);
                Ok(FlushMemory::Host(page))
            }
        }
    }

    fn addr(&self) -> u64 {
        match self {
            FlushMemory::Host(page) => page.addr(),
            FlushMemory::Device(buffer) => buffer.addr(),
        }
    }
}

/// The registry entry.
pub struct Rdma;

impl Transport for Rdma {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn probe(&self, config: &Config) -> std::result::Result<String, String> {
        match Device::open(config.nic_for_gpu(0), config.gid_index) {
            Ok(device) => Ok(format!("GPU 0 uses {} (GID index {}); see the devices below", device.name(), config.gid_index)),
            Err(e) => Err(e.message().to_string()),
        }
    }

    fn acceptor(&self, env: &Environment<'_>) -> Result<Arc<dyn Acceptor>> {
        Ok(Arc::new(RdmaTarget::new(RdmaContext::open(env.cache.clone(), env.config, env.gpu_idx, true)?)))
    }

    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>> {
        Ok(Arc::new(RdmaConnector(RdmaContext::open(env.cache.clone(), env.config, env.gpu_idx, false)?)))
    }
}

/// What the decode side answers an RDMA offer with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaWelcome {
    pub endpoint: QpEndpoint,
    /// The cache's regions, `[tensor][layer]` (empty for tensors it lacks): writable, not readable.
    pub regions: Vec<Vec<RemoteRegion>>,
    /// What the flush reads target: a word in the cache's kind of memory, the only thing a peer may read.
    #[serde(default)]
    pub flush: Option<RemoteRegion>,
}

/// One communicator's RDMA resources: the device, the registered cache and the settings in force.
pub struct RdmaContext {
    cache: Arc<CacheLayout>,
    regions: CacheRegions,
    /// Target of the flush reads (only read into, never looked at).
    scratch: MemoryRegion,
    scratch_memory: HostAllocation,
    /// A decode's flush target (the region before its memory, so that it is released first).
    flush_target: Option<(MemoryRegion, FlushMemory)>,
    path: PathOptions,
    flush: bool,
    timeout: Duration,
}

impl RdmaContext {
    /// Opens the NIC for `gpu_idx` (`KVCACHE_RDMA_NICS[gpu_idx % n]`, or the first active device when the
    /// list is empty) and registers `cache`. A decode cache accepts remote writes and (for the flush)
    /// reads.
    pub fn open(cache: Arc<CacheLayout>, config: &Config, gpu_idx: u32, decode: bool) -> Result<Arc<RdmaContext>> {
        let nic = config.nic_for_gpu(gpu_idx);
        RdmaContext::open_on(cache, config, nic, decode).map_err(|e| {
            let nic = nic.unwrap_or("any, KVCACHE_RDMA_NICS is unset");
            Error::new(e.code(), format!("RDMA is not usable for GPU {gpu_idx} (NIC {nic}): {}", e.message()))
        })
    }

    fn open_on(cache: Arc<CacheLayout>, config: &Config, nic: Option<&str>, decode: bool) -> Result<Arc<RdmaContext>> {
        let device = Device::open(nic, config.gid_index)?;
        let pd = ProtectionDomain::new(device.clone())?;
        // Least privilege: peers may write the cache, never read it.
        let access = Access { remote_write: decode, remote_read: false, relaxed_ordering: config.relax_ordering };
        let regions = CacheRegions::register(&pd, &cache, access)?;
        let flush_target = match decode {
            false => None,
            true => {
                let memory = FlushMemory::new(&cache)?;
                // SAFETY: the flush memory is owned by the context, which drops its region first (tuple order).
                let region = unsafe {
                    MemoryRegion::register(&pd, memory.addr(), FLUSH_BYTES as u64, Access { remote_write: false, remote_read: true, relaxed_ordering: false })
                }?;
                Some((region, memory))
            }
        };
        let scratch_memory = HostAllocation::new(4096)?;
        // SAFETY: the scratch page is owned by the context, which drops its region first (field order).
        let scratch = unsafe { MemoryRegion::register(
            &pd,
            scratch_memory.addr(),
            scratch_memory.len() as u64,
            Access { remote_write: false, remote_read: false, relaxed_ordering: false },
        ) }?;
        Ok(Arc::new(RdmaContext {
            cache,
            regions,
            scratch,
            scratch_memory,
            flush_target,
            path: PathOptions { ack_timeout: config.ib_timeout, retry_count: RETRY_COUNT },
            flush: config.gdrcopy_flush,
            timeout: config.timeouts.stall,
        }))
    }

    /// The device in use.
    pub fn device(&self) -> &Device {
        self.regions.pd().device()
    }

    /// How the cache was registered.
    pub fn registration_path(&self) -> RegistrationPath {
        self.regions.path()
    }

    /// The bytes the most recent flush read of any link of this context brought back (zero before the
    /// first): the decode's [`FLUSH_WORD`], which shows that the read happened.
    pub fn last_flush_read(&self) -> [u8; FLUSH_BYTES as usize] {
        let mut out = [0u8; FLUSH_BYTES as usize];
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: the scratch page is ours and mapped for the context's life; the NIC may write it
            // concurrently (another link's flush), so each byte is read volatile, never through a reference.
            *b = unsafe { std::ptr::read_volatile(self.scratch_memory.as_ptr().add(i)) };
        }
        out
    }

    /// A decode's queue pair for a new peer: it receives marks.
    fn prepare_receiving(&self) -> Result<QueuePair> {
        QueuePair::receiving(self.regions.pd(), DECODE_SEND_DEPTH, MARK_RECEIVES)
    }

    /// A queue pair for a new peer, ready to be connected once the peer's address is known.
    pub fn prepare(self: &Arc<RdmaContext>) -> Result<PendingQueuePair> {
        let qp = QueuePair::new(self.regions.pd(), SEND_QUEUE_DEPTH)?;
        Ok(PendingQueuePair { qp, context: self.clone() })
    }
}

/// The prefill's half: a queue pair per connection, on the context's device.
struct RdmaConnector(Arc<RdmaContext>);

impl Connector for RdmaConnector {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn prepare(&self) -> Result<Box<dyn PendingLink>> {
        Ok(Box::new(self.0.prepare()?))
    }

    fn device(&self) -> Option<&str> {
        Some(self.0.device().name())
    }
}

/// A prefill queue pair waiting for the decode's answer.
pub struct PendingQueuePair {
    qp: QueuePair,
    context: Arc<RdmaContext>,
}

impl PendingLink for PendingQueuePair {
    fn offer(&self) -> serde_json::Value {
        transport::to_details(&self.endpoint())
    }

    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>> {
        let welcome: RdmaWelcome = transport::from_details(TransportKind::Rdma, answer.details)?;
        Ok(Box::new((*self).connect(answer.peer.to_string(), &welcome, answer.geometry, answer.remote_blocks)?))
    }
}

impl PendingQueuePair {
    /// Its address, for the handshake.
    pub fn endpoint(&self) -> QpEndpoint {
        self.qp.endpoint()
    }

    /// Connects to the decode's queue pair and checks its regions against the agreed geometry.
    pub fn connect(mut self, peer: String, welcome: &RdmaWelcome, geometry: SliceGeometry, remote_blocks: u32) -> Result<RdmaLink> {
        check_remote(&welcome.regions, &self.context.cache, geometry.ratio, remote_blocks)?;
        let flush = match (self.context.flush, welcome.flush) {
            (false, _) => None,
            (true, Some(target)) if target.len >= FLUSH_BYTES as u64 => Some(target),
            (true, _) => return Err(Error::protocol("the decode offers no flush target, and KVCACHE_GDRCOPY_FLUSH_ENABLE is set")),
        };
        self.qp.connect(&welcome.endpoint, self.context.path)?;
        Ok(RdmaLink {
            qp: self.qp,
            peer,
            flush,
            remote: welcome.regions.clone(),
            geometry,
            chain: WriteChain::default(),
            context: self.context,
        })
    }
}

/// The prefill end of an RDMA connection.
pub struct RdmaLink {
    /// Declared first: destroyed before the context's regions are released.
    qp: QueuePair,
    peer: String,
    /// The decode's flush target, when flushing.
    flush: Option<RemoteRegion>,
    remote: Vec<Vec<RemoteRegion>>,
    geometry: SliceGeometry,
    chain: WriteChain,
    context: Arc<RdmaContext>,
}

impl RdmaLink {
    fn post(&mut self, plan: &BlockPlan, mark: Option<u32>, meanwhile: &mut dyn FnMut()) -> Result<()> {
        let ctx = &*self.context;
        let cache = &*ctx.cache;
        let keys = layer_keys(cache, plan.layer(), |t, l| ctx.regions.lkey(t, l), &self.remote);
        let max_msg = ctx.device().max_msg_bytes().clamp(4096, 1 << 30);
        self.chain.build(plan, cache, &keys, self.geometry, max_msg);
        if let Some(target) = self.flush.filter(|_| !self.chain.is_empty()) {
            let scratch = ctx.scratch_memory.addr();
            self.chain.push_flush_read(scratch, ctx.scratch.lkey(), target.addr, target.rkey, FLUSH_BYTES);
        }
        if let Some(mark) = mark {
            self.chain.push_mark(mark);
        }
        post::execute(&mut self.qp, &mut self.chain, ctx.timeout, meanwhile)
            .map_err(|e| Error::new(e.code(), format!("writing layer {} to {}: {}", plan.layer(), self.peer, e.message())))
    }
}

impl Link for RdmaLink {
    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        self.post(plan, None, &mut || {})
    }

    /// The writes, the flush read where enabled, then the mark: a send the decode's queue pair receives only
    /// once everything before it is in the decode's memory. `meanwhile` runs once the first lists are posted.
    fn write_marked(&mut self, plan: &BlockPlan, mark: u32, meanwhile: &mut dyn FnMut()) -> Result<()> {
        self.post(plan, Some(mark), meanwhile)
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Rdma
    }
}

/// The decode side: its registered cache and one queue pair per connected prefill peer.
pub struct RdmaTarget {
    /// Declared first: queue pairs go before the regions they write into.
    sessions: Mutex<HashMap<u64, Session>>,
    marks: Arc<OnceLock<MarkSink>>,
    context: Arc<RdmaContext>,
}

/// A decode queue pair, owned by the thread that receives its marks. Dropping the session stops the thread,
/// which destroys the queue pair.
struct Session {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mark a completion carries, where it is a mark received.
fn mark_of(wc: &ibv::ibv_wc) -> Option<u32> {
    let received = wc.status == ibv::ibv_wc_status::IBV_WC_SUCCESS
        && wc.opcode == ibv::ibv_wc_opcode::IBV_WC_RECV
        && wc.wc_flags & ibv::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
    // SAFETY: the completion carries an immediate (IBV_WC_WITH_IMM), so that is the union's field.
    received.then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }))
}

/// Receives the marks of one session's queue pair until told to stop, or until the queue pair fails; then
/// stops it (error state), hands over the marks that had arrived, and destroys it.
fn receive_marks(mut qp: QueuePair, session: u64, stop: &AtomicBool, marks: &OnceLock<MarkSink>) {
    let hand_over = |mark: Option<u32>| {
        if let (Some(mark), Some(sink)) = (mark, marks.get()) {
            sink(session, mark);
        }
    };
    let mut wcs = post::no_completions();
    'receiving: while !stop.load(Ordering::Acquire) {
        let mut n = qp.poll(&mut wcs).unwrap_or(0);
        if n == 0 {
            // Armed, then polled once more: a mark that came in between is not slept through.
            if qp.arm().is_err() {
                break;
            }
            n = qp.poll(&mut wcs).unwrap_or(0);
            if n == 0 {
                if !qp.sleep(MARK_POLL) {
                    break;
                }
                continue;
            }
        }
        for wc in &wcs[..n] {
            if wc.status != ibv::ibv_wc_status::IBV_WC_SUCCESS || qp.post_receives(1).is_err() {
                // The queue pair failed (its peer went away): nothing more arrives on it.
                break 'receiving;
            }
            hand_over(mark_of(wc));
        }
    }
    // Nothing more is taken in; the marks already received are still handed over (a write complete before the
    // session ended must not be reported as failed).
    qp.fail();
    for _ in 0..MARK_RECEIVES * 2 {
        match qp.poll(&mut wcs) {
            Ok(0) | Err(_) => break,
            Ok(n) => wcs[..n].iter().for_each(|wc| hand_over(mark_of(wc))),
        }
    }
}

impl RdmaTarget {
    /// Serves the cache registered in `context`.
    pub fn new(context: Arc<RdmaContext>) -> RdmaTarget {
        RdmaTarget { sessions: Mutex::new(HashMap::new()), marks: Arc::new(OnceLock::new()), context }
    }

    /// The device in use.
    pub fn device_name(&self) -> &str {
        self.context.device().name()
    }

    /// Connects a queue pair to a prefill peer's. Returns the new session's token and the answer for the peer.
    /// The session lasts until it is cut off ([`Acceptor::cut_off`]: its request channel ended).
    pub fn accept(&self, remote: &QpEndpoint) -> Result<(u64, RdmaWelcome)> {
        let mut qp = self.context.prepare_receiving()?;
        qp.connect(remote, self.context.path)?;
        let flush = self.context.flush_target.as_ref().map(|(region, memory)| RemoteRegion { addr: memory.addr(), len: FLUSH_BYTES as u64, rkey: region.rkey() });
        let welcome = RdmaWelcome { endpoint: qp.endpoint(), regions: self.context.regions.remote(&self.context.cache), flush };
        let mut sessions = self.sessions.lock().unwrap();
        let token = loop {
            let token = crate::auth::random_u64();
            if !sessions.contains_key(&token) {
                break token;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (s, marks) = (stop.clone(), self.marks.clone());
        let thread = std::thread::Builder::new()
            .name("kvtransfer-rdma-marks".into())
            .spawn(move || receive_marks(qp, token, &s, &marks))
            .map_err(|e| Error::io("starting a queue pair's thread", e))?;
        sessions.insert(token, Session { stop, thread: Some(thread) });
        Ok((token, welcome))
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }
}

impl Acceptor for RdmaTarget {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn accept(&self, admission: &Admission<'_>) -> Result<Accepted> {
        let endpoint: QpEndpoint = transport::from_details(TransportKind::Rdma, admission.details)?;
        let (session, welcome) = RdmaTarget::accept(self, &endpoint)?;
        Ok(Accepted { session, details: transport::to_details(&welcome) })
    }

    /// Destroys the session's queue pair: once `ibv_destroy_qp` returns, the device places nothing more for it.
    fn cut_off(&self, session: u64) -> bool {
        let removed = self.sessions.lock().unwrap().remove(&session);
        drop(removed);
        true
    }

    fn close(&self) {
        let sessions = std::mem::take(&mut *self.sessions.lock().unwrap());
        // Every thread told first, then each waited for: one wait, not one per session.
        for session in sessions.values() {
            session.stop.store(true, Ordering::Release);
        }
        drop(sessions);
    }

    fn watch(&self, marks: MarkSink) {
        let _ = self.marks.set(marks);
    }

    fn device(&self) -> Option<&str> {
        Some(self.device_name())
    }
}
