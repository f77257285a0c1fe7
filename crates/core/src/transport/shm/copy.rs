//! Copying ranges of this process into ranges of another with `process_vm_writev`: up to 1024 ranges per
//! system call, and a large write split over a few threads.
//!
//! One thread's `process_vm_writev` moves about what one core's `memcpy` does (5 GB/s on the machine the
//! README measures on), well under what the memory can take; two threads moved twice as much there. So a write
//! of at least [`BYTES_PER_THREAD`] per thread is cut into byte-balanced parts: the calling thread copies the
//! first, short-lived helpers the others, and the write returns once every part has (or the first error).

use crate::sync::lock;
use crate::iov::{advance, IoVec};
use std::io;
use std::sync::{Mutex, OnceLock};

/// Most ranges per system call (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// The least a part is worth a thread for: below this, starting one (tens of µs) costs more than it saves.
/// With the cache on transparent huge pages, a 3 MiB call of 1 KiB blocks split in two was ahead (3.12 GB/s
/// against 2.89, means of three runs; 2 KiB blocks 4.4 against 3.6); at 4 MiB a part it had measured behind.
pub const BYTES_PER_THREAD: usize = 1 << 20;

/// The most threads one write uses.
const MAX_THREADS: usize = 4;

/// Stack of a helper thread: it only makes system calls, but a panic's unwinding and backtrace need room too.
const HELPER_STACK: usize = 256 << 10;

/// How many threads a large write may use: [`MAX_THREADS`], or fewer where this process may run on fewer cores.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_THREADS))
}

/// Copies `local[i]` into `remote[i]` for every `i` (pairs of ranges of equal length) in process `pid`, with up
/// to `threads` threads, each given at least [`BYTES_PER_THREAD`]. A range may be cut in two (both lists stay
/// paired), so the lists are the caller's scratch space.
pub fn write(pid: libc::pid_t, local: &mut Vec<IoVec>, remote: &mut Vec<IoVec>, threads: usize) -> io::Result<()> {
    let total: usize = local.iter().map(|v| v.iov_len).sum();
    let parts = threads.min(total / BYTES_PER_THREAD).max(1);
    if parts == 1 {
        return write_all(pid, local, remote);
    }
    // Cut by index, so both sides must hold the same ranges' lengths (or a part could write past what was
    // checked): once per large write, next to a copy of megabytes.
    assert!(
        local.len() == remote.len() && local.iter().zip(remote.iter()).all(|(l, r)| l.iov_len == r.iov_len),
        "ranges come in pairs of equal length"
    );
    let ends = cut(local, remote, total.div_ceil(parts), parts);
    let mut parts = Vec::with_capacity(ends.len());
    let (mut local, mut remote, mut start) = (&mut local[..], &mut remote[..], 0);
    for &end in &ends {
        let (l, rest_l) = std::mem::take(&mut local).split_at_mut(end - start);
        let (r, rest_r) = std::mem::take(&mut remote).split_at_mut(end - start);
        (local, remote, start) = (rest_l, rest_r, end);
        parts.push(Mutex::new(Some(Part { local: l, remote: r })));
    }
    std::thread::scope(|scope| {
        // Each part is taken by whichever thread comes first: its helper, or this thread once done with the
        // first part (a helper that could not start, at a thread limit, or has not started yet).
        let helpers: Vec<_> = parts[1..]
            .iter()
            .map(|slot| std::thread::Builder::new().stack_size(HELPER_STACK).spawn_scoped(scope, move || take(slot).map_or(Ok(()), |p| p.write(pid))))
            .collect();
        let mut result = Ok(());
        for slot in &parts {
            if let (Ok(()), Some(part)) = (&result, take(slot)) {
                result = part.write(pid);
            }
        }
        for helper in helpers.into_iter().flatten() {
            let done = helper.join().unwrap_or_else(|_| Err(io::Error::other("a copying thread panicked")));
            result = result.and(done);
        }
        result
    })
}

fn take<'a>(slot: &Mutex<Option<Part<'a>>>) -> Option<Part<'a>> {
    lock(&slot).take()
}

/// One thread's share of a write.
struct Part<'a> {
    local: &'a mut [IoVec],
    remote: &'a mut [IoVec],
}

// SAFETY: the ranges are plain addresses that Rust code never dereferences; only the kernel reads and writes
// through them, during the one system call the owning thread makes, and the parts of one write are disjoint
// slices of the lists.
unsafe impl Send for Part<'_> {}

impl Part<'_> {
    fn write(self, pid: libc::pid_t) -> io::Result<()> {
        write_all(pid, self.local, self.remote)
    }
}

/// Cuts the paired lists into `parts` runs of indices, each but the last holding `share` bytes, splitting a
/// pair of ranges in two where a boundary falls inside it. Returns where each part ends.
fn cut(local: &mut Vec<IoVec>, remote: &mut Vec<IoVec>, share: usize, parts: usize) -> Vec<usize> {
    let mut ends = Vec::with_capacity(parts);
    let mut i = 0;
    while ends.len() + 1 < parts {
        let mut need = share;
        while need > 0 && i < local.len() {
            let len = local[i].iov_len;
            if len > need {
                for list in [&mut *local, &mut *remote] {
                    let head = list[i];
                    let tail = IoVec { iov_base: (head.iov_base as usize + need) as *mut libc::c_void, iov_len: head.iov_len - need };
                    list[i].iov_len = need;
                    list.insert(i + 1, tail);
                }
            }
            need -= local[i].iov_len;
            i += 1;
        }
        ends.push(i);
    }
    ends.push(local.len());
    ends
}

/// Copies the ranges of `local` into the ranges of `remote` (the same bytes, split differently) in process
/// `pid`, up to 1024 ranges of each per system call.
pub fn write_all(pid: libc::pid_t, mut local: &mut [IoVec], mut remote: &mut [IoVec]) -> io::Result<()> {
    while !local.is_empty() && !remote.is_empty() {
        let (nl, nr) = (local.len().min(MAX_IOV), remote.len().min(MAX_IOV));
        // SAFETY: the local ranges are the cache's own blocks, only read; the remote ranges are written by the
        // kernel, which fails with EFAULT rather than touching anything outside the target's mappings.
        let n = unsafe { libc::process_vm_writev(pid, local.as_ptr(), nl as _, remote.as_ptr(), nr as _, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "process_vm_writev moved nothing"));
        }
        let first = advance(local, n as usize);
        local = &mut local[first..];
        let first = advance(remote, n as usize);
        remote = &mut remote[first..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iov::iovec;

    #[test]
    fn writes_ranges_split_differently_on_each_side() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 13) as u8).collect();
        let mut dst = vec![0u8; 9000];
        // 3000 ranges of 3 bytes locally, 1500 of 6 remotely (both over the 1024 limit).
        let mut local: Vec<IoVec> = (0..3000).map(|i| iovec(src.as_ptr() as u64 + i * 3, 3)).collect();
        let mut remote: Vec<IoVec> = (0..1500).map(|i| iovec(dst.as_mut_ptr() as u64 + (1499 - i) * 6, 6)).collect();
        write_all(std::process::id() as _, &mut local, &mut remote).unwrap();
        for i in 0..1500 {
            assert_eq!(dst[(1499 - i) * 6..(1500 - i) * 6], src[i * 6..i * 6 + 6]);
        }
    }

    #[test]
    fn a_bad_remote_address_is_an_error() {
        let src = [1u8; 16];
        let mut local = [iovec(src.as_ptr() as u64, 16)];
        let mut remote = [iovec(8, 16)];
        let e = write_all(std::process::id() as _, &mut local, &mut remote).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
    }

    /// Pairs of ranges over `src` and (scattered, reversed) over `dst`: one range of `big` bytes, then `n` of
    /// `small` bytes.
    fn pairs(src: &[u8], dst: &mut [u8], big: usize, small: usize, n: usize) -> (Vec<IoVec>, Vec<IoVec>) {
        let mut lens = vec![big];
        lens.extend(std::iter::repeat(small).take(n));
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        let (mut at, end) = (0, dst.len());
        for len in lens {
            local.push(iovec(src.as_ptr() as u64 + at as u64, len as u64));
            remote.push(iovec(dst.as_mut_ptr() as u64 + (end - at - len) as u64, len as u64));
            at += len;
        }
        (local, remote)
    }

    #[test]
    fn cut_balances_bytes_and_keeps_the_pairs() {
        let (src, mut dst) = (vec![0u8; 1000], vec![0u8; 1000]);
        // 700 bytes in one range, then 100 ranges of 3: three parts of 334, 334 and 332 bytes.
        let (mut local, mut remote) = pairs(&src, &mut dst, 700, 3, 100);
        let ends = cut(&mut local, &mut remote, 334, 3);
        assert_eq!(ends.len(), 3);
        assert_eq!(*ends.last().unwrap(), local.len());
        let bytes = |from: usize, to: usize| local[from..to].iter().map(|v| v.iov_len).sum::<usize>();
        assert_eq!([bytes(0, ends[0]), bytes(ends[0], ends[1]), bytes(ends[1], ends[2])], [334, 334, 332]);
        assert_eq!(local.len(), remote.len());
        for (l, r) in local.iter().zip(&remote) {
            assert_eq!(l.iov_len, r.iov_len);
        }
        // The big range was cut twice, each piece where the last ended.
        assert_eq!(local[1].iov_base as usize, local[0].iov_base as usize + 334);
        assert_eq!(remote[1].iov_base as usize, remote[0].iov_base as usize + 334);
    }

    #[test]
    fn a_large_write_split_over_threads_lands_every_byte() {
        // 3 × BYTES_PER_THREAD and a bit, as one big range and many small ones: four threads, three parts.
        let small = 1000;
        let n = 2 * BYTES_PER_THREAD / small + 17;
        let size = BYTES_PER_THREAD + 12_345 + n * small;
        let src: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut dst = vec![0u8; size];
        let (mut local, mut remote) = pairs(&src, &mut dst, BYTES_PER_THREAD + 12_345, small, n);
        let expected: Vec<(usize, usize, usize)> =
            local.iter().zip(&remote).map(|(l, r)| (l.iov_base as usize - src.as_ptr() as usize, r.iov_base as usize - dst.as_ptr() as usize, l.iov_len)).collect();
        write(std::process::id() as _, &mut local, &mut remote, 4).unwrap();
        for (from, to, len) in expected {
            assert!(src[from..from + len] == dst[to..to + len], "range at {from} ({len} bytes) landed wrong");
        }
    }

    #[test]
    #[should_panic(expected = "pairs of equal length")]
    fn lists_split_differently_are_never_cut() {
        let size = 2 * BYTES_PER_THREAD;
        let (src, mut dst) = (vec![1u8; size], vec![0u8; size]);
        let mut local = vec![iovec(src.as_ptr() as u64, size as u64)];
        let half = (size / 2) as u64;
        let mut remote = vec![iovec(dst.as_mut_ptr() as u64, half), iovec(dst.as_mut_ptr() as u64 + half, half)];
        let _ = write(std::process::id() as _, &mut local, &mut remote, 2);
    }

    #[test]
    fn a_bad_range_in_any_part_fails_the_write() {
        let size = 3 * BYTES_PER_THREAD;
        let src = vec![1u8; size];
        let mut dst = vec![0u8; size];
        let (mut local, mut remote) = pairs(&src, &mut dst, BYTES_PER_THREAD, BYTES_PER_THREAD, 2);
        remote[2] = iovec(8, BYTES_PER_THREAD as u64);
        let e = write(std::process::id() as _, &mut local, &mut remote, 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
    }
}
