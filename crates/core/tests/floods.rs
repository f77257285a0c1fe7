//! Floods against a decode: connections that never say a hello, on each of its ports, thousands of refused
//! writes, and more links than `KVCACHE_MAX_PEERS`. Its threads and descriptors come back to where they were, its
//! log stays short, and its good peers are served throughout. (Memory under the same floods:
//! `cargo bench --bench floods`.)

mod common;
#[path = "common/raw_peer.rs"]
mod raw_peer;

use common::Cache;
use kvtransfer::listener::greeting_caps;
use kvtransfer::transport::frame::WriteHeader;
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, TransportChoice, TransportKind};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn config(timeout_s: u64, error_file: Option<std::path::PathBuf>) -> Config {
    Config { transport: TransportChoice::Only(TransportKind::Tcp), timeouts: kvtransfer::Timeouts::all(Duration::from_secs(timeout_s)), error_file, ..Config::default() }
}

fn communicator(role: Role, cache: &Cache, config: Config) -> Communicator {
    let spec = CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config).unwrap()
}

/// Each test counts this process's threads and descriptors: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This process's threads and open descriptors.
fn threads_and_fds() -> (usize, usize) {
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    (count("/proc/self/task"), count("/proc/self/fd"))
}

/// Waits (up to 20 s) for the threads and descriptors to come back to `baseline`, give or take `slack`.
fn settles_to(baseline: (usize, usize), slack: usize) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = threads_and_fds();
        if (now.0 <= baseline.0 + slack && now.1 <= baseline.1 + slack) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_flood_of_silent_connections_leaves_threads_and_descriptors_where_they_were() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let src = Cache::new(2, 2, 64, 256, 1);
    let dst = Cache::new(2, 2, 64, 256, 2);
    let decode = communicator(Role::Decode, &dst, config(3, None));
    let prefill = communicator(Role::Prefill, &src, config(3, None));
    let port = decode.port();
    prefill.connect("127.0.0.1", port, 1).unwrap();
    prefill.write_cache("127.0.0.1", port, &[1, 2], &[3, 4], 0).unwrap();
    let welcome = raw_peer::handshake(port, 2, 256);
    let ports = [port, welcome.details["port"].as_u64().unwrap() as u16, welcome.channel_port];
    // The raw handshake's admissions expire (3 s); after that, this is the decode at rest with one link.
    std::thread::sleep(Duration::from_secs(4));
    let baseline = threads_and_fds();
    let mut peak = baseline;
    for round in 0..3u32 {
        // 200 connections to each port that never say anything, and a good peer writing meanwhile.
        let flood: Vec<TcpStream> = ports.iter().flat_map(|&p| (0..200).filter_map(move |_| raw_peer::connect_from_elsewhere(p).ok())).collect();
        assert!(flood.len() >= 550, "only {} flood connections opened", flood.len());
        std::thread::sleep(Duration::from_millis(500));
        let now = threads_and_fds();
        peak = (peak.0.max(now.0), peak.1.max(now.1 - flood.len()));
        let layer = round % 2;
        prefill.write_cache("127.0.0.1", port, &[5, 6, 7], &[10 + round, 20 + round, 30 + round], layer).unwrap();
        for (l, r) in [(5, 10 + round), (6, 20 + round), (7, 30 + round)] {
            assert_eq!(dst.block(0, layer as usize, r), src.block(0, layer as usize, l), "round {round}: served during the flood");
        }
        drop(flood);
    }
    let after = settles_to(baseline, 2);
    // Silent connections kept open: the decode lets each go once its hello is late (5 s), on every port.
    let kept: Vec<TcpStream> = ports.iter().flat_map(|&p| (0..100).filter_map(move |_| raw_peer::connect_from_elsewhere(p).ok())).collect();
    let held = settles_to((baseline.0, baseline.1 + kept.len()), 2);
    assert!(held.1 <= baseline.1 + kept.len() + 2, "descriptors {held:?} with {} silent connections kept open, {baseline:?} before", kept.len());
    drop(kept);
    eprintln!("threads, descriptors: {baseline:?} at rest, {peak:?} at most during the floods (not counting the flood's own), {after:?} after");
    assert!(after.0 <= baseline.0 + 2, "threads {after:?} after the floods, {baseline:?} before");
    assert!(after.1 <= baseline.1 + 2, "descriptors {after:?} after the floods, {baseline:?} before");
    // Connections waiting for their hello hold no thread (the ports' event loops read them).
    assert!(peak.0 <= baseline.0 + 8, "threads peaked at {peak:?} ({baseline:?} at rest)");
    // And a new peer still gets in.
    let late = communicator(Role::Prefill, &src, config(3, None));
    late.connect("127.0.0.1", port, 1).unwrap();
    late.write_cache("127.0.0.1", port, &[9], &[40], 1).unwrap();
    assert_eq!(dst.block(1, 1, 40), src.block(1, 1, 9));
}

#[test]
fn thousands_of_refused_writes_leave_the_decode_as_it_was_and_its_log_short() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("kvtransfer-floods-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let errors = dir.join("errors.log");
    let dst = Cache::new(2, 2, 64, 256, 3);
    // (A raw peer opens no request channel: a long timeout keeps its admission from expiring, which would cut
    // its data connection off.)
    let decode = communicator(Role::Decode, &dst, config(600, Some(errors.clone())));
    let before = dst.snapshot();
    let mut s = raw_peer::data_connection(decode.port(), 2, 256);
    // (The handshake's control connection is closed by its thread, a moment later.)
    std::thread::sleep(Duration::from_millis(500));
    let baseline = threads_and_fds();
    let started = Instant::now();
    // 5000 writes, each refused for another reason in turn; the connection stays up and the decode says so
    // in each ack.
    let reasons = ["layer 9", "outside this cache", "runs overlap", "payload bytes"];
    for i in 0..5000u32 {
        let (layer, runs, payload): (u32, Vec<(u32, u32)>, u64) = match i % 4 {
            0 => (9, vec![(0, 1)], 2 * 256),
            1 => (0, vec![(63, 2)], 2 * 2 * 256),
            2 => (0, vec![(1, 3), (2, 2)], 2 * 5 * 256),
            _ => (0, vec![(0, 1)], 256),
        };
        let runs: Vec<kvtransfer::plan::Run> = runs.iter().map(|&(remote, count)| kvtransfer::plan::Run { local: 0, remote, count }).collect();
        let mut frame = vec![];
        WriteHeader { layer, runs: runs.len() as u32, tensors: 0b11, seq: i as u64, payload_bytes: payload, part: 0, parts: 1 }.encode_with_runs(&runs, &mut frame);
        frame.resize(frame.len() + payload as usize, 0xEE);
        s.write_all(&frame).unwrap();
        let (status, reason) = raw_peer::read_ack(&mut s);
        assert_ne!(status, 0, "write {i} was taken");
        assert!(reason.contains(reasons[i as usize % 4]), "write {i}: {reason}");
    }
    assert!(dst.snapshot() == before, "a refused write changed the cache");
    let after = settles_to(baseline, 0);
    assert!(after.0 <= baseline.0 && after.1 <= baseline.1, "threads and descriptors {after:?}, {baseline:?} before");
    // At most 10 lines per peer every 10 s.
    let windows = started.elapsed().as_secs() as usize / 10 + 1;
    let logged = std::fs::read_to_string(&errors).unwrap_or_default();
    let refusals = logged.lines().filter(|l| l.contains("refused a write")).count();
    assert!((1..=10 * windows).contains(&refusals), "{refusals} refusals logged for 5000 in {windows} windows of 10 s:\n{logged}");
    drop(decode);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_decode_keeps_at_most_max_peers_links() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let src = Cache::new(2, 1, 8, 256, 5);
    let dst = Cache::new(2, 1, 8, 256, 6);
    let decode = communicator(Role::Decode, &dst, Config { max_peers: 2, ..config(5, None) });
    let port = decode.port();
    // Connections that never say a hello, on the data and channel ports, take none of the two places.
    let welcome = raw_peer::handshake(port, 1, 256);
    let silent: Vec<TcpStream> = [welcome.details["port"].as_u64().unwrap() as u16, welcome.channel_port]
        .iter()
        .flat_map(|&p| (0..4).map(move |_| raw_peer::connect_from_elsewhere(p).unwrap()))
        .collect();
    let prefills: Vec<Communicator> = (0..3).map(|_| communicator(Role::Prefill, &src, config(5, None))).collect();
    for p in &prefills[..2] {
        p.connect("127.0.0.1", port, 1).unwrap();
        p.write_cache("127.0.0.1", port, &[1], &[2], 0).unwrap();
    }
    // A third link would be one too many: its connection is closed, and the prefill says so.
    let err = prefills[2].connect("127.0.0.1", port, 1).unwrap_err();
    assert!(err.message().contains("KVCACHE_MAX_PEERS"), "the third prefill is told why: {err}");
    // Once a link has gone, another may take its place.
    prefills[0].close().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while prefills[2].connect("127.0.0.1", port, 1).is_err() {
        assert!(Instant::now() < deadline, "no room for a new link after one closed");
        std::thread::sleep(Duration::from_millis(100));
    }
    prefills[2].write_cache("127.0.0.1", port, &[3], &[4], 0).unwrap();
    assert_eq!(dst.block(1, 0, 4), src.block(1, 0, 3));
    prefills[1].write_cache("127.0.0.1", port, &[5], &[6], 0).unwrap();
    assert_eq!(dst.block(0, 0, 6), src.block(0, 0, 5), "the links kept were not disturbed");
    drop(silent);
}

#[test]
fn silent_connections_from_the_prefills_own_host_cannot_lock_it_out() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // The flood keeps more than a host's allowance open on each of the three ports: the test holds both ends.
    let allowed = kvtransfer::listener::raise_descriptor_limit(1 << 16);
    let per_port = greeting_caps().0 + 64;
    if allowed < 8 * per_port as u64 {
        eprintln!("skipped: {allowed} descriptors allowed");
        return;
    }
    let src = Cache::new(2, 2, 64, 256, 7);
    let dst = Cache::new(2, 2, 64, 256, 8);
    let decode = communicator(Role::Decode, &dst, config(10, None));
    let port = decode.port();
    let welcome = raw_peer::handshake(port, 2, 256);
    let ports = [port, welcome.details["port"].as_u64().unwrap() as u16, welcome.channel_port];
    // Any local user can do this over loopback: silent connections to every port, opened again as soon as the
    // decode lets them go, for as long as the prefill below takes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            let mut opened = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) && opened < 500_000 {
                for &p in &ports {
                    if let Ok(s) = TcpStream::connect(("127.0.0.1", p)) {
                        let _ = s.set_nonblocking(true);
                        open.push(s);
                        opened += 1;
                    }
                }
                // Never closed here: only what the decode closed is let go (and opened again above).
                if opened % 192 == 0 {
                    open.retain(|s| matches!((&*s).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
                }
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for round in 0..5u32 {
        let prefill = communicator(Role::Prefill, &src, config(10, None));
        let started = Instant::now();
        prefill.connect("127.0.0.1", port, 1).unwrap_or_else(|e| panic!("round {round}: {e}"));
        prefill.write_cache("127.0.0.1", port, &[round + 1], &[round + 10], 0).unwrap_or_else(|e| panic!("round {round}: {e}"));
        slowest = slowest.max(started.elapsed());
        assert_eq!(dst.block(0, 0, round + 10), src.block(0, 0, round + 1));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let opened = flooding.join().unwrap();
    eprintln!("slowest connect and first write: {slowest:?}, while {opened} silent connections were opened");
    assert!(opened > 3 * per_port, "the flood opened only {opened} connections");
    assert!(slowest < Duration::from_secs(1), "a local prefill took {slowest:?} to connect and write during the flood");
}
