//! The data path's messages, in the one codec of the ports ([`crate::codec`]: big-endian integers): what goes
//! over TCP's data connections, and the write header and run table that start each slot of the shared-memory
//! ring ([`crate::transport::shm`]).
//!
//! ```text
//! data hello  (prefill → decode, once)  a connection hello for "KVTD" ([`crate::admission`]) 48 bytes
//! hello ack   (decode → prefill, once)  magic "KVTK" | status u32                         8 bytes
//! write       (prefill → decode)        magic "KVTW" | layer u32 | runs u32 | tensors u8 | part u8
//!                                       | parts u8 | 1 pad | seq u64 | payload bytes u64   32 bytes
//!                                       then runs × (remote start u32 | count u32), then the payload:
//!                                       for each tensor in mask order, for each run, its blocks' bytes
//! ```
//!
//! A call's write goes whole over one of the link's connections (`part` 0 of `parts` 1), or split into
//! `parts` consecutive pieces of its block list, all with the call's `seq` (the prefill sends piece `part` over its
//! connection `part`; the decode takes a piece from any of the link's connections): each piece is a write of its
//! own (checked, received and acked alone), and the call has arrived once every piece of one `seq` and layer
//! has.
//!
//! ```text
//! ack         (decode → prefill)        magic "KVTA" | status u32 | seq u64 | reason len u32 | 4 pad
//!                                       then the reason (UTF-8)                           24 bytes + reason
//! ```

use crate::codec::{put_u32, put_u64, u32_at, u64_at};
use crate::config::MAX_TCP_CONNECTIONS;
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{CacheLayout, TensorSet};
use crate::plan::{check_remote_runs, Run, SliceGeometry};

/// What a data connection's hello starts with.
pub const HELLO_MAGIC: [u8; 4] = *b"KVTD";
pub const HELLO_ACK_MAGIC: u32 = u32::from_be_bytes(*b"KVTK");
pub const WRITE_MAGIC: u32 = u32::from_be_bytes(*b"KVTW");
pub const ACK_MAGIC: u32 = u32::from_be_bytes(*b"KVTA");

pub const HELLO_ACK_LEN: usize = 8;
pub const WRITE_HEADER_LEN: usize = 32;
pub const RUN_LEN: usize = 8;
pub const ACK_LEN: usize = 24;
/// The most runs one write may carry (a 32 MiB run table); more is garbage.
pub const MAX_RUNS: u32 = 1 << 22;
/// The longest reason an ack may carry.
pub const MAX_REASON: u32 = 4096;

/// The answer to a data connection's hello: 0, or the wire code of an error.
pub fn encode_hello_ack(status: u32) -> [u8; HELLO_ACK_LEN] {
    let mut b = [0u8; HELLO_ACK_LEN];
    b[0..4].copy_from_slice(&HELLO_ACK_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&status.to_be_bytes());
    b
}

pub fn decode_hello_ack(b: &[u8; HELLO_ACK_LEN]) -> Result<()> {
    if u32_at(b, 0) != HELLO_ACK_MAGIC {
        return Err(Error::protocol("the decode peer answered the data hello with garbage"));
    }
    match u32_at(b, 4) {
        0 => Ok(()),
        code if ErrorCode::from_wire(code) == ErrorCode::Unauthenticated => Err(Error::new(
            ErrorCode::Unauthenticated,
            "the decode peer refused the data connection: its hello did not carry this handshake's proof of KVCACHE_AUTH_TOKEN",
        )),
        code => Err(Error::new(
            ErrorCode::from_wire(code),
            "the decode peer refused the data connection (its handshake session is unknown or expired)",
        )),
    }
}

/// The fixed part of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHeader {
    pub layer: u32,
    pub runs: u32,
    pub tensors: u8,
    /// Which piece of its call this write is, of how many (0 of 1: the whole call).
    pub part: u8,
    pub parts: u8,
    pub seq: u64,
    pub payload_bytes: u64,
}

impl WriteHeader {
    /// Appends the header and the run table (remote side of each run) to `out`.
    pub fn encode_with_runs(&self, runs: &[Run], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(WRITE_HEADER_LEN + runs.len() * RUN_LEN);
        put_u32(out, WRITE_MAGIC);
        put_u32(out, self.layer);
        put_u32(out, self.runs);
        out.extend_from_slice(&[self.tensors, self.part, self.parts, 0]);
        put_u64(out, self.seq);
        put_u64(out, self.payload_bytes);
        for r in runs {
            put_u32(out, r.remote);
            put_u32(out, r.count);
        }
    }

    /// The receiver's own check of a write (its header and run table) against its cache and what the handshake
    /// agreed: whatever arrives, nothing lands outside the cache. Returns the write's blocks. `sorted` is
    /// scratch.
    pub fn check(&self, runs: &[Run], cache: &CacheLayout, tensors: TensorSet, geometry: SliceGeometry, sorted: &mut Vec<(u32, u32)>) -> Result<u64> {
        if self.layer >= cache.layers() {
            return Err(Error::invalid(format!("layer {} is outside [0, {})", self.layer, cache.layers())));
        }
        if self.tensors != tensors.bits() {
            return Err(Error::invalid(format!("the write carries tensors {:#06b}, the handshake agreed {:#06b}", self.tensors, tensors.bits())));
        }
        if runs.len() != self.runs as usize {
            return Err(Error::protocol(format!("a write announces {} runs and carries {}", self.runs, runs.len())));
        }
        let blocks = check_remote_runs(runs, cache.block_number(), sorted)?;
        let ratio = geometry.ratio as u64;
        let expected: u64 = tensors.iter().map(|t| blocks * (cache.block_bytes(t) / ratio)).sum();
        if expected != self.payload_bytes {
            return Err(Error::invalid(format!("the write announces {} payload bytes but its {blocks} blocks make {expected}", self.payload_bytes)));
        }
        Ok(blocks)
    }

    /// Parses a header; garbage (bad magic, absurd run count) is a protocol error.
    pub fn decode(b: &[u8; WRITE_HEADER_LEN]) -> Result<WriteHeader> {
        if u32_at(b, 0) != WRITE_MAGIC {
            return Err(Error::protocol(format!("expected a write header, got bytes {:02x?}", &b[..8])));
        }
        let h = WriteHeader {
            layer: u32_at(b, 4),
            runs: u32_at(b, 8),
            tensors: b[12],
            part: b[13],
            parts: b[14],
            seq: u64_at(b, 16),
            payload_bytes: u64_at(b, 24),
        };
        if h.runs > MAX_RUNS {
            return Err(Error::protocol(format!("a write claims {} runs (at most {MAX_RUNS})", h.runs)));
        }
        if h.parts == 0 || h.part >= h.parts || h.parts as u32 > MAX_TCP_CONNECTIONS {
            return Err(Error::protocol(format!("a write claims to be piece {} of {} (at most {MAX_TCP_CONNECTIONS} pieces)", h.part, h.parts)));
        }
        Ok(h)
    }
}

/// Parses a run table (remote start, count); the local side is unknown to the receiver and read as 0.
pub fn decode_runs(b: &[u8], out: &mut Vec<Run>) {
    out.clear();
    out.extend(b.chunks_exact(RUN_LEN).map(|c| Run { local: 0, remote: u32_at(c, 0), count: u32_at(c, 4) }));
}

/// The decode side's answer to a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub status: u32,
    pub seq: u64,
    pub reason: String,
}

impl Ack {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(MAX_REASON as usize)];
        out.clear();
        put_u32(out, ACK_MAGIC);
        put_u32(out, self.status);
        put_u64(out, self.seq);
        put_u32(out, reason.len() as u32);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(reason);
    }

    /// Parses the fixed part; returns `(status, seq, reason length)`.
    pub fn decode_fixed(b: &[u8; ACK_LEN]) -> Result<(u32, u64, u32)> {
        if u32_at(b, 0) != ACK_MAGIC {
            return Err(Error::protocol("the decode peer answered a write with garbage"));
        }
        let reason_len = u32_at(b, 16);
        if reason_len > MAX_REASON {
            return Err(Error::protocol(format!("an ack claims a {reason_len}-byte reason")));
        }
        Ok((u32_at(b, 4), u64_at(b, 8), reason_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_header_round_trips() {
        let h = WriteHeader { layer: 3, runs: 2, tensors: 0b11, part: 2, parts: 3, seq: 77, payload_bytes: 4096 };
        let runs = [Run { local: 9, remote: 1, count: 2 }, Run { local: 0, remote: 7, count: 1 }];
        let mut buf = vec![];
        h.encode_with_runs(&runs, &mut buf);
        assert_eq!(buf.len(), WRITE_HEADER_LEN + 2 * RUN_LEN);
        assert_eq!(WriteHeader::decode(buf[..WRITE_HEADER_LEN].try_into().unwrap()).unwrap(), h);
        let mut back = vec![];
        decode_runs(&buf[WRITE_HEADER_LEN..], &mut back);
        assert_eq!(back, [Run { local: 0, remote: 1, count: 2 }, Run { local: 0, remote: 7, count: 1 }]);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(WriteHeader::decode(&[0xAB; WRITE_HEADER_LEN]).is_err());
        let mut buf = vec![];
        WriteHeader { layer: 0, runs: MAX_RUNS + 1, tensors: 1, seq: 0, payload_bytes: 0, part: 0, parts: 1 }.encode_with_runs(&[], &mut buf);
        let err = WriteHeader::decode(buf[..WRITE_HEADER_LEN].try_into().unwrap()).unwrap_err();
        assert!(err.message().contains("runs"));
        for (part, parts) in [(0, 0), (2, 2), (0, MAX_TCP_CONNECTIONS as u8 + 1)] {
            WriteHeader { layer: 0, runs: 1, tensors: 1, part, parts, seq: 0, payload_bytes: 0 }.encode_with_runs(&[], &mut buf);
            let err = WriteHeader::decode(buf[..WRITE_HEADER_LEN].try_into().unwrap()).unwrap_err();
            assert!(err.message().contains("piece"), "{part} of {parts}: {err}");
        }
        assert!(decode_hello_ack(&[2; HELLO_ACK_LEN]).is_err());
        assert!(Ack::decode_fixed(&[3; ACK_LEN]).is_err());
    }

    #[test]
    fn acks_and_hellos_round_trip() {
        let mut buf = vec![];
        Ack { status: 5, seq: 9, reason: "no".into() }.encode(&mut buf);
        assert_eq!(Ack::decode_fixed(buf[..ACK_LEN].try_into().unwrap()).unwrap(), (5, 9, 2));
        assert_eq!(&buf[ACK_LEN..], b"no");
        assert!(decode_hello_ack(&encode_hello_ack(0)).is_ok());
        assert_eq!(decode_hello_ack(&encode_hello_ack(5)).unwrap_err().code(), ErrorCode::Rejected);
    }
}
