//! The control plane's channel: the decode side answers handshakes on its port ([`ControlServer`]); the prefill
//! side opens one short connection per handshake ([`ControlClient`]). On the wire each message is a frame of the
//! ports' one codec ([`crate::codec`]): its length and its bytes; requests (at most [`MAX_REQUEST_BYTES`]) and replies (at most
//! [`MAX_MESSAGE_BYTES`]) alternate.
//!
//! A prefill that dials an address of its own host connects over the Unix socket the decode holds beside that
//! address and port ([`listener::connection::local_name`]) where there is one: the decode then knows which
//! process it is from the kernel ([`Origin::Process`]), which is what the same-host transports need. Over TCP
//! a peer is only an address, whatever its hello claims.
//! What the messages say is [`crate::wire`]'s business; this module only carries bytes, bounded in size, time
//! and number.
//!
//! A control connection is served by the same [`Listener`] as the data and request-channel ports: its first
//! request (the greeting, at most [`MAX_GREETING_BYTES`]) is read by the listener's event loop, without a thread;
//! then a thread answers it and reads the rest. All its requests, at most [`MAX_REQUESTS`], must arrive within
//! the hello time, each reply must be taken by then too, and the connection counts against its host until it
//! ends: at most [`CONVERSATIONS_PER_HOST`] of one host go on at once (at that its oldest is shut down) and
//! [`CONVERSATIONS`] in all. So the control port holds a bounded number of threads, descriptors and bytes
//! whatever strangers do (they cannot authenticate before the handshake's last message, so nothing here is
//! served for longer), and a flood from one host cannot keep another prefill of that host out.

pub mod handshake;
pub mod negotiation;

use crate::codec;
use crate::error::{Error, ErrorCode, Result};
use crate::listener::connection::{self, Connection, Origin};
use crate::listener::{self, host_of, Hello, HelloShape, Listener, Stage};
use crate::log::Logger;
use crate::net;
use crate::wire::{self, Reply, MAX_MESSAGE_BYTES};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests one control connection may make: a handshake's greeting and hello. The connection is closed after.
pub const MAX_REQUESTS: usize = 2;

/// The longest request (a greeting or a hello; a prefill's are under 1 KiB): what a stranger's connection can
/// make the decode hold.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The longest first request (a greeting is under 200 bytes): what a waiting connection can make the decode hold.
pub const MAX_GREETING_BYTES: usize = 4 << 10;

/// Handshakes of one host going on at once past their greeting; at that, its oldest is shut down.
pub const CONVERSATIONS_PER_HOST: usize = 64;
/// Handshakes going on at once past their greeting (each a thread, for at most the hello time).
pub const CONVERSATIONS: usize = 512;

/// The least time a connection attempt to one of a name's addresses is given.
const MIN_CONNECT_TIME: Duration = Duration::from_millis(250);

/// How long the prefill side waits before it opens again a handshake that a decode closed unanswered (past its
/// cap on connections still saying their hello).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The decode side's listener: a thread per control connection, each answering its requests in turn.
pub struct ControlServer {
    listener: Listener,
}

impl ControlServer {
    /// Listens on `port` (0: one the system picks) of every one of `addrs`, and on the Unix socket beside each
    /// for this host's processes. Each connection gets its own conversation, `open(where it comes from)`, which
    /// turns each request into a reply; all of a connection's requests must arrive within `timeout` (and
    /// [`listener::HELLO_TIME`]) of its start.
    pub fn bind<C>(
        addrs: &[IpAddr],
        port: u16,
        timeout: Duration,
        log: Arc<Logger>,
        open: impl Fn(Origin, SocketAddr) -> C + Send + Sync + 'static,
    ) -> Result<ControlServer>
    where
        C: FnMut(&[u8]) -> Vec<u8>,
    {
        let answering = log.clone();
        let shape = HelloShape::Framed { length: greeting_length };
        let stage = Stage::Conversing { per_host: CONVERSATIONS_PER_HOST, all: CONVERSATIONS };
        let listener = Listener::start(addrs, port, Some(LOCAL_NAME), "control connection", shape, stage, CONVERSATIONS, timeout, log, move |stream, hello| {
            let conversation = open(hello.origin, hello.arrived);
            converse(stream, hello, &answering, conversation);
        })?;
        Ok(ControlServer { listener })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.listener.port()
    }
}

/// What names the control port's Unix sockets ([`connection::local_name`]).
const LOCAL_NAME: &str = "control";

/// The length of a first request, from its first four bytes: `None` for one too long for a greeting, or ZeroMQ's
/// greeting (refused with its reason by [`read_frame`] once the connection is served).
fn greeting_length(header: [u8; 4]) -> Option<usize> {
    let len = codec::frame_length(header);
    (header[0] != ZMTP_SIGNATURE && len <= MAX_GREETING_BYTES).then_some(len)
}

/// Answers the requests of one connection, at most [`MAX_REQUESTS`] (the first read already, as its hello),
/// then closes it.
fn converse(mut stream: Connection, hello: Hello, log: &Logger, mut answer: impl FnMut(&[u8]) -> Vec<u8>) {
    stream.set_nodelay();
    let (deadline, peer) = (hello.deadline, hello.origin);
    // Replies are sent within the hello time too (a peer that does not take them holds nothing longer).
    let send = |stream: &mut Connection, reply: &[u8]| {
        let left = deadline.saturating_duration_since(Instant::now());
        !left.is_zero() && stream.set_write_timeout(Some(left)).is_ok() && stream.write_all(&codec::frame(reply)).is_ok()
    };
    let refuse = |stream: &mut Connection, e: Error| {
        log.error_from(&host_of(peer.ip()).to_string(), format!("refused a control connection from {peer}: {e}"));
        send(stream, &wire::encode(&Reply::reject(&e)));
    };
    let mut first = Some(hello.bytes);
    for _ in 0..MAX_REQUESTS {
        let read = match first.take() {
            Some(bytes) => read_frame(from_bytes(&bytes), MAX_GREETING_BYTES),
            None => read_frame(|buf| listener::read_before(&mut stream, buf, deadline), MAX_REQUEST_BYTES),
        };
        let request = match read {
            Ok(request) => request,
            Err(e) if e.kind() == ErrorKind::InvalidData => return refuse(&mut stream, Error::protocol(e.to_string())),
            Err(_) => return,
        };
        // An answer may admit the peer (a queue pair, a ptrace grant): not worth it when no time is left to
        // send it.
        if deadline.saturating_duration_since(Instant::now()) < REPLY_MARGIN {
            return;
        }
        let reply = answer(&request);
        if reply.len() > MAX_MESSAGE_BYTES {
            let e = Error::new(ErrorCode::Internal, format!("a control reply of {} bytes (at most {MAX_MESSAGE_BYTES})", reply.len()));
            return refuse(&mut stream, e);
        }
        if !send(&mut stream, &reply) {
            return;
        }
    }
}

/// `read_exact` over `bytes`: what the listener read already.
fn from_bytes(bytes: &[u8]) -> impl FnMut(&mut [u8]) -> std::io::Result<()> + '_ {
    let mut rest = bytes;
    move |buf| std::io::Read::read_exact(&mut rest, buf)
}

/// The least time left to the deadline for a request to be answered at all.
const REPLY_MARGIN: Duration = Duration::from_millis(50);

/// Reads one frame with `read_exact`: its length, refused (`InvalidData`) past `max` or where it is ZeroMQ's
/// greeting, then that many bytes.
pub fn read_frame(mut read_exact: impl FnMut(&mut [u8]) -> std::io::Result<()>, max: usize) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    read_exact(&mut header)?;
    let len = codec::frame_length(header);
    if header[0] == ZMTP_SIGNATURE {
        let why = "the peer speaks ZeroMQ: it runs kvtransfer of wire protocol 3 or older; run one version on both sides";
        return Err(std::io::Error::new(ErrorKind::InvalidData, why));
    }
    if len > max {
        let why = format!("a control message of {len} bytes (at most {max}): not kvtransfer, or an incompatible version");
        return Err(std::io::Error::new(ErrorKind::InvalidData, why));
    }
    let mut body = vec![0u8; len];
    read_exact(&mut body)?;
    Ok(body)
}

/// The first byte ZeroMQ sends on a connection (ZMTP 3's signature, `FF 00 … 7F`): the control port of
/// kvtransfer before wire protocol 4. As a length it would be over 4 GB, so no frame starts with it.
const ZMTP_SIGNATURE: u8 = 0xFF;

/// One handshake's connection to a decode's control port: requests answered one at a time, all within one
/// deadline.
pub struct ControlClient {
    stream: Connection,
    /// The address and port `stream` reached: one `host` resolved to (over a Unix socket, the one it is named for).
    reached: SocketAddr,
    addrs: Vec<SocketAddr>,
    endpoint: String,
    deadline: Instant,
    timeout: Duration,
    /// Whether a request has been answered on this connection (before that, a closed one is opened again).
    answered: bool,
}

impl ControlClient {
    /// Connects to `host:port`; every request on this connection must be answered within `timeout` of now. An
    /// address where nothing listens is `UNREACHABLE` at once (trying again is the caller's policy). Where
    /// `host` is this host, over the Unix socket beside the address and port when one listens
    /// ([`ControlClient::is_local`]).
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<ControlClient> {
        let deadline = Instant::now() + timeout;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let endpoint = if bare.contains(':') { format!("[{bare}]:{port}") } else { format!("{bare}:{port}") };
        let addrs: Vec<SocketAddr> =
            (bare, port).to_socket_addrs().map_err(|e| Error::invalid(format!("cannot connect to {endpoint}: {e}")))?.collect();
        let (stream, reached) = open(&addrs, &endpoint, deadline, timeout)?;
        Ok(ControlClient { stream, reached, addrs, endpoint, deadline, timeout, answered: false })
    }

    /// Whether this connection is over a Unix socket: the decode knows this process from the kernel, and may
    /// offer it the same-host transports.
    pub fn is_local(&self) -> bool {
        matches!(self.stream, Connection::Local(_))
    }

    /// The decode's address and port this connection reached (one its host name resolved to).
    pub fn reached(&self) -> SocketAddr {
        self.reached
    }

    /// Sends `body` and waits for the reply, until the connection's deadline.
    pub fn ask(&mut self, body: &[u8]) -> Result<Vec<u8>> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(Error::invalid(format!("a control request of {} bytes (at most {MAX_REQUEST_BYTES})", body.len())));
        }
        loop {
            match self.exchange(body) {
                Ok(reply) => {
                    self.answered = true;
                    return Ok(reply);
                }
                // Closed before it answered anything: a decode past its cap on connections still saying their
                // hello closes the newest. Try again, until the deadline.
                Err(e) if !self.answered && matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
                    std::thread::sleep(RETRY_PAUSE.min(self.deadline.saturating_duration_since(Instant::now())));
                    (self.stream, self.reached) = open(&self.addrs, &self.endpoint, self.deadline, self.timeout)?;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut && self.answered => {
                    let why = format!("{} answered the greeting but not the hello within {} ms", self.endpoint, self.timeout.as_millis());
                    return Err(Error::new(ErrorCode::Timeout, why));
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => return Err(no_reply(&self.endpoint, self.timeout, None)),
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    return Err(Error::protocol(format!("the control reply from {}: {e}", self.endpoint)))
                }
                Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
                    let why = format!("{} closed the handshake's connection after the greeting (its time for the handshake ran out, or it made room for others)", self.endpoint);
                    return Err(Error::io(&why, e));
                }
                Err(e) => return Err(Error::io(&format!("waiting for the handshake reply from {}", self.endpoint), e)),
            }
        }
    }

    fn exchange(&mut self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write_all(&codec::frame(body)).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock => ErrorKind::TimedOut.into(),
            ErrorKind::BrokenPipe => ErrorKind::ConnectionReset.into(),
            _ => e,
        })?;
        let (stream, deadline) = (&mut self.stream, self.deadline);
        read_frame(|buf| listener::read_before(stream, buf, deadline), MAX_MESSAGE_BYTES)
    }
}

/// A connection to one of `addrs`, and the one it reached: over the Unix socket beside an address of this host
/// where one listens, else over TCP, each address in turn. Where none takes it, `UNREACHABLE` at once when each
/// refused it or has no route (nothing listens there: trying again is the caller's policy), else `TIMEOUT`.
fn open(addrs: &[SocketAddr], endpoint: &str, deadline: Instant, timeout: Duration) -> Result<(Connection, SocketAddr)> {
    if addrs.is_empty() {
        return Err(Error::invalid(format!("cannot connect to {endpoint}: it names no address")));
    }
    for addr in addrs.iter().filter(|a| net::is_own_address(a.ip())) {
        if let Ok(stream) = connection::connect_local(&connection::local_name(LOCAL_NAME, *addr)) {
            return Ok((Connection::Local(stream), *addr));
        }
    }
    let mut refused = Vec::new();
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Each address gets its share of the time left: one that drops packets (an IPv6 address of a decode
        // listening on IPv4 only, say) leaves time for the next.
        let share = (left / (addrs.len() - i) as u32).max(MIN_CONNECT_TIME).min(left);
        match TcpStream::connect_timeout(addr, share) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok((Connection::Tcp(stream), *addr));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)) => {
                refused.push(format!("{addr}: {e}"))
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        None if refused.len() == addrs.len() => Err(Error::new(
            ErrorCode::Unreachable,
            format!("{endpoint} is unreachable ({}): is a decode communicator listening there?", refused.join("; ")),
        )),
        last => Err(no_reply(endpoint, timeout, last)),
    }
}

fn no_reply(endpoint: &str, timeout: Duration, last: Option<std::io::Error>) -> Error {
    let why = last.map(|e| format!(" (last try: {e})")).unwrap_or_default();
    Error::new(
        ErrorCode::Timeout,
        format!("no handshake reply from {endpoint} within {} ms{why}: is a decode communicator listening there?", timeout.as_millis()),
    )
}

/// Sends one request to a decode's control port and waits up to `timeout` for the reply.
pub fn request(host: &str, port: u16, body: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    ControlClient::connect(host, port, timeout)?.ask(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::io::Read;

    fn log() -> Arc<Logger> {
        Arc::new(Logger::new(&Config::default(), "test".to_string()).unwrap())
    }

    const LOCAL: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];
    const TIME: Duration = Duration::from_secs(5);

    #[test]
    fn request_and_answer() {
        let port = free_port();
        let server = ControlServer::bind(&LOCAL, port, TIME, log(), |_, _| |req: &[u8]| [b"re:", req].concat()).unwrap();
        assert_eq!(server.port(), port);
        let any = ControlServer::bind(&LOCAL, 0, TIME, log(), |_, _| |req: &[u8]| req.to_vec()).unwrap();
        assert_ne!(any.port(), 0);
        assert_eq!(request("127.0.0.1", any.port(), b"x", TIME).unwrap(), b"x");
        assert_eq!(request("127.0.0.1", port, b"hi", TIME).unwrap(), b"re:hi");
        // An empty message is a message; one over the limit is not sent.
        assert_eq!(request("127.0.0.1", port, b"", TIME).unwrap(), b"re:");
        let err = request("127.0.0.1", port, &[0; MAX_REQUEST_BYTES + 1], TIME).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
        // The port is taken now.
        let err = ControlServer::bind(&LOCAL, port, TIME, log(), |_, _| |r: &[u8]| r.to_vec()).err().unwrap();
        assert!(err.message().contains("in use"), "{err}");
    }

    #[test]
    fn each_connection_is_one_conversation_of_at_most_two_requests() {
        let server = ControlServer::bind(&LOCAL, 0, TIME, log(), |_, _| {
            let mut n = 0;
            move |req: &[u8]| {
                n += 1;
                [format!("{n}|").as_bytes(), req].concat()
            }
        })
        .unwrap();
        let mut a = ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap();
        let mut b = ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap();
        assert_eq!(a.ask(b"x").unwrap(), b"1|x");
        assert_eq!(a.ask(b"y").unwrap(), b"2|y", "two requests on one connection are one conversation");
        assert_eq!(b.ask(b"z").unwrap(), b"1|z", "two connections are two conversations");
        let third = a.ask(b"w").unwrap_err();
        assert_eq!(third.code(), ErrorCode::Transport, "a third request finds the connection closed: {third}");
    }

    #[test]
    fn a_process_of_this_host_is_named_by_the_kernel_and_an_address_is_only_an_address() {
        let server = ControlServer::bind(&LOCAL, 0, TIME, log(), |origin, arrived| move |_: &[u8]| format!("{origin} at {arrived}").into_bytes()).unwrap();
        let mut local = ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap();
        assert!(local.is_local(), "an address of this host is dialed over the Unix socket beside it");
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let at = SocketAddr::from(([127, 0, 0, 1], server.port()));
        let me = format!("process {} (uid {uid}) of this host at {at}", std::process::id());
        assert_eq!(String::from_utf8(local.ask(b"I am process 1").unwrap()).unwrap(), me);
        assert_eq!(local.reached(), at);
        let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        tcp.write_all(&codec::frame(b"I am process 1")).unwrap();
        tcp.set_read_timeout(Some(TIME)).unwrap();
        let reply = read_frame(|buf| tcp.read_exact(buf), MAX_MESSAGE_BYTES).unwrap();
        let said = String::from_utf8(reply).unwrap();
        assert!(said.starts_with("127.0.0.1:") && said.ends_with(&format!(" at {at}")), "{said}");
        // Another process cannot take the Unix socket of a port in use.
        let err = ControlServer::bind(&LOCAL, server.port(), TIME, log(), |_, _| |r: &[u8]| r.to_vec()).err().unwrap();
        assert!(err.message().contains("in use"), "{err}");
        // Nor can a decode start where another process holds the Unix socket of its address and port: a prefill
        // of this host would take that process for it.
        let port = free_port();
        let name = connection::local_name(LOCAL_NAME, SocketAddr::from(([127, 0, 0, 1], port)));
        let abstract_name = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes());
        let _squatter = std::os::unix::net::UnixListener::bind_addr(&abstract_name.unwrap()).unwrap();
        let err = ControlServer::bind(&LOCAL, port, TIME, log(), |_, _| |r: &[u8]| r.to_vec()).err().unwrap();
        assert!(err.message().contains("another process holds it"), "{err}");
    }

    #[test]
    fn a_unix_socket_whose_queue_is_full_is_passed_over_not_waited_on() {
        use std::os::fd::AsRawFd;
        // A TCP port, and a local process that holds the Unix socket name beside it and never accepts.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let name = connection::local_name(LOCAL_NAME, tcp.local_addr().unwrap());
        let abstract_name = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes());
        let squatter = std::os::unix::net::UnixListener::bind_addr(&abstract_name.unwrap()).unwrap();
        // SAFETY: listen(2) on a socket this test owns; it only shortens the queue.
        assert_eq!(unsafe { libc::listen(squatter.as_raw_fd(), 0) }, 0);
        let _queued: Vec<_> = (0..4).filter_map(|_| connection::connect_local(&name).ok()).collect();
        let start = Instant::now();
        let client = ControlClient::connect("127.0.0.1", tcp.local_addr().unwrap().port(), Duration::from_secs(3)).unwrap();
        assert!(!client.is_local(), "over TCP, past the full Unix socket");
        assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    }

    #[test]
    fn a_port_nothing_listens_on_is_unreachable_at_once_and_named() {
        let port = free_port();
        let start = Instant::now();
        let err = request("127.0.0.1", port, b"hi", Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unreachable, "{err}");
        assert!(err.message().contains(&format!("127.0.0.1:{port}")) && err.message().contains("refused"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1), "a refusal is not waited on: {:?}", start.elapsed());
    }

    #[test]
    fn a_frame_too_long_is_refused_and_silence_is_closed() {
        let server = ControlServer::bind(&LOCAL, 0, Duration::from_millis(500), log(), |_, _| |r: &[u8]| r.to_vec()).unwrap();
        let refusal = |first: &[u8]| {
            let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
            s.set_read_timeout(Some(TIME)).unwrap();
            s.write_all(first).unwrap();
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            wire::decode_reply(&reply[4..]).unwrap_err()
        };
        // One byte over the limit of a first request (a greeting): refused before anything is allocated for it.
        let err = refusal(&(MAX_GREETING_BYTES as u32 + 1).to_be_bytes());
        assert!(err.message().contains("not kvtransfer"), "{err}");
        // What a prefill of wire protocol 3 (ZeroMQ) says first.
        let err = refusal(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F]);
        assert!(err.message().contains("ZeroMQ"), "{err}");
        assert_eq!(ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap().ask(&[0; MAX_GREETING_BYTES]).unwrap().len(), MAX_GREETING_BYTES);
        // The second request (a hello) may be longer.
        let mut two = ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap();
        assert_eq!(two.ask(b"greeting").unwrap(), b"greeting");
        assert_eq!(two.ask(&[0; MAX_REQUEST_BYTES]).unwrap().len(), MAX_REQUEST_BYTES);
        // A connection that asks once and then says nothing more is closed after the hello time (here 0.5 s),
        // counted from its start.
        let mut idle = ControlClient::connect("127.0.0.1", server.port(), TIME).unwrap();
        assert_eq!(idle.ask(b"once").unwrap(), b"once");
        idle.stream.set_read_timeout(Some(TIME)).unwrap();
        let start = Instant::now();
        assert!(matches!(idle.stream.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        assert!(start.elapsed() < Duration::from_secs(3), "closed after {:?}", start.elapsed());
        // A connection that says nothing is closed after the hello time too.
        let mut silent = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        silent.set_read_timeout(Some(TIME)).unwrap();
        let start = Instant::now();
        assert!(matches!(silent.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        assert!(start.elapsed() < Duration::from_secs(3), "closed after {:?}", start.elapsed());
    }

    #[test]
    fn a_request_with_no_time_left_to_answer_is_not_answered() {
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = answered.clone();
        let server = ControlServer::bind(&LOCAL, 0, Duration::from_millis(500), log(), move |_, _| {
            let seen = seen.clone();
            move |r: &[u8]| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                r.to_vec()
            }
        })
        .unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        // Sent about 30 ms before the connection's 500 ms are up: under the margin an answer needs.
        std::thread::sleep(Duration::from_millis(470));
        s.write_all(&codec::frame(b"late")).unwrap();
        s.set_read_timeout(Some(TIME)).unwrap();
        assert!(matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_)), "closed without a reply");
        assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was admitted for it");
    }

    #[test]
    fn a_reply_too_long_becomes_a_refusal() {
        let server = ControlServer::bind(&LOCAL, 0, TIME, log(), |_, _| |_: &[u8]| vec![7; MAX_MESSAGE_BYTES + 1]).unwrap();
        let reply = request("127.0.0.1", server.port(), b"hi", TIME).unwrap();
        let err = wire::decode_reply(&reply).unwrap_err();
        assert!(err.message().contains("a control reply of"), "{err}");
    }

    #[test]
    fn a_decode_that_answers_the_greeting_only_is_named_so() {
        let server = ControlServer::bind(&LOCAL, 0, TIME, log(), |_, _| {
            let mut n = 0;
            move |r: &[u8]| {
                n += 1;
                if n == 2 {
                    std::thread::sleep(Duration::from_millis(600));
                }
                r.to_vec()
            }
        })
        .unwrap();
        let mut client = ControlClient::connect("127.0.0.1", server.port(), Duration::from_millis(400)).unwrap();
        assert_eq!(client.ask(b"greeting").unwrap(), b"greeting");
        let err = client.ask(b"hello").unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout, "{err}");
        assert!(err.message().contains("answered the greeting but not the hello"), "{err}");
    }

    #[test]
    fn an_address_that_drops_packets_leaves_time_for_the_next() {
        use std::os::fd::AsRawFd;
        // Plain TCP ports (no Unix socket beside them).
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A port whose queue of connections is full drops the next one's packets: it waits out its time.
        let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on a socket this test owns; it only changes the queue's length (to one).
        assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
        let _queued = TcpStream::connect(full.local_addr().unwrap()).unwrap();
        let addrs = [full.local_addr().unwrap(), server.local_addr().unwrap()];
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        open(&addrs, "a name of two addresses", start + timeout, timeout).unwrap();
        assert!(start.elapsed() < Duration::from_millis(1500), "connected after {:?}", start.elapsed());
    }

    #[test]
    fn a_decode_of_wire_protocol_3_is_named() {
        let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = old.local_addr().unwrap().port();
        let decode = std::thread::spawn(move || {
            let (mut s, _) = old.accept().unwrap();
            s.write_all(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F]).unwrap();
            let _ = s.read(&mut [0u8; 64]);
        });
        let err = request("127.0.0.1", port, b"hi", TIME).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Protocol);
        assert!(err.message().contains("speaks ZeroMQ"), "{err}");
        decode.join().unwrap();
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }
}
