//! A decode's memory, threads and descriptors under floods (the numbers `tests/floods.rs` cannot assert): rounds
//! of connections that never say a hello on each of its three ports, then refused writes by the thousand, with
//! a prefill writing throughout. Prints one table.
//!
//!     cargo bench -p kvtransfer --bench floods            (FLOOD_PER_PORT=300 for the earlier rounds)

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/raw_peer.rs"]
mod raw_peer;

use common::Cache;
use kvtransfer::transport::frame::WriteHeader;
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, TransportChoice, TransportKind};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

const ROUNDS: usize = 10;
const REFUSED: u32 = 20_000;

/// Resident memory (KiB), threads and open descriptors of this process.
fn usage() -> (u64, usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0);
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    (rss, count("/proc/self/task"), count("/proc/self/fd"))
}

fn communicator(role: Role, cache: &Cache) -> Communicator {
    let config = Config { transport: TransportChoice::Only(TransportKind::Tcp), timeouts: kvtransfer::Timeouts::all(Duration::from_secs(600)), ..Config::default() };
    let spec = CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config).unwrap()
}

fn row(what: &str, (rss, threads, fds): (u64, usize, usize)) {
    println!("| {what} | {:.1} | {threads} | {fds} |", rss as f64 / 1024.0);
}

fn main() {
    // Silent connections per port and round: thousands, past a host's allowance of waiting ones (1024).
    let per_port: usize = std::env::var("FLOOD_PER_PORT").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    kvtransfer::listener::raise_descriptor_limit(8 * per_port as u64 + 1024);
    let src = Cache::new(2, 2, 64, 4096, 1);
    let dst = Cache::new(2, 2, 64, 4096, 2);
    let decode = communicator(Role::Decode, &dst);
    let prefill = communicator(Role::Prefill, &src);
    let port = decode.port();
    prefill.connect("127.0.0.1", port, 1).unwrap();
    prefill.write_cache("127.0.0.1", port, &[1], &[1], 0).unwrap();
    let welcome = raw_peer::handshake(port, 2, 4096);
    let ports = [port, welcome.details["port"].as_u64().unwrap() as u16, welcome.channel_port];
    println!("A decode (TCP) under floods, with a prefill writing throughout (this process holds both, and the flood's own");
    println!("sockets are not counted):");
    println!("| moment | resident MiB | threads | descriptors |");
    println!("|---|---|---|---|");
    let rest = usage();
    row("at rest", rest);
    let mut peak = rest;
    for round in 0..ROUNDS {
        let flood: Vec<TcpStream> =
            ports.iter().flat_map(|&p| (0..per_port).filter_map(move |_| raw_peer::connect_from_elsewhere(p).ok())).collect();
        std::thread::sleep(Duration::from_millis(300));
        prefill.write_cache("127.0.0.1", port, &[2, 3], &[10 + round as u32, 30 + round as u32], 1).unwrap();
        let (rss, threads, fds) = usage();
        if round == 0 {
            eprintln!("round 0: {} flood connections open, {fds} descriptors in all", flood.len());
        }
        peak = (peak.0.max(rss), peak.1.max(threads), peak.2.max(fds - flood.len()));
    }
    row(&format!("most, during {ROUNDS} rounds of {per_port} silent connections to each port"), peak);
    std::thread::sleep(Duration::from_secs(6));
    row("6 s after the last round", usage());
    let mut s = raw_peer::data_connection(port, 2, 4096);
    for i in 0..REFUSED {
        let mut frame = Vec::new();
        let runs = [kvtransfer::plan::Run { local: 0, remote: 63, count: 2 }];
        WriteHeader { layer: 0, runs: 1, tensors: 0b11, seq: i as u64, payload_bytes: 2 * 2 * 4096, part: 0, parts: 1 }.encode_with_runs(&runs, &mut frame);
        frame.resize(frame.len() + 2 * 2 * 4096, 0xEE);
        s.write_all(&frame).unwrap();
        assert_ne!(raw_peer::read_ack(&mut s).0, 0, "write {i} was taken");
    }
    row(&format!("after {REFUSED} refused writes of 16 KiB"), usage());
    prefill.write_cache("127.0.0.1", port, &[4], &[50], 1).unwrap();
    assert_eq!(dst.block(0, 1, 50), src.block(0, 1, 4), "the prefill was served throughout");
}
