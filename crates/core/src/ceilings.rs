//! What this machine can do without kvtransfer, for `kvtransfer bench` to put beside its own rows: one plain TCP
//! stream of the same bytes over loopback, and `memcpy` of the same scattered blocks (on one thread, and split
//! over threads as the shared-memory transport splits a write), and on a GPU one large device copy of the same
//! bytes (the ceiling of CUDA IPC). Each returns the time of every timed call, and
//! blocks its caller while it runs; memory is reserved fallibly, so a size the machine cannot hold is an error.

use crate::error::{Error, ErrorCode, Result};
use crate::memory::HostAllocation;
use crate::transport::shm::copy::{threads as shm_threads, BYTES_PER_THREAD};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Timed calls at most, and untimed ones.
pub const MAX_CALLS: usize = 10_000;
pub const MAX_WARMUP: usize = 1_000;
/// The largest write of the stream, and the most bytes one call may move.
pub const MAX_CHUNK: usize = 16 << 20;
pub const MAX_CALL_BYTES: usize = 64 << 30;
/// The untimed calls before the timed ones: at least `calls`, going on (where there are any) until `at_least` has
/// passed, as `kvtransfer bench`'s own rows warm up (a thread started for the measure may share the caller's CPU
/// until the scheduler moves it, tens of ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmup {
    pub calls: usize,
    pub at_least: Duration,
}

impl Warmup {
    /// Whether the warm-up goes on after `done` calls, begun at `since`.
    fn goes_on(&self, done: usize, since: Instant) -> bool {
        done < self.calls || (self.calls > 0 && since.elapsed() < self.at_least)
    }

    /// Runs `call` for as long as the warm-up goes on; returns how many calls it made.
    fn run<E>(&self, mut call: impl FnMut(usize) -> std::result::Result<(), E>) -> std::result::Result<usize, E> {
        let (since, mut done) = (Instant::now(), 0);
        while self.goes_on(done, since) {
            call(done)?;
            done += 1;
        }
        Ok(done)
    }

    fn checked(self) -> Result<Warmup> {
        check("warmup", self.calls, 0, MAX_WARMUP)?;
        if self.at_least > MAX_WARMUP_TIME {
            return Err(Error::invalid(format!("a warm-up of at least {:?} is longer than {MAX_WARMUP_TIME:?}", self.at_least)));
        }
        Ok(self)
    }
}

/// The longest a warm-up may be made to last.
pub const MAX_WARMUP_TIME: Duration = Duration::from_secs(60);

/// How long the stream may go without progress before it is an error.
const STALL: Duration = Duration::from_secs(30);

/// The threads the shared-memory transport splits one large write over, here.
pub fn copy_threads() -> usize {
    shm_threads()
}

fn check(name: &str, v: usize, min: usize, max: usize) -> Result<usize> {
    if (min..=max).contains(&v) {
        return Ok(v);
    }
    Err(Error::invalid(format!("{name} must be from {min} to {max}, not {v}")))
}

/// A zeroed buffer of `len` bytes, mapped as the bench's caches are (huge pages advised), or an error where the
/// machine cannot give it (never an abort).
fn buffer(len: usize) -> Result<HostAllocation> {
    HostAllocation::new(len).map_err(|e| Error::new(ErrorCode::Unavailable, e.to_string()))
}

/// One TCP stream over loopback moving `bytes` per call in writes of `chunk` bytes, from memory as large as a
/// call into memory as large as a call (the same bytes as a write moves, from and into memory as cold as a
/// cache's, not one small buffer the CPU's cache keeps hot): the time of each of `calls` calls (after the
/// `warmup`), from the first byte written to the receiver's acknowledgement that the last one arrived.
pub fn tcp_stream(bytes: usize, chunk: usize, warmup: Warmup, calls: usize) -> Result<Vec<Duration>> {
    let (bytes, calls, warmup) = (check("bytes", bytes, 1, MAX_CALL_BYTES)?, check("calls", calls, 1, MAX_CALLS)?, warmup.checked()?);
    let chunk = check("chunk", chunk, 1, MAX_CHUNK)?.min(bytes);
    let io = |what: &'static str| move |e: std::io::Error| Error::io(what, e);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding a loopback port"))?;
    // Connected first (the backlog completes it), then taken from the listener: a stranger that connected to the
    // port meanwhile is turned away, never served in our place.
    let mut sender = TcpStream::connect(listener.local_addr().map_err(io("reading the port"))?).map_err(io("connecting over loopback"))?;
    let ours = sender.local_addr().map_err(io("reading the address"))?;
    let mut receiver = (0..64)
        .find_map(|_| listener.accept().ok().filter(|(_, from)| *from == ours).map(|(s, _)| s))
        .ok_or_else(|| Error::new(ErrorCode::Transport, "the loopback stream's own connection never arrived"))?;
    for s in [&sender, &receiver] {
        s.set_nodelay(true).and_then(|()| s.set_read_timeout(Some(STALL))).and_then(|()| s.set_write_timeout(Some(STALL))).map_err(io("setting up the stream"))?;
    }
    let mut data = buffer(bytes)?;
    data.as_mut_slice().fill(0x5a);
    let mut sink = buffer(bytes)?;
    // Touched before timing, as the bench's caches are.
    sink.as_mut_slice().fill(0);
    // Calls until the sender closes the stream, which it does between two calls.
    let reading = std::thread::spawn(move || -> std::io::Result<()> {
        loop {
            let mut at = 0;
            while at < bytes {
                let n = receiver.read(&mut sink.as_mut_slice()[at..bytes.min(at + chunk)])?;
                match n {
                    0 if at == 0 => return Ok(()),
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    _ => at += n,
                }
            }
            receiver.write_all(&[1])?;
        }
    });
    let mut times = Vec::new();
    let sent = (|| -> std::io::Result<()> {
        let mut ack = [0u8; 1];
        let mut call = || -> std::io::Result<Duration> {
            let start = Instant::now();
            for piece in data.as_slice().chunks(chunk) {
                sender.write_all(piece)?;
            }
            sender.read_exact(&mut ack)?;
            Ok(start.elapsed())
        };
        warmup.run(|_| call().map(drop))?;
        for _ in 0..calls {
            times.push(call()?);
        }
        Ok(())
    })();
    // Either side's failure ends the other within the stall timeout (or at once: the socket closes).
    drop(sender);
    let received = reading.join().map_err(|_| Error::new(ErrorCode::Internal, "the stream's receiver panicked"))?;
    sent.map_err(io("sending over the loopback stream"))?;
    received.map_err(io("receiving over the loopback stream"))?;
    Ok(times)
}

/// `memcpy` of scattered blocks, as a bench call moves them: for each of `tensors` tensors, block `local[i]` of a
/// source pool into block `remote[i]` of a destination pool, one of `layers` pools per tensor in turn (each call
/// the next layer's), on `threads` threads at most, each given at least as many bytes as the shared-memory
/// transport gives one. Returns the threads used and the time of each of `calls` calls, after the `warmup` (at
/// least one call per layer, which touch the destination's pages).
#[allow(clippy::too_many_arguments)]
pub fn scattered_copy(
    block_bytes: usize,
    local: &[u32],
    remote: &[u32],
    tensors: usize,
    layers: usize,
    threads: usize,
    warmup: Warmup,
    calls: usize,
) -> Result<(usize, Vec<Duration>)> {
    let block_bytes = check("block bytes", block_bytes, 1, MAX_CALL_BYTES)?;
    let (tensors, layers) = (check("tensors", tensors, 1, 4)?, check("layers", layers, 1, 64)?);
    let (threads, calls, warmup) = (check("threads", threads, 1, 64)?, check("calls", calls, 1, MAX_CALLS)?, warmup.checked()?);
    if local.len() != remote.len() || local.is_empty() {
        return Err(Error::invalid(format!("{} local block ids and {} remote ones: give the same number, at least one", local.len(), remote.len())));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(r) = remote.iter().find(|&&r| !seen.insert(r)) {
        return Err(Error::invalid(format!("remote block id {r} is listed twice")));
    }
    let pool = |ids: &[u32]| ids.iter().max().map_or(0, |&m| m as usize + 1);
    let call_bytes = local.len().checked_mul(block_bytes).and_then(|b| b.checked_mul(tensors)).filter(|&b| b <= MAX_CALL_BYTES);
    let call_bytes = call_bytes.ok_or_else(|| Error::invalid(format!("a call would move more than {MAX_CALL_BYTES} bytes")))?;
    let pool_bytes = |ids: &[u32]| pool(ids).checked_mul(block_bytes).ok_or_else(|| Error::invalid("a pool would not fit in memory"));
    let (src_bytes, dst_bytes) = (pool_bytes(local)?, pool_bytes(remote)?);
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for t in 0..tensors * layers {
        let mut s = buffer(src_bytes)?;
        s.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8) ^ (t as u8));
        src.push(s);
        dst.push(buffer(dst_bytes)?);
    }
    let parts = threads.min(call_bytes / BYTES_PER_THREAD).max(1);
    // Per layer, the call's copies, tensor after tensor, cut into `parts` runs of as many bytes each (every
    // block is as long as the next), built once: a call only copies.
    let mut per_layer: Vec<Vec<Vec<(&[u8], &mut [u8])>>> = Vec::with_capacity(layers);
    let mut dst_blocks: Vec<Vec<Option<&mut [u8]>>> = dst.iter_mut().map(|d| d.as_mut_slice().chunks_mut(block_bytes).map(Some).collect()).collect();
    for layer in 0..layers {
        let mut copies = Vec::with_capacity(tensors * local.len());
        for t in 0..tensors {
            let i = t * layers + layer;
            for (&l, &r) in local.iter().zip(remote) {
                let from = &src[i].as_slice()[l as usize * block_bytes..(l as usize + 1) * block_bytes];
                let to = dst_blocks[i][r as usize].take().expect("remote ids are distinct");
                copies.push((from, to));
            }
        }
        let per = copies.len().div_ceil(parts);
        let mut runs: Vec<Vec<(&[u8], &mut [u8])>> = Vec::with_capacity(parts);
        let mut copies = copies.into_iter().peekable();
        while copies.peek().is_some() {
            runs.push(copies.by_ref().take(per).collect());
        }
        per_layer.push(runs);
    }
    let mut times = Vec::with_capacity(calls);
    let mut call = |i: usize| {
        let runs = &mut per_layer[i % layers];
        let start = Instant::now();
        std::thread::scope(|scope| {
            let (mine, others) = runs.split_first_mut().expect("at least one run");
            for run in others {
                scope.spawn(move || run.iter_mut().for_each(|(from, to)| to.copy_from_slice(from)));
            }
            mine.iter_mut().for_each(|(from, to)| to.copy_from_slice(from));
        });
        start.elapsed()
    };
    // A call per layer at least, which touch the pages; the time floor only where warm-up calls were asked for.
    let touching = Warmup { calls: warmup.calls.max(layers), at_least: if warmup.calls > 0 { warmup.at_least } else { Duration::ZERO } };
    let mut i = touching.run(|i| {
        call(i);
        Ok::<(), ()>(())
    }).expect("a copy cannot fail");
    for _ in 0..calls {
        times.push(call(i));
        i += 1;
    }
    drop((per_layer, dst_blocks));
    // The destination holds what the pairs say (checked once, outside the timing).
    for (i, d) in dst.iter().enumerate() {
        let (l, r) = (local[0] as usize, remote[0] as usize);
        if d.as_slice()[r * block_bytes..(r + 1) * block_bytes] != src[i].as_slice()[l * block_bytes..(l + 1) * block_bytes] {
            return Err(Error::new(ErrorCode::Internal, "the copy did not land where its pair says"));
        }
    }
    Ok((parts, times))
}

/// One device copy of `bytes` from memory of GPU `from` into memory of GPU `to` (the same GPU, or a peer: what
/// CUDA IPC between the two does at best), on a stream of `from`: the time of each of `calls` calls, after
/// the `warmup`. `UNAVAILABLE` without a CUDA driver or where the memory cannot be had.
pub fn device_copy(from: u32, to: u32, bytes: usize, warmup: Warmup, calls: usize) -> Result<Vec<Duration>> {
    use crate::cuda::{CopyStream, Gpu};
    use crate::memory::DeviceAllocation;
    let (bytes, calls, warmup) = (check("bytes", bytes, 1, MAX_CALL_BYTES)?, check("calls", calls, 1, MAX_CALLS)?, warmup.checked()?);
    let (src, dst) = (DeviceAllocation::new(from, bytes)?, DeviceAllocation::new(to, bytes)?);
    let stream = CopyStream::new(Gpu::get(from)?)?;
    warmup.run(|_| stream.copy(&dst.0, &src.0))?;
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        stream.copy(&dst.0, &src.0)?;
        times.push(start.elapsed());
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Warmup = Warmup { calls: 0, at_least: Duration::ZERO };

    #[test]
    fn a_warm_up_makes_its_calls_and_lasts_its_time_and_none_makes_none() {
        let count = |w: Warmup| w.run(|_| Ok::<(), ()>(())).unwrap();
        assert_eq!(count(NONE), 0);
        assert_eq!(count(Warmup { calls: 0, at_least: Duration::from_secs(60) }), 0, "no calls asked: no time either");
        assert_eq!(count(Warmup { calls: 3, at_least: Duration::ZERO }), 3);
        let started = Instant::now();
        assert!(count(Warmup { calls: 1, at_least: Duration::from_millis(30) }) > 1);
        assert!(started.elapsed() >= Duration::from_millis(30));
        let failing = Warmup { calls: 5, at_least: Duration::ZERO }.run(|i| if i == 2 { Err(i) } else { Ok(()) });
        assert_eq!(failing, Err(2), "a failed call ends it");
        assert_eq!(Warmup { calls: 1, at_least: MAX_WARMUP_TIME * 2 }.checked().unwrap_err().code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn a_stream_moves_its_bytes_each_call() {
        let times = tcp_stream(3 << 20, 256 << 10, Warmup { calls: 1, at_least: Duration::ZERO }, 4).unwrap();
        assert_eq!(times.len(), 4);
        assert!(times.iter().all(|t| !t.is_zero()));
        for (bytes, chunk, calls) in [(0, 1, 1), (1, 0, 1), (1, 1, 0), (1, MAX_CHUNK + 1, 1)] {
            assert_eq!(tcp_stream(bytes, chunk, NONE, calls).unwrap_err().code(), ErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn the_copy_lands_where_its_pairs_say_and_refuses_what_it_cannot_do() {
        let (used, times) = scattered_copy(8, &[4, 0, 2], &[1, 2, 0], 2, 2, 3, NONE, 3).unwrap();
        assert_eq!((used, times.len()), (1, 3), "a small call is one thread's");
        for bad in [
            scattered_copy(0, &[1], &[1], 1, 1, 1, NONE, 1),
            scattered_copy(8, &[1], &[], 1, 1, 1, NONE, 1),
            scattered_copy(8, &[1, 2], &[3, 3], 1, 1, 1, NONE, 1),
            scattered_copy(8, &[1], &[1], 0, 1, 1, NONE, 1),
            scattered_copy(8, &[1], &[1], 1, 1, 1, NONE, 0),
        ] {
            assert_eq!(bad.unwrap_err().code(), ErrorCode::InvalidArgument);
        }
        // Pools the machine cannot hold: an error, not an abort.
        let huge = scattered_copy(1 << 30, &[u32::MAX], &[u32::MAX], 1, 1, 1, NONE, 1);
        assert_eq!(huge.unwrap_err().code(), ErrorCode::Unavailable);
        // A large call is split over threads, as shm splits it.
        let ids: Vec<u32> = (0..64).collect();
        let (used, _) = scattered_copy(256 << 10, &ids, &ids, 2, 1, 4, NONE, 1).unwrap();
        assert_eq!(used, 4.min(32 << 20 >> 22));
    }
}
