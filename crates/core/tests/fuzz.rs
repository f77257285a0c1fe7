//! Fuzz targets: every parser that reads what a peer sends, fed the seed corpus (`fuzz/corpus/<target>/`, real
//! messages), mutations of it (bit flips, overwritten, inserted and removed bytes, truncations) and random
//! bytes. Each target must never panic, and what it accepts must keep its promises (runs inside the cache,
//! frames that re-encode to themselves, requests that stay bounded).
//!
//! A bounded run of each target is part of `cargo test` (`FUZZ_CASES`, default 4096 cases per target; CI runs
//! more). proptest keeps any failure it finds in `tests/fuzz.proptest-regressions`, which is committed and
//! replayed first: every finding stays a regression test.

mod common;

use kvtransfer::channel::{Frame, PeerInfo};
use kvtransfer::control::negotiation;
use kvtransfer::control;
use kvtransfer::communicator::requests::Requests;
use kvtransfer::memory::{CacheSpec, TensorSet};
use kvtransfer::plan::{self, Run, SliceGeometry};
use kvtransfer::admission::{self, ConnectionHello};
use kvtransfer::transport::frame::{self as tcp, Ack, WriteHeader};
use kvtransfer::transport::{cuda_ipc::IpcWelcome, from_details, rdma::RdmaWelcome, shm::ShmWelcome};
use kvtransfer::wire::{self, TransportKind};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, FileFailurePersistence};
use kvtransfer::log::Logger;
use kvtransfer::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4096)
}

fn config() -> RunnerConfig {
    RunnerConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..RunnerConfig::default()
    }
}

/// The seeds of `target`: every file of `fuzz/corpus/<target>/`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds.into_iter().map(|(_, b)| b).collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
            Mutation::Set(i, v) if len > 0 => bytes[i % len] = *v,
            Mutation::Insert(i, v) => {
                let at = i % (len + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(n) => bytes.truncate(n % (len + 1)),
            _ => {}
        }
    }
    bytes
}

/// Seeds with up to eight mutations each, and random bytes.
fn inputs(target: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    let n = seeds.len();
    prop_oneof![
        4 => (0..n, proptest::collection::vec(mutation(), 0..8)).prop_map(move |(i, m)| apply(seeds[i].clone(), &m)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// A decode cache of 2 layers × keys and values × 8 blocks of 1 KiB, as the parsers check against.
fn cache() -> (common::Cache, kvtransfer::memory::CacheLayout) {
    let c = common::Cache::new(2, 2, 8, 1024, 1);
    let layout = common::layout(CacheSpec { key: c.addrs(0), value: c.addrs(1), block_number: 8, block_bytes: 1024, ..CacheSpec::default() });
    (c, layout)
}

#[test]
fn the_seeds_are_messages_of_this_version() {
    // A seed that no longer parses (an older version's) would leave its target fuzzing garbage only.
    for seed in corpus("handshake") {
        let mut rest = &seed[..];
        let body = control::read_frame(|buf| std::io::Read::read_exact(&mut rest, buf), control::MAX_REQUEST_BYTES);
        let body = body.ok().filter(|b| b.len() + 4 == seed.len()).unwrap_or_else(|| seed.clone());
        // A refusal parses into the error it carries.
        let reply = wire::decode_reply(&body).map_err(|e| e.code() != kvtransfer::ErrorCode::Protocol);
        let parsed = wire::decode_request(&body).is_ok() || matches!(reply, Ok(_) | Err(true)) || wire::decode_hello(&body).is_ok();
        assert!(parsed, "handshake seed {:?}", String::from_utf8_lossy(&seed));
    }
    for seed in corpus("welcome") {
        wire::decode_welcome(&seed).unwrap_or_else(|e| panic!("welcome seed: {e}"));
    }
    for seed in corpus("channel") {
        Frame::decode(&seed[4..], 8).unwrap_or_else(|e| panic!("channel seed {seed:02x?}: {e}"));
    }
    for seed in corpus("tcp") {
        let ok = match &seed[..4] {
            b"KVTD" | b"KVTN" => ConnectionHello::decode(seed[..4].try_into().unwrap(), seed[..].try_into().unwrap())
                .is_ok_and(|h| h.protocol == wire::PROTOCOL_VERSION),
            b"KVTA" => Ack::decode_fixed(seed[..tcp::ACK_LEN].try_into().unwrap()).is_ok(),
            b"KVTW" => WriteHeader::decode(seed[..tcp::WRITE_HEADER_LEN].try_into().unwrap()).is_ok(),
            _ => false,
        };
        assert!(ok, "tcp seed {seed:02x?}");
    }
}

#[test]
fn handshake_messages() {
    let (_memory, layout) = cache();
    proptest!(config(), |(bytes in inputs("handshake"))| {
        // The control port's framing, then the message: as the decode reads a request.
        let mut rest = &bytes[..];
        if let Ok(body) = control::read_frame(|buf| std::io::Read::read_exact(&mut rest, buf), control::MAX_REQUEST_BYTES) {
            prop_assert!(body.len() <= control::MAX_REQUEST_BYTES);
            prop_assert_eq!(&bytes[4..4 + body.len()], &body[..]);
            let _ = wire::decode_request(&body);
        }
        let _ = wire::decode_request(&bytes);
        let _ = wire::decode_reply(&bytes);
        if let Ok(hello) = wire::decode_hello(&bytes) {
            if let Ok(agreed) = negotiation::check_hello(&hello, &layout) {
                // What the decode agrees to fits its cache.
                prop_assert!(agreed.geometry.ratio >= 1 && agreed.geometry.slot < agreed.geometry.ratio);
            }
        }
    });
}

#[test]
fn the_decode_answer_as_the_prefill_reads_it() {
    let (_memory, layout) = cache();
    proptest!(config(), |(bytes in inputs("welcome"), ratio in 1u32..4)| {
        let Ok(welcome) = wire::decode_welcome(&bytes) else { return Ok(()) };
        let _ = negotiation::check_welcome(&welcome, &TransportKind::ALL);
        let check = |lens: Vec<Vec<u64>>| plan::check_remote_layout(&lens, &layout, ratio, welcome.block_number);
        if let Ok(shm) = from_details::<ShmWelcome>(TransportKind::Shm, &welcome.details) {
            let _ = check(shm.regions.iter().map(|l| l.iter().map(|r| r.len).collect()).collect());
        }
        if let Ok(ipc) = from_details::<IpcWelcome>(TransportKind::CudaIpc, &welcome.details) {
            let _ = check(ipc.regions.iter().map(|l| l.iter().map(|r| r.len).collect()).collect());
        }
        if let Ok(rdma) = from_details::<RdmaWelcome>(TransportKind::Rdma, &welcome.details) {
            let _ = kvtransfer::transport::rdma::registration::check_remote(&rdma.regions, &layout, ratio, welcome.block_number);
        }
    });
}

#[test]
fn tcp_frames_and_run_tables() {
    proptest!(config(), |(bytes in inputs("tcp"), block_number in 1u32..64, ratio in 1u32..4)| {
        if let Ok(hello) = <&[u8; admission::HELLO_LEN]>::try_from(&bytes[..bytes.len().min(admission::HELLO_LEN)]) {
            for magic in [tcp::HELLO_MAGIC, kvtransfer::channel::frame::HELLO_MAGIC] {
                if let Ok(parsed) = ConnectionHello::decode(magic, hello) {
                    prop_assert_eq!(&parsed.encode(), hello);
                }
            }
        }
        if let Ok(fixed) = <&[u8; tcp::ACK_LEN]>::try_from(&bytes[..bytes.len().min(tcp::ACK_LEN)]) {
            let _ = Ack::decode_fixed(fixed);
        }
        let Ok(raw) = <&[u8; tcp::WRITE_HEADER_LEN]>::try_from(&bytes[..bytes.len().min(tcp::WRITE_HEADER_LEN)]) else { return Ok(()) };
        let Ok(header) = WriteHeader::decode(raw) else { return Ok(()) };
        prop_assert!(header.runs <= tcp::MAX_RUNS);
        let mut runs = Vec::new();
        let table = &bytes[tcp::WRITE_HEADER_LEN..];
        tcp::decode_runs(&table[..table.len() - table.len() % tcp::RUN_LEN], &mut runs);
        let mut sorted = Vec::new();
        let Ok(blocks) = plan::check_remote_runs(&runs, block_number, &mut sorted) else { return Ok(()) };
        // What the receiver accepts stays inside the cache: every segment it would read into.
        prop_assert!(blocks <= block_number as u64);
        let geometry = SliceGeometry { ratio, slot: 0 };
        let slice = 1024u64;
        let tensor_bytes = block_number as u64 * ratio as u64 * slice;
        let mut total = 0;
        plan::for_each_segment(&runs, TensorSet::from_bits(0b11).unwrap(), |_| slice, geometry, |s| {
            assert!(s.remote + s.len <= tensor_bytes, "segment {s:?} leaves a {tensor_bytes}-byte tensor");
            total += s.len;
        });
        prop_assert_eq!(total, 2 * blocks * slice);
    });
}

#[test]
fn request_channel_frames() {
    let log = Arc::new(Logger::new(&Config::default(), "fuzz").unwrap());
    let requests = Requests::new(2, 8, 1024, Duration::from_secs(60), log, std::sync::Arc::new(kvtransfer::metrics::Instruments::new(kvtransfer::Role::Decode)));
    let peer = PeerInfo { name: "fuzz".into(), slot: 0, ratio: 1, transport: TransportKind::Tcp, session: 1, process: None, instance: None, address: None, metrics: Default::default() };
    let link = std::cell::Cell::new(0u64);
    proptest!(config(), |(bytes in inputs("channel"))| {
        // A frame as the channel reads it: a length, then that many bytes.
        let body = bytes.get(4..).unwrap_or_default();
        let Ok(frame) = Frame::decode(body, 8) else { return Ok(()) };
        let mut again = Vec::new();
        frame.encode(&mut again);
        let back = Frame::decode(&again[4..], 8);
        prop_assert_eq!(back.as_ref(), Ok(&frame));
        if frame.from_prefill() {
            let n = link.get() + 1;
            link.set(n);
            // A table fed anything a prefill can send stays usable.
            let _ = requests.on_frame(n % 4, &peer, frame);
            if n % 64 == 0 {
                requests.on_link_end(n % 4, &peer, "fuzz");
            }
        }
    });
}

/// The slots of the shared-memory ring: the same header and run table as a TCP write, then the payload, read
/// by the decode's ring thread. Whatever a slot says, nothing outside the cache changes, and a refused slot
/// changes nothing at all.
#[test]
fn shm_ring_slots() {
    use kvtransfer::transport::shm::ring::{RingSession, SlotReader, SLOT_BYTES};
    const GUARD: usize = 4096;
    let log = Arc::new(Logger::new(&Config::default(), "fuzz").unwrap());
    proptest!(config(), |(bytes in inputs("tcp"), ratio in prop::sample::select(vec![1u32, 2, 4]), keys_only in any::<bool>())| {
        // 2 layers × (keys, values) × 8 blocks of 1 KiB, each tensor between guard bytes.
        let tensor = 8 * 1024;
        let mut memory = vec![0x5Au8; 4 * (GUARD + tensor) + GUARD];
        let base = memory.as_mut_ptr() as u64;
        let at = |i: u64| base + GUARD as u64 + i * (GUARD + tensor) as u64;
        let spec = CacheSpec {
            key: vec![at(0), at(1)],
            value: if keys_only { vec![] } else { vec![at(2), at(3)] },
            block_number: 8,
            block_bytes: 1024,
            ..CacheSpec::default()
        };
        let layout = Arc::new(common::layout(spec));
        let session = RingSession { cache: layout.clone(), tensors: layout.tensors(), geometry: SliceGeometry { ratio, slot: 0 }, peer: "fuzz".into(), log: log.clone() };
        let mut slot = vec![0u8; SLOT_BYTES];
        slot[..bytes.len().min(SLOT_BYTES)].copy_from_slice(&bytes[..bytes.len().min(SLOT_BYTES)]);
        let before = memory.clone();
        let taken = SlotReader::default().check_and_copy(&slot, &session);
        let changed: Vec<usize> = (0..memory.len()).filter(|&i| memory[i] != before[i]).collect();
        let inside = |i: &usize| (0..4).any(|t| (at(t) - base) as usize <= *i && *i < (at(t) - base) as usize + tensor) && (!keys_only || *i < (at(2) - base) as usize);
        prop_assert!(changed.iter().all(inside), "a slot changed bytes outside the cache: {:?}", &changed[..changed.len().min(8)]);
        if taken.is_err() {
            prop_assert!(changed.is_empty(), "a refused slot changed {} bytes", changed.len());
        }
    });
}

#[test]
fn forged_runs_found_so_far_stay_refused() {
    // Kept from earlier findings: overlapping runs, a run past the cache, a count that overflows.
    let mut sorted = Vec::new();
    for runs in [
        vec![Run { local: 0, remote: 2, count: 2 }, Run { local: 0, remote: 3, count: 1 }],
        vec![Run { local: 0, remote: 7, count: 2 }],
        vec![Run { local: 0, remote: u32::MAX, count: 2 }],
        vec![Run { local: 0, remote: 1, count: u32::MAX }],
    ] {
        assert!(plan::check_remote_runs(&runs, 8, &mut sorted).is_err(), "{runs:?}");
    }
}
