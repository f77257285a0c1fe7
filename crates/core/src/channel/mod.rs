//! The request channel: one TCP connection per prefill link, beside the data path of whatever transport the
//! link uses, for what the decode engine needs to know about requests ([`frame`]).
//!
//! - The prefill tells the decode that a request started, that a write of it is in the decode's memory (sent
//!   only once the link's write has returned, so never before the bytes), that a write failed, or that the
//!   request is aborted; it pings while idle.
//! - The decode asks the prefill to revoke a request or to stop writing because it closes, and waits for each
//!   peer to confirm ([`ChannelServer::ask_all`]).
//! - The channel's end is the peer's end: when it closes (or goes silent) the decode fails the peer's open
//!   requests and cuts off its data path.
//!
//! The decode admits a channel only with the token its authenticated handshake handed out
//! ([`ChannelServer::admit`]); tokens expire, hellos and frames are bounded, and connections are capped.

pub mod frame;

pub use frame::{Frame, RequestId};

use crate::sync::lock;
use crate::admission::{self, Admissions, ConnectionHello};
use crate::codec;
use crate::error::{Error, ErrorCode, Result};
use crate::listener::{self, Hello, HelloShape, Listener, Stage};
use crate::log::Logger;
use crate::wire::{TransportKind, PROTOCOL_VERSION};
use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often an idle prefill pings.
pub const PING: Duration = if cfg!(test) { Duration::from_millis(100) } else { Duration::from_secs(1) };
/// Silence after which the decode gives a prefill up: a few missed pings, and never less than this.
const MIN_MISS: Duration = Duration::from_secs(3);

/// A prefill link as the decode sees it, from the handshake that admitted it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// For logs and notifications: `prefill tp i/n at ip`.
    pub name: String,
    /// Which slice of each decode block it writes, and how many slices a block has.
    pub slot: u32,
    pub ratio: u32,
    /// Its data path: the transport, and that transport's session.
    pub transport: TransportKind,
    pub session: u64,
    /// Its process, for a same-host transport (which the decode cannot cut off: it waits for the process).
    pub process: Option<Arc<crate::process::PeerProcess>>,
    /// The prefill instance it belongs to (its ranks share it), when the engine named one: the owner of the
    /// requests it starts. `None`: an instance of its own.
    pub instance: Option<String>,
    /// Where its request channel comes from (set once the channel opened): logs about it are limited per host.
    pub address: Option<IpAddr>,
    /// What is counted about its host (see [`crate::metrics`]).
    pub metrics: Arc<crate::metrics::PeerInstruments>,
}

/// What the decode does with what its channels say.
pub trait Events: Send + Sync {
    /// A channel of `peer` opened. Returns the requests it must know are revoked before it may write.
    fn opened(&self, channel: u64, peer: &PeerInfo) -> Vec<RequestId>;
    /// A prefill's `Start`, `Done`, `Failed` or `Abort`. An error closes the channel.
    fn frame(&self, channel: u64, peer: &PeerInfo, frame: Frame) -> Result<()>;
    /// The channel is ending (it is still among the open ones, which a revoke asks): called just before
    /// [`Events::closed`].
    fn ending(&self, peer: &PeerInfo, goodbye: bool) {
        let _ = (peer, goodbye);
    }
    /// The channel ended, `why`. `goodbye`: the prefill said its link writes nothing more before it ended.
    fn closed(&self, channel: u64, peer: &PeerInfo, why: &str, goodbye: bool);
    /// Called about every 100 ms while the server runs (the decode's timers ride on it). Returns requests that
    /// ended without their prefill's word (they expired), each with the channels to ask to stop writing it.
    fn tick(&self) -> Vec<(RequestId, Vec<u64>)> {
        Vec::new()
    }
}

/// What the decode asks every peer to confirm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ask {
    Revoke(RequestId),
    Close,
}

struct Live {
    peer: PeerInfo,
    writer: Arc<Mutex<TcpStream>>,
}

struct Shared {
    stop: AtomicBool,
    /// No new channels once the decode is closing.
    closing: AtomicBool,
    timeout: Duration,
    block_number: u32,
    log: Arc<Logger>,
    events: Arc<dyn Events>,
    /// Tokens handed out by handshakes: each may open one channel, within `timeout`.
    pending: Admissions<PeerInfo>,
    live: Mutex<HashMap<u64, Live>>,
    /// Asks not yet confirmed, by channel.
    asked: Mutex<HashSet<(u64, Ask)>>,
    confirmed: Condvar,
    next_channel: AtomicU64,
}

/// The decode's end: a listener and one thread per channel.
pub struct ChannelServer {
    listener: Listener,
    shared: Arc<Shared>,
    /// The thread that lets go of expired admissions; `None` once stopped.
    expiry: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ChannelServer {
    /// Listens on `ips` (one ephemeral port); `events` hears what the channels say. Keeps at most `max` channels (more are closed at once), and at most `max` admissions waiting for theirs
    /// (past that the oldest is let go, its link cut off).
    pub fn start(ips: &[IpAddr], block_number: u32, timeout: Duration, max: usize, log: Arc<Logger>, events: Arc<dyn Events>) -> Result<ChannelServer> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            timeout,
            block_number,
            log: log.clone(),
            events,
            pending: Admissions::new(timeout, max),
            live: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashSet::new()),
            confirmed: Condvar::new(),
            next_channel: AtomicU64::new(1),
        });
        let s = shared.clone();
        let listener = Listener::start(ips, 0, None, "request channel", HelloShape::Fixed(admission::HELLO_LEN), Stage::Served, max, timeout, log, move |stream, hello| {
            serve(stream, hello, &s)
        })?;
        let s = shared.clone();
        let expiry = std::thread::Builder::new()
            .name("kvtransfer-channel-expiry".into())
            .spawn(move || expire_admissions(&s))
            .map_err(|e| Error::io("starting the request channels' expiry thread", e))?;
        Ok(ChannelServer { listener, shared, expiry: Mutex::new(Some(expiry)) })
    }

    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    /// Channels refused because `KVCACHE_MAX_PEERS` were open.
    pub fn refused_at_limit(&self) -> u64 {
        self.listener.refused_at_max()
    }

    /// Lets the link of `peer` open one channel, within the timeout: returns the token it must present, and
    /// (given `proof`, which turns the token into what the hello must carry) the proof it must carry. Tokens that
    /// expired unused are dropped, and their links handed to [`Events::closed`] (cut off).
    pub fn admit(&self, peer: PeerInfo, proof: impl FnOnce(u64) -> Option<[u8; 32]>) -> u64 {
        let (token, gone) = self.shared.pending.admit(peer, 1, proof);
        let_go(&self.shared, gone);
        token
    }

    /// Refuses new channels from now on (the decode is closing).
    pub fn stop_admitting(&self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.pending.clear();
    }

    /// The peers whose channel is open.
    pub fn peers(&self) -> Vec<PeerInfo> {
        lock(&self.shared.live).values().map(|l| l.peer.clone()).collect()
    }

    /// Asks every open channel's peer to confirm `ask`, and waits until each has, or its channel has ended, or
    /// `timeout` has passed. Returns the peers that did not confirm; their channels are shut down.
    pub fn ask_all(&self, ask: &Ask, timeout: Duration) -> Vec<PeerInfo> {
        let shared = &*self.shared;
        // The open channels are read, and asked, under the asks' lock: a channel that ends meanwhile drops its
        // asks after it left `live` (see `serve`), so none is left waiting on a channel that is gone.
        let targets: Vec<(u64, Arc<Mutex<TcpStream>>, PeerInfo)> = {
            let mut asked = lock(&shared.asked);
            let targets: Vec<_> = lock(&shared.live).iter().map(|(&ch, l)| (ch, l.writer.clone(), l.peer.clone())).collect();
            for (ch, ..) in &targets {
                asked.insert((*ch, ask.clone()));
            }
            targets
        };
        let frame = match ask {
            Ask::Revoke(request) => Frame::Revoke { request: request.clone() },
            Ask::Close => Frame::Close,
        };
        for (_, writer, _) in &targets {
            if send(writer, &frame, &mut Vec::new()).is_err() {
                // Its thread sees the end and drops the ask.
                let _ = lock(writer).shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + timeout;
        let mut asked = lock(&shared.asked);
        loop {
            let waiting = targets.iter().any(|(ch, ..)| asked.contains(&(*ch, ask.clone())));
            let now = Instant::now();
            if !waiting || now >= deadline {
                break;
            }
            asked = shared.confirmed.wait_timeout(asked, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        let silent: Vec<(Arc<Mutex<TcpStream>>, PeerInfo)> =
            targets.into_iter().filter(|(ch, ..)| asked.remove(&(*ch, ask.clone()))).map(|(_, w, p)| (w, p)).collect();
        drop(asked);
        // Shut down once the lock is released: a writer may be held by a send that is itself stuck.
        for (writer, _) in &silent {
            let _ = lock(writer).shutdown(Shutdown::Both);
        }
        silent.into_iter().map(|(_, p)| p).collect()
    }
}

impl ChannelServer {
    /// Stops listening and ends every channel (each one's end handled, see [`Events::closed`]) before it
    /// returns. Later calls do nothing.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.stop_admitting();
        self.listener.stop();
        if let Some(expiry) = lock(&self.expiry).take() {
            expiry.thread().unpark();
            let _ = expiry.join();
        }
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}


/// Hands the links of admissions let go to [`Events::closed`] (cut off, their resources released).
fn let_go(shared: &Shared, peers: Vec<PeerInfo>) {
    for peer in peers {
        // Its link never opened (the prefill gave up on it, or tried another transport): nothing was written.
        shared.events.closed(0, &peer, "its request channel never opened", true);
    }
}

/// How often admissions are looked at for expiry, also when no handshake comes.
const EXPIRE_EVERY: Duration = Duration::from_millis(100);

/// Lets go of expired admissions until the server stops: a link whose channel never opens holds its resources
/// (an RDMA queue pair, a same-host write grant) for `timeout`, not until the next handshake.
fn expire_admissions(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        // Woken early by `shutdown`.
        std::thread::park_timeout(EXPIRE_EVERY);
        let_go(shared, shared.pending.expired());
        for (request, channels) in shared.events.tick() {
            tell(shared, &channels, &Frame::Revoke { request });
        }
    }
}

/// Sends `frame` to each of `channels` that is open, waiting for no confirmation (one that comes is harmless); a
/// channel that cannot take it is shut down.
fn tell(shared: &Shared, channels: &[u64], frame: &Frame) {
    let writers: Vec<Arc<Mutex<TcpStream>>> = {
        let live = lock(&shared.live);
        channels.iter().filter_map(|ch| live.get(ch)).map(|l| l.writer.clone()).collect()
    };
    let mut out = Vec::new();
    for writer in writers {
        if send(&writer, frame, &mut out).is_err() {
            let _ = lock(&writer).shutdown(Shutdown::Both);
        }
    }
}

fn serve(mut stream: TcpStream, hello: Hello, shared: &Shared) {
    let channel = shared.next_channel.fetch_add(1, Ordering::Relaxed);
    let address = hello.origin.ip();
    let from = address.to_string();
    let greeted = greet(&mut stream, &hello.bytes, shared);
    let peer = match greeted {
        Ok(peer) => PeerInfo { name: format!("{} at {from}", peer.name), address: Some(address), ..peer },
        Err(e) => {
            if !shared.stop.load(Ordering::Acquire) {
                shared.log.error_from(&listener::host_of(address).to_string(), format!("request channel from {from} refused: {e}"));
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            shared.log.error(format!("request channel from {} closed: {e}", peer.name));
            return;
        }
    };
    // Registered before the revoked requests are read: a revoke either finds this channel open, or is among
    // those requests (see `Events::opened`).
    lock(&shared.live).insert(channel, Live { peer: peer.clone(), writer: writer.clone() });
    // A close that took its snapshot of the open channels before this one was added never asks it: it is
    // refused instead (the close marked the server closing before its snapshot).
    if shared.closing.load(Ordering::Acquire) {
        lock(&shared.live).remove(&channel);
        let _ = stream.shutdown(Shutdown::Both);
        shared.events.closed(channel, &peer, "the decode is closing", true);
        return;
    }
    let mut goodbye = false;
    let why = match run(&mut stream, shared, channel, &peer, &writer, &mut goodbye) {
        Ok(()) => "it closed".to_string(),
        Err(e) => e.message().to_string(),
    };
    shared.events.ending(&peer, goodbye);
    lock(&shared.live).remove(&channel);
    let _ = stream.shutdown(Shutdown::Both);
    // The peer's end is handled (its data path cut off) before anyone waiting on its confirmation goes on.
    shared.events.closed(channel, &peer, &why, goodbye);
    lock(&shared.asked).retain(|(ch, _)| *ch != channel);
    shared.confirmed.notify_all();
}

/// Admits a connection by its hello: the token it presents is consumed.
fn greet(stream: &mut TcpStream, hello: &[u8], shared: &Shared) -> Result<PeerInfo> {
    let setup = |e| Error::io("configuring a request channel", e);
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_write_timeout(Some(shared.timeout)).map_err(setup)?;
    let hello: &[u8; admission::HELLO_LEN] = hello.try_into().map_err(|_| Error::protocol("a request-channel hello of the wrong length"))?;
    let hello = ConnectionHello::decode(frame::HELLO_MAGIC, hello)?;
    if shared.closing.load(Ordering::Acquire) {
        return Err(Error::new(ErrorCode::Closed, "the decode is closing"));
    }
    shared.pending.take(&hello).map_err(|refused| {
        // Expired, or opened by someone who saw the token but does not hold KVCACHE_AUTH_TOKEN: its link is cut
        // off (the real prefill's channel can no longer open either).
        let (e, gone) = refused.into_parts("request-channel");
        if let Some(peer) = gone {
            shared.events.closed(0, &peer, &format!("its request channel was refused: {e}"), true);
        }
        e
    })
}

fn run(
    stream: &mut TcpStream,
    shared: &Shared,
    channel: u64,
    peer: &PeerInfo,
    writer: &Arc<Mutex<TcpStream>>,
    goodbye: &mut bool,
) -> Result<()> {
    let mut out = Vec::new();
    for request in shared.events.opened(channel, peer) {
        send(writer, &Frame::WasRevoked { request }, &mut out)?;
    }
    send(writer, &Frame::Ready, &mut out)?;
    stream.set_read_timeout(Some(PING)).map_err(|e| Error::io("configuring a request channel", e))?;
    let miss = (PING * 3).max(MIN_MISS).max(shared.timeout);
    let max = Frame::max_len(shared.block_number);
    let mut body = Vec::new();
    let mut heard = Instant::now();
    loop {
        let mut idle = || {
            if shared.stop.load(Ordering::Acquire) {
                return Err(Error::new(ErrorCode::Closed, "the decode closed"));
            }
            if heard.elapsed() > miss {
                return Err(Error::new(ErrorCode::Timeout, format!("no word from the prefill for {} ms", miss.as_millis())));
            }
            Ok(())
        };
        let Some(frame) = read_frame(stream, max, shared.block_number, &mut body, &mut idle)? else { return Ok(()) };
        heard = Instant::now();
        match frame {
            Frame::Ping => {}
            Frame::Revoked { request } => confirm(shared, channel, Ask::Revoke(request)),
            // Confirms a `Close`; unasked, says the link is gone.
            Frame::Closed => {
                *goodbye = true;
                confirm(shared, channel, Ask::Close)
            }
            f if f.from_prefill() => shared.events.frame(channel, peer, f)?,
            f => return Err(Error::protocol(format!("the prefill sent a decode's frame ({f:?})"))),
        }
    }
}

fn confirm(shared: &Shared, channel: u64, ask: Ask) {
    lock(&shared.asked).remove(&(channel, ask));
    shared.confirmed.notify_all();
}

fn send(writer: &Mutex<TcpStream>, frame: &Frame, out: &mut Vec<u8>) -> Result<()> {
    frame.encode(out);
    lock(writer).write_all(out).map_err(|e| Error::io("sending on the request channel", e))
}

/// Reads one frame. `Ok(None)`: the peer closed between frames. While no frame is coming, `idle` runs at each
/// read timeout and may end the wait.
fn read_frame(
    stream: &mut TcpStream,
    max: usize,
    block_number: u32,
    body: &mut Vec<u8>,
    idle: &mut dyn FnMut() -> Result<()>,
) -> Result<Option<Frame>> {
    let mut len = [0u8; 4];
    if !fill(stream, &mut len, true, idle)? {
        return Ok(None);
    }
    let len = codec::frame_length(len);
    if len == 0 || len > max {
        return Err(Error::protocol(format!("a request-channel frame of {len} bytes (at most {max})")));
    }
    body.resize(len, 0);
    fill(stream, body, false, idle)?;
    Frame::decode(body, block_number).map(Some)
}

/// Fills `buf`. `Ok(false)`: the peer closed before the first byte, where `may_end`.
fn fill(stream: &mut TcpStream, buf: &mut [u8], may_end: bool, idle: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 && may_end => return Ok(false),
            Ok(0) => return Err(Error::new(ErrorCode::Transport, "the request channel closed in the middle of a frame")),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => idle()?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading the request channel", e)),
        }
    }
    Ok(true)
}

/// What the decode tells a prefill to do: revoke a request, or stop writing because it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    Revoke(RequestId),
    Close,
}

/// The prefill's end of one channel. Dropping it says goodbye and closes the channel.
///
/// Frames go out from a thread of the channel's own, in the order they were queued: a `Done` costs the write
/// that queues it a push, not a system call ([`ChannelClient::send`]). [`ChannelClient::send_now`] waits
/// until a frame and those before it are on the wire; [`ChannelClient::send_direct`] writes one at once, ahead
/// of the queue (a request's `Start`, which must precede its own bytes but not other requests' frames).
pub struct ChannelClient {
    queue: mpsc::Sender<Outgoing>,
    /// The connection's writing end, shared with the sending thread: one frame at a time.
    writer: Arc<Mutex<TcpStream>>,
    out: Vec<u8>,
    broken: Arc<AtomicBool>,
    /// Disconnected once the sending thread has ended; and how long `drop` waits for that.
    sent: mpsc::Receiver<()>,
    timeout: Duration,
}

/// What the channel's sending thread is given.
enum Outgoing {
    Frame(Frame),
    /// Answered once everything queued before it is on the wire (or could not be sent).
    Flush(mpsc::Sender<bool>),
    /// Says goodbye, then closes the channel.
    Goodbye,
}

impl ChannelClient {
    /// Opens the channel at `host:port` with the handshake's `token`. Returns it with the requests the decode
    /// has revoked, which this link must refuse from its first write. From then on a thread of its own answers
    /// the decode: `obey` runs for each directive, and the confirmation is sent once it returns; `ended` runs
    /// once the channel has ended, with why (also when this side ended it). It must be open by `deadline`; from
    /// then on a frame that cannot be written for `stall` ends it.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        host: &str,
        port: u16,
        token: u64,
        proof: [u8; 32],
        deadline: Instant,
        stall: Duration,
        obey: Arc<dyn Fn(&Directive) + Send + Sync>,
        ended: Box<dyn FnOnce(Error) + Send>,
    ) -> Result<(ChannelClient, Vec<RequestId>)> {
        let peer = format!("{host}:{port}");
        let addrs = (host, port).to_socket_addrs().map_err(|e| Error::invalid(format!("cannot resolve {peer}: {e}")))?;
        let mut last = Error::invalid(format!("{peer} resolves to no address"));
        let mut stream = None;
        let left = || deadline.saturating_duration_since(Instant::now());
        let late = || Error::new(ErrorCode::Timeout, format!("the request channel to {peer} did not open in time"));
        for addr in addrs {
            if left().is_zero() {
                return Err(late());
            }
            match TcpStream::connect_timeout(&addr, left()) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Error::io(&format!("opening the request channel to {addr}"), e),
            }
        }
        let mut stream = stream.ok_or(last)?;
        let setup = |e| Error::io("configuring the request channel", e);
        stream.set_nodelay(true).map_err(setup)?;
        let open_within = left().max(Duration::from_millis(1));
        stream.set_read_timeout(Some(open_within)).map_err(setup)?;
        stream.set_write_timeout(Some(open_within)).map_err(setup)?;
        let hello = ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token, proof };
        stream.write_all(&hello.encode()).map_err(|e| Error::io("greeting the request channel", e))?;
        let writer = Arc::new(Mutex::new(stream.try_clone().map_err(setup)?));
        let mut body = Vec::new();
        let mut revoked = Vec::new();
        let mut idle = || match Instant::now() < deadline {
            true => Ok(()),
            false => Err(late()),
        };
        loop {
            match read_frame(&mut stream, Frame::max_len(0), 0, &mut body, &mut idle)? {
                None => return Err(Error::new(ErrorCode::Rejected, format!("{peer} refused the request channel (its token is unknown or expired, or it keeps at most KVCACHE_MAX_PEERS links)"))),
                Some(Frame::Ready) => break,
                // Learned before the first write; the decode waits for no confirmation of these (and reads
                // nothing until `Ready`), so none is sent.
                Some(Frame::WasRevoked { request }) => revoked.push(request),
                // Asked while the channel opened (a revoke, or a close, racing it): confirmed like any other ask.
                Some(Frame::Revoke { request }) => {
                    send(&writer, &Frame::Revoked { request: request.clone() }, &mut Vec::new())?;
                    revoked.push(request);
                }
                Some(Frame::Close) => {
                    obey(&Directive::Close);
                    send(&writer, &Frame::Closed, &mut Vec::new())?;
                }
                Some(f) => return Err(Error::protocol(format!("{peer} opened the request channel with {f:?}"))),
            }
        }
        stream.set_read_timeout(Some(PING)).map_err(setup)?;
        stream.set_write_timeout(Some(stall)).map_err(setup)?;
        let broken = Arc::new(AtomicBool::new(false));
        let (queue, outgoing) = mpsc::channel();
        let (w, b) = (writer.clone(), broken.clone());
        let (stopped, sent) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("kvtransfer-channel-out {peer}"))
            .spawn(move || {
                send_queued(&w, &outgoing, &b);
                drop(stopped);
            })
            .map_err(|e| Error::io("starting the request channel's thread", e))?;
        let (q, b) = (queue.clone(), broken.clone());
        std::thread::Builder::new()
            .name(format!("kvtransfer-channel {peer}"))
            .spawn(move || {
                let outcome = answer(stream, &q, &*obey);
                // Told before the channel reads as broken: a call that then finds it broken has nothing to add.
                ended(outcome.err().unwrap_or_else(|| Error::new(ErrorCode::Transport, "the decode closed the request channel")));
                b.store(true, Ordering::Release);
            })
            .map_err(|e| Error::io("starting the request channel's thread", e))?;
        Ok((ChannelClient { queue, writer, out: Vec::new(), broken, sent, timeout: stall }, revoked))
    }

    /// Whether the channel has ended (the decode closed it, or went away): the link must be rebuilt.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Queues `frame`, after every frame queued before it.
    pub fn send(&mut self, frame: Frame) -> Result<()> {
        if self.is_broken() || self.queue.send(Outgoing::Frame(frame)).is_err() {
            self.broken.store(true, Ordering::Release);
            return Err(Error::new(ErrorCode::Transport, "the request channel has ended"));
        }
        Ok(())
    }

    /// Writes `frame` at once, ahead of what is queued.
    pub fn send_direct(&mut self, frame: &Frame) -> Result<()> {
        if self.is_broken() {
            return Err(Error::new(ErrorCode::Transport, "the request channel has ended"));
        }
        let sent = send(&self.writer, frame, &mut self.out);
        if sent.is_err() {
            self.broken.store(true, Ordering::Release);
        }
        sent
    }

    /// Sends `frame` and returns once it, and every frame before it, is on the wire.
    pub fn send_now(&mut self, frame: Frame) -> Result<()> {
        self.send(frame)?;
        let (done, sent) = mpsc::channel();
        let flushed = self.queue.send(Outgoing::Flush(done)).is_ok() && sent.recv().unwrap_or(false);
        if !flushed {
            self.broken.store(true, Ordering::Release);
            return Err(Error::new(ErrorCode::Transport, "the request channel has ended"));
        }
        Ok(())
    }
}

impl Drop for ChannelClient {
    /// Says goodbye (the link that owned the channel is gone: it writes nothing more) after the frames queued
    /// before, waits (up to the timeout) until they are on the wire, then closes; the channel's threads stop.
    fn drop(&mut self) {
        if self.queue.send(Outgoing::Goodbye).is_ok() {
            let _ = self.sent.recv_timeout(self.timeout);
        }
    }
}

/// The prefill channel's sending thread: writes what is queued, in order, until goodbye (or the end of the
/// channel); then shuts the connection down, which ends the answering thread too.
fn send_queued(writer: &Mutex<TcpStream>, outgoing: &mpsc::Receiver<Outgoing>, broken: &AtomicBool) {
    let mut out = Vec::new();
    let mut ok = true;
    while let Some(item) = next_queued(outgoing) {
        match item {
            Outgoing::Frame(frame) if ok => {
                ok = send(writer, &frame, &mut out).is_ok();
                if !ok {
                    broken.store(true, Ordering::Release);
                    let _ = lock(writer).shutdown(Shutdown::Both);
                }
            }
            Outgoing::Frame(_) => {}
            Outgoing::Flush(done) => {
                let _ = done.send(ok);
            }
            Outgoing::Goodbye => {
                if ok {
                    let _ = send(writer, &Frame::Closed, &mut out);
                }
                break;
            }
        }
    }
    let _ = lock(writer).shutdown(Shutdown::Both);
}

/// After each frame the sending thread looks for the next one every `LOOK_EVERY` (plus the kernel's timer
/// slack, 50 µs by default) for `LINGER` before it sleeps until woken: while a prefill writes layer after layer,
/// queuing a `Done` costs the write a push onto the queue, not the wake-up of a sleeping thread (several µs where
/// waking another CPU is slow, as in a VM). A frame queued meanwhile waits up to one look before it leaves.
const LINGER: Duration = Duration::from_millis(1);
const LOOK_EVERY: Duration = Duration::from_micros(20);

/// The next item queued for the sending thread; `None` once every sender is gone.
fn next_queued(outgoing: &mpsc::Receiver<Outgoing>) -> Option<Outgoing> {
    let since = Instant::now();
    loop {
        match outgoing.try_recv() {
            Ok(item) => return Some(item),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if since.elapsed() < LINGER => std::thread::sleep(LOOK_EVERY),
            Err(mpsc::TryRecvError::Empty) => return outgoing.recv().ok(),
        }
    }
}

/// The prefill's channel thread: pings while idle, obeys the decode's directives and confirms them (after the
/// frames queued before).
fn answer(mut stream: TcpStream, queue: &mpsc::Sender<Outgoing>, obey: &(dyn Fn(&Directive) + Send + Sync)) -> Result<()> {
    let mut body = Vec::new();
    let ended = || Error::new(ErrorCode::Transport, "the request channel has ended");
    loop {
        let mut idle = || queue.send(Outgoing::Frame(Frame::Ping)).map_err(|_| ended());
        let Some(frame) = read_frame(&mut stream, Frame::max_len(0), 0, &mut body, &mut idle)? else { return Ok(()) };
        let (directive, confirmation) = match frame {
            Frame::Revoke { request } => (Directive::Revoke(request.clone()), Frame::Revoked { request }),
            Frame::Close => (Directive::Close, Frame::Closed),
            f => return Err(Error::protocol(format!("the decode sent {f:?} on the request channel"))),
        };
        obey(&directive);
        queue.send(Outgoing::Frame(confirmation)).map_err(|_| ended())?;
    }
}

/// A channel server whose events are recorded, for the tests of this module and of the communicator's sides.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::Config;

    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) frames: Mutex<Vec<Frame>>,
        pub(crate) closed: Mutex<Vec<String>>,
        pub(crate) revoked: Mutex<Vec<RequestId>>,
    }

    impl Events for Recorder {
        fn opened(&self, _: u64, _: &PeerInfo) -> Vec<RequestId> {
            lock(&self.revoked).clone()
        }
        fn frame(&self, _: u64, _: &PeerInfo, frame: Frame) -> Result<()> {
            lock(&self.frames).push(frame);
            Ok(())
        }
        fn closed(&self, _: u64, _: &PeerInfo, why: &str, _: bool) {
            lock(&self.closed).push(why.to_string());
        }
    }

    pub(crate) fn server(events: Arc<Recorder>) -> ChannelServer {
        let log = Arc::new(Logger::new(&Config::default(), "test".to_string()).unwrap());
        ChannelServer::start(&[[127, 0, 0, 1].into()], 8, Duration::from_secs(5), 4096, log, events).unwrap()
    }

    pub(crate) fn peer() -> PeerInfo {
        PeerInfo { name: "p".into(), slot: 0, ratio: 1, transport: TransportKind::Tcp, session: 1, process: None, instance: None, address: None, metrics: Default::default() }
    }

    /// Waits (up to 10 s) until `f` holds.
    pub(crate) fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn id(s: &str) -> RequestId {
        RequestId::new(s).unwrap()
    }

    #[test]
    fn frames_arrive_in_order_and_revokes_are_confirmed_after_obeying() {
        let events = Arc::new(Recorder::default());
        lock(&events.revoked).push(id("old"));
        let server = server(events.clone());
        let token = server.admit(peer(), |_| None);
        let obeyed = Arc::new(Mutex::new(Vec::new()));
        let o = obeyed.clone();
        let (mut client, revoked) =
            ChannelClient::connect("127.0.0.1", server.port(), token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), Arc::new(move |d: &Directive| lock(&o).push(d.clone())), Box::new(|_| {}))
                .unwrap();
        assert_eq!(revoked, [id("old")]);
        client.send(Frame::Start { request: id("a") }).unwrap();
        client.send(Frame::Done { request: id("a"), layer: 1, mark: 1, blocks: vec![3] }).unwrap();
        until("two frames", || lock(&events.frames).len() == 2);
        assert_eq!(lock(&events.frames)[1], Frame::Done { request: id("a"), layer: 1, mark: 1, blocks: vec![3] });
        let silent = server.ask_all(&Ask::Revoke(id("a")), Duration::from_secs(5));
        assert!(silent.is_empty());
        assert_eq!(*lock(&obeyed), [Directive::Revoke(id("a"))]);
        // Idle pings keep the channel open well past the ping interval.
        std::thread::sleep(PING * 4);
        assert!(lock(&events.closed).is_empty() && !client.is_broken());
        drop(client);
        until("the close", || lock(&events.closed).len() == 1);
    }

    #[test]
    fn a_token_opens_one_channel_and_strangers_none() {
        let events = Arc::new(Recorder::default());
        let server = server(events.clone());
        let token = server.admit(peer(), |_| None);
        let nothing = Arc::new(|_: &Directive| {});
        let err = ChannelClient::connect("127.0.0.1", server.port(), token ^ 1, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing.clone(), Box::new(|_| {})).err().unwrap();
        assert_eq!(err.code(), ErrorCode::Rejected);
        let first = ChannelClient::connect("127.0.0.1", server.port(), token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing.clone(), Box::new(|_| {})).unwrap();
        let again = ChannelClient::connect("127.0.0.1", server.port(), token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing.clone(), Box::new(|_| {})).err().unwrap();
        assert_eq!(again.code(), ErrorCode::Rejected);
        drop(first);
        server.stop_admitting();
        let late = server.admit(peer(), |_| None);
        assert!(ChannelClient::connect("127.0.0.1", server.port(), late, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing, Box::new(|_| {})).is_err());
    }

    #[test]
    fn connections_that_never_say_hello_do_not_keep_a_prefill_out() {
        crate::listener::raise_descriptor_limit(1 << 16);
        let flood = crate::listener::greeting_caps().0 + 8;
        if crate::listener::raise_descriptor_limit(1 << 16) < 3 * flood as u64 {
            eprintln!("skipped: too few descriptors allowed");
            return;
        }
        let events = Arc::new(Recorder::default());
        let server = server(events.clone());
        // More silent connections from this host than its allowance, and one trickling its hello byte by byte:
        // a prefill of this host still gets in, at once.
        let mut trickle = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        trickle.write_all(b"K").unwrap();
        let silent: Vec<TcpStream> = (0..flood).map(|_| TcpStream::connect(("127.0.0.1", server.port())).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let token = server.admit(peer(), |_| None);
        let started = Instant::now();
        let (client, _) = ChannelClient::connect("127.0.0.1", server.port(), token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), Arc::new(|_: &Directive| {}), Box::new(|_| {})).unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        // At its allowance a host's oldest waiting connection goes (the trickling one was the oldest).
        let mut byte = [0u8; 1];
        trickle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(matches!(trickle.read(&mut byte), Ok(0) | Err(_)), "the oldest connection is let go");
        let mut newest = silent.last().unwrap().try_clone().unwrap();
        newest.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let waited = Instant::now();
        assert!(matches!(newest.read(&mut byte), Ok(0) | Err(_)), "a silent connection is cut off at its deadline");
        assert!(waited.elapsed() > Duration::from_secs(1), "cut off at its deadline, not at once");
        drop((client, silent));
    }

    #[test]
    fn a_channel_opened_without_the_proof_is_refused_and_its_link_cut() {
        let events = Arc::new(Recorder::default());
        let server = server(events.clone());
        let token = server.admit(peer(), |_| Some([9; 32]));
        let nothing = Arc::new(|_: &Directive| {});
        let err = ChannelClient::connect("127.0.0.1", server.port(), token, [8; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing.clone(), Box::new(|_| {})).err().unwrap();
        assert_eq!(err.code(), ErrorCode::Rejected, "{err}");
        until("the cut-off", || lock(&events.closed).iter().any(|w| w.contains("without the proof")));
        // Nor does the right proof open it any more: the token was spent.
        assert!(ChannelClient::connect("127.0.0.1", server.port(), token, [9; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing.clone(), Box::new(|_| {})).is_err());
        let token = server.admit(peer(), |_| Some([9; 32]));
        ChannelClient::connect("127.0.0.1", server.port(), token, [9; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), nothing, Box::new(|_| {})).unwrap();
    }

    #[test]
    fn garbage_closes_the_channel_and_a_silent_peer_does_not_block_asks() {
        let events = Arc::new(Recorder::default());
        let server = server(events.clone());
        // A peer that opens the channel and then never answers.
        let token = server.admit(peer(), |_| None);
        let mut raw = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        raw.write_all(&ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token, proof: [0; 32] }.encode()).unwrap();
        let mut ready = [0u8; 5];
        raw.read_exact(&mut ready).unwrap();
        let started = Instant::now();
        let silent = server.ask_all(&Ask::Close, Duration::from_millis(300));
        assert_eq!(silent.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(3));
        until("the cut-off", || lock(&events.closed).len() == 1);
        // Garbage: a frame claiming 1 GiB.
        let token = server.admit(peer(), |_| None);
        let mut raw = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        raw.write_all(&ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token, proof: [0; 32] }.encode()).unwrap();
        raw.read_exact(&mut ready).unwrap();
        raw.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
        until("the refusal", || lock(&events.closed).len() == 2);
        assert!(lock(&events.closed)[1].contains("at most"), "{:?}", lock(&events.closed));
    }
}
