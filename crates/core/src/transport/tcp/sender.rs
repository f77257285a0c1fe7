//! The prefill side of a TCP link: one write per `writeCache` call, gathered straight from the cache, whole over
//! one connection or in pieces over several.

use crate::transport::frame::{self, Ack, WriteHeader};
use crate::admission::ConnectionHello;
use crate::auth::Tag;
use super::io;
use super::staging::Staging;
use crate::iov::{iovec, IoVecs};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::CacheLayout;
use crate::metrics::{HeldResource, Raised, RESOURCES};
use crate::config::TCP_STRIPE_BYTES;
use crate::plan::{self, BlockPlan, Run, SliceGeometry};
use crate::transport::Link;
use crate::wire::{TransportKind, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a link's data connections go: the decode's data port, and how many connections to open there.
pub struct DataPort<'a> {
    pub host: &'a str,
    pub port: u16,
    pub connections: u32,
}

/// The data connections to one decode peer's TCP data port: a write goes whole over the first, or split into
/// pieces over several (see [`TCP_STRIPE_BYTES`]).
pub struct TcpLink {
    streams: Vec<DataStream>,
    peer: String,
    cache: Arc<CacheLayout>,
    seq: u64,
    /// Each piece's runs, for a split write.
    pieces: Vec<Vec<Run>>,
}

/// One data connection, with what a write over it needs.
struct DataStream {
    stream: TcpStream,
    header: Vec<u8>,
    iov: IoVecs,
    /// For a cache in GPU memory.
    staging: Option<Staging>,
    /// The longest a send may go without the socket taking a byte.
    stall: Duration,
    _counted: HeldResource,
}

/// Which piece of which write a [`DataStream::send`] is.
#[derive(Clone, Copy)]
struct Piece {
    layer: u32,
    seq: u64,
    part: u8,
    parts: u8,
}

impl TcpLink {
    /// Opens `data.connections` connections to `data.host:data.port`, each presenting the handshake's `token`
    /// with its `proof`, all before `deadline`.
    pub fn connect(data: DataPort<'_>, token: u64, proof: Tag, cache: Arc<CacheLayout>, deadline: Instant, stall: Duration) -> Result<TcpLink> {
        let peer = format!("{}:{}", data.host, data.port);
        let addrs: Vec<SocketAddr> = (data.host, data.port)
            .to_socket_addrs()
            .map_err(|e| Error::invalid(format!("cannot resolve {peer}: {e}")))?
            .collect();
        let hello = ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token, proof };
        let open = || DataStream::open(&addrs, &peer, hello, &cache, deadline, stall);
        // The first alone: a refusal (an expired or unproven token, a full decode) is said as the decode said it,
        // not as the "unknown token" its siblings would meet once it used the token up. Then the others at once,
        // a thread each: a link costs two connections' round trips however many it opens. Where one fails, the
        // others are dropped (closed) with it.
        let mut streams = vec![open()?];
        let rest = std::thread::scope(|scope| {
            let opening: Vec<_> = (1..data.connections)
                .map(|i| std::thread::Builder::new().name(format!("kvtransfer tcp open {i}")).spawn_scoped(scope, open))
                .collect();
            opening
                .into_iter()
                .map(|o| match o {
                    Ok(thread) => thread.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Internal, "opening a data connection panicked"))),
                    // No thread to be had (a limit of the process): this one opens it.
                    Err(_) => open(),
                })
                .collect::<Result<Vec<_>>>()
        })?;
        streams.extend(rest);
        Ok(TcpLink { streams, peer, cache, seq: 0, pieces: Vec::new() })
    }

    /// Into how many pieces a write of `payload` bytes is split.
    fn parts(&self, payload: u64, blocks: u32) -> usize {
        let most = (payload / TCP_STRIPE_BYTES).min(blocks as u64) as usize;
        most.clamp(1, self.streams.len())
    }
}

impl DataStream {
    /// Connects to the first of `addrs` that answers and presents `hello`.
    fn open(addrs: &[SocketAddr], peer: &str, hello: ConnectionHello, cache: &CacheLayout, deadline: Instant, stall: Duration) -> Result<DataStream> {
        let mut last = Error::invalid(format!("{peer} resolves to no address"));
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(ErrorCode::Timeout, format!("no time was left to open the data connection to {peer}")));
            }
            match TcpStream::connect_timeout(addr, left) {
                Ok(stream) => return DataStream::start(stream, peer, hello, cache, stall),
                Err(e) => last = Error::io(&format!("connecting the data path to {addr}"), e),
            }
        }
        Err(last)
    }

    fn start(mut stream: TcpStream, peer: &str, hello: ConnectionHello, cache: &CacheLayout, timeout: Duration) -> Result<DataStream> {
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
        let staging = Staging::for_cache(cache)?;
        Ok(DataStream { stream, header: Vec::new(), iov: IoVecs::default(), staging, stall: timeout, _counted: Raised::new(&RESOURCES, |r| &r.tcp_data_connections) })
    }

    /// Sends the blocks of `runs` (a whole write, or one piece of it) and waits for the decode's ack.
    fn send(&mut self, cache: &CacheLayout, runs: &[Run], piece: Piece, peer: &str) -> Result<()> {
        let Piece { layer, seq, part, parts } = piece;
        let tensors = cache.tensors();
        let blocks: u64 = runs.iter().map(|r| r.count as u64).sum();
        let payload_bytes: u64 = tensors.iter().map(|t| blocks * cache.block_bytes(t)).sum();
        let header = WriteHeader { layer, runs: runs.len() as u32, tensors: tensors.bits(), part, parts, seq, payload_bytes };
        header.encode_with_runs(runs, &mut self.header);
        let (fd, stall) = (self.stream.as_raw_fd(), self.stall);
        let failed = |e| Error::io(&format!("sending layer {layer} to {peer}"), e);
        if let Some(staging) = &mut self.staging {
            io::write_all(fd, &mut [iovec(self.header.as_ptr() as u64, self.header.len() as u64)], stall).map_err(failed)?;
            // SAFETY: the runs are the plan's, or a piece of them (`split_runs`), and the plan checked every
            // local id against this cache's block count.
            unsafe { staging.send(cache, layer, runs, |addr, len| io::write_all(fd, &mut [iovec(addr, len)], stall).map_err(failed)) }?;
            return self.read_ack(seq, peer);
        }
        let iov = &mut self.iov.0;
        iov.clear();
        iov.push(iovec(self.header.as_ptr() as u64, self.header.len() as u64));
        // The payload is each tensor's blocks in run order; where they land is the receiver's business.
        plan::for_each_segment(runs, tensors, |t| cache.block_bytes(t), SliceGeometry::WHOLE, |s| {
            iov.push(iovec(cache.addr(s.tensor, layer) + s.local, s.len))
        });
        io::write_all(fd, iov, stall).map_err(failed)?;
        self.read_ack(seq, peer)
    }

    fn read_ack(&mut self, seq: u64, peer: &str) -> Result<()> {
        let mut fixed = [0u8; frame::ACK_LEN];
        self.stream
            .read_exact(&mut fixed)
            .map_err(|e| Error::io(&format!("waiting for {peer} to confirm the write"), e))?;
        let (status, acked, reason_len) = Ack::decode_fixed(&fixed)?;
        let mut reason = vec![0u8; reason_len as usize];
        self.stream.read_exact(&mut reason).map_err(|e| Error::io("reading the refusal reason", e))?;
        if acked != seq {
            return Err(Error::protocol(format!("ack for write {acked} while waiting for write {seq}")));
        }
        match status {
            0 => Ok(()),
            _ => Err(Error::new(ErrorCode::Rejected, format!("{peer} refused the write: {}", String::from_utf8_lossy(&reason)))),
        }
    }
}

impl Link for TcpLink {
    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        let cache = &*self.cache;
        self.seq += 1;
        let (layer, seq) = (plan.layer(), self.seq);
        let payload: u64 = cache.tensors().iter().map(|t| plan.blocks() as u64 * cache.block_bytes(t)).sum();
        let parts = self.parts(payload, plan.blocks());
        if parts == 1 {
            return self.streams[0].send(cache, plan.runs(), Piece { layer, seq, part: 0, parts: 1 }, &self.peer);
        }
        plan::split_runs(plan.runs(), parts, &mut self.pieces);
        let (pieces, peer) = (&self.pieces, self.peer.as_str());
        let piece = |part: usize| Piece { layer, seq, part: part as u8, parts: parts as u8 };
        // Each piece but the first is sent by a thread of its own (one TCP stream is bounded by the one core that
        // copies its bytes); the call returns once every piece is acked, or with the first failure.
        std::thread::scope(|scope| {
            let (first, others) = self.streams[..parts].split_first_mut().expect("at least one connection");
            let sent: Vec<_> = others
                .iter_mut()
                .enumerate()
                .map(|(i, stream)| {
                    std::thread::Builder::new()
                        .name("kvtransfer tcp piece".into())
                        .spawn_scoped(scope, move || stream.send(cache, &pieces[i + 1], piece(i + 1), peer))
                        .map_err(|e| Error::io("starting a thread to send a piece of the write", e))
                })
                .collect();
            let mine = first.send(cache, &pieces[0], piece(0), peer);
            let results = std::iter::once(mine).chain(sent.into_iter().map(|other| {
                other.and_then(|handle| {
                    handle.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Transport, "a thread sending a piece of the write panicked")))
                })
            }));
            // A refusal leaves its connection in step (the decode drained the piece and answered); any other
            // failure may not, so it is the one returned, and the link is rebuilt.
            let errors: Vec<Error> = results.filter_map(Result::err).collect();
            match errors.iter().position(|e| e.code() != ErrorCode::Rejected).or((!errors.is_empty()).then_some(0)) {
                Some(i) => Err(errors.into_iter().nth(i).expect("found above")),
                None => Ok(()),
            }
        })
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{CacheSpec, HostAllocation};
    use std::net::TcpListener;

    #[test]
    fn a_link_whose_later_connection_is_refused_fails_and_closes_the_ones_it_opened() {
        // A data port that accepts two connections and closes the third at its hello, as a decode that refuses it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut accepted = Vec::new();
            for n in 0..3 {
                let (mut s, _) = listener.accept().unwrap();
                let mut hello = [0u8; crate::admission::HELLO_LEN];
                s.read_exact(&mut hello).unwrap();
                if n < 2 {
                    s.write_all(&frame::encode_hello_ack(0)).unwrap();
                    accepted.push(s);
                }
            }
            // What became of the two accepted: each ends (EOF) once the link has given up.
            accepted
                .into_iter()
                .map(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    matches!(s.read(&mut [0u8; 1]), Ok(0))
                })
                .collect::<Vec<_>>()
        });
        let memory = HostAllocation::new(4096).unwrap();
        // SAFETY: the memory outlives the layout, and nothing is written through it (no write is made).
        let cache = Arc::new(unsafe { CacheLayout::new(CacheSpec { key: vec![memory.addr()], block_number: 4, block_bytes: 1024, ..CacheSpec::default() }) }.unwrap());
        let data = DataPort { host: "127.0.0.1", port, connections: 3 };
        let e = TcpLink::connect(data, 7, [0; 32], cache, Instant::now() + Duration::from_secs(5), Duration::from_secs(5)).err().expect("refused");
        assert_eq!(e.code(), ErrorCode::Transport, "{e}");
        assert!(e.message().contains("closed the data connection before accepting it"), "{e}");
        assert_eq!(server.join().unwrap(), vec![true, true], "the connections it had opened were closed with it");
    }
}
