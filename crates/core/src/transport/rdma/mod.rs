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
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, PendingLink, Transport};
use crate::wire::TransportKind;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::device::{devices, DeviceInfo, GidInfo, PortInfo};

/// Send queue depth asked for (capped by the device): lists of half of it are posted at a time.
const SEND_QUEUE_DEPTH: u32 = 8192;
/// Transport retries before a write fails (the IB maximum).
const RETRY_COUNT: u8 = 7;
/// Bytes the flush read fetches.
const FLUSH_BYTES: u32 = 8;

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
    /// The cache's regions, `[tensor][layer]` (empty for tensors it lacks).
    pub regions: Vec<Vec<RemoteRegion>>,
}

/// One communicator's RDMA resources: the device, the registered cache and the settings in force.
pub struct RdmaContext {
    cache: Arc<CacheLayout>,
    regions: CacheRegions,
    /// Target of the flush reads (only read into, never looked at).
    scratch: MemoryRegion,
    scratch_memory: HostAllocation,
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
        let access = Access { remote_write: decode, remote_read: decode, relaxed_ordering: config.relax_ordering };
        let regions = CacheRegions::register(&pd, &cache, access)?;
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
            path: PathOptions { ack_timeout: config.ib_timeout, retry_count: RETRY_COUNT },
            flush: config.gdrcopy_flush,
            timeout: config.timeout,
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
    /// first): the first bytes of the last block written, which shows that the read happened.
    pub fn last_flush_read(&self) -> [u8; FLUSH_BYTES as usize] {
        let mut out = [0u8; FLUSH_BYTES as usize];
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: the scratch page is ours and mapped for the context's life; the NIC may write it
            // concurrently (another link's flush), so each byte is read volatile, never through a reference.
            *b = unsafe { std::ptr::read_volatile(self.scratch_memory.as_ptr().add(i)) };
        }
        out
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
        self.qp.connect(&welcome.endpoint, self.context.path)?;
        Ok(RdmaLink {
            qp: self.qp,
            peer,
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
    remote: Vec<Vec<RemoteRegion>>,
    geometry: SliceGeometry,
    chain: WriteChain,
    context: Arc<RdmaContext>,
}

impl Link for RdmaLink {
    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        let ctx = &*self.context;
        let cache = &*ctx.cache;
        let keys = layer_keys(cache, plan.layer(), |t, l| ctx.regions.lkey(t, l), &self.remote);
        let max_msg = ctx.device().max_msg_bytes().clamp(4096, 1 << 30);
        self.chain.build(plan, cache, &keys, self.geometry, max_msg);
        if ctx.flush {
            if let Some((remote, rkey)) = self.chain.last_write_target() {
                let scratch = ctx.scratch_memory.addr();
                self.chain.push_flush_read(scratch, ctx.scratch.lkey(), remote, rkey, FLUSH_BYTES);
            }
        }
        post::execute(&mut self.qp, &mut self.chain, ctx.timeout)
            .map_err(|e| Error::new(e.code(), format!("writing layer {} to {}: {}", plan.layer(), self.peer, e.message())))
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Rdma
    }
}

/// The decode side: its registered cache and one queue pair per connected prefill peer.
pub struct RdmaTarget {
    /// Declared first: queue pairs go before the regions they write into.
    sessions: Mutex<HashMap<u64, QueuePair>>,
    context: Arc<RdmaContext>,
}

impl RdmaTarget {
    /// Serves the cache registered in `context`.
    pub fn new(context: Arc<RdmaContext>) -> RdmaTarget {
        RdmaTarget { sessions: Mutex::new(HashMap::new()), context }
    }

    /// The device in use.
    pub fn device_name(&self) -> &str {
        self.context.device().name()
    }

    /// Connects a queue pair to a prefill peer's. Returns the new session's token and the answer for the peer.
    /// The session lasts until it is cut off ([`Acceptor::cut_off`]: its request channel ended).
    pub fn accept(&self, remote: &QpEndpoint) -> Result<(u64, RdmaWelcome)> {
        let mut qp = self.context.prepare()?.qp;
        qp.connect(remote, self.context.path)?;
        let welcome = RdmaWelcome { endpoint: qp.endpoint(), regions: self.context.regions.remote(&self.context.cache) };
        let mut sessions = self.sessions.lock().unwrap();
        let token = loop {
            let token = transport::random_u64();
            if !sessions.contains_key(&token) {
                break token;
            }
        };
        sessions.insert(token, qp);
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
        drop(self.sessions.lock().unwrap().remove(&session));
        true
    }

    fn device(&self) -> Option<&str> {
        Some(self.device_name())
    }
}
