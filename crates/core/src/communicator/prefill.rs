//! The prefill side: its decode peers, each with a link over the transport the handshake chose and the
//! link's request channel, rebuilt with a new handshake after a failure.
//!
//! A write with a request id tells the decode, on the channel, that the request started (before its first
//! bytes) and that the write is in the decode's memory (once the link's write has returned) or failed. The
//! decode's directives (revoke a request, stop because it closes) are obeyed on the channel's thread: it marks
//! the request (or the peer) in the peer's [`Gate`], waits for the write in flight, if any, and confirms; every
//! write checks the gate once it holds the peer, so none of a revoked request starts after the confirmation.
//!
//! A call that needs a connection it does not have (`connect`, or any call after the connection ended) makes
//! it by the communicator's [`Reconnect`] policy; each connection that comes up, ends or is being rebuilt is
//! told as a [`PeerEvent`].

use crate::sync::lock;
use super::peer_events::{Endings, Events, PeerEvent, PeerEventSink};
use super::workers::Workers;
use super::Communicator;
use crate::auth::AuthKey;
use crate::channel::{ChannelClient, Directive, Frame, RequestId};
use crate::config::Reconnect;
use crate::control::handshake::{self, Admitted};
use crate::error::{Error, ErrorCode, Result};
use crate::metrics::{Instruments, PeerInstruments, Raised};
use crate::net;
use crate::plan::{BlockPlan, SliceGeometry};
use crate::transport::{Answer, Connector, Link, PendingLink};
use crate::wire::{Hello, Offer, Role, TransportKind, PROTOCOL_VERSION};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Request ids a peer remembers as revoked, aborted or started; the oldest are forgotten past this.
const REMEMBERED: usize = 65536;

type Peers = Mutex<HashMap<String, Arc<PeerEntry>>>;

pub(super) struct PrefillSide {
    /// One connecting half per transport set up, preferred first; let go at close (an RDMA one holds the cache's
    /// registered regions).
    connectors: Mutex<Vec<Arc<dyn Connector>>>,
    /// Their transports, and the RDMA device, kept past close.
    kinds: Vec<TransportKind>,
    device: Option<String>,
    tp_size: u32,
    tp_idx: u32,
    peers: Peers,
    workers: Workers,
    events: Arc<Events>,
    metrics: Arc<Instruments>,
}

/// A decode peer and what can be asked of it without waiting for a transfer.
struct PeerEntry {
    state: Mutex<Peer>,
    /// The transport of its working link (a [`TransportKind::ALL`] index + 1), or 0 when it broke.
    link: AtomicU8,
    gate: Arc<Gate>,
    /// What is counted about it (kept by the communicator's instruments across its connections).
    metrics: Arc<PeerInstruments>,
}

/// What the decode has told a peer's writes, kept across rebuilds of its link.
#[derive(Default)]
struct Gate {
    revoked: Mutex<RecentIds>,
    aborted: Mutex<RecentIds>,
    /// The connection the decode asked to stop (it is closing), by number: it is not written again. A
    /// connection's own number, so that a late `Close` on an old connection never stops its successor.
    closing: AtomicU64,
    /// Numbers the connections made through this gate (from 1).
    connections: AtomicU64,
    /// The decode's sessions of this peer's connections, newest last (at most 16): all but the working one are
    /// dropped, which the next hello says.
    sessions: Mutex<VecDeque<u64>>,
    /// Held for the whole of each write: a directive waits for the write in flight before it is confirmed.
    writing: Mutex<()>,
    /// Its connections' ends, told once each.
    endings: Endings,
}

impl Gate {
    fn obey(&self, directive: &Directive, connection: u64) {
        match directive {
            Directive::Revoke(request) => lock(&self.revoked).insert(request.clone()),
            Directive::Close => self.closing.store(connection, Ordering::Release),
        }
        drop(lock(&self.writing));
    }

    /// Whether a write of `request` may start.
    fn check(&self, request: &RequestId) -> Result<()> {
        if lock(&self.revoked).contains(request) {
            return Err(Error::new(ErrorCode::Revoked, format!("the decode revoked request {request:?}: nothing was written")));
        }
        if lock(&self.aborted).contains(request) {
            return Err(Error::new(ErrorCode::Aborted, format!("request {request:?} was aborted: nothing was written")));
        }
        Ok(())
    }
}

/// A bounded set of request ids: past [`REMEMBERED`], the oldest is forgotten.
#[derive(Default)]
struct RecentIds {
    set: HashSet<RequestId>,
    order: VecDeque<RequestId>,
}

impl RecentIds {
    fn insert(&mut self, id: RequestId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED {
                let old = self.order.pop_front().expect("not empty");
                self.set.remove(&old);
            }
        }
    }
    fn contains(&self, id: &RequestId) -> bool {
        self.set.contains(id)
    }
}


impl PeerEntry {
    fn new(peer: Peer, gate: Arc<Gate>, metrics: Arc<PeerInstruments>) -> PeerEntry {
        let entry = PeerEntry { link: AtomicU8::new(0), state: Mutex::new(peer), gate, metrics };
        entry.update(&entry.state.lock().unwrap());
        entry
    }

    /// Records the state of `peer` (this entry's, locked by the caller).
    fn update(&self, peer: &Peer) {
        let code = peer.link.as_ref().map_or(0, |c| TransportKind::ALL.iter().position(|&k| k == c.link.transport()).unwrap() as u8 + 1);
        self.link.store(code, Ordering::Release);
    }

    /// The peer's state. A call that panicked while holding it left its link in an unknown state: the link is
    /// dropped (the next call rebuilds it) rather than the peer being unusable for good.
    fn lock(&self) -> std::sync::MutexGuard<'_, Peer> {
        self.state.lock().unwrap_or_else(|poisoned| {
            let mut peer = poisoned.into_inner();
            peer.link = None;
            self.update(&peer);
            peer
        })
    }

    fn transport(&self) -> Option<TransportKind> {
        match self.link.load(Ordering::Acquire) {
            0 => None,
            code => Some(TransportKind::ALL[code as usize - 1]),
        }
    }
}

/// A decode peer, as the prefill side sees it.
struct Peer {
    /// `None` after a failure broke it: the next call rebuilds it with a new handshake.
    link: Option<Connection>,
    plan: BlockPlan,
    remote_blocks: u32,
    dst_tp_size: u32,
}

/// A working connection: the link that moves the bytes and its request channel, which live and end together.
struct Connection {
    link: Box<dyn Link>,
    channel: ChannelClient,
    /// Requests this connection has told the decode it started.
    started: RecentIds,
    /// The mark of the last write of a request ([`Link::write_marked`]).
    mark: u32,
    /// Its number ([`Gate::closing`]).
    number: u64,
    /// Whether it writes one slice of each decode block of several without an instance id: the other slices'
    /// ranks could not write its requests (see `write_telling`).
    slices_without_instance: bool,
}

impl PrefillSide {
    pub(super) fn new(connectors: Vec<Arc<dyn Connector>>, tp_size: u32, tp_idx: u32, metrics: Arc<Instruments>) -> PrefillSide {
        let kinds = connectors.iter().map(|c| c.kind()).collect();
        let device = connectors.iter().find_map(|c| c.device().map(str::to_string));
        PrefillSide {
            connectors: Mutex::new(connectors),
            kinds,
            device,
            tp_size,
            tp_idx,
            peers: Mutex::new(HashMap::new()),
            workers: Workers::new(),
            events: Arc::default(),
            metrics,
        }
    }

    /// The instruments of the peer `ip:port` (for calls that count it before they reach it).
    pub(super) fn metrics_of(&self, ip: &str, port: u16) -> Arc<PeerInstruments> {
        self.metrics.peer(&peer_key(ip, port))
    }

    /// The instruments of the peer `ip:port` where it is connected, found through its entry.
    pub(super) fn known_metrics(&self, ip: &str, port: u16) -> Option<Arc<PeerInstruments>> {
        self.peers.lock().unwrap().get(&peer_key(ip, port)).map(|p| p.metrics.clone())
    }

    /// Where this side's peer events go from now on (`None`: nowhere).
    pub(super) fn on_peer_events(&self, sink: Option<PeerEventSink>) {
        self.events.set(sink);
    }

    pub(super) fn transports(&self) -> Vec<TransportKind> {
        self.kinds.clone()
    }

    pub(super) fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    pub(super) fn tp_description(&self) -> String {
        format!("{}/{}", self.tp_idx, self.tp_size)
    }

    pub(super) fn connect(&self, comm: &Communicator, ip: &str, port: u16, dst_tp_size: u32) -> Result<()> {
        let key = peer_key(ip, port);
        let existing = self.peers.lock().unwrap().get(&key).cloned();
        if let Some(peer) = existing {
            // Connected, or broken and due for a rebuild.
            let mut state = peer.lock();
            if let Some(c) = state.link.as_ref().filter(|c| c.channel.is_broken()) {
                peer.gate.endings.ended(&self.events, &key, c.number, Error::new(ErrorCode::Transport, format!("the connection to {key} ended")));
                state.link = None;
            }
            if state.link.is_none() {
                let rebuilt = self.rebuild(comm, ip, port, &mut state, &peer.gate, &peer.metrics);
                peer.update(&state);
                if let Err(e) = rebuilt {
                    self.forget(&key, &peer);
                    return Err(e);
                }
            }
            return Ok(());
        }
        SliceGeometry::for_ranks(self.tp_size, self.tp_idx, dst_tp_size)?;
        let gate = Arc::new(Gate::default());
        // Held from the first attempt on: what the connection counts stays the peer's.
        let metrics = self.metrics.peer(&key);
        let peer = self.establish(comm, ip, port, dst_tp_size, &gate, &metrics, false)?;
        let (number, transport) = peer.link.as_ref().map(|c| (c.number, c.link.transport())).expect("established");
        // Checked under the map's lock, which `close` takes to clear it: no peer is added after a close.
        let mut peers = self.peers.lock().unwrap();
        let added = comm.check_open().is_ok() && !peers.contains_key(&key);
        if added {
            peers.insert(key.clone(), Arc::new(PeerEntry::new(peer, gate, metrics)));
            drop(peers);
            self.events.tell(PeerEvent::Connected { peer: key, transport, reconnected: false });
            return Ok(());
        }
        // A concurrent connect won, or the communicator closed: this connection goes, untold.
        drop(peers);
        gate.endings.ended_here(number);
        drop(peer);
        comm.check_open()
    }

    /// Runs the handshake with the decode at `ip:port` and opens the link it chose. When a same-host transport
    /// was chosen but cannot be opened (another container, memory the driver cannot share), the handshake runs
    /// again without it.
    fn handshake(&self, comm: &Communicator, ip: &str, port: u16, dst_tp_size: u32, rebuilt: bool, gate: &Arc<Gate>) -> Result<Peer> {
        // Same-host transports write into another process (or map its GPU memory) at addresses the decode names:
        // they are offered only to a decode reached at an address of this host, never to one elsewhere that
        // could pass on the details of a process here.
        let local = net::is_this_host(ip);
        let connectors = lock(&self.connectors).clone();
        // A closed side has let go of its connecting halves (after it says it is closed): `CLOSED`, not "no
        // transport for this address".
        comm.check_open()?;
        let mut offers: Vec<&Arc<dyn Connector>> = connectors.iter().filter(|c| local || !c.kind().same_host_only()).collect();
        if offers.is_empty() {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!("{ip} is not an address of this host, and this communicator has only same-host transports"),
            ));
        }
        loop {
            match self.handshake_offering(comm, ip, port, dst_tp_size, rebuilt, gate, &offers) {
                Err((e, Some(failed))) if offers.len() > 1 && failed.same_host_only() => {
                    comm.log.debug(format!("{failed} to {ip}:{port} cannot be opened ({e}); offering the others"));
                    offers.retain(|c| c.kind() != failed);
                }
                other => return other.map_err(|(e, _)| e),
            }
        }
    }

    /// One handshake offering the transports of `connectors`. A failure to open the chosen link names its
    /// transport.
    #[allow(clippy::too_many_arguments)]
    fn handshake_offering(
        &self,
        comm: &Communicator,
        ip: &str,
        port: u16,
        dst_tp_size: u32,
        rebuilt: bool,
        gate: &Arc<Gate>,
        connectors: &[&Arc<dyn Connector>],
    ) -> std::result::Result<Peer, (Error, Option<TransportKind>)> {
        let plain = |e| (e, None);
        // One deadline for the whole attempt: the handshake, the data connection, the request channel.
        let deadline = Instant::now() + comm.config.timeouts.connect;
        let key = peer_key(ip, port);
        // First the greeting: with a token, nothing is prepared or sent before the decode has proven it holds it.
        let auth = comm.config.auth_token.as_ref().map(|t| AuthKey::new(t.expose()));
        let greeted = handshake::greet(ip, port, comm.config.timeouts.connect, auth).map_err(plain)?;
        // Same-host transports only where the decode knows this process from the kernel.
        let connectors: Vec<_> = connectors.iter().filter(|c| greeted.is_local() || !c.kind().same_host_only()).collect();
        if connectors.is_empty() {
            return Err(plain(Error::new(
                ErrorCode::Unavailable,
                format!(
                    "{key} was reached over TCP (no Unix socket of this host answers for it: another network namespace, \
                     or not a decode of this version), and this communicator has only same-host transports"
                ),
            )));
        }
        let mut pending: Vec<(TransportKind, Box<dyn PendingLink>)> = Vec::with_capacity(connectors.len());
        for c in connectors {
            pending.push((c.kind(), c.prepare().map_err(plain)?));
        }
        let cache = &*comm.cache;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Prefill,
            layers: cache.layers(),
            tensors: cache.tensors().bits(),
            block_bytes: cache.kv_block_bytes(),
            scale_block_bytes: cache.scale_block_bytes(),
            block_number: cache.block_number(),
            tp_size: self.tp_size,
            tp_idx: self.tp_idx,
            dst_tp_size,
            offers: pending.iter().map(|(kind, p)| Offer { transport: *kind, details: p.offer() }).collect(),
            host: net::host_id(),
            pid: Some(std::process::id()),
            // Every earlier connection of this peer is gone by now (a handshake runs with none working).
            dropped: lock(&gate.sessions).iter().copied().collect(),
            instance: comm.config.instance_id.clone(),
            dialed: None,
        };
        let Admitted { welcome, channel_proof, data_proof } = greeted.hello(&hello).map_err(plain)?;
        let answer = Answer {
            peer: &key,
            host: ip,
            session: welcome.session,
            details: &welcome.details,
            geometry: SliceGeometry::for_ranks(self.tp_size, self.tp_idx, dst_tp_size).map_err(plain)?,
            remote_blocks: welcome.block_number,
            proof: data_proof,
            deadline,
        };
        comm.check_open().map_err(plain)?;
        let answer_ratio = answer.geometry.ratio;
        let chosen = pending.into_iter().find(|(kind, _)| *kind == welcome.transport).expect("checked: it was offered");
        let link = chosen.1.finish(&answer).map_err(|e| (e, Some(welcome.transport)))?;
        let number = gate.connections.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut sessions = lock(&gate.sessions);
            sessions.push_back(welcome.session);
            if sessions.len() > 16 {
                sessions.pop_front();
            }
        }
        let g = gate.clone();
        let obey = Arc::new(move |d: &Directive| g.obey(d, number));
        let (g, events, peer) = (gate.clone(), self.events.clone(), key.clone());
        let ended = Box::new(move |cause: Error| {
            let cause = Error::new(cause.code(), format!("the connection to {peer} ended: {}", cause.message()));
            g.endings.ended(&events, &peer, number, cause)
        });
        let (channel, revoked) =
            ChannelClient::connect(ip, welcome.channel_port, welcome.channel_token, channel_proof, deadline, comm.config.timeouts.stall, obey, ended)
                .map_err(plain)?;
        for request in revoked {
            lock(&gate.revoked).insert(request);
        }
        comm.log.debug(format!(
            "connected to {key} over {}: its cache has {} blocks{}",
            welcome.transport,
            welcome.block_number,
            if rebuilt { " (rebuilt after a failure)" } else { "" }
        ));
        Ok(Peer {
            plan: BlockPlan::new(link.plan_form()),
            link: Some(Connection {
                link,
                channel,
                started: RecentIds::default(),
                mark: 0,
                number,
                slices_without_instance: answer_ratio > 1 && comm.config.instance_id.is_none(),
            }),
            remote_blocks: welcome.block_number,
            dst_tp_size,
        })
    }

    /// Replaces a connection that ended with a new one to the same peer, by the reconnect policy.
    fn rebuild(&self, comm: &Communicator, ip: &str, port: u16, peer: &mut Peer, gate: &Arc<Gate>, metrics: &PeerInstruments) -> Result<()> {
        *peer = self.establish(comm, ip, port, peer.dst_tp_size, gate, metrics, true)?;
        Ok(())
    }

    /// Makes a connection to `ip:port` by the communicator's [`Reconnect`] policy: attempts, with pauses between
    /// them, while the failure is one another attempt can mend. A rebuild (`rebuilding`) tells each attempt.
    #[allow(clippy::too_many_arguments)]
    fn establish(
        &self,
        comm: &Communicator,
        ip: &str,
        port: u16,
        dst_tp_size: u32,
        gate: &Arc<Gate>,
        metrics: &PeerInstruments,
        rebuilding: bool,
    ) -> Result<Peer> {
        let key = peer_key(ip, port);
        let policy = comm.config.reconnect;
        let attempts = policy.retries.saturating_add(1);
        let ended = gate.endings.take_cause();
        let mut cause = ended.clone().unwrap_or_else(|| Error::new(ErrorCode::NotConnected, format!("the connection to {key} ended")));
        for attempt in 1..=attempts {
            pause(comm, &policy, attempt)?;
            if rebuilding {
                self.events.tell(PeerEvent::Reconnecting { peer: key.clone(), attempt, attempts, cause: cause.clone() });
            }
            let started = Instant::now();
            match self.handshake(comm, ip, port, dst_tp_size, rebuilding, gate) {
                Ok(peer) => {
                    if let Some(c) = peer.link.as_ref() {
                        metrics.connected_over(c.link.transport());
                    }
                    metrics.handshake_time.record(started.elapsed());
                    metrics.connects.add(1);
                    if rebuilding {
                        metrics.reconnects.add(1);
                    }
                    // A new peer is told once it is in the table (see `connect`).
                    if let Some(c) = peer.link.as_ref().filter(|_| rebuilding) {
                        self.events.tell(PeerEvent::Connected { peer: key.clone(), transport: c.link.transport(), reconnected: true });
                    }
                    return Ok(peer);
                }
                Err(e) if attempt < attempts && matches!(e.code(), ErrorCode::Unreachable | ErrorCode::Timeout | ErrorCode::Transport) => {
                    comm.log.debug(format!("attempt {attempt} of {attempts} to connect to {key} failed: {e}"));
                    cause = e;
                }
                Err(e) => {
                    let tries = if attempt > 1 { format!(" in {attempt} attempts") } else { String::new() };
                    let why = match (&ended, rebuilding) {
                        (Some(end), true) => format!("the connection ended ({}) and could not be rebuilt{tries}: {}", end.message(), e.message()),
                        (None, true) => format!("the connection ended and could not be rebuilt{tries}: {}", e.message()),
                        (_, false) if attempt > 1 => format!("{} (after {attempt} attempts)", e.message()),
                        _ => return Err(e),
                    };
                    return Err(Error::new(e.code(), why));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Never waits for a transfer: the map's lock is only held to look a peer up.
    pub(super) fn connected_transport(&self, ip: &str, port: u16) -> Option<TransportKind> {
        self.peers.lock().unwrap().get(&peer_key(ip, port))?.transport()
    }

    /// Writes, and counts the call on the peer's instruments: its time, and its blocks and bytes or its failure.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write(
        &self,
        comm: &Communicator,
        ip: &str,
        port: u16,
        local: &[u32],
        remote: &[u32],
        layer: u32,
        request: Option<&RequestId>,
    ) -> Result<()> {
        let started = Instant::now();
        let key = peer_key(ip, port);
        let peer = match self.peer(&key) {
            Ok(peer) => peer,
            Err(e) => {
                self.metrics.peer(&key).failed(e.code());
                return Err(e);
            }
        };
        let under_way = Raised::new(peer.metrics.clone(), |m| &m.in_flight);
        let result = self.write_to(comm, ip, port, &key, &peer, local, remote, layer, request);
        drop(under_way);
        let metrics = &peer.metrics;
        match &result {
            Ok(()) => {
                let (blocks, bytes) = (local.len() as u64, local.len() as u64 * comm.cache.layer_block_bytes());
                // The connection that took it is still there: a write that succeeded leaves it in place.
                self.metrics.wrote(metrics, peer.transport(), blocks, bytes);
            }
            Err(e) => metrics.failed(e.code()),
        }
        metrics.write_time.record(started.elapsed());
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn write_to(
        &self,
        comm: &Communicator,
        ip: &str,
        port: u16,
        key: &str,
        peer: &Arc<PeerEntry>,
        local: &[u32],
        remote: &[u32],
        layer: u32,
        request: Option<&RequestId>,
    ) -> Result<()> {
        let mut guard = peer.lock();
        // Under the peer's lock, which `close` takes once it has marked the communicator closed.
        comm.check_open()?;
        let state = &mut *guard;
        let cache = &*comm.cache;
        let plan = |p: &mut Peer| p.plan.build(local, remote, layer, cache.layers(), cache.block_number(), p.remote_blocks);
        // The call is checked before anything else happens, a broken connection's rebuild included.
        plan(state)?;
        let gate = &peer.gate;
        if let Some(request) = request {
            gate.check(request)?;
        }
        // An empty write moves nothing; with a request it still tells the decode (the layer has no blocks here).
        if state.plan.is_empty() && request.is_none() {
            return Ok(());
        }
        let closing = |state: &Peer| state.link.as_ref().is_some_and(|c| c.number == gate.closing.load(Ordering::Acquire));
        // A connection the decode said it closes, or that ended (the decode went away), is not written again:
        // this call makes a new one, by the reconnect policy.
        let ended = if closing(state) {
            Some(Error::new(ErrorCode::NotConnected, format!("the decode at {key} closed")))
        } else {
            state.link.as_ref().filter(|c| c.channel.is_broken()).map(|_| Error::new(ErrorCode::Transport, format!("the connection to {key} ended")))
        };
        if let (Some(cause), Some(c)) = (ended, state.link.as_ref()) {
            gate.endings.ended(&self.events, &key, c.number, cause);
            state.link = None;
            peer.update(state);
        }
        if state.link.is_none() {
            let rebuilt = self.rebuild(comm, ip, port, state, gate, &peer.metrics);
            peer.update(state);
            if let Err(e) = rebuilt {
                self.forget(&key, &peer);
                return Err(e);
            }
            // The new connection may take calls in another form, or have another number of blocks.
            plan(state)?;
        }
        let writing = lock(&gate.writing);
        // A directive obeyed since the checks above was confirmed before this write: it must not start.
        if let Some(request) = request {
            gate.check(request)?;
        }
        if closing(state) {
            return Err(Error::new(ErrorCode::NotConnected, format!("the decode at {key} is closing: nothing was written")));
        }
        let connection = state.link.as_mut().expect("connected");
        let result = write_telling(connection, &state.plan, remote, layer, request);
        drop(writing);
        if let Err(e) = &result {
            if matches!(e.code(), ErrorCode::Transport | ErrorCode::Timeout | ErrorCode::Protocol) {
                // The connection's state is unknown now: drop it; the next call rebuilds it.
                let number = state.link.as_ref().map_or(0, |c| c.number);
                gate.endings.ended(&self.events, &key, number, e.clone());
                state.link = None;
                peer.update(state);
            }
        }
        result
    }

    /// Tells the decode at `ip:port` that `request` will not complete; later writes of it fail with `ABORTED`.
    pub(super) fn abort(&self, comm: &Communicator, ip: &str, port: u16, request: &RequestId, reason: &str) -> Result<()> {
        let peer = self.peer(&peer_key(ip, port))?;
        let mut state = peer.lock();
        comm.check_open()?;
        lock(&peer.gate.aborted).insert(request.clone());
        // Without a working connection the decode has failed the request already (its link ended).
        if let Some(connection) = state.link.as_mut() {
            // Started first, so that the decode takes the abort from this link even before any write of it.
            if !connection.started.contains(request) {
                connection.channel.send(Frame::Start { request: request.clone() })?;
                connection.started.insert(request.clone());
            }
            // After the frames of the writes before it, and on the wire when this returns.
            connection.channel.send_now(Frame::Abort { request: request.clone(), reason: reason.to_string() })?;
        }
        Ok(())
    }

    /// Ends the connection to `ip:port` (after the write in flight): its request channel says goodbye, so the
    /// decode knows the link is gone; a later call connects anew.
    pub(super) fn disconnect(&self, ip: &str, port: u16) -> Result<()> {
        let key = peer_key(ip, port);
        let peer = self.peer(&key)?;
        // Out of the table first: a `connect` from now on makes a new peer, never revives this one.
        self.forget(&key, &peer);
        let mut state = peer.lock();
        if let Some(c) = state.link.take() {
            peer.gate.endings.ended_here(c.number);
        }
        peer.update(&state);
        Ok(())
    }

    fn peer(&self, key: &str) -> Result<Arc<PeerEntry>> {
        self.peers
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::NotConnected, format!("not connected to {key}: call connect first")))
    }

    /// The threads that run asynchronous calls, one per peer.
    pub(super) fn workers(&self) -> &Workers {
        &self.workers
    }

    /// Waits for the write in flight to each peer, if any (the communicator is marked closed already, so no
    /// other starts), then drops every connection.
    pub(super) fn close(&self) {
        // Nothing is told once the communicator closes.
        self.events.close();
        self.workers.close();
        let peers: Vec<Arc<PeerEntry>> = self.peers.lock().unwrap().drain().map(|(_, p)| p).collect();
        for peer in peers {
            peer.lock().link = None;
        }
        // What the connecting halves hold (an RDMA one: the cache's registered regions) goes once the links that
        // use it have: not when the binding's object is collected.
        lock(&self.connectors).clear();
    }

    /// Drops a peer whose connection could not be rebuilt, so later calls say `NOT_CONNECTED`; a newer peer
    /// under the same key (from a concurrent `connect`) stays.
    fn forget(&self, key: &str, peer: &Arc<PeerEntry>) {
        let mut map = self.peers.lock().unwrap();
        if map.get(key).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            map.remove(key);
        }
    }
}

/// Waits the policy's pause before `attempt`, in short steps: a close meanwhile ends it (`CLOSED`).
fn pause(comm: &Communicator, policy: &Reconnect, attempt: u32) -> Result<()> {
    let until = Instant::now() + policy.pause_before(attempt);
    loop {
        comm.check_open()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn peer_key(ip: &str, port: u16) -> String {
    format!("{ip}:{port}")
}

/// Writes the plan over `connection`'s link and, for a request, tells the decode on its channel: that the
/// request started (before its first bytes), then that this write is in the decode's memory, or failed.
fn write_telling(connection: &mut Connection, plan: &BlockPlan, remote: &[u32], layer: u32, request: Option<&RequestId>) -> Result<()> {
    let Some(request) = request else { return connection.link.write(plan) };
    if connection.slices_without_instance {
        // The decode gives a request to the instance that started it: its other ranks would be refused.
        return Err(Error::invalid(
            "a request written by several ranks into each decode block (a prefill tensor-parallel size larger than the decode's) needs an \
             instanceId (KVCACHE_INSTANCE_ID) that those ranks share: nothing was written",
        ));
    }
    if !connection.started.contains(request) {
        // On the wire before the request's first bytes: if this process dies during them, the decode knows the
        // request was started here, and fails it.
        connection.channel.send_direct(&Frame::Start { request: request.clone() })?;
        connection.started.insert(request.clone());
    }
    if plan.is_empty() {
        // No bytes, so nothing to wait for (mark 0) but the writes before it.
        return connection.channel.send(Frame::Done { request: request.clone(), layer, mark: 0, blocks: Vec::new() });
    }
    // Marks count from 1 and skip 0, which means "no bytes".
    connection.mark = connection.mark.checked_add(1).unwrap_or(1);
    let mark = connection.mark;
    // Built while the bytes are on their way where the link waits for them: copying the ids on the caller's
    // thread is most of what a request id costs a call.
    let done_frame = || Frame::Done { request: request.clone(), layer, mark, blocks: remote.to_vec() };
    let mut done = None;
    let written = connection.link.write_marked(plan, mark, &mut || done = Some(done_frame()));
    match written {
        // Queued: the channel's own thread puts it on the wire, after the bytes are in place.
        Ok(()) => {
            debug_assert!(done.is_some(), "a write that succeeded ran its meanwhile");
            connection.channel.send(done.unwrap_or_else(done_frame))
        }
        Err(e) => {
            // Best effort: if the channel is gone too, the decode fails the request when it sees it end.
            let _ = connection.channel.send(Frame::Failed { request: request.clone(), code: e.code(), reason: e.message().to_string() });
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::testing::{peer, server, until, Recorder};
    use std::time::Duration;

    /// A link whose writes fail once their bytes have left (after `meanwhile`), as a connection that breaks
    /// during a write does.
    struct BreaksDuringWrites;

    impl Link for BreaksDuringWrites {
        fn transport(&self) -> TransportKind {
            TransportKind::Tcp
        }
        fn write(&mut self, _: &BlockPlan) -> Result<()> {
            Err(Error::new(ErrorCode::Transport, "the connection broke"))
        }
        fn write_marked(&mut self, plan: &BlockPlan, _: u32, meanwhile: &mut dyn FnMut()) -> Result<()> {
            meanwhile();
            self.write(plan)
        }
    }

    #[test]
    fn a_write_that_fails_tells_the_decode_failed_and_never_done() {
        let events = Arc::new(Recorder::default());
        let server = server(events.clone());
        let token = server.admit(peer(), |_| None);
        let (channel, _) =
            ChannelClient::connect("127.0.0.1", server.port(), token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), Arc::new(|_: &Directive| {}), Box::new(|_| {})).unwrap();
        let mut connection =
            Connection { link: Box::new(BreaksDuringWrites), channel, started: RecentIds::default(), mark: 0, number: 1, slices_without_instance: false };
        let mut plan = BlockPlan::default();
        plan.build(&[1], &[2], 0, 1, 8, 8).unwrap();
        let request = RequestId::new("r").unwrap();
        let err = write_telling(&mut connection, &plan, &[2], 0, Some(&request)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Transport);
        // Closing the channel sends what was queued first, then its goodbye.
        drop(connection);
        until("the channel's end", || !lock(&events.closed).is_empty());
        let frames = lock(&events.frames).clone();
        assert!(
            matches!(frames.as_slice(), [Frame::Start { .. }, Frame::Failed { code: ErrorCode::Transport, .. }]),
            "{frames:?}"
        );
    }
}
