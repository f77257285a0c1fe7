//! How a decode admits the connections a handshake promised: the TCP data connections and the request channel
//! of a link each present a token (random, from the OS) that the welcome named, with the proof that the prefill
//! holds `KVCACHE_AUTH_TOKEN` (an HMAC over that token and the handshake's nonces, zeros without a token). One
//! path for both ports: a token opens the connections it was handed out for (one request channel; a link's TCP
//! data connections), within the time it is given; an unknown, used up, expired or unproven one opens nothing;
//! at most a set number wait at once (past that the oldest goes).
//!
//! ```text
//! connection hello (prefill → decode, once)  magic [u8; 4] | protocol u32 | token u64 | proof [u8; 32]   48 bytes
//! ```
//!
//! ```
//! use kvtransfer::admission::{Admissions, ConnectionHello, Refused};
//! use std::time::Duration;
//! let waiting = Admissions::new(Duration::from_secs(5), 16);
//! let (token, pushed_out) = waiting.admit("link 1", 1, |_| Some([7; 32]));
//! assert!(pushed_out.is_empty());
//! let hello = ConnectionHello { magic: *b"KVTN", protocol: 5, token, proof: [7; 32] };
//! let parsed = ConnectionHello::decode(*b"KVTN", &hello.encode()).unwrap();
//! assert_eq!(waiting.take(&parsed), Ok("link 1"));
//! assert!(matches!(waiting.take(&parsed), Err(Refused::Unknown)), "a token for one connection opens one");
//! ```

use crate::sync::lock;
use crate::auth::{tags_equal, Tag};
use crate::codec;
use crate::error::{Error, Result};
use crate::wire::PROTOCOL_VERSION;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The length of a [`ConnectionHello`].
pub const HELLO_LEN: usize = 48;

/// The first message of a data or request-channel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionHello {
    /// Which port it is meant for (`KVTD` data, `KVTN` request channel).
    pub magic: [u8; 4],
    pub protocol: u32,
    pub token: u64,
    pub proof: Tag,
}

impl ConnectionHello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = Vec::with_capacity(HELLO_LEN);
        out.extend_from_slice(&self.magic);
        codec::put_u32(&mut out, self.protocol);
        codec::put_u64(&mut out, self.token);
        out.extend_from_slice(&self.proof);
        out.try_into().expect("48 bytes")
    }

    /// Parses a hello meant for the port of `magic`; another port's, or garbage, is a protocol error.
    pub fn decode(magic: [u8; 4], bytes: &[u8; HELLO_LEN]) -> Result<ConnectionHello> {
        if bytes[..4] != magic {
            let port = String::from_utf8_lossy(&magic).into_owned();
            return Err(Error::protocol(format!("expected a connection hello for {port}, got bytes {:02x?}", &bytes[..8])));
        }
        let proof: Tag = bytes[16..].try_into().expect("32 bytes");
        Ok(ConnectionHello { magic, protocol: codec::u32_at(bytes, 4), token: codec::u64_at(bytes, 8), proof })
    }
}

/// Why a hello opened nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// A hello of another wire protocol version (this one's tokens mean nothing there).
    Version(u32),
    /// No such token waits (never handed out, used, or pushed out).
    Unknown,
    /// Its time was up: what it was for is let go.
    Expired(T),
    /// It came without the proof: someone who saw the token but does not hold `KVCACHE_AUTH_TOKEN`. What it was
    /// for is let go too (its real owner cannot open it any more either).
    Unproven(T),
}

impl<T> Refused<T> {
    /// The refusal as an error for the log, and what is let go with it.
    pub fn into_parts(self, what: &str) -> (Error, Option<T>) {
        use crate::error::ErrorCode;
        match self {
            Refused::Version(v) => {
                let why = format!("a {what} hello of wire protocol {v} (this decode speaks {PROTOCOL_VERSION}): run one version on both sides");
                (Error::new(ErrorCode::Protocol, why), None)
            }
            Refused::Unknown => (Error::new(ErrorCode::Rejected, format!("an unknown {what} token")), None),
            Refused::Expired(t) => (Error::new(ErrorCode::Rejected, format!("an expired {what} token")), Some(t)),
            Refused::Unproven(t) => {
                (Error::new(ErrorCode::Unauthenticated, format!("a {what} hello without the proof of KVCACHE_AUTH_TOKEN")), Some(t))
            }
        }
    }
}

struct Waiting<T> {
    value: T,
    at: Instant,
    proof: Option<Tag>,
    /// Connections it may still open.
    left: u32,
}

/// Tokens handed out by handshakes, each waiting for its connections, with what it admits (`T`).
pub struct Admissions<T> {
    waiting: Mutex<HashMap<u64, Waiting<T>>>,
    ttl: Duration,
    max: usize,
}

impl<T> Admissions<T> {
    /// Tokens live `ttl`; at most `max` wait at once.
    pub fn new(ttl: Duration, max: usize) -> Admissions<T> {
        Admissions { waiting: Mutex::new(HashMap::new()), ttl, max: max.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting<T>>> {
        lock(&self.waiting)
    }

    /// Hands out a token for `value` that opens `connections` connections (at least one); `proof(token)` is what
    /// their hellos must carry (`None`: anything, without `KVCACHE_AUTH_TOKEN`). Returns the token, and what was
    /// let go to make room: the expired, and past `max` the oldest.
    pub fn admit(&self, value: T, connections: u32, proof: impl FnOnce(u64) -> Option<Tag>) -> (u64, Vec<T>) {
        let mut waiting = self.lock();
        let mut gone = take_expired(&mut waiting, self.ttl);
        if waiting.len() >= self.max {
            let oldest = waiting.iter().min_by_key(|(_, w)| w.at).map(|(t, _)| *t).expect("full");
            gone.extend(waiting.remove(&oldest).map(|w| w.value));
        }
        let token = loop {
            let token = crate::auth::random_u64();
            if !waiting.contains_key(&token) {
                break token;
            }
        };
        waiting.insert(token, Waiting { value, at: Instant::now(), proof: proof(token), left: connections.max(1) });
        (token, gone)
    }

    /// Opens one of the connections the token of `hello` was handed out for (the last uses it up): what it
    /// admits, or why not. An expired or unproven hello lets go of the token's other connections too.
    pub fn take(&self, hello: &ConnectionHello) -> std::result::Result<T, Refused<T>>
    where
        T: Clone,
    {
        if hello.protocol != PROTOCOL_VERSION {
            return Err(Refused::Version(hello.protocol));
        }
        let mut waiting = self.lock();
        let Some(w) = waiting.get_mut(&hello.token) else { return Err(Refused::Unknown) };
        let expired = w.at.elapsed() >= self.ttl;
        let unproven = w.proof.is_some_and(|expected| !tags_equal(&expected, &hello.proof));
        if !expired && !unproven && w.left > 1 {
            w.left -= 1;
            return Ok(w.value.clone());
        }
        let w = waiting.remove(&hello.token).expect("found above");
        match (expired, unproven) {
            (true, _) => Err(Refused::Expired(w.value)),
            (_, true) => Err(Refused::Unproven(w.value)),
            _ => Ok(w.value),
        }
    }

    /// Lets go of the tokens whose time is up; returns what they admitted.
    pub fn expired(&self) -> Vec<T> {
        take_expired(&mut self.lock(), self.ttl)
    }

    /// Withdraws `token`, if it still waits.
    pub fn withdraw(&self, token: u64) -> Option<T> {
        self.lock().remove(&token).map(|w| w.value)
    }

    /// Withdraws every token.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

fn take_expired<T>(waiting: &mut HashMap<u64, Waiting<T>>, ttl: Duration) -> Vec<T> {
    let expired: Vec<u64> = waiting.iter().filter(|(_, w)| w.at.elapsed() >= ttl).map(|(t, _)| *t).collect();
    expired.into_iter().filter_map(|t| waiting.remove(&t)).map(|w| w.value).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(token: u64, proof: Tag) -> ConnectionHello {
        ConnectionHello { magic: *b"KVTD", protocol: PROTOCOL_VERSION, token, proof }
    }

    #[test]
    fn a_token_opens_one_connection_with_its_proof_within_its_time() {
        let waiting = Admissions::new(Duration::from_millis(200), 8);
        let (a, _) = waiting.admit(1, 1, |t| Some([t as u8; 32]));
        let (b, _) = waiting.admit(2, 1, |t| Some([t as u8; 32]));
        let (c, _) = waiting.admit(3, 1, |_| None);
        assert_eq!(waiting.take(&hello(a, [0xEE; 32])), Err(Refused::Unproven(1)), "a token seen on the way, without the proof");
        assert_eq!(waiting.take(&hello(a, [a as u8; 32])), Err(Refused::Unknown), "and it is used up");
        assert_eq!(waiting.take(&ConnectionHello { protocol: PROTOCOL_VERSION - 1, ..hello(b, [b as u8; 32]) }), Err(Refused::Version(PROTOCOL_VERSION - 1)));
        assert_eq!(waiting.take(&hello(b, [b as u8; 32])), Ok(2));
        assert_eq!(waiting.take(&hello(c, [9; 32])), Ok(3), "without a token any proof will do");
        let (d, _) = waiting.admit(4, 1, |_| None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(waiting.take(&hello(d, [0; 32])), Err(Refused::Expired(4)));
        let (_, _) = waiting.admit(5, 1, |_| None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(waiting.expired(), [5]);
    }

    #[test]
    fn a_token_for_several_connections_opens_that_many_and_no_more() {
        let waiting = Admissions::new(Duration::from_secs(5), 8);
        let (t, _) = waiting.admit("link", 3, |t| Some([t as u8; 32]));
        for _ in 0..3 {
            assert_eq!(waiting.take(&hello(t, [t as u8; 32])), Ok("link"));
        }
        assert_eq!(waiting.take(&hello(t, [t as u8; 32])), Err(Refused::Unknown), "used up");
        let (u, _) = waiting.admit("other", 3, |u| Some([u as u8; 32]));
        assert_eq!(waiting.take(&hello(u, [u as u8; 32])), Ok("other"));
        assert_eq!(waiting.take(&hello(u, [0xEE; 32])), Err(Refused::Unproven("other")), "a stranger's hello");
        assert_eq!(waiting.take(&hello(u, [u as u8; 32])), Err(Refused::Unknown), "lets go of the rest");
    }

    #[test]
    fn past_its_cap_the_oldest_goes() {
        let waiting = Admissions::new(Duration::from_secs(5), 2);
        let (first, _) = waiting.admit("a", 1, |_| None);
        waiting.admit("b", 1, |_| None);
        let (_, gone) = waiting.admit("c", 1, |_| None);
        assert_eq!(gone, ["a"]);
        assert_eq!(waiting.take(&hello(first, [0; 32])), Err(Refused::Unknown));
    }

    #[test]
    fn a_hello_for_another_port_or_garbage_is_refused() {
        let h = hello(7, [3; 32]);
        assert_eq!(ConnectionHello::decode(*b"KVTD", &h.encode()).unwrap(), h);
        assert!(ConnectionHello::decode(*b"KVTN", &h.encode()).is_err());
        assert!(ConnectionHello::decode(*b"KVTD", &[0xFF; HELLO_LEN]).is_err());
    }
}
