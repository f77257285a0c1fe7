//! Vectored socket I/O on raw addresses: the cache memory is handed to the kernel, never turned into Rust
//! references. An address the process cannot access makes the call fail with `EFAULT`; it never faults.

use crate::iov::{advance, IoVec};
use std::io;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Most ranges per system call (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// About the most bytes one read asks for. The kernel copies in and checks every range a call names, so a read
/// names the ranges it can fill soon (a few MiB) rather than a thousand 256 KiB blocks of which it fills three.
const MAX_READ: usize = 4 << 20;

/// Writes every range of `iov`, in order, to the socket `fd`, failing with `TimedOut` once the socket has taken
/// no byte for `stall`. `iov` is consumed (left advanced).
///
/// The socket's own send timeout is no stall timeout: it counts from the start of each call, so a call that
/// moved some bytes and then waited returns at its timeout, and the next one waits all over again (a link cut in
/// the middle of a write failed it after twice the stall). Here each wait counts from the last byte taken.
pub(super) fn write_all(fd: RawFd, mut iov: &mut [IoVec], stall: Duration) -> io::Result<()> {
    let mut progress = Instant::now();
    while !iov.is_empty() {
        // SAFETY: an all-zero msghdr is valid (no name, no control data); only its ranges are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len().min(MAX_IOV) as _;
        // SAFETY: the ranges are initialised iovecs that outlive the call; the kernel only reads the ranges they
        // name, and a range this process cannot read makes the call fail with EFAULT instead of touching it.
        let written = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if written < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait_writable(fd, progress + stall)?;
                    continue;
                }
                _ => return Err(err),
            }
        }
        progress = Instant::now();
        let first = advance(iov, written as usize);
        iov = &mut iov[first..];
    }
    Ok(())
}

/// Waits until the socket `fd` takes bytes again (or has failed, which the next send reports), or `until`.
fn wait_writable(fd: RawFd, until: Instant) -> io::Result<()> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer took no byte for the stall timeout"));
        }
        let mut polled = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // Rounded up, so that a wait never ends just before `until` and spins.
        let ms = left.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: `polled` is one valid pollfd that outlives the call.
        match unsafe { libc::poll(&mut polled, 1, ms) } {
            0 => continue,
            n if n > 0 => return Ok(()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// Gives `stream`'s next read the time left until `deadline` (`TimedOut` once none is left): called before each
/// read of an operation whose deadline is for the whole of it.
pub(super) fn set_read_deadline(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the write took longer than its deadline"));
    }
    stream.set_read_timeout(Some(left))
}

/// Fills every range of `iov`, in order, from the socket `fd`, calling `before_each` before each read (to set
/// its timeout). Each read waits until the ranges it names are full (`MSG_WAITALL`: one wake-up and one call per
/// few MiB, not one per segment that arrives), or until the timeout, a signal or the end of the stream cuts it
/// short. End of stream before every range is full is an error.
///
/// # Safety
///
/// Every range must be memory of this process that the caller may overwrite with whatever the peer sends.
pub(super) unsafe fn read_all(fd: RawFd, mut iov: &mut [IoVec], mut before_each: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    while !iov.is_empty() {
        before_each()?;
        let mut n = 0;
        let mut bytes = 0;
        while n < iov.len().min(MAX_IOV) && (n == 0 || bytes < MAX_READ) {
            bytes += iov[n].iov_len;
            n += 1;
        }
        // SAFETY: an all-zero msghdr is valid (no name, no control data); only its ranges are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: the caller promised the ranges may be overwritten; the kernel writes only into them (the first
        // `n` of `iov`, initialised iovecs that outlive the call), or fails with EFAULT.
        let read = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL) };
        if read < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let first = advance(iov, read as usize);
        iov = &mut iov[first..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iov::{iovec, IoVecs};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn scatter_and_gather_through_a_socket_pair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let src: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; 10_000];
        // 2500 ranges of 4 bytes, reversed order on the receiving side.
        let out = IoVecs((0..2500).map(|i| iovec(src.as_ptr() as u64 + i * 4, 4)).collect());
        let mut inn: Vec<IoVec> = (0..2500).map(|i| iovec(dst.as_mut_ptr() as u64 + (2499 - i) * 4, 4)).collect();
        let t = std::thread::spawn(move || {
            let mut out = out;
            write_all(a.as_raw_fd(), &mut out.0, Duration::from_secs(10)).unwrap();
            a
        });
        // SAFETY: the ranges are `dst`'s, which outlives the call.
        unsafe { read_all(b.as_raw_fd(), &mut inn, || Ok(())) }.unwrap();
        t.join().unwrap();
        for i in 0..2500 {
            assert_eq!(dst[(2499 - i) * 4..(2500 - i) * 4], src[i * 4..i * 4 + 4]);
        }
    }

    #[test]
    fn a_read_larger_than_one_call_names_arrives_whole() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let total = 3 * MAX_READ + 12_345;
        let src: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; total];
        let sent = src.clone();
        let t = std::thread::spawn(move || {
            let mut out = [iovec(sent.as_ptr() as u64, sent.len() as u64)];
            write_all(a.as_raw_fd(), &mut out, Duration::from_secs(10)).unwrap();
            a
        });
        // Two ranges larger than one read asks for, then a thousand small ones.
        let base = dst.as_mut_ptr() as u64;
        let big = 2 * MAX_READ as u64 - 7;
        let mut inn = vec![iovec(base, big), iovec(base + big, MAX_READ as u64 + 1)];
        let mut at = big + MAX_READ as u64 + 1;
        while at < total as u64 {
            let len = (total as u64 - at).min(11);
            inn.push(iovec(base + at, len));
            at += len;
        }
        let mut calls = 0;
        // SAFETY: the ranges are `dst`'s, which outlives the call.
        unsafe { read_all(b.as_raw_fd(), &mut inn, || Ok(calls += 1)) }.unwrap();
        t.join().unwrap();
        assert!(dst == src, "every byte where it belongs");
        assert!(calls >= 4, "no call names more than about MAX_READ bytes ({calls} calls)");
    }

    #[test]
    fn a_sender_that_stalls_ends_the_read_at_its_timeout() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (&a).write_all(&[7u8; 100]).unwrap();
        let mut buf = vec![0u8; 1000];
        let mut iov = [iovec(buf.as_mut_ptr() as u64, 1000)];
        let start = Instant::now();
        // SAFETY: the range is `buf`'s.
        let err = unsafe { read_all(b.as_raw_fd(), &mut iov, || b.set_read_timeout(Some(Duration::from_millis(200)))) }.unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5), "the wait for all of it is bounded by the timeout");
        assert_eq!(buf[..100], [7u8; 100], "what came is kept");
        drop(a);
    }

    #[test]
    fn a_write_fails_one_stall_after_the_last_byte_taken() {
        // The reader takes one batch half a stall into the write, then nothing: the write fails a stall after that
        // batch, not a stall after the call that took it returned (as a socket send timeout does: 1.5 stalls).
        let stall = Duration::from_secs(1);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let src = vec![5u8; 64 << 20];
        let reader = std::thread::spawn(move || {
            std::thread::sleep(stall / 2);
            let mut buf = vec![0u8; 1 << 20];
            let _ = (&b).read(&mut buf).unwrap();
            let last = Instant::now();
            (b, last)
        });
        let mut out = [iovec(src.as_ptr() as u64, src.len() as u64)];
        let err = write_all(a.as_raw_fd(), &mut out, stall).unwrap_err();
        let failed = Instant::now();
        let (_b, last) = reader.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let after = failed - last;
        assert!(after >= stall * 9 / 10 && after < stall * 13 / 10, "failed {after:?} after the last byte taken (stall {stall:?})");
    }

    #[test]
    fn bad_addresses_fail_cleanly() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut bad = [iovec(8, 16)];
        let err = write_all(a.as_raw_fd(), &mut bad, Duration::from_secs(10)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn eof_is_an_error() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        let mut iov = [iovec(buf.as_mut_ptr() as u64, 4)];
        // SAFETY: the range is `buf`'s.
        assert_eq!(unsafe { read_all(b.as_raw_fd(), &mut iov, || Ok(())) }.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

}
