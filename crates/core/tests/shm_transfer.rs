//! The shared-memory transport (`process_vm_writev` into the decode process), between communicators of one
//! process: the bytes that land, what auto picks, and what happens once the decode side has closed.

mod common;

use common::Cache;
use kvtransfer::memory::CacheSpec;
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportChoice, TransportKind};
use std::time::Duration;

fn config(transport: TransportChoice) -> Config {
    Config { transport, timeouts: kvtransfer::Timeouts::all(Duration::from_secs(5)), ..Config::default() }
}

fn decode(cache: CacheSpec, transport: TransportChoice) -> Communicator {
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config(transport)).unwrap()
}

fn prefill(cache: CacheSpec, tp_size: u32, tp_idx: u32, transport: TransportChoice) -> Communicator {
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache), tp_size, tp_idx };
    Communicator::new(spec, config(transport)).unwrap()
}

fn link_of(p: &Communicator, port: u16) -> String {
    p.connected_transport("127.0.0.1", port).expect("connected").to_string()
}

#[test]
fn all_layers_scattered_keys_and_values() {
    let src = Cache::new(2, 3, 2048, 1024, 1);
    let dst = Cache::new(2, 3, 2048, 1024, 2);
    let d = decode(dst.spec(), TransportChoice::Only(TransportKind::Shm));
    let p = prefill(src.spec(), 1, 0, TransportChoice::Only(TransportKind::Shm));
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    assert_eq!(link_of(&p, d.port()), "shm");
    // 1538 scattered ids (more than one system call's 1024 ranges) plus a contiguous run.
    let local: Vec<u32> = (0..1538).map(|i| (i * 7 + 3) % 2048).collect();
    let remote: Vec<u32> = (0..1538).map(|i| (i * 11 + 5) % 2048).collect();
    for layer in 0..3 {
        p.write_cache("127.0.0.1", d.port(), &local, &remote, layer).unwrap();
    }
    p.write_cache("127.0.0.1", d.port(), &[100, 101, 102], &[2000, 2001, 2002], 2).unwrap();
    for layer in 0..3 {
        for t in 0..2 {
            // Blocks 2000..2003 of layer 2 are written again below.
            for (l, r) in local.iter().zip(&remote).filter(|(_, &r)| layer != 2 || !(2000..2003).contains(&r)) {
                assert_eq!(dst.block(t, layer, *r), src.block(t, layer, *l), "tensor {t} layer {layer} {l}->{r}");
            }
        }
    }
    assert_eq!(dst.block(1, 2, 2001), src.block(1, 2, 101));
}

#[test]
fn a_large_write_split_over_threads_lands_every_byte() {
    // 32 MiB in one call: over the size at which a write is cut into parts for several threads. The first 600
    // blocks are one contiguous run (one range of 18.75 MiB, which every cut into two to four parts splits),
    // the rest single blocks in reverse.
    let src = Cache::new(1, 1, 1024, 32 << 10, 7);
    let dst = Cache::new(1, 1, 1024, 32 << 10, 8);
    let d = decode(dst.spec(), TransportChoice::Only(TransportKind::Shm));
    let p = prefill(src.spec(), 1, 0, TransportChoice::Only(TransportKind::Shm));
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    let local: Vec<u32> = (0..1024).collect();
    let rest = (0..200).chain(800..1024).rev();
    let remote: Vec<u32> = (200..800).chain(rest).collect();
    p.write_cache("127.0.0.1", d.port(), &local, &remote, 0).unwrap();
    for (l, r) in local.iter().zip(&remote) {
        assert!(dst.block(0, 0, *r) == src.block(0, 0, *l), "{l}->{r}");
    }
}

#[test]
fn key_only_and_hetero_tp() {
    // Two prefill ranks with half-size blocks fill the two halves of each decode block.
    let dst = Cache::new(1, 2, 32, 2048, 3);
    let d = decode(dst.spec(), TransportChoice::Only(TransportKind::Shm));
    let halves: Vec<Cache> = (0..2).map(|r| Cache::new(1, 2, 32, 1024, 10 + r)).collect();
    for (rank, src) in halves.iter().enumerate() {
        let p = prefill(src.spec(), 2, rank as u32, TransportChoice::Only(TransportKind::Shm));
        p.connect("127.0.0.1", d.port(), 1).unwrap();
        p.write_cache("127.0.0.1", d.port(), &[4, 9], &[30, 1], 1).unwrap();
    }
    for (l, r) in [(4u32, 30u32), (9, 1)] {
        let block = dst.block(0, 1, r);
        assert_eq!(&block[..1024], halves[0].block(0, 1, l));
        assert_eq!(&block[1024..], halves[1].block(0, 1, l));
    }
}

#[test]
fn auto_picks_shm_on_one_host_and_tcp_when_the_decode_lacks_it() {
    let src = Cache::new(2, 1, 8, 256, 5);
    let dst = Cache::new(2, 1, 8, 256, 6);
    let p = prefill(src.spec(), 1, 0, TransportChoice::Auto);
    let shm_decode = decode(dst.spec(), TransportChoice::Auto);
    p.connect("127.0.0.1", shm_decode.port(), 1).unwrap();
    assert_eq!(link_of(&p, shm_decode.port()), "shm");
    p.write_cache("127.0.0.1", shm_decode.port(), &[1], &[2], 0).unwrap();
    assert_eq!(dst.block(0, 0, 2), src.block(0, 0, 1));
    drop(shm_decode);

    let other = Cache::new(2, 1, 8, 256, 7);
    let tcp_decode = decode(other.spec(), TransportChoice::Only(TransportKind::Tcp));
    p.connect("127.0.0.1", tcp_decode.port(), 1).unwrap();
    assert_eq!(link_of(&p, tcp_decode.port()), "tcp");
    p.write_cache("127.0.0.1", tcp_decode.port(), &[3], &[4], 0).unwrap();
    assert_eq!(other.block(1, 0, 4), src.block(1, 0, 3));
    assert_eq!(p.transport(), TransportKind::Shm);
}

#[test]
fn nothing_lands_after_the_decode_closed() {
    let src = Cache::new(2, 1, 8, 256, 8);
    let dst = Cache::new(2, 1, 8, 256, 9);
    let d = decode(dst.spec(), TransportChoice::Only(TransportKind::Shm));
    let port = d.port();
    let p = prefill(src.spec(), 1, 0, TransportChoice::Only(TransportKind::Shm));
    p.connect("127.0.0.1", port, 1).unwrap();
    d.close().unwrap();
    let before = dst.snapshot();
    let err = p.write_cache("127.0.0.1", port, &[1], &[2], 0).unwrap_err();
    // It closed: the write tries to reconnect (by the policy), and nothing listens there.
    assert_eq!(err.code(), ErrorCode::Unreachable, "{err}");
    assert!(err.message().contains("closed"), "{err}");
    assert_eq!(dst.snapshot(), before);
    assert!(!p.is_connected("127.0.0.1", port));
}

#[test]
fn shm_refuses_what_it_cannot_move() {
    // A decode that only speaks shm and a prefill that only speaks tcp have nothing in common.
    let src = Cache::new(2, 1, 8, 256, 1);
    let dst = Cache::new(2, 1, 8, 256, 2);
    let d = decode(dst.spec(), TransportChoice::Only(TransportKind::Shm));
    let p = prefill(src.spec(), 1, 0, TransportChoice::Only(TransportKind::Tcp));
    let err = p.connect("127.0.0.1", d.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.message().contains("no common transport"), "{err}");
}

#[path = "common/raw_peer.rs"]
mod raw_peer;

#[test]
fn a_same_host_claim_over_tcp_gets_no_same_host_transport_and_cannot_stall_revoke() {
    use kvtransfer::channel::RequestId;
    use kvtransfer::wire::{self, Offer, Reply};
    let dst = Cache::new(2, 1, 8, 256, 2);
    let d = decode(dst.spec(), TransportChoice::Auto);
    assert!(d.transports().contains(&TransportKind::Shm), "{:?}", d.transports());
    // A process of this host that lives on and is not the peer: what a liar names as itself.
    let mut bystander = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let mut hello = common::hello(1, 256);
    hello.offers.insert(0, Offer { transport: TransportKind::Shm, details: serde_json::Value::Null });
    hello.host = Some(raw_peer::this_host());
    hello.pid = Some(bystander.id());
    // Over TCP (from this host, but an address says nothing about which process it is).
    let control = std::net::TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    let Reply::Welcome { welcome, .. } = raw_peer::handshake_over(control, &hello) else { panic!("no welcome") };
    let welcome = wire::decode_welcome(welcome.as_bytes()).unwrap();
    assert_eq!(welcome.transport, TransportKind::Tcp, "a claim of this host's id and a pid is only a claim");
    // Its request channel opens, then ends without a goodbye.
    raw_peer::open_channel_and_vanish(&welcome);
    // Its link was cut off: a revoke does not wait for the process it named.
    let started = std::time::Instant::now();
    d.revoke(&RequestId::new("r").unwrap()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "revoke took {:?}", started.elapsed());
    // Offering shm alone over TCP is refused.
    hello.offers.remove(1);
    let control = std::net::TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    let err = std::panic::catch_unwind(|| raw_peer::handshake_over(control, &hello)).unwrap_err();
    let why = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(why.contains("refused"), "{why}");
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn over_its_hosts_unix_socket_a_prefill_is_the_process_the_kernel_names() {
    use kvtransfer::channel::RequestId;
    use kvtransfer::listener::connection;
    use kvtransfer::wire::{self, Offer, Reply};
    let dst = Cache::new(2, 1, 8, 256, 2);
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(dst.spec()), tp_size: 1, tp_idx: 0 };
    let d = Communicator::new(spec, Config { timeouts: kvtransfer::Timeouts::all(Duration::from_secs(1)), ..config(TransportChoice::Auto) }).unwrap();
    // A process that has ended: what this peer names as itself.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let mut hello = common::hello(1, 256);
    hello.offers.insert(0, Offer { transport: TransportKind::Shm, details: serde_json::Value::Null });
    hello.pid = Some(gone_pid);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], d.port()));
    let control = connection::connect_local(&connection::local_name("control", addr)).unwrap();
    let Reply::Welcome { welcome, .. } = raw_peer::handshake_over(control, &hello) else { panic!("no welcome") };
    let welcome = wire::decode_welcome(welcome.as_bytes()).unwrap();
    assert_eq!(welcome.transport, TransportKind::Shm, "a process of this host, of this user, named by the kernel");
    // Its request channel ends without a goodbye: a same-host link that cannot be cut off while its process
    // lives. That process is this one (the kernel's word), not the one that ended (the hello's): revoke must say
    // it could not stop it.
    raw_peer::open_channel_and_vanish(&welcome);
    let err = d.revoke(&RequestId::new("r").unwrap()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Timeout, "{err}");
    assert!(err.message().contains("(shm)"), "{err}");
    // An honest prefill dialing an address of this host takes shm too, and its writes land.
    let src = Cache::new(2, 1, 8, 256, 1);
    let fresh = Cache::new(2, 1, 8, 256, 3);
    let d2 = decode(fresh.spec(), TransportChoice::Auto);
    let p = prefill(src.spec(), 1, 0, TransportChoice::Auto);
    p.connect("127.0.0.1", d2.port(), 1).unwrap();
    assert_eq!(link_of(&p, d2.port()), "shm");
    p.write_cache("127.0.0.1", d2.port(), &[3], &[5], 0).unwrap();
    assert_eq!(fresh.block(1, 0, 5), src.block(1, 0, 3));
}
