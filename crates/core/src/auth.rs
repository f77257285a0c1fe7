//! Mutual authentication with a shared secret (`KVCACHE_AUTH_TOKEN`): each side proves it holds the token by an
//! HMAC-SHA256 over both sides' fresh nonces, so the token never travels and no proof can be replayed.
//!
//! The handshake (see [`crate::wire`]): the prefill greets with its nonce; the decode answers with its own nonce
//! and its proof; the prefill checks that proof, then sends its hello with a MAC over the hello's exact bytes; the
//! decode checks it before it reads the hello, and MACs its welcome the same way. A peer without the token learns
//! nothing about the cache and gets no session; a fake decode gets no hello.
//!
//! ```
//! use kvtransfer::auth::{AuthKey, Role};
//! let (ours, theirs) = (AuthKey::new("s3cret"), AuthKey::new("s3cret"));
//! let (prefill_nonce, decode_nonce) = ([1u8; 16], [2u8; 16]);
//! let proof = theirs.sign(Role::DecodeChallenge, &prefill_nonce, &decode_nonce, b"");
//! assert!(ours.verify(Role::DecodeChallenge, &prefill_nonce, &decode_nonce, b"", &proof));
//! assert!(!AuthKey::new("guess").verify(Role::DecodeChallenge, &prefill_nonce, &decode_nonce, b"", &proof));
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

/// A MAC: 32 bytes of HMAC-SHA256.
pub type Tag = [u8; 32];

/// A handshake nonce: 16 bytes from the operating system's random source.
pub type Nonce = [u8; 16];

/// What a MAC vouches for; each has its own label, so no proof can stand in for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The decode's answer to a greeting: it holds the token.
    DecodeChallenge,
    /// The prefill's hello, byte for byte.
    PrefillHello,
    /// The decode's welcome, byte for byte.
    DecodeWelcome,
    /// The prefill's opening of a link's request channel (over the channel's token).
    ChannelHello,
    /// The prefill's opening of a link's TCP data connection (over the session's token).
    DataHello,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::DecodeChallenge => b"kvtransfer v1 decode challenge",
            Role::PrefillHello => b"kvtransfer v1 prefill hello",
            Role::DecodeWelcome => b"kvtransfer v1 decode welcome",
            Role::ChannelHello => b"kvtransfer v1 channel hello",
            Role::DataHello => b"kvtransfer v1 data hello",
        }
    }
}

/// The shared secret, ready to sign and verify. Its `Debug` form never shows it.
#[derive(Clone)]
pub struct AuthKey(Hmac<Sha256>);

impl AuthKey {
    /// The key for `token`.
    pub fn new(token: &str) -> AuthKey {
        AuthKey(Hmac::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length"))
    }

    /// The MAC of `message` in the handshake of these two nonces, for `role`.
    pub fn sign(&self, role: Role, prefill_nonce: &Nonce, decode_nonce: &Nonce, message: &[u8]) -> Tag {
        self.mac(role, prefill_nonce, decode_nonce, message).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC [`AuthKey::sign`] would give; compared in constant time.
    pub fn verify(&self, role: Role, prefill_nonce: &Nonce, decode_nonce: &Nonce, message: &[u8], tag: &Tag) -> bool {
        self.mac(role, prefill_nonce, decode_nonce, message).verify_slice(tag).is_ok()
    }

    fn mac(&self, role: Role, prefill_nonce: &Nonce, decode_nonce: &Nonce, message: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        let label = role.label();
        // Every part is length-prefixed, so no two different inputs read alike.
        for part in [label, prefill_nonce.as_slice(), decode_nonce.as_slice(), message] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(<secret>)")
    }
}

/// Whether two tags are equal, in time that does not depend on where they differ.
pub fn tags_equal(a: &Tag, b: &Tag) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// A fresh nonce.
pub fn nonce() -> Nonce {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).expect("the operating system's random source is readable");
    n
}

/// A number no other process can predict (tokens, session names, liveness words), from the operating system's
/// random source; never 0.
pub fn random_u64() -> u64 {
    loop {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the operating system's random source is readable");
        let n = u64::from_le_bytes(bytes);
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_role_nonces_and_message() {
        let key = AuthKey::new("token");
        let (p, d) = ([7u8; 16], [9u8; 16]);
        let tag = key.sign(Role::PrefillHello, &p, &d, b"hello");
        assert!(key.verify(Role::PrefillHello, &p, &d, b"hello", &tag));
        assert!(!key.verify(Role::DecodeWelcome, &p, &d, b"hello", &tag), "another role");
        assert!(!key.verify(Role::PrefillHello, &d, &p, b"hello", &tag), "nonces swapped");
        assert!(!key.verify(Role::PrefillHello, &p, &[0; 16], b"hello", &tag), "another handshake");
        assert!(!key.verify(Role::PrefillHello, &p, &d, b"hellO", &tag), "another message");
        assert!(!AuthKey::new("token2").verify(Role::PrefillHello, &p, &d, b"hello", &tag), "another key");
        let mut flipped = tag;
        flipped[31] ^= 1;
        assert!(!key.verify(Role::PrefillHello, &p, &d, b"hello", &flipped));
    }

    #[test]
    fn nonces_differ_and_the_key_never_prints() {
        assert_ne!(nonce(), nonce());
        assert_eq!(format!("{:?}", AuthKey::new("hunter2")), "AuthKey(<secret>)");
    }
}
