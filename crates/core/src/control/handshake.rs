//! The handshake, both halves side by side: the prefill's ([`greet`], then [`Greeted::hello`]) and the
//! decode's ([`answer_on`]). On one control connection:
//!
//! 1. greeting: the prefill's nonce; challenge: the decode's nonce and, with a token, its proof;
//! 2. hello: what the prefill is and offers (MAC'd over both nonces and its exact bytes, with a token); welcome:
//!    the transport taken and the session (MAC'd likewise), or a refusal.
//!
//! With a token nothing is prepared or said about a cache before the other side has proven it holds it
//! ([`crate::auth`]). What a hello must fit and which transport is taken are [`super::negotiation`]'s rules;
//! who is admitted is the decode's business ([`Admit`]). The decode knows where the prefill comes from
//! ([`Origin`]): a process of this host, named by the kernel, or an address.

use super::{negotiation, ControlClient, ControlServer};
use crate::auth::{self, AuthKey, Nonce, Role as Proof, Tag};
use crate::error::{Error, ErrorCode, Result};
use crate::listener::{self, Origin};
use crate::log::Logger;
use crate::wire::{self, Hello, Reply, Request, TransportKind, Welcome, PROTOCOL_VERSION};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The nonces of one connection's greeting: what its later messages are signed over.
#[derive(Clone, Copy)]
struct Nonces {
    prefill: Nonce,
    decode: Nonce,
}

/// The proofs a link's connections open with ([`crate::admission`]): over each one's token, for one
/// handshake; `None` without a token.
pub struct Proofs<'a> {
    nonces: Nonces,
    key: Option<&'a AuthKey>,
}

impl Proofs<'_> {
    /// What the request channel of `token` opens with.
    pub fn channel(&self, token: u64) -> Option<Tag> {
        self.over(Proof::ChannelHello, token)
    }

    /// What the data connection of session `token` opens with (a transport that takes connections: TCP).
    pub fn data(&self, token: u64) -> Option<Tag> {
        self.over(Proof::DataHello, token)
    }

    fn over(&self, role: Proof, token: u64) -> Option<Tag> {
        self.key.map(|key| key.sign(role, &self.nonces.prefill, &self.nonces.decode, &token.to_be_bytes()))
    }
}

/// The prefill's half, after the greeting: the decode has answered (and, with a token, proven it holds it).
pub struct Greeted {
    control: ControlClient,
    nonces: Nonces,
    key: Option<AuthKey>,
    endpoint: String,
}

/// What the prefill has once the decode welcomed its hello.
pub struct Admitted {
    pub welcome: Welcome,
    /// What the link's request channel opens with (zeros without a token).
    pub channel_proof: Tag,
    /// What the link's data connection opens with, where its transport takes one (zeros without a token).
    pub data_proof: Tag,
}

/// Opens a handshake with the decode at `host:port` (waiting for it until `timeout`) and greets it. With `key`,
/// a decode that does not prove it holds the token is `UNAUTHENTICATED`, and nothing more is said to it.
pub fn greet(host: &str, port: u16, timeout: Duration, key: Option<AuthKey>) -> Result<Greeted> {
    let mut control = ControlClient::connect(host, port, timeout)?;
    let endpoint = control.endpoint.clone();
    let prefill = auth::nonce();
    let greeting = wire::encode(&Request::Greeting { protocol: PROTOCOL_VERSION, nonce: prefill });
    let Reply::Challenge { nonce: decode, proof, .. } = wire::decode_reply(&control.ask(&greeting)?)? else {
        return Err(Error::protocol("the decode peer did not answer the greeting with a challenge"));
    };
    let nonces = Nonces { prefill, decode };
    if let Some(key) = &key {
        if !proof.is_some_and(|tag| key.verify(Proof::DecodeChallenge, &prefill, &decode, b"", &tag)) {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                format!(
                    "the decode peer at {endpoint} did not prove it holds KVCACHE_AUTH_TOKEN (it has none, or another \
                     one, or it is not the decode you meant): nothing was sent to it"
                ),
            ));
        }
    }
    Ok(Greeted { control, nonces, key, endpoint })
}

impl Greeted {
    /// Whether the decode knows this process from the kernel (the handshake runs over a Unix socket of this
    /// host): only then may it take a same-host transport.
    pub fn is_local(&self) -> bool {
        self.control.is_local()
    }

    /// Says `hello`, naming the decode's address as this connection reached it, and checks the welcome: signed
    /// (with a token), and an answer to what was offered.
    pub fn hello(mut self, hello: &Hello) -> Result<Admitted> {
        let hello = Hello { dialed: Some(self.control.reached()), ..hello.clone() };
        let text = String::from_utf8(wire::encode(&hello)).expect("JSON is UTF-8");
        let Nonces { prefill, decode } = self.nonces;
        let mac = self.key.as_ref().map(|key| key.sign(Proof::PrefillHello, &prefill, &decode, text.as_bytes()));
        let reply = wire::decode_reply(&self.control.ask(&wire::encode(&Request::Hello { hello: text, mac }))?)?;
        let Reply::Welcome { welcome, mac } = reply else {
            return Err(Error::protocol("the decode peer did not answer the hello with a welcome"));
        };
        if let Some(key) = &self.key {
            if !mac.is_some_and(|tag| key.verify(Proof::DecodeWelcome, &prefill, &decode, welcome.as_bytes(), &tag)) {
                let why = format!("the welcome from {} is not signed with KVCACHE_AUTH_TOKEN", self.endpoint);
                return Err(Error::new(ErrorCode::Unauthenticated, why));
            }
        }
        let welcome = wire::decode_welcome(welcome.as_bytes())?;
        let offered: Vec<TransportKind> = hello.offers.iter().map(|o| o.transport).collect();
        negotiation::check_welcome(&welcome, &offered)?;
        let proofs = Proofs { nonces: self.nonces, key: self.key.as_ref() };
        let channel_proof = proofs.channel(welcome.channel_token).unwrap_or([0; 32]);
        let data_proof = proofs.data(welcome.session).unwrap_or([0; 32]);
        Ok(Admitted { welcome, channel_proof, data_proof })
    }
}

/// What the decode admits a prefill with, once its hello is proven: a welcome, or why not.
pub trait Admit: Send + Sync + 'static {
    /// Admits the prefill of `hello`, which comes from `origin`; its connections must open with `proofs`.
    fn welcome(&self, origin: Origin, hello: &Hello, proofs: &Proofs<'_>) -> Result<Welcome>;

    /// A handshake from `origin` was refused with `why` (for the decode's instruments); nothing by default.
    fn refused(&self, _origin: Origin, _why: &Error) {}
}

/// Who the decode's half is: the token it proves, and the addresses it answers to besides the one each
/// connection came to (`KVCACHE_ANSWERS_TO`).
pub struct Identity {
    pub key: Option<AuthKey>,
    pub answers_to: Vec<SocketAddr>,
}

/// The decode's half: answers handshakes on `port` of `addrs` (and this host's processes on the Unix socket
/// beside each) as `identity`, admitting prefills with `admit`. With a token, a hello not signed with it is
/// refused before it is read, and so is one dialed to an address this decode does not answer to.
pub fn answer_on(
    addrs: &[IpAddr],
    port: u16,
    timeout: Duration,
    log: Arc<Logger>,
    identity: Identity,
    admit: Arc<dyn Admit>,
) -> Result<ControlServer> {
    let answering = Arc::new(Answering { identity, log: log.clone(), admit });
    // One conversation per control connection: its greeting, then the hello signed over that greeting's nonces.
    ControlServer::bind(addrs, port, timeout, log, move |origin, arrived| {
        let answering = answering.clone();
        let mut greeted = None;
        move |request: &[u8]| {
            // A bug in one answer must not end the connection's thread without a reply.
            let reply = Error::catch_panic(|| Ok(answering.answer(origin, arrived, &mut greeted, request)))
                .unwrap_or_else(|e| Reply::reject(&e));
            wire::encode(&reply)
        }
    })
}

struct Answering {
    identity: Identity,
    log: Arc<Logger>,
    admit: Arc<dyn Admit>,
}

impl Answering {
    /// Answers one request of a control connection from `origin` that came to `arrived`; `greeted` holds the
    /// nonces of its greeting.
    fn answer(&self, origin: Origin, arrived: SocketAddr, greeted: &mut Option<Nonces>, request: &[u8]) -> Reply {
        let answered = wire::decode_request(request).and_then(|request| match request {
            Request::Greeting { nonce, .. } => self.challenge(greeted, nonce),
            Request::Hello { hello, mac } => match greeted.take() {
                Some(nonces) => self.welcome(origin, arrived, nonces, &hello, mac),
                None => Err(Error::protocol("a hello without a greeting before it on its connection")),
            },
        });
        answered.unwrap_or_else(|e| {
            // Within the allowance of its host (all of loopback, or an IPv6 /64, is one).
            self.log.error_from(&listener::host_of(origin.ip()).to_string(), format!("refused a handshake from {origin}: {e}"));
            self.admit.refused(origin, &e);
            Reply::reject(&e)
        })
    }

    /// Answers a greeting with this side's nonce and, with a token, the proof that it holds it.
    fn challenge(&self, greeted: &mut Option<Nonces>, prefill: Nonce) -> Result<Reply> {
        if greeted.is_some() {
            return Err(Error::protocol("a second greeting on one control connection"));
        }
        let decode = auth::nonce();
        *greeted = Some(Nonces { prefill, decode });
        let proof = self.identity.key.as_ref().map(|key| key.sign(Proof::DecodeChallenge, &prefill, &decode, b""));
        Ok(Reply::Challenge { protocol: PROTOCOL_VERSION, nonce: decode, proof })
    }

    /// Checks a hello (its MAC first, with a token: nothing about the cache is said to a peer that has not proven
    /// it holds the token; then that it was dialed to this decode), admits it, and signs the welcome.
    fn welcome(&self, origin: Origin, arrived: SocketAddr, nonces: Nonces, hello_text: &str, mac: Option<Tag>) -> Result<Reply> {
        let key = self.identity.key.as_ref();
        if let Some(key) = key {
            let proven = mac.is_some_and(|tag| key.verify(Proof::PrefillHello, &nonces.prefill, &nonces.decode, hello_text.as_bytes(), &tag));
            if !proven {
                return Err(Error::new(
                    ErrorCode::Unauthenticated,
                    "this decode requires KVCACHE_AUTH_TOKEN, and the peer did not prove it holds it",
                ));
            }
        }
        let hello = wire::decode_hello(hello_text.as_bytes())?;
        if key.is_some() {
            self.check_dialed(hello.dialed, arrived)?;
        }
        let welcome = self.admit.welcome(origin, &hello, &Proofs { nonces, key })?;
        let text = String::from_utf8(wire::encode(&welcome)).expect("JSON is UTF-8");
        let mac = key.map(|key| key.sign(Proof::DecodeWelcome, &nonces.prefill, &nonces.decode, text.as_bytes()));
        Ok(Reply::Welcome { welcome: text, mac })
    }

    /// Whether a (signed) hello was meant for this decode: dialed to the address its connection came to, or to
    /// one this decode answers to (behind a NAT or a forwarded port). A prefill relayed here from another decode
    /// that shares the token is refused.
    fn check_dialed(&self, dialed: Option<SocketAddr>, arrived: SocketAddr) -> Result<()> {
        let Some(dialed) = dialed else {
            return Err(Error::protocol("a signed hello that does not name the address it was dialed to"));
        };
        // By address and port only: an IPv4 address dialed as IPv6 (`::ffff:a.b.c.d`) is that address, and a
        // link-local scope is an interface index of the host that wrote it.
        let same = |a: SocketAddr, b: SocketAddr| a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port();
        if same(dialed, arrived) || self.identity.answers_to.iter().any(|&a| same(dialed, a)) {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::Rejected,
            format!(
                "the prefill dialed {dialed}, but its connection came to this decode at {arrived}: a relay may be steering it \
                 to the wrong decode. Where prefills reach this decode through a NAT or a forwarded port, list the \
                 address they dial in the decode's KVCACHE_ANSWERS_TO (option answersTo)"
            ),
        ))
    }
}
