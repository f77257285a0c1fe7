//! The decode side: the control server that answers handshakes, and the accepting half of each transport
//! set up for the cache.

use crate::sync::lock;
use super::requests::Requests;
use crate::auth::AuthKey;
use crate::channel::{Ask, ChannelServer, Events, Frame, PeerInfo, RequestId};
use crate::control::handshake::{self, Admit, Proofs};
use crate::control::{negotiation, ControlServer};
use crate::error::{Error, ErrorCode, Result};
use crate::listener::{self, Origin};
use crate::log::Logger;
use crate::memory::CacheLayout;
use crate::metrics::{Instruments, Levels, Refusal};
use crate::process::PeerProcess;
use crate::transport::{Acceptor, Admission, Environment};
use crate::wire::{self, TransportKind, Welcome, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a same-host process whose link ended or did not answer is given to finish ending, before the link
/// counts as one that may still write: a killed process closes its sockets before it has ended.
const ENDING: Duration = Duration::from_millis(200);

pub(super) struct DecodeSide {
    port: u16,
    transports: Vec<TransportKind>,
    device: Option<String>,
    requests: Arc<Requests>,
    log: Arc<Logger>,
    metrics: Arc<Instruments>,
    /// The request channels' server, for what `stats()` reads from it (kept past close: its counts stay).
    channels: Arc<ChannelServer>,
    /// How long links get to confirm a revoke or a close.
    timeout: Duration,
    /// `None` once closed.
    listening: Mutex<Option<Listening>>,
}

/// A decode side's servers.
struct Listening {
    control: ControlServer,
    channels: Arc<ChannelServer>,
    links: Arc<Links>,
}

/// The prefill links' data paths, as the request channels see them: a link whose channel ends is cut off.
struct Links {
    acceptors: Vec<Arc<dyn Acceptor>>,
    requests: Arc<Requests>,
    log: Arc<Logger>,
    /// Same-host links whose channel ended without a goodbye while their process lives: they might still
    /// write, and nothing here can stop them.
    uncut: Mutex<Vec<PeerInfo>>,
}

impl Links {
    /// Stops the data path of `peer`. `false` where its transport cannot (a same-host one) and its process
    /// still lives `ending` from now.
    fn cut_off(&self, peer: &PeerInfo, ending: Duration) -> bool {
        let stopped = self.acceptors.iter().find(|a| a.kind() == peer.transport).is_some_and(|a| a.cut_off(peer.session));
        stopped || peer.process.as_ref().is_some_and(|p| p.ends_by(Instant::now() + ending))
    }

    /// Forgets the uncut links of process `pid` among `sessions`: that process says it dropped them.
    fn forget(&self, pid: Option<u32>, sessions: &[u64]) {
        if pid.is_some() && !sessions.is_empty() {
            lock(&self.uncut).retain(|p| !(p.process.as_ref().map(|p| p.pid()) == pid && sessions.contains(&p.session)));
        }
    }

    /// The same-host links that may still write once `until` has passed (forgetting those whose process has
    /// ended by then; each is waited for, without holding the list).
    fn uncut(&self, until: Instant) -> Vec<PeerInfo> {
        let waiting = lock(&self.uncut).clone();
        let ended: Vec<u64> = waiting.iter().filter(|p| p.process.as_ref().is_some_and(|p| p.ends_by(until))).map(|p| p.session).collect();
        let mut uncut = lock(&self.uncut);
        uncut.retain(|p| !ended.contains(&p.session));
        uncut.clone()
    }
}

/// Whether the process `pid` of `origin` runs as this process's user and in its pid namespace: the same-host
/// transports need both (another user's process could hold the one ptrace grant, or never be cut off; a pid of
/// another namespace names another process to the prefill).
fn same_user_and_pid_namespace(origin: Origin, pid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    let user = unsafe { libc::geteuid() };
    let namespace = |of: &str| std::fs::read_link(format!("/proc/{of}/ns/pid")).ok();
    matches!(origin, Origin::Process { uid, .. } if uid == user)
        && namespace(&pid.to_string()).is_some_and(|theirs| Some(theirs) == namespace("self"))
}

impl Events for Links {
    fn opened(&self, _: u64, peer: &PeerInfo) -> Vec<RequestId> {
        self.log.debug(format!("request channel open from {}", peer.name));
        self.requests.revoked()
    }

    fn frame(&self, channel: u64, peer: &PeerInfo, frame: Frame) -> Result<()> {
        if let Frame::Done { layer, blocks, .. } = &frame {
            let acceptor = self.acceptors.iter().find(|a| a.kind() == peer.transport);
            if !blocks.is_empty() && !acceptor.is_some_and(|a| a.delivered(peer.session, *layer, blocks)) {
                return Err(Error::protocol(format!(
                    "a notification of {} blocks of layer {layer} that its link did not deliver",
                    blocks.len()
                )));
            }
        }
        self.requests.on_frame(channel, peer, frame)
    }

    fn closed(&self, channel: u64, peer: &PeerInfo, why: &str, goodbye: bool) {
        if !self.cut_off(peer, Duration::ZERO) && !goodbye {
            // One that may still write from now on (a revoke meanwhile waits for it), until its process is seen
            // to end: a killed one closes its sockets a moment before it has ended.
            let same = |p: &PeerInfo| p.session == peer.session && p.transport == peer.transport;
            {
                let mut uncut = lock(&self.uncut);
                if !uncut.iter().any(same) {
                    uncut.push(peer.clone());
                }
            }
            if peer.process.as_ref().is_some_and(|p| p.ends_by(Instant::now() + ENDING)) {
                lock(&self.uncut).retain(|p| !same(p));
            } else {
                self.log.error(format!(
                    "the request channel of {} ({}) ended ({why}) while its process lives: a same-host link cannot be \
                     cut off, so revoke and close report it until that process ends",
                    peer.name, peer.transport
                ));
            }
        }
        self.log.debug(format!("request channel from {} ended: {why}", peer.name));
        self.requests.on_link_end(channel, peer, why);
    }

    fn tick(&self) -> Vec<(RequestId, Vec<u64>)> {
        self.requests.expire()
    }
}

impl DecodeSide {
    /// Starts answering handshakes on `port` (0: any free port) for the transports of `acceptors`.
    pub(super) fn listen(port: u16, env: &Environment<'_>, acceptors: Vec<Arc<dyn Acceptor>>, metrics: Arc<Instruments>) -> Result<DecodeSide> {
        let log = env.log;
        if env.config.socket_ifname.is_none() && log.debug_enabled() {
            let ips: Vec<String> = env.listen_ips.iter().map(|ip| ip.to_string()).collect();
            log.debug(format!("KVCACHE_SOCKET_IFNAME unset: listening on {} (the first usable interface, and loopback)", ips.join(" and ")));
        }
        let auth = env.config.auth_token.as_ref().map(|t| AuthKey::new(t.expose()));
        if let Some(ip) = env.listen_ips.iter().find(|ip| !ip.is_loopback()).filter(|_| auth.is_none()) {
            log.warn(format!(
                "listening on {ip} without KVCACHE_AUTH_TOKEN: any host that reaches this port can write into this cache"
            ));
        }
        let cache = env.cache;
        let requests =
            Arc::new(Requests::new(cache.layers(), cache.block_number(), cache.layer_block_bytes(), env.config.request_ttl, log.clone(), metrics.clone()));
        for acceptor in &acceptors {
            let r = requests.clone();
            acceptor.watch(Arc::new(move |session, mark| r.on_mark(session, mark)));
        }
        let links = Arc::new(Links { acceptors: acceptors.clone(), requests: requests.clone(), log: log.clone(), uncut: Mutex::default() });
        let channels =
            Arc::new(ChannelServer::start(env.listen_ips, env.cache.block_number(), env.config.timeouts.stall, env.config.max_peers, log.clone(), links.clone())?);
        let admitting = Arc::new(Admitting {
            cache: env.cache.clone(),
            links: links.clone(),
            acceptors: acceptors.clone(),
            channels: channels.clone(),
            log: log.clone(),
            metrics: metrics.clone(),
        });
        let identity = handshake::Identity { key: auth, answers_to: env.config.answers_to.clone() };
        let control = handshake::answer_on(env.listen_ips, port, env.config.timeouts.connect, log.clone(), identity, admitting)?;
        Ok(DecodeSide {
            port: control.port(),
            transports: acceptors.iter().map(|a| a.kind()).collect(),
            device: acceptors.iter().find_map(|a| a.device().map(str::to_string)),
            requests,
            log: log.clone(),
            metrics,
            channels: channels.clone(),
            timeout: env.config.timeouts.confirm,
            listening: Mutex::new(Some(Listening { control, channels, links })),
        })
    }

    pub(super) fn requests(&self) -> &Requests {
        &self.requests
    }

    /// Revokes `request`: returns once no write of it can land any more. Every link confirms that it has
    /// stopped and drained the request's writes, or is cut off; a link that neither confirms nor can be cut
    /// off (a same-host transport) is a `TIMEOUT` error.
    pub(super) fn revoke(&self, request: &RequestId) -> Result<()> {
        // Remembered first: a link that opens from now on learns it before it may write.
        self.requests.revoke(request);
        self.metrics.revokes.add(1);
        let Some((channels, links)) = self.listening.lock().unwrap().as_ref().map(|l| (l.channels.clone(), l.links.clone())) else {
            return Ok(());
        };
        let until = Instant::now() + self.timeout;
        let (cut, uncut): (Vec<PeerInfo>, Vec<PeerInfo>) =
            channels.ask_all(&Ask::Revoke(request.clone()), self.timeout).into_iter().partition(|peer| links.cut_off(peer, ENDING));
        self.metrics.revoke_cutoffs.add(cut.len() as u64);
        let uncut: Vec<String> = uncut
            .into_iter()
            .chain(links.uncut(until))
            .map(|peer| format!("{} ({})", peer.name, peer.transport))
            .collect();
        if uncut.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::Timeout,
            format!(
                "revoking {request:?}: {} did not confirm within {} ms, and a same-host transport cannot be cut off; \
                 do not reuse its blocks until that process confirms or ends",
                uncut.join(", "),
                self.timeout.as_millis()
            ),
        ))
    }

    /// What `stats()` reads from the request table and the request channels' server.
    pub(super) fn levels(&self) -> Levels {
        Levels {
            requests_held: self.requests.held() as u64,
            notifications_dropped: self.requests.dropped(),
            refused_at_limit: self.channels.refused_at_limit(),
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    /// The prefill links whose request channel is open: name and transport.
    pub(super) fn peers(&self) -> Vec<(String, TransportKind)> {
        let Some(channels) = self.listening.lock().unwrap().as_ref().map(|l| l.channels.clone()) else { return Vec::new() };
        channels.peers().into_iter().map(|p| (p.name, p.transport)).collect()
    }

    pub(super) fn transports(&self) -> Vec<TransportKind> {
        self.transports.clone()
    }

    pub(super) fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Stops the control server, asks every link to stop writing and confirm (cutting off those that do not),
    /// then stops the data paths: nothing lands after this returns, except from the same-host links it returns
    /// (which neither confirmed nor can be cut off while their process lives).
    pub(super) fn close(&self) -> Vec<String> {
        let Some(listening) = self.listening.lock().unwrap().take() else { return Vec::new() };
        drop(listening.control);
        listening.channels.stop_admitting();
        let until = Instant::now() + self.timeout;
        let silent = listening.channels.ask_all(&Ask::Close, self.timeout);
        let mut uncut = Vec::new();
        for peer in silent.into_iter().filter(|p| !listening.links.cut_off(p, ENDING)).chain(listening.links.uncut(until)) {
            self.log.error(format!(
                "closing: {} ({}) did not confirm that it stopped writing, and a same-host link cannot be cut off \
                 while its process lives",
                peer.name, peer.transport
            ));
            uncut.push(format!("{} ({})", peer.name, peer.transport));
        }
        self.requests.close();
        // Each channel's end cuts its link off; then the accepting halves stop every data path. Explicitly,
        // not by the last reference going: a revoke in flight may hold one.
        listening.channels.shutdown();
        for acceptor in &listening.links.acceptors {
            acceptor.close();
        }
        uncut
    }
}

/// Whom the decode admits, and over which transport: the rest of the handshake is [`handshake`]'s.
struct Admitting {
    cache: Arc<CacheLayout>,
    links: Arc<Links>,
    acceptors: Vec<Arc<dyn Acceptor>>,
    channels: Arc<ChannelServer>,
    log: Arc<Logger>,
    metrics: Arc<Instruments>,
}

impl Admit for Admitting {
    fn refused(&self, _origin: Origin, why: &Error) {
        self.metrics.refused(Refusal::of(why.code()));
    }

    fn welcome(&self, origin: Origin, hello: &wire::Hello, proofs: &Proofs<'_>) -> Result<Welcome> {
        let agreed = negotiation::check_hello(hello, &self.cache)?;
        // Same-host transports write into this process, or map its memory: only for a process of this host that
        // the kernel names (a hello's own `host` and `pid` are only its word). Its pid is also what tells when
        // such a link can no longer write.
        let process = origin.process().filter(|&pid| same_user_and_pid_namespace(origin, pid));
        let same_host = process.is_some();
        self.links.forget(process, &hello.dropped);
        let offers: Vec<TransportKind> = hello.offers.iter().map(|o| o.transport).collect();
        let ours: Vec<TransportKind> = self.acceptors.iter().map(|a| a.kind()).collect();
        let peer = format!("prefill tp {}/{}", hello.tp_idx, hello.tp_size);
        // The first transport that takes this peer; one may be unavailable to it alone (shm's one ptrace grant).
        let mut refusal = None;
        let mut taken = None;
        for kind in negotiation::choose(&offers, &ours, same_host)? {
            let acceptor = self.acceptors.iter().find(|a| a.kind() == kind).expect("chosen among ours");
            let offer = hello.offers.iter().find(|o| o.transport == kind).expect("chosen among the offers");
            let admission = Admission {
                peer: &peer,
                geometry: agreed.geometry,
                tensors: agreed.tensors,
                details: &offer.details,
                pid: process,
                proof: &|token| proofs.data(token),
            };
            match acceptor.accept(&admission) {
                Ok(accepted) => {
                    taken = Some((kind, accepted));
                    break;
                }
                Err(e) if e.code() == ErrorCode::Unavailable => {
                    // Within the log's allowance of its host (it may be slower than the transport it would have had).
                    self.log.warn_from(&listener::host_of(origin.ip()).to_string(), format!("{kind} is unavailable to {peer}, which takes the next transport both sides have: {e}"));
                    refusal = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((kind, accepted)) = taken else { return Err(refusal.expect("at least one transport was tried")) };
        self.log.debug(format!(
            "accepted {peer} over {kind} with {} blocks (slice {} of {} per block)",
            hello.block_number, agreed.geometry.slot, agreed.geometry.ratio
        ));
        // Counted by the prefill's host (an address, an IPv6 /64, or loopback for a process of this host), as its
        // log lines name it.
        let metrics = self.metrics.peer(&listener::host_of(origin.ip()).to_string());
        metrics.connects.add(1);
        metrics.connected_over(kind);
        let channel_token = self.channels.admit(PeerInfo {
            name: peer,
            slot: agreed.geometry.slot,
            ratio: agreed.geometry.ratio,
            transport: kind,
            session: accepted.session,
            process: process.filter(|_| kind.same_host_only()).map(|pid| Arc::new(PeerProcess::watch(pid))),
            instance: hello.instance.clone(),
            address: None,
            metrics,
        }, |token| proofs.channel(token));
        Ok(Welcome {
            protocol: PROTOCOL_VERSION,
            block_number: self.cache.block_number(),
            transport: kind,
            session: accepted.session,
            details: accepted.details,
            channel_port: self.channels.port(),
            channel_token,
        })
    }
}
