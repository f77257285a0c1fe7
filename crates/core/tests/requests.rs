//! Requests on TCP and shared memory, or over RDMA where a device is given (`KVTRANSFER_TEST_RDMA_NIC`, as in
//! the Soft-RoCE VM): notifications that never come before their bytes, waits per layer, abort, a prefill that
//! goes away, revocation with a writer still running, and a decode's close during writes.

mod common;

use common::{config, kinds, Cache};
use kvtransfer::communicator::{Notification, RequestId, Status};
use kvtransfer::memory::CacheSpec;
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportKind};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";

fn decode(cache: CacheSpec, kind: TransportKind) -> Arc<Communicator> {
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 };
    Arc::new(Communicator::new(spec, config(kind)).unwrap())
}

fn prefill(cache: CacheSpec, kind: TransportKind) -> Arc<Communicator> {
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 };
    Arc::new(Communicator::new(spec, config(kind)).unwrap())
}

fn id(s: &str) -> RequestId {
    RequestId::new(s).unwrap()
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_notification_never_comes_before_its_bytes() {
    for kind in kinds() {
        // Every request writes other source blocks into the same decode blocks: a notification that came before
        // its bytes would find the previous request's bytes there.
        let src = Arc::new(Cache::new(2, 2, 256, 4096, 1));
        let dst = Arc::new(Cache::new(2, 2, 64, 4096, 2));
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        let remote: Vec<u32> = (0..32).map(|i| (i * 5) % 64).collect();
        let local_of = |k: u32| -> Vec<u32> { (0..32).map(|i| (k * 32 + i * 3) % 256).collect() };
        let (checked_tx, checked) = mpsc::channel::<(Notification, bool)>();
        // The engine's side: each notification is checked the moment it is handed over.
        fn take(d: Arc<Communicator>, src: Arc<Cache>, dst: Arc<Cache>, tx: mpsc::Sender<(Notification, bool)>) {
            let (d2, s2, t2, tx2) = (d.clone(), src.clone(), dst.clone(), tx.clone());
            d.next_notifications_then(move |batch| {
                if batch.is_empty() {
                    return; // closed
                }
                for n in batch {
                    let k: u32 = n.request_id.trim_start_matches("req-").parse().unwrap();
                    let layer = n.layer.unwrap() as usize;
                    let local: Vec<u32> = (0..32).map(|i| (k * 32 + i * 3) % 256).collect();
                    let intact = (0..2).all(|t| n.block_ids.iter().zip(&local).all(|(&r, &l)| t2.block(t, layer, r) == s2.block(t, layer, l)));
                    let _ = tx2.send((n, intact));
                }
                take(d2, s2, t2, tx2);
            });
        }
        take(d.clone(), src.clone(), dst.clone(), checked_tx);
        for k in 0..16u32 {
            let request = id(&format!("req-{k}"));
            for layer in 0..2 {
                p.write_request(HOST, d.port(), &local_of(k), &remote, layer, Some(&request)).unwrap();
                let (n, intact) = checked.recv_timeout(WAIT).unwrap();
                assert!(intact, "{kind}: the notification for {} layer {layer} came before its bytes", n.request_id);
                assert_eq!((n.request_id.as_str(), n.layer, n.status), (request.as_str(), Some(layer), Status::Done));
                assert_eq!(n.block_ids, remote);
                assert!(n.peer.contains("prefill tp 0/1"), "{}", n.peer);
            }
            d.wait_for(&request, None, WAIT).unwrap();
        }
        // A write without a request id says nothing.
        p.write_cache(HOST, d.port(), &[1], &[1], 0).unwrap();
        assert!(checked.recv_timeout(Duration::from_millis(300)).is_err(), "{kind}");
    }
}

#[test]
fn waits_per_layer_and_many_requests_in_flight() {
    for kind in kinds() {
        let src = Cache::new(2, 4, 256, 1024, 3);
        let dst = Cache::new(2, 4, 256, 1024, 4);
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        // Streaming: the decode waits for layer 0 alone while the rest is not written yet.
        let r = id("stream");
        let (d2, r2) = (d.clone(), r.clone());
        let layer0 = std::thread::spawn(move || d2.wait_for(&r2, Some(vec![0]), WAIT));
        p.write_request(HOST, d.port(), &[0, 1], &[10, 11], 0, Some(&r)).unwrap();
        layer0.join().unwrap().unwrap();
        let err = d.wait_for(&r, Some(vec![1]), Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout, "{kind}");
        assert_eq!(d.wait_for(&r, Some(vec![9]), WAIT).unwrap_err().code(), ErrorCode::InvalidArgument);
        for layer in 1..4 {
            p.write_request(HOST, d.port(), &[0, 1], &[10, 11], layer, Some(&r)).unwrap();
        }
        d.wait_for(&r, None, WAIT).unwrap();
        // 32 requests, 4 layers each, queued on the peer's thread all at once.
        let (tx, rx) = mpsc::channel();
        for k in 0..32u32 {
            for layer in 0..4 {
                let tx = tx.clone();
                p.write_cache_then(HOST, d.port(), vec![k * 2, k * 2 + 1], vec![100 + k * 2, 101 + k * 2], layer, Some(id(&format!("many-{k}"))), None, move |r| {
                    tx.send(r).unwrap()
                });
            }
        }
        for k in 0..32u32 {
            d.wait_for(&id(&format!("many-{k}")), None, WAIT).unwrap();
        }
        for _ in 0..128 {
            rx.recv_timeout(WAIT).unwrap().unwrap();
        }
        for k in 0..64 {
            assert_eq!(dst.block(1, 3, 100 + k), src.block(1, 3, k), "{kind}");
        }
        // A write cancelled before it starts moves nothing.
        let cancel = Arc::new(kvtransfer::communicator::Cancel::default());
        assert!(cancel.cancel());
        let (tx, rx) = mpsc::channel();
        p.write_cache_then(HOST, d.port(), vec![5], vec![200], 0, Some(id("cancelled")), Some(cancel), move |r| tx.send(r).unwrap());
        assert_eq!(rx.recv_timeout(WAIT).unwrap().unwrap_err().code(), ErrorCode::Aborted);
        assert_ne!(dst.block(0, 0, 200), src.block(0, 0, 5));
    }
}

#[test]
fn abort_and_a_prefill_that_goes_away_reach_the_waiting_decode() {
    for kind in kinds() {
        let src = Cache::new(2, 2, 16, 1024, 5);
        let dst = Cache::new(2, 2, 16, 1024, 6);
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        let (tx, notes) = mpsc::channel();
        let tx2 = tx.clone();
        d.next_notifications_then(move |b| tx.send(b).unwrap());
        // Abort.
        let r = id("to-abort");
        p.write_request(HOST, d.port(), &[1], &[2], 0, Some(&r)).unwrap();
        let (d2, r2) = (d.clone(), r.clone());
        let waiting = std::thread::spawn(move || d2.wait_for(&r2, None, WAIT));
        std::thread::sleep(Duration::from_millis(100));
        p.abort_request(HOST, d.port(), &r, "the client went away").unwrap();
        let err = waiting.join().unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::Aborted, "{kind}: {err}");
        assert!(err.message().contains("the client went away"), "{err}");
        let err = p.write_request(HOST, d.port(), &[1], &[2], 1, Some(&r)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Aborted);
        let mut seen: Vec<Notification> = notes.recv_timeout(WAIT).unwrap();
        while !seen.iter().any(|n| n.status == Status::Aborted) {
            d.next_notifications_then({
                let tx = tx2.clone();
                move |b| tx.send(b).unwrap()
            });
            seen.extend(notes.recv_timeout(WAIT).unwrap());
        }
        assert_eq!(seen.iter().map(|n| n.status).collect::<Vec<_>>(), [Status::Done, Status::Aborted], "{kind}");
        // A prefill that goes away in the middle of a request: the wait ends at once, not at its timeout.
        let r = id("orphan");
        p.write_request(HOST, d.port(), &[1], &[2], 0, Some(&r)).unwrap();
        let (d2, r2) = (d.clone(), r.clone());
        let started = Instant::now();
        let waiting = std::thread::spawn(move || d2.wait_for(&r2, None, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(100));
        drop(p);
        let err = waiting.join().unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::Transport, "{kind}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{kind}: took {:?}", started.elapsed());
        // The decode goes on serving a new prefill.
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        p.write_request(HOST, d.port(), &[3], &[4], 0, Some(&id("next"))).unwrap();
        d.wait_for(&id("next"), Some(vec![0]), WAIT).unwrap();
    }
}

/// Writes `request` into decode blocks 0..64 of layer 0 over and over, alternating source blocks 0..64 and
/// 64..128 so that every write changes the bytes, until a write fails; returns that failure and how many writes
/// succeeded.
fn keep_writing(p: Arc<Communicator>, port: u16, request: RequestId) -> std::thread::JoinHandle<(kvtransfer::Error, usize)> {
    std::thread::spawn(move || {
        let remote: Vec<u32> = (0..64).collect();
        let mut n = 0;
        loop {
            let local: Vec<u32> = (0..64).map(|b| b + 64 * (n as u32 % 2)).collect();
            match p.write_request(HOST, port, &local, &remote, 0, Some(&request)) {
                Ok(()) => n += 1,
                Err(e) => return (e, n),
            }
        }
    })
}

#[test]
fn after_revoke_returns_nothing_of_the_request_lands() {
    for kind in kinds() {
        let src = Cache::new(2, 1, 128, 64 * 1024, 7);
        let dst = Cache::new(2, 1, 128, 64 * 1024, 8);
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        let writer = keep_writing(p.clone(), d.port(), id("stale"));
        std::thread::sleep(Duration::from_millis(200));
        d.revoke(&id("stale")).unwrap();
        // The last block a write fills, copied at once (a whole snapshot takes longer than a write).
        let last = dst.block(1, 0, 63).to_vec();
        let after = dst.snapshot();
        let (err, writes) = writer.join().unwrap();
        assert_eq!(err.code(), ErrorCode::Revoked, "{kind}: {err}");
        assert!(writes > 0, "{kind}: the writer never wrote");
        assert_eq!(d.wait_for(&id("stale"), None, WAIT).unwrap_err().code(), ErrorCode::Revoked);
        std::thread::sleep(Duration::from_millis(200));
        assert!(dst.block(1, 0, 63) == last && dst.snapshot() == after, "{kind}: bytes changed after revoke returned");
        // Other requests go on; the revoked one stays refused, also after the link is rebuilt.
        p.write_request(HOST, d.port(), &[1], &[100], 0, Some(&id("fresh"))).unwrap();
        d.wait_for(&id("fresh"), None, WAIT).unwrap();
        let p2 = prefill(src.spec(), kind);
        p2.connect(HOST, d.port(), 1).unwrap();
        let err = p2.write_request(HOST, d.port(), &[1], &[1], 0, Some(&id("stale"))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Revoked, "{kind}: a new link must learn the revoked requests");
        assert!(dst.snapshot() != after, "the fresh write landed");
    }
}

#[test]
fn after_a_decode_closes_nothing_lands() {
    for kind in kinds() {
        let src = Cache::new(2, 1, 128, 64 * 1024, 9);
        let dst = Cache::new(2, 1, 64, 64 * 1024, 10);
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        let writer = keep_writing(p.clone(), d.port(), id("busy"));
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        d.close().unwrap();
        let last = dst.block(1, 0, 63).to_vec();
        assert!(started.elapsed() < Duration::from_secs(4), "{kind}: close took {:?}", started.elapsed());
        let after = dst.snapshot();
        let (err, writes) = writer.join().unwrap();
        assert!(writes > 0);
        assert!(matches!(err.code(), ErrorCode::NotConnected | ErrorCode::Unreachable | ErrorCode::Transport | ErrorCode::Timeout | ErrorCode::Rejected), "{kind}: {err}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(dst.block(1, 0, 63) == last && dst.snapshot() == after, "{kind}: bytes changed after close returned");
    }
}

#[test]
fn a_prefill_close_waits_for_its_write_in_flight() {
    for kind in kinds() {
        let src = Cache::new(2, 1, 128, 256 * 1024, 11);
        let dst = Cache::new(2, 1, 64, 256 * 1024, 12);
        let d = decode(dst.spec(), kind);
        let p = prefill(src.spec(), kind);
        p.connect(HOST, d.port(), 1).unwrap();
        let writer = keep_writing(p.clone(), d.port(), id("closing"));
        std::thread::sleep(Duration::from_millis(100));
        p.close().unwrap();
        let last = dst.block(1, 0, 63).to_vec();
        let after = dst.snapshot();
        let (err, _) = writer.join().unwrap();
        assert_eq!(err.code(), ErrorCode::Closed, "{kind}: {err}");
        assert!(dst.block(1, 0, 63) == last && dst.snapshot() == after, "{kind}: a write went on after the prefill's close returned");
    }
}

#[test]
fn a_link_that_opens_after_many_revokes_learns_them_at_once() {
    for kind in kinds() {
        let src = Cache::new(2, 1, 8, 1024, 13);
        let dst = Cache::new(2, 1, 8, 1024, 14);
        let d = decode(dst.spec(), kind);
        for i in 0..20_000 {
            d.revoke(&id(&format!("revoked-with-a-long-name-{i:08}"))).unwrap();
        }
        let p = prefill(src.spec(), kind);
        let started = Instant::now();
        p.connect(HOST, d.port(), 1).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "{kind}: connect took {:?}", started.elapsed());
        let err = p.write_request(HOST, d.port(), &[1], &[1], 0, Some(&id("revoked-with-a-long-name-00019999"))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Revoked, "{kind}");
    }
}

#[test]
fn with_two_prefill_ranks_a_layer_arrives_once_both_slices_have() {
    for kind in kinds() {
        // Prefill TP 2 into decode TP 1: each decode block holds two slices, one per rank.
        let dst = Cache::new(2, 2, 8, 2048, 15);
        let d = decode(dst.spec(), kind);
        let ranks: Vec<(Cache, Arc<Communicator>)> = (0..2)
            .map(|rank| {
                let src = Cache::new(2, 2, 8, 1024, 16 + rank as u8);
                let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(src.spec()), tp_size: 2, tp_idx: rank };
                // The two ranks of one prefill instance own its requests together.
                let p = Arc::new(Communicator::new(spec, Config { instance_id: Some("engine-a".into()), ..config(kind) }).unwrap());
                p.connect(HOST, d.port(), 1).unwrap();
                (src, p)
            })
            .collect();
        let r = id("hetero");
        for layer in 0..2 {
            ranks[0].1.write_request(HOST, d.port(), &[1], &[3], layer, Some(&r)).unwrap();
        }
        let err = d.wait_for(&r, Some(vec![0]), Duration::from_millis(300)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout, "{kind}: one slice of two is not the layer");
        // Rank 0 has written every layer of its slice: its link ending does not fail the request.
        let (_, rank0) = &ranks[0];
        rank0.close().unwrap();
        ranks[1].1.write_request(HOST, d.port(), &[1], &[3], 0, Some(&r)).unwrap();
        d.wait_for(&r, Some(vec![0]), WAIT).unwrap();
        // An empty write still says the layer is written (it has no blocks here).
        ranks[1].1.write_request(HOST, d.port(), &[], &[], 1, Some(&r)).unwrap();
        d.wait_for(&r, None, WAIT).unwrap();
        assert_eq!(&dst.block(1, 0, 3)[..1024], ranks[0].0.block(1, 0, 1));
        assert_eq!(&dst.block(1, 0, 3)[1024..], ranks[1].0.block(1, 0, 1));
    }
}

#[test]
fn a_prefill_that_closes_right_after_its_last_write_still_completes_the_request() {
    for kind in kinds() {
        let src = Cache::new(2, 2, 8, 1024, 19);
        let dst = Cache::new(2, 2, 8, 1024, 20);
        let d = decode(dst.spec(), kind);
        for round in 0..10 {
            let p = prefill(src.spec(), kind);
            p.connect(HOST, d.port(), 1).unwrap();
            let r = id(&format!("last-{round}"));
            for layer in 0..2 {
                p.write_request(HOST, d.port(), &[1], &[2], layer, Some(&r)).unwrap();
            }
            // The notifications queued before the close go out before it returns.
            p.close().unwrap();
            drop(p);
            d.wait_for(&r, None, WAIT).unwrap_or_else(|e| panic!("{kind} round {round}: {e}"));
        }
    }
}

/// Every notification of `d` from now on, one at a time.
fn every_notification(d: &Arc<Communicator>) -> mpsc::Receiver<Notification> {
    fn take(d: Arc<Communicator>, tx: mpsc::Sender<Notification>) {
        d.clone().next_notifications_then(move |batch| {
            // An empty batch: the decode closed.
            if !batch.is_empty() && batch.into_iter().all(|n| tx.send(n).is_ok()) {
                take(d, tx);
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    take(d.clone(), tx);
    rx
}

fn rank(cache: CacheSpec, kind: TransportKind, tp_size: u32, tp_idx: u32, instance: Option<&str>) -> Arc<Communicator> {
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size, tp_idx };
    Arc::new(Communicator::new(spec, Config { instance_id: instance.map(str::to_string), ..config(kind) }).unwrap())
}

#[test]
fn a_request_belongs_to_the_prefill_that_started_it() {
    for kind in kinds() {
        let src = Cache::new(2, 2, 8, 2048, 21);
        let half = Cache::new(2, 2, 8, 1024, 22);
        let dst = Cache::new(2, 2, 8, 2048, 23);
        let d = decode(dst.spec(), kind);
        let notes = every_notification(&d);
        let owner = prefill(src.spec(), kind);
        owner.connect(HOST, d.port(), 1).unwrap();
        // Another prefill that knows the id (the same token, were there one), and a ratio-2 rank of a third.
        let other = prefill(src.spec(), kind);
        other.connect(HOST, d.port(), 1).unwrap();
        let hijacker = rank(half.spec(), kind, 2, 1, Some("engine-h"));
        hijacker.connect(HOST, d.port(), 1).unwrap();
        let r = id("owned");
        owner.write_request(HOST, d.port(), &[1], &[3], 0, Some(&r)).unwrap();
        assert_eq!(notes.recv_timeout(WAIT).unwrap().layer, Some(0));
        // The other writes layer 1 (its bytes land: RDMA is one-sided) and aborts; the hijacker writes its half.
        other.write_request(HOST, d.port(), &[2], &[4], 1, Some(&r)).unwrap();
        other.write_request(HOST, d.port(), &[], &[], 1, Some(&r)).unwrap();
        hijacker.write_request(HOST, d.port(), &[1], &[3], 1, Some(&r)).unwrap();
        other.abort_request(HOST, d.port(), &r, "not mine").unwrap();
        let err = d.wait_for(&r, None, Duration::from_millis(500)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout, "{kind}: the request is neither complete nor aborted: {err}");
        assert!(notes.try_recv().is_err(), "{kind}: nothing was said of their writes");
        // The owner's link was not cut off: it completes the request, and the others serve requests of their own.
        owner.write_request(HOST, d.port(), &[1], &[4], 1, Some(&r)).unwrap();
        d.wait_for(&r, None, WAIT).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(dst.block(1, 1, 4), src.block(1, 1, 1), "{kind}");
        other.write_request(HOST, d.port(), &[2], &[5], 0, Some(&id("theirs"))).unwrap();
        d.wait_for(&id("theirs"), Some(vec![0]), WAIT).unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

#[test]
fn a_hetero_request_whose_other_rank_never_writes_expires() {
    for kind in kinds() {
        let dst = Cache::new(2, 2, 8, 2048, 24);
        let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(dst.spec()), tp_size: 1, tp_idx: 0 };
        let d = Arc::new(Communicator::new(spec, Config { request_ttl: Duration::from_secs(1), ..config(kind) }).unwrap());
        let notes = every_notification(&d);
        let src = Cache::new(2, 2, 8, 1024, 25);
        // A rank that writes one slice of each block must share an instance id with the others, for requests.
        let anonymous = rank(src.spec(), kind, 2, 1, None);
        anonymous.connect(HOST, d.port(), 1).unwrap();
        let err = anonymous.write_request(HOST, d.port(), &[1], &[2], 0, Some(&id("anonymous"))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{kind}: {err}");
        assert!(err.message().contains("instanceId"), "{err}");
        anonymous.write_cache(HOST, d.port(), &[1], &[2], 0).unwrap();
        let rank0 = rank(src.spec(), kind, 2, 0, Some("engine-b"));
        rank0.connect(HOST, d.port(), 1).unwrap();
        let r = id("half");
        let started = Instant::now();
        for layer in 0..2 {
            rank0.write_request(HOST, d.port(), &[1], &[2], layer, Some(&r)).unwrap();
        }
        let err = d.wait_for(&r, None, WAIT).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Expired, "{kind}: {err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "{kind}: expired after {took:?}");
        let expired = std::iter::from_fn(|| notes.recv_timeout(WAIT).ok()).find(|n| n.status == Status::Expired).unwrap();
        assert_eq!(expired.request_id, "half");
        assert!(expired.reason.as_deref().unwrap().contains("KVCACHE_REQUEST_TTL_MS"), "{expired:?}");
    }
}
