//! The decode side's view of requests: which layers of each have arrived, from which prefill links, and what
//! the engine waits for. Fed by the request channels (`crate::channel`); no I/O of its own.
//!
//! - A request belongs to the prefill instance that started it, its [`Owner`]: the first `Start` (or `Done`)
//!   names it. Only that instance's links may write its layers, fail or abort it; what any other link says of
//!   it is refused (logged, within its host's allowance) and changes nothing. The owner's first link also fixes
//!   how many slices make a block (`ratio`): its other ranks must agree.
//! - A layer of a request has arrived once every prefill rank that writes into this decode's blocks (`ratio`
//!   of them, one per slice) has written it. A request is complete once every layer of the cache has.
//! - Every request ends: complete, failed (a write failed, or a link that had started it ended before it was
//!   complete), aborted (by its prefill), revoked (by the engine), or expired (no progress for the time to
//!   live, `KVCACHE_REQUEST_TTL_MS`); the first end is final. An ended request is remembered, for a `waitFor`
//!   that comes late, for one time to live and at most [`MAX_REMEMBERED`] per owner.
//! - Limits are per owner, so that one prefill never locks another out: [`MAX_OPEN`] open requests each, and
//!   past [`MAX_RECORDS`] in all the oldest remembered end of the owner that holds the most is forgotten first.
//! - Notifications are collected only once the engine asks for them ([`Requests::next_then`]), at most
//!   [`MAX_QUEUED`] at a time.

use crate::sync::lock;
use crate::channel::{Frame, PeerInfo, RequestId};
use crate::error::{Error, ErrorCode, Result};
use crate::listener;
use crate::log::Logger;
use crate::metrics::{Instruments, PeerInstruments};
use crate::wire::TransportKind;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ended requests remembered per owner (for a `waitFor` that comes after the end), and revoked ids remembered
/// (so a prefill link that reconnects learns them).
pub const MAX_REMEMBERED: usize = 65536;
/// Requests one owner may have open at once; a link of an owner that opens more is cut off.
pub const MAX_OPEN: usize = 65536;
/// Notifications kept for the engine, and block ids in them; past either the oldest are dropped, and counted.
pub const MAX_QUEUED: usize = 65536;
pub const MAX_QUEUED_IDS: usize = 16 << 20;
/// `Done`s waiting for their RDMA marks, and block ids in them: per link (a link with more is cut off) and
/// per decode (past it, the link holding the most loses its waiting `Done`s and is cut off).
pub const MAX_PARKED_PER_LINK: usize = 8192;
pub const MAX_PARKED_IDS_PER_LINK: usize = 2 << 20;
pub const MAX_PARKED: usize = 65536;
pub const MAX_PARKED_IDS: usize = 16 << 20;
/// Requests a decode keeps at once (open, and ended ones remembered). Past it, remembered ends are forgotten
/// (of the owner that holds the most); a request started while none is left to forget is not tracked (logged).
pub const MAX_RECORDS: usize = 1 << 20;

/// What became of a write, or of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A write's bytes are in this decode's memory.
    Done,
    /// The request will not complete: a write failed, or its prefill went away.
    Failed,
    /// Its prefill aborted it.
    Aborted,
    /// It made no progress for the time to live (`KVCACHE_REQUEST_TTL_MS`): the decode gave up on it.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Aborted => "aborted",
            Status::Expired => "expired",
        }
    }
}

/// One event of a request, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub request_id: String,
    /// The layer written (`Done` only).
    pub layer: Option<u32>,
    /// This decode's blocks that the write filled (`Done` only).
    pub block_ids: Vec<u32>,
    /// The prefill link (`prefill tp i/n at host`); for an expired request, the link that started it (empty
    /// when none did).
    pub peer: String,
    pub status: Status,
    /// Why it failed, was aborted or expired.
    pub reason: Option<String>,
}

/// Who may write, end or abort a request: the prefill instance that started it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The ranks of one prefill instance, which share the engine's instance id (`KVCACHE_INSTANCE_ID`).
    Instance(String),
    /// A prefill link without an instance id: an instance of its own.
    Link(u64),
}

impl Owner {
    /// The owner that link `link` (of `peer`) speaks for.
    pub fn of(link: u64, peer: &PeerInfo) -> Owner {
        match &peer.instance {
            Some(id) => Owner::Instance(id.clone()),
            None => Owner::Link(link),
        }
    }
}

type Settle = Box<dyn FnOnce(Result<()>) + Send>;
type Take = Box<dyn FnOnce(Vec<Notification>) + Send>;

struct Waiter {
    token: u64,
    /// `None`: every layer.
    layers: Option<Vec<u32>>,
    settle: Settle,
}

#[derive(Debug, Clone)]
enum End {
    Complete,
    Failed(Error),
    Revoked,
}

struct Record {
    /// Tells this record from an earlier one of the same id (forgotten since) in the expiry queue.
    generation: u64,
    /// `None` until a prefill starts it (a `waitFor` may come first).
    owner: Option<Owner>,
    /// The link that started it, for notifications.
    started_by: String,
    /// Per layer, the slices that have arrived (until it ends).
    slots: Vec<Vec<u32>>,
    /// Once it failed: the layers that had arrived.
    arrived: Vec<u32>,
    /// Slices per block, fixed by its owner's first link.
    ratio: u32,
    complete_layers: u32,
    end: Option<End>,
    /// The owner's links that started it and may still write it: each one's end fails it.
    links: HashSet<u64>,
    waiters: Vec<Waiter>,
    /// Its last progress: created, started, or a layer arrived. It expires a time to live after.
    touched: Instant,
    /// When a prefill started it, and the instruments of that prefill's host, which count what becomes of it.
    started_at: Instant,
    metrics: Option<Arc<PeerInstruments>>,
}

impl Record {
    fn has(&self, layer: u32) -> bool {
        match self.end {
            None => self.slots.get(layer as usize).is_some_and(|s| !s.is_empty() && s.len() as u32 >= self.ratio),
            Some(End::Complete) => true,
            Some(_) => self.arrived.contains(&layer),
        }
    }

    fn satisfies(&self, layers: &Option<Vec<u32>>, all: u32) -> bool {
        match layers {
            None => self.complete_layers == all,
            Some(list) => list.iter().all(|&l| self.has(l)),
        }
    }
}

/// What one owner holds (`None`: requests no prefill started, waited for or revoked by the engine).
#[derive(Default)]
struct Holdings {
    open: usize,
    /// Its ended requests, oldest first, with their generation and when they ended.
    ended: VecDeque<(RequestId, u64, Instant)>,
}

struct Table {
    records: HashMap<RequestId, Record>,
    owners: HashMap<Option<Owner>, Holdings>,
    /// Open requests by when they would expire (as of when queued; see [`Requests::expire`]).
    expiry: BinaryHeap<Reverse<(Instant, u64, RequestId)>>,
    next_generation: u64,
    revoked: HashSet<RequestId>,
    revoked_order: VecDeque<RequestId>,
    /// Each link's requests that have not ended.
    open: HashMap<u64, HashSet<RequestId>>,
    /// `None` until the engine first asks for notifications.
    queue: Option<VecDeque<Notification>>,
    /// Block ids in `queue`.
    queued_ids: usize,
    dropped: u64,
    /// Which request each wait is for, by token.
    waits: HashMap<u64, RequestId>,
    /// Set once the communicator closed: waits and takers settle at once.
    closed: bool,
    takers: Vec<Take>,
    /// Per RDMA session: the last mark its queue pair received, and the `Done`s waiting for theirs.
    marks: HashMap<u64, Marks>,
    /// `Done`s parked across all sessions, and block ids in them.
    parked: usize,
    parked_ids: usize,
    /// RDMA sessions whose parked `Done`s were dropped to make room: their links are cut off.
    overflowed: HashSet<u64>,
}

/// An RDMA link's `Done` frames come on the request channel once the prefill's writes completed, but the
/// bytes are in this memory only once the queue pair has received the write's mark (sent after them on the
/// same queue pair): each `Done` waits for its mark, and those behind it wait too.
#[derive(Default)]
struct Marks {
    seen: Option<u32>,
    /// The newest mark a `Done` has named.
    claimed: Option<u32>,
    parked: VecDeque<(u64, PeerInfo, Frame)>,
    /// Block ids in `parked`.
    parked_ids: usize,
}

/// Whether mark `seen` is at or past `mark` (marks count up and wrap).
fn reached(seen: u32, mark: u32) -> bool {
    (seen.wrapping_sub(mark) as i32) >= 0
}

/// The requests of one decode communicator.
pub struct Requests {
    layers: u32,
    block_number: u32,
    /// Bytes of one block of one layer, all tensors: what a notified block brought (one slice of it per rank).
    layer_block_bytes: u64,
    /// The communicator's instruments, where what the notifications name is counted (per peer and transport).
    metrics: Arc<Instruments>,
    /// How long a request may go without progress, and how long an ended one is remembered.
    ttl: Duration,
    log: Arc<Logger>,
    table: Mutex<Table>,
}

/// Completions to run once the table is unlocked (they may call back in).
#[derive(Default)]
struct Due {
    settles: Vec<(Settle, Result<()>)>,
    takes: Vec<(Take, Vec<Notification>)>,
}

impl Due {
    /// Notifications first: an engine that reads them sees a write no later than a waiter does.
    fn run(self) {
        for (take, batch) in self.takes {
            take(batch);
        }
        for (settle, outcome) in self.settles {
            settle(outcome);
        }
    }
}

impl Requests {
    pub fn new(layers: u32, block_number: u32, layer_block_bytes: u64, ttl: Duration, log: Arc<Logger>, metrics: Arc<Instruments>) -> Requests {
        Requests {
            layers,
            block_number,
            layer_block_bytes,
            metrics,
            ttl,
            log,
            table: Mutex::new(Table {
                records: HashMap::new(),
                owners: HashMap::new(),
                expiry: BinaryHeap::new(),
                next_generation: 1,
                revoked: HashSet::new(),
                revoked_order: VecDeque::new(),
                open: HashMap::new(),
                queue: None,
                queued_ids: 0,
                dropped: 0,
                waits: HashMap::new(),
                closed: false,
                takers: Vec::new(),
                marks: HashMap::new(),
                parked: 0,
                parked_ids: 0,
                overflowed: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// The revoked requests a newly opened link must learn.
    pub fn revoked(&self) -> Vec<RequestId> {
        self.lock().revoked_order.iter().cloned().collect()
    }

    /// Requests held now (open, and ended ones remembered).
    pub fn held(&self) -> usize {
        self.lock().records.len()
    }

    /// What link `link` (of `peer`) said. An error means the link misbehaves and must be cut off.
    pub fn on_frame(&self, link: u64, peer: &PeerInfo, frame: Frame) -> Result<()> {
        let mut due = Due::default();
        let outcome = {
            let mut t = self.lock();
            let now = Instant::now();
            if t.overflowed.contains(&peer.session) {
                return Err(Error::protocol("its notifications waiting for their marks were dropped to make room for other links'"));
            }
            match frame {
                Frame::Start { request } => self.start(&mut t, link, peer, &request, now).map(drop),
                Frame::Done { mark, ref blocks, layer, .. } if peer.transport == TransportKind::Rdma => {
                    // Checked now, not when its mark comes: a malformed frame ends its channel.
                    self.check_done(layer, blocks)?;
                    if mark == 0 && !blocks.is_empty() {
                        // Mark 0 is a write that moved no bytes: one that names blocks claims what no mark proves.
                        return Err(Error::protocol("a notification of blocks without the mark that proves them"));
                    }
                    let n = blocks.len();
                    let t = &mut *t;
                    let waiting = t.marks.entry(peer.session).or_default();
                    // Each write has a mark of its own, newer than the last: one mark cannot prove two writes.
                    if mark != 0 && waiting.claimed.is_some_and(|c| !reached(mark, c.wrapping_add(1))) {
                        return Err(Error::protocol(format!("a notification with mark {mark}, not newer than the last one claimed")));
                    }
                    if mark != 0 {
                        waiting.claimed = Some(mark);
                    }
                    if waiting.parked.is_empty() && (mark == 0 || waiting.seen.is_some_and(|s| reached(s, mark))) {
                        self.done_frame(t, &mut due, link, peer, frame, now)
                    } else if waiting.parked.len() >= MAX_PARKED_PER_LINK || waiting.parked_ids + n > MAX_PARKED_IDS_PER_LINK {
                        Err(Error::protocol(format!(
                            "more than {MAX_PARKED_PER_LINK} writes, or {MAX_PARKED_IDS_PER_LINK} blocks, waiting for their marks"
                        )))
                    } else if !self.make_room(t, &mut due, peer.session, n, now) {
                        Err(Error::protocol(format!("this decode has {MAX_PARKED} writes, or {MAX_PARKED_IDS} blocks, waiting for their marks")))
                    } else {
                        let waiting = t.marks.entry(peer.session).or_default();
                        waiting.parked_ids += n;
                        waiting.parked.push_back((link, peer.clone(), frame));
                        t.parked += 1;
                        t.parked_ids += n;
                        Ok(())
                    }
                }
                f @ Frame::Done { .. } => self.done_frame(&mut t, &mut due, link, peer, f, now),
                Frame::Failed { request, code, reason } => {
                    if self.owned_by(&t, link, peer, &request, "fail") {
                        let why = Error::new(ErrorCode::Transport, format!("{} failed to write it ({code}: {reason})", peer.name));
                        self.fail(&mut t, &mut due, &request, &peer.name, Status::Failed, why, now);
                    }
                    Ok(())
                }
                Frame::Abort { request, reason } => {
                    if self.owned_by(&t, link, peer, &request, "abort") {
                        let why = Error::new(ErrorCode::Aborted, format!("{} aborted it{}", peer.name, reason_suffix(&reason)));
                        self.fail(&mut t, &mut due, &request, &peer.name, Status::Aborted, why, now);
                    }
                    Ok(())
                }
                f => Err(Error::protocol(format!("unexpected frame {f:?}"))),
            }
        };
        due.run();
        outcome
    }

    /// Whether `request` exists and belongs to the owner `link` speaks for. A request of another owner is
    /// refused (see [`Requests::refuse`]): `what` names what was refused.
    fn owned_by(&self, t: &Table, link: u64, peer: &PeerInfo, request: &RequestId, what: &str) -> bool {
        let Some(owner) = t.records.get(request).and_then(|r| r.owner.as_ref()) else { return false };
        let owned = *owner == Owner::of(link, peer);
        if !owned {
            self.refuse(peer, format!("{what} request {request:?}: another prefill started it"));
        }
        owned
    }

    /// Logs that what `peer` attempted (`attempt`) was refused, within the allowance of its host (never of a name
    /// it chose); its link goes on.
    fn refuse(&self, peer: &PeerInfo, attempt: String) {
        let host = peer.address.map(|ip| listener::host_of(ip).to_string()).unwrap_or_default();
        self.log.warn_from(&host, format!("refused {}'s attempt to {attempt}", peer.name));
    }

    /// Makes room among the `Done`s waiting for their marks for one more of `session`, naming `n` blocks: while
    /// the decode's allowance is spent, the session holding the most of what ran out (if another) loses its
    /// waiting `Done`s, their requests fail, and its link is cut off at its next frame. `false`: `session` holds
    /// the most itself.
    fn make_room(&self, t: &mut Table, due: &mut Due, session: u64, n: usize, now: Instant) -> bool {
        while t.parked >= MAX_PARKED || t.parked_ids + n > MAX_PARKED_IDS {
            let by_ids = t.parked_ids + n > MAX_PARKED_IDS;
            let held = |s: u64, m: &Marks| {
                let mine = if s == session { (1, n) } else { (0, 0) };
                if by_ids { m.parked_ids + mine.1 } else { m.parked.len() + mine.0 }
            };
            let most = t.marks.iter().max_by_key(|(s, m)| (held(**s, m), **s != session)).map(|(s, _)| *s);
            match most.filter(|&s| s != session) {
                Some(greedy) => self.drop_parked(t, due, greedy, now),
                None => return false,
            }
        }
        true
    }

    /// Drops the `Done`s of `greedy` waiting for their marks: their requests fail, and its link is cut off at
    /// its next frame.
    fn drop_parked(&self, t: &mut Table, due: &mut Due, greedy: u64, now: Instant) {
        let waiting = std::mem::take(&mut t.marks.get_mut(&greedy).expect("just found").parked);
        t.overflowed.insert(greedy);
        let mut failed = HashSet::new();
        for (_, peer, frame) in waiting {
            let Frame::Done { request, blocks, .. } = frame else { continue };
            t.parked -= 1;
            t.parked_ids -= blocks.len();
            if failed.insert(request.clone()) {
                let why = Error::new(ErrorCode::Transport, format!("{} had too many writes waiting for their marks", peer.name));
                self.fail(t, due, &request, &peer.name, Status::Failed, why, now);
            }
        }
        if let Some(m) = t.marks.get_mut(&greedy) {
            m.parked_ids = 0;
        }
    }

    /// RDMA session `session` received `mark`: the `Done`s up to it are released, in order.
    pub fn on_mark(&self, session: u64, mark: u32) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
            let t = &mut *t;
            let waiting = t.marks.entry(session).or_default();
            waiting.seen = Some(mark);
            let mut ready = Vec::new();
            while let Some((_, _, Frame::Done { mark: m, .. })) = waiting.parked.front() {
                if *m != 0 && !reached(mark, *m) {
                    break;
                }
                let parked = waiting.parked.pop_front().expect("not empty");
                if let (_, _, Frame::Done { blocks, .. }) = &parked {
                    waiting.parked_ids -= blocks.len();
                    t.parked -= 1;
                    t.parked_ids -= blocks.len();
                }
                ready.push(parked);
            }
            let now = Instant::now();
            for (link, peer, frame) in ready {
                // A failure here is a link misbehaving; its channel's own checks end it.
                let _ = self.done_frame(t, &mut due, link, &peer, frame, now);
            }
        }
        due.run();
    }

    /// Link `link` ended, `why`: every request it started that has not ended fails.
    pub fn on_link_end(&self, link: u64, peer: &PeerInfo, why: &str) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
            if let Some(waiting) = t.marks.remove(&peer.session) {
                t.parked -= waiting.parked.len();
                t.parked_ids -= waiting.parked_ids;
            }
            t.overflowed.remove(&peer.session);
            let now = Instant::now();
            for request in t.open.remove(&link).unwrap_or_default() {
                let e = Error::new(ErrorCode::Transport, format!("the connection to {} ended before it was complete ({why})", peer.name));
                self.fail(&mut t, &mut due, &request, &peer.name, Status::Failed, e, now);
            }
        }
        due.run();
    }

    fn done_frame(&self, t: &mut Table, due: &mut Due, link: u64, peer: &PeerInfo, frame: Frame, now: Instant) -> Result<()> {
        match frame {
            Frame::Done { request, layer, blocks, .. } => self.done(t, due, link, peer, request, layer, blocks, now),
            f => Err(Error::protocol(format!("unexpected frame {f:?}"))),
        }
    }

    /// A new record for `request`, queued for expiry.
    fn create<'t>(&self, t: &'t mut Table, request: &RequestId, now: Instant) -> &'t mut Record {
        let generation = t.next_generation;
        t.next_generation += 1;
        t.expiry.push(Reverse((now + self.ttl, generation, request.clone())));
        let record = Record {
            generation,
            owner: None,
            started_by: String::new(),
            slots: vec![Vec::new(); self.layers as usize],
            arrived: Vec::new(),
            ratio: 1,
            complete_layers: 0,
            end: None,
            links: HashSet::new(),
            waiters: Vec::new(),
            touched: now,
            started_at: now,
            metrics: None,
        };
        t.records.entry(request.clone()).insert_entry(record).into_mut()
    }

    /// Link `link` starts (or goes on writing) `request`. `Ok(false)`: it may not (the request ended, was
    /// revoked, belongs to another owner, or the decode is full of open requests), and what it says of it is
    /// ignored. An error cuts the link off.
    fn start(&self, t: &mut Table, link: u64, peer: &PeerInfo, request: &RequestId, now: Instant) -> Result<bool> {
        if t.revoked.contains(request) {
            return Ok(false);
        }
        let owner = Owner::of(link, peer);
        let ratio = peer.ratio.max(1);
        match t.records.get(request) {
            Some(r) if r.end.is_some() => return Ok(false),
            Some(r) if r.owner.is_some() => {
                if r.owner.as_ref() != Some(&owner) {
                    self.refuse(peer, format!("write request {request:?}: another prefill started it"));
                    return Ok(false);
                }
                if r.ratio != ratio {
                    return Err(Error::protocol(format!(
                        "request {request:?} is written as {ratio} slices per block by {}, and as {} by its instance's first link",
                        peer.name, r.ratio
                    )));
                }
            }
            found => {
                let open = t.owners.get(&Some(owner.clone())).map_or(0, |h| h.open);
                if open >= MAX_OPEN {
                    return Err(Error::protocol(format!("more than {MAX_OPEN} requests open at once from one prefill instance")));
                }
                if found.is_none() && t.records.len() >= MAX_RECORDS && !self.forget_one(t) {
                    // Every record is open (and each owner within its own limit): the request is not tracked, and
                    // the link that asked goes on (it is not the one to blame).
                    self.refuse(peer, format!("start request {request:?}: this decode holds {MAX_RECORDS} open requests"));
                    return Ok(false);
                }
                let record = match t.records.get_mut(request) {
                    Some(r) => r,
                    None => self.create(t, request, now),
                };
                record.owner = Some(owner.clone());
                record.ratio = ratio;
                record.started_by = peer.name.clone();
                record.touched = now;
                record.started_at = now;
                peer.metrics.requests.started.add(1);
                record.metrics = Some(peer.metrics.clone());
                t.owners.entry(Some(owner)).or_default().open += 1;
            }
        }
        // Only a layer that arrives is progress (see `done`): a `Start` said again keeps nothing alive.
        let record = t.records.get_mut(request).expect("found or created");
        if record.links.insert(link) {
            t.open.entry(link).or_default().insert(request.clone());
        }
        Ok(true)
    }

    /// Forgets the oldest remembered end of the owner that remembers the most. `false`: none is remembered.
    fn forget_one(&self, t: &mut Table) -> bool {
        let Some(owner) = t.owners.iter().filter(|(_, h)| !h.ended.is_empty()).max_by_key(|(_, h)| h.ended.len()).map(|(o, _)| o.clone()) else {
            return false;
        };
        let holdings = t.owners.get_mut(&owner).expect("just found");
        let (id, generation, _) = holdings.ended.pop_front().expect("not empty");
        forget(t, &owner, &id, generation);
        true
    }

    /// A `Done`'s layer and blocks are this cache's.
    fn check_done(&self, layer: u32, blocks: &[u32]) -> Result<()> {
        if layer >= self.layers {
            return Err(Error::protocol(format!("a notification for layer {layer} of a {}-layer cache", self.layers)));
        }
        if let Some(b) = blocks.iter().find(|&&b| b >= self.block_number) {
            return Err(Error::protocol(format!("a notification for block {b} of a {}-block cache", self.block_number)));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn done(&self, t: &mut Table, due: &mut Due, link: u64, peer: &PeerInfo, request: RequestId, layer: u32, blocks: Vec<u32>, now: Instant) -> Result<()> {
        self.check_done(layer, &blocks)?;
        let rewritten = t.records.get(&request).is_some_and(|r| matches!(r.end, Some(End::Complete)));
        if rewritten {
            // Bytes that arrived after the request completed (a layer written again by its owner): said, nothing more.
            if self.owned_by(t, link, peer, &request, "write") {
                let n = Notification { request_id: request.to_string(), layer: Some(layer), block_ids: blocks, peer: peer.name.clone(), status: Status::Done, reason: None };
                push(t, due, n);
            }
            return Ok(());
        }
        if !self.start(t, link, peer, &request, now)? {
            return Ok(());
        }
        let record = t.records.get_mut(&request).expect("started");
        let slots = &mut record.slots[layer as usize];
        if !slots.contains(&peer.slot) {
            // Progress: a slice of a layer that had not come (one said again keeps nothing alive).
            record.touched = now;
            slots.push(peer.slot);
            let (n, bytes) = (blocks.len() as u64, blocks.len() as u64 * self.layer_block_bytes / record.ratio as u64);
            self.metrics.wrote(&peer.metrics, Some(peer.transport), n, bytes);
            if slots.len() as u32 == record.ratio {
                record.complete_layers += 1;
                if let Some(owner) = &record.metrics {
                    owner.layer_time.record(now.saturating_duration_since(record.started_at));
                }
            }
        }
        // A link whose slice has come for every layer is done with the request: its end no longer fails it (it
        // may still abort it).
        if record.slots.iter().all(|s| s.contains(&peer.slot)) && record.links.remove(&link) {
            if let Some(open) = t.open.get_mut(&link) {
                open.remove(&request);
            }
        }
        let record = t.records.get_mut(&request).expect("started");
        let ready: Vec<Waiter>;
        (ready, record.waiters) = std::mem::take(&mut record.waiters).into_iter().partition(|w| record.satisfies(&w.layers, self.layers));
        let complete = record.complete_layers == self.layers;
        let finished_by = if complete { record.metrics.clone() } else { None };
        for w in ready {
            t.waits.remove(&w.token);
            due.settles.push((w.settle, Ok(())));
        }
        let notification = Notification {
            request_id: request.to_string(),
            layer: Some(layer),
            block_ids: blocks,
            peer: peer.name.clone(),
            status: Status::Done,
            reason: None,
        };
        if complete {
            if let Some(m) = finished_by {
                m.requests.done.add(1);
            }
            self.end(t, &request, End::Complete, now);
        }
        push(t, due, notification);
        Ok(())
    }

    /// Ends `request` (if it exists and has not ended) as failed, aborted or expired: its waiters get `why`.
    #[allow(clippy::too_many_arguments)]
    fn fail(&self, t: &mut Table, due: &mut Due, request: &RequestId, peer: &str, status: Status, why: Error, now: Instant) {
        if t.revoked.contains(request) {
            return;
        }
        let Some(record) = t.records.get_mut(request).filter(|r| r.end.is_none()) else { return };
        if let Some(m) = &record.metrics {
            match status {
                Status::Aborted => &m.requests.aborted,
                Status::Expired => &m.requests.expired,
                Status::Failed | Status::Done => &m.requests.failed,
            }
            .add(1);
        }
        for w in std::mem::take(&mut record.waiters) {
            t.waits.remove(&w.token);
            due.settles.push((w.settle, Err(why.clone())));
        }
        let reason = Some(why.message().to_string());
        self.end(t, request, End::Failed(why), now);
        let n = Notification { request_id: request.to_string(), layer: None, block_ids: Vec::new(), peer: peer.to_string(), status, reason };
        push(t, due, n);
    }

    fn end(&self, t: &mut Table, request: &RequestId, end: End, now: Instant) {
        let Some(record) = t.records.get_mut(request) else { return };
        // Remembered small: which layers arrived is all a late wait needs (and only of a failed request).
        record.arrived = match end {
            End::Failed(_) => (0..record.slots.len() as u32).filter(|&l| record.has(l)).collect(),
            End::Complete | End::Revoked => Vec::new(),
        };
        record.slots = Vec::new();
        record.end = Some(end);
        let owner = record.owner.clone();
        let generation = record.generation;
        for link in std::mem::take(&mut record.links) {
            if let Some(open) = t.open.get_mut(&link) {
                open.remove(request);
            }
        }
        let holdings = t.owners.entry(owner.clone()).or_default();
        if owner.is_some() {
            holdings.open -= 1;
        }
        holdings.ended.push_back((request.clone(), generation, now));
        if holdings.ended.len() > MAX_REMEMBERED {
            let (old, old_generation, _) = holdings.ended.pop_front().expect("not empty");
            forget(t, &owner, &old, old_generation);
        }
    }

    /// Ends the open requests that made no progress for the time to live (`expired`), and forgets the ended
    /// ones remembered for as long. Called about every 100 ms. Returns the expired requests a prefill had
    /// started, each with the links (channels) of its owner still writing it: the caller tells them to stop.
    pub fn expire(&self) -> Vec<(RequestId, Vec<u64>)> {
        let mut due = Due::default();
        let mut started = Vec::new();
        {
            let mut t = self.lock();
            let now = Instant::now();
            while let Some(Reverse((at, ..))) = t.expiry.peek() {
                if *at > now {
                    break;
                }
                let Reverse((_, generation, id)) = t.expiry.pop().expect("peeked");
                let Some(record) = t.records.get(&id).filter(|r| r.generation == generation && r.end.is_none()) else { continue };
                let due_at = record.touched + self.ttl;
                if due_at > now {
                    t.expiry.push(Reverse((due_at, generation, id)));
                    continue;
                }
                let peer = record.started_by.clone();
                if record.owner.is_some() {
                    started.push((id.clone(), record.links.iter().copied().collect()));
                }
                let why = Error::new(
                    ErrorCode::Expired,
                    format!(
                        "request {id:?} made no progress for {} ms (KVCACHE_REQUEST_TTL_MS): {}",
                        self.ttl.as_millis(),
                        match peer.as_str() {
                            "" => "no prefill started it".to_string(),
                            p => format!("{p} started it, and not every layer arrived"),
                        }
                    ),
                );
                self.fail(&mut t, &mut due, &id, &peer, Status::Expired, why, now);
            }
            let ttl = self.ttl;
            let mut gone = Vec::new();
            for (owner, holdings) in t.owners.iter_mut() {
                while holdings.ended.front().is_some_and(|(.., at)| *at + ttl <= now) {
                    gone.push((owner.clone(), holdings.ended.pop_front().expect("not empty")));
                }
            }
            for (owner, (id, generation, _)) in gone {
                forget(&mut t, &owner, &id, generation);
            }
        }
        due.run();
        started
    }

    /// The engine revoked `request`: remembered, and its waiters get `REVOKED`. Returns nothing to wait for:
    /// the caller asks the links to confirm.
    pub fn revoke(&self, request: &RequestId) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
            if t.revoked.insert(request.clone()) {
                t.revoked_order.push_back(request.clone());
                while t.revoked_order.len() > MAX_REMEMBERED {
                    let old = t.revoked_order.pop_front().expect("not empty");
                    t.revoked.remove(&old);
                }
            }
            if let Some(record) = t.records.get_mut(request) {
                for w in std::mem::take(&mut record.waiters) {
                    t.waits.remove(&w.token);
                    due.settles.push((w.settle, Err(revoked(request))));
                }
            }
            if let Some(record) = t.records.get(request).filter(|r| r.end.is_none()) {
                if let Some(m) = &record.metrics {
                    m.requests.revoked.add(1);
                }
                self.end(&mut t, request, End::Revoked, Instant::now());
            }
        }
        due.run();
    }

    /// Settles `settle` once the `layers` of `request` (all, for `None`) have arrived, or at once with the
    /// request's end if it ended otherwise. `token` names the wait for [`Requests::cancel`].
    pub fn wait(&self, token: u64, request: &RequestId, layers: Option<Vec<u32>>, settle: Settle) {
        if let Some(bad) = layers.as_ref().and_then(|l| l.iter().find(|&&l| l >= self.layers)) {
            return settle(Err(Error::invalid(format!("layer {bad} is outside [0, {})", self.layers))));
        }
        if layers.as_ref().is_some_and(Vec::is_empty) {
            return settle(Err(Error::invalid("an empty list of layers to wait for")));
        }
        let mut settle = Some(settle);
        let now = {
            let mut t = self.lock();
            if t.closed {
                Some(Err(Error::new(ErrorCode::Closed, "the communicator is closed")))
            } else if t.revoked.contains(request) {
                Some(Err(revoked(request)))
            } else {
                let record = match t.records.get_mut(request) {
                    Some(r) => r,
                    None => self.create(&mut t, request, Instant::now()),
                };
                match &record.end {
                    // Revoked: its blocks may already serve another request, whatever arrived.
                    Some(End::Revoked) => Some(Err(revoked(request))),
                    // Layers that arrived before the request failed are there all the same.
                    _ if record.satisfies(&layers, self.layers) => Some(Ok(())),
                    Some(End::Failed(e)) => Some(Err(e.clone())),
                    _ => {
                        let settle = settle.take().expect("not taken yet");
                        record.waiters.push(Waiter { token, layers, settle });
                        t.waits.insert(token, request.clone());
                        None
                    }
                }
            }
        };
        if let (Some(outcome), Some(settle)) = (now, settle) {
            settle(outcome);
        }
    }

    /// Ends the wait `token` with `why` (its timeout or its signal); `false` if it had already settled.
    pub fn cancel(&self, token: u64, why: Error) -> bool {
        let found = {
            let mut t = self.lock();
            let id = t.waits.remove(&token);
            let found = id.and_then(|id| {
                let r = t.records.get_mut(&id)?;
                let i = r.waiters.iter().position(|w| w.token == token)?;
                Some((id, r.waiters.swap_remove(i)))
            });
            // A wait for a request that never started leaves nothing behind.
            if let Some((id, _)) = &found {
                if t.records.get(id).is_some_and(|r| r.end.is_none() && r.owner.is_none() && r.waiters.is_empty()) {
                    t.records.remove(id);
                }
            }
            found.map(|(_, w)| w)
        };
        match found {
            Some(w) => {
                (w.settle)(Err(why));
                true
            }
            None => false,
        }
    }

    /// Hands the notifications queued (waiting for one if there is none) to `take`. The first call starts the
    /// queue.
    pub fn next_then(&self, take: Take) {
        let batch = {
            let mut t = self.lock();
            if t.closed {
                Vec::new()
            } else {
                let queue = t.queue.get_or_insert_with(VecDeque::new);
                if queue.is_empty() {
                    t.takers.push(take);
                    return;
                }
                let batch: Vec<Notification> = queue.drain(..).collect();
                t.queued_ids = 0;
                batch
            }
        };
        take(batch);
    }

    /// Notifications dropped because the engine did not take them in time.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Fails every wait and hands every taker an empty batch (the communicator closed).
    pub fn close(&self) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
            t.closed = true;
            t.waits.clear();
            for record in t.records.values_mut() {
                for w in std::mem::take(&mut record.waiters) {
                    due.settles.push((w.settle, Err(Error::new(ErrorCode::Closed, "the communicator is closed"))));
                }
            }
            for take in std::mem::take(&mut t.takers) {
                due.takes.push((take, Vec::new()));
            }
        }
        due.run();
    }
}

fn revoked(request: &RequestId) -> Error {
    Error::new(ErrorCode::Revoked, format!("request {request:?} was revoked"))
}

fn reason_suffix(reason: &str) -> String {
    match reason {
        "" => String::new(),
        r => format!(": {r}"),
    }
}

/// Queues `n` for the engine, or hands it to a waiting taker.
fn push(t: &mut Table, due: &mut Due, n: Notification) {
    let Some(queue) = t.queue.as_mut() else { return };
    if let Some(take) = t.takers.pop() {
        let mut batch: Vec<Notification> = queue.drain(..).collect();
        batch.push(n);
        t.queued_ids = 0;
        due.takes.push((take, batch));
        return;
    }
    t.queued_ids += n.block_ids.len();
    queue.push_back(n);
    while queue.len() > MAX_QUEUED || t.queued_ids > MAX_QUEUED_IDS {
        let old = queue.pop_front().expect("over a limit, so not empty");
        t.queued_ids -= old.block_ids.len();
        t.dropped += 1;
    }
}

/// Forgets the ended request `id` of `owner`, if it is still that record (`generation`) and nothing waits on it.
fn forget(t: &mut Table, owner: &Option<Owner>, id: &RequestId, generation: u64) {
    if t.records.get(id).is_some_and(|r| r.generation == generation && r.end.is_some() && r.waiters.is_empty()) {
        t.records.remove(id);
    }
    if t.owners.get(owner).is_some_and(|h| h.open == 0 && h.ended.is_empty()) {
        t.owners.remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::mpsc;

    fn requests(layers: u32, ttl: Duration) -> Arc<Requests> {
        let (log, metrics) = (Arc::new(Logger::new(&Config::default(), "test").unwrap()), Arc::new(Instruments::new(crate::wire::Role::Decode)));
        Arc::new(Requests::new(layers, 64, 1024, ttl, log, metrics))
    }

    fn peer(session: u64, ratio: u32, slot: u32, instance: Option<&str>) -> PeerInfo {
        PeerInfo {
            name: format!("prefill {session}"),
            slot,
            ratio,
            transport: TransportKind::Tcp,
            session,
            process: None,
            instance: instance.map(str::to_string),
            address: None,
            metrics: Default::default(),
        }
    }

    fn id(s: &str) -> RequestId {
        RequestId::new(s).unwrap()
    }

    fn done(request: &str, layer: u32, blocks: &[u32]) -> Frame {
        Frame::Done { request: id(request), layer, mark: 0, blocks: blocks.to_vec() }
    }

    /// The outcome of a wait that has settled by now (`None`: still waiting).
    fn wait_now(r: &Requests, token: u64, request: &str, layers: Option<Vec<u32>>) -> mpsc::Receiver<Result<()>> {
        let (tx, rx) = mpsc::channel();
        r.wait(token, &id(request), layers, Box::new(move |outcome| drop(tx.send(outcome))));
        rx
    }

    /// Every notification from now on, as the engine would take them.
    fn notifications(r: &Arc<Requests>) -> Arc<Mutex<Vec<Notification>>> {
        fn take(r: Arc<Requests>, into: Arc<Mutex<Vec<Notification>>>) {
            r.clone().next_then(Box::new(move |batch| {
                if !batch.is_empty() {
                    into.lock().unwrap().extend(batch);
                    take(r, into);
                }
            }));
        }
        let into = Arc::default();
        take(r.clone(), Arc::clone(&into));
        into
    }

    #[test]
    fn another_link_can_neither_write_nor_end_a_request_it_did_not_start() {
        let r = requests(2, Duration::from_secs(60));
        let seen = notifications(&r);
        let (owner, stranger) = (peer(1, 1, 0, None), peer(2, 1, 0, None));
        r.on_frame(1, &owner, Frame::Start { request: id("r") }).unwrap();
        r.on_frame(1, &owner, done("r", 0, &[3])).unwrap();
        // Takeover by Start, fake Dones for every layer, an abort, a failure: all refused, none an error (the
        // stranger's channel stays, and so does the owner's).
        r.on_frame(2, &stranger, Frame::Start { request: id("r") }).unwrap();
        r.on_frame(2, &stranger, done("r", 1, &[])).unwrap();
        r.on_frame(2, &stranger, Frame::Abort { request: id("r"), reason: "mine".into() }).unwrap();
        r.on_frame(2, &stranger, Frame::Failed { request: id("r"), code: ErrorCode::Transport, reason: "mine".into() }).unwrap();
        r.on_link_end(2, &stranger, "it went away");
        assert!(wait_now(&r, 1, "r", None).try_recv().is_err(), "layer 1 has not come from the owner");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].peer, "prefill 1");
        // The owner goes on and completes it.
        r.on_frame(1, &owner, done("r", 1, &[4])).unwrap();
        assert_eq!(wait_now(&r, 2, "r", None).try_recv().unwrap(), Ok(()));
    }

    #[test]
    fn a_ratio_two_stranger_cannot_fix_the_ratio_of_a_request() {
        let r = requests(2, Duration::from_secs(60));
        let owner = peer(1, 1, 0, None);
        r.on_frame(1, &owner, done("r", 0, &[1])).unwrap();
        r.on_frame(2, &peer(2, 2, 1, None), done("r", 1, &[1])).unwrap();
        // The owner's next write is not refused (its channel would have closed, failing all its requests).
        r.on_frame(1, &owner, done("r", 1, &[1])).unwrap();
        assert_eq!(wait_now(&r, 1, "r", None).try_recv().unwrap(), Ok(()));
    }

    #[test]
    fn ranks_of_one_instance_own_a_request_together() {
        let r = requests(1, Duration::from_secs(60));
        let (rank0, rank1) = (peer(1, 2, 0, Some("engine-a")), peer(2, 2, 1, Some("engine-a")));
        r.on_frame(1, &rank0, done("r", 0, &[1])).unwrap();
        // Another instance with the same ranks' geometry adds nothing.
        r.on_frame(3, &peer(3, 2, 1, Some("engine-b")), done("r", 0, &[1])).unwrap();
        assert!(wait_now(&r, 1, "r", None).try_recv().is_err());
        r.on_frame(2, &rank1, done("r", 0, &[1])).unwrap();
        assert_eq!(wait_now(&r, 2, "r", None).try_recv().unwrap(), Ok(()));
        // A rank of the same instance that disagrees on the ratio is cut off.
        r.on_frame(1, &rank0, Frame::Start { request: id("s") }).unwrap();
        assert!(r.on_frame(4, &peer(4, 1, 0, Some("engine-a")), Frame::Start { request: id("s") }).is_err());
    }

    #[test]
    fn a_request_without_progress_expires_and_is_then_forgotten() {
        let ttl = Duration::from_millis(100);
        let r = requests(2, ttl);
        let seen = notifications(&r);
        // A hetero-TP request whose other rank never writes, and a flood of such from one link.
        r.on_frame(1, &peer(1, 2, 0, None), done("hetero", 0, &[1])).unwrap();
        r.on_frame(1, &peer(1, 2, 0, None), done("hetero", 1, &[1])).unwrap();
        let waiting = wait_now(&r, 1, "hetero", None);
        for i in 0..1000 {
            for layer in 0..2 {
                r.on_frame(1, &peer(1, 2, 0, None), done(&format!("flood-{i}"), layer, &[])).unwrap();
            }
        }
        assert_eq!(r.held(), 1001);
        r.expire();
        assert!(waiting.try_recv().is_err(), "not yet");
        std::thread::sleep(ttl + Duration::from_millis(20));
        r.expire();
        let err = waiting.try_recv().unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::Expired, "{err}");
        let seen = seen.lock().unwrap().clone();
        let expired: Vec<_> = seen.iter().filter(|n| n.status == Status::Expired).collect();
        assert_eq!(expired.len(), 1001);
        assert!(expired[0].reason.as_deref().unwrap().contains("KVCACHE_REQUEST_TTL_MS"));
        // Remembered for a late wait, for one more time to live, then forgotten.
        assert_eq!(wait_now(&r, 2, "hetero", None).try_recv().unwrap().unwrap_err().code(), ErrorCode::Expired);
        std::thread::sleep(ttl + Duration::from_millis(20));
        r.expire();
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn progress_keeps_a_request_alive_and_a_start_said_again_does_not() {
        let ttl = Duration::from_millis(600);
        let r = requests(3, ttl);
        let p = peer(1, 1, 0, None);
        r.on_frame(1, &p, done("slow", 0, &[])).unwrap();
        r.on_frame(1, &p, Frame::Start { request: id("idle") }).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        r.on_frame(1, &p, done("slow", 1, &[])).unwrap();
        r.on_frame(1, &p, Frame::Start { request: id("idle") }).unwrap();
        r.on_frame(1, &p, done("slow", 0, &[])).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let expired = r.expire();
        assert_eq!(expired, [(id("idle"), vec![1])], "a layer is progress, a Start said again is not");
        r.on_frame(1, &p, done("slow", 2, &[])).unwrap();
        assert_eq!(wait_now(&r, 1, "slow", None).try_recv().unwrap(), Ok(()));
    }

    #[test]
    fn a_wait_for_a_request_nobody_starts_expires() {
        let ttl = Duration::from_millis(50);
        let r = requests(1, ttl);
        let waiting = wait_now(&r, 1, "never", None);
        std::thread::sleep(ttl + Duration::from_millis(20));
        r.expire();
        let err = waiting.try_recv().unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::Expired);
        assert!(err.message().contains("no prefill started it"), "{err}");
    }

    #[test]
    fn one_owner_at_its_limit_does_not_lock_another_out() {
        let r = requests(1, Duration::from_secs(60));
        let greedy = peer(1, 2, 0, None);
        for i in 0..MAX_OPEN {
            r.on_frame(1, &greedy, Frame::Start { request: id(&format!("g{i}")) }).unwrap();
        }
        let err = r.on_frame(1, &greedy, Frame::Start { request: id("one-more") }).unwrap_err();
        assert!(err.message().contains("one prefill instance"), "{err}");
        r.on_frame(2, &peer(2, 1, 0, None), done("honest", 0, &[1])).unwrap();
        assert_eq!(wait_now(&r, 1, "honest", None).try_recv().unwrap(), Ok(()));
        // Its link's end fails what it held: nothing of it stays open.
        r.on_link_end(1, &greedy, "cut off");
        let mut t = r.lock();
        assert_eq!(t.owners.get(&Some(Owner::Link(1))).map(|h| h.open), Some(0));
        assert!(t.records.values().all(|rec| rec.end.is_some()));
        t.records.clear();
    }

    #[test]
    fn remembered_ends_make_room_for_new_requests_past_the_decode_limit() {
        let r = requests(1, Duration::from_secs(60));
        let mut t = r.lock();
        let now = Instant::now();
        // Fill the table with ended requests of many owners, as a long run would.
        let owners = (MAX_RECORDS / MAX_REMEMBERED) as u64;
        for owner in 0..owners {
            for i in 0..MAX_REMEMBERED {
                let request = id(&format!("old-{owner}-{i}"));
                let rec = r.create(&mut t, &request, now);
                rec.owner = Some(Owner::Link(owner));
                t.owners.entry(Some(Owner::Link(owner))).or_default().open += 1;
                r.end(&mut t, &request, End::Complete, now);
            }
        }
        assert_eq!(t.records.len(), MAX_RECORDS);
        drop(t);
        r.on_frame(999, &peer(999, 1, 0, None), Frame::Start { request: id("new") }).unwrap();
        assert_eq!(r.held(), MAX_RECORDS, "one remembered end made room");
        let t = r.lock();
        let gone: Vec<u64> = (0..owners).filter(|o| !t.records.contains_key(&id(&format!("old-{o}-0")))).collect();
        assert_eq!(gone.len(), 1, "the oldest end of one of the fullest owners went first: {gone:?}");
    }

    #[test]
    fn a_blockful_notification_without_its_mark_is_refused() {
        let r = requests(1, Duration::from_secs(60));
        let rdma = PeerInfo { transport: TransportKind::Rdma, ..peer(1, 1, 0, None) };
        let err = r.on_frame(1, &rdma, Frame::Done { request: id("r"), layer: 0, mark: 0, blocks: vec![1] }).unwrap_err();
        assert!(err.message().contains("mark"), "{err}");
        // An empty write has no bytes to prove.
        r.on_frame(1, &rdma, Frame::Done { request: id("r"), layer: 0, mark: 0, blocks: vec![] }).unwrap();
    }

    #[test]
    fn parked_notifications_are_bounded_per_decode_and_the_greediest_link_pays() {
        let r = requests(1, Duration::from_secs(60));
        let rdma = |session: u64| PeerInfo { transport: TransportKind::Rdma, ..peer(session, 1, 0, None) };
        let parked = |link: u64, i: usize| Frame::Done { request: id(&format!("{link}-{i}")), layer: 0, mark: i as u32 + 1, blocks: vec![] };
        // Marks that never come: the decode's whole allowance, in eight links.
        for link in 1..=(MAX_PARKED / MAX_PARKED_PER_LINK) as u64 {
            r.on_frame(link, &rdma(link), Frame::Start { request: id(&format!("{link}-0")) }).unwrap();
            for i in 0..MAX_PARKED_PER_LINK {
                r.on_frame(link, &rdma(link), parked(link, i)).unwrap();
            }
        }
        // A link with its first write waiting is not cut off: one of the links holding the most is.
        r.on_frame(999, &rdma(999), parked(999, 0)).unwrap();
        let cut: Vec<u64> = (1..=8).filter(|&l| r.on_frame(l, &rdma(l), Frame::Start { request: id("next") }).is_err()).collect();
        assert_eq!(cut.len(), 1, "{cut:?}");
        let mut waits = wait_now(&r, 1, &format!("{}-0", cut[0]), None);
        assert_eq!(waits.try_recv().unwrap().unwrap_err().code(), ErrorCode::Transport, "its waiting requests failed");
        // Its link's end lets it be forgotten.
        r.on_link_end(cut[0], &rdma(cut[0]), "cut off");
        waits = wait_now(&r, 2, "999-0", None);
        r.on_mark(999, 1);
        assert_eq!(waits.try_recv().unwrap(), Ok(()));
    }

    #[test]
    fn one_mark_proves_one_write() {
        let r = requests(2, Duration::from_secs(60));
        let rdma = PeerInfo { transport: TransportKind::Rdma, ..peer(1, 1, 0, None) };
        r.on_frame(1, &rdma, Frame::Done { request: id("r"), layer: 0, mark: 5, blocks: vec![1] }).unwrap();
        for stale in [5, 4] {
            let err = r.on_frame(1, &rdma, Frame::Done { request: id("r"), layer: 1, mark: stale, blocks: vec![2] }).unwrap_err();
            assert!(err.message().contains("not newer"), "{err}");
        }
        r.on_frame(1, &rdma, Frame::Done { request: id("r"), layer: 1, mark: 6, blocks: vec![2] }).unwrap();
    }
}
