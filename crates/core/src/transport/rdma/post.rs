//! The data path: building one chain of `RDMA_WRITE` work requests per `writeCache` call, posting it in
//! lists that fit the send queue, and polling until every request has completed.
//!
//! A call's work requests live in two vectors reused from call to call, so the hot path allocates nothing,
//! takes no lock and makes no system call per block: building costs a few stores per block, posting one
//! doorbell per list.

use super::queue_pair::QueuePair;
use super::registration::RemoteRegion;
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{CacheLayout, Tensor};
use crate::plan::{self, BlockPlan, SliceGeometry};
use rdma_mummy_sys as ibv;
use std::time::{Duration, Instant};

/// The local and remote coordinates of one layer's tensors, gathered once per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerKeys {
    /// Local key of each tensor's region (by `Tensor as usize`).
    pub lkeys: [u32; 4],
    /// The peer's region of each tensor.
    pub remote: [RemoteRegion; 4],
}

/// The work requests of one call. The vectors only grow: a request's slot is reused by later calls, which
/// rewrite only the fields that differ between requests.
#[derive(Default)]
pub struct WriteChain {
    wrs: Vec<ibv::ibv_send_wr>,
    sges: Vec<ibv::ibv_sge>,
    len: usize,
}

// SAFETY: the raw pointers inside are links between the chain's own elements, rebuilt before each post.
unsafe impl Send for WriteChain {}


impl WriteChain {
    /// Builds one `RDMA_WRITE` per contiguous range of `plan`, for every tensor of `cache`: a run of blocks
    /// contiguous on both sides is one request (split at `max_msg` bytes); with several slices per remote
    /// block (hetero TP) each block is its own request.
    pub fn build(&mut self, plan: &BlockPlan, cache: &CacheLayout, keys: &LayerKeys, geometry: SliceGeometry, max_msg: u64) {
        self.len = 0;
        let layer = plan.layer();
        // Per tensor, looked up once per call rather than once per request.
        let tensors = cache.tensors();
        let base = Tensor::ALL.map(|t| if tensors.contains(t) { cache.addr(t, layer) } else { 0 });
        plan::for_each_segment(plan.runs(), tensors, |t| cache.block_bytes(t), geometry, |s| {
            let (lkey, remote) = (keys.lkeys[s.tensor as usize], keys.remote[s.tensor as usize]);
            let (mut local, mut dst, mut left) = (base[s.tensor as usize] + s.local, remote.addr + s.remote, s.len);
            while left > 0 {
                let len = left.min(max_msg);
                self.push(ibv::ibv_wr_opcode::IBV_WR_RDMA_WRITE, local, len, lkey, dst, remote.rkey);
                (local, dst, left) = (local + len, dst + len, left - len);
            }
        });
    }

    /// Appends the flush: an `RDMA_READ` of `len` bytes at `remote` (the decode's flush target) into a local
    /// scratch region. It completes only after the writes before it have landed.
    pub fn push_flush_read(&mut self, scratch: u64, scratch_lkey: u32, remote: u64, rkey: u32, len: u32) {
        self.push(ibv::ibv_wr_opcode::IBV_WR_RDMA_READ, scratch, len as u64, scratch_lkey, remote, rkey);
    }

    /// Appends the mark: a zero-length `SEND` with `mark` as its immediate. The decode's queue pair receives it
    /// only after every write before it has been placed in its memory (RC executes a queue pair's requests in
    /// order), and so learns that the write is complete.
    pub fn push_mark(&mut self, mark: u32) {
        self.push(ibv::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM, 0, 0, 0, 0, 0);
        let wr = &mut self.wrs[self.len - 1];
        wr.num_sge = 0;
        wr.imm_data_invalidated_rkey_union = ibv::imm_data_invalidated_rkey_union_t { imm_data: mark.to_be() };
    }

    /// Number of work requests.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn push(&mut self, opcode: ibv::ibv_wr_opcode::Type, local: u64, len: u64, lkey: u32, remote: u64, rkey: u32) {
        let i = self.len;
        if i == self.wrs.len() {
            // SAFETY: ibv_send_wr is plain data for which all-zero is "no flags, no next, no immediate"; the
            // fields left zero here are never written.
            self.wrs.push(unsafe { std::mem::zeroed() });
            self.sges.push(ibv::ibv_sge { addr: 0, length: 0, lkey: 0 });
        }
        self.sges[i] = ibv::ibv_sge { addr: local, length: len as u32, lkey };
        let wr = &mut self.wrs[i];
        wr.opcode = opcode;
        wr.num_sge = 1;
        wr.wr.rdma = ibv::rdma_t { remote_addr: remote, rkey };
        self.len = i + 1;
    }

    /// Links the requests into lists of at most `list_len`: each list ends with a null `next` and a signaled
    /// request, and every request carries its list's index as `wr_id`. [`execute`] does this before posting.
    pub fn link(&mut self, list_len: usize) {
        let n = self.len;
        let sges = self.sges.as_mut_ptr();
        let wrs = self.wrs.as_mut_ptr();
        for (i, wr) in self.wrs[..n].iter_mut().enumerate() {
            let last_of_list = (i + 1) % list_len == 0 || i + 1 == n;
            wr.wr_id = (i / list_len) as u64;
            // SAFETY: i < n <= sges.len() = wrs.len(); both vectors stay unmoved until the chain is done.
            wr.sg_list = unsafe { sges.add(i) };
            wr.next = if last_of_list { std::ptr::null_mut() } else { unsafe { wrs.add(i + 1) } };
            wr.send_flags = if last_of_list { ibv::ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
        }
    }
}

/// Posts `chain` on `qp` in lists of half the send queue (so one list transfers while the next is posted)
/// and polls until all have completed, or fails after `timeout` without progress. `meanwhile` runs once, when
/// the first lists are posted.
///
/// On failure the queue pair is moved to the error state and drained, and must be rebuilt: the error names
/// the completion status (`IBV_WC_REM_ACCESS_ERR`, ...).
pub fn execute(qp: &mut QueuePair, chain: &mut WriteChain, timeout: Duration, meanwhile: &mut dyn FnMut()) -> Result<()> {
    if chain.is_empty() {
        meanwhile();
        return Ok(());
    }
    let mut meanwhile = Some(meanwhile);
    let list_len = (qp.depth() as usize / 2).max(1);
    chain.link(list_len);
    let lists = chain.len().div_ceil(list_len);
    let mut posted = 0usize; // lists posted
    let mut done = 0usize; // lists completed
    let mut wcs = no_completions();
    let mut waiter = Waiter::new(timeout);
    while done < lists {
        while posted < lists && posted - done < 2 {
            let first = &mut chain.wrs[posted * list_len] as *mut ibv::ibv_send_wr;
            // SAFETY: `link` made a null-terminated list from `first`; its SGEs name the registered cache and
            // the chain is not touched again until every list has completed (or the QP is dead).
            if let Err(e) = unsafe { qp.post_send(first) } {
                abort(qp, posted, done);
                return Err(e);
            }
            posted += 1;
        }
        if let Some(meanwhile) = meanwhile.take() {
            // A panic in it fails the write as a failed post does: the queue pair is stopped and drained first.
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| meanwhile())) {
                abort(qp, posted, done);
                return Err(Error::from_panic(&*panic));
            }
        }
        let n = match qp.poll(&mut wcs) {
            Ok(n) => n,
            Err(e) => {
                abort(qp, posted, done);
                return Err(e);
            }
        };
        if n == 0 {
            if waiter.expired() {
                abort(qp, posted, done);
                return Err(Error::new(
                    ErrorCode::Timeout,
                    format!(
                        "RDMA writes on {} did not complete within {} ms ({done} of {lists} lists done)",
                        qp.device().name(),
                        timeout.as_millis()
                    ),
                ));
            }
            continue;
        }
        waiter.progress();
        for wc in &wcs[..n] {
            if wc.status != ibv::ibv_wc_status::IBV_WC_SUCCESS {
                let err = completion_error(wc, qp.device().name());
                abort(qp, posted, wc.wr_id as usize);
                return Err(err);
            }
            done = done.max(wc.wr_id as usize + 1);
        }
    }
    Ok(())
}

/// After a failure: moves the queue pair to the error state, so what is still queued is flushed rather
/// than sent, and waits (briefly) for the completions of everything posted, so no request is left reading
/// the cache when the call returns. The caller's link is broken from here on and its queue pair destroyed
/// when it is rebuilt or dropped, which stops anything left.
fn abort(qp: &mut QueuePair, posted: usize, mut done: usize) {
    qp.fail();
    let mut wcs = no_completions();
    let deadline = Instant::now() + Duration::from_secs(1);
    while done < posted && Instant::now() < deadline {
        match qp.poll(&mut wcs) {
            Ok(n) => wcs[..n].iter().for_each(|wc| done = done.max(wc.wr_id as usize + 1)),
            Err(_) => return,
        }
    }
}

/// A buffer for polled completions.
pub fn no_completions() -> [ibv::ibv_wc; 4] {
    // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Spins while completions come quickly, then yields the CPU; tells when `timeout` passed without progress.
struct Waiter {
    timeout: Duration,
    since: Instant,
    spins: u32,
}

impl Waiter {
    fn new(timeout: Duration) -> Waiter {
        Waiter { timeout, since: Instant::now(), spins: 0 }
    }
    fn progress(&mut self) {
        self.spins = 0;
        self.since = Instant::now();
    }
    #[inline]
    fn expired(&mut self) -> bool {
        self.spins += 1;
        if self.spins < 4096 {
            return false;
        }
        std::thread::yield_now();
        self.since.elapsed() > self.timeout
    }
}

fn completion_error(wc: &ibv::ibv_wc, device: &str) -> Error {
    let name = status_name(wc.status);
    let hint = match wc.status {
        ibv::ibv_wc_status::IBV_WC_REM_ACCESS_ERR => ": the peer's memory region refused the write (deregistered or out of range)",
        ibv::ibv_wc_status::IBV_WC_RETRY_EXC_ERR => ": no acknowledgement from the peer (is it alive and reachable? see KVCACHE_IB_TIMEOUT)",
        ibv::ibv_wc_status::IBV_WC_LOC_PROT_ERR | ibv::ibv_wc_status::IBV_WC_LOC_ACCESS_ERR => ": a local block is outside the registered cache",
        _ => "",
    };
    Error::new(
        ErrorCode::Transport,
        format!("RDMA work request on {device} failed with {name} (status {}, vendor error {:#x}){hint}", wc.status, wc.vendor_err),
    )
}

/// The `ibv_wc_status` enumerator's name.
pub fn status_name(status: ibv::ibv_wc_status::Type) -> &'static str {
    const NAMES: [&str; 24] = [
        "IBV_WC_SUCCESS",
        "IBV_WC_LOC_LEN_ERR",
        "IBV_WC_LOC_QP_OP_ERR",
        "IBV_WC_LOC_EEC_OP_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_WR_FLUSH_ERR",
        "IBV_WC_MW_BIND_ERR",
        "IBV_WC_BAD_RESP_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_OP_ERR",
        "IBV_WC_RETRY_EXC_ERR",
        "IBV_WC_RNR_RETRY_EXC_ERR",
        "IBV_WC_LOC_RDD_VIOL_ERR",
        "IBV_WC_REM_INV_RD_REQ_ERR",
        "IBV_WC_REM_ABORT_ERR",
        "IBV_WC_INV_EECN_ERR",
        "IBV_WC_INV_EEC_STATE_ERR",
        "IBV_WC_FATAL_ERR",
        "IBV_WC_RESP_TIMEOUT_ERR",
        "IBV_WC_GENERAL_ERR",
        "IBV_WC_TM_ERR",
        "IBV_WC_TM_RNDV_INCOMPLETE",
    ];
    NAMES.get(status as usize).copied().unwrap_or("an unknown status")
}

/// The keys of `layer`, from flat per-tensor tables.
pub fn layer_keys(cache: &CacheLayout, layer: u32, lkey: impl Fn(Tensor, u32) -> u32, remote: &[Vec<RemoteRegion>]) -> LayerKeys {
    let mut keys = LayerKeys::default();
    for t in cache.tensors().iter() {
        keys.lkeys[t as usize] = lkey(t, layer);
        keys.remote[t as usize] = remote[t as usize][layer as usize];
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::CacheSpec;

    fn cache() -> CacheLayout {
        // SAFETY: made-up addresses: the tests only build work requests.
        unsafe { CacheLayout::new(CacheSpec {
            key: vec![0x10000, 0x20000],
            value: vec![0x30000, 0x40000],
            block_number: 16,
            block_bytes: 256,
            ..Default::default()
        }) }
        .unwrap()
    }

    fn keys(c: &CacheLayout, layer: u32, ratio: u64) -> LayerKeys {
        let remote: Vec<Vec<RemoteRegion>> = (0..4)
            .map(|t| (0..2).map(|l| RemoteRegion { addr: 0x100000 * (t + 1) + l * 0x10000, len: 16 * 256 * ratio, rkey: 70 + t as u32 }).collect())
            .collect();
        layer_keys(c, layer, |t, l| 10 * (t as u32 + 1) + l, &remote[..])
    }

    fn dump(chain: &WriteChain) -> Vec<(u32, u64, u32, u32, u64, u32)> {
        chain.wrs[..chain.len]
            .iter()
            .zip(&chain.sges)
            .map(|(wr, sge)| unsafe { (wr.opcode, sge.addr, sge.length, sge.lkey, wr.wr.rdma.remote_addr, wr.wr.rdma.rkey) })
            .collect()
    }

    #[test]
    fn one_write_per_run_and_tensor() {
        let c = cache();
        let mut plan = BlockPlan::default();
        plan.build(&[1, 2, 3, 7], &[4, 5, 6, 0], 1, 2, 16, 16).unwrap();
        let mut chain = WriteChain::default();
        chain.build(&plan, &c, &keys(&c, 1, 1), SliceGeometry::WHOLE, 1 << 30);
        const W: u32 = ibv::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        assert_eq!(
            dump(&chain),
            vec![
                (W, 0x20000 + 256, 768, 11, 0x110000 + 4 * 256, 70),
                (W, 0x20000 + 7 * 256, 256, 11, 0x110000, 70),
                (W, 0x40000 + 256, 768, 21, 0x210000 + 4 * 256, 71),
                (W, 0x40000 + 7 * 256, 256, 21, 0x210000, 71),
            ]
        );
    }

    #[test]
    fn long_runs_split_at_the_message_limit_and_slices_go_one_by_one() {
        let c = cache();
        let mut plan = BlockPlan::default();
        plan.build(&[0, 1, 2], &[0, 1, 2], 0, 2, 16, 16).unwrap();
        let mut chain = WriteChain::default();
        chain.build(&plan, &c, &keys(&c, 0, 1), SliceGeometry::WHOLE, 512);
        let lens: Vec<u32> = dump(&chain).iter().map(|w| w.2).collect();
        assert_eq!(lens, vec![512, 256, 512, 256]);

        // Two slices per remote block, this rank owns the second: block b lands at (2b + 1) * 256.
        chain.build(&plan, &c, &keys(&c, 0, 2), SliceGeometry { ratio: 2, slot: 1 }, 1 << 30);
        let d = dump(&chain);
        assert_eq!(d.len(), 6);
        assert_eq!(d[0].4, 0x100000 + 256);
        assert_eq!(d[2].4, 0x100000 + 5 * 256);
        assert_eq!(d[2].1, 0x10000 + 2 * 256);
    }

    #[test]
    fn lists_are_null_terminated_and_signaled_at_their_end() {
        let c = cache();
        let mut plan = BlockPlan::default();
        let ids: Vec<u32> = (0..16).step_by(2).collect();
        plan.build(&ids, &ids, 0, 2, 16, 16).unwrap();
        let mut chain = WriteChain::default();
        chain.build(&plan, &c, &keys(&c, 0, 1), SliceGeometry::WHOLE, 1 << 30);
        chain.push_flush_read(0x9000, 5, 0x100000, 70, 8);
        assert_eq!(chain.len(), 17);
        chain.link(8);
        let signaled: Vec<usize> = (0..17).filter(|&i| chain.wrs[i].send_flags != 0).collect();
        assert_eq!(signaled, vec![7, 15, 16]);
        for i in 0..17 {
            assert_eq!(chain.wrs[i].next.is_null(), signaled.contains(&i), "wr {i}");
            assert_eq!(chain.wrs[i].wr_id, (i / 8) as u64);
            assert_eq!(chain.wrs[i].sg_list, &mut chain.sges[i] as *mut _);
        }
        assert_eq!(chain.wrs[16].opcode, ibv::ibv_wr_opcode::IBV_WR_RDMA_READ);
        assert_eq!(status_name(ibv::ibv_wc_status::IBV_WC_REM_ACCESS_ERR), "IBV_WC_REM_ACCESS_ERR");
        assert_eq!(status_name(999), "an unknown status");
    }
}
