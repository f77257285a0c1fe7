//! The control plane: the handshake between a prefill and a decode communicator, over ZeroMQ.
//!
//! The decode side binds a `ROUTER` socket on its port and answers each [`Hello`] with a [`Reply`]; the
//! prefill side sends from a short-lived `DEALER`. Messages are JSON, versioned by [`PROTOCOL_VERSION`]:
//! a peer of another version is refused with a message that names both versions.

use crate::error::{Error, ErrorCode, Result};
use crate::transport::rdma::queue_pair::QpEndpoint;
use crate::transport::cuda_ipc::IpcWelcome;
use crate::transport::rdma::RdmaWelcome;
use crate::transport::shm::ShmWelcome;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The version of the handshake and of the data-path framing. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control message accepted; anything bigger is garbage.
const MAX_MESSAGE_BYTES: i64 = 1 << 20;

/// What a prefill communicator says about itself when it connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub role: String,
    pub layers: u32,
    /// Bit mask of the tensors of each layer ([`crate::memory::TensorSet`]).
    pub tensors: u8,
    pub block_bytes: u64,
    pub scale_block_bytes: u64,
    pub block_number: u32,
    pub tp_size: u32,
    pub tp_idx: u32,
    /// The decode side's tensor-parallel size, as the prefill caller gave it to `connect`.
    pub dst_tp_size: u32,
    /// Transports the prefill side can use, in order of preference.
    pub transports: Vec<String>,
    /// The prefill's queue pair, when it offers RDMA.
    #[serde(default)]
    pub rdma: Option<QpEndpoint>,
    /// The session this connection rebuilds (after a failure), which the decode side can let go.
    #[serde(default)]
    pub replaces: Option<u64>,
    /// The prefill's host and pid namespace ([`crate::net::host_id`]): same-host transports need the same.
    #[serde(default)]
    pub host: Option<String>,
}

/// The decode side's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Welcome(Welcome),
    Reject { protocol: u32, code: String, reason: String },
}

/// A successful handshake: the decode's cache size and how to reach its data path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Welcome {
    pub protocol: u32,
    pub block_number: u32,
    /// The transport chosen (one of the prefill's offers).
    pub transport: String,
    /// TCP data port of the decode side (for the TCP transport).
    pub tcp_port: u16,
    /// Identifies this peer's session (for TCP, when its data connection arrives).
    pub token: u64,
    /// The decode's queue pair and cache regions, when RDMA was chosen.
    #[serde(default)]
    pub rdma: Option<RdmaWelcome>,
    /// The decode's allocations, when cuda-ipc was chosen.
    #[serde(default)]
    pub cuda_ipc: Option<IpcWelcome>,
    /// The decode's process and cache addresses, when shm was chosen.
    #[serde(default)]
    pub shm: Option<ShmWelcome>,
}

impl Reply {
    /// A refusal carrying an error's code and message.
    pub fn reject(err: &Error) -> Reply {
        Reply::Reject {
            protocol: PROTOCOL_VERSION,
            code: err.code().as_str().to_string(),
            reason: err.message().to_string(),
        }
    }
}

/// Parses a hello, checking the protocol version before anything else.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello> {
    #[derive(Deserialize)]
    struct Versioned {
        protocol: u32,
    }
    let v: Versioned = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol(format!("unreadable handshake ({} bytes): {e}", bytes.len())))?;
    if v.protocol != PROTOCOL_VERSION {
        return Err(Error::protocol(format!(
            "protocol version mismatch: the prefill peer speaks version {}, this decode speaks {PROTOCOL_VERSION}",
            v.protocol
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("malformed handshake: {e}")))
}

/// Parses a reply into a [`Welcome`], or the error the decode side reported.
pub fn decode_reply(bytes: &[u8]) -> Result<Welcome> {
    let reply: Reply = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol(format!("unreadable handshake reply ({} bytes): {e}", bytes.len())))?;
    match reply {
        Reply::Welcome(w) if w.protocol == PROTOCOL_VERSION => Ok(w),
        Reply::Welcome(w) => Err(Error::protocol(format!(
            "protocol version mismatch: the decode peer speaks version {}, this prefill speaks {PROTOCOL_VERSION}",
            w.protocol
        ))),
        Reply::Reject { code, reason, .. } => {
            let code = [
                ErrorCode::InvalidArgument,
                ErrorCode::Config,
                ErrorCode::Protocol,
                ErrorCode::Unavailable,
                ErrorCode::Closed,
            ]
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or(ErrorCode::Rejected);
            Err(Error::new(code, format!("the decode peer refused the connection: {reason}")))
        }
    }
}

/// Serialises a control message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("control messages always serialise")
}

/// The decode side's listener: a thread answering handshakes on `tcp://addr:port`.
pub struct ControlServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds and starts answering; `answer` turns each request into a reply. Port 0 lets the system pick
    /// a free port (see [`ControlServer::port`]).
    pub fn bind(
        ctx: &zmq::Context,
        addr: &str,
        port: u16,
        answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
    ) -> Result<ControlServer> {
        let socket = ctx.socket(zmq::ROUTER).map_err(|e| zmq_error("creating the control socket", e))?;
        socket.set_linger(0).map_err(|e| zmq_error("setting linger", e))?;
        socket.set_maxmsgsize(MAX_MESSAGE_BYTES).map_err(|e| zmq_error("setting the size limit", e))?;
        let endpoint = match port {
            0 => format!("tcp://{addr}:*"),
            p => format!("tcp://{addr}:{p}"),
        };
        socket.bind(&endpoint).map_err(|e| {
            Error::new(ErrorCode::Transport, format!("cannot listen on {endpoint}: {e} (is the port in use?)"))
        })?;
        let bound = socket.get_last_endpoint().ok().and_then(|e| e.ok());
        let port = bound
            .as_deref()
            .and_then(|e| e.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::new(ErrorCode::Transport, format!("cannot tell which port {endpoint} bound")))?;
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

fn serve(socket: zmq::Socket, stop: &AtomicBool, answer: impl Fn(&[u8]) -> Vec<u8>) {
    while !stop.load(Ordering::Acquire) {
        match socket.poll(zmq::POLLIN, 50) {
            Ok(0) | Err(zmq::Error::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else { continue };
        // A DEALER request arrives as [identity, body]; anything else is dropped.
        if let [identity, body] = frames.as_slice() {
            let reply = answer(body);
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

/// Sends one request to a decode's control port and waits up to `timeout` for the reply.
pub fn request(ctx: &zmq::Context, host: &str, port: u16, body: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let socket = ctx.socket(zmq::DEALER).map_err(|e| zmq_error("creating a control socket", e))?;
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    socket.set_linger(0).map_err(|e| zmq_error("setting linger", e))?;
    socket.set_maxmsgsize(MAX_MESSAGE_BYTES).map_err(|e| zmq_error("setting the size limit", e))?;
    socket.set_sndtimeo(ms).map_err(|e| zmq_error("setting the send timeout", e))?;
    socket.set_rcvtimeo(ms).map_err(|e| zmq_error("setting the receive timeout", e))?;
    let endpoint = format!("tcp://{}:{port}", bracket_v6(host));
    socket.connect(&endpoint).map_err(|e| Error::invalid(format!("cannot connect to {endpoint}: {e}")))?;
    let deadline = Instant::now() + timeout;
    // Signals (a host process's SIGCHLD, say) interrupt ZeroMQ calls: retry them until the deadline.
    loop {
        match socket.send(body, 0) {
            Err(zmq::Error::EINTR) if Instant::now() < deadline => continue,
            Err(e) => return Err(zmq_error(&format!("sending the handshake to {endpoint}"), e)),
            Ok(()) => break,
        }
    }
    loop {
        match socket.recv_bytes(0) {
            Ok(reply) => return Ok(reply),
            Err(zmq::Error::EINTR) if Instant::now() < deadline => {
                let left = deadline.saturating_duration_since(Instant::now()).as_millis().max(1) as i32;
                socket.set_rcvtimeo(left).map_err(|e| zmq_error("setting the receive timeout", e))?;
            }
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => {
                return Err(Error::new(
                    ErrorCode::Timeout,
                    format!("no handshake reply from {endpoint} within {ms} ms (is a decode communicator listening there?)"),
                ))
            }
            Err(e) => return Err(zmq_error(&format!("waiting for the handshake reply from {endpoint}"), e)),
        }
    }
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

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            role: "prefill".into(),
            layers: 2,
            tensors: 3,
            block_bytes: 64,
            scale_block_bytes: 0,
            block_number: 8,
            tp_size: 1,
            tp_idx: 0,
            dst_tp_size: 1,
            transports: vec!["tcp".into()],
            rdma: None,
            replaces: None,
            host: None,
        }
    }

    #[test]
    fn hello_round_trips_and_versions_are_checked() {
        let h = hello();
        assert_eq!(decode_hello(&encode(&h)).unwrap(), h);
        let old = Hello { protocol: 99, ..hello() };
        let err = decode_hello(&encode(&old)).unwrap_err();
        assert!(err.message().contains("version 99") && err.message().contains("mismatch"), "{err}");
        let err = decode_hello(b"\x00garbage").unwrap_err();
        assert_eq!(err.code(), ErrorCode::Protocol);
        assert!(decode_hello(br#"{"protocol":1,"role":5}"#).is_err());
    }

    #[test]
    fn rejects_carry_code_and_reason() {
        let r = Reply::reject(&Error::invalid("blockBytes 64 does not match"));
        let err = decode_reply(&encode(&r)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        assert!(err.message().contains("blockBytes 64 does not match"));
        let w = Welcome { protocol: 7, block_number: 1, transport: "tcp".into(), tcp_port: 1, token: 2, rdma: None, cuda_ipc: None, shm: None };
        assert!(decode_reply(&encode(&Reply::Welcome(w))).unwrap_err().message().contains("version 7"));
    }

    #[test]
    fn request_and_answer_over_zmq() {
        let ctx = zmq::Context::new();
        let port = free_port();
        let server = ControlServer::bind(&ctx, "127.0.0.1", port, |req| [b"re:", req].concat()).unwrap();
        assert_eq!(server.port(), port);
        let any = ControlServer::bind(&ctx, "127.0.0.1", 0, |req| req.to_vec()).unwrap();
        assert_ne!(any.port(), 0);
        assert_eq!(request(&ctx, "127.0.0.1", any.port(), b"x", Duration::from_secs(5)).unwrap(), b"x");
        let reply = request(&ctx, "127.0.0.1", port, b"hi", Duration::from_secs(5)).unwrap();
        assert_eq!(reply, b"re:hi");
        // The port is taken now.
        let err = ControlServer::bind(&ctx, "127.0.0.1", port, |r| r.to_vec()).err().unwrap();
        assert!(err.message().contains("cannot listen"), "{err}");
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
