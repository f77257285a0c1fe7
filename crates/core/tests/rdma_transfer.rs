//! End-to-end transfers over the RDMA transport between communicators of one process.
//!
//! These need an RDMA device: set `KVTRANSFER_TEST_RDMA_NIC` (and `KVTRANSFER_TEST_RDMA_GID_INDEX`, default
//! 1 as on Soft-RoCE) to run them; `.ci/run` runs them inside a Soft-RoCE VM. Without it each test says it
//! skipped.

mod common;

use common::Cache;
use kvtransfer::memory::CacheSpec;
use kvtransfer::transport::rdma;
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportChoice, TransportKind};
use std::time::Duration;

/// The device to test on, or `None` (and a message) where there is none.
fn nic(test: &str) -> Option<String> {
    match std::env::var("KVTRANSFER_TEST_RDMA_NIC") {
        Ok(n) if !n.is_empty() => Some(n),
        _ => {
            eprintln!("SKIPPED {test}: no RDMA device given (set KVTRANSFER_TEST_RDMA_NIC, e.g. rxe0)");
            None
        }
    }
}

fn gid_index() -> u32 {
    std::env::var("KVTRANSFER_TEST_RDMA_GID_INDEX").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn rdma_config(nic: &str) -> Config {
    Config {
        transport: TransportChoice::Only(TransportKind::Rdma),
        rdma_nics: vec![nic.to_string()],
        gid_index: gid_index(),
        timeouts: kvtransfer::Timeouts::all(Duration::from_secs(20)),
        ..Config::default()
    }
}

fn decode(cache: CacheSpec, config: Config) -> Communicator {
    Communicator::new(CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 }, config).unwrap()
}

fn prefill(cache: CacheSpec, tp_size: u32, tp_idx: u32, config: Config) -> Communicator {
    Communicator::new(CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size, tp_idx }, config).unwrap()
}

#[test]
fn all_layers_scattered_and_contiguous_with_and_without_flush() {
    let Some(nic) = nic("all_layers_scattered_and_contiguous_with_and_without_flush") else { return };
    for flush in [false, true] {
        let src = Cache::new(2, 3, 64, 1024, 1);
        let dst = Cache::new(2, 3, 80, 1024, 2);
        let config = Config { gdrcopy_flush: flush, ..rdma_config(&nic) };
        let d = decode(dst.spec(), config.clone());
        let p = prefill(src.spec(), 1, 0, config);
        assert_eq!(p.transport(), TransportKind::Rdma);
        assert_eq!(p.rdma_device(), Some(nic.as_str()));
        let port = d.port();
        p.connect("127.0.0.1", port, 1).unwrap();
        let scattered: Vec<u32> = (0..64).rev().step_by(3).collect();
        let targets: Vec<u32> = (0..scattered.len() as u32).map(|i| 79 - 2 * i).collect();
        let contiguous: Vec<u32> = (0..32).collect();
        for layer in 0..3 {
            p.write_cache("127.0.0.1", port, &scattered, &targets, layer).unwrap();
            // Decode blocks 0..32, apart from the scattered ones' 37..80.
            p.write_cache("127.0.0.1", port, &contiguous, &contiguous, layer).unwrap();
        }
        for layer in 0..3 {
            for t in 0..2 {
                for (s, r) in scattered.iter().zip(&targets) {
                    assert_eq!(dst.block(t, layer, *r), src.block(t, layer, *s), "flush {flush} layer {layer} tensor {t}");
                }
                for b in 0..32 {
                    assert_eq!(dst.block(t, layer, b), src.block(t, layer, b));
                }
            }
        }
    }
}

#[test]
fn key_only_and_hetero_tp() {
    let Some(nic) = nic("key_only_and_hetero_tp") else { return };
    // Key-only: one tensor per layer.
    let src = Cache::new(1, 2, 16, 512, 3);
    let dst = Cache::new(1, 2, 16, 512, 4);
    let d = decode(dst.spec(), rdma_config(&nic));
    let p = prefill(src.spec(), 1, 0, rdma_config(&nic));
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[0, 5, 6], &[9, 1, 2], 1).unwrap();
    assert_eq!(dst.block(0, 1, 9), src.block(0, 1, 0));
    assert_eq!(dst.block(0, 1, 2), src.block(0, 1, 6));

    // Two prefill ranks of 256-byte slices fill the two halves of 512-byte decode blocks.
    let ranks: Vec<Cache> = (0..2).map(|i| Cache::new(2, 1, 8, 256, 10 + i)).collect();
    let dst = Cache::new(2, 1, 8, 512, 12);
    let d = decode(dst.spec(), rdma_config(&nic));
    for (i, r) in ranks.iter().enumerate() {
        let p = prefill(r.spec(), 2, i as u32, rdma_config(&nic));
        p.connect("127.0.0.1", d.port(), 1).unwrap();
        p.write_cache("127.0.0.1", d.port(), &[1, 2, 7], &[3, 4, 0], 0).unwrap();
    }
    for t in 0..2 {
        for (s, r) in [(1, 3), (2, 4), (7, 0)] {
            let block = dst.block(t, 0, r);
            assert_eq!(&block[..256], ranks[0].block(t, 0, s));
            assert_eq!(&block[256..], ranks[1].block(t, 0, s));
        }
    }
}

#[test]
fn refused_calls_leave_the_remote_cache_untouched() {
    let Some(nic) = nic("refused_calls_leave_the_remote_cache_untouched") else { return };
    let src = Cache::new(2, 2, 16, 256, 5);
    let dst = Cache::new(2, 2, 8, 256, 6);
    let d = decode(dst.spec(), rdma_config(&nic));
    let p = prefill(src.spec(), 1, 0, rdma_config(&nic));
    let port = d.port();
    let before = dst.snapshot();
    assert_eq!(p.write_cache("127.0.0.1", port, &[0], &[0], 0).unwrap_err().code(), ErrorCode::NotConnected);
    p.connect("127.0.0.1", port, 1).unwrap();
    for (local, remote, layer, what) in [
        (vec![0u32, 1], vec![0u32], 0u32, "must pair up"),
        (vec![16], vec![0], 0, "local block id 16"),
        (vec![0], vec![8], 0, "remote block id 8"),
        (vec![0, 1], vec![3, 3], 0, "twice"),
        (vec![0], vec![0], 2, "layer 2"),
    ] {
        let err = p.write_cache("127.0.0.1", port, &local, &remote, layer).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
        assert!(err.message().contains(what), "{err}");
    }
    assert!(dst.snapshot() == before, "a refused call changed the decode cache");
    assert!(p.is_connected("127.0.0.1", port), "refusals keep the connection");
    p.write_cache("127.0.0.1", port, &[15], &[7], 1).unwrap();
    assert_eq!(dst.block(1, 1, 7), src.block(1, 1, 15));
}

#[test]
fn nic_is_chosen_by_gpu_index_and_bad_devices_are_named() {
    let Some(nic) = nic("nic_is_chosen_by_gpu_index_and_bad_devices_are_named") else { return };
    let cache = Cache::new(2, 1, 4, 256, 7);
    let spec = |gpu_idx| CommunicatorSpec { role: Role::Prefill, gpu_idx, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    let listed = Config { rdma_nics: vec!["no-such-nic".into(), nic.clone()], ..rdma_config(&nic) };
    let c = Communicator::new(spec(1), listed.clone()).unwrap();
    assert_eq!(c.rdma_device(), Some(nic.as_str()), "gpuIdx 1 of 2 NICs picks the second");
    let c = Communicator::new(spec(3), listed.clone()).unwrap();
    assert_eq!(c.rdma_device(), Some(nic.as_str()), "gpuIdx 3 of 2 NICs picks the second");
    let err = Communicator::new(spec(0), listed.clone()).err().unwrap();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.message().contains("\"no-such-nic\"") && err.message().contains("KVCACHE_TRANSPORT=rdma"), "{err}");
    // auto leaves RDMA out when the NIC is unusable, and opens it when it is (same-host peers still prefer shm).
    let auto = Config { transport: TransportChoice::Auto, ..listed };
    let without = Communicator::new(spec(0), auto.clone()).unwrap();
    assert_eq!((without.transport(), without.rdma_device()), (TransportKind::Shm, None));
    let with = Communicator::new(spec(1), auto).unwrap();
    assert_eq!((with.transport(), with.rdma_device()), (TransportKind::Shm, Some(nic.as_str())));
    // A GID index past the table is a configuration error naming the variable.
    let err = Communicator::new(spec(0), Config { gid_index: 250, ..rdma_config(&nic) }).err().unwrap();
    assert_eq!(err.code(), ErrorCode::Config, "{err}");
    assert!(err.message().contains("KVCACHE_RDMA_GID_INDEX=250"), "{err}");
}

#[test]
fn auto_decode_serves_shm_rdma_and_tcp_peers_each_their_way() {
    let Some(nic) = nic("auto_decode_serves_shm_rdma_and_tcp_peers_each_their_way") else { return };
    let src = Cache::new(2, 1, 8, 256, 8);
    let dst = Cache::new(2, 1, 8, 256, 9);
    let auto = Config { transport: TransportChoice::Auto, ..rdma_config(&nic) };
    let d = decode(dst.spec(), auto.clone());
    assert_eq!((d.transport(), d.rdma_device()), (TransportKind::Shm, Some(nic.as_str())));
    let p = prefill(src.spec(), 1, 0, auto);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    assert_eq!(p.connected_transport("127.0.0.1", d.port()), Some(TransportKind::Shm), "one host: shared memory first");
    p.write_cache("127.0.0.1", d.port(), &[1], &[2], 0).unwrap();
    assert_eq!(dst.block(0, 0, 2), src.block(0, 0, 1));
    let r = prefill(src.spec(), 1, 0, rdma_config(&nic));
    r.connect("127.0.0.1", d.port(), 1).unwrap();
    assert_eq!(r.connected_transport("127.0.0.1", d.port()), Some(TransportKind::Rdma));
    r.write_cache("127.0.0.1", d.port(), &[5], &[6], 0).unwrap();
    assert_eq!(dst.block(1, 0, 6), src.block(1, 0, 5));
    let tcp = prefill(src.spec(), 1, 0, Config { transport: TransportChoice::Only(TransportKind::Tcp), ..Config::default() });
    tcp.connect("127.0.0.1", d.port(), 1).unwrap();
    assert_eq!(tcp.connected_transport("127.0.0.1", d.port()), Some(TransportKind::Tcp));
    tcp.write_cache("127.0.0.1", d.port(), &[3], &[4], 0).unwrap();
    assert_eq!(dst.block(1, 0, 4), src.block(1, 0, 3));
}

#[test]
fn a_failed_connection_is_rebuilt_for_the_next_call() {
    let Some(nic) = nic("a_failed_connection_is_rebuilt_for_the_next_call") else { return };
    let src = Cache::new(2, 1, 8, 4096, 10);
    let dst = Cache::new(2, 1, 8, 4096, 11);
    // Short timeouts so the dead peer is noticed quickly: 4.096 µs · 2^14 ≈ 67 ms per transport retry
    // (a NIC reports IBV_WC_RETRY_EXC_ERR after 7), and 3 s without progress in any case (Soft-RoCE may
    // keep retrying).
    // The next call tries again by the policy: often enough to span a restart of the decode.
    let reconnect = kvtransfer::Reconnect { retries: 40, backoff: Duration::from_millis(20) };
    let config = Config { ib_timeout: 14, timeouts: kvtransfer::Timeouts::all(Duration::from_secs(3)), reconnect, ..rdma_config(&nic) };
    let d = decode(dst.spec(), config.clone());
    let port = d.port();
    let p = prefill(src.spec(), 1, 0, config.clone());
    p.connect("127.0.0.1", port, 1).unwrap();
    p.write_cache("127.0.0.1", port, &[0], &[0], 0).unwrap();
    d.close().unwrap();
    drop(d);
    // A decode comes back on the same port while the next call tries again: it rebuilds the queue pair and lands.
    let again = Cache::new(2, 1, 8, 4096, 12);
    std::thread::scope(|s| {
        let back = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port, cache: common::layout(again.spec()), tp_size: 1, tp_idx: 0 };
            Communicator::new(spec, config.clone()).unwrap()
        });
        p.write_cache("127.0.0.1", port, &[2, 3], &[5, 6], 0).unwrap();
        assert!(p.is_connected("127.0.0.1", port));
        assert_eq!(again.block(1, 0, 6), src.block(1, 0, 3));
        drop(back.join().unwrap());
    });
}

#[test]
fn devices_are_listed_with_ports_and_gids() {
    let Some(nic) = nic("devices_are_listed_with_ports_and_gids") else { return };
    let devices = rdma::devices().unwrap();
    let dev = devices.iter().find(|d| d.name == nic).expect("the test NIC is listed");
    let port = &dev.ports[0];
    assert_eq!(port.state, "ACTIVE");
    assert!(port.gids.iter().any(|g| g.index == gid_index()), "{:?}", port.gids);
}

#[test]
fn the_flush_reads_back_the_decodes_flush_target() {
    use kvtransfer::plan::{BlockPlan, SliceGeometry};
    use kvtransfer::transport::rdma::{RdmaContext, RdmaTarget};
    use kvtransfer::transport::Link;
    use std::sync::Arc;
    let Some(nic) = nic("the_flush_reads_back_the_decodes_flush_target") else { return };
    let src = Cache::new(2, 1, 8, 256, 13);
    let dst = Cache::new(2, 1, 8, 256, 14);
    for flush in [false, true] {
        let config = Config { gdrcopy_flush: flush, ..rdma_config(&nic) };
        let layout = |c: &Cache| Arc::new(common::layout(c.spec()));
        let target = RdmaTarget::new(RdmaContext::open(layout(&dst), &config, 0, true).unwrap());
        let prefill = RdmaContext::open(layout(&src), &config, 0, false).unwrap();
        let pending = prefill.prepare().unwrap();
        let (_, welcome) = target.accept(&pending.endpoint()).unwrap();
        let mut link = pending.connect("decode".into(), &welcome, SliceGeometry::WHOLE, 8).unwrap();
        let mut plan = BlockPlan::default();
        plan.build(&[2, 6], &[1, 4], 0, 1, 8, 8).unwrap();
        link.write(&plan).unwrap();
        // The flush reads the decode's flush target (not the cache, which no peer may read).
        let want: [u8; 8] = if flush { rdma::FLUSH_WORD } else { [0; 8] };
        assert_eq!(prefill.last_flush_read(), want, "flush {flush}");
        assert_eq!(dst.block(1, 0, 4), src.block(1, 0, 6));
    }
}

#[test]
fn each_mark_arrives_after_its_writes_and_no_peer_can_read_the_cache() {
    use kvtransfer::plan::{BlockPlan, SliceGeometry};
    use kvtransfer::transport::rdma::{RdmaContext, RdmaTarget, RdmaWelcome};
    use kvtransfer::transport::{Acceptor, Link};
    use std::sync::{mpsc, Arc};
    let Some(nic) = nic("each_mark_arrives_after_its_writes_and_no_peer_can_read_the_cache") else { return };
    let src = Arc::new(Cache::new(2, 1, 64, 4096, 21));
    let dst = Arc::new(Cache::new(2, 1, 8, 4096, 22));
    let config = rdma_config(&nic);
    let layout = |c: &Cache| Arc::new(common::layout(c.spec()));
    let target = RdmaTarget::new(RdmaContext::open(layout(&dst), &config, 0, true).unwrap());
    // The decode's side checks the bytes the moment each mark arrives: write k copies source block k into
    // decode block k % 8 (value tensor), so an early mark would find the bytes of an earlier write there.
    let (tx, marks) = mpsc::channel();
    let (s, d) = (src.clone(), dst.clone());
    target.watch(Arc::new(move |session, mark| {
        let k = mark - 1;
        let intact = d.block(1, 0, k % 8) == s.block(1, 0, k % 64);
        tx.send((session, mark, intact)).unwrap();
    }));
    let prefill = RdmaContext::open(layout(&src), &config, 0, false).unwrap();
    let pending = prefill.prepare().unwrap();
    let (session, welcome) = target.accept(&pending.endpoint()).unwrap();
    let mut link = pending.connect("decode".into(), &welcome, SliceGeometry::WHOLE, 8).unwrap();
    let mut plan = BlockPlan::default();
    for k in 0..40u32 {
        plan.build(&[k % 64], &[k % 8], 0, 1, 64, 8).unwrap();
        let mut ran = 0;
        link.write_marked(&plan, k + 1, &mut || ran += 1).unwrap();
        assert_eq!(ran, 1, "meanwhile runs once per write");
        let (got_session, mark, intact) = marks.recv_timeout(Duration::from_secs(10)).expect("the mark arrives");
        assert_eq!((got_session, mark), (session, k + 1));
        assert!(intact, "mark {mark} arrived before its bytes");
    }
    // A connected peer that reads the cache (its flush read aimed at a cache region) is refused by the NIC.
    let flushing = RdmaContext::open(layout(&src), &Config { gdrcopy_flush: true, ..config.clone() }, 0, false).unwrap();
    let pending = flushing.prepare().unwrap();
    let (_, welcome) = target.accept(&pending.endpoint()).unwrap();
    let reader = RdmaWelcome { flush: Some(welcome.regions[0][0]), ..welcome };
    let mut link = pending.connect("decode".into(), &reader, SliceGeometry::WHOLE, 8).unwrap();
    plan.build(&[1], &[1], 0, 1, 64, 8).unwrap();
    let err = link.write(&plan).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Transport, "{err}");
    assert!(err.message().contains("ACCESS"), "{err}");
    assert_eq!(flushing.last_flush_read(), [0; 8], "nothing of the cache was read");
    // A panic while the writes are on their way becomes the write's error, once the queue pair has stopped.
    let pending = prefill.prepare().unwrap();
    let (_, welcome) = target.accept(&pending.endpoint()).unwrap();
    let mut link = pending.connect("decode".into(), &welcome, SliceGeometry::WHOLE, 8).unwrap();
    plan.build(&[2], &[2], 0, 1, 64, 8).unwrap();
    let err = link.write_marked(&plan, 1, &mut || panic!("meanwhile failed")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Internal, "{err}");
    assert!(err.message().contains("meanwhile failed"), "{err}");
}
