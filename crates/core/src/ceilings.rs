//! What this machine can do without kvtransfer, for `kvtransfer bench` to put beside its own rows: one plain TCP
//! stream of the same bytes over loopback, and `memcpy` of the same scattered blocks (on one thread, and split
//! over threads as the shared-memory transport splits a write). Each returns the time of every timed call.

use crate::error::{Error, Result};
use crate::transport::shm::copy::{threads as shm_threads, BYTES_PER_THREAD};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The threads the shared-memory transport splits one large write over, here.
pub fn copy_threads() -> usize {
    shm_threads()
}

/// One TCP stream over loopback moving `bytes` per call in writes of `chunk` bytes: the time of each of `calls`
/// calls (after `warmup` untimed ones), from the first byte written to the receiver's acknowledgement that the
/// last one arrived.
pub fn tcp_stream(bytes: usize, chunk: usize, warmup: usize, calls: usize) -> Result<Vec<Duration>> {
    let io = |what: &'static str| move |e: std::io::Error| Error::io(what, e);
    let chunk = chunk.max(1);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding a loopback port"))?;
    let addr = listener.local_addr().map_err(io("reading the port"))?;
    let total = warmup + calls;
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; chunk];
        for _ in 0..total {
            let mut left = bytes;
            while left > 0 {
                let n = s.read(&mut buf[..left.min(chunk)])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left -= n;
            }
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut times = Vec::with_capacity(calls);
    let sent = (|| -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let data = vec![0x5au8; chunk];
        let mut ack = [0u8; 1];
        for i in 0..total {
            let start = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk);
                s.write_all(&data[..n])?;
                left -= n;
            }
            s.read_exact(&mut ack)?;
            if i >= warmup {
                times.push(start.elapsed());
            }
        }
        Ok(())
    })();
    let received = receiver.join().map_err(|_| Error::new(crate::error::ErrorCode::Internal, "the stream's receiver panicked"))?;
    sent.map_err(io("sending over the loopback stream"))?;
    received.map_err(io("receiving over the loopback stream"))?;
    Ok(times)
}

/// `memcpy` of scattered blocks: for each of `tensors` tensors, block `local[i]` of a source pool into block
/// `remote[i]` of a destination pool, on `threads` threads at most, each given at least as many bytes as the
/// shared-memory transport gives one. The time of each of `calls` calls, after `warmup` untimed ones (at least
/// one: it touches the destination's pages).
pub fn scattered_copy(block_bytes: usize, local: &[u32], remote: &[u32], tensors: usize, threads: usize, warmup: usize, calls: usize) -> Result<Vec<Duration>> {
    if local.len() != remote.len() {
        return Err(Error::invalid(format!("{} local block ids but {} remote ones", local.len(), remote.len())));
    }
    let pool = |ids: &[u32]| ids.iter().max().map_or(0, |&m| m as usize + 1);
    let bytes = |blocks: usize| {
        blocks.checked_mul(block_bytes).filter(|&b| b <= 1 << 40).ok_or_else(|| Error::invalid("the pools would be larger than 1 TiB"))
    };
    let (src_bytes, dst_bytes) = (bytes(pool(local))?, bytes(pool(remote))?);
    let src: Vec<Vec<u8>> = (0..tensors).map(|t| (0..src_bytes).map(|i| (i as u8) ^ (t as u8)).collect()).collect();
    let mut dst: Vec<Vec<u8>> = (0..tensors).map(|_| vec![0u8; dst_bytes]).collect();
    let total = local.len() * block_bytes * tensors;
    let parts = threads.min(total / BYTES_PER_THREAD).max(1);
    let mut times = Vec::with_capacity(calls);
    for i in 0..warmup.max(1) + calls {
        let start = Instant::now();
        copy(&src, &mut dst, block_bytes, local, remote, parts);
        if i >= warmup.max(1) {
            times.push(start.elapsed());
        }
    }
    Ok(times)
}

/// One call of [`scattered_copy`]: the pairs split into `parts` runs of pairs, each on its own thread (the first
/// on this one).
fn copy(src: &[Vec<u8>], dst: &mut [Vec<u8>], block_bytes: usize, local: &[u32], remote: &[u32], parts: usize) {
    // Each thread writes the blocks of its own pairs; remote ids are distinct, so no two write one block. The
    // destination is split into per-block slices first, which the borrow checker can hand out disjointly.
    let mut blocks: Vec<Vec<Option<&mut [u8]>>> = dst.iter_mut().map(|d| d.chunks_mut(block_bytes).map(Some).collect()).collect();
    let mut jobs: Vec<Vec<(&[u8], &mut [u8])>> = (0..parts).map(|_| Vec::new()).collect();
    let per = local.len().div_ceil(parts);
    for (t, tensor) in blocks.iter_mut().enumerate() {
        for (i, (&l, &r)) in local.iter().zip(remote).enumerate() {
            let from = &src[t][l as usize * block_bytes..(l as usize + 1) * block_bytes];
            if let Some(to) = tensor[r as usize].take() {
                jobs[i / per.max(1)].push((from, to));
            }
        }
    }
    std::thread::scope(|scope| {
        let mut jobs = jobs.into_iter();
        let mine = jobs.next().unwrap_or_default();
        for job in jobs {
            scope.spawn(move || job.into_iter().for_each(|(from, to)| to.copy_from_slice(from)));
        }
        mine.into_iter().for_each(|(from, to)| to.copy_from_slice(from));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_moves_its_bytes_each_call() {
        let times = tcp_stream(3 << 20, 256 << 10, 1, 4).unwrap();
        assert_eq!(times.len(), 4);
        assert!(times.iter().all(|t| !t.is_zero()));
    }

    #[test]
    fn the_copy_puts_each_block_where_its_pair_says_on_any_number_of_threads() {
        for parts in [1, 3] {
            let (local, remote) = ([4u32, 0, 2], [1u32, 2, 0]);
            let src: Vec<Vec<u8>> = (0..2).map(|t| (0..5 * 8).map(|i| (i + 100 * t) as u8).collect()).collect();
            let mut dst: Vec<Vec<u8>> = (0..2).map(|_| vec![0u8; 3 * 8]).collect();
            copy(&src, &mut dst, 8, &local, &remote, parts);
            for t in 0..2 {
                for (l, r) in local.iter().zip(&remote) {
                    assert_eq!(dst[t][*r as usize * 8..][..8], src[t][*l as usize * 8..][..8], "tensor {t}, {l} → {r}, {parts} parts");
                }
            }
        }
        assert_eq!(scattered_copy(8, &[1, 2], &[0, 1], 2, 2, 0, 3).unwrap().len(), 3);
        assert!(scattered_copy(8, &[1], &[], 1, 1, 0, 1).is_err());
    }
}
