//! The prefill side of a TCP connection: one write per `writeCache` call, gathered straight from the cache.

use super::frame::{self, Ack, WriteHeader};
use crate::admission::ConnectionHello;
use crate::auth::Tag;
use super::io;
use super::staging::Staging;
use crate::iov::{iovec, IoVecs};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::CacheLayout;
use crate::plan::{self, BlockPlan, SliceGeometry};
use crate::transport::Link;
use crate::wire::{TransportKind, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connection to one decode peer's TCP data port.
pub struct TcpLink {
    stream: TcpStream,
    peer: String,
    cache: Arc<CacheLayout>,
    seq: u64,
    header: Vec<u8>,
    iov: IoVecs,
    /// For a cache in GPU memory.
    staging: Option<Staging>,
}

impl TcpLink {
    /// Connects to `host:port` and presents the handshake's `token` with its `proof`.
    pub fn connect(host: &str, port: u16, token: u64, proof: Tag, cache: Arc<CacheLayout>, deadline: Instant, stall: Duration) -> Result<TcpLink> {
        let peer = format!("{host}:{port}");
        let addrs = (host, port)
            .to_socket_addrs()
            .map_err(|e| Error::invalid(format!("cannot resolve {peer}: {e}")))?;
        let mut last = Error::invalid(format!("{peer} resolves to no address"));
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(ErrorCode::Timeout, format!("no time was left to open the data connection to {peer}")));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(stream) => return TcpLink::start(stream, peer, ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token, proof }, cache, stall),
                Err(e) => last = Error::io(&format!("connecting the data path to {addr}"), e),
            }
        }
        Err(last)
    }

    fn start(mut stream: TcpStream, peer: String, hello: ConnectionHello, cache: Arc<CacheLayout>, timeout: Duration) -> Result<TcpLink> {
        let setup = |e| Error::io("configuring the data socket", e);
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        stream
            .write_all(&hello.encode())
            .map_err(|e| Error::io(&format!("greeting {peer}"), e))?;
        let mut ack = [0u8; frame::HELLO_ACK_LEN];
        stream.read_exact(&mut ack).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Error::new(
                ErrorCode::Transport,
                format!("{peer} closed the data connection before accepting it (it keeps at most KVCACHE_MAX_PEERS links, or is closing)"),
            ),
            _ => Error::io(&format!("waiting for {peer} to accept the data path"), e),
        })?;
        frame::decode_hello_ack(&ack)?;
        let staging = Staging::for_cache(&cache)?;
        Ok(TcpLink { stream, peer, cache, seq: 0, header: Vec::new(), iov: IoVecs::default(), staging })
    }

    fn read_ack(&mut self) -> Result<()> {
        let mut fixed = [0u8; frame::ACK_LEN];
        self.stream
            .read_exact(&mut fixed)
            .map_err(|e| Error::io(&format!("waiting for {} to confirm the write", self.peer), e))?;
        let (status, seq, reason_len) = Ack::decode_fixed(&fixed)?;
        let mut reason = vec![0u8; reason_len as usize];
        self.stream.read_exact(&mut reason).map_err(|e| Error::io("reading the refusal reason", e))?;
        if seq != self.seq {
            return Err(Error::protocol(format!("ack for write {seq} while waiting for write {}", self.seq)));
        }
        match status {
            0 => Ok(()),
            _ => Err(Error::new(
                ErrorCode::Rejected,
                format!("{} refused the write: {}", self.peer, String::from_utf8_lossy(&reason)),
            )),
        }
    }
}

impl Link for TcpLink {
    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        let cache = &*self.cache;
        let layer = plan.layer();
        self.seq += 1;
        let tensors = cache.tensors();
        let payload_bytes: u64 = tensors.iter().map(|t| plan.blocks() as u64 * cache.block_bytes(t)).sum();
        let header = WriteHeader {
            layer,
            runs: plan.runs().len() as u32,
            tensors: tensors.bits(),
            seq: self.seq,
            payload_bytes,
        };
        header.encode_with_runs(plan.runs(), &mut self.header);
        let fd = self.stream.as_raw_fd();
        let failed = |e| Error::io(&format!("sending layer {layer} to {}", self.peer), e);
        if let Some(staging) = &mut self.staging {
            io::write_all(fd, &mut [iovec(self.header.as_ptr() as u64, self.header.len() as u64)]).map_err(failed)?;
            // SAFETY: the plan checked every local id against this cache's block count.
            unsafe { staging.send(cache, layer, plan.runs(), |addr, len| io::write_all(fd, &mut [iovec(addr, len)]).map_err(failed)) }?;
            return self.read_ack();
        }
        let iov = &mut self.iov.0;
        iov.clear();
        iov.push(iovec(self.header.as_ptr() as u64, self.header.len() as u64));
        // The payload is each tensor's blocks in run order; where they land is the receiver's business.
        plan::for_each_segment(plan.runs(), tensors, |t| cache.block_bytes(t), SliceGeometry::WHOLE, |s| {
            iov.push(iovec(cache.addr(s.tensor, layer) + s.local, s.len))
        });
        io::write_all(fd, iov).map_err(failed)?;
        self.read_ack()
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Tcp
    }
}
