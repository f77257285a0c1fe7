//! A TCP listener that serves each connection on a thread of its own: the one pattern behind a decode's control
//! port, its data port (the TCP transport) and its request-channel port. It listens on one port of each of the decode's addresses,
//! caps the connections it keeps, backs off when `accept` fails (out of descriptors, say) instead of spinning,
//! and, when stopped, shuts every connection down and waits for its thread before it returns.
//!
//! Until a connection has said its hello it is a [`Greeting`]: it has a deadline for the whole hello, at most
//! [`MAX_GREETING_PER_HOST`] of one host wait at once (more are closed before they get a thread; a host is an
//! IPv4 address, all of loopback, or an IPv6 /64), and past [`MAX_GREETING`] waiting the oldest connection of
//! the host with the most waiting is closed. So connections that never say a hello (a flood, or a stranger
//! without a token) hold a bounded number of threads and descriptors, and a flood from a few hosts crowds out
//! those hosts, not the others.

use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections that have not said their hello yet; past that the oldest of the host with the most is closed.
pub const MAX_GREETING: usize = 128;
/// Connections from one host ([`host_of`]) that may be waiting to say their hello; more are closed at once.
pub const MAX_GREETING_PER_HOST: usize = 32;
/// The longest a connection may take to say its whole hello.
pub const HELLO_TIME: Duration = Duration::from_secs(5);

/// How long the accept loop waits after `accept` failed.
const BACK_OFF: Duration = Duration::from_millis(100);
/// How long the accept loop waits for a connection before it looks whether it must stop.
const POLL: Duration = Duration::from_millis(100);

struct Shared {
    /// What the listener serves, for logs ("control connection", "data connection", "request channel").
    what: &'static str,
    max: usize,
    hello_time: Duration,
    log: Arc<Logger>,
    stop: AtomicBool,
    connections: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    /// Connections past their hello, still served: at most `max`.
    served: AtomicUsize,
    /// Connections that have not said their hello yet, oldest first, with their host.
    greeting: Mutex<VecDeque<(u64, IpAddr, TcpStream)>>,
    next_greeting: AtomicU64,
}

/// A connection that has not said its hello yet, as its serving thread sees it.
pub struct Greeting<'a> {
    shared: &'a Shared,
    id: u64,
    deadline: Instant,
    /// Set once the connection counts among those served (see [`Greeting::passed`]).
    served: &'a AtomicBool,
}

impl Greeting<'_> {
    /// Reads the hello into `buf` before the deadline: a hello trickled in byte by byte is not waited for.
    pub fn read_hello(&self, stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
        read_before(stream, buf, self.deadline).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::new(ErrorCode::Transport, "closed before its hello"),
            ErrorKind::TimedOut => Error::new(ErrorCode::Timeout, "no hello in time"),
            _ => Error::io("reading a hello", e),
        })
    }

    /// When the whole hello must have been read.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Ends the hello stage: the connection now counts among the at most `max` served. `Rejected` where it was
    /// closed meanwhile to make room for newer ones, or where `max` are served already (what it presented must
    /// then not be used).
    pub fn passed(&self) -> Result<()> {
        let mut waiting = lock(&self.shared.greeting);
        let before = waiting.len();
        waiting.retain(|(id, ..)| *id != self.id);
        if waiting.len() == before {
            return Err(Error::new(ErrorCode::Rejected, "closed to make room for newer connections before its hello"));
        }
        let max = self.shared.max;
        let counted = self.shared.served.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        if counted.is_err() {
            return Err(Error::new(ErrorCode::Rejected, format!("{max} are open already (KVCACHE_MAX_PEERS)")));
        }
        self.served.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for Greeting<'_> {
    fn drop(&mut self) {
        lock(&self.shared.greeting).retain(|(id, ..)| *id != self.id);
    }
}

/// Fills `buf` from `stream` before `deadline`, however the bytes trickle in: `UnexpectedEof` where the peer
/// closed first, `TimedOut` where the deadline passed first. It changes the stream's read timeout.
pub fn read_before(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
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

/// Listening sockets (one port, on each address) and the threads serving their connections.
pub struct Listener {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    accept: Mutex<Vec<JoinHandle<()>>>,
}

/// Binds `port` (0: one the system picks) on every one of `ips`: a port picked on the first may be taken on
/// another, so it picks again, a few times.
fn bind_all(ips: &[IpAddr], port: u16, what: &str) -> Result<Vec<TcpListener>> {
    let mut tries = if port == 0 { 8 } else { 1 };
    'again: loop {
        tries -= 1;
        let mut bound: Vec<TcpListener> = Vec::with_capacity(ips.len());
        for &ip in ips {
            let port = bound.first().and_then(|l| l.local_addr().ok()).map_or(port, |a| a.port());
            match TcpListener::bind((ip, port)) {
                Ok(l) => bound.push(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 0 => continue 'again,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(Error::new(ErrorCode::Transport, format!("cannot listen for {what}s on {ip} port {port}: it is in use")))
                }
                Err(e) => return Err(Error::io(&format!("listening for {what}s on {ip}"), e)),
            }
        }
        return Ok(bound);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Listener {
    /// Listens on `port` (0: one the system picks) of each of `ips` and runs `serve` on a new thread for each
    /// connection;
    /// each must say its hello within `hello_time` (and [`HELLO_TIME`]), and at most `max` are served past it
    /// ([`Greeting::passed`]). `what` names the connections in logs.
    pub fn start(
        ips: &[IpAddr],
        port: u16,
        what: &'static str,
        max: usize,
        hello_time: Duration,
        log: Arc<Logger>,
        serve: impl Fn(TcpStream, Greeting<'_>) + Send + Sync + 'static,
    ) -> Result<Listener> {
        let listeners = bind_all(ips, port, what)?;
        let addrs = listeners.iter().map(|l| l.local_addr()).collect::<std::io::Result<Vec<_>>>();
        let addrs = addrs.map_err(|e| Error::io(&format!("reading the {what} port"), e))?;
        let shared = Arc::new(Shared {
            what,
            max,
            hello_time: hello_time.min(HELLO_TIME),
            log,
            stop: AtomicBool::new(false),
            connections: Mutex::default(),
            served: AtomicUsize::new(0),
            greeting: Mutex::default(),
            next_greeting: AtomicU64::new(1),
        });
        let serve: Arc<Serve> = Arc::new(serve);
        let listener = Listener { addrs, shared: shared.clone(), accept: Mutex::default() };
        for socket in listeners {
            let (s, serve) = (shared.clone(), serve.clone());
            let accept = std::thread::Builder::new()
                .name(format!("kvtransfer-accept {what}"))
                .spawn(move || accept_loop(socket, &s, serve))
                .map_err(|e| Error::io(&format!("starting the {what} listener"), e))?;
            lock(&listener.accept).push(accept);
        }
        Ok(listener)
    }

    /// The port, the same on every address.
    pub fn port(&self) -> u16 {
        self.addrs.first().map_or(0, |a| a.port())
    }

    /// Stops accepting, shuts every connection down and waits for each one's thread. Later calls do nothing.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let accepts = std::mem::take(&mut *lock(&self.accept));
        if accepts.is_empty() {
            return;
        }
        // Each accept loop looks at `stop` at least every `POLL`.
        for accept in accepts {
            let _ = accept.join();
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for (stream, _) in &connections {
            let _ = stream.shutdown(Shutdown::Both);
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

/// What serves each connection.
type Serve = dyn Fn(TcpStream, Greeting<'_>) + Send + Sync;

fn accept_loop(listener: TcpListener, shared: &Arc<Shared>, serve: Arc<Serve>) {
    let what = shared.what;
    // Never blocked in accept: stopping needs no connection to wake it (which could fail).
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let mut ready = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !shared.stop.load(Ordering::Acquire) {
        // SAFETY: one valid pollfd, naming the listener's descriptor, which lives as long as `listener`.
        if unsafe { libc::poll(&mut ready, 1, POLL.as_millis() as i32) } <= 0 {
            // A quiet moment: let go of the connections that have ended.
            reap(&mut lock(&shared.connections));
            continue;
        }
        let stream = match listener.accept().and_then(|(s, _)| s.set_nonblocking(false).map(|()| s)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                shared.log.error_from(what, format!("accepting a {what}: {e}"));
                std::thread::sleep(BACK_OFF);
                reap(&mut lock(&shared.connections));
                continue;
            }
        };
        let mut connections = lock(&shared.connections);
        reap(&mut connections);
        // Those served, and those saying their hello (which never crowd out the served: see `passed`).
        if connections.len() >= connections_cap(shared) {
            drop(connections);
            shared.log.error_from(what, format!("refused a {what}: {} are open", connections_cap(shared)));
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(handle) = stream.try_clone() else { continue };
        let Some(id) = start_greeting(shared, &stream) else { continue };
        let (serve, s) = (serve.clone(), shared.clone());
        let deadline = Instant::now() + shared.hello_time;
        let thread = std::thread::Builder::new().name(format!("kvtransfer {what}")).spawn(move || {
            let served = AtomicBool::new(false);
            serve(stream, Greeting { shared: &s, id, deadline, served: &served });
            if served.load(Ordering::Acquire) {
                s.served.fetch_sub(1, Ordering::AcqRel);
            }
        });
        match thread {
            Ok(thread) => connections.push((handle, thread)),
            Err(_) => lock(&shared.greeting).retain(|(g, ..)| *g != id),
        }
    }
}

/// Lets go of the connections whose thread has ended (their descriptors with them).
fn reap(connections: &mut Vec<(TcpStream, JoinHandle<()>)>) {
    connections.retain(|(_, t)| !t.is_finished());
}

/// How many connections a listener keeps at once: those served and those saying their hello.
fn connections_cap(shared: &Shared) -> usize {
    shared.max + MAX_GREETING
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

/// Counts `stream` among the connections waiting for their hello: `None` (and the connection closed) where
/// its host has its allowance waiting already. Past the overall cap, the oldest connection of the host with the
/// most waiting is closed.
fn start_greeting(shared: &Shared, stream: &TcpStream) -> Option<u64> {
    let what = shared.what;
    let ip = stream.peer_addr().ok()?.ip();
    let host = host_of(ip);
    let clone = stream.try_clone().ok()?;
    let mut waiting = lock(&shared.greeting);
    if waiting.iter().filter(|(_, h, _)| *h == host).count() >= MAX_GREETING_PER_HOST {
        drop(waiting);
        shared.log.error_from(&host.to_string(), format!("refused a {what} from {ip}: {MAX_GREETING_PER_HOST} of its host's connections are waiting to say their hello"));
        let _ = stream.shutdown(Shutdown::Both);
        return None;
    }
    let id = shared.next_greeting.fetch_add(1, Ordering::Relaxed);
    waiting.push_back((id, host, clone));
    if waiting.len() > MAX_GREETING {
        // The host with the most waiting; between equals, the one whose oldest has waited longest.
        let mut counts: Vec<(IpAddr, usize)> = Vec::new();
        for (_, h, _) in waiting.iter() {
            match counts.iter_mut().find(|(c, _)| c == h) {
                Some((_, n)) => *n += 1,
                None => counts.push((*h, 1)),
            }
        }
        let most = counts.iter().map(|&(_, n)| n).max().expect("not empty");
        let busiest = counts.iter().find(|&&(_, n)| n == most).map(|&(h, _)| h).expect("not empty");
        let oldest = waiting.iter().position(|(_, h, _)| *h == busiest).expect("the busiest host waits");
        let (_, _, closed) = waiting.remove(oldest).expect("a position in the queue");
        let _ = closed.shutdown(Shutdown::Both);
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    use crate::config::Config;
    use std::io::{Read, Write};

    #[test]
    fn each_connection_is_served_and_stop_ends_them_all() {
        let log = Arc::new(Logger::new(&Config::default(), "test".to_string()).unwrap());
        // A one-byte hello, then an echo; at most two served.
        let listener = Listener::start(&[[127, 0, 0, 1].into()], 0, "test connection", 2, HELLO_TIME, log, |mut s, greeting| {
            let mut b = [0u8; 1];
            if greeting.read_hello(&mut s, &mut b).is_err() || greeting.passed().is_err() {
                return;
            }
            s.write_all(&b).unwrap();
            while s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        })
        .unwrap();
        // Connections that say nothing do not count against the two served.
        let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", listener.port())).unwrap()).collect();
        let mut a = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        for s in [&mut a, &mut b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"x").unwrap();
            let mut got = [0u8; 1];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"x");
        }
        // A third that says its hello is over the cap: closed.
        let mut c = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"x").unwrap();
        assert!(matches!(c.read(&mut [0u8; 1]), Ok(0) | Err(_)), "a third is refused");
        // Once one of the two has gone, another takes its place.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut d = loop {
            let mut d = TcpStream::connect(("127.0.0.1", listener.port())).unwrap();
            d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            d.write_all(b"y").unwrap();
            let mut got = [0u8; 1];
            if d.read_exact(&mut got).is_ok() {
                break d;
            }
            assert!(Instant::now() < deadline, "no room after a connection ended");
            std::thread::sleep(Duration::from_millis(50));
        };
        listener.stop();
        for s in [&mut b, &mut d] {
            assert!(matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_)), "stop ends every connection");
        }
        drop(silent);
    }
}
