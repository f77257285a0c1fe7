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
const ENDING: Duration = Duration::from_secs(1);

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
    /// Let go at close: an RDMA one holds the cache's registered regions, which then go with it (not when the
    /// binding's object is collected; the request channels' server, kept for its counts, holds these links).
    acceptors: Mutex<Vec<Arc<dyn Acceptor>>>,
    requests: Arc<Requests>,
    log: Arc<Logger>,
    /// Same-host links whose channel ended without a goodbye while their process lives (or is still ending),
    /// each with when its channel ended: they might still write, and nothing here can stop them.
    uncut: Mutex<Vec<(PeerInfo, Instant)>>,
}

/// Whether `a` and `b` are one link.
fn same_link(a: &PeerInfo, b: &PeerInfo) -> bool {
    a.session == b.session && a.transport == b.transport
}

impl Links {
    /// The accepting half of `kind`, while open.
    fn acceptor(&self, kind: TransportKind) -> Option<Arc<dyn Acceptor>> {
        lock(&self.acceptors).iter().find(|a| a.kind() == kind).cloned()
    }

    /// Stops the data path of `peer`. `false` where its transport cannot (a same-host one) and its process
    /// still lives at `until`.
    fn cut_off(&self, peer: &PeerInfo, until: Instant) -> bool {
        // Once closed, the accepting halves have stopped every data path they could (not a same-host one).
        let stopped = self.acceptor(peer.transport).map_or(!peer.transport.same_host_only(), |a| a.cut_off(peer.session));
        stopped || peer.process.as_ref().is_some_and(|p| p.ends_by(until))
    }

    /// Forgets the uncut links of process `pid` among `sessions`: that process says it dropped them.
    fn forget(&self, pid: Option<u32>, sessions: &[u64]) {
        if pid.is_some() && !sessions.is_empty() {
            lock(&self.uncut).retain(|(p, _)| !(p.process.as_ref().map(|p| p.pid()) == pid && sessions.contains(&p.session)));
        }
    }

    /// Counts `peer` among the links that may still write (if it is not already).
    fn keep_uncut(&self, peer: &PeerInfo) {
        let mut uncut = lock(&self.uncut);
        if !uncut.iter().any(|(p, _)| same_link(p, peer)) {
            uncut.push((peer.clone(), Instant::now()));
        }
    }

    /// The same-host links that may still write, forgetting those whose process has ended. One whose channel
    /// ended less than [`ENDING`] ago is given the rest of that time to end (without holding the list): a killed
    /// process closes its sockets a moment before it has ended.
    fn uncut(&self) -> Vec<PeerInfo> {
        let waiting = lock(&self.uncut).clone();
        let ended: Vec<PeerInfo> = waiting
            .into_iter()
            .filter(|(p, since)| p.process.as_ref().is_some_and(|proc| proc.ends_by(*since + ENDING)))
            .map(|(p, _)| p)
            .collect();
        let mut uncut = lock(&self.uncut);
        uncut.retain(|(p, _)| !ended.iter().any(|e| same_link(e, p)));
        uncut.iter().map(|(p, _)| p.clone()).collect()
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
            let acceptor = self.acceptor(peer.transport);
            if !blocks.is_empty() && !acceptor.is_some_and(|a| a.delivered(peer.session, *layer, blocks)) {
                return Err(Error::protocol(format!(
                    "a notification of {} blocks of layer {layer} that its link did not deliver",
                    blocks.len()
                )));
            }
        }
        self.requests.on_frame(channel, peer, frame)
    }

    fn ending(&self, peer: &PeerInfo, goodbye: bool) {
        // Before its channel leaves the open ones: a revoke finds a same-host link among those it asks, or among
        // those that may still write.
        if !goodbye && peer.process.is_some() {
            self.keep_uncut(peer);
        }
    }

    fn closed(&self, channel: u64, peer: &PeerInfo, why: &str, goodbye: bool) {
        let ended = self.cut_off(peer, Instant::now()) || goodbye || peer.process.as_ref().is_some_and(|p| p.ends_by(Instant::now() + ENDING));
        if ended {
            lock(&self.uncut).retain(|(p, _)| !same_link(p, peer));
        } else {
            self.keep_uncut(peer);
            self.log.error(format!(
                "the request channel of {} ({}) ended ({why}) while its process lives: a same-host link cannot be \
                 cut off, so revoke and close report it until that process ends",
                peer.name, peer.transport
            ));
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
        let links = Arc::new(Links { acceptors: Mutex::new(acceptors.clone()), requests: requests.clone(), log: log.clone(), uncut: Mutex::default() });
        let channels =
            Arc::new(ChannelServer::start(env.listen_ips, env.cache.block_number(), env.config.timeouts.stall, env.config.max_peers, log.clone(), links.clone())?);
        let admitting = Arc::new(Admitting {
            cache: env.cache.clone(),
            links: links.clone(),
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
        let asked = channels.ask_all(&Ask::Revoke(request.clone()), self.timeout);
        let until = Instant::now() + ENDING;
        let (cut, uncut): (Vec<PeerInfo>, Vec<PeerInfo>) = asked.into_iter().partition(|peer| links.cut_off(peer, until));
        self.metrics.revoke_cutoffs.add(cut.len() as u64);
        let uncut: Vec<String> = uncut
            .into_iter()
            .chain(links.uncut())
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
        let silent = listening.channels.ask_all(&Ask::Close, self.timeout);
        let until = Instant::now() + ENDING;
        let mut uncut = Vec::new();
        for peer in silent.into_iter().filter(|p| !listening.links.cut_off(p, until)).chain(listening.links.uncut()) {
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
        let acceptors = std::mem::take(&mut *lock(&listening.links.acceptors));
        for acceptor in &acceptors {
            acceptor.close();
        }
        uncut
    }
}

/// Whom the decode admits, and over which transport: the rest of the handshake is [`handshake`]'s.
struct Admitting {
    cache: Arc<CacheLayout>,
    links: Arc<Links>,
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
        let acceptors = lock(&self.links.acceptors).clone();
        let ours: Vec<TransportKind> = acceptors.iter().map(|a| a.kind()).collect();
        let peer = format!("prefill tp {}/{}", hello.tp_idx, hello.tp_size);
        // The first transport that takes this peer; one may be unavailable to it alone (shm's one ptrace grant).
        let mut refusal = None;
        let mut taken = None;
        for kind in negotiation::choose(&offers, &ours, same_host)? {
            let acceptor = acceptors.iter().find(|a| a.kind() == kind).expect("chosen among ours");
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
