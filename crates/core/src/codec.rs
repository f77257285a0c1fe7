//! The one binary codec of a decode's three ports (control, request channel, TCP data): integers are
//! big-endian (network order), and a message of no fixed size is a frame, its length (u32) then its bytes. The
//! control port's messages are frames of JSON ([`crate::wire`]); the request channel's are frames of
//! [`crate::channel::Frame`]; a data or channel connection opens with an [`crate::admission::ConnectionHello`];
//! the TCP data path's writes are fixed headers, run tables and payload ([`crate::transport::frame`]).
//!
//! ```
//! use kvtransfer::codec::{self, Reader};
//! let mut out = Vec::new();
//! let start = codec::begin_frame(&mut out);
//! codec::put_u16(&mut out, 7);
//! codec::put_u64(&mut out, 1 << 40);
//! codec::end_frame(&mut out, start);
//! assert_eq!(codec::frame_length(out[..4].try_into().unwrap()), 10);
//! let mut r = Reader::new(&out[4..]);
//! assert_eq!((r.u16().unwrap(), r.u64().unwrap()), (7, 1 << 40));
//! assert!(r.finished());
//! ```

use crate::error::{Error, Result};

pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// The u32 at `at` of `b` (which the caller has checked is long enough).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// The u64 at `at` of `b` (which the caller has checked is long enough).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// A frame's length, from its first four bytes.
pub fn frame_length(header: [u8; 4]) -> usize {
    u32::from_be_bytes(header) as usize
}

/// Starts a frame at the end of `out`: returns where, for [`end_frame`].
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    start
}

/// Writes the length of the frame begun at `start` (what was appended since its header).
pub fn end_frame(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - 4).expect("frames are bounded far below 4 GiB by their senders");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// `body` as a frame.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    let start = begin_frame(&mut out);
    out.extend_from_slice(body);
    end_frame(&mut out, start);
    out
}

/// Reads what a peer sent, never past its end: a short message is a protocol error, not a panic.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| Error::protocol(format!("a message cut short: {n} more bytes expected at byte {}", self.at)))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.at..];
        self.at = self.bytes.len();
        rest
    }

    /// Whether every byte was read.
    pub fn finished(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.at
    }
}
