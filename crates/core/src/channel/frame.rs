//! The request channel's messages, in the one codec of the ports ([`crate::codec`]: big-endian integers,
//! length-prefixed frames).
//!
//! ```text
//! hello   (prefill → decode, once)  a connection hello for "KVTN" ([`crate::admission`])     48 bytes
//! frame   (either way)              length u32 (of what follows) | kind u8 | body
//! ```
//!
//! A request id is `id length u16 | id` (UTF-8, 1 to `MAX_REQUEST_ID` bytes); a reason is `length u16 |
//! text` (at most [`MAX_REASON`] bytes). Bodies, by kind:
//!
//! | kind | from | body | meaning |
//! |---|---|---|---|
//! | 1 `Start` | prefill | id | the peer is about to write the request's first blocks |
//! | 2 `Done` | prefill | id, layer u32, mark u32, count u32, count × block id u32 | a write is in the decode's memory (over RDMA: once the queue pair's send carrying `mark` has come too) |
//! | 3 `Failed` | prefill | id, code u32, reason | a write of the request failed |
//! | 4 `Abort` | prefill | id, reason | the request will not complete |
//! | 5 `Revoked` | prefill | id | confirms a `Revoke`: nothing of the request moves any more |
//! | 6 `Closed` | prefill | — | confirms a `Close` |
//! | 7 `Ping` | prefill | — | the prefill is alive |
//! | 8 `Revoke` | decode | id | stop and drain the request's writes, then confirm |
//! | 9 `Close` | decode | — | the decode is closing: stop writing, then confirm |
//! | 10 `Ready` | decode | — | the channel is open (after the `WasRevoked` the prefill must know first) |
//! | 11 `WasRevoked` | decode | id | a request revoked before this channel opened (no confirmation) |

use crate::codec::{self, Reader};
use crate::error::{Error, ErrorCode, Result};
use std::fmt;

/// What a request channel's connection hello starts with.
pub const HELLO_MAGIC: [u8; 4] = *b"KVTN";
/// The longest request id.
pub const MAX_REQUEST_ID: usize = 256;
/// The longest reason a frame carries (longer ones are cut).
pub const MAX_REASON: usize = 1024;

/// A request's name, chosen by the engine: 1 to `MAX_REQUEST_ID` bytes of UTF-8. Its `Debug` form is the
/// quoted id (`"req-3"`), as messages show it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl RequestId {
    /// Checks `id`: not empty, at most `MAX_REQUEST_ID` bytes.
    pub fn new(id: impl Into<String>) -> Result<RequestId> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_REQUEST_ID {
            return Err(Error::invalid(format!("a request id must be 1 to {MAX_REQUEST_ID} bytes, not {}", id.len())));
        }
        Ok(RequestId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One message on the request channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Start { request: RequestId },
    Done { request: RequestId, layer: u32, mark: u32, blocks: Vec<u32> },
    Failed { request: RequestId, code: ErrorCode, reason: String },
    Abort { request: RequestId, reason: String },
    Revoked { request: RequestId },
    Closed,
    Ping,
    Revoke { request: RequestId },
    Close,
    Ready,
    WasRevoked { request: RequestId },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Start { .. } => 1,
            Frame::Done { .. } => 2,
            Frame::Failed { .. } => 3,
            Frame::Abort { .. } => 4,
            Frame::Revoked { .. } => 5,
            Frame::Closed => 6,
            Frame::Ping => 7,
            Frame::Revoke { .. } => 8,
            Frame::Close => 9,
            Frame::Ready => 10,
            Frame::WasRevoked { .. } => 11,
        }
    }

    /// Whether the prefill sends it (else the decode does).
    pub fn from_prefill(&self) -> bool {
        self.kind() <= 7
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let start = codec::begin_frame(out);
        out.push(self.kind());
        match self {
            Frame::Start { request } | Frame::Revoked { request } | Frame::Revoke { request } | Frame::WasRevoked { request } => {
                put_id(out, request)
            }
            Frame::Done { request, layer, mark, blocks } => {
                put_id(out, request);
                codec::put_u32(out, *layer);
                codec::put_u32(out, *mark);
                codec::put_u32(out, blocks.len() as u32);
                for &b in blocks {
                    codec::put_u32(out, b);
                }
            }
            Frame::Failed { request, code, reason } => {
                put_id(out, request);
                codec::put_u32(out, code.to_wire());
                put_text(out, reason);
            }
            Frame::Abort { request, reason } => {
                put_id(out, request);
                put_text(out, reason);
            }
            Frame::Closed | Frame::Ping | Frame::Close | Frame::Ready => {}
        }
        codec::end_frame(out, start);
    }

    /// The longest frame (after its length prefix) for a cache of `block_number` blocks.
    pub fn max_len(block_number: u32) -> usize {
        1 + 2 + MAX_REQUEST_ID + 12 + 4 * block_number as usize + 2 + MAX_REASON
    }

    /// Parses a frame's bytes after its length prefix. Anything malformed (unknown kind, lengths that do not
    /// add up, a block count above `block_number`, bytes left over) is a protocol error.
    pub fn decode(bytes: &[u8], block_number: u32) -> Result<Frame> {
        let mut r = Reader::new(bytes);
        let kind = r.u8()?;
        let frame = match kind {
            1 => Frame::Start { request: r.id()? },
            2 => {
                let request = r.id()?;
                let layer = r.u32()?;
                let mark = r.u32()?;
                let count = r.u32()?;
                if count > block_number {
                    return Err(Error::protocol(format!("a notification lists {count} blocks; the cache has {block_number}")));
                }
                let raw = r.take(count as usize * 4)?;
                Frame::Done { request, layer, mark, blocks: (0..count as usize).map(|i| codec::u32_at(raw, 4 * i)).collect() }
            }
            3 => Frame::Failed { request: r.id()?, code: ErrorCode::from_wire(r.u32()?), reason: r.text()? },
            4 => Frame::Abort { request: r.id()?, reason: r.text()? },
            5 => Frame::Revoked { request: r.id()? },
            6 => Frame::Closed,
            7 => Frame::Ping,
            8 => Frame::Revoke { request: r.id()? },
            9 => Frame::Close,
            10 => Frame::Ready,
            11 => Frame::WasRevoked { request: r.id()? },
            k => return Err(Error::protocol(format!("unknown request-channel frame kind {k}"))),
        };
        if !r.finished() {
            return Err(Error::protocol(format!("{} stray bytes after a request-channel frame", bytes.len() - r.position())));
        }
        Ok(frame)
    }
}

fn put_id(out: &mut Vec<u8>, id: &RequestId) {
    codec::put_u16(out, id.0.len() as u16);
    out.extend_from_slice(id.0.as_bytes());
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    codec::put_u16(out, end as u16);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// A request id and a reason, as the frames carry them.
trait ReadText {
    fn utf8(&mut self, max: usize, what: &str) -> Result<String>;
    fn id(&mut self) -> Result<RequestId>;
    fn text(&mut self) -> Result<String>;
}

impl ReadText for Reader<'_> {
    fn utf8(&mut self, max: usize, what: &str) -> Result<String> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(Error::protocol(format!("a {what} of {len} bytes (at most {max})")));
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| Error::protocol(format!("a {what} that is not UTF-8")))
    }
    fn id(&mut self) -> Result<RequestId> {
        RequestId::new(self.utf8(MAX_REQUEST_ID, "request id")?).map_err(|e| Error::protocol(e.message().to_string()))
    }
    fn text(&mut self) -> Result<String> {
        self.utf8(MAX_REASON, "reason")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> RequestId {
        RequestId::new(s).unwrap()
    }

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Start { request: id("r1") },
            Frame::Done { request: id("r1"), layer: 3, mark: 9, blocks: vec![0, 7, 2] },
            Frame::Failed { request: id("é"), code: ErrorCode::Transport, reason: "broken pipe".into() },
            Frame::Abort { request: id("x"), reason: String::new() },
            Frame::Revoked { request: id("y") },
            Frame::Closed,
            Frame::Ping,
            Frame::Revoke { request: id("z") },
            Frame::Close,
            Frame::Ready,
            Frame::WasRevoked { request: id("w") },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        let mut buf = vec![];
        for f in every_frame() {
            f.encode(&mut buf);
            let len = codec::frame_length(buf[..4].try_into().unwrap());
            assert_eq!(len, buf.len() - 4);
            assert!(len <= Frame::max_len(8));
            assert_eq!(Frame::decode(&buf[4..], 8).unwrap(), f);
        }
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        let mut buf = vec![];
        Frame::Done { request: id("r"), layer: 0, mark: 1, blocks: vec![1; 9] }.encode(&mut buf);
        assert!(Frame::decode(&buf[4..], 8).unwrap_err().message().contains("9 blocks"));
        for cut in 1..buf.len() - 4 {
            assert_eq!(Frame::decode(&buf[4..4 + cut], 100).unwrap_err().code(), ErrorCode::Protocol);
        }
        let mut long = buf[4..].to_vec();
        long.push(0);
        assert!(Frame::decode(&long, 100).unwrap_err().message().contains("stray"));
        assert!(Frame::decode(&[99], 8).unwrap_err().message().contains("kind 99"));
        // An empty id, and one that is not UTF-8.
        assert!(Frame::decode(&[1, 0, 0], 8).is_err());
        assert!(Frame::decode(&[1, 0, 1, 0xff], 8).unwrap_err().message().contains("UTF-8"));
    }

    #[test]
    fn ids_and_reasons_are_bounded() {
        assert!(RequestId::new("").is_err());
        assert!(RequestId::new("a".repeat(MAX_REQUEST_ID + 1)).is_err());
        let mut buf = vec![];
        let reason = "ü".repeat(MAX_REASON);
        Frame::Abort { request: id("r"), reason }.encode(&mut buf);
        let Frame::Abort { reason, .. } = Frame::decode(&buf[4..], 8).unwrap() else { panic!() };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'ü'));
    }
}
