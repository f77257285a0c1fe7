//! Completion queues and reliable-connected queue pairs: creation and the INIT → RTR → RTS steps.

use super::device::{check, os_error, Device, PORT};
use super::registration::ProtectionDomain;
use crate::error::{Error, ErrorCode, Result};
use crate::metrics::{HeldResource, Raised, RESOURCES};
use rdma_mummy_sys as ibv;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A completion channel: the file descriptor a thread sleeps on until its completion queue has something.
pub struct CompletionChannel {
    channel: *mut ibv::ibv_comp_channel,
    _device: Arc<Device>,
}

// SAFETY: a completion channel is a file descriptor and a context pointer; verbs allow any thread to use it, and
// only the queue pair that owns it (one thread at a time, through `&mut`) does.
unsafe impl Send for CompletionChannel {}

impl CompletionChannel {
    fn new(device: &Arc<Device>) -> Result<CompletionChannel> {
        // SAFETY: the context is open for as long as `device` lives, and we keep it.
        let channel = unsafe { ibv::ibv_create_comp_channel(device.raw()) };
        if channel.is_null() {
            return Err(os_error(&format!("creating a completion channel on {}", device.name())));
        }
        Ok(CompletionChannel { channel, _device: device.clone() })
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel; the completion queue that used it is destroyed first (field
        // order in `QueuePair`), and every event it delivered was acknowledged.
        unsafe { ibv::ibv_destroy_comp_channel(self.channel) };
    }
}

/// An `ibv_cq`, destroyed on drop.
pub struct CompletionQueue {
    cq: *mut ibv::ibv_cq,
    _device: Arc<Device>,
}

// SAFETY: CQs are thread-safe verbs objects; polling takes `&mut`, so one thread at a time polls.
unsafe impl Send for CompletionQueue {}

impl CompletionQueue {
    /// A completion queue with room for `entries` completions, reporting to `channel` when given.
    fn new(device: &Arc<Device>, entries: u32, channel: Option<&CompletionChannel>) -> Result<CompletionQueue> {
        let channel = channel.map_or(std::ptr::null_mut(), |c| c.channel);
        // SAFETY: the context is open for as long as `device` lives, and we keep it; the channel (if any) outlives
        // the CQ (the queue pair drops it after).
        let cq = unsafe { ibv::ibv_create_cq(device.raw(), entries as i32, std::ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            return Err(os_error(&format!("creating a completion queue on {}", device.name())));
        }
        Ok(CompletionQueue { cq, _device: device.clone() })
    }

    /// Fills `out` with up to `out.len()` completions; returns how many.
    #[inline]
    pub fn poll(&mut self, out: &mut [ibv::ibv_wc]) -> Result<usize> {
        // SAFETY: the CQ is live and `out` has room for `out.len()` entries.
        let n = unsafe { ibv::ibv_poll_cq(self.cq, out.len() as i32, out.as_mut_ptr()) };
        if n < 0 {
            return Err(Error::new(ErrorCode::Transport, "polling the completion queue failed"));
        }
        Ok(n as usize)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the queue pairs using this CQ hold it through their owner and are destroyed first.
        unsafe { ibv::ibv_destroy_cq(self.cq) };
    }
}

/// How a peer reaches a queue pair: exchanged in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// `ibv_mtu` of the port (1 = 256 B … 5 = 4096 B); the path uses the smaller of the two.
    pub mtu: u32,
    /// Whether the port runs RoCE (GID-addressed) rather than InfiniBand (LID-addressed).
    pub ethernet: bool,
}

/// Timing knobs of a connection.
#[derive(Debug, Clone, Copy)]
pub struct PathOptions {
    /// `KVCACHE_IB_TIMEOUT`: local ACK timeout, 4.096 µs · 2^timeout.
    pub ack_timeout: u8,
    /// Transport retries before a write fails with `RETRY_EXC_ERR`.
    pub retry_count: u8,
}

/// A reliable-connected queue pair with its own completion queue, destroyed on drop. Whatever it was
/// posting stops before `Drop` returns, so its memory regions can go next.
pub struct QueuePair {
    qp: *mut ibv::ibv_qp,
    depth: u32,
    psn: u32,
    /// Declared after `qp` so that it is dropped after the queue pair is destroyed.
    cq: CompletionQueue,
    /// For a queue pair that receives ([`QueuePair::receiving`]); dropped after its CQ.
    channel: Option<CompletionChannel>,
    pd: Arc<ProtectionDomain>,
    _counted: HeldResource,
}

// SAFETY: posting and polling take `&mut self`, so one thread at a time uses a QP; libibverbs allows a QP
// to move between threads.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Creates an RC queue pair whose send queue holds `depth` work requests (capped at the device's
    /// limit) and moves it to INIT, accepting remote writes and reads.
    pub fn new(pd: &Arc<ProtectionDomain>, depth: u32) -> Result<QueuePair> {
        QueuePair::create(pd, depth, 0)
    }

    /// As [`QueuePair::new`], with `receives` receive requests posted (each takes one incoming send) and a
    /// completion channel to sleep on ([`QueuePair::wait`]).
    pub fn receiving(pd: &Arc<ProtectionDomain>, depth: u32, receives: u32) -> Result<QueuePair> {
        let mut qp = QueuePair::create(pd, depth, receives.max(1))?;
        qp.post_receives(receives.max(1))?;
        Ok(qp)
    }

    fn create(pd: &Arc<ProtectionDomain>, depth: u32, receives: u32) -> Result<QueuePair> {
        let device = pd.device();
        let depth = depth.min(device.max_qp_wr()).max(2);
        let receives = receives.min(device.max_qp_wr());
        let channel = if receives > 0 { Some(CompletionChannel::new(device)?) } else { None };
        // Room for a completion per work request: after an error, flushed requests may all complete.
        let cq = CompletionQueue::new(device, depth + receives, channel.as_ref())?;
        // SAFETY: plain data; zeroed is a valid "no SRQ, no context" init attr.
        let mut init: ibv::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq;
        init.recv_cq = cq.cq;
        init.qp_type = ibv::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = receives.max(1);
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and cq are live; the attr is fully initialised.
        let qp = unsafe { ibv::ibv_create_qp(pd.raw(), &mut init) };
        if qp.is_null() {
            return Err(os_error(&format!("creating a queue pair on {}", device.name())));
        }
        let psn = initial_psn(qp);
        let counted = Raised::new(&RESOURCES, |r| &r.rdma_queue_pairs);
        let mut qp = QueuePair { qp, depth, psn, cq, channel, pd: pd.clone(), _counted: counted };
        // SAFETY: as above.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = PORT;
        attr.qp_access_flags = ibv::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            | ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        use ibv::ibv_qp_attr_mask as m;
        qp.modify(&mut attr, m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS, "INIT")?;
        Ok(qp)
    }

    /// This queue pair's address, for the peer.
    pub fn endpoint(&self) -> QpEndpoint {
        let device = self.pd.device();
        QpEndpoint {
            // SAFETY: qp is live; qp_num is set at creation and never changes.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            lid: device.lid(),
            gid: device.gid(),
            mtu: device.active_mtu(),
            ethernet: device.is_ethernet(),
        }
    }

    /// Connects to the peer's queue pair: INIT → RTR (ready to receive) → RTS (ready to send).
    pub fn connect(&mut self, remote: &QpEndpoint, opts: PathOptions) -> Result<()> {
        let device = self.pd.device().clone();
        if remote.ethernet != device.is_ethernet() {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!(
                    "link layers differ: {} runs {}, the peer runs {}",
                    device.name(),
                    if device.is_ethernet() { "RoCE" } else { "InfiniBand" },
                    if remote.ethernet { "RoCE" } else { "InfiniBand" }
                ),
            ));
        }
        use ibv::ibv_qp_attr_mask as m;
        // SAFETY: plain data, fully set below for the fields the mask names.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = remote.mtu.min(device.active_mtu()).max(ibv::ibv_mtu::IBV_MTU_256);
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = device.max_rd_atomic();
        attr.min_rnr_timer = 12;
        attr.ah_attr.port_num = PORT;
        attr.ah_attr.sl = 0;
        if device.is_ethernet() {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = device.gid_index();
            attr.ah_attr.grh.hop_limit = 64;
        } else {
            attr.ah_attr.dlid = remote.lid;
        }
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        // SAFETY: as above.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = opts.ack_timeout;
        attr.retry_cnt = opts.retry_count;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = device.max_rd_atomic();
        self.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_TIMEOUT | m::IBV_QP_RETRY_CNT | m::IBV_QP_RNR_RETRY | m::IBV_QP_SQ_PSN | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Moves the queue pair to the error state: outstanding work requests complete with flush errors and
    /// nothing more is sent.
    pub fn fail(&mut self) {
        // SAFETY: plain data.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(&mut attr, ibv::ibv_qp_attr_mask::IBV_QP_STATE, "ERR");
    }

    /// Fills `out` with up to `out.len()` completions of this queue pair; returns how many.
    #[inline]
    pub fn poll(&mut self, out: &mut [ibv::ibv_wc]) -> Result<usize> {
        self.cq.poll(out)
    }

    /// Posts `n` receive requests without buffers: each takes one incoming zero-length send (with its
    /// immediate).
    pub fn post_receives(&mut self, n: u32) -> Result<()> {
        for _ in 0..n {
            let mut wr = ibv::ibv_recv_wr { wr_id: 0, next: std::ptr::null_mut(), sg_list: std::ptr::null_mut(), num_sge: 0 };
            let mut bad: *mut ibv::ibv_recv_wr = std::ptr::null_mut();
            // SAFETY: the qp is live; the request names no memory (no scatter entries).
            let rc = unsafe { ibv::ibv_post_recv(self.qp, &mut wr, &mut bad) };
            if rc != 0 {
                return Err(Error::new(ErrorCode::Transport, format!("posting a receive failed: {}", std::io::Error::from_raw_os_error(rc))));
            }
        }
        Ok(())
    }

    /// Asks the completion channel to report the next completion (a receiving queue pair only). Poll after
    /// arming: a completion that came before it is reported by the poll, not the channel.
    pub fn arm(&mut self) -> Result<()> {
        if self.channel.is_none() {
            return Ok(());
        }
        // SAFETY: the CQ is live.
        match unsafe { ibv::ibv_req_notify_cq(self.cq.cq, 0) } {
            0 => Ok(()),
            rc => Err(Error::new(ErrorCode::Transport, format!("arming the completion queue: {}", std::io::Error::from_raw_os_error(rc)))),
        }
    }

    /// Sleeps until the armed completion queue reports a completion, or `timeout` passes. `false` when the
    /// channel failed (the device went away): nothing more will come.
    pub fn sleep(&mut self, timeout: Duration) -> bool {
        let Some(channel) = &self.channel else { return false };
        // SAFETY: the channel's fd is open for the channel's life.
        let mut fds = libc::pollfd { fd: unsafe { (*channel.channel).fd }, events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut fds, 1, ms) } <= 0 {
            return true;
        }
        if fds.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return false;
        }
        let (mut cq, mut context) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the channel has an event ready (poll said so), so this does not block; the event names our CQ
        // and is acknowledged at once.
        if unsafe { ibv::ibv_get_cq_event(channel.channel, &mut cq, &mut context) } != 0 {
            return false;
        }
        // SAFETY: `cq` is the CQ the event was for (ours), live.
        unsafe { ibv::ibv_ack_cq_events(cq, 1) };
        true
    }

    /// Send queue capacity in work requests.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The device the queue pair lives on.
    pub fn device(&self) -> &Arc<Device> {
        self.pd.device()
    }

    /// Posts a chain of work requests (linked through `next`).
    ///
    /// # Safety
    /// `first` must start a well-formed chain whose SGEs name memory registered on this queue pair's
    /// protection domain, and the chain must not outlive its completion.
    #[inline]
    pub unsafe fn post_send(&mut self, first: *mut ibv::ibv_send_wr) -> Result<()> {
        let mut bad: *mut ibv::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the qp is live; the caller vouches for the chain.
        let rc = unsafe { ibv::ibv_post_send(self.qp, first, &mut bad) };
        if rc != 0 {
            return Err(Error::new(
                ErrorCode::Transport,
                format!("posting work requests failed: {}", std::io::Error::from_raw_os_error(rc)),
            ));
        }
        Ok(())
    }

    fn modify(&mut self, attr: &mut ibv::ibv_qp_attr, mask: ibv::ibv_qp_attr_mask, state: &str) -> Result<()> {
        // SAFETY: the qp is live and attr is initialised for every field in `mask`.
        let rc = unsafe { ibv::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        check(rc, &format!("moving the queue pair on {} to {state}", self.pd.device().name())).map_err(|e| {
            let hint = if state == "RTR" && self.pd.device().is_ethernet() {
                " (check KVCACHE_RDMA_GID_INDEX: both ends need a GID on a connected network)"
            } else {
                ""
            };
            Error::new(e.code(), format!("{}{hint}", e.message()))
        })
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp; destroying it stops all its DMA before returning.
        unsafe { ibv::ibv_destroy_qp(self.qp) };
    }
}

/// A 24-bit starting packet sequence number that differs between queue pairs and runs.
fn initial_psn(qp: *mut ibv::ibv_qp) -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    // SAFETY: qp was just created.
    let qpn = unsafe { (*qp).qp_num };
    (nanos ^ qpn.wrapping_mul(2654435761)) & 0xff_ffff
}
