//! The decode side of the TCP data path: a listener and one thread per prefill connection (a link has one or
//! several), receiving each write straight into the cache after checking it against the cache's own geometry.

use crate::config::Timeouts;
use crate::transport::frame::{self, Ack, WriteHeader};
use crate::admission::{self, Admissions, ConnectionHello};
use crate::auth::Tag;
use super::io;
use super::staging::Staging;
use crate::iov::{iovec, IoVecs};
use crate::listener::{host_of, read_before, Hello, HelloShape, Listener, Stage};
use crate::error::{Error, Result};
use crate::log::Logger;
use crate::memory::{CacheLayout, TensorSet};
use crate::metrics::{HeldResource, Raised, RESOURCES};
use crate::plan::{self, Run, SliceGeometry};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the handshake agreed with one prefill peer.
#[derive(Debug, Clone)]
pub struct Session {
    /// The peer, for logs.
    pub peer: String,
    /// Where its blocks land inside ours.
    pub geometry: SliceGeometry,
    /// The tensors it sends.
    pub tensors: TensorSet,
    /// The data connections it opens (a write comes in at most as many pieces).
    pub connections: u32,
}

struct Shared {
    cache: Arc<CacheLayout>,
    log: Arc<Logger>,
    timeouts: Timeouts,
    stop: AtomicBool,
    /// Sessions admitted by the handshake: each may open its data connections within the connect timeout.
    pending: Admissions<Session>,
    /// The data connections of each session that has one (by a number of their own), until their threads end.
    open: Mutex<HashMap<u64, Vec<(u64, TcpStream)>>>,
    /// Numbers the connections in `open`.
    next_connection: AtomicU64,
    ended: Condvar,
    /// What each session's latest writes delivered, for [`TcpReceiver::delivered`], until the session is cut off.
    delivered: Mutex<HashMap<u64, Delivered>>,
    /// The most data connections a session may open.
    connections: u32,
    /// Keys the digests of what was delivered (a peer cannot aim a digest it does not know the key of).
    digest_key: RandomState,
}

/// Writes remembered per session for the `Done`s that name them (those that carry no request never do).
const DELIVERED_KEPT: usize = 4096;

/// What one session's writes delivered.
#[derive(Default)]
struct Delivered {
    /// The digests of its latest whole writes, oldest first.
    writes: VecDeque<u64>,
    /// The pieces of a split write that have arrived, until the last does.
    assembling: Option<Assembly>,
}

/// The pieces of one split write (`seq`) received so far: each one's block ids, in its order.
struct Assembly {
    seq: u64,
    layer: u32,
    pieces: Vec<Option<Vec<u32>>>,
}

impl Delivered {
    /// Records a piece; returns the whole write's block ids once its last piece is in. A piece of another write
    /// starts over (a link sends the next write only once every piece of the last was acked).
    fn add_piece(&mut self, header: &WriteHeader, blocks: Vec<u32>) -> Option<Vec<u32>> {
        let same = |a: &Assembly| a.seq == header.seq && a.layer == header.layer && a.pieces.len() == header.parts as usize;
        if !self.assembling.as_ref().is_some_and(same) {
            self.assembling = Some(Assembly { seq: header.seq, layer: header.layer, pieces: vec![None; header.parts as usize] });
        }
        let assembly = self.assembling.as_mut().expect("set above");
        assembly.pieces[header.part as usize] = Some(blocks);
        if assembly.pieces.iter().any(Option::is_none) {
            return None;
        }
        let pieces = self.assembling.take().expect("set above").pieces;
        Some(pieces.into_iter().flatten().flatten().collect())
    }

    fn push(&mut self, digest: u64) {
        if self.writes.len() == DELIVERED_KEPT {
            self.writes.pop_front();
        }
        self.writes.push_back(digest);
    }
}

/// Bytes a second a write's payload must at least move: a write gets the stall timeout plus its size at this rate in all,
/// so that one trickled a byte at a time cannot hold its connection's thread for ever.
const MIN_RATE: u64 = 1 << 20;

/// The digest of a write of `blocks` of `layer` (the decode's block ids, in the order the write named them).
fn digest(key: &RandomState, layer: u32, blocks: impl Iterator<Item = u32>) -> u64 {
    let mut h = key.build_hasher();
    h.write_u32(layer);
    for b in blocks {
        h.write_u32(b);
    }
    h.finish()
}

/// The listening side of the TCP transport.
pub struct TcpReceiver {
    listener: Listener,
    shared: Arc<Shared>,
}

impl TcpReceiver {
    /// Listens on `ips` (one ephemeral port) and receives into `cache`, from at most `max_sessions` sessions of
    /// at most `connections` data connections each at once (more are closed at once).
    pub fn start(
        ips: &[IpAddr],
        cache: Arc<CacheLayout>,
        log: Arc<Logger>,
        timeouts: Timeouts,
        max_sessions: usize,
        connections: u32,
    ) -> Result<TcpReceiver> {
        let shared = Arc::new(Shared {
            cache,
            log: log.clone(),
            timeouts,
            stop: AtomicBool::new(false),
            pending: Admissions::new(timeouts.connect, max_sessions),
            open: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            ended: Condvar::new(),
            delivered: Mutex::new(HashMap::new()),
            digest_key: RandomState::new(),
            connections,
        });
        let s = shared.clone();
        let most = max_sessions.saturating_mul(connections as usize);
        let listener = Listener::start(ips, 0, None, "data connection", HelloShape::Fixed(admission::HELLO_LEN), Stage::Served, most, timeouts.connect, log, move |stream, hello| {
            serve_connection(stream, hello, &s)
        })?;
        Ok(TcpReceiver { listener, shared })
    }

    /// The data port.
    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    /// The most data connections a session may open.
    pub fn connections(&self) -> u32 {
        self.shared.connections
    }

    /// Registers a session agreed by the handshake, with its data connections (at most
    /// [`TcpReceiver::connections`]); each presents the returned token, with the proof `proof(token)` gives (any,
    /// where it gives `None`). Sessions whose connections never came are let go (their links are cut off by
    /// their request channel's expiry).
    pub fn admit(&self, session: Session, proof: impl FnOnce(u64) -> Option<Tag>) -> u64 {
        let connections = session.connections;
        self.shared.pending.admit(session, connections, proof).0
    }

    /// Whether `session`'s data connections delivered a write of exactly `blocks` of `layer` (in that order;
    /// every piece of a split one) that no earlier call named: the evidence a `Done` of it must have. Writes
    /// before the one found are forgotten (a link's `Done`s come in the order of its writes).
    pub fn delivered(&self, session: u64, layer: u32, blocks: &[u32]) -> bool {
        let wanted = digest(&self.shared.digest_key, layer, blocks.iter().copied());
        let mut delivered = self.shared.delivered.lock().unwrap();
        let Some(writes) = delivered.get_mut(&session).map(|d| &mut d.writes) else { return false };
        match writes.iter().position(|&d| d == wanted) {
            Some(i) => {
                writes.drain(..=i);
                true
            }
            None => false,
        }
    }

    /// Ends `session`: its token no longer opens a connection, and its connections are shut down. Returns
    /// whether their threads have stopped receiving (it waits up to the timeout for that).
    pub fn cut_off(&self, session: u64) -> bool {
        let mut open = self.shared.open.lock().unwrap();
        self.shared.pending.withdraw(session);
        for (_, stream) in open.get(&session).into_iter().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + self.shared.timeouts.confirm;
        while open.contains_key(&session) && Instant::now() < deadline {
            open = self.shared.ended.wait_timeout(open, deadline - Instant::now()).unwrap().0;
        }
        // What it delivered is kept until its link ends (its `Done`s may come after its data connection ended).
        // A connection still receiving after the wait (it did not stop in time) may record one more write.
        self.shared.delivered.lock().unwrap().remove(&session);
        !open.contains_key(&session)
    }
}

impl TcpReceiver {
    /// Stops listening and ends every data connection; returns once none receives any more. Later calls do
    /// nothing.
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.pending.clear();
        self.listener.stop();
        self.shared.delivered.lock().unwrap().clear();
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

fn serve_connection(mut stream: TcpStream, hello: Hello, shared: &Shared) {
    let peer = hello.origin.to_string();
    let (token, number, session) = match greet(&mut stream, &hello.bytes, shared) {
        Ok(admitted) => admitted,
        Err(e) => {
            if !shared.stop.load(Ordering::Acquire) {
                shared.log.error_from(&host_of(hello.origin.ip()).to_string(), format!("data connection from {peer} refused: {e}"));
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    serve_session(stream, shared, token, session, &peer);
    forget_connection(shared, token, number);
}

/// Takes connection `number` of session `token` out of `open` (the session with its last one).
fn forget_connection(shared: &Shared, token: u64, number: u64) {
    let mut open = shared.open.lock().unwrap();
    if let Some(streams) = open.get_mut(&token) {
        streams.retain(|(n, _)| *n != number);
        if streams.is_empty() {
            open.remove(&token);
        }
    }
    drop(open);
    shared.ended.notify_all();
}

fn serve_session(stream: TcpStream, shared: &Shared, token: u64, session: Session, peer: &str) {
    let staging = match Staging::for_cache(&shared.cache) {
        Ok(s) => s,
        Err(e) => {
            shared.log.error(format!("data connection from {} closed: cannot stage into GPU memory: {e}", session.peer));
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    shared.log.debug(format!("data path open from {} ({peer})", session.peer));
    let mut conn = Connection {
        stream,
        shared,
        token,
        session,
        runs_bytes: Vec::new(),
        runs: Vec::new(),
        sorted: Vec::new(),
        iov: IoVecs::default(),
        out: Vec::new(),
        staging,
        _counted: Raised::new(&RESOURCES, |r| &r.tcp_data_connections),
    };
    loop {
        match conn.serve_one() {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                if !shared.stop.load(Ordering::Acquire) {
                    shared.log.error(format!("data connection from {} closed: {e}", conn.session.peer));
                }
                break;
            }
        }
    }
    // The listener keeps a clone of this socket (to stop it on close); shut it down so the peer sees the end.
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// Reads the data hello and answers it, opening one of the connections of the session it names: returns the
/// session's token, the connection's number in `open`, and the session.
fn greet(stream: &mut TcpStream, hello: &[u8], shared: &Shared) -> Result<(u64, u64, Session)> {
    let setup = |e| Error::io("configuring the data socket", e);
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_write_timeout(Some(shared.timeouts.stall)).map_err(setup)?;
    let hello: &[u8; admission::HELLO_LEN] = hello.try_into().map_err(|_| Error::protocol("a data hello of the wrong length"))?;
    let hello = ConnectionHello::decode(frame::HELLO_MAGIC, hello)?;
    stream.set_read_timeout(Some(shared.timeouts.stall)).map_err(setup)?;
    let handle = stream.try_clone().map_err(setup)?;
    // Moved from pending to open under the lock `cut_off` takes first: a session is one or the other, never
    // neither while its connection may still receive.
    let number = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let session = {
        let mut open = shared.open.lock().unwrap();
        let session = shared.pending.take(&hello).map(|s| (hello.token, number, s));
        if session.is_ok() {
            open.entry(hello.token).or_default().push((number, handle));
        }
        session
    };
    let session = session.map_err(|refused| refused.into_parts("data connection").0);
    let status = session.as_ref().map_or_else(|e| e.code().to_wire(), |_| 0);
    if let Err(e) = stream.write_all(&frame::encode_hello_ack(status)) {
        if let Ok((token, number, _)) = &session {
            forget_connection(shared, *token, *number);
        }
        return Err(Error::io("answering the data hello", e));
    }
    session
}

struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    /// The session's number.
    token: u64,
    session: Session,
    runs_bytes: Vec<u8>,
    runs: Vec<Run>,
    /// Scratch for the overlap check.
    sorted: Vec<(u32, u32)>,
    iov: IoVecs,
    out: Vec<u8>,
    /// For a cache in GPU memory.
    staging: Option<Staging>,
    _counted: HeldResource,
}

impl Connection<'_> {
    /// Receives one write. `Ok(false)`: the peer closed (or we are stopping) between writes.
    fn serve_one(&mut self) -> Result<bool> {
        let mut raw = [0u8; frame::WRITE_HEADER_LEN];
        if !self.read_header(&mut raw)? {
            return Ok(false);
        }
        let header = WriteHeader::decode(&raw)?;
        // Runs that do not overlap are at most one per block: a longer table is not a write of this cache, and is
        // not read (nor anything allocated for it).
        let block_number = self.shared.cache.block_number();
        if header.runs > block_number {
            return Err(Error::protocol(format!("a write claims {} runs, more than this cache's {block_number} blocks", header.runs)));
        }
        // The whole write, not each read, has a deadline (a write is refused before its payload is read if it
        // announces more than a layer, see `drain`).
        let deadline = Instant::now() + self.shared.timeouts.stall + Duration::from_secs(header.payload_bytes.min(1 << 40) / MIN_RATE);
        self.runs_bytes.resize(header.runs as usize * frame::RUN_LEN, 0);
        read_before(&mut self.stream, &mut self.runs_bytes, deadline).map_err(|e| Error::io("reading the run table", e))?;
        frame::decode_runs(&self.runs_bytes, &mut self.runs);
        // A refused write is drained and answered; a failure while receiving ends the connection.
        let ack = match self.check(&header) {
            Ok(()) => {
                self.receive(&header, deadline)?;
                self.remember(&header);
                Ack { status: 0, seq: header.seq, reason: String::new() }
            }
            Err(refusal) => {
                self.drain(header.payload_bytes, &refusal, deadline)?;
                self.shared.log.error_from(&self.session.peer, format!("refused a write from {}: {refusal}", self.session.peer));
                Ack { status: refusal.code().to_wire(), seq: header.seq, reason: refusal.message().to_string() }
            }
        };
        ack.encode(&mut self.out);
        // Between writes the connection may stay idle: back to the per-read timeout.
        self.stream.set_read_timeout(Some(self.shared.timeouts.stall)).map_err(|e| Error::io("configuring the data socket", e))?;
        self.stream.write_all(&self.out).map_err(|e| Error::io("sending the ack", e))?;
        Ok(true)
    }

    /// Records that the write just received (its runs) delivered its blocks, once the whole write has (every
    /// piece of a split one).
    fn remember(&self, header: &WriteHeader) {
        let mut blocks = self.runs.iter().flat_map(|r| (0..r.count).map(move |i| r.remote + i));
        // Only while its session is open (not after a cut-off that forgot it). Locks in `cut_off`'s order.
        let open = self.shared.open.lock().unwrap();
        if !open.contains_key(&self.token) {
            return;
        }
        let mut delivered = self.shared.delivered.lock().unwrap();
        let session = delivered.entry(self.token).or_default();
        let key = &self.shared.digest_key;
        let d = if header.parts == 1 {
            digest(key, header.layer, &mut blocks)
        } else {
            match session.add_piece(header, blocks.collect()) {
                Some(all) => digest(key, header.layer, all.into_iter()),
                None => return,
            }
        };
        session.push(d);
    }

    /// Waits for the next header; idle time between writes is not a stall.
    fn read_header(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(Error::protocol("the peer closed in the middle of a write header")),
                Ok(n) => got += n,
                Err(e) if got == 0 && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.shared.stop.load(Ordering::Acquire) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading a write header", e)),
            }
        }
        Ok(true)
    }

    /// The receiver's own validation: whatever arrives, nothing lands outside the registered cache.
    fn check(&mut self, header: &WriteHeader) -> Result<()> {
        if header.parts as u32 > self.session.connections {
            return Err(Error::invalid(format!("a write in {} pieces, where the link has {} connections", header.parts, self.session.connections)));
        }
        header.check(&self.runs, &self.shared.cache, self.session.tensors, self.session.geometry, &mut self.sorted).map(drop)
    }

    /// Reads the payload straight into the cache.
    fn receive(&mut self, header: &WriteHeader, deadline: Instant) -> Result<()> {
        let cache = &*self.shared.cache;
        let geometry = self.session.geometry;
        let stream = &self.stream;
        let fd = stream.as_raw_fd();
        if let Some(staging) = &mut self.staging {
            // SAFETY: `check` proved every run inside [0, block_number) of this cache; each range read into is
            // one of the staging ring's own buffers, which `receive` hands out.
            unsafe {
                staging.receive(cache, header.layer, &self.runs, geometry, |addr, len| {
                    io::read_all(fd, &mut [iovec(addr, len)], || io::set_read_deadline(stream, deadline))
                        .map_err(|e| Error::io("receiving blocks", e))
                })
            }?;
            return self.log_received(header);
        }
        let iov = &mut self.iov.0;
        iov.clear();
        // In range: `check` proved every run inside [0, block_number), so each segment ends at most at
        // block_number × ratio × slice = the tensor's size.
        let slice = |t| cache.block_bytes(t) / geometry.ratio as u64;
        plan::for_each_segment(&self.runs, self.session.tensors, slice, geometry, |s| {
            iov.push(iovec(cache.addr(s.tensor, header.layer) + s.remote, s.len))
        });
        // SAFETY: every range is a slice of a block of this cache (see above), which the layout's owner promised
        // may be written.
        unsafe { io::read_all(fd, iov, || io::set_read_deadline(stream, deadline)) }.map_err(|e| Error::io("receiving blocks", e))?;
        self.log_received(header)
    }

    fn log_received(&self, header: &WriteHeader) -> Result<()> {
        if self.shared.log.debug_enabled() {
            let piece = if header.parts > 1 { format!(" piece {} of {}", header.part + 1, header.parts) } else { String::new() };
            self.shared.log.debug(format!(
                "received layer {}{piece} ({} runs, {} bytes) from {}",
                header.layer,
                self.runs.len(),
                header.payload_bytes,
                self.session.peer
            ));
        }
        Ok(())
    }

    /// Discards the payload of a refused write, so the connection stays usable. A payload larger than one
    /// layer of this cache cannot be a real write: the connection is dropped instead.
    fn drain(&mut self, mut bytes: u64, refusal: &Error, deadline: Instant) -> Result<()> {
        let cache = &*self.shared.cache;
        let limit: u64 = cache.tensors().iter().filter_map(|t| cache.tensor_bytes(t)).sum();
        if bytes > limit {
            return Err(Error::protocol(format!("{refusal}; and its {bytes}-byte payload is not believable")));
        }
        let mut scratch = [0u8; 64 * 1024];
        while bytes > 0 {
            let n = bytes.min(scratch.len() as u64) as usize;
            read_before(&mut self.stream, &mut scratch[..n], deadline).map_err(|e| Error::io("discarding a refused write", e))?;
            bytes -= n as u64;
        }
        Ok(())
    }
}
