//! A fake decode answering a prefill's handshake with lies: every field of its answer is checked before the
//! prefill uses it, each lie is a clear error, and the prefill goes on working with a real decode afterwards.

mod common;

use common::Cache;
use kvtransfer::control::ControlServer;
use kvtransfer::wire::{self, Reply, Request, TransportKind, Welcome, PROTOCOL_VERSION};
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportChoice};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn config(kind: TransportKind) -> Config {
    Config { transport: TransportChoice::Only(kind), timeouts: kvtransfer::Timeouts::all(Duration::from_secs(2)), ..Config::default() }
}

fn communicator(role: Role, cache: &Cache, kind: TransportKind) -> Communicator {
    let spec = CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config(kind)).unwrap()
}

/// A control server that greets like a decode without a token and answers every hello with `welcome`.
fn liar(welcome: Welcome) -> ControlServer {
    let log = Arc::new(kvtransfer::log::Logger::new(&Config::default(), "liar").unwrap());
    ControlServer::bind(&[[127, 0, 0, 1].into()], 0, Duration::from_secs(5), log, move |_, _| {
        let welcome = welcome.clone();
        move |req: &[u8]| {
            let reply = match wire::decode_request(req).unwrap() {
                Request::Greeting { .. } => Reply::Challenge { protocol: PROTOCOL_VERSION, nonce: [3; 16], proof: None },
                Request::Hello { .. } => Reply::Welcome { welcome: String::from_utf8(wire::encode(&welcome)).unwrap(), mac: None },
            };
            wire::encode(&reply)
        }
    })
    .unwrap()
}

fn welcome(transport: TransportKind, block_number: u32, details: Value) -> Welcome {
    Welcome { protocol: PROTOCOL_VERSION, block_number, transport, session: 1, details, channel_port: 1, channel_token: 1 }
}

/// Regions `[tensor][layer]` for a 2-layer cache of keys and values, `len` bytes each, at `addr`.
fn shm_regions(addr: u64, len: u64) -> Value {
    let layer = |t: u64| (0..2).map(|l| json!({ "addr": addr + (t * 2 + l) * len, "len": len })).collect::<Vec<_>>();
    json!([layer(0), layer(1), [], []])
}

#[test]
fn lies_in_the_answer_are_refused_and_harm_nothing() {
    let src = Cache::new(2, 2, 8, 1024, 1);
    let p = communicator(Role::Prefill, &src, TransportKind::Shm);
    let real = shm_regions(0x7f00_0000_0000, 8 * 1024);
    let lies: Vec<(&str, Welcome)> = vec![
        ("pid 0", welcome(TransportKind::Shm, 8, json!({ "pid": 0, "probe": 4096, "nonce": 5, "regions": real }))),
        ("liveness word 0", welcome(TransportKind::Shm, 8, json!({ "pid": std::process::id(), "probe": 4096, "nonce": 0, "regions": real }))),
        ("no liveness word", welcome(TransportKind::Shm, 8, json!({ "pid": std::process::id(), "probe": 0, "nonce": 5, "regions": real }))),
        ("a liveness word that is not there", welcome(TransportKind::Shm, 8, json!({ "pid": std::process::id(), "probe": 8, "nonce": 5, "regions": real }))),
        ("regions too short for its blocks", welcome(TransportKind::Shm, 8, json!({ "pid": 1, "probe": 8, "nonce": 5, "regions": shm_regions(0x1000, 1024) }))),
        ("one tensor too few", welcome(TransportKind::Shm, 8, json!({ "pid": 1, "probe": 8, "nonce": 5, "regions": [[], [], []] }))),
        ("2^32-1 blocks", welcome(TransportKind::Shm, u32::MAX, json!({ "pid": 1, "probe": 8, "nonce": 5, "regions": real }))),
        ("no blocks", welcome(TransportKind::Shm, 0, json!({ "pid": 1, "probe": 8, "nonce": 5, "regions": real }))),
        ("a transport not offered", welcome(TransportKind::Rdma, 8, json!({}))),
        ("details of another shape", welcome(TransportKind::Shm, 8, json!({ "port": 9 }))),
    ];
    // What each refusal must name, where the lie has a check of its own.
    let named = |lie: &str| match lie {
        "pid 0" => Some("process 0"),
        "liveness word 0" | "no liveness word" => Some("liveness word is missing"),
        _ => None,
    };
    for (lie, w) in lies {
        let server = liar(w);
        let err = p.connect("127.0.0.1", server.port(), 1).unwrap_err();
        assert!(matches!(err.code(), ErrorCode::Protocol | ErrorCode::InvalidArgument | ErrorCode::Transport), "{lie}: {err}");
        if let Some(reason) = named(lie) {
            assert!(err.message().contains(reason), "{lie}: {err}");
        }
        assert!(!p.is_connected("127.0.0.1", server.port()), "{lie}");
    }
    // A TCP answer that names a port where no decode's request channel is: refused, nothing kept.
    let t = communicator(Role::Prefill, &src, TransportKind::Tcp);
    let server = liar(welcome(TransportKind::Tcp, 8, json!({ "port": 1 })));
    assert!(t.connect("127.0.0.1", server.port(), 1).is_err());
    // The prefill goes on working with a real decode.
    let dst = Cache::new(2, 2, 8, 1024, 2);
    let d = communicator(Role::Decode, &dst, TransportKind::Shm);
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[1], &[2], 1).unwrap();
    assert_eq!(dst.block(1, 1, 2), src.block(1, 1, 1));
}
