//! `stats()` counts what happened, exactly, on both sides: writes, blocks and bytes (the decode's from the
//! prefill's notifications), requests by what became of them, failures by code, connections, refusals by
//! reason, and one histogram sample per write, per layer and per handshake. On TCP and shared memory, or over
//! RDMA where a device is given (`KVTRANSFER_TEST_RDMA_NIC`).

mod common;

use common::{kinds, Cache};
use kvtransfer::communicator::RequestId;
use kvtransfer::memory::CacheSpec;
use kvtransfer::metrics::{PeerStats, Refusal, Stats};
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, Setting, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";

/// The suite's configuration: no reconnect attempts (a refused connect is counted once).
fn config(kind: TransportKind) -> Config {
    Config { reconnect: kvtransfer::Reconnect { retries: 0, backoff: Duration::ZERO }, ..common::config(kind) }
}

fn communicator(role: Role, cache: CacheSpec, config: Config) -> Arc<Communicator> {
    let spec = CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 };
    Arc::new(Communicator::new(spec, config).unwrap())
}

fn id(s: &str) -> RequestId {
    RequestId::new(s).unwrap()
}

fn peer<'s>(stats: &'s Stats, name: &str) -> &'s PeerStats {
    stats.peers.iter().find(|p| p.peer == name).unwrap_or_else(|| panic!("no peer {name} in {stats:#?}"))
}

fn failures(p: &PeerStats, code: ErrorCode) -> u64 {
    p.failures.iter().find(|(c, _)| *c == code).map_or(0, |(_, n)| *n)
}

/// Polls `f` until it holds (the decode counts on its channel's thread, after the prefill's call returned).
fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn counters_equal_what_was_written_on_both_sides() {
    const LAYERS: usize = 3;
    const BLOCK_BYTES: u64 = 2048;
    for kind in kinds() {
        let src = Cache::new(2, LAYERS, 64, BLOCK_BYTES, 1);
        let dst = Cache::new(2, LAYERS, 64, BLOCK_BYTES, 2);
        let d = communicator(Role::Decode, dst.spec(), config(kind));
        let p = communicator(Role::Prefill, src.spec(), config(kind));
        let key = format!("{HOST}:{}", d.port());
        p.connect(HOST, d.port(), 1).unwrap();
        // Two requests of every layer, 7 blocks a write; then 4 writes without a request (the decode cannot see them).
        for (r, request) in ["a", "b"].iter().enumerate() {
            for layer in 0..LAYERS as u32 {
                let local: Vec<u32> = (0..7).map(|i| (r as u32 * 7 + i) * 2).collect();
                let remote: Vec<u32> = (0..7).map(|i| r as u32 * 7 + i).collect();
                p.write_request(HOST, d.port(), &local, &remote, layer, Some(&id(request))).unwrap();
            }
        }
        for i in 0..4 {
            p.write_cache(HOST, d.port(), &[i], &[40 + i], 0).unwrap();
        }
        d.wait_for(&id("b"), None, Duration::from_secs(10)).unwrap();
        let block = 2 * BLOCK_BYTES;

        let s = p.stats();
        assert_eq!(s.role, Role::Prefill);
        let ours = peer(&s, &key);
        assert_eq!(ours.transport, Some(kind), "{kind}");
        assert_eq!((ours.writes, ours.blocks, ours.bytes), (10, 46, 46 * block), "{kind}");
        assert_eq!((ours.connects, ours.reconnects), (1, 0), "{kind}");
        assert_eq!((ours.write_time.count, ours.handshake_time.count), (10, 1), "{kind}");
        assert_eq!(ours.write_time.buckets.iter().map(|(_, n)| n).sum::<u64>(), 10, "{kind}");
        assert!(ours.failures.is_empty(), "{kind}: {:?}", ours.failures);
        let by_transport: Vec<(TransportKind, u64, u64)> = s.transports.iter().filter(|t| t.writes > 0).map(|t| (t.transport, t.writes, t.bytes)).collect();
        assert_eq!(by_transport, [(kind, 10, 46 * block)], "{kind}");
        assert_eq!((ours.queued, ours.in_flight), (0, 0), "{kind}");

        // The decode counts the requests' layers from their notifications, by the prefill's host.
        until("the decode counts both requests", || peer(&d.stats(), HOST).requests.done == 2);
        let s = d.stats();
        assert_eq!(s.role, Role::Decode);
        let theirs = peer(&s, HOST);
        assert_eq!(theirs.transport, Some(kind), "{kind}");
        assert_eq!((theirs.writes, theirs.blocks, theirs.bytes), (6, 42, 42 * block), "{kind}");
        assert_eq!(theirs.connects, 1, "{kind}");
        let by_transport: Vec<(TransportKind, u64, u64)> = s.transports.iter().filter(|t| t.writes > 0).map(|t| (t.transport, t.blocks, t.bytes)).collect();
        assert_eq!(by_transport, [(kind, 42, 42 * block)], "{kind}");
        assert_eq!((theirs.requests.started, theirs.requests.done, theirs.requests.failed), (2, 2, 0), "{kind}");
        assert_eq!(theirs.layer_time.count, 2 * LAYERS as u64, "{kind}");
        assert!(s.refusals.iter().all(|(_, n)| *n == 0), "{kind}: {:?}", s.refusals);
        assert_eq!(s.requests_held, 2, "{kind}");
        p.close().unwrap();
        d.close().unwrap();
        // Still readable after close.
        assert_eq!(peer(&p.stats(), &key).writes, 10, "{kind}");
    }
}

#[test]
fn failures_are_counted_by_code_and_requests_by_their_end() {
    for kind in kinds() {
        let src = Cache::new(2, 2, 16, 1024, 1);
        let dst = Cache::new(2, 2, 16, 1024, 2);
        let d = communicator(Role::Decode, dst.spec(), config(kind));
        let p = communicator(Role::Prefill, src.spec(), config(kind));
        let key = format!("{HOST}:{}", d.port());
        // Before any connection: counted against the address the call named.
        assert_eq!(p.write_cache(HOST, d.port(), &[0], &[0], 0).unwrap_err().code(), ErrorCode::NotConnected);
        p.connect(HOST, d.port(), 1).unwrap();
        // A refused call: block 99 of 16.
        assert_eq!(p.write_cache(HOST, d.port(), &[99], &[0], 0).unwrap_err().code(), ErrorCode::InvalidArgument);
        // An aborted request, then a write of it.
        p.write_request(HOST, d.port(), &[1], &[1], 0, Some(&id("aborted"))).unwrap();
        p.abort_request(HOST, d.port(), &id("aborted"), "test").unwrap();
        assert_eq!(p.write_request(HOST, d.port(), &[1], &[1], 1, Some(&id("aborted"))).unwrap_err().code(), ErrorCode::Aborted);
        // A revoked request, then a write of it.
        p.write_request(HOST, d.port(), &[2], &[2], 0, Some(&id("revoked"))).unwrap();
        // Revoked once the decode has seen it start (a revoke before that leaves nothing to count).
        until("the decode sees the request start", || peer(&d.stats(), HOST).requests.started == 2);
        d.revoke(&id("revoked")).unwrap();
        assert_eq!(p.write_request(HOST, d.port(), &[2], &[2], 1, Some(&id("revoked"))).unwrap_err().code(), ErrorCode::Revoked);

        let s = p.stats();
        let ours = peer(&s, &key);
        let by_code: Vec<u64> = [ErrorCode::NotConnected, ErrorCode::InvalidArgument, ErrorCode::Aborted, ErrorCode::Revoked]
            .iter()
            .map(|&c| failures(ours, c))
            .collect();
        assert_eq!(by_code, [1, 1, 1, 1], "{kind}: {:?}", ours.failures);
        assert_eq!(ours.writes, 2, "{kind}: only the writes that moved their bytes");
        // Every call that reached the peer took a sample, the failed ones too (not the one before the connection).
        assert_eq!(ours.write_time.count, 5, "{kind}");

        until("the decode counts the abort", || peer(&d.stats(), HOST).requests.aborted == 1);
        let s = d.stats();
        let theirs = peer(&s, HOST);
        assert_eq!((theirs.requests.started, theirs.requests.aborted, theirs.requests.revoked, theirs.requests.done), (2, 1, 1, 0), "{kind}");
        assert_eq!((s.revokes, s.revoke_cutoffs), (1, 0), "{kind}");
        p.close().unwrap();
        d.close().unwrap();
    }
}

#[test]
fn a_request_nobody_finishes_is_counted_expired_and_a_link_that_ends_fails_its_requests() {
    let kind = kinds()[0];
    let src = Cache::new(2, 2, 16, 1024, 1);
    let dst = Cache::new(2, 2, 16, 1024, 2);
    let d = communicator(Role::Decode, dst.spec(), Config { request_ttl: Duration::from_millis(200), ..config(kind) });
    let p = communicator(Role::Prefill, src.spec(), config(kind));
    p.connect(HOST, d.port(), 1).unwrap();
    p.write_request(HOST, d.port(), &[1], &[1], 0, Some(&id("stalls"))).unwrap();
    until("the request expires", || peer(&d.stats(), HOST).requests.expired == 1);
    p.write_request(HOST, d.port(), &[2], &[2], 0, Some(&id("orphan"))).unwrap();
    p.close().unwrap();
    until("the link's end fails its request", || peer(&d.stats(), HOST).requests.failed == 1);
    d.close().unwrap();
}

#[test]
fn refusals_are_counted_by_reason() {
    let kind = kinds()[0];
    let token = |t: &str| Config::load_from(|_| None, &[(Setting::AuthToken, t.repeat(8).as_str().into())]).unwrap().auth_token;
    let dst = Cache::new(2, 2, 16, 1024, 2);
    let d = communicator(Role::Decode, dst.spec(), Config { auth_token: token("right"), ..config(kind) });
    // A stranger without the token (one with another token refuses the decode first: it never says hello); a
    // prefill whose cache has another block size.
    let stranger = communicator(Role::Prefill, Cache::new(2, 2, 16, 1024, 1).spec(), config(kind));
    assert_eq!(stranger.connect(HOST, d.port(), 1).unwrap_err().code(), ErrorCode::Unauthenticated);
    let misfit = communicator(Role::Prefill, Cache::new(2, 2, 16, 512, 1).spec(), Config { auth_token: token("right"), ..config(kind) });
    assert_eq!(misfit.connect(HOST, d.port(), 1).unwrap_err().code(), ErrorCode::InvalidArgument);
    let s = d.stats();
    let refused = |r: Refusal| s.refusals.iter().find(|(x, _)| *x == r).unwrap().1;
    assert_eq!((refused(Refusal::Authentication), refused(Refusal::Mismatch), refused(Refusal::Address)), (1, 1, 0));
    assert!(s.peers.is_empty(), "nobody admitted: {:?}", s.peers);
    // The prefills count their failed connects against the address they dialed.
    let key = format!("{HOST}:{}", d.port());
    assert_eq!(failures(peer(&stranger.stats(), &key), ErrorCode::Unauthenticated), 1);
    assert_eq!(failures(peer(&misfit.stats(), &key), ErrorCode::InvalidArgument), 1);
}
