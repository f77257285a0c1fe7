//! The handshake's messages, as JSON versioned by [`PROTOCOL_VERSION`]. Two round trips on one control
//! connection ([`Request`] → [`Reply`]):
//!
//! 1. the prefill greets with a nonce; the decode answers with a challenge: its own nonce and, when it holds an
//!    auth token, its proof ([`crate::auth`]);
//! 2. the prefill sends its [`Hello`] (as JSON text, with a MAC over those bytes when it holds a token); the
//!    decode answers with a [`Welcome`] (likewise MAC'd) or a refusal.
//!
//! The bottom of the control plane: it names the transports ([`TransportKind`]) but knows none of them. What one
//! transport needs to tell its other half (a queue pair's address, a data port, IPC handles) travels as an opaque
//! JSON value that only that transport reads, and checks.
//!
//! ```
//! use kvtransfer::wire::{self, TransportKind};
//! assert_eq!(serde_json::to_string(&TransportKind::CudaIpc).unwrap(), "\"cuda-ipc\"");
//! assert_eq!("shm".parse::<TransportKind>().unwrap(), TransportKind::Shm);
//! assert!(wire::decode_request(b"{\"protocol\":1}").unwrap_err().message().contains("version 1"));
//! ```

use crate::auth::{Nonce, Tag};
use crate::error::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;
use std::net::SocketAddr;

/// The version of the handshake and of every transport's own framing. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest control reply (a welcome or a refusal; requests are held to [`crate::control::MAX_REQUEST_BYTES`]):
/// what a prefill accepts from a decode, and what a decode sends at most.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A transport that moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// CUDA IPC handles and one copy kernel per write: one host, GPU caches.
    CudaIpc,
    /// `process_vm_writev` into the decode process: one host, host-memory caches.
    Shm,
    /// RC `RDMA_WRITE`s, one-sided.
    Rdma,
    /// Sockets, between any two machines.
    Tcp,
}

impl TransportKind {
    /// Every transport, fastest first.
    pub const ALL: [TransportKind; 4] = [TransportKind::CudaIpc, TransportKind::Shm, TransportKind::Rdma, TransportKind::Tcp];

    /// The transport's name on the wire, in settings and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::CudaIpc => "cuda-ipc",
            TransportKind::Shm => "shm",
            TransportKind::Rdma => "rdma",
            TransportKind::Tcp => "tcp",
        }
    }

    /// Whether it works only between processes of one host (and pid namespace).
    pub fn same_host_only(self) -> bool {
        matches!(self, TransportKind::CudaIpc | TransportKind::Shm)
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<TransportKind> {
        TransportKind::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::invalid(format!("unknown transport {s:?} (cuda-ipc, shm, rdma or tcp)")))
    }
}

/// Which side of the transfer a communicator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns finished KV blocks and writes them out.
    Prefill,
    /// Owns the cache the blocks are written into; listens on its port.
    Decode,
}

impl Role {
    /// `"prefill"` or `"decode"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            _ => Err(Error::invalid(format!("role must be \"prefill\" or \"decode\", not {s:?}"))),
        }
    }
}

/// What a prefill communicator says about itself when it connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub role: Role,
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
    /// The transports the prefill can use, preferred first, each with what its decode half needs to know.
    pub offers: Vec<Offer>,
    /// The prefill's host and pid namespace ([`crate::net::host_id`]), as it says: for logs and older decodes. A
    /// decode of this version believes only the kernel (the Unix socket's peer credentials) about which process of
    /// this host a peer is.
    #[serde(default)]
    pub host: Option<String>,
    /// The prefill's process, as it says (see `host`).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Sessions of this process's earlier links to this decode, all dropped (at most 16): a decode that could not
    /// cut them off (same-host) stops waiting for them.
    #[serde(default)]
    pub dropped: Vec<u64>,
    /// The prefill instance it is a rank of (`KVCACHE_INSTANCE_ID`): its ranks own their requests together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The decode's address and port as the prefill dialed it (where its connection went; set by the handshake).
    /// Signed with the rest of the hello: a decode that shares the token refuses a hello dialed to another one
    /// (a relay steering a prefill elsewhere) unless it answers to that address (`KVCACHE_ANSWERS_TO`).
    #[serde(default)]
    pub dialed: Option<SocketAddr>,
}

/// One transport a prefill offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Offer {
    pub transport: TransportKind,
    /// The transport's own details (RDMA: the prefill's queue pair); read only by that transport.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

/// What a prefill sends to a decode's control port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First: the prefill's nonce.
    Greeting { protocol: u32, nonce: Nonce },
    /// Second: the [`Hello`] as JSON text, and with a token the MAC of exactly that text.
    Hello { hello: String, mac: Option<Tag> },
}

/// The decode side's answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// To a greeting: the decode's nonce and, with a token, its proof of holding it.
    Challenge { protocol: u32, nonce: Nonce, proof: Option<Tag> },
    /// To a hello: the [`Welcome`] as JSON text, and with a token the MAC of exactly that text.
    Welcome { welcome: String, mac: Option<Tag> },
    /// A refusal, to either.
    Reject { protocol: u32, code: String, reason: String },
}

/// A successful handshake: the decode's cache size, the transport it chose and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Welcome {
    pub protocol: u32,
    pub block_number: u32,
    /// The transport chosen: one of the prefill's offers.
    pub transport: TransportKind,
    /// The decode side's name for this connection (a data connection presents it; a rebuild names it).
    pub session: u64,
    /// The chosen transport's own details (a data port, a queue pair and regions, IPC handles).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
    /// Where the link's request channel ([`crate::channel`]) opens, and the token that opens it once.
    pub channel_port: u16,
    pub channel_token: u64,
}

impl Reply {
    /// A refusal carrying an error's code and message.
    pub fn reject(err: &Error) -> Reply {
        Reply::Reject { protocol: PROTOCOL_VERSION, code: err.code().as_str().to_string(), reason: err.message().to_string() }
    }
}

/// Checks a message's `protocol` field, where it has one, before anything else is read.
fn check_version(bytes: &[u8], peer: &str, us: &str) -> Result<()> {
    #[derive(Deserialize)]
    struct Versioned {
        protocol: Option<u32>,
    }
    let v: Versioned = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol(format!("unreadable handshake message ({} bytes): {e}", bytes.len())))?;
    match v.protocol {
        Some(theirs) if theirs != PROTOCOL_VERSION => Err(Error::protocol(format!(
            "protocol version mismatch: the {peer} peer speaks version {theirs}, this {us} speaks {PROTOCOL_VERSION}"
        ))),
        _ => Ok(()),
    }
}

/// Parses what a prefill sent.
pub fn decode_request(bytes: &[u8]) -> Result<Request> {
    check_version(bytes, "prefill", "decode")?;
    serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("malformed handshake message: {e}")))
}

/// Parses a hello, checking the protocol version before anything else.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello> {
    check_version(bytes, "prefill", "decode")?;
    serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("malformed handshake: {e}")))
}

/// Parses a decode's reply; a refusal becomes the error the decode reported.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply> {
    check_version(bytes, "decode", "prefill")?;
    let reply: Reply = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol(format!("unreadable handshake reply ({} bytes): {e}", bytes.len())))?;
    match reply {
        Reply::Reject { code, reason, .. } => {
            // Only the codes a refusal can carry; anything else a peer claims reads as a plain refusal.
            let code = [
                ErrorCode::InvalidArgument,
                ErrorCode::Config,
                ErrorCode::Protocol,
                ErrorCode::Unavailable,
                ErrorCode::Closed,
                ErrorCode::Unauthenticated,
            ]
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or(ErrorCode::Rejected);
            Err(Error::new(code, format!("the decode peer refused the connection: {reason}")))
        }
        other => Ok(other),
    }
}

/// Parses a welcome, checking the protocol version before anything else.
pub fn decode_welcome(bytes: &[u8]) -> Result<Welcome> {
    check_version(bytes, "decode", "prefill")?;
    serde_json::from_slice(bytes).map_err(|e| Error::protocol(format!("malformed welcome: {e}")))
}

/// Serialises a handshake message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("handshake messages always serialise")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A prefill of 2 layers of keys and values, 8 blocks of 64 bytes, offering TCP.
    pub(crate) fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Prefill,
            layers: 2,
            tensors: 3,
            block_bytes: 64,
            scale_block_bytes: 0,
            block_number: 8,
            tp_size: 1,
            tp_idx: 0,
            dst_tp_size: 1,
            offers: vec![Offer { transport: TransportKind::Tcp, details: Value::Null }],
            host: None,
            pid: None,
            dropped: Vec::new(),
            instance: None,
            dialed: None,
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
        assert!(decode_hello(br#"{"protocol":2,"role":5}"#).is_err());
    }

    #[test]
    fn transport_names_are_a_closed_set_on_the_wire() {
        let mut json = serde_json::to_value(hello()).unwrap();
        json["offers"][0]["transport"] = "pigeon".into();
        let err = decode_hello(json.to_string().as_bytes()).unwrap_err();
        assert!(err.message().contains("pigeon"), "{err}");
        json["offers"][0]["transport"] = "cuda-ipc".into();
        assert_eq!(decode_hello(json.to_string().as_bytes()).unwrap().offers[0].transport, TransportKind::CudaIpc);
        for t in TransportKind::ALL {
            assert_eq!(t.as_str().parse::<TransportKind>().unwrap(), t);
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        json["role"] = "decoder".into();
        assert!(decode_hello(json.to_string().as_bytes()).is_err());
    }

    #[test]
    fn rejects_carry_code_and_reason() {
        let r = Reply::reject(&Error::invalid("blockBytes 64 does not match"));
        let err = decode_reply(&encode(&r)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        assert!(err.message().contains("blockBytes 64 does not match"));
        let lie = Reply::Reject { protocol: PROTOCOL_VERSION, code: "TIMEOUT".into(), reason: "x".into() };
        assert_eq!(decode_reply(&encode(&lie)).unwrap_err().code(), ErrorCode::Rejected);
        let w = Welcome { protocol: 7, block_number: 1, transport: TransportKind::Tcp, session: 2, details: Value::Null, channel_port: 1, channel_token: 2 };
        assert!(decode_welcome(&encode(&w)).unwrap_err().message().contains("version 7"));
        let old = Reply::Challenge { protocol: 1, nonce: [0; 16], proof: None };
        assert!(decode_reply(&encode(&old)).unwrap_err().message().contains("version 1"));
    }

    #[test]
    fn requests_round_trip_and_old_peers_are_named() {
        let g = Request::Greeting { protocol: PROTOCOL_VERSION, nonce: [3; 16] };
        assert_eq!(decode_request(&encode(&g)).unwrap(), g);
        let h = Request::Hello { hello: String::from_utf8(encode(&hello())).unwrap(), mac: Some([9; 32]) };
        assert_eq!(decode_request(&encode(&h)).unwrap(), h);
        // A version-1 peer sends its hello straight away: it is told the versions differ.
        let v1 = Hello { protocol: 1, ..hello() };
        let err = decode_request(&encode(&v1)).unwrap_err();
        assert!(err.message().contains("version 1") && err.message().contains("mismatch"), "{err}");
        assert_eq!(decode_request(b"[]").unwrap_err().code(), ErrorCode::Protocol);
        assert_eq!(decode_request(br#"{"type":"greeting","protocol":2,"nonce":[1,2]}"#).unwrap_err().code(), ErrorCode::Protocol);
    }
}
