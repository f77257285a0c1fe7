//! The decode side's view of requests: which layers of each have arrived, from which prefill links, and what
//! the engine waits for. Fed by the request channels ([`crate::channel`]); no I/O of its own.
//!
//! - A layer of a request has arrived once every prefill rank that writes into this decode's blocks (`ratio`
//!   of them, one per slice) has written it. A request is complete once every layer of the cache has.
//! - A request ends complete, failed (a write failed, or a link that had started it ended before it was
//!   complete), aborted (by a prefill) or revoked (by the engine); the first end is final.
//! - Notifications are collected only once the engine asks for them ([`Requests::next_then`]), at most
//!   [`MAX_QUEUED`] at a time.

use crate::channel::{Frame, PeerInfo, RequestId};
use crate::error::{Error, ErrorCode, Result};
use crate::wire::TransportKind;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

/// Ended requests remembered (for a `waitFor` that comes after the end), and revoked ids remembered (so a
/// prefill link that reconnects learns them).
pub const MAX_REMEMBERED: usize = 65536;
/// Requests one link may have open at once; a link that opens more is cut off.
pub const MAX_OPEN_PER_LINK: usize = 65536;
/// Notifications kept for the engine, and block ids in them; past either the oldest are dropped, and counted.
pub const MAX_QUEUED: usize = 65536;
pub const MAX_QUEUED_IDS: usize = 16 << 20;
/// `Done`s of one RDMA link waiting for their marks, and block ids in them; a link with more is cut off.
pub const MAX_PARKED: usize = 65536;
pub const MAX_PARKED_IDS: usize = 16 << 20;
/// Requests a decode keeps at once (open, and ended ones remembered); a link that starts one more is cut off.
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
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Aborted => "aborted",
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
    /// The prefill link (`prefill tp i/n at host`).
    pub peer: String,
    pub status: Status,
    /// Why it failed or was aborted.
    pub reason: Option<String>,
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
    /// Per layer, the slices that have arrived.
    slots: Vec<Vec<u32>>,
    /// Slices per block, from the first write (every link writing a request must agree).
    ratio: Option<u32>,
    complete_layers: u32,
    end: Option<End>,
    /// The links that started it and may still write it.
    links: HashSet<u64>,
    waiters: Vec<Waiter>,
}

impl Record {
    fn new(layers: u32) -> Record {
        Record { slots: vec![Vec::new(); layers as usize], ratio: None, complete_layers: 0, end: None, links: HashSet::new(), waiters: Vec::new() }
    }

    fn has(&self, layer: u32) -> bool {
        self.slots.get(layer as usize).is_some_and(|s| !s.is_empty() && s.len() as u32 >= self.ratio.unwrap_or(1))
    }

    fn satisfies(&self, layers: &Option<Vec<u32>>) -> bool {
        match layers {
            None => self.complete_layers as usize == self.slots.len(),
            Some(list) => list.iter().all(|&l| self.has(l)),
        }
    }
}

struct Table {
    records: HashMap<RequestId, Record>,
    /// Ended requests, oldest first: the first forgotten when there are too many.
    ended: VecDeque<RequestId>,
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
}

/// An RDMA link's `Done` frames come on the request channel once the prefill's writes completed, but the
/// bytes are in this memory only once the queue pair has received the write's mark (sent after them on the
/// same queue pair): each `Done` waits for its mark, and those behind it wait too.
#[derive(Default)]
struct Marks {
    seen: Option<u32>,
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
    pub fn new(layers: u32, block_number: u32) -> Requests {
        Requests {
            layers,
            block_number,
            table: Mutex::new(Table {
                records: HashMap::new(),
                ended: VecDeque::new(),
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
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The revoked requests a newly opened link must learn.
    pub fn revoked(&self) -> Vec<RequestId> {
        self.lock().revoked_order.iter().cloned().collect()
    }

    /// What link `link` (of `peer`) said. An error means the link misbehaves and must be cut off.
    pub fn on_frame(&self, link: u64, peer: &PeerInfo, frame: Frame) -> Result<()> {
        let mut due = Due::default();
        let outcome = {
            let mut t = self.lock();
            match frame {
                Frame::Start { request } => self.start(&mut t, link, &request),
                Frame::Done { mark, ref blocks, layer, .. } if peer.transport == TransportKind::Rdma => {
                    // Checked now, not when its mark comes: a malformed frame ends its channel.
                    self.check_done(layer, blocks)?;
                    let n = blocks.len();
                    let waiting = t.marks.entry(peer.session).or_default();
                    // Mark 0: a write that moved no bytes, with nothing to wait for but the writes before it.
                    if waiting.parked.is_empty() && (mark == 0 || waiting.seen.is_some_and(|s| reached(s, mark))) {
                        self.done_frame(&mut t, &mut due, link, peer, frame)
                    } else if waiting.parked.len() >= MAX_PARKED || waiting.parked_ids + n > MAX_PARKED_IDS {
                        Err(Error::protocol(format!("more than {MAX_PARKED} writes, or {MAX_PARKED_IDS} blocks, waiting for their marks")))
                    } else {
                        waiting.parked_ids += n;
                        waiting.parked.push_back((link, peer.clone(), frame));
                        Ok(())
                    }
                }
                f @ Frame::Done { .. } => self.done_frame(&mut t, &mut due, link, peer, f),
                // Only a link that started a request may end it.
                Frame::Failed { request, .. } | Frame::Abort { request, .. } if !t.records.get(&request).is_some_and(|r| r.links.contains(&link)) => {
                    Ok(())
                }
                Frame::Failed { request, code, reason } => {
                    let why = Error::new(ErrorCode::Transport, format!("{} failed to write it ({code}: {reason})", peer.name));
                    self.fail(&mut t, &mut due, &request, &peer.name, Status::Failed, why);
                    Ok(())
                }
                Frame::Abort { request, reason } => {
                    let why = Error::new(ErrorCode::Aborted, format!("{} aborted it{}", peer.name, reason_suffix(&reason)));
                    self.fail(&mut t, &mut due, &request, &peer.name, Status::Aborted, why);
                    Ok(())
                }
                f => Err(Error::protocol(format!("unexpected frame {f:?}"))),
            }
        };
        due.run();
        outcome
    }

    /// RDMA session `session` received `mark`: the `Done`s up to it are released, in order.
    pub fn on_mark(&self, session: u64, mark: u32) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
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
                }
                ready.push(parked);
            }
            for (link, peer, frame) in ready {
                // A failure here is a link misbehaving; its channel's own checks end it.
                let _ = self.done_frame(&mut t, &mut due, link, &peer, frame);
            }
        }
        due.run();
    }

    /// Link `link` ended, `why`: every request it started that has not ended fails.
    pub fn on_link_end(&self, link: u64, peer: &PeerInfo, why: &str) {
        let mut due = Due::default();
        {
            let mut t = self.lock();
            t.marks.remove(&peer.session);
            for request in t.open.remove(&link).unwrap_or_default() {
                let e = Error::new(ErrorCode::Transport, format!("the connection to {} ended before it was complete ({why})", peer.name));
                self.fail(&mut t, &mut due, &request, &peer.name, Status::Failed, e);
            }
        }
        due.run();
    }

    fn done_frame(&self, t: &mut Table, due: &mut Due, link: u64, peer: &PeerInfo, frame: Frame) -> Result<()> {
        match frame {
            Frame::Done { request, layer, blocks, .. } => self.done(t, due, link, peer, request, layer, blocks),
            f => Err(Error::protocol(format!("unexpected frame {f:?}"))),
        }
    }

    fn start(&self, t: &mut Table, link: u64, request: &RequestId) -> Result<()> {
        if t.revoked.contains(request) {
            return Ok(());
        }
        if t.records.len() >= MAX_RECORDS && !t.records.contains_key(request) {
            return Err(Error::protocol(format!("more than {MAX_RECORDS} requests at once")));
        }
        let layers = self.layers;
        let record = t.records.entry(request.clone()).or_insert_with(|| Record::new(layers));
        if record.end.is_some() {
            return Ok(());
        }
        record.links.insert(link);
        let open = t.open.entry(link).or_default();
        open.insert(request.clone());
        if open.len() > MAX_OPEN_PER_LINK {
            return Err(Error::protocol(format!("more than {MAX_OPEN_PER_LINK} requests open on one link")));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
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

    fn done(&self, t: &mut Table, due: &mut Due, link: u64, peer: &PeerInfo, request: RequestId, layer: u32, blocks: Vec<u32>) -> Result<()> {
        self.check_done(layer, &blocks)?;
        self.start(t, link, &request)?;
        let Some(record) = t.records.get_mut(&request) else { return Ok(()) };
        match record.end {
            // Bytes that arrived after the request completed (a layer written again): said, nothing more.
            Some(End::Complete) => {
                let n = Notification { request_id: request.to_string(), layer: Some(layer), block_ids: blocks, peer: peer.name.clone(), status: Status::Done, reason: None };
                push(t, due, n);
                return Ok(());
            }
            Some(_) => return Ok(()),
            None => {}
        }
        let ratio = *record.ratio.get_or_insert(peer.ratio.max(1));
        if ratio != peer.ratio.max(1) {
            return Err(Error::protocol(format!("request {request:?} is written as {} slices per block, and {ratio} before", peer.ratio)));
        }
        let slots = &mut record.slots[layer as usize];
        if !slots.contains(&peer.slot) {
            slots.push(peer.slot);
            if slots.len() as u32 == ratio {
                record.complete_layers += 1;
            }
        }
        // A link whose slice has come for every layer is done with the request: its end no longer fails it (it
        // may still abort it).
        if record.slots.iter().all(|s| s.contains(&peer.slot)) {
            if let Some(open) = t.open.get_mut(&link) {
                open.remove(&request);
            }
        }
        let Some(record) = t.records.get_mut(&request) else { return Ok(()) };
        let ready: Vec<Waiter>;
        (ready, record.waiters) = std::mem::take(&mut record.waiters).into_iter().partition(|w| record.satisfies(&w.layers));
        for w in ready {
            t.waits.remove(&w.token);
            due.settles.push((w.settle, Ok(())));
        }
        let complete = record.complete_layers == self.layers;
        let notification = Notification {
            request_id: request.to_string(),
            layer: Some(layer),
            block_ids: blocks,
            peer: peer.name.clone(),
            status: Status::Done,
            reason: None,
        };
        if complete {
            self.end(t, &request, End::Complete);
        }
        push(t, due, notification);
        Ok(())
    }

    /// Ends `request` as failed or aborted (if it has not ended): its waiters get `why`.
    fn fail(&self, t: &mut Table, due: &mut Due, request: &RequestId, peer: &str, status: Status, why: Error) {
        if t.revoked.contains(request) {
            return;
        }
        let layers = self.layers;
        let record = t.records.entry(request.clone()).or_insert_with(|| Record::new(layers));
        if record.end.is_some() {
            return;
        }
        for w in std::mem::take(&mut record.waiters) {
            t.waits.remove(&w.token);
            due.settles.push((w.settle, Err(why.clone())));
        }
        let reason = Some(why.message().to_string());
        self.end(t, request, End::Failed(why));
        let n = Notification { request_id: request.to_string(), layer: None, block_ids: Vec::new(), peer: peer.to_string(), status, reason };
        push(t, due, n);
    }

    fn end(&self, t: &mut Table, request: &RequestId, end: End) {
        let Some(record) = t.records.get_mut(request) else { return };
        record.end = Some(end);
        for link in std::mem::take(&mut record.links) {
            if let Some(open) = t.open.get_mut(&link) {
                open.remove(request);
            }
        }
        t.ended.push_back(request.clone());
        while t.ended.len() > MAX_REMEMBERED {
            let old = t.ended.pop_front().expect("not empty");
            if t.records.get(&old).is_some_and(|r| r.end.is_some() && r.waiters.is_empty()) {
                t.records.remove(&old);
            }
        }
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
            if t.records.get(request).is_some_and(|r| r.end.is_none()) {
                self.end(&mut t, request, End::Revoked);
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
                let layers_n = self.layers;
                let record = t.records.entry(request.clone()).or_insert_with(|| Record::new(layers_n));
                match &record.end {
                    // Revoked: its blocks may already serve another request, whatever arrived.
                    Some(End::Revoked) => Some(Err(revoked(request))),
                    // Layers that arrived before the request failed are there all the same.
                    _ if record.satisfies(&layers) => Some(Ok(())),
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
                if t.records.get(id).is_some_and(|r| r.end.is_none() && r.links.is_empty() && r.waiters.is_empty() && r.complete_layers == 0 && r.slots.iter().all(Vec::is_empty)) {
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
