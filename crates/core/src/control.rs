//! The control plane's channel: the decode side answers handshakes on its port ([`ControlServer`], a ZeroMQ
//! `ROUTER`); the prefill side holds one short-lived `DEALER` per handshake ([`ControlClient`]), whose requests
//! the server tells apart from other peers' by the connection's identity. What the messages say is
//! [`crate::wire`]'s business; this module only carries bytes, bounded in size and time.

use crate::error::{Error, ErrorCode, Result};
use crate::wire::MAX_MESSAGE_BYTES;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The decode side's listener: a thread answering handshakes on `tcp://addr:port`.
pub struct ControlServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds every one of `addrs` on one port and starts answering; `answer(peer, request)` turns each request
    /// into a reply, where `peer` names the control connection it came on. Port 0 lets the system pick a port
    /// free on every address (see [`ControlServer::port`]).
    pub fn bind(
        ctx: &zmq::Context,
        addrs: &[IpAddr],
        port: u16,
        answer: impl Fn(&[u8], &[u8]) -> Vec<u8> + Send + 'static,
    ) -> Result<ControlServer> {
        // A port picked on the first address may be taken on another: pick again, a few times.
        let mut tries = if port == 0 { 8 } else { 1 };
        let (socket, port) = loop {
            tries -= 1;
            match bind_all(ctx, addrs, port) {
                Err(e) if tries > 0 && e.message().contains("in use") => continue,
                other => break other?,
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kvtransfer-control".into())
            .spawn(move || serve(socket, &stopping, answer))
            .map_err(|e| Error::io("starting the control thread", e))?;
        Ok(ControlServer { port, stop, thread: Some(thread) })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn serve(socket: zmq::Socket, stop: &AtomicBool, answer: impl Fn(&[u8], &[u8]) -> Vec<u8>) {
    while !stop.load(Ordering::Acquire) {
        match socket.poll(zmq::POLLIN, 50) {
            Ok(0) | Err(zmq::Error::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else { continue };
        // A DEALER request arrives as [identity, body]; anything else is dropped.
        if let [identity, body] = frames.as_slice() {
            let reply = answer(identity, body);
            let _ = socket.send_multipart([identity.as_slice(), reply.as_slice()], zmq::DONTWAIT);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a control connection may take to finish ZeroMQ's handshake (as long as a data or channel hello).
const HANDSHAKE_TIME: std::time::Duration = crate::listener::HELLO_TIME;

/// A ROUTER socket bound on `port` (0: any) of each of `addrs`; returns it with the port.
fn bind_all(ctx: &zmq::Context, addrs: &[IpAddr], port: u16) -> Result<(zmq::Socket, u16)> {
    let socket = ctx.socket(zmq::ROUTER).map_err(|e| zmq_error("creating the control socket", e))?;
    socket.set_linger(0).map_err(|e| zmq_error("setting linger", e))?;
    socket.set_maxmsgsize(MAX_MESSAGE_BYTES as i64).map_err(|e| zmq_error("setting the size limit", e))?;
    // A connection that has not finished ZeroMQ's own handshake within this is closed (a silent one holds a
    // descriptor that long, not ZeroMQ's default 30 s).
    socket.set_handshake_ivl(HANDSHAKE_TIME.as_millis() as i32).map_err(|e| zmq_error("setting the handshake time", e))?;
    let mut port = port;
    for addr in addrs {
        let host = bracket_v6(&addr.to_string());
        let endpoint = match port {
            0 => format!("tcp://{host}:*"),
            p => format!("tcp://{host}:{p}"),
        };
        socket.bind(&endpoint).map_err(|e| {
            Error::new(ErrorCode::Transport, format!("cannot listen on {endpoint}: {e} (is the port in use?)"))
        })?;
        if port == 0 {
            let bound = socket.get_last_endpoint().ok().and_then(|e| e.ok());
            port = bound
                .as_deref()
                .and_then(|e| e.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| Error::new(ErrorCode::Transport, format!("cannot tell which port {endpoint} bound")))?;
        }
    }
    Ok((socket, port))
}

/// One handshake's connection to a decode's control port: requests answered one at a time, all within one
/// deadline.
pub struct ControlClient {
    socket: zmq::Socket,
    endpoint: String,
    deadline: Instant,
    timeout: Duration,
}

impl ControlClient {
    /// Connects to `host:port`; every request on this connection must be answered within `timeout` of now.
    pub fn connect(ctx: &zmq::Context, host: &str, port: u16, timeout: Duration) -> Result<ControlClient> {
        let socket = ctx.socket(zmq::DEALER).map_err(|e| zmq_error("creating a control socket", e))?;
        socket.set_linger(0).map_err(|e| zmq_error("setting linger", e))?;
        socket.set_maxmsgsize(MAX_MESSAGE_BYTES as i64).map_err(|e| zmq_error("setting the size limit", e))?;
        let endpoint = format!("tcp://{}:{port}", bracket_v6(host));
        socket.connect(&endpoint).map_err(|e| Error::invalid(format!("cannot connect to {endpoint}: {e}")))?;
        Ok(ControlClient { socket, endpoint, deadline: Instant::now() + timeout, timeout })
    }

    /// Sends `body` and waits for the reply, until the connection's deadline.
    pub fn ask(&mut self, body: &[u8]) -> Result<Vec<u8>> {
        let ms = |d: Instant| d.saturating_duration_since(Instant::now()).as_millis().clamp(1, i32::MAX as u128) as i32;
        let endpoint = &self.endpoint;
        // Signals (a host process's SIGCHLD, say) interrupt ZeroMQ calls: retry them until the deadline.
        loop {
            self.socket.set_sndtimeo(ms(self.deadline)).map_err(|e| zmq_error("setting the send timeout", e))?;
            match self.socket.send(body, 0) {
                Err(zmq::Error::EINTR) if Instant::now() < self.deadline => continue,
                Err(e) => return Err(zmq_error(&format!("sending the handshake to {endpoint}"), e)),
                Ok(()) => break,
            }
        }
        loop {
            self.socket.set_rcvtimeo(ms(self.deadline)).map_err(|e| zmq_error("setting the receive timeout", e))?;
            match self.socket.recv_bytes(0) {
                Ok(reply) => return Ok(reply),
                Err(zmq::Error::EINTR) if Instant::now() < self.deadline => continue,
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => {
                    return Err(Error::new(
                        ErrorCode::Timeout,
                        format!(
                            "no handshake reply from {endpoint} within {} ms (is a decode communicator listening there?)",
                            self.timeout.as_millis()
                        ),
                    ))
                }
                Err(e) => return Err(zmq_error(&format!("waiting for the handshake reply from {endpoint}"), e)),
            }
        }
    }
}

/// Sends one request to a decode's control port and waits up to `timeout` for the reply.
pub fn request(ctx: &zmq::Context, host: &str, port: u16, body: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    ControlClient::connect(ctx, host, port, timeout)?.ask(body)
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn zmq_error(context: &str, e: zmq::Error) -> Error {
    Error::new(ErrorCode::Transport, format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer_over_zmq() {
        let ctx = zmq::Context::new();
        let port = free_port();
        let server = ControlServer::bind(&ctx, &[[127, 0, 0, 1].into()], port, |_, req| [b"re:", req].concat()).unwrap();
        assert_eq!(server.port(), port);
        let any = ControlServer::bind(&ctx, &[[127, 0, 0, 1].into()], 0, |_, req| req.to_vec()).unwrap();
        assert_ne!(any.port(), 0);
        assert_eq!(request(&ctx, "127.0.0.1", any.port(), b"x", Duration::from_secs(5)).unwrap(), b"x");
        let reply = request(&ctx, "127.0.0.1", port, b"hi", Duration::from_secs(5)).unwrap();
        assert_eq!(reply, b"re:hi");
        // The port is taken now.
        let err = ControlServer::bind(&ctx, &[[127, 0, 0, 1].into()], port, |_, r| r.to_vec()).err().unwrap();
        assert!(err.message().contains("cannot listen"), "{err}");
    }

    #[test]
    fn one_client_is_one_peer_to_the_server() {
        let ctx = zmq::Context::new();
        let server = ControlServer::bind(&ctx, &[[127, 0, 0, 1].into()], 0, |peer, req| [peer, b"|", req].concat()).unwrap();
        let mut a = ControlClient::connect(&ctx, "127.0.0.1", server.port(), Duration::from_secs(5)).unwrap();
        let mut b = ControlClient::connect(&ctx, "127.0.0.1", server.port(), Duration::from_secs(5)).unwrap();
        let peer = |reply: Vec<u8>| reply.split(|&c| c == b'|').next().unwrap().to_vec();
        let (a1, a2, b1) = (peer(a.ask(b"1").unwrap()), peer(a.ask(b"2").unwrap()), peer(b.ask(b"1").unwrap()));
        assert_eq!(a1, a2, "two requests on one connection come from one peer");
        assert_ne!(a1, b1, "two connections are two peers");
    }

    #[test]
    fn request_without_server_times_out() {
        let ctx = zmq::Context::new();
        let err = request(&ctx, "127.0.0.1", free_port(), b"hi", Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout);
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }
}
