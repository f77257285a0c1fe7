//! The shared ring: how a write of small blocks reaches a decode of this host.
//!
//! `process_vm_writev` pins the target's pages for each range it is given: about 0.3 µs a range, so a call of
//! 3076 ranges of 1 KiB spends most of its time there, not copying. For such calls the prefill instead gathers
//! the blocks into a slot of a ring both processes map, and a thread of the decode copies each slot out into its
//! cache: two `memcpy`s, on two cores at once, and no page lookups.
//!
//! The ring is a sealed memfd of the decode (its size can never change, so a mapping of it never faults): a
//! control page, then [`SLOTS`] slots of [`SLOT_BYTES`]. A slot is one piece of a write in the data path's
//! framing ([`crate::transport::frame`]): the write header, its run table, then the payload, each tensor's
//! blocks in run order. The prefill counts the slots it posted and the decode the slots it took, each in a word
//! of the control page that the other side waits on (a futex of the shared mapping); a write returns once the
//! decode has taken every slot of it, so its bytes are in the cache, as after `process_vm_writev`.
//!
//! The decode checks each slot as the TCP receiver checks a write, from its own copy of the header and run
//! table: a prefill that lies in the ring writes nothing outside the cache, and stops the ring. The prefill
//! trusts nothing of the ring either: a count that runs ahead of its own, or a stopped decode, fails the write.
//!
//! Who may reach the ring: the prefill takes the decode's descriptor of it with `pidfd_getfd`, which the kernel
//! allows only where it would allow `process_vm_writev` (the same ptrace check, and the same Yama grant), checks
//! the ring's random name against the one the decode's welcome gave, and at once posts an empty slot
//! ([`RingWriter::claim`]); the decode closes its descriptor at the first slot. A process of the same user that
//! opened it through `/proc` before then keeps what it opened (see `SECURITY.md`).

use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use crate::memory::{CacheLayout, TensorSet};
use crate::metrics::{HeldResource, Raised, RESOURCES};
use crate::plan::{self, BlockPlan, Run, SliceGeometry};
use crate::transport::frame::{self, WriteHeader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Slots of a ring: a power of two, so that the wrapping counts name slots alike.
pub const SLOTS: u32 = 8;
/// Bytes of a slot: its header, run table and payload.
pub const SLOT_BYTES: usize = 256 << 10;
/// The control page: the two counts, the decode's verdict and the ring's name, each on a cache line of its own.
const CONTROL_BYTES: usize = 4096;
/// The whole ring.
pub const RING_BYTES: usize = CONTROL_BYTES + SLOTS as usize * SLOT_BYTES;

/// The words of the control page.
#[derive(Clone, Copy)]
enum Word {
    /// Slots posted by the prefill (written by it alone).
    Posted = 0,
    /// Slots taken by the decode (written by it alone).
    Taken = 64,
    /// 0 while the decode serves the ring; why it stopped: `PROTOCOL` (a slot that lied) or `TRANSPORT`.
    Stopped = 128,
}

/// Where the ring's random name lies (a u64, written by the decode before it offers the ring).
const NAME: usize = 192;

/// How long either side sleeps before looking again at what the futex did not wake it for (its peer's death,
/// its own stop).
const NAP: Duration = Duration::from_millis(50);

/// What the decode tells the prefill the ring is, in its welcome.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RingOffer {
    /// The decode's descriptor of the ring's memfd.
    pub fd: i32,
    pub bytes: u64,
    /// The random name the ring holds: a descriptor number reused for another session's ring is not taken.
    pub name: u64,
}

/// A mapping of a ring, unmapped on drop.
struct Mapping {
    base: *mut u8,
    _counted: HeldResource,
}

// SAFETY: the mapping is shared memory that both processes change; this process touches it only through the
// control words' atomics and through copies of whole slots, made by whichever thread owns the writer or the
// server, so moving or sharing the pointer between threads adds nothing.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the whole of a ring's memfd.
    fn map(fd: &OwnedFd) -> Result<Mapping> {
        // SAFETY: a new shared mapping of RING_BYTES of a file that holds them (created so, or checked sealed at
        // that size by `take`): nothing else of this process is touched.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), RING_BYTES, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            return Err(Error::io("mapping the shared ring", std::io::Error::last_os_error()));
        }
        Ok(Mapping { base: base.cast(), _counted: Raised::new(&RESOURCES, |r| &r.shm_rings) })
    }

    fn word(&self, word: Word) -> &AtomicU32 {
        // SAFETY: each word's offset is 4-aligned and inside the control page, inside the mapping (which lives as
        // long as `self`); the page is only ever accessed as these atomics, by both processes.
        unsafe { &*self.base.add(word as usize).cast::<AtomicU32>() }
    }

    fn name(&self) -> &AtomicU64 {
        // SAFETY: as for `word`: 8-aligned, inside the control page, only accessed as this atomic.
        unsafe { &*self.base.add(NAME).cast::<AtomicU64>() }
    }

    fn slot(&self, n: u32) -> *mut u8 {
        // SAFETY: inside the mapping: CONTROL_BYTES + (n mod SLOTS) × SLOT_BYTES + SLOT_BYTES ≤ RING_BYTES.
        unsafe { self.base.add(CONTROL_BYTES + (n % SLOTS) as usize * SLOT_BYTES) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, used by no one once its owner is dropped.
        unsafe { libc::munmap(self.base.cast(), RING_BYTES) };
    }
}

/// How long a side polls a word before it sleeps on it: the other side is usually part-way through a slot (tens
/// of µs), and a futex sleep and wake-up cost about as much again.
const SPIN: Duration = Duration::from_micros(50);

/// Waits while `word` holds `seen`: polls it for `spin`, then sleeps for at most `timeout` (a futex of the
/// shared mapping, so the other process can wake it). Each poll yields the CPU: where the scheduler has put both
/// sides on one CPU (it does, for a while, after the ring's thread starts) the side that waits lets the other
/// on, and both stay runnable, so the scheduler sees two tasks on one CPU and moves one.
fn wait(word: &AtomicU32, seen: u32, spin: Duration, timeout: Duration) {
    let polling = Instant::now();
    while polling.elapsed() < spin {
        if word.load(Ordering::Acquire) != seen {
            return;
        }
        std::thread::yield_now();
    }
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: FUTEX_WAIT reads the aligned word and the timespec, both valid for the call; it returns at once
    // where the word no longer holds `seen`, and any error (EINTR, EAGAIN, ETIMEDOUT) only ends the wait early.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, seen, &ts as *const libc::timespec, 0usize, 0u32) };
}

/// Wakes whoever waits on `word`, in either process.
fn wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only reads the word's address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32) };
}

fn os_error(context: &str) -> Error {
    Error::io(context, std::io::Error::last_os_error())
}

/// A new ring, for the decode's side: its memfd (sealed at [`RING_BYTES`]), the decode's mapping of it, and
/// what the prefill is told of it.
pub fn create() -> Result<(OwnedFd, RingServerMemory, RingOffer)> {
    // Never executable (kernels from 6.3 warn about a memfd that could be, and `vm.memfd_noexec` = 2 refuses
    // one); older kernels do not know the flag.
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a NUL-terminated string; the flags ask for a new anonymous file.
    let mut raw = unsafe { libc::memfd_create(c"kvtransfer-ring".as_ptr(), flags | libc::MFD_NOEXEC_SEAL) };
    if raw < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        raw = unsafe { libc::memfd_create(c"kvtransfer-ring".as_ptr(), flags) };
    }
    if raw < 0 {
        return Err(os_error("creating the shared ring"));
    }
    // SAFETY: `raw` is the descriptor just created, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain system calls on the descriptor owned above.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), RING_BYTES as libc::off_t) != 0 {
            return Err(os_error("sizing the shared ring"));
        }
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) != 0 {
            return Err(os_error("sealing the shared ring"));
        }
    }
    let memory = Mapping::map(&fd)?;
    let name = crate::auth::random_u64();
    memory.name().store(name, Ordering::Release);
    let offer = RingOffer { fd: fd.as_raw_fd(), bytes: RING_BYTES as u64, name };
    Ok((fd, RingServerMemory(memory), offer))
}

/// The decode's mapping of a ring it created, until a server takes it.
pub struct RingServerMemory(Mapping);

/// Takes the ring `offer` names in process `pid` (the decode) and maps it, for the prefill's side. Refused unless
/// it is a memfd sealed against shrinking, of [`RING_BYTES`] (a file the decode could cut short would kill this
/// process with SIGBUS at the next copy into it), that holds the offer's name.
pub fn take(pid: libc::pid_t, offer: RingOffer) -> Result<RingWriter> {
    if offer.bytes != RING_BYTES as u64 || offer.fd < 0 {
        return Err(Error::protocol(format!("the decode offers a ring of {} bytes at descriptor {} (expected {RING_BYTES})", offer.bytes, offer.fd)));
    }
    // SAFETY: plain system calls; each descriptor returned is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(os_error("opening the decode process"));
    }
    // SAFETY: `pidfd` was just returned to this process and is owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), offer.fd, 0) };
    if raw < 0 {
        return Err(os_error("taking the decode's shared ring"));
    }
    // SAFETY: a new descriptor of this process, owned by nothing else. pidfd_getfd sets close-on-exec.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: reads the descriptor's seals and size into locals.
    let (seals, size) = unsafe {
        let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
        let mut st: libc::stat = std::mem::zeroed();
        let size = if libc::fstat(fd.as_raw_fd(), &mut st) == 0 { st.st_size as i64 } else { -1 };
        (seals, size)
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 || size != RING_BYTES as i64 {
        return Err(Error::protocol(format!("the decode's ring is not a sealed memfd of {RING_BYTES} bytes (seals {seals}, {size} bytes)")));
    }
    let mem = Mapping::map(&fd)?;
    if mem.name().load(Ordering::Acquire) != offer.name {
        return Err(Error::protocol("the decode's descriptor holds another ring than the one its welcome named"));
    }
    Ok(RingWriter { mem, posted: 0, taken: 0, header: Vec::new(), chunk: Vec::new(), seq: 0 })
}

/// The prefill's side of a ring.
pub struct RingWriter {
    mem: Mapping,
    /// Slots posted so far (this side's own count; the word in the ring is only told it).
    posted: u32,
    /// Slots the decode has taken, as far as this side has seen (never believed to go back).
    taken: u32,
    header: Vec<u8>,
    chunk: Vec<Run>,
    seq: u64,
}

impl RingWriter {
    /// Whether a block of `per_block` bytes (every tensor) fits a slot.
    pub fn fits(per_block: u64) -> bool {
        per_block + (frame::WRITE_HEADER_LEN + frame::RUN_LEN) as u64 <= SLOT_BYTES as u64
    }

    /// Posts an empty slot and waits for the decode to take it: from then on the decode holds no descriptor of
    /// the ring, and this side knows it serves.
    pub fn claim(&mut self, cache: &CacheLayout, stall: Duration, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        self.chunk.clear();
        self.seq += 1;
        self.room_for_one(stall, alive)?;
        self.fill(cache, 0, self.seq);
        self.post();
        self.until_taken(0, stall, alive)
    }

    fn post(&mut self) {
        self.posted = self.posted.wrapping_add(1);
        self.mem.word(Word::Posted).store(self.posted, Ordering::Release);
        wake(self.mem.word(Word::Posted));
    }

    /// Moves the plan's blocks into the decode through the ring; returns once the decode has copied every one
    /// into its cache. Fails with `TIMEOUT` where the decode takes nothing for `stall`, and as `alive` says (it
    /// is asked while the decode takes nothing: a decode that died never answers).
    pub fn write(&mut self, cache: &CacheLayout, plan: &BlockPlan, stall: Duration, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        let per_block = cache.layer_block_bytes();
        let capacity = (SLOT_BYTES - frame::WRITE_HEADER_LEN) as u64;
        if !RingWriter::fits(per_block) {
            return Err(Error::new(ErrorCode::Internal, format!("a block of {per_block} bytes is larger than a ring slot")));
        }
        self.seq += 1;
        let (layer, seq) = (plan.layer(), self.seq);
        let mut runs = plan.runs().iter().copied();
        let mut rest: Option<Run> = runs.next();
        while rest.is_some() {
            // The next slot's runs: as many blocks as fit, a run cut where the slot fills.
            self.chunk.clear();
            let mut room = capacity;
            while let Some(run) = rest {
                let fit = ((room.saturating_sub(frame::RUN_LEN as u64)) / per_block).min(run.count as u64) as u32;
                if fit == 0 {
                    break;
                }
                self.chunk.push(Run { local: run.local, remote: run.remote, count: fit });
                room -= frame::RUN_LEN as u64 + fit as u64 * per_block;
                rest = if fit == run.count { runs.next() } else { Some(Run { local: run.local + fit, remote: run.remote + fit, count: run.count - fit }) };
            }
            self.room_for_one(stall, alive)?;
            self.fill(cache, layer, seq);
            self.post();
        }
        self.until_taken(0, stall, alive)
    }

    /// Writes the slot `posted` names: the header and run table of `self.chunk`, then its blocks.
    fn fill(&mut self, cache: &CacheLayout, layer: u32, seq: u64) {
        let tensors = cache.tensors();
        let blocks: u64 = self.chunk.iter().map(|r| r.count as u64).sum();
        let payload_bytes = blocks * cache.layer_block_bytes();
        let header = WriteHeader { layer, runs: self.chunk.len() as u32, tensors: tensors.bits(), part: 0, parts: 1, seq, payload_bytes };
        header.encode_with_runs(&self.chunk, &mut self.header);
        let slot = self.mem.slot(self.posted);
        // SAFETY: the header and run table, then the payload, fit the slot (the chunk was cut to its capacity);
        // the slot is this side's until it is posted (the decode took it, `room_for_one`); the sources are the
        // plan's blocks, inside the cache (its ids were checked against the block count).
        unsafe {
            std::ptr::copy_nonoverlapping(self.header.as_ptr(), slot, self.header.len());
            let mut at = self.header.len();
            plan::for_each_segment(&self.chunk, tensors, |t| cache.block_bytes(t), SliceGeometry::WHOLE, |s| {
                std::ptr::copy_nonoverlapping((cache.addr(s.tensor, layer) + s.local) as *const u8, slot.add(at), s.len as usize);
                at += s.len as usize;
            });
        }
    }

    /// Waits until a slot is free.
    fn room_for_one(&mut self, stall: Duration, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        self.until_taken(SLOTS - 1, stall, alive)
    }

    /// Waits until at most `pending` posted slots are left for the decode to take.
    fn until_taken(&mut self, pending: u32, stall: Duration, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        let mut progress = Instant::now();
        loop {
            let taken = self.mem.word(Word::Taken).load(Ordering::Acquire);
            match self.mem.word(Word::Stopped).load(Ordering::Acquire) {
                0 => {}
                code if ErrorCode::from_wire(code) == ErrorCode::Protocol => {
                    return Err(Error::protocol("the decode refused a slot of the shared ring and stopped it (see its log)"));
                }
                _ => return Err(Error::new(ErrorCode::Transport, "the decode stopped serving the shared ring (it closed, or cut this link off)")),
            }
            // Only forward, and never past what was posted: a decode that says otherwise is not believed.
            if taken.wrapping_sub(self.taken) > self.posted.wrapping_sub(self.taken) {
                return Err(Error::protocol(format!("the decode's ring says {taken} slots taken, where {} were and {} are posted", self.taken, self.posted)));
            }
            if taken != self.taken {
                (self.taken, progress) = (taken, Instant::now());
            }
            if self.posted.wrapping_sub(taken) <= pending {
                return Ok(());
            }
            if progress.elapsed() >= stall {
                return Err(Error::new(ErrorCode::Timeout, format!("the decode took nothing from the shared ring for {} ms", stall.as_millis())));
            }
            wait(self.mem.word(Word::Taken), taken, SPIN, NAP);
            if self.mem.word(Word::Taken).load(Ordering::Acquire) == taken {
                alive()?;
            }
        }
    }
}

/// What a server copies a slot's blocks into, and what it checks them against.
pub struct RingSession {
    pub cache: Arc<CacheLayout>,
    pub tensors: TensorSet,
    pub geometry: SliceGeometry,
    pub peer: String,
    pub log: Arc<Logger>,
}

/// The decode's side of a ring: a thread that copies each posted slot into the cache.
pub struct RingServer {
    mem: Arc<Mapping>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RingServer {
    /// Serves `memory` (whose memfd is `fd`, kept open until the prefill has posted once, or for `claim_within`
    /// at most) for `session`.
    pub fn start(memory: RingServerMemory, fd: OwnedFd, claim_within: Duration, session: RingSession) -> Result<RingServer> {
        let mem = Arc::new(memory.0);
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (mem.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kvtransfer shm ring".into())
            .stack_size(256 << 10)
            .spawn(move || {
                // A panic (a bug) still tells the prefill, which would otherwise wait out its stall.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&m, fd, claim_within, &s, &session))).is_err() {
                    m.word(Word::Stopped).store(ErrorCode::Transport.to_wire(), Ordering::Release);
                    wake(m.word(Word::Taken));
                }
            })
            .map_err(|e| Error::io("starting the shared ring's thread", e))?;
        Ok(RingServer { mem, stop, thread: Some(thread) })
    }

    /// Stops serving: once this returns, nothing more of the ring lands in the cache, and the prefill's writes
    /// fail (`TRANSPORT`).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        wake(self.mem.word(Word::Posted));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RingServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's loop: takes slots in order until stopped, or until one fails its check.
fn serve(mem: &Mapping, fd: OwnedFd, claim_within: Duration, stop: &AtomicBool, session: &RingSession) {
    let mut fd = Some(fd);
    let claim_by = Instant::now() + claim_within;
    let (posted_word, taken_word) = (mem.word(Word::Posted), mem.word(Word::Taken));
    let mut taken = 0u32;
    let mut reader = SlotReader::default();
    // Polls only while a write is under way (a slot was taken since the last sleep): an idle ring only sleeps.
    let mut busy = false;
    let verdict = loop {
        if stop.load(Ordering::Acquire) {
            break ErrorCode::Transport;
        }
        let posted = posted_word.load(Ordering::Acquire);
        if posted == taken {
            // A prefill that has not claimed the ring by now never will (it could not take it): nobody else may.
            if fd.is_some() && Instant::now() >= claim_by {
                fd = None;
            }
            wait(posted_word, taken, if busy { SPIN } else { Duration::ZERO }, NAP);
            busy = false;
            continue;
        }
        busy = true;
        // The prefill has the ring: nobody else may take it from here on.
        fd = None;
        if posted.wrapping_sub(taken) > SLOTS {
            session.log.error_from(&session.peer, format!("{} posted {posted} slots of the shared ring where {taken} were taken: stopped", session.peer));
            break ErrorCode::Protocol;
        }
        // SAFETY: a slot of the ring's mapping, which lives as long as `mem`.
        if let Err(e) = unsafe { reader.copy_out(mem.slot(taken), session) } {
            session.log.error_from(&session.peer, format!("refused a write from {} through the shared ring: {e}", session.peer));
            break ErrorCode::Protocol;
        }
        taken = taken.wrapping_add(1);
        taken_word.store(taken, Ordering::Release);
        wake(taken_word);
    };
    drop(fd);
    mem.word(Word::Stopped).store(verdict.to_wire(), Ordering::Release);
    wake(taken_word);
}

/// Checks slots and copies their blocks into the cache; holds its own copies of each slot's header and run table.
#[derive(Default)]
pub struct SlotReader {
    table: Vec<u8>,
    runs: Vec<Run>,
    sorted: Vec<(u32, u32)>,
}

impl SlotReader {
    /// [`SlotReader::copy_out`] of a slot's bytes held in this process (the fuzz target's way in).
    pub fn check_and_copy(&mut self, slot: &[u8], session: &RingSession) -> Result<()> {
        assert_eq!(slot.len(), SLOT_BYTES, "a whole slot");
        // SAFETY: SLOT_BYTES readable bytes, checked above.
        unsafe { self.copy_out(slot.as_ptr(), session) }
    }

    /// Checks the slot at `slot` and copies its blocks into the cache.
    ///
    /// # Safety
    /// `slot` points to [`SLOT_BYTES`] bytes that stay readable during the call (another process may change
    /// them meanwhile).
    unsafe fn copy_out(&mut self, slot: *const u8, session: &RingSession) -> Result<()> {
        let cache = &*session.cache;
        let mut raw = [0u8; frame::WRITE_HEADER_LEN];
        // SAFETY: the header's bytes are inside the slot; copied before anything is read from them, so the
        // prefill cannot change what was checked.
        unsafe { std::ptr::copy_nonoverlapping(slot, raw.as_mut_ptr(), raw.len()) };
        let header = WriteHeader::decode(&raw)?;
        let table_bytes = header.runs as usize * frame::RUN_LEN;
        if header.parts != 1 || frame::WRITE_HEADER_LEN + table_bytes > SLOT_BYTES {
            return Err(Error::protocol(format!("a slot claims {} runs in piece {} of {}", header.runs, header.part, header.parts)));
        }
        self.table.resize(table_bytes, 0);
        // SAFETY: the table lies inside the slot (checked above); copied as the header was.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(frame::WRITE_HEADER_LEN), self.table.as_mut_ptr(), table_bytes) };
        frame::decode_runs(&self.table, &mut self.runs);
        header.check(&self.runs, cache, session.tensors, session.geometry, &mut self.sorted)?;
        let payload_at = frame::WRITE_HEADER_LEN + table_bytes;
        if payload_at as u64 + header.payload_bytes > SLOT_BYTES as u64 {
            return Err(Error::protocol(format!("a slot claims {} payload bytes, past its end", header.payload_bytes)));
        }
        let geometry = session.geometry;
        let slice = |t| cache.block_bytes(t) / geometry.ratio as u64;
        let mut at = payload_at;
        // SAFETY: `check` proved every run inside [0, block_number) of this cache, so each segment is a slice of a
        // block of it (see `plan::for_each_segment`), which the layout's owner promised may be written; the
        // segments add up to the payload's bytes, which lie inside the slot (checked above). The prefill may
        // change the payload while it is copied: its own bytes, torn.
        unsafe {
            plan::for_each_segment(&self.runs, session.tensors, slice, geometry, |s| {
                std::ptr::copy_nonoverlapping(slot.add(at), (cache.addr(s.tensor, header.layer) + s.remote) as *mut u8, s.len as usize);
                at += s.len as usize;
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::memory::CacheSpec;

    /// Two layers of keys and values, `blocks` blocks of `bytes` each, in buffers the test owns.
    struct Buffers {
        memory: Vec<Vec<u8>>,
        layout: Arc<CacheLayout>,
    }

    impl Buffers {
        fn new(blocks: u32, bytes: u64, seed: u8) -> Buffers {
            let mut memory: Vec<Vec<u8>> = (0..4).map(|i| (0..blocks as usize * bytes as usize).map(|b| (b * 31 + b / 977 + i * 7) as u8 ^ seed).collect()).collect();
            let addr = |m: &mut Vec<u8>| m.as_mut_ptr() as u64;
            let (k0, k1, v0, v1) = {
                let [a, b, c, d] = &mut memory[..] else { unreachable!() };
                (addr(a), addr(b), addr(c), addr(d))
            };
            // SAFETY: four buffers of blocks × bytes each, owned by the returned value for as long as the layout.
            let layout = unsafe { CacheLayout::new(CacheSpec { key: vec![k0, k1], value: vec![v0, v1], block_number: blocks, block_bytes: bytes, ..Default::default() }) }.unwrap();
            Buffers { memory, layout: Arc::new(layout) }
        }

        /// Block `id` of tensor `t` (0 key, 1 value) of `layer`.
        fn block(&self, t: usize, layer: usize, id: u32) -> &[u8] {
            let bytes = self.layout.block_bytes(crate::memory::Tensor::Key) as usize;
            &self.memory[t * 2 + layer][id as usize * bytes..(id as usize + 1) * bytes]
        }
    }

    fn session(cache: &Arc<CacheLayout>) -> RingSession {
        RingSession {
            cache: cache.clone(),
            tensors: cache.tensors(),
            geometry: SliceGeometry::WHOLE,
            peer: "test".into(),
            log: Arc::new(Logger::new(&Config::default(), "test").unwrap()),
        }
    }

    /// A ring served for `dst`, and this process's writer of it (taken as a prefill takes it).
    fn ring(dst: &Buffers) -> (RingWriter, RingServer) {
        let (fd, memory, offer) = create().unwrap();
        let writer = take(std::process::id() as libc::pid_t, offer).unwrap();
        (writer, RingServer::start(memory, fd, STALL, session(&dst.layout)).unwrap())
    }

    fn plan(src: &Buffers, local: &[u32], remote: &[u32], layer: u32) -> BlockPlan {
        let mut plan = BlockPlan::default();
        plan.build(local, remote, layer, 2, src.layout.block_number(), src.layout.block_number()).unwrap();
        plan
    }

    const STALL: Duration = Duration::from_secs(5);

    #[test]
    fn writes_of_many_slots_land_every_byte() {
        // 1000-byte blocks (no multiple of anything), 700 of 900 per call: 1.4 MB, six slots a call, so three
        // calls go round the ring of eight twice; the second call's runs are long, and cut where slots fill.
        let (src, dst) = (Buffers::new(900, 1000, 1), Buffers::new(900, 1000, 2));
        let (mut writer, _server) = ring(&dst);
        for (call, layer) in [0u32, 1, 0].into_iter().enumerate() {
            let scattered = |i: u32, a: u32, b: u32| if call == 1 { (i + b) % 900 } else { (i * a + b) % 900 };
            let local: Vec<u32> = (0..700).map(|i| scattered(i, 7, call as u32)).collect();
            let remote: Vec<u32> = (0..700).map(|i| scattered(i, 11, 5 * call as u32)).collect();
            writer.write(&src.layout, &plan(&src, &local, &remote, layer), STALL, &|| Ok(())).unwrap();
            for t in 0..2 {
                for (l, r) in local.iter().zip(&remote) {
                    assert!(dst.block(t, layer as usize, *r) == src.block(t, layer as usize, *l), "call {call} tensor {t}: {l} -> {r}");
                }
            }
        }
        assert_eq!(writer.posted, 18);
    }

    #[test]
    fn a_claim_is_taken_and_closes_the_decodes_descriptor() {
        let (src, dst) = (Buffers::new(8, 100, 1), Buffers::new(8, 100, 2));
        let (fd, memory, offer) = create().unwrap();
        let raw = fd.as_raw_fd();
        let mut writer = take(std::process::id() as libc::pid_t, offer).unwrap();
        let _server = RingServer::start(memory, fd, STALL, session(&dst.layout)).unwrap();
        assert!(names_the_ring(raw, &writer), "the decode holds its descriptor until the claim");
        let before = dst.memory.clone();
        writer.claim(&src.layout, STALL, &|| Ok(())).unwrap();
        assert!(dst.memory == before, "an empty slot wrote nothing");
        assert!(!names_the_ring(raw, &writer), "the decode's descriptor is closed once the ring is claimed");
        // Unclaimed, the decode lets go of it after its claim time all the same.
        let (fd, memory, offer) = create().unwrap();
        let raw = fd.as_raw_fd();
        let writer = take(std::process::id() as libc::pid_t, offer).unwrap();
        let _server = RingServer::start(memory, fd, Duration::from_millis(200), session(&dst.layout)).unwrap();
        assert!(names_the_ring(raw, &writer));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!names_the_ring(raw, &writer), "the decode's descriptor outlived its claim time");
    }

    /// Whether descriptor `raw` of this process is (still) the memfd `writer` maps: the same file, by its inode
    /// (a number alone may have been reused by another test's descriptor).
    fn names_the_ring(raw: i32, writer: &RingWriter) -> bool {
        // SAFETY: `stat` is plain integers, for which all zeros is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the local `st`; a closed descriptor fails and writes nothing.
        if unsafe { libc::fstat(raw, &mut st) } != 0 {
            return false;
        }
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", writer.mem.base as usize);
        let line = maps.lines().find(|l| l.starts_with(&start)).expect("the ring's mapping");
        line.split_whitespace().nth(4) == Some(st.st_ino.to_string().as_str())
    }

    /// Posts one slot by hand: `header` with `runs`, then `payload` bytes of 0xEE (at most what the slot holds).
    fn post(writer: &mut RingWriter, header: WriteHeader, runs: &[Run], payload: usize) {
        header.encode_with_runs(runs, &mut writer.header);
        let slot = writer.mem.slot(writer.posted);
        let payload = payload.min(SLOT_BYTES - writer.header.len());
        // SAFETY: the header, run table and payload are cut to the slot's size.
        unsafe {
            std::ptr::copy_nonoverlapping(writer.header.as_ptr(), slot, writer.header.len());
            std::ptr::write_bytes(slot.add(writer.header.len()), 0xEE, payload);
        }
        writer.post();
    }

    #[test]
    fn a_slot_that_lies_lands_nothing_and_stops_the_ring() {
        // 300 blocks of 1000 bytes: a run of 200 blocks (400 KB of keys and values) is more than a slot holds.
        let good = WriteHeader { layer: 1, runs: 1, tensors: 0b11, part: 0, parts: 1, seq: 1, payload_bytes: 2 * 4 * 1000 };
        let run = Run { local: 0, remote: 10, count: 4 };
        let lies: [(&str, WriteHeader, Run); 7] = [
            ("a layer past the cache's", WriteHeader { layer: 2, ..good }, run),
            ("a run past the cache's blocks", good, Run { remote: 298, ..run }),
            ("more payload than its blocks", WriteHeader { payload_bytes: good.payload_bytes + 100, ..good }, run),
            ("tensors the handshake did not agree", WriteHeader { tensors: 0b1, payload_bytes: 4000, ..good }, run),
            ("a piece of a split write", WriteHeader { part: 1, parts: 2, ..good }, run),
            ("a run table longer than its slot", WriteHeader { runs: (SLOT_BYTES / frame::RUN_LEN) as u32, ..good }, run),
            ("a payload past the slot's end", WriteHeader { payload_bytes: 2 * 200 * 1000, ..good }, Run { count: 200, ..run }),
        ];
        for (lie, header, run) in lies {
            let dst = Buffers::new(300, 1000, 2);
            let before = dst.memory.clone();
            let (mut writer, _server) = ring(&dst);
            post(&mut writer, header, &[run], header.payload_bytes as usize);
            let e = writer.until_taken(0, STALL, &|| Ok(())).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Protocol, "{lie}: {e}");
            assert!(dst.memory == before, "{lie}: the cache changed");
            // The ring stays stopped: a real write fails too.
            let src = Buffers::new(300, 1000, 1);
            let e = writer.write(&src.layout, &plan(&src, &[1], &[1], 0), STALL, &|| Ok(())).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Protocol, "{lie}: {e}");
        }
        // The same slot, told the truth, lands.
        let dst = Buffers::new(300, 1000, 2);
        let (mut writer, _server) = ring(&dst);
        post(&mut writer, good, &[run], 8000);
        writer.until_taken(0, STALL, &|| Ok(())).unwrap();
        assert!(dst.block(1, 1, 13).iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn a_decode_whose_counts_lie_is_not_believed() {
        let src = Buffers::new(64, 512, 1);
        let (fd, _memory, offer) = create().unwrap();
        let mut writer = take(std::process::id() as libc::pid_t, offer).unwrap();
        // Taken past what was posted, then (once one slot was taken) going back: neither holds a write up.
        for (posted_before, lie) in [(0u32, 3u32), (1, u32::MAX)] {
            writer.posted = posted_before;
            writer.taken = posted_before;
            writer.mem.word(Word::Taken).store(lie, Ordering::Release);
            let started = Instant::now();
            let e = writer.write(&src.layout, &plan(&src, &[1], &[1], 0), STALL, &|| Ok(())).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Protocol, "{e}");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        // A verdict of its own choosing is read as a stop, not passed on.
        writer.mem.word(Word::Taken).store(writer.posted, Ordering::Release);
        writer.taken = writer.posted;
        writer.mem.word(Word::Stopped).store(ErrorCode::Revoked.to_wire(), Ordering::Release);
        let e = writer.write(&src.layout, &plan(&src, &[1], &[1], 0), STALL, &|| Ok(())).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Transport, "{e}");
        drop(fd);
    }

    #[test]
    fn a_stopped_server_fails_the_next_write_at_once() {
        let (src, dst) = (Buffers::new(64, 512, 1), Buffers::new(64, 512, 2));
        let (mut writer, mut server) = ring(&dst);
        writer.write(&src.layout, &plan(&src, &[1, 2], &[3, 4], 0), STALL, &|| Ok(())).unwrap();
        server.stop();
        let before = dst.memory.clone();
        let started = Instant::now();
        let e = writer.write(&src.layout, &plan(&src, &[5], &[6], 1), STALL, &|| Ok(())).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Transport, "{e}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(dst.memory == before, "a stopped ring wrote into the cache");
    }

    #[test]
    fn a_decode_that_takes_nothing_times_out_or_is_found_dead() {
        let (src, _dst) = (Buffers::new(64, 512, 1), Buffers::new(64, 512, 2));
        let (_fd, _memory, offer) = create().unwrap();
        let mut writer = take(std::process::id() as libc::pid_t, offer).unwrap();
        let started = Instant::now();
        let e = writer.write(&src.layout, &plan(&src, &[1], &[1], 0), Duration::from_millis(300), &|| Ok(())).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
        // Asked while nothing is taken: a decode found gone ends the write long before its stall.
        let started = Instant::now();
        let gone = || Err(Error::new(ErrorCode::Transport, "the decode process is gone"));
        let e = writer.write(&src.layout, &plan(&src, &[1], &[1], 0), STALL, &gone).unwrap_err();
        assert!(e.message().contains("is gone") && started.elapsed() < Duration::from_secs(1), "{e} after {:?}", started.elapsed());
    }

    #[test]
    fn only_a_sealed_memfd_of_the_ring_size_and_name_is_taken() {
        let me = std::process::id() as libc::pid_t;
        let memfd = |bytes: usize, seals: i32| {
            // SAFETY: a new memfd, owned at once, sized and sealed as asked.
            unsafe {
                let fd = OwnedFd::from_raw_fd(libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING));
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t), 0);
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
                fd
            }
        };
        let offer = |fd: &OwnedFd| RingOffer { fd: fd.as_raw_fd(), bytes: RING_BYTES as u64, name: 0 };
        let mut pipe = [0; 2];
        // SAFETY: a new pipe, its ends owned at once.
        let pipe = unsafe {
            assert_eq!(libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1]))
        };
        let (unsealed, short) = (memfd(RING_BYTES, 0), memfd(4096, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW));
        for (what, fd) in [("an unsealed memfd", &unsealed), ("a sealed memfd of 4 KiB", &short), ("a pipe", &pipe.0)] {
            let e = take(me, offer(fd)).err().unwrap();
            assert_eq!(e.code(), ErrorCode::Protocol, "{what}: {e}");
            assert!(e.message().contains("sealed memfd"), "{what}: {e}");
        }
        // A real ring, offered with another size or another name.
        let (fd, _memory, real) = create().unwrap();
        let e = take(me, RingOffer { bytes: 4096, ..real }).err().unwrap();
        assert_eq!(e.code(), ErrorCode::Protocol, "{e}");
        let e = take(me, RingOffer { name: real.name ^ 1, ..real }).err().unwrap();
        assert!(e.code() == ErrorCode::Protocol && e.message().contains("another ring"), "{e}");
        let e = take(me, RingOffer { fd: 1 << 20, ..real }).err().unwrap();
        assert_ne!(e.code(), ErrorCode::Protocol, "a descriptor that is not there: {e}");
        assert!(take(me, real).is_ok());
        // SAFETY: the ring's descriptor: a shrink is refused by its seal.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
    }
}
