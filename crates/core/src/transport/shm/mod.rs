//! The shared-memory transport: prefill and decode on one host, caches in host memory. The prefill writes
//! straight into the decode process's cache with `process_vm_writev` (one copy, no work on the decode side,
//! large writes split over a few threads: [`copy`]), the same one-sided shape as an RDMA write. A call of small
//! blocks, whose ranges cost the kernel more than their bytes, goes through a ring both processes map instead,
//! which a thread of the decode copies out of ([`ring`]).
//!
//! The decode side shows a random 64-bit word at a known address; the prefill reads it back before each write,
//! so a decode that closed, died, or whose pid now names another process is never written into.
//!
//! Where Yama restricts `ptrace` (`kernel.yama.ptrace_scope` 1), only the process of an authenticated peer is let
//! write, for as long as it has a session ([`ptrace_grant`]).

pub(crate) mod copy;
mod ptrace_grant;
pub mod ring;

use crate::sync::lock;
use crate::config::Config;
use crate::cuda::MemoryKind;
use crate::error::{Error, ErrorCode, Result};
use crate::iov::{iovec, IoVecs};
use crate::log::Logger;
use crate::memory::{CacheLayout, Tensor};
use crate::plan::{self, BlockPlan, SliceGeometry};
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, PendingLink, Transport};
use crate::wire::TransportKind;
use ring::{RingOffer, RingServer, RingSession, RingWriter};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A call whose ranges average at most this many bytes goes through the ring ([`ring`]); larger ones with
/// `process_vm_writev`, one copy instead of two. Measured (this machine's bench, 1538 scattered blocks, keys and
/// values, medians of three alternated runs, GB/s): ring against `process_vm_writev` 6.6 / 3.1 at 1 KiB, 8.4 /
/// 5.3 at 2 KiB, 10.1 / 7.9 at 4 KiB, 7.5 / 8.2 at 8 KiB, 7.6 / 9.1 at 16 KiB.
const RING_MEAN_RANGE: u64 = 4 << 10;

/// The registry entry.
pub struct Shm;

impl Transport for Shm {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn serves(&self, location: MemoryKind) -> bool {
        location == MemoryKind::Host
    }

    fn probe(&self, _config: &Config) -> std::result::Result<String, String> {
        ptrace_grant::writers_permitted().map(|()| "host-memory caches, processes of one host".into()).map_err(|e| e.message().to_string())
    }

    fn acceptor(&self, env: &Environment<'_>) -> Result<Arc<dyn Acceptor>> {
        Ok(Arc::new(ShmTarget::new(env.cache, env.log, env.config.timeouts.connect)?))
    }

    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>> {
        Ok(Arc::new(ShmConnector { cache: env.cache.clone(), stall: env.config.timeouts.stall }))
    }
}

/// The decode's side of the handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShmWelcome {
    pub pid: u32,
    /// Address of the decode's liveness word, and the value it holds while the decode is open.
    pub probe: u64,
    pub nonce: u64,
    /// `[tensor][layer]`, in [`Tensor::ALL`] order; empty lists for absent tensors.
    pub regions: Vec<Vec<ShmRegion>>,
    /// This session's ring, where the decode could make one (absent from older decodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingOffer>,
}

/// What the prefill's half offers: whether it would write calls through a ring (its blocks are small enough
/// for some calls to; absent from older prefills, which never do).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ShmOffer {
    #[serde(default)]
    pub ring: bool,
}

/// One tensor of one layer of the decode's cache: `len` bytes at `addr` in the decode process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ShmRegion {
    pub addr: u64,
    pub len: u64,
}

/// The decode side: lets same-host prefills write into its cache while it lives.
pub struct ShmTarget {
    probe: Box<AtomicU64>,
    welcome: ShmWelcome,
    cache: Arc<CacheLayout>,
    log: Arc<Logger>,
    /// How long a new ring waits for its prefill's claim before the decode lets go of its descriptor.
    claim_within: Duration,
    /// Sessions whose peer process holds this process's ptrace grant through this cache, each with its ring.
    sessions: Mutex<Vec<(u64, Option<RingServer>)>>,
}

impl ShmTarget {
    /// Prepares the cache for same-host writers; a Yama setting that forbids them makes the transport
    /// unavailable.
    pub fn new(cache: &Arc<CacheLayout>, log: &Arc<Logger>, claim_within: Duration) -> Result<ShmTarget> {
        ptrace_grant::writers_permitted()?;
        let nonce = crate::auth::random_u64();
        let probe = Box::new(AtomicU64::new(nonce));
        let len = |t: Tensor| cache.tensor_bytes(t).expect("checked by CacheLayout");
        let regions = Tensor::ALL.iter().map(|&t| cache.addrs(t).iter().map(|&addr| ShmRegion { addr, len: len(t) }).collect()).collect();
        let welcome = ShmWelcome { pid: std::process::id(), probe: probe.as_ptr() as u64, nonce, regions, ring: None };
        Ok(ShmTarget { probe, welcome, cache: cache.clone(), log: log.clone(), claim_within, sessions: Mutex::default() })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Option<RingServer>)>> {
        lock(&self.sessions)
    }

    /// A ring for a new session whose prefill asks for one, or none where this host cannot make one (the session
    /// then writes every call with `process_vm_writev`).
    fn ring(&self, admission: &Admission<'_>) -> Result<Option<(RingOffer, RingServer)>> {
        let offer: Option<ShmOffer> = transport::from_details(TransportKind::Shm, admission.details)?;
        if !offer.unwrap_or_default().ring {
            return Ok(None);
        }
        let made = ring::create().and_then(|(fd, memory, offer)| {
            let session = RingSession {
                cache: self.cache.clone(),
                tensors: admission.tensors,
                geometry: admission.geometry,
                peer: admission.peer.to_string(),
                log: self.log.clone(),
            };
            Ok((offer, RingServer::start(memory, fd, self.claim_within, session)?))
        });
        Ok(made.map_err(|e| self.log.warn(format!("no shared ring for {}: {e}", admission.peer))).ok())
    }
}

impl Acceptor for ShmTarget {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn accept(&self, admission: &Admission<'_>) -> Result<Accepted> {
        let Some(pid) = admission.pid else {
            return Err(Error::new(ErrorCode::Unavailable, "shm: the peer did not name its process"));
        };
        let ring = self.ring(admission)?;
        let session = crate::auth::random_u64();
        ptrace_grant::grant(session, pid)?;
        let (offer, server) = ring.unzip();
        self.sessions().push((session, server));
        Ok(Accepted { session, details: transport::to_details(&ShmWelcome { ring: offer, ..self.welcome.clone() }) })
    }

    /// Withdraws the session's part of the ptrace grant, so its process starts no more writes. Returns `false`:
    /// a `process_vm_writev` it already started may still land, and nothing here can tell when it ends.
    fn cut_off(&self, session: u64) -> bool {
        // Its ring stops (the thread joined) outside the lock.
        let ended: Vec<_> = {
            let mut sessions = self.sessions();
            let (ended, kept) = std::mem::take(&mut *sessions).into_iter().partition(|(s, _)| *s == session);
            *sessions = kept;
            ended
        };
        drop(ended);
        ptrace_grant::withdraw(|s| s == session);
        false
    }

    fn close(&self) {
        // The rings first (as `cut_off`): a write under way then fails as stopped, not as refused by ptrace.
        let (sessions, rings): (Vec<u64>, Vec<Option<RingServer>>) = std::mem::take(&mut *self.sessions()).into_iter().unzip();
        drop(rings);
        ptrace_grant::withdraw(|s| sessions.contains(&s));
    }
}

impl Drop for ShmTarget {
    fn drop(&mut self) {
        // From here on every prefill's probe fails, so nothing more is written.
        self.probe.store(0, Ordering::SeqCst);
        self.close();
    }
}

/// The prefill's half.
struct ShmConnector {
    cache: Arc<CacheLayout>,
    /// The longest a write may wait for the decode to take from the ring.
    stall: Duration,
}

impl Connector for ShmConnector {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn prepare(&self) -> Result<Box<dyn PendingLink>> {
        Ok(Box::new(ShmConnector { cache: self.cache.clone(), stall: self.stall }))
    }
}

impl PendingLink for ShmConnector {
    /// Asks for a ring where some calls would go through it: where a block's mean range (its tensors' blocks, as
    /// this side holds them) is small enough, and fits a slot.
    fn offer(&self) -> serde_json::Value {
        // A call of one block has the largest ranges a call can have: one a tensor.
        let cache = &*self.cache;
        transport::to_details(&ShmOffer { ring: ring_takes(cache, cache.layer_block_bytes(), cache.tensors().iter().count()) })
    }

    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>> {
        let welcome: ShmWelcome = transport::from_details(TransportKind::Shm, answer.details)?;
        // The claim is part of the handshake: it waits no longer than the handshake may.
        let claim = answer.deadline.saturating_duration_since(std::time::Instant::now()).min(self.stall);
        Ok(Box::new(ShmLink::open(answer.peer.to_string(), self.cache, &welcome, answer.geometry, answer.remote_blocks, claim, self.stall)?))
    }
}

/// A prefill's connection to one decode peer on the same host.
pub struct ShmLink {
    decode: DecodeProcess,
    cache: Arc<CacheLayout>,
    geometry: SliceGeometry,
    remote: [Vec<u64>; 4],
    local_iov: IoVecs,
    remote_iov: IoVecs,
    /// The session's ring, where the decode made one and this process could take it.
    ring: Option<RingWriter>,
    /// The longest a write waits for the decode to take from the ring.
    stall: Duration,
}

/// The decode process a link writes into, and its liveness word.
struct DecodeProcess {
    peer: String,
    pid: libc::pid_t,
    probe: u64,
    nonce: u64,
}

impl ShmLink {
    /// Checks the peer's layout against the agreed geometry and that this process may write into it, and takes
    /// its ring where it offers one (claimed within `claim`); a write waits at most `stall` for the ring.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        peer: String,
        cache: Arc<CacheLayout>,
        welcome: &ShmWelcome,
        geometry: SliceGeometry,
        remote_blocks: u32,
        claim: Duration,
        stall: Duration,
    ) -> Result<ShmLink> {
        // A real decode is a live process of its own with a random liveness word: anything else is not believed.
        if welcome.pid == 0 || welcome.pid > i32::MAX as u32 {
            return Err(Error::protocol(format!("the decode names process {}", welcome.pid)));
        }
        if welcome.nonce == 0 || welcome.probe == 0 {
            return Err(Error::protocol("the decode's liveness word is missing (address or value 0)"));
        }
        let lens: Vec<Vec<u64>> = welcome.regions.iter().map(|l| l.iter().map(|r| r.len).collect()).collect();
        plan::check_remote_layout(&lens, &cache, geometry.ratio, remote_blocks)?;
        let mut remote: [Vec<u64>; 4] = Default::default();
        for t in Tensor::ALL {
            remote[t as usize] = welcome.regions[t as usize].iter().map(|r| r.addr).collect();
        }
        let decode = DecodeProcess { peer, pid: welcome.pid as libc::pid_t, probe: welcome.probe, nonce: welcome.nonce };
        decode.check()?;
        // Its ring is taken, and claimed, only now that the process is known to be the decode's; a ring that
        // cannot be taken leaves every call to `process_vm_writev`, and one that is not what it should be ends
        // the link.
        let ring = match welcome.ring.map(|offer| ring::take(decode.pid, offer)) {
            Some(Ok(mut ring)) => {
                ring.claim(&cache, claim, &|| decode.check())?;
                Some(ring)
            }
            Some(Err(e)) if e.code() == ErrorCode::Protocol => return Err(e),
            Some(Err(_)) | None => None,
        };
        Ok(ShmLink { decode, cache, geometry, remote, local_iov: IoVecs::default(), remote_iov: IoVecs::default(), ring, stall })
    }
}

/// Whether a call goes through the ring rather than `process_vm_writev`: its ranges average at most
/// [`RING_MEAN_RANGE`] (a range is a run of each tensor, or a block's slice where the decode's blocks are
/// larger), and a block fits a slot.
fn through_ring(plan: &BlockPlan, cache: &CacheLayout, geometry: SliceGeometry) -> bool {
    let ranges_per_tensor = if geometry.ratio == 1 { plan.runs().len() } else { plan.blocks() as usize };
    ring_takes(cache, plan.blocks() as u64 * cache.layer_block_bytes(), ranges_per_tensor * cache.tensors().iter().count())
}

/// Whether `bytes` in `ranges` average at most [`RING_MEAN_RANGE`] a range, and a block of `cache` fits a slot.
fn ring_takes(cache: &CacheLayout, bytes: u64, ranges: usize) -> bool {
    RingWriter::fits(cache.layer_block_bytes()) && bytes / ranges.max(1) as u64 <= RING_MEAN_RANGE
}

impl DecodeProcess {
    /// Reads the decode's liveness word: the same process, still open, and this process may reach it.
    fn check(&self) -> Result<()> {
        let mut word = 0u64;
        let local = [iovec(&mut word as *mut u64 as u64, 8)];
        let remote = [iovec(self.probe, 8)];
        // SAFETY: the local range is `word`, 8 writable bytes; the remote one is only read, by the kernel,
        // which fails cleanly (EFAULT, ESRCH, EPERM) for anything it cannot reach.
        let n = unsafe { libc::process_vm_readv(self.pid, local.as_ptr(), 1, remote.as_ptr(), 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            let code = match e.raw_os_error() {
                Some(libc::EPERM) => ErrorCode::Unavailable,
                _ => ErrorCode::Transport,
            };
            return Err(Error::new(code, format!("cannot reach the decode process {} ({}): {e}", self.pid, self.peer)));
        }
        if n != 8 || word != self.nonce {
            return Err(Error::new(
                ErrorCode::Transport,
                format!("the decode process {} ({}) has closed or is gone", self.pid, self.peer),
            ));
        }
        Ok(())
    }
}

impl Link for ShmLink {
    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        self.decode.check()?;
        let layer = plan.layer();
        let (pid, peer) = (self.decode.pid, &self.decode.peer);
        if let Some(ring) = self.ring.as_mut().filter(|_| through_ring(plan, &self.cache, self.geometry)) {
            let decode = &self.decode;
            return ring
                .write(&self.cache, plan, self.stall, &|| decode.check())
                .map_err(|e| Error::new(e.code(), format!("writing layer {layer} into the decode process {pid} ({peer}) through the shared ring: {}", e.message())));
        }
        let (local, remote) = (&mut self.local_iov.0, &mut self.remote_iov.0);
        local.clear();
        remote.clear();
        // Inside the peer's tensor: the ids were checked against its block count, its layout at open.
        let (cache, regions) = (&*self.cache, &self.remote);
        plan::for_each_segment(plan.runs(), cache.tensors(), |t| cache.block_bytes(t), self.geometry, |s| {
            local.push(iovec(cache.addr(s.tensor, layer) + s.local, s.len));
            remote.push(iovec(regions[s.tensor as usize][layer as usize] + s.remote, s.len));
        });
        copy::write(pid, local, remote, copy::threads()).map_err(|e| {
            let code = match e.raw_os_error() {
                Some(libc::EPERM) => ErrorCode::Unavailable,
                _ => ErrorCode::Transport,
            };
            Error::new(code, format!("writing layer {layer} into the decode process {pid} ({peer}): {e}"))
        })
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Shm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::CacheSpec;

    fn cache(block_bytes: u64, values: bool) -> CacheLayout {
        let spec = CacheSpec { key: vec![0x10_0000], value: if values { vec![0x90_0000] } else { vec![] }, block_number: 64, block_bytes, ..Default::default() };
        // SAFETY: made-up addresses: the tests only ask which path a call takes.
        unsafe { CacheLayout::new(spec) }.unwrap()
    }

    fn plan(local: &[u32], remote: &[u32]) -> BlockPlan {
        let mut plan = BlockPlan::default();
        plan.build(local, remote, 0, 1, 64, 64).unwrap();
        plan
    }

    #[test]
    fn small_ranges_go_through_the_ring_large_ones_do_not() {
        let scattered = plan(&[1, 5, 9, 13], &[2, 6, 10, 14]);
        let contiguous = plan(&[1, 2, 3, 4], &[2, 3, 4, 5]);
        let half = SliceGeometry { ratio: 2, slot: 0 };
        for (block_bytes, p, geometry, ring) in [
            (1024, &scattered, SliceGeometry::WHOLE, true),
            (4 << 10, &scattered, SliceGeometry::WHOLE, true),
            (8 << 10, &scattered, SliceGeometry::WHOLE, false),
            // One run of four 2 KiB blocks is an 8 KiB range, and four 1 KiB blocks a 4 KiB one.
            (2 << 10, &contiguous, SliceGeometry::WHOLE, false),
            (1024, &contiguous, SliceGeometry::WHOLE, true),
            // Into larger decode blocks each block is a range of its own.
            (2 << 10, &contiguous, half, true),
            // A block (keys and values) larger than a slot never does.
            (128 << 10, &scattered, SliceGeometry::WHOLE, false),
        ] {
            assert_eq!(through_ring(p, &cache(block_bytes, true), geometry), ring, "{block_bytes} bytes, {:?}, ratio {}", p.runs(), geometry.ratio);
        }
        // Keys only: the ranges are what they were, half as many.
        assert!(through_ring(&scattered, &cache(4 << 10, false), SliceGeometry::WHOLE));
        assert!(!through_ring(&scattered, &cache(8 << 10, false), SliceGeometry::WHOLE));
    }
}
