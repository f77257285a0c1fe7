//! The decode side: the control server that answers handshakes, and the accepting half of each transport
//! set up for the cache.

use super::negotiation;
use crate::auth::{self, AuthKey, Nonce, Role as Proof};
use crate::control::ControlServer;
use crate::error::{Error, ErrorCode, Result};
use crate::log::Logger;
use crate::memory::CacheLayout;
use crate::net;
use crate::transport::{Acceptor, Admission, Environment};
use crate::wire::{self, Reply, Request, TransportKind, Welcome, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handshakes that may be between their greeting and their hello at once; past that the oldest is forgotten
/// (its hello is then refused), so a flood of greetings never locks out a peer that completes its handshake.
const MAX_GREETINGS: usize = 1024;

pub(super) struct DecodeSide {
    port: u16,
    transports: Vec<TransportKind>,
    device: Option<String>,
    /// `None` once closed.
    listening: Mutex<Option<Listening>>,
}

/// A decode side's servers. Fields drop in order: the control server first (it holds the other references to
/// the accepting halves), then the accepting halves, which stop their data paths.
struct Listening {
    _control: ControlServer,
    _acceptors: Vec<Arc<dyn Acceptor>>,
}

impl DecodeSide {
    /// Starts answering handshakes on `port` (0: any free port) for the transports of `acceptors`.
    pub(super) fn listen(port: u16, env: &Environment<'_>, acceptors: Vec<Arc<dyn Acceptor>>) -> Result<DecodeSide> {
        let log = env.log;
        if env.config.socket_ifname.is_none() && log.debug_enabled() {
            let first = net::first_usable_interface().map(|(n, ip)| format!("{n} {ip}")).unwrap_or_else(|| "none".into());
            log.debug(format!("KVCACHE_SOCKET_IFNAME unset: listening on all interfaces (first usable: {first})"));
        }
        let auth = env.config.auth_token.as_ref().map(|t| AuthKey::new(t.expose()));
        if auth.is_none() && !env.listen_ip.is_loopback() {
            log.warn(format!(
                "listening on {} without KVCACHE_AUTH_TOKEN: any host that reaches this port can write into this cache",
                env.listen_ip
            ));
        }
        let handshake = Handshake {
            cache: env.cache.clone(),
            host: net::host_id(),
            acceptors: acceptors.clone(),
            log: log.clone(),
            auth,
            greetings: Mutex::new(HashMap::new()),
            timeout: env.config.timeout,
        };
        let zmq = zmq::Context::new();
        let control =
            ControlServer::bind(&zmq, &env.listen_ip.to_string(), port, move |peer, req| {
                // A bug in one answer must not end the thread that answers every peer.
                let reply = Error::catch_panic(|| Ok(handshake.answer(peer, req))).unwrap_or_else(|e| Reply::reject(&e));
                wire::encode(&reply)
            })?;
        Ok(DecodeSide {
            port: control.port(),
            transports: acceptors.iter().map(|a| a.kind()).collect(),
            device: acceptors.iter().find_map(|a| a.device().map(str::to_string)),
            listening: Mutex::new(Some(Listening { _control: control, _acceptors: acceptors })),
        })
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    pub(super) fn transports(&self) -> Vec<TransportKind> {
        self.transports.clone()
    }

    pub(super) fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Stops the control server, then the data paths: nothing lands after this returns.
    pub(super) fn close(&self) {
        drop(self.listening.lock().unwrap().take());
    }
}

/// The decode side's half of the handshake.
struct Handshake {
    cache: Arc<CacheLayout>,
    /// This host ([`net::host_id`]); same-host transports are offered only to prefills that share it.
    host: Option<String>,
    acceptors: Vec<Arc<dyn Acceptor>>,
    log: Arc<Logger>,
    /// The shared secret a prefill must prove it holds, when one is configured.
    auth: Option<AuthKey>,
    /// Greetings waiting for their hello, by control connection.
    greetings: Mutex<HashMap<Vec<u8>, Greeting>>,
    /// How long a greeting waits for its hello.
    timeout: Duration,
}

/// A greeting answered: the two nonces its hello must be signed over.
struct Greeting {
    prefill: Nonce,
    decode: Nonce,
    at: Instant,
}

impl Handshake {
    fn answer(&self, peer: &[u8], request: &[u8]) -> Reply {
        let answered = wire::decode_request(request).and_then(|request| match request {
            Request::Greeting { nonce, .. } => self.greet(peer, nonce),
            Request::Hello { hello, mac } => self.accept(peer, &hello, mac),
        });
        answered.unwrap_or_else(|e| {
            self.log.error(format!("refused a connection: {e}"));
            Reply::reject(&e)
        })
    }

    /// Answers a greeting with this side's nonce and, with a token, the proof that it holds it.
    fn greet(&self, peer: &[u8], prefill: Nonce) -> Result<Reply> {
        let decode = auth::nonce();
        let mut greetings = self.greetings.lock().unwrap_or_else(|p| p.into_inner());
        greetings.retain(|_, g| g.at.elapsed() < self.timeout);
        if greetings.len() >= MAX_GREETINGS && !greetings.contains_key(peer) {
            let oldest = greetings.iter().min_by_key(|(_, g)| g.at).map(|(k, _)| k.clone());
            greetings.remove(&oldest.expect("the map is full"));
        }
        greetings.insert(peer.to_vec(), Greeting { prefill, decode, at: Instant::now() });
        let proof = self.auth.as_ref().map(|key| key.sign(Proof::DecodeChallenge, &prefill, &decode, b""));
        Ok(Reply::Challenge { protocol: PROTOCOL_VERSION, nonce: decode, proof })
    }

    /// Checks a hello (its MAC first, when a token is configured: nothing about the cache is said to a peer that
    /// has not proven it holds the token) and admits the prefill over the transport both sides prefer.
    fn accept(&self, peer: &[u8], hello_text: &str, mac: Option<auth::Tag>) -> Result<Reply> {
        let greeting = self.greetings.lock().unwrap_or_else(|p| p.into_inner()).remove(peer);
        let Some(greeting) = greeting.filter(|g| g.at.elapsed() < self.timeout) else {
            return Err(Error::protocol("a hello without a greeting before it (or after it timed out)"));
        };
        if let Some(key) = &self.auth {
            let proven = mac.is_some_and(|tag| key.verify(Proof::PrefillHello, &greeting.prefill, &greeting.decode, hello_text.as_bytes(), &tag));
            if !proven {
                return Err(Error::new(
                    ErrorCode::Unauthenticated,
                    "this decode requires KVCACHE_AUTH_TOKEN, and the peer did not prove it holds it",
                ));
            }
        }
        let welcome = self.welcome(&wire::decode_hello(hello_text.as_bytes())?)?;
        let text = String::from_utf8(wire::encode(&welcome)).expect("JSON is UTF-8");
        let mac = self.auth.as_ref().map(|key| key.sign(Proof::DecodeWelcome, &greeting.prefill, &greeting.decode, text.as_bytes()));
        Ok(Reply::Welcome { welcome: text, mac })
    }

    fn welcome(&self, hello: &wire::Hello) -> Result<Welcome> {
        let agreed = negotiation::check_hello(hello, &self.cache)?;
        let same_host = self.host.is_some() && hello.host == self.host;
        let offers: Vec<TransportKind> = hello.offers.iter().map(|o| o.transport).collect();
        let ours: Vec<TransportKind> = self.acceptors.iter().map(|a| a.kind()).collect();
        let kind = negotiation::choose(&offers, &ours, same_host)?;
        let acceptor = self.acceptors.iter().find(|a| a.kind() == kind).expect("chosen among ours");
        let offer = hello.offers.iter().find(|o| o.transport == kind).expect("chosen among the offers");
        let peer = format!("prefill tp {}/{}", hello.tp_idx, hello.tp_size);
        let accepted = acceptor.accept(&Admission {
            peer: &peer,
            geometry: agreed.geometry,
            tensors: agreed.tensors,
            details: &offer.details,
            replaces: hello.replaces,
        })?;
        self.log.debug(format!(
            "accepted {peer} over {kind} with {} blocks (slice {} of {} per block)",
            hello.block_number, agreed.geometry.slot, agreed.geometry.ratio
        ));
        Ok(Welcome {
            protocol: PROTOCOL_VERSION,
            block_number: self.cache.block_number(),
            transport: kind,
            session: accepted.session,
            details: accepted.details,
        })
    }
}
