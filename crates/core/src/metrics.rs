//! What a communicator counts, for `stats()` and the Prometheus collectors (issue 31): counters, gauges and
//! latency histograms that the write path updates without a lock or an allocation, each a few relaxed atomics.
//! A snapshot reads them one by one, so it is consistent per instrument, not across instruments.
//!
//! Counted per peer: on a prefill, per decode it writes to (`host:port`, as given to `connect`); on a decode,
//! per prefill host (the address its handshake came from; an IPv6 /64 is one host, as its log lines say). At
//! most [`MAX_PEERS`] peers are told apart: past that, a peer with no connection left is forgotten to make room
//! (the oldest first), and where every one has a connection the newcomer is counted under [`OTHER_PEERS`], so
//! an exporter's label values stay bounded. Writes, blocks and bytes are also counted per transport.
//!
//! A decode does not see the bytes that RDMA, shared memory or CUDA IPC put in its memory: what it counts as
//! received is what the prefill's notifications (`Done`, sent once the bytes are there) name, so writes without
//! a request id are counted by the prefill only, on every transport.

use crate::error::ErrorCode;
use crate::sync::lock;
use crate::wire::{Role, TransportKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Peers counted apart; later ones are counted together as [`OTHER_PEERS`].
pub const MAX_PEERS: usize = 256;
/// The peer name of those counted together past [`MAX_PEERS`].
pub const OTHER_PEERS: &str = "other";

/// A count that only grows.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Holds a gauge up by one while it lives (however the call or the resource that raised it ends): one of a peer's
/// (`Raised::new(peer, |m| &m.in_flight)`) or of this process's (`Raised::new(&RESOURCES, |r| &r.rdma_queue_pairs)`).
pub struct Raised<O = Arc<PeerInstruments>> {
    owner: O,
    gauge: for<'a> fn(&'a O) -> &'a Gauge,
}

impl<O> Raised<O> {
    pub fn new(owner: O, gauge: for<'a> fn(&'a O) -> &'a Gauge) -> Raised<O> {
        gauge(&owner).add(1);
        Raised { owner, gauge }
    }
}

impl<O> Drop for Raised<O> {
    fn drop(&mut self) {
        (self.gauge)(&self.owner).add(-1);
    }
}

/// A process-wide gauge held up: see [`RESOURCES`].
pub type HeldResource = Raised<&'static Resources>;

/// A level that goes up and down: calls queued, writes in flight.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The level (never below 0 as read: an increment and its decrement may be seen out of order).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed).max(0) as u64
    }
}

/// What this process holds through kvtransfer, all communicators together: the kernel and device resources
/// its links live on, for a soak or an operator to watch for leaks (`resources()` in the wrapper). Each is
/// held up by a [`Raised`] field of what owns the resource.
#[derive(Debug, Default)]
pub struct Resources {
    /// RDMA queue pairs: a link's on the prefill (its flush reads go on it too), a session's on the decode.
    pub rdma_queue_pairs: Gauge,
    /// RDMA memory regions registered: the caches', each RDMA communicator's scratch page (where its flush reads
    /// land), and a decode's flush word (what they read).
    pub rdma_memory_regions: Gauge,
    /// TCP data connections, both ends (the request channels and handshakes are not counted).
    pub tcp_data_connections: Gauge,
    /// Mappings of shared-memory rings, both ends (a shm session has one ring, mapped by each side).
    pub shm_rings: Gauge,
}

/// This process's [`Resources`].
pub static RESOURCES: Resources =
    Resources { rdma_queue_pairs: Gauge::new(), rdma_memory_regions: Gauge::new(), tcp_data_connections: Gauge::new(), shm_rings: Gauge::new() };

/// Buckets of a [`Histogram`]: bucket `i` counts samples in `[2^(i-1), 2^i)` nanoseconds (bucket 0: under 1 ns),
/// so 2^63 ns (292 years) is the last bound.
const BUCKETS: usize = 64;

/// A latency histogram with power-of-two buckets, in nanoseconds: recording is three relaxed atomic adds.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0), sum_ns: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - ns.leading_zeros()) as usize;
        self.buckets[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let last = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        HistogramSnapshot {
            // The buckets' sum, not the count read apart: a sample recorded meanwhile may be in one and not the
            // other, and an exporter needs the count to equal its last cumulative bucket.
            count: counts.iter().sum(),
            sum: Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)),
            buckets: counts[..last].iter().enumerate().map(|(i, &c)| (upper_bound(i), c)).collect(),
        }
    }
}

/// The exclusive upper bound of bucket `i`.
fn upper_bound(i: usize) -> Duration {
    Duration::from_nanos(1u64.checked_shl(i as u32).unwrap_or(u64::MAX))
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Samples recorded.
    pub count: u64,
    /// Their sum.
    pub sum: Duration,
    /// Each bucket's exclusive upper bound and its samples (not cumulative), up to the last one with any.
    pub buckets: Vec<(Duration, u64)>,
}

impl HistogramSnapshot {
    /// The upper bound of the bucket that holds the `q` quantile (`0.0..=1.0`): at most twice the true value.
    /// `None` without samples.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().map(|(_, c)| c).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets.iter().find(|(_, c)| {
            seen += c;
            seen >= rank
        })
        .map(|(bound, _)| *bound)
    }
}


/// Why a decode refused a prefill before any of its bytes could land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// It did not prove it holds the token (`UNAUTHENTICATED`).
    Authentication,
    /// It dialed another address than the one its connection came to (`REJECTED`; see `KVCACHE_ANSWERS_TO`).
    Address,
    /// Its cache does not fit this one: layers, tensors, block sizes, tensor-parallel sizes (`INVALID_ARGUMENT`).
    Mismatch,
    /// No transport both sides have can take it (`UNAVAILABLE`).
    Transport,
    /// It broke the protocol: garbage, another version, a second greeting (`PROTOCOL`).
    Protocol,
    /// Its request channel came past `KVCACHE_MAX_PEERS`.
    Limit,
    /// Anything else.
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 7] =
        [Refusal::Authentication, Refusal::Address, Refusal::Mismatch, Refusal::Transport, Refusal::Protocol, Refusal::Limit, Refusal::Other];

    /// Its name in `stats()` and as a Prometheus label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Authentication => "authentication",
            Refusal::Address => "address",
            Refusal::Mismatch => "mismatch",
            Refusal::Transport => "transport",
            Refusal::Protocol => "protocol",
            Refusal::Limit => "limit",
            Refusal::Other => "other",
        }
    }

    /// The reason a handshake refused with `code` stands for.
    pub fn of(code: ErrorCode) -> Refusal {
        match code {
            ErrorCode::Unauthenticated => Refusal::Authentication,
            ErrorCode::Rejected => Refusal::Address,
            ErrorCode::InvalidArgument => Refusal::Mismatch,
            ErrorCode::Unavailable => Refusal::Transport,
            ErrorCode::Protocol => Refusal::Protocol,
            _ => Refusal::Other,
        }
    }
}

/// What becomes of a decode's requests, counted by the prefill host that started each.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub started: Counter,
    pub done: Counter,
    pub failed: Counter,
    pub aborted: Counter,
    pub revoked: Counter,
    pub expired: Counter,
}

/// Everything counted about one peer.
#[derive(Debug, Default)]
pub struct PeerInstruments {
    /// Prefill: write calls whose bytes are in the decode's memory. Decode: notifications of written layers.
    pub writes: Counter,
    /// Blocks and bytes those moved (a prefill's blocks are its own: one slice of a decode block each).
    pub blocks: Counter,
    pub bytes: Counter,
    /// Prefill: calls that failed, by [`ErrorCode::ALL`] index.
    failures: [Counter; ErrorCode::ALL.len()],
    /// Prefill: connections made (the first and each rebuilt one). Decode: links admitted.
    pub connects: Counter,
    /// Prefill: connections rebuilt by the reconnect policy.
    pub reconnects: Counter,
    /// Decode: requests by what became of them.
    pub requests: RequestCounters,
    /// Prefill: asynchronous writes waiting behind the peer's earlier calls, and write calls under way (running,
    /// or waiting for the peer's lock).
    pub queued: Gauge,
    pub in_flight: Gauge,
    /// Prefill: each write call, from its start to its bytes being in the decode's memory (or its failure).
    pub write_time: Histogram,
    /// Prefill: each connection made, the handshake, the data link and the request channel.
    pub handshake_time: Histogram,
    /// Decode: each layer of a request, from the prefill's `Start` to the layer's notification.
    pub layer_time: Histogram,
    /// The transport of the latest connection (a [`TransportKind::ALL`] index + 1; 0: none yet).
    transport: AtomicU8,
}

impl PeerInstruments {
    /// Counts a failed call.
    pub fn failed(&self, code: ErrorCode) {
        let i = ErrorCode::ALL.iter().position(|&c| c == code).expect("every code is listed");
        self.failures[i].add(1);
    }

    /// Records the transport a connection took.
    pub fn connected_over(&self, kind: TransportKind) {
        let i = TransportKind::ALL.iter().position(|&k| k == kind).expect("every transport is listed");
        self.transport.store(i as u8 + 1, Ordering::Relaxed);
    }

    fn snapshot(&self, peer: &str) -> PeerStats {
        let r = &self.requests;
        PeerStats {
            peer: peer.to_string(),
            transport: match self.transport.load(Ordering::Relaxed) {
                0 => None,
                i => Some(TransportKind::ALL[i as usize - 1]),
            },
            writes: self.writes.get(),
            blocks: self.blocks.get(),
            bytes: self.bytes.get(),
            failures: ErrorCode::ALL.iter().zip(&self.failures).map(|(&c, n)| (c, n.get())).filter(|(_, n)| *n > 0).collect(),
            connects: self.connects.get(),
            reconnects: self.reconnects.get(),
            requests: RequestStats {
                started: r.started.get(),
                done: r.done.get(),
                failed: r.failed.get(),
                aborted: r.aborted.get(),
                revoked: r.revoked.get(),
                expired: r.expired.get(),
            },
            queued: self.queued.get(),
            in_flight: self.in_flight.get(),
            write_time: self.write_time.snapshot(),
            handshake_time: self.handshake_time.snapshot(),
            layer_time: self.layer_time.snapshot(),
        }
    }
}

/// Writes, blocks and bytes over one transport, all peers together.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub writes: Counter,
    pub blocks: Counter,
    pub bytes: Counter,
}

impl TransportCounters {
    /// Counts one write of `blocks` blocks, `bytes` bytes.
    pub fn wrote(&self, blocks: u64, bytes: u64) {
        self.writes.add(1);
        self.blocks.add(blocks);
        self.bytes.add(bytes);
    }
}

/// A communicator's instruments: per peer, per transport, and its own.
#[derive(Debug)]
pub struct Instruments {
    role: Role,
    /// By [`TransportKind::ALL`] index.
    transports: [TransportCounters; TransportKind::ALL.len()],
    /// Peers in the order they were first counted, and where each is in that list. Looked up on connects and
    /// failures; a write finds its peer's instruments in the peer's own entry.
    peers: Mutex<(Vec<(String, Arc<PeerInstruments>)>, HashMap<String, usize>)>,
    /// Decode: prefills refused, by [`Refusal::ALL`] index.
    refusals: [Counter; Refusal::ALL.len()],
    /// Decode: revokes asked for, and links cut off because they did not confirm one in time.
    pub revokes: Counter,
    pub revoke_cutoffs: Counter,
}

impl Instruments {
    pub fn new(role: Role) -> Instruments {
        Instruments { role, transports: Default::default(), peers: Mutex::default(), refusals: Default::default(), revokes: Counter::default(), revoke_cutoffs: Counter::default() }
    }

    /// The instruments of `peer`: its own, made if it has none (when [`MAX_PEERS`] are counted, in place of the
    /// oldest one with no connection left, else those of [`OTHER_PEERS`]).
    pub fn peer(&self, peer: &str) -> Arc<PeerInstruments> {
        let mut table = lock(&self.peers);
        let (peers, by_name) = &mut *table;
        if let Some(&i) = by_name.get(peer) {
            return peers[i].1.clone();
        }
        let named = peers.len() - usize::from(by_name.contains_key(OTHER_PEERS));
        let mut name = peer;
        if named >= MAX_PEERS {
            // Held by the table alone: no connection, no request and no call in flight counts on it (a handle
            // is only ever handed out here, under this lock, so none can appear meanwhile).
            match peers.iter().position(|(n, p)| Arc::strong_count(p) == 1 && n != OTHER_PEERS) {
                Some(i) => {
                    peers.remove(i);
                    *by_name = peers.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
                }
                None => match by_name.get(OTHER_PEERS) {
                    Some(&i) => return peers[i].1.clone(),
                    None => name = OTHER_PEERS,
                },
            }
        }
        let instruments = Arc::new(PeerInstruments::default());
        by_name.insert(name.to_string(), peers.len());
        peers.push((name.to_string(), instruments.clone()));
        instruments
    }

    /// Counts one write of `blocks` blocks, `bytes` bytes, on its peer and on the transport that took it.
    pub fn wrote(&self, peer: &PeerInstruments, transport: Option<TransportKind>, blocks: u64, bytes: u64) {
        peer.writes.add(1);
        peer.blocks.add(blocks);
        peer.bytes.add(bytes);
        if let Some(kind) = transport {
            self.transport(kind).wrote(blocks, bytes);
        }
    }

    /// The counters of transport `kind`.
    pub fn transport(&self, kind: TransportKind) -> &TransportCounters {
        &self.transports[TransportKind::ALL.iter().position(|&k| k == kind).expect("every transport is listed")]
    }

    /// Counts a refused prefill.
    pub fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|&r| r == why).expect("every reason is listed");
        self.refusals[i].add(1);
    }

    /// What the instruments hold now, with the decode's `levels` (read from its servers and request table).
    pub fn snapshot(&self, levels: Levels) -> Stats {
        // Read under the table's lock rather than from clones: a clone would make every peer look held, and
        // none could make room meanwhile.
        let peers: Vec<PeerStats> = lock(&self.peers).0.iter().map(|(name, p)| p.snapshot(name)).collect();
        let refusals = Refusal::ALL.iter().zip(&self.refusals).map(|(&r, n)| match r {
            Refusal::Limit => (r, n.get() + levels.refused_at_limit),
            _ => (r, n.get()),
        });
        Stats {
            role: self.role,
            peers,
            transports: TransportKind::ALL
                .iter()
                .zip(&self.transports)
                .map(|(&kind, c)| TransportStats { transport: kind, writes: c.writes.get(), blocks: c.blocks.get(), bytes: c.bytes.get() })
                .collect(),
            refusals: refusals.collect(),
            revokes: self.revokes.get(),
            revoke_cutoffs: self.revoke_cutoffs.get(),
            requests_held: levels.requests_held,
            notifications_dropped: levels.notifications_dropped,
        }
    }
}

/// What a decode reads from its servers and request table rather than counting it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Levels {
    pub requests_held: u64,
    pub notifications_dropped: u64,
    /// Request channels refused because `KVCACHE_MAX_PEERS` were open.
    pub refused_at_limit: u64,
}

/// A communicator's instruments as read at one moment ([`crate::Communicator::stats`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub role: Role,
    /// Per peer, in the order they were first counted.
    pub peers: Vec<PeerStats>,
    /// Writes, blocks and bytes per transport (every transport, zeros included), all peers together.
    pub transports: Vec<TransportStats>,
    /// Decode: prefills refused, by reason (every reason, zeros included).
    pub refusals: Vec<(Refusal, u64)>,
    /// Decode: revokes asked for, and links cut off because they did not confirm one in time.
    pub revokes: u64,
    pub revoke_cutoffs: u64,
    /// Decode: requests kept now (open, and ended ones remembered), and notifications dropped because the engine
    /// did not take them (more than `MAX_QUEUED` waiting).
    pub requests_held: u64,
    pub notifications_dropped: u64,
}

/// One transport's counters as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportStats {
    pub transport: TransportKind,
    pub writes: u64,
    pub blocks: u64,
    pub bytes: u64,
}

/// One peer's instruments as read at one moment ([`PeerInstruments`] says what each counts).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub peer: String,
    pub transport: Option<TransportKind>,
    pub writes: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Codes with at least one failure.
    pub failures: Vec<(ErrorCode, u64)>,
    pub connects: u64,
    pub reconnects: u64,
    pub requests: RequestStats,
    pub queued: u64,
    pub in_flight: u64,
    pub write_time: HistogramSnapshot,
    pub handshake_time: HistogramSnapshot,
    pub layer_time: HistogramSnapshot,
}

/// A decode's requests by what became of them, as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestStats {
    pub started: u64,
    pub done: u64,
    pub failed: u64,
    pub aborted: u64,
    pub revoked: u64,
    pub expired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn samples_land_in_their_power_of_two_bucket() {
        let h = Histogram::default();
        for ns in [0u64, 1, 2, 3, 4, 1023, 1024, 1_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 8);
        assert_eq!(s.sum, Duration::from_nanos(1 + 2 + 3 + 4 + 1023 + 1024 + 1_000_000));
        let at = |bound_ns: u64| s.buckets.iter().find(|(b, _)| *b == Duration::from_nanos(bound_ns)).map_or(0, |(_, c)| *c);
        // [0, 1): 0; [1, 2): 1; [2, 4): 2 and 3; [4, 8): 4; [512, 1024): 1023; [1024, 2048): 1024; 1 ms: [2^19, 2^20).
        assert_eq!((at(1), at(2), at(4), at(8), at(1024), at(2048), at(1 << 20)), (1, 1, 2, 1, 1, 1, 1));
        assert_eq!(s.buckets.last().unwrap().0, Duration::from_nanos(1 << 20), "nothing past the last sample");
        // A duration past u64 nanoseconds goes to the last bucket.
        h.record(Duration::MAX);
        assert_eq!(h.snapshot().buckets.len(), BUCKETS);
    }

    #[test]
    fn quantiles_are_bounded_by_their_bucket() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile_bound(0.5), None);
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        let s = h.snapshot();
        // 10 µs is in [8.192, 16.384) µs; 5 ms in [4.194, 8.389) ms.
        assert_eq!(s.quantile_bound(0.5), Some(Duration::from_nanos(16_384)));
        assert_eq!(s.quantile_bound(0.99), Some(Duration::from_nanos(16_384)));
        assert_eq!(s.quantile_bound(1.0), Some(Duration::from_nanos(1 << 23)));
    }

    #[test]
    fn counts_from_many_threads_add_up_exactly() {
        let (c, h) = (Arc::new(Counter::default()), Arc::new(Histogram::default()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, h) = (c.clone(), h.clone());
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        c.add(3);
                        h.record(Duration::from_nanos(i));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 4 * 10_000 * 3);
        let s = h.snapshot();
        assert_eq!(s.count, 40_000);
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 40_000);
        assert_eq!(s.sum, Duration::from_nanos(4 * (0..10_000u64).sum::<u64>()));
    }

    #[test]
    fn past_the_limit_an_idle_peer_makes_room_and_else_newcomers_are_counted_together() {
        let m = Instruments::new(Role::Prefill);
        // Every peer held (as a connection holds its instruments), but the first.
        let mut held: Vec<Arc<PeerInstruments>> = (0..MAX_PEERS).map(|i| m.peer(&format!("10.0.0.{i}:1"))).collect();
        held.iter().for_each(|p| p.writes.add(1));
        held.remove(0);
        // The idle one goes for the newcomer.
        m.peer("new:1").writes.add(7);
        let s = m.snapshot(Levels::default());
        assert_eq!(s.peers.len(), MAX_PEERS);
        assert!(s.peers.iter().all(|p| p.peer != "10.0.0.0:1"), "the idle peer was forgotten");
        assert_eq!(s.peers.iter().find(|p| p.peer == "new:1").unwrap().writes, 7);
        // Now every one is held: newcomers are counted together.
        let newcomer = m.peer("new:1");
        for i in 0..5 {
            m.peer(&format!("late-{i}:1")).writes.add(1);
        }
        let s = m.snapshot(Levels::default());
        assert_eq!(s.peers.len(), MAX_PEERS + 1);
        assert_eq!(s.peers.iter().find(|p| p.peer == OTHER_PEERS).unwrap().writes, 5);
        // Once peers let go, a newcomer gets a place of its own again, and there is still one `other`.
        drop((newcomer, held));
        m.peer("later:1").writes.add(2);
        let s = m.snapshot(Levels::default());
        assert_eq!(s.peers.iter().filter(|p| p.peer == OTHER_PEERS).count(), 1);
        assert_eq!(s.peers.iter().find(|p| p.peer == "later:1").map(|p| p.writes), Some(2));
        assert_eq!(s.peers.len(), MAX_PEERS + 1);
    }

    #[test]
    fn a_snapshot_count_always_equals_its_buckets() {
        let h = Arc::new(Histogram::default());
        let writer = {
            let h = h.clone();
            std::thread::spawn(move || (0..200_000u64).for_each(|i| h.record(Duration::from_nanos(i % 5000))))
        };
        while !writer.is_finished() {
            let s = h.snapshot();
            assert_eq!(s.count, s.buckets.iter().map(|(_, n)| n).sum::<u64>());
        }
        writer.join().unwrap();
    }

    #[test]
    fn failures_are_counted_by_code_and_refusals_by_reason() {
        let m = Instruments::new(Role::Decode);
        let p = m.peer("a");
        p.failed(ErrorCode::Revoked);
        p.failed(ErrorCode::Revoked);
        p.failed(ErrorCode::Unreachable);
        m.refused(Refusal::of(ErrorCode::Unauthenticated));
        m.refused(Refusal::Limit);
        let s = m.snapshot(Levels { requests_held: 3, ..Levels::default() });
        assert_eq!(s.peers[0].failures, vec![(ErrorCode::Revoked, 2), (ErrorCode::Unreachable, 1)]);
        let refused = |r| s.refusals.iter().find(|(x, _)| *x == r).unwrap().1;
        assert_eq!((refused(Refusal::Authentication), refused(Refusal::Limit), refused(Refusal::Mismatch)), (1, 1, 0));
        assert_eq!(s.requests_held, 3);
    }
}
