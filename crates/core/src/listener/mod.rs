//! A TCP listener for each of a decode's ports (control, TCP data, request channel), which may answer this
//! host's processes on Unix sockets too (the control port: there the kernel names the process, see
//! [`connection`]): one event loop (mio) per port accepts its connections and reads each one's first message, its hello, without a thread of its own;
//! a connection whose hello has come whole is handed to a thread of its own, which serves it. When stopped it
//! shuts every connection down and waits for each one's thread before it returns.
//!
//! Waiting for a hello costs a descriptor and a few bytes, so the caps can be large: at most
//! [`MAX_GREETING_PER_HOST`] connections of one host wait at once (a host is an IPv4 address, all of loopback,
//! or an IPv6 /64), and [`MAX_GREETING`] in all. At a host's cap its *oldest* waiting connection is closed, not
//! the newcomer, and past the overall cap the oldest of the host with the most waiting: a flood of silent
//! connections from one host (any local user, over loopback) cannot keep a prefill of that host out, since a
//! real hello comes within a round trip and the flood would have to open a host's cap of connections within it.
//! A hello has a deadline for the whole of it (one trickled in byte by byte is not waited for).
//!
//! After its hello a data or channel connection is served (at most `max` at once, each a thread). A control
//! connection stays a stranger's until its handshake ends: its thread, too, counts against its host, with
//! smaller caps ([`Stage::Conversing`]), and at them its host's oldest conversation is shut down.

pub mod connection;

pub use connection::{Connection, Origin};

use crate::sync::lock;
use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use mio::event::Source;
use mio::net::{TcpListener as MioListener, TcpStream as MioStream, UnixListener as MioLocalListener, UnixStream as MioLocalStream};
use mio::{Events, Interest, Poll, Registry, Token};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections of one port waiting for their hello; past that the oldest of the host with the most is closed.
/// Less where the process may open few descriptors ([`greeting_caps`]).
pub const MAX_GREETING: usize = 4096;
/// Connections of one host ([`host_of`]) that may wait for their hello on one port; at that, its oldest is
/// closed. Less where the process may open few descriptors ([`greeting_caps`]).
pub const MAX_GREETING_PER_HOST: usize = 1024;
/// Connections accepted on one turn of the event loop, before it reads hellos and looks at deadlines again.
const ACCEPTS_PER_TURN: usize = 256;
/// The longest a connection may take to say its whole hello.
pub const HELLO_TIME: Duration = Duration::from_secs(5);

/// How long the event loop waits after `accept` failed (out of descriptors, say).
const BACK_OFF: Duration = Duration::from_millis(100);
/// How long the event loop sleeps at most before it looks at deadlines and whether it must stop.
const POLL: Duration = Duration::from_millis(100);

/// How a port's hello (the first message of a connection) is delimited.
#[derive(Clone, Copy)]
pub enum HelloShape {
    /// Exactly this many bytes.
    Fixed(usize),
    /// A length (4 bytes, big-endian) and that many bytes. `length` reads the length from the first four bytes,
    /// `None` where it refuses them: the connection is then handed over with those four bytes alone, for its
    /// server to refuse with its reason.
    Framed { length: fn([u8; 4]) -> Option<usize> },
}

/// What becomes of a connection once its hello has come.
#[derive(Clone, Copy)]
pub enum Stage {
    /// It is served: at most `max` at once.
    Served,
    /// It goes on as a stranger's conversation (a handshake) on its thread, still counted against its host: at
    /// most `per_host` of one host (at that its oldest is shut down) and `all` in all.
    Conversing { per_host: usize, all: usize },
}

/// A connection's hello, as its server gets it.
pub struct Hello {
    /// The hello's bytes, as its [`HelloShape`] delimits them.
    pub bytes: Vec<u8>,
    /// When the hello time ends (a conversation must be over by then).
    pub deadline: Instant,
    /// Where the connection comes from.
    pub origin: Origin,
    /// The listening address and port it came to (for a Unix socket, the address and port it is named for).
    pub arrived: SocketAddr,
}

/// What serves each connection.
type Serve = dyn Fn(Connection, Hello) + Send + Sync;

/// Connections counted per host, oldest first: at a host's cap its oldest goes, and past the overall cap the
/// oldest of the host with the most (between equals, the one whose oldest has waited longest).
struct Crowd<T> {
    per_host: usize,
    all: usize,
    queue: VecDeque<(u64, IpAddr, T)>,
    counts: HashMap<IpAddr, usize>,
}

impl<T> Crowd<T> {
    fn new(per_host: usize, all: usize) -> Crowd<T> {
        Crowd { per_host, all, queue: VecDeque::new(), counts: HashMap::new() }
    }

    /// Counts `item` (`id`, of `host`) in; returns those it pushes out.
    fn admit(&mut self, id: u64, host: IpAddr, item: T) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        if self.counts.get(&host).is_some_and(|&n| n >= self.per_host) {
            out.extend(self.remove_oldest_of(host));
        }
        self.queue.push_back((id, host, item));
        *self.counts.entry(host).or_default() += 1;
        if self.queue.len() > self.all {
            let most = self.counts.values().copied().max().expect("not empty");
            let busiest = self.queue.iter().find(|(_, h, _)| self.counts[h] == most).map(|(_, h, _)| *h).expect("not empty");
            out.extend(self.remove_oldest_of(busiest));
        }
        out
    }

    fn remove_oldest_of(&mut self, host: IpAddr) -> Option<(u64, T)> {
        let i = self.queue.iter().position(|(_, h, _)| *h == host)?;
        self.take(i)
    }

    fn remove(&mut self, id: u64) -> Option<T> {
        let i = self.queue.iter().position(|(q, ..)| *q == id)?;
        self.take(i).map(|(_, item)| item)
    }

    fn take(&mut self, i: usize) -> Option<(u64, T)> {
        let (id, host, item) = self.queue.remove(i)?;
        match self.counts.get_mut(&host) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.counts.remove(&host);
            }
        }
        Some((id, item))
    }
}

struct Shared {
    /// What the listener serves, for logs ("control connection", "data connection", "request channel").
    what: &'static str,
    shape: HelloShape,
    stage: Stage,
    max: usize,
    hello_time: Duration,
    log: Arc<Logger>,
    stop: AtomicBool,
    /// The threads serving connections past their hello, with a handle on each one's socket.
    connections: Mutex<Vec<(Connection, JoinHandle<()>)>>,
    /// Connections served ([`Stage::Served`]), and those closed because `max` were.
    served: AtomicUsize,
    refused_at_max: AtomicU64,
    /// Conversations going on ([`Stage::Conversing`]), with a handle to shut each down.
    conversing: Mutex<Crowd<Connection>>,
}


/// A stream whose reads can be given a timeout.
pub trait TimedRead: Read {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl TimedRead for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl TimedRead for Connection {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        Connection::set_read_timeout(self, timeout)
    }
}

/// Fills `buf` from `stream` before `deadline`, however the bytes trickle in: `UnexpectedEof` where the peer
/// closed first, `TimedOut` where the deadline passed first. It changes the stream's read timeout.
pub fn read_before(stream: &mut impl TimedRead, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        // At most 250 ms at a time: a signal's EINTR, or a short read, never stretches the deadline much.
        stream.set_read_timeout(Some(left.min(Duration::from_millis(250))))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Listening sockets (one port, on each address), their event loop, and the threads serving connections.
pub struct Listener {
    port: u16,
    shared: Arc<Shared>,
    event_loop: Mutex<Option<JoinHandle<()>>>,
}

/// A listening socket.
enum Bound {
    Tcp(MioListener, SocketAddr),
    /// A Unix socket, with the address and port it is named for ([`connection::local_name`]).
    Local(MioLocalListener, SocketAddr),
}

/// A connection waiting for its hello.
enum Accepted {
    Tcp(MioStream),
    Local(MioLocalStream),
}

impl Bound {
    /// A connection, where it comes from, and the address it came to.
    fn accept(&self) -> std::io::Result<(Accepted, Origin, SocketAddr)> {
        match self {
            Bound::Tcp(l, at) => l.accept().map(|(s, addr)| (Accepted::Tcp(s), Origin::Network(addr), *at)),
            Bound::Local(l, at) => {
                let (s, _) = l.accept()?;
                let origin = connection::peer_process(&s)?;
                Ok((Accepted::Local(s), origin, *at))
            }
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Bound::Tcp(l, _) => l,
            Bound::Local(l, _) => l,
        }
    }
}

impl Accepted {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Accepted::Tcp(s) => s,
            Accepted::Local(s) => s,
        }
    }

    fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(self.source(), token, Interest::READABLE)
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(self.source());
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Accepted::Tcp(s) => s.read(buf),
            Accepted::Local(s) => s.read(buf),
        }
    }

    /// The connection as its server gets it (blocking again).
    fn into_connection(self) -> Connection {
        // SAFETY: the descriptor is taken out of the mio stream, which gives up owning it; the std stream of the
        // same kind owns it from here on (one owner, closed once).
        unsafe {
            match self {
                Accepted::Tcp(s) => Connection::from_raw_fd(false, s.into_raw_fd()),
                Accepted::Local(s) => Connection::from_raw_fd(true, s.into_raw_fd()),
            }
        }
    }
}

/// Binds `port` (0: one the system picks) on every one of `ips`, and, with `local`, the Unix socket of each
/// address and port ([`connection::local_name`]): a port picked on the first may be taken on another, so it
/// picks again, a few times.
fn bind_all(ips: &[IpAddr], port: u16, what: &str, local: Option<&str>) -> Result<Vec<Bound>> {
    let mut tries = if port == 0 { 8 } else { 1 };
    'again: loop {
        tries -= 1;
        let mut bound: Vec<TcpListener> = Vec::with_capacity(ips.len());
        for &ip in ips {
            let port = bound.first().and_then(|l| l.local_addr().ok()).map_or(port, |a| a.port());
            match TcpListener::bind((ip, port)) {
                Ok(l) => {
                    // The standard library listens with a backlog of 128: a burst of connections (a flood) would
                    // overflow it, and the kernel would drop others' too before the event loop sees them. Listening
                    // again on a listening socket only sets its backlog (the kernel caps it at somaxconn).
                    // SAFETY: `l` owns a valid listening socket for the length of the call.
                    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), MAX_GREETING as libc::c_int) };
                    bound.push(l)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 0 => continue 'again,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(Error::new(ErrorCode::Transport, format!("cannot listen for {what}s on {ip} port {port}: it is in use")))
                }
                Err(e) => return Err(Error::io(&format!("listening for {what}s on {ip}"), e)),
            }
        }
        let mut all = Vec::with_capacity(2 * bound.len());
        let setup = |e| Error::io(&format!("starting the {what} listener"), e);
        for l in bound {
            let addr = l.local_addr().map_err(setup)?;
            l.set_nonblocking(true).map_err(setup)?;
            all.push(Bound::Tcp(MioListener::from_std(l), addr));
            let Some(kind) = local else { continue };
            let name = connection::local_name(kind, addr);
            match connection::bind_local(&name) {
                Ok(l) => {
                    // SAFETY: as above, on a Unix socket `l` owns.
                    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), MAX_GREETING as libc::c_int) };
                    l.set_nonblocking(true).map_err(setup)?;
                    all.push(Bound::Local(MioLocalListener::from_std(l), addr))
                }
                // Another process took the name first: with a picked port, pick another.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 0 => continue 'again,
                // Taken for a port this process holds: a process of this host means to pass for this one.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(Error::new(
                        ErrorCode::Transport,
                        format!("cannot listen for {what}s of this host's processes on @{name}: another process holds it"),
                    ))
                }
                Err(e) => return Err(Error::io(&format!("listening for {what}s on @{name}"), e)),
            }
        }
        return Ok(all);
    }
}

impl Listener {
    /// Listens on `port` (0: one the system picks) of each of `ips`, and with `local` on the Unix socket of each
    /// address and port too ([`connection::local_name`]), for this host's processes, whose [`Origin`] the
    /// kernel gives (either kind of connection counts against the same caps, a process of this host as
    /// loopback). Each connection must say its hello, shaped as `shape`, within `hello_time` (and
    /// [`HELLO_TIME`]); then `serve` runs on a thread of its own with it, as a [`Connection`] or a `TcpStream`.
    /// With [`Stage::Served`] at most `max` are served at once (a hello past that is closed). `what` names the
    /// connections in logs.
    #[allow(clippy::too_many_arguments)]
    pub fn start<S: TryFrom<Connection> + 'static>(
        ips: &[IpAddr],
        port: u16,
        local: Option<&'static str>,
        what: &'static str,
        shape: HelloShape,
        stage: Stage,
        max: usize,
        hello_time: Duration,
        log: Arc<Logger>,
        serve: impl Fn(S, Hello) + Send + Sync + 'static,
    ) -> Result<Listener> {
        let listeners = bind_all(ips, port, what, local)?;
        // A `TcpStream` server gets no Unix connection: it binds none.
        let serve = move |connection: Connection, hello| {
            if let Ok(stream) = S::try_from(connection) {
                serve(stream, hello)
            }
        };
        let port = listeners.iter().find_map(|l| match l {
            Bound::Tcp(_, addr) => Some(addr.port()),
            Bound::Local(..) => None,
        });
        let (per_host, all) = match stage {
            Stage::Conversing { per_host, all } => (per_host, all),
            Stage::Served => (usize::MAX, usize::MAX),
        };
        let shared = Arc::new(Shared {
            what,
            shape,
            stage,
            max,
            hello_time: hello_time.min(HELLO_TIME),
            log,
            stop: AtomicBool::new(false),
            connections: Mutex::default(),
            served: AtomicUsize::new(0),
            refused_at_max: AtomicU64::new(0),
            conversing: Mutex::new(Crowd::new(per_host, all)),
        });
        let poll = Poll::new().map_err(|e| Error::io(&format!("starting the {what} listener"), e))?;
        let mut sockets = Vec::with_capacity(listeners.len());
        for (i, mut socket) in listeners.into_iter().enumerate() {
            let setup = |e| Error::io(&format!("starting the {what} listener"), e);
            poll.registry().register(socket.source(), Token(i), Interest::READABLE).map_err(setup)?;
            sockets.push(socket);
        }
        let (s, serve) = (shared.clone(), Arc::new(serve) as Arc<Serve>);
        let event_loop = std::thread::Builder::new()
            .name(format!("kvtransfer-listen {what}"))
            .spawn(move || {
                let unfinished = vec![false; sockets.len()];
                let (per_host, all) = greeting_caps();
                let crowd = Crowd::new(per_host, all);
                EventLoop { poll, sockets, unfinished, shared: s, serve, waiting: HashMap::new(), crowd, expiry: VecDeque::new(), next: 0 }.run()
            })
            .map_err(|e| Error::io(&format!("starting the {what} listener"), e))?;
        Ok(Listener { port: port.unwrap_or(0), shared, event_loop: Mutex::new(Some(event_loop)) })
    }

    /// The port, the same on every address.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections closed after their hello because `max` were served ([`Stage::Served`]).
    pub fn refused_at_max(&self) -> u64 {
        self.shared.refused_at_max.load(Ordering::Relaxed)
    }

    /// Stops accepting, shuts every connection down and waits for each one's thread. Later calls do nothing.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        // The event loop looks at `stop` at least every `POLL`; what waited for its hello goes with it.
        let Some(event_loop) = lock(&self.event_loop).take() else { return };
        let _ = event_loop.join();
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for (stream, _) in &connections {
            stream.shutdown();
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connection waiting for its hello.
struct Waiting {
    stream: Accepted,
    origin: Origin,
    arrived: SocketAddr,
    deadline: Instant,
    bytes: Vec<u8>,
    /// Bytes the hello has in all, once known.
    need: usize,
}

/// The listener's thread: accepts, reads hellos, hands connections over, closes those past their deadline.
struct EventLoop {
    poll: Poll,
    sockets: Vec<Bound>,
    /// Listening sockets whose last `accept` failed before their queue was empty: readiness is reported on a
    /// change only, so they are tried again on the loop's next turn rather than on the next connection.
    unfinished: Vec<bool>,
    shared: Arc<Shared>,
    serve: Arc<Serve>,
    waiting: HashMap<u64, Waiting>,
    /// The waiting connections per host.
    crowd: Crowd<()>,
    /// Waiting connections by deadline (all have the same hello time, so in the order they came).
    expiry: VecDeque<(Instant, u64)>,
    next: u64,
}

impl EventLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shared.stop.load(Ordering::Acquire) {
            // A listening socket with connections still queued is not reported again: no sleep then.
            let wait = if self.unfinished.contains(&true) { Duration::ZERO } else { POLL };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.shared.log.error_from(self.shared.what, format!("waiting for {}s: {e}", self.shared.what));
                    std::thread::sleep(BACK_OFF);
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    Token(i) if i < self.sockets.len() => self.accept(i),
                    Token(t) => self.read((t - self.sockets.len()) as u64),
                }
            }
            for i in 0..self.sockets.len() {
                if self.unfinished[i] && !events.iter().any(|e| e.token() == Token(i)) {
                    self.accept(i);
                }
            }
            self.expire();
            reap(&mut lock(&self.shared.connections));
        }
    }

    /// Accepts every connection waiting on listening socket `i`.
    fn accept(&mut self, i: usize) {
        let what = self.shared.what;
        self.unfinished[i] = false;
        for _ in 0..ACCEPTS_PER_TURN {
            let (stream, origin, arrived) = match self.sockets[i].accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // That connection's own trouble (it was reset, say): the next one may be fine.
                Err(e) if !matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the waiting connections' deadlines will free some.
                    self.shared.log.error_from(what, format!("accepting a {what}: {e}"));
                    self.unfinished[i] = true;
                    std::thread::sleep(BACK_OFF);
                    return;
                }
            };
            let id = self.next;
            self.next += 1;
            let host = host_of(origin.ip());
            for (closed, ()) in self.crowd.admit(id, host, ()) {
                self.close(closed);
            }
            let mut waiting = Waiting { stream, origin, arrived, deadline: Instant::now() + self.shared.hello_time, bytes: Vec::new(), need: 0 };
            let token = Token(id as usize + self.sockets.len());
            if waiting.stream.register(self.poll.registry(), token).is_err() {
                self.crowd.remove(id);
                continue;
            }
            waiting.need = match self.shared.shape {
                HelloShape::Fixed(n) => n,
                HelloShape::Framed { .. } => 4,
            };
            self.expiry.push_back((waiting.deadline, id));
            self.waiting.insert(id, waiting);
            // Its hello may be there already (edge-triggered: no event would say so again).
            self.read(id);
        }
        // More may be queued: the next turn goes on, after reads and deadlines have had theirs.
        self.unfinished[i] = true;
    }

    /// Reads what connection `id` has sent; hands it over once its hello is whole.
    fn read(&mut self, id: u64) {
        let shape = self.shared.shape;
        let Some(w) = self.waiting.get_mut(&id) else { return };
        let mut chunk = [0u8; 4096];
        loop {
            let want = (w.need - w.bytes.len()).min(chunk.len());
            if want == 0 {
                break;
            }
            match w.stream.read(&mut chunk[..want]) {
                Ok(0) => return self.close(id),
                Ok(n) => w.bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close(id),
            }
            if let (HelloShape::Framed { length }, 4) = (shape, w.bytes.len()) {
                let header: [u8; 4] = w.bytes[..4].try_into().expect("four bytes");
                match length(header) {
                    Some(len) => w.need = 4 + len,
                    // Handed over as it is: its server refuses it, saying why.
                    None => break,
                }
            }
        }
        let Some(mut w) = self.waiting.remove(&id) else { return };
        self.crowd.remove(id);
        w.stream.deregister(self.poll.registry());
        self.hand_over(w);
    }

    /// Serves a connection whose hello has come, on a thread of its own, if it may be.
    fn hand_over(&mut self, w: Waiting) {
        let shared = &self.shared;
        let what = shared.what;
        let host = host_of(w.origin.ip());
        let stream = w.stream.into_connection();
        let (Ok(()), Ok(handle)) = (stream.set_nonblocking(false), stream.try_clone()) else { return };
        let slot = match shared.stage {
            Stage::Served => {
                let counted = shared.served.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < shared.max).then_some(n + 1));
                if counted.is_err() {
                    shared.refused_at_max.fetch_add(1, Ordering::Relaxed);
                    let max = shared.max;
                    shared.log.error_from(&host.to_string(), format!("refused a {what} from {}: {max} are open (KVCACHE_MAX_PEERS)", w.origin));
                    stream.shutdown();
                    return;
                }
                Slot::Served(shared.clone())
            }
            Stage::Conversing { .. } => {
                let Ok(shut) = stream.try_clone() else { return };
                let id = self.next;
                self.next += 1;
                for (_, pushed) in lock(&shared.conversing).admit(id, host, shut) {
                    pushed.shutdown();
                }
                Slot::Conversing(shared.clone(), id)
            }
        };
        let hello = Hello { bytes: w.bytes, deadline: w.deadline, origin: w.origin, arrived: w.arrived };
        let serve = self.serve.clone();
        // The slot is given back when the thread ends, however it ends (a panic in `serve` included), or here
        // if it never starts.
        let thread = std::thread::Builder::new().name(format!("kvtransfer {what}")).spawn(move || {
            let _slot = slot;
            serve(stream, hello);
        });
        if let Ok(thread) = thread {
            lock(&shared.connections).push((handle, thread));
        }
    }

    fn close(&mut self, id: u64) {
        if let Some(mut w) = self.waiting.remove(&id) {
            w.stream.deregister(self.poll.registry());
        }
        self.crowd.remove(id);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            self.close(id);
        }
    }
}

/// What a served connection holds until its thread ends.
enum Slot {
    Served(Arc<Shared>),
    Conversing(Arc<Shared>, u64),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self {
            Slot::Served(shared) => {
                shared.served.fetch_sub(1, Ordering::AcqRel);
            }
            Slot::Conversing(shared, id) => {
                lock(&shared.conversing).remove(*id);
            }
        }
    }
}

/// How many connections may wait for their hello on one port, per host and in all: [`MAX_GREETING_PER_HOST`]
/// and [`MAX_GREETING`], or, where the process may open few descriptors, an eighth of its limit in all (a
/// decode has three ports, and the engine needs most descriptors for itself) and half of that per host. Read
/// when a port starts listening.
pub fn greeting_caps() -> (usize, usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit`, which lives on this frame.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let room = if known { usize::try_from(limit.rlim_cur / 8).unwrap_or(usize::MAX) } else { MAX_GREETING };
    let all = room.clamp(16, MAX_GREETING);
    (MAX_GREETING_PER_HOST.min(all / 2), all)
}

/// Lets go of the connections whose thread has ended (their descriptors with them).
fn reap(connections: &mut Vec<(Connection, JoinHandle<()>)>) {
    connections.retain(|(_, t)| !t.is_finished());
}

/// The host a connection counts against: its IPv4 address, one host for all of loopback (any process of this
/// machine can pick any 127.x.y.z), an IPv6 /64 (what one site is usually given).
pub fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => host_of(IpAddr::V4(v4)),
            None if v6.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        v4 => v4,
    }
}

/// Raises this process's descriptor limit toward `want` (as far as its hard limit allows); returns the limit now.
/// For a program that expects many connections (the waiting caps follow the limit: [`greeting_caps`]), and the
/// tests and benches that flood a decode.
pub fn raise_descriptor_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write one valid `rlimit`.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::io::Write;

    #[test]
    fn a_host_is_an_ipv4_address_all_of_loopback_or_an_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(host_of(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(host_of(ip("127.0.0.2")), ip("127.0.0.1"));
        assert_eq!(host_of(ip("::1")), ip("127.0.0.1"));
        assert_eq!(host_of(ip("::ffff:127.9.9.9")), ip("127.0.0.1"));
        assert_eq!(host_of(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(host_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn a_crowd_lets_its_oldest_go_per_host_and_past_its_cap_the_busiest_hosts() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), [10, 0, 0, 3].into());
        let mut crowd = Crowd::new(2, 4);
        assert!(crowd.admit(1, a, ()).is_empty() && crowd.admit(2, a, ()).is_empty());
        // At a host's cap its oldest goes, the newcomer stays.
        assert_eq!(crowd.admit(3, a, ()), [(1, ())]);
        assert!(crowd.admit(4, b, ()).is_empty() && crowd.admit(5, c, ()).is_empty());
        // Past the overall cap: the oldest of the host with the most (a: 2, 3).
        assert_eq!(crowd.admit(6, b, ()), [(2, ())]);
        assert_eq!(crowd.remove(3), Some(()));
        assert_eq!(crowd.remove(3), None);
        assert!(crowd.admit(7, a, ()).is_empty());
    }

    fn log() -> Arc<Logger> {
        Arc::new(Logger::new(&Config::default(), "test".to_string()).unwrap())
    }

    /// An echo server whose hello is one byte, serving at most `max`.
    fn echo(max: usize) -> Listener {
        Listener::start(&[[127, 0, 0, 1].into()], 0, None, "test connection", HelloShape::Fixed(1), Stage::Served, max, HELLO_TIME, log(), |mut s: TcpStream, hello| {
            s.write_all(&hello.bytes).unwrap();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        })
        .unwrap()
    }

    fn said_back(s: &mut TcpStream, byte: u8) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 1];
        s.write_all(&[byte]).is_ok() && s.read_exact(&mut got).is_ok() && got == [byte]
    }

    fn closed(s: &mut TcpStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_))
    }

    #[test]
    fn each_connection_is_served_and_stop_ends_them_all() {
        let listener = echo(2);
        // Connections that say nothing do not count against the two served.
        let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", listener.port())).unwrap()).collect();
        let mut a = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        assert!(said_back(&mut a, b'x') && said_back(&mut b, b'x'));
        // A third that says its hello is over the cap: closed.
        let mut c = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        c.write_all(b"x").unwrap();
        assert!(closed(&mut c), "a third is refused");
        // Once one of the two has gone, another takes its place.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut d = loop {
            let mut d = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
            if said_back(&mut d, b'y') {
                break d;
            }
            assert!(Instant::now() < deadline, "no room after a connection ended");
            std::thread::sleep(Duration::from_millis(50));
        };
        listener.stop();
        for s in [&mut b, &mut d] {
            assert!(closed(s), "stop ends every connection");
        }
        drop(silent);
    }

    #[test]
    fn a_host_full_of_silent_connections_still_lets_its_newcomer_in_and_costs_no_threads() {
        raise_descriptor_limit(1 << 16);
        let flood = greeting_caps().0 + 16;
        if raise_descriptor_limit(1 << 16) < 3 * flood as u64 {
            eprintln!("skipped: too few descriptors allowed");
            return;
        }
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let listener = echo(8);
        let before = threads();
        let mut silent: Vec<TcpStream> = (0..flood).map(|_| TcpStream::connect(("127.0.0.1", listener.port())).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        assert!(threads() <= before + 1, "{} threads with {flood} silent connections, {before} before", threads());
        // The host's oldest went, not its newest.
        assert!(closed(&mut silent[0]), "the oldest silent connection is let go");
        let started = Instant::now();
        let mut newcomer = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        assert!(said_back(&mut newcomer, b'n'), "a newcomer of a full host is served");
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        let newest = silent.last_mut().unwrap();
        newest.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(matches!(newest.read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock), "the newest silent one still waits");
    }

    #[test]
    fn a_framed_hello_is_read_whole_and_a_refused_length_handed_over_as_it_is() {
        fn length(header: [u8; 4]) -> Option<usize> {
            let n = u32::from_be_bytes(header) as usize;
            (n <= 16).then_some(n)
        }
        let listener = Listener::start(&[[127, 0, 0, 1].into()], 0, None, "test connection", HelloShape::Framed { length }, Stage::Conversing { per_host: 4, all: 8 }, 8, HELLO_TIME, log(), |mut s: TcpStream, hello| {
            let _ = s.write_all(&(hello.bytes.len() as u32).to_be_bytes());
        })
        .unwrap();
        let ask = |bytes: &[u8]| {
            let mut s = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
            // Trickled in three pieces.
            for part in bytes.chunks(bytes.len().div_ceil(3)) {
                s.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut got = [0u8; 4];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.read_exact(&mut got).unwrap();
            u32::from_be_bytes(got)
        };
        assert_eq!(ask(&[0, 0, 0, 5, 1, 2, 3, 4, 5]), 9);
        assert_eq!(ask(&[0, 0, 1, 0]), 4, "a length it refuses: the four bytes alone");
    }

    #[test]
    fn a_conversation_past_its_hosts_cap_shuts_the_oldest_down() {
        let listener = Listener::start(&[[127, 0, 0, 1].into()], 0, None, "test connection", HelloShape::Fixed(1), Stage::Conversing { per_host: 2, all: 8 }, 8, HELLO_TIME, log(), |mut s: TcpStream, _| {
            let _ = s.write_all(b"!");
            let _ = s.read(&mut [0u8; 1]);
        })
        .unwrap();
        let mut talking: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut s = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
                s.write_all(b"?").unwrap();
                let mut got = [0u8; 1];
                s.read_exact(&mut got).unwrap();
                s
            })
            .collect();
        assert!(closed(&mut talking[0]), "the oldest conversation of the host is shut down");
        talking[2].set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(matches!(talking[2].read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock), "the newest goes on");
    }

    #[test]
    fn a_panic_while_serving_gives_its_place_back() {
        let listener = Listener::start(&[[127, 0, 0, 1].into()], 0, None, "test connection", HelloShape::Fixed(1), Stage::Served, 1, HELLO_TIME, log(), |mut s: TcpStream, hello| {
            if hello.bytes == b"p" {
                panic!("a bug while serving");
            }
            let _ = s.write_all(b"!");
        })
        .unwrap();
        for _ in 0..3 {
            let mut s = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
            s.write_all(b"p").unwrap();
            assert!(closed(&mut s));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut s = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        s.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut got).unwrap();
    }
}
