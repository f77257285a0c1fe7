//! End-to-end transfers over the TCP transport between communicators of one process, and what the decode
//! side does with traffic that did not come from a well-behaved prefill.

use kvtransfer::control;
use kvtransfer::wire;
mod common;
#[path = "common/raw_peer.rs"]
mod raw_peer;

use common::Cache;
use raw_peer::{data_connection, read_ack};
use kvtransfer::memory::CacheSpec;
use kvtransfer::transport::frame::WriteHeader;
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportChoice, TransportKind};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// TCP only, 5 s timeouts, four data connections a link (the default on a machine of four CPUs or more).
fn tcp() -> Config {
    Config {
        transport: TransportChoice::Only(TransportKind::Tcp),
        timeouts: kvtransfer::Timeouts::all(Duration::from_secs(5)),
        tcp_connections: 4,
        ..Config::default()
    }
}

fn decode(cache: CacheSpec) -> Communicator {
    Communicator::new(CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 }, tcp()).unwrap()
}

fn prefill(cache: CacheSpec, tp_size: u32, tp_idx: u32) -> Communicator {
    Communicator::new(CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size, tp_idx }, tcp()).unwrap()
}

#[test]
fn all_layers_scattered_and_contiguous() {
    let src = Cache::new(2, 3, 64, 1024, 1);
    let dst = Cache::new(2, 3, 80, 1024, 2);
    let d = decode(dst.spec());
    let p = prefill(src.spec(), 1, 0);
    let port = d.port();
    assert!(!p.is_connected("127.0.0.1", port));
    p.connect("127.0.0.1", port, 1).unwrap();
    assert!(p.is_connected("127.0.0.1", port));
    let local: Vec<u32> = vec![5, 6, 7, 8, 40, 2, 63, 0, 1];
    let remote: Vec<u32> = vec![70, 71, 72, 73, 3, 79, 10, 11, 12];
    for layer in 0..3 {
        p.write_cache("127.0.0.1", port, &local, &remote, layer).unwrap();
    }
    for layer in 0..3 {
        for t in 0..2 {
            for (l, r) in local.iter().zip(&remote) {
                assert_eq!(dst.block(t, layer, *r), src.block(t, layer, *l), "tensor {t} layer {layer} block {l}->{r}");
            }
            // A block nobody wrote keeps its own pattern.
            assert_ne!(dst.block(t, layer, 20), src.block(t, layer, 20));
        }
    }
}

#[test]
fn key_only_cache() {
    let src = Cache::new(1, 2, 16, 512, 3);
    let dst = Cache::new(1, 2, 16, 512, 4);
    let d = decode(dst.spec());
    let p = prefill(src.spec(), 1, 0);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[1, 9], &[15, 0], 1).unwrap();
    assert_eq!(dst.block(0, 1, 15), src.block(0, 1, 1));
    assert_eq!(dst.block(0, 1, 0), src.block(0, 1, 9));
    // A key-only prefill cannot pair with a key+value decode.
    let kv = Cache::new(2, 2, 16, 512, 5);
    let d2 = decode(kv.spec());
    let err = p.connect("127.0.0.1", d2.port(), 1).unwrap_err();
    assert!(err.message().contains("tensor mismatch"), "{err}");
}

#[test]
fn heterogeneous_tp_two_ranks_fill_halves() {
    let (blocks, half) = (8u32, 256u64);
    let rank0 = Cache::new(2, 2, blocks, half, 10);
    let rank1 = Cache::new(2, 2, blocks, half, 11);
    let dst = Cache::new(2, 2, blocks, half * 2, 12);
    let d = decode(dst.spec());
    let p0 = prefill(rank0.spec(), 2, 0);
    let p1 = prefill(rank1.spec(), 2, 1);
    for p in [&p0, &p1] {
        p.connect("127.0.0.1", d.port(), 1).unwrap();
    }
    let (local, remote) = ([0u32, 1, 2, 6], [4u32, 5, 6, 0]);
    // Both ranks at once, as engines do.
    std::thread::scope(|s| {
        s.spawn(|| p0.write_cache("127.0.0.1", d.port(), &local, &remote, 1).unwrap());
        s.spawn(|| p1.write_cache("127.0.0.1", d.port(), &local, &remote, 1).unwrap());
    });
    for t in 0..2 {
        for (l, r) in local.iter().zip(&remote) {
            let block = dst.block(t, 1, *r);
            assert_eq!(&block[..half as usize], rank0.block(t, 1, *l));
            assert_eq!(&block[half as usize..], rank1.block(t, 1, *l));
        }
    }
    // A geometry that does not add up is refused on both sides.
    let wrong = prefill(rank0.spec(), 4, 0);
    let err = wrong.connect("127.0.0.1", d.port(), 1).unwrap_err();
    assert!(err.message().contains("block geometry mismatch"), "{err}");
}

#[test]
fn quantised_scales_travel_with_their_blocks() {
    let src = Cache::new(2, 1, 8, 128, 20);
    let src_scales = Cache::new(2, 1, 8, 4, 21);
    let dst = Cache::new(2, 1, 8, 128, 22);
    let dst_scales = Cache::new(2, 1, 8, 4, 23);
    let with_scales = |c: &Cache, s: &Cache| CacheSpec { key_scale: s.addrs(0), value_scale: s.addrs(1), scale_block_bytes: 4, ..c.spec() };
    let d = decode(with_scales(&dst, &dst_scales));
    let p = prefill(with_scales(&src, &src_scales), 1, 0);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[3, 4], &[6, 1], 0).unwrap();
    for t in 0..2 {
        assert_eq!(dst.block(t, 0, 6), src.block(t, 0, 3));
        assert_eq!(dst_scales.block(t, 0, 6), src_scales.block(t, 0, 3));
        assert_eq!(dst_scales.block(t, 0, 1), src_scales.block(t, 0, 4));
        assert_ne!(dst_scales.block(t, 0, 0), src_scales.block(t, 0, 0));
    }
}

#[test]
fn refusals_leave_the_remote_cache_untouched() {
    let src = Cache::new(2, 2, 16, 256, 30);
    let dst = Cache::new(2, 2, 16, 256, 31);
    let d = decode(dst.spec());
    let p = prefill(src.spec(), 1, 0);
    let port = d.port();
    let err = p.write_cache("127.0.0.1", port, &[1], &[1], 0).unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotConnected);
    p.connect("127.0.0.1", port, 1).unwrap();
    let before = dst.snapshot();
    let cases: [(&[u32], &[u32], u32); 5] = [
        (&[16], &[0], 0),
        (&[0], &[16], 0),
        (&[0, 1], &[0], 0),
        (&[0], &[0], 2),
        (&[0, 1], &[3, 3], 0),
    ];
    for (local, remote, layer) in cases {
        let err = p.write_cache("127.0.0.1", port, local, remote, layer).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    }
    assert!(dst.snapshot() == before, "a refused write changed the decode cache");
    // The connection still works after refusals.
    p.write_cache("127.0.0.1", port, &[2], &[9], 1).unwrap();
    assert_eq!(dst.block(0, 1, 9), src.block(0, 1, 2));
    // Decode communicators do not write.
    assert_eq!(d.write_cache("127.0.0.1", port, &[0], &[0], 0).unwrap_err().code(), ErrorCode::InvalidArgument);
}

#[test]
fn many_prefill_peers_write_at_once() {
    let dst = Cache::new(2, 1, 64, 4096, 40);
    let d = decode(dst.spec());
    let sources: Vec<Cache> = (0..4).map(|i| Cache::new(2, 1, 16, 4096, 50 + i)).collect();
    let peers: Vec<Communicator> = sources.iter().map(|c| prefill(c.spec(), 1, 0)).collect();
    std::thread::scope(|s| {
        for (i, p) in peers.iter().enumerate() {
            let port = d.port();
            s.spawn(move || {
                p.connect("127.0.0.1", port, 1).unwrap();
                let local: Vec<u32> = (0..16).collect();
                let remote: Vec<u32> = (0..16).map(|b| i as u32 * 16 + b).collect();
                for _ in 0..20 {
                    p.write_cache("127.0.0.1", port, &local, &remote, 0).unwrap();
                }
            });
        }
    });
    for (i, src) in sources.iter().enumerate() {
        for b in 0..16 {
            assert_eq!(dst.block(1, 0, i as u32 * 16 + b), src.block(1, 0, b));
        }
    }
}

#[test]
fn closed_decode_fails_writes_without_hanging() {
    let src = Cache::new(2, 1, 8, 256, 60);
    let dst = Cache::new(2, 1, 8, 256, 61);
    let d = decode(dst.spec());
    let policy = kvtransfer::Reconnect { retries: 2, backoff: Duration::from_millis(50) };
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(src.spec()), tp_size: 1, tp_idx: 0 };
    let p = Communicator::new(spec, Config { reconnect: policy, ..tcp() }).unwrap();
    let port = d.port();
    p.connect("127.0.0.1", port, 1).unwrap();
    d.close().unwrap();
    // The decode told the link it closes: the next call tries to reconnect, by the policy (three attempts), and
    // with nothing listening fails at once each time, naming the address.
    let started = std::time::Instant::now();
    let err = p.write_cache("127.0.0.1", port, &[1], &[1], 0).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unreachable, "{err}");
    let address = format!("127.0.0.1:{port}");
    for said in ["closed", "could not be rebuilt in 3 attempts", address.as_str()] {
        assert!(err.message().contains(said), "{said:?} in {err}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "50 + 100 ms of pauses took {:?}", started.elapsed());
    // The peer is forgotten: later calls say so at once, until it is connected again.
    assert!(!p.is_connected("127.0.0.1", port));
    assert_eq!(p.write_cache("127.0.0.1", port, &[1], &[1], 0).unwrap_err().code(), ErrorCode::NotConnected);
    p.close().unwrap();
    assert_eq!(p.connect("127.0.0.1", port, 1).unwrap_err().code(), ErrorCode::Closed);
}

/// What a prefill tells of its peers, as text, in order.
fn recorded(p: &Communicator) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use kvtransfer::communicator::peer_events::PeerEvent;
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = told.clone();
    let sink = move |e: &PeerEvent| {
        let line = match e {
            PeerEvent::Connected { transport, reconnected, .. } => format!("connected {transport} reconnected={reconnected}"),
            PeerEvent::Disconnected { cause, .. } => format!("disconnected {}: {}", cause.code(), cause.message()),
            PeerEvent::Reconnecting { attempt, attempts, cause, .. } => format!("reconnecting {attempt}/{attempts} {}", cause.code()),
        };
        t.lock().unwrap().push(line);
    };
    p.on_peer_events(Some(std::sync::Arc::new(sink))).unwrap();
    told
}

#[test]
fn a_decode_that_comes_back_is_reconnected_by_the_policy_and_each_change_is_told() {
    let src = Cache::new(2, 1, 8, 256, 62);
    let (dst, again) = (Cache::new(2, 1, 8, 256, 63), Cache::new(2, 1, 8, 256, 64));
    let d = decode(dst.spec());
    let port = d.port();
    let policy = kvtransfer::Reconnect { retries: 20, backoff: Duration::from_millis(20) };
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(src.spec()), tp_size: 1, tp_idx: 0 };
    let p = Communicator::new(spec, Config { reconnect: policy, ..tcp() }).unwrap();
    let told = recorded(&p);
    p.connect("127.0.0.1", port, 1).unwrap();
    p.write_cache("127.0.0.1", port, &[0], &[0], 0).unwrap();
    d.close().unwrap();
    drop(d);
    // Told without a call: the request channel saw the decode go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !told.lock().unwrap().iter().any(|e| e.starts_with("disconnected")) {
        assert!(std::time::Instant::now() < deadline, "no disconnected event: {:?}", told.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    // A decode comes back on the same port while the next write tries again: that write lands.
    std::thread::scope(|s| {
        let back = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port, cache: common::layout(again.spec()), tp_size: 1, tp_idx: 0 };
            Communicator::new(spec, tcp()).unwrap()
        });
        p.write_cache("127.0.0.1", port, &[2, 3], &[5, 6], 0).unwrap();
        assert_eq!(again.block(1, 0, 6), src.block(1, 0, 3));
        back.join().unwrap().close().unwrap();
    });
    // The decode that came back closed too: told from the channel's thread, soon after.
    let all = told;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while all.lock().unwrap().iter().filter(|e| e.starts_with("disconnected")).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no second disconnected event: {:?}", all.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    let told = all.lock().unwrap().clone();
    assert_eq!(told[0], "connected tcp reconnected=false", "{told:?}");
    assert!(told[1].starts_with("disconnected TRANSPORT") && told[1].contains(&format!("127.0.0.1:{port}")), "{told:?}");
    let attempts: Vec<&String> = told.iter().filter(|e| e.starts_with("reconnecting")).collect();
    assert!(attempts.len() >= 2, "the decode was away for some attempts: {told:?}");
    assert!(attempts[0].starts_with("reconnecting 1/21 TRANSPORT") && attempts[1].ends_with("UNREACHABLE"), "{told:?}");
    let back = told.iter().position(|e| e == "connected tcp reconnected=true").expect("reconnected");
    // The decode that came back closed too: that connection's end is told, once.
    assert_eq!(told[back + 1..], ["disconnected TRANSPORT: the connection to 127.0.0.1:{port} ended: the decode closed the request channel".replace("{port}", &port.to_string())], "{told:?}");
    // A connection this side ends is not told.
    let d = decode(dst.spec());
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.disconnect("127.0.0.1", d.port()).unwrap();
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.close().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let after: Vec<String> = all.lock().unwrap()[told.len()..].to_vec();
    assert_eq!(after, ["connected tcp reconnected=false", "connected tcp reconnected=false"], "{after:?}");
}

#[test]
fn forged_writes_are_refused_by_the_decode_side() {
    let dst = Cache::new(2, 2, 8, 64, 70);
    let d = decode(dst.spec());
    let before = dst.snapshot();
    let mut s = data_connection(d.port(), 2, 64);
    let send = |s: &mut TcpStream, layer: u32, runs: &[(u32, u32)], payload: u64| {
        let runs: Vec<kvtransfer::plan::Run> = runs.iter().map(|&(remote, count)| kvtransfer::plan::Run { local: 0, remote, count }).collect();
        let mut buf = vec![];
        WriteHeader { layer, runs: runs.len() as u32, tensors: 0b11, seq: 1, payload_bytes: payload, part: 0, parts: 1 }.encode_with_runs(&runs, &mut buf);
        buf.extend(std::iter::repeat_n(0xEEu8, payload as usize));
        s.write_all(&buf).unwrap();
    };
    // Block 7 + 2 blocks runs past the end of the cache.
    send(&mut s, 0, &[(7, 2)], 2 * 2 * 64);
    let (status, reason) = read_ack(&mut s);
    assert_ne!(status, 0);
    assert!(reason.contains("outside this cache"), "{reason}");
    // A layer that does not exist.
    send(&mut s, 5, &[(0, 1)], 2 * 64);
    assert!(read_ack(&mut s).1.contains("layer 5"));
    // A payload length that does not match its runs.
    send(&mut s, 0, &[(0, 1)], 64);
    assert!(read_ack(&mut s).1.contains("payload bytes"));
    // Runs that overlap (blocks 2 and 3 twice), and one block listed more often than the cache has blocks.
    send(&mut s, 0, &[(1, 3), (2, 2)], 2 * 5 * 64);
    assert!(read_ack(&mut s).1.contains("runs overlap"));
    send(&mut s, 0, &[(4, 1); 8], 2 * 8 * 64);
    assert!(read_ack(&mut s).1.contains("runs overlap"));
    assert!(dst.snapshot() == before, "a forged write changed the cache");
    // The same connection still carries a valid write.
    send(&mut s, 1, &[(3, 1)], 2 * 64);
    assert_eq!(read_ack(&mut s).0, 0);
    assert_eq!(dst.block(0, 1, 3), &[0xEE; 64][..]);
    assert_eq!(dst.block(1, 1, 3), &[0xEE; 64][..]);
    // A run table longer than the cache has blocks is not read: the connection is closed (an announced payload
    // of 0 would otherwise be drained and the write refused with an ack).
    send(&mut s, 0, &[(0, 1); 9], 0);
    let mut byte = [0u8; 1];
    assert_eq!(s.read(&mut byte).unwrap_or(0), 0, "the decode closes a connection that sends an impossible run table");
}

#[test]
fn garbage_on_the_wire_does_not_hurt_the_decode_side() {
    let src = Cache::new(2, 1, 8, 64, 80);
    let dst = Cache::new(2, 1, 8, 64, 81);
    let d = decode(dst.spec());
    let before = dst.snapshot();
    // Garbage to the control port (not even a frame).
    let mut c = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    let _ = c.write_all(&[0xFF; 4096]);
    drop(c);
    // A handshake with garbage JSON gets a clear refusal.
    let reply = control::request("127.0.0.1", d.port(), b"{not json", Duration::from_secs(5)).unwrap();
    let err = wire::decode_reply(&reply).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Protocol);
    // A valid data connection, then garbage instead of a header: the decode drops that connection.
    let mut s = data_connection(d.port(), 1, 64);
    s.write_all(&[0x5A; 64]).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "the decode side closes a garbled connection");
    // An absurd payload on a refused write also ends the connection rather than being drained.
    let mut s = data_connection(d.port(), 1, 64);
    let mut hdr = vec![];
    WriteHeader { layer: 9, runs: 0, tensors: 0b11, seq: 1, payload_bytes: u64::MAX, part: 0, parts: 1 }.encode_with_runs(&[], &mut hdr);
    s.write_all(&hdr).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    assert!(dst.snapshot() == before);
    // And real peers still get through.
    let p = prefill(src.spec(), 1, 0);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[4], &[2], 0).unwrap();
    assert_eq!(dst.block(1, 0, 2), src.block(1, 0, 4));
}

#[test]
fn handshake_mismatches_are_errors_on_both_sides() {
    let dir = std::env::temp_dir().join(format!("kvt-hs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let errors = dir.join("decode-errors.log");
    let dst = Cache::new(2, 2, 8, 64, 90);
    let cfg = Config { error_file: Some(errors.clone()), ..tcp() };
    let d = Communicator::new(CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(dst.spec()), tp_size: 1, tp_idx: 0 }, cfg).unwrap();
    let src = Cache::new(2, 3, 8, 64, 91);
    let p = prefill(src.spec(), 1, 0);
    let err = p.connect("127.0.0.1", d.port(), 1).unwrap_err();
    assert!(err.message().contains("layer count mismatch"), "{err}");
    let logged = std::fs::read_to_string(&errors).unwrap();
    assert!(logged.contains("layer count mismatch"), "decode error log: {logged}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_write_trickled_a_byte_at_a_time_is_given_up_after_its_deadline() {
    let dst = Cache::new(2, 2, 8, 64, 71);
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(dst.spec()), tp_size: 1, tp_idx: 0 };
    let d = Communicator::new(spec, Config { timeouts: kvtransfer::Timeouts::all(Duration::from_secs(1)), ..tcp() }).unwrap();
    let (mut s, _channel) = raw_peer::link(d.port(), 2, 64);
    let runs = [kvtransfer::plan::Run { local: 0, remote: 3, count: 1 }];
    let mut header = vec![];
    WriteHeader { layer: 0, runs: 1, tensors: 0b11, seq: 1, payload_bytes: 2 * 64, part: 0, parts: 1 }.encode_with_runs(&runs, &mut header);
    s.write_all(&header).unwrap();
    // One byte every 300 ms: each read comes well within the timeout, the write never within its deadline.
    let mut trickle = s.try_clone().unwrap();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        for _ in 0..128 {
            std::thread::sleep(Duration::from_millis(300));
            if trickle.write_all(&[0xEE]).is_err() {
                return;
            }
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    let ended = s.read(&mut byte);
    assert!(matches!(ended, Ok(0) | Err(_)), "the decode answered a write that never came whole: {ended:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "given up after {took:?}, not at its deadline");
}

#[test]
fn a_notification_of_blocks_the_link_did_not_deliver_cuts_it_off() {
    use kvtransfer::channel::{Frame, RequestId};
    let dst = Cache::new(2, 2, 8, 64, 72);
    let d = decode(dst.spec());
    let (mut data, mut channel) = raw_peer::link(d.port(), 2, 64);
    let r = RequestId::new("claimed").unwrap();
    // Block 3 of layer 0 arrives, and is notified: accepted.
    let mut buf = vec![];
    let runs = [kvtransfer::plan::Run { local: 0, remote: 3, count: 1 }];
    WriteHeader { layer: 0, runs: 1, tensors: 0b11, seq: 1, payload_bytes: 2 * 64, part: 0, parts: 1 }.encode_with_runs(&runs, &mut buf);
    buf.extend([0xAB; 2 * 64]);
    data.write_all(&buf).unwrap();
    assert_eq!(read_ack(&mut data).0, 0);
    channel.send_direct(&Frame::Start { request: r.clone() }).unwrap();
    channel.send_direct(&Frame::Done { request: r.clone(), layer: 0, mark: 1, blocks: vec![3] }).unwrap();
    d.wait_for(&r, Some(vec![0]), Duration::from_secs(5)).unwrap();
    // Layer 1's blocks 4 and 5 never came: a notification of them is a lie, and its link is cut off.
    channel.send_direct(&Frame::Done { request: r.clone(), layer: 1, mark: 2, blocks: vec![4, 5] }).unwrap();
    assert_closed_by_decode(&mut data, "the link was not cut off");
    let err = d.wait_for(&r, None, Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Transport, "{err}");
}

#[test]
fn a_large_write_goes_in_pieces_over_the_links_connections_and_its_notification_is_believed() {
    use kvtransfer::channel::RequestId;
    use kvtransfer::config::{LogHook, LogRecord};
    // 32 blocks of 256 KiB a tensor: a call of all of them is 16 MiB, in four pieces (one a connection).
    let src = Cache::new(2, 2, 32, 256 << 10, 110);
    let dst = Cache::new(2, 2, 40, 256 << 10, 111);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let l = lines.clone();
    let hook = LogHook(std::sync::Arc::new(move |r: &LogRecord| l.lock().unwrap().push(r.message.clone())));
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(dst.spec()), tp_size: 1, tp_idx: 0 };
    let d = Communicator::new(spec, Config { debug: true, log_hook: Some(hook), ..tcp() }).unwrap();
    let p = prefill(src.spec(), 1, 0);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    let local: Vec<u32> = (0..32).rev().collect();
    let remote: Vec<u32> = (0..32).map(|i| 39 - i).collect();
    let r = RequestId::new("pieces").unwrap();
    for layer in 0..2 {
        p.write_request("127.0.0.1", d.port(), &local, &remote, layer, Some(&r)).unwrap();
    }
    // Its notifications name every block of the call: the decode believes them only once every piece is in.
    d.wait_for(&r, Some(vec![0, 1]), Duration::from_secs(5)).unwrap();
    let opened = lines.lock().unwrap().iter().filter(|m| m.starts_with("data path open")).count();
    assert_eq!(opened, 4, "the link opens KVCACHE_TCP_CONNECTIONS data connections");
    for layer in 0..2 {
        for t in 0..2 {
            for (l, r) in local.iter().zip(&remote) {
                assert!(dst.block(t, layer, *r) == src.block(t, layer, *l), "tensor {t} layer {layer} block {l}->{r}");
            }
        }
    }
    let pieces: Vec<String> = lines.lock().unwrap().iter().filter(|m| m.contains(" piece ")).cloned().collect();
    for k in 1..=4 {
        assert_eq!(pieces.iter().filter(|m| m.contains(&format!("piece {k} of 4"))).count(), 2, "{pieces:?}");
    }
    // A small call goes whole over one connection.
    p.write_cache("127.0.0.1", d.port(), &[1], &[2], 0).unwrap();
    assert!(dst.block(0, 0, 2) == src.block(0, 0, 1));
    assert_eq!(lines.lock().unwrap().iter().filter(|m| m.contains(" piece ")).count(), 8);
}

/// Asserts that the decode closed `s` (within 5 s): an end of stream or a reset, never a read that timed out.
fn assert_closed_by_decode(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted) => {}
        other => panic!("{what}: {other:?}"),
    }
}

/// A link admitted for two data connections, spoken by hand: both connections and the request channel.
fn split_link(port: u16) -> (TcpStream, TcpStream, kvtransfer::channel::ChannelClient, kvtransfer::wire::Welcome) {
    let mut hello = common::hello(2, 64);
    hello.offers[0].details = serde_json::json!({ "connections": 2 });
    let welcome = raw_peer::handshake_hello(port, &hello);
    let (a, b) = (raw_peer::open_data(&welcome), raw_peer::open_data(&welcome));
    let obey = std::sync::Arc::new(|_: &kvtransfer::channel::Directive| {});
    let (channel, _) = kvtransfer::channel::ChannelClient::connect(
        "127.0.0.1",
        welcome.channel_port,
        welcome.channel_token,
        [0; 32],
        std::time::Instant::now() + Duration::from_secs(5),
        Duration::from_secs(5),
        obey,
        Box::new(|_| {}),
    )
    .unwrap();
    (a, b, channel, welcome)
}

/// Sends piece `part` of `parts` of write `seq` (block `remote` of `layer`, filled with `fill`) and reads its ack.
fn send_piece(s: &mut TcpStream, layer: u32, seq: u64, part: u8, parts: u8, remote: u32, fill: u8) -> (u32, String) {
    let mut buf = vec![];
    let runs = [kvtransfer::plan::Run { local: 0, remote, count: 1 }];
    WriteHeader { layer, runs: 1, tensors: 0b11, part, parts, seq, payload_bytes: 2 * 64 }.encode_with_runs(&runs, &mut buf);
    buf.extend([fill; 2 * 64]);
    s.write_all(&buf).unwrap();
    read_ack(s)
}

#[test]
fn a_split_write_counts_only_once_every_piece_has_arrived() {
    use kvtransfer::channel::{Frame, RequestId};
    let dst = Cache::new(2, 2, 8, 64, 112);
    let d = decode(dst.spec());
    let (mut a, mut b, mut channel, welcome) = split_link(d.port());
    assert_eq!(welcome.details["connections"], 2, "the lower of both sides' settings");
    assert!(raw_peer::try_open_data(&welcome).is_err(), "a session opens the connections it was admitted for, and no more");
    // Blocks 3 and 5 of layer 0, one piece on each connection: the notification naming both is believed.
    assert_eq!(send_piece(&mut a, 0, 1, 0, 2, 3, 0xA1).0, 0);
    assert_eq!(send_piece(&mut b, 0, 1, 1, 2, 5, 0xA2).0, 0);
    let r = RequestId::new("split").unwrap();
    channel.send_direct(&Frame::Start { request: r.clone() }).unwrap();
    channel.send_direct(&Frame::Done { request: r.clone(), layer: 0, mark: 1, blocks: vec![3, 5] }).unwrap();
    d.wait_for(&r, Some(vec![0]), Duration::from_secs(5)).unwrap();
    assert_eq!(dst.block(1, 0, 5), &[0xA2; 64][..]);
    // More pieces than the link has connections: refused, and the connection stays usable.
    let (status, reason) = send_piece(&mut a, 1, 2, 0, 3, 6, 0xC1);
    assert!(status != 0 && reason.contains("pieces"), "{reason}");
    // Layer 1: only the first piece arrives; a notification of the whole write is a lie, and cuts the link off.
    assert_eq!(send_piece(&mut a, 1, 3, 0, 2, 4, 0xB1).0, 0);
    channel.send_direct(&Frame::Done { request: r.clone(), layer: 1, mark: 2, blocks: vec![4, 6] }).unwrap();
    assert_closed_by_decode(&mut b, "the link was not cut off");
    assert_closed_by_decode(&mut a, "every connection of the link is cut off");
    assert_eq!(d.wait_for(&r, None, Duration::from_secs(5)).unwrap_err().code(), ErrorCode::Transport);
}

#[test]
fn pieces_that_do_not_make_one_write_are_no_evidence() {
    use kvtransfer::channel::{Frame, RequestId};
    let dst = Cache::new(2, 2, 8, 64, 113);
    let d = decode(dst.spec());
    // The same piece twice (blocks 3, then 4), or two pieces of one write number but of different layers: the
    // notification naming both blocks is refused, and the link cut off.
    for (case, second) in [("the same piece twice", (0u32, 0u8)), ("pieces of two layers", (1, 1))] {
        let (mut a, mut b, mut channel, _) = split_link(d.port());
        assert_eq!(send_piece(&mut a, 0, 1, 0, 2, 3, 0xD1).0, 0, "{case}");
        assert_eq!(send_piece(&mut b, second.0, 1, second.1, 2, 4, 0xD2).0, 0, "{case}");
        let r = RequestId::new(format!("lie-{}", second.1)).unwrap();
        channel.send_direct(&Frame::Start { request: r.clone() }).unwrap();
        // Named by the layer of the last piece, as a write assembled from both would be.
        channel.send_direct(&Frame::Done { request: r.clone(), layer: second.0, mark: 1, blocks: vec![3, 4] }).unwrap();
        assert_closed_by_decode(&mut a, case);
        assert_eq!(d.wait_for(&r, None, Duration::from_secs(5)).unwrap_err().code(), ErrorCode::Transport, "{case}");
    }
}
