//! Mutual authentication with KVCACHE_AUTH_TOKEN, played from both sides: strangers, wrong tokens, fake decodes,
//! replays. Every refusal leaves the decode's cache as it was and says nothing about it.

mod common;

use common::Cache;
use kvtransfer::auth::{AuthKey, Role as Proof};
use kvtransfer::control::ControlClient;
use kvtransfer::wire::{self, Reply, Request, TransportKind, PROTOCOL_VERSION};
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Setting, SettingValue, TransportChoice};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c";

fn config(token: Option<&str>, error_file: Option<std::path::PathBuf>) -> Config {
    let overrides: Vec<(Setting, SettingValue)> = token.map(|t| (Setting::AuthToken, t.into())).into_iter().collect();
    Config {
        transport: TransportChoice::Only(TransportKind::Tcp),
        timeouts: kvtransfer::Timeouts::all(Duration::from_secs(3)),
        error_file,
        ..Config::load_from(|_| None, &overrides).unwrap()
    }
}

fn decode(cache: &Cache, config: Config) -> Communicator {
    let spec = CommunicatorSpec { role: kvtransfer::Role::Decode, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config).unwrap()
}

fn prefill(cache: &Cache, config: Config) -> Communicator {
    let spec = CommunicatorSpec { role: kvtransfer::Role::Prefill, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config).unwrap()
}

fn error_log(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("kvt-auth-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn peers_with_the_same_token_connect_and_write() {
    let (src, dst) = (Cache::new(2, 2, 8, 64, 1), Cache::new(2, 2, 8, 64, 2));
    let d = decode(&dst, config(Some(TOKEN), None));
    let p = prefill(&src, config(Some(TOKEN), None));
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    p.write_cache("127.0.0.1", d.port(), &[3, 4], &[6, 0], 1).unwrap();
    assert_eq!(dst.block(1, 1, 6), src.block(1, 1, 3));
    assert_eq!(dst.block(0, 1, 0), src.block(0, 1, 4));
}

#[test]
fn a_prefill_without_the_token_is_refused_and_learns_nothing_about_the_cache() {
    let dst = Cache::new(2, 2, 8, 64, 3);
    let log = error_log("stranger");
    let d = decode(&dst, config(Some(TOKEN), Some(log.clone())));
    let before = dst.snapshot();
    // A stranger whose cache does not even match: it hears about authentication, not about layers or blocks.
    let stranger = prefill(&Cache::new(2, 3, 8, 64, 4), config(None, None));
    let err = stranger.connect("127.0.0.1", d.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    assert!(err.message().contains("requires KVCACHE_AUTH_TOKEN"), "{err}");
    for word in ["layer", "block", "tensor", "64", "rdma", "tcp"] {
        assert!(!err.message().to_lowercase().contains(word), "the refusal mentions {word:?}: {err}");
    }
    let wrong = prefill(&Cache::new(2, 2, 8, 64, 5), config(Some("0000000000000000ffffffffffffffff"), None));
    let err = wrong.connect("127.0.0.1", d.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    assert!(err.message().contains("did not prove it holds KVCACHE_AUTH_TOKEN"), "a wrong token fails on the prefill side first: {err}");
    assert_eq!(dst.snapshot(), before);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("did not prove it holds it"), "{logged}");
    assert!(!logged.contains(TOKEN));
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_decode_without_the_token_is_sent_nothing() {
    let dst = Cache::new(2, 2, 8, 64, 6);
    let log = error_log("fake");
    let fake = decode(&dst, config(None, Some(log.clone())));
    let p = prefill(&Cache::new(2, 2, 8, 64, 7), config(Some(TOKEN), None));
    let err = p.connect("127.0.0.1", fake.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    assert!(err.message().contains("nothing was sent to it"), "{err}");
    assert!(!p.is_connected("127.0.0.1", fake.port()));
}

fn test_log() -> Arc<kvtransfer::log::Logger> {
    Arc::new(kvtransfer::log::Logger::new(&Config::default(), "fake decode").unwrap())
}

/// A raw peer that speaks the handshake by hand: greeting, then a hello signed with `token` (if any) over the
/// hello's text; `tamper` may then change the text sent, and `replay` send another handshake's text and MAC.
fn hand_handshake(
    port: u16,
    token: Option<&str>,
    tamper: impl Fn(&str) -> String,
    replay: Option<(String, [u8; 32])>,
) -> (Result<Reply, kvtransfer::Error>, String, [u8; 32], [u8; 16]) {
    let mut c = ControlClient::connect("127.0.0.1", port, Duration::from_secs(3)).unwrap();
    let prefill_nonce = [42u8; 16];
    let greeting = wire::encode(&Request::Greeting { protocol: PROTOCOL_VERSION, nonce: prefill_nonce });
    let Ok(Reply::Challenge { nonce: decode_nonce, .. }) = wire::decode_reply(&c.ask(&greeting).unwrap()) else { panic!("no challenge") };
    let hello = wire::Hello { dialed: Some(c.reached()), ..common::hello(2, 64) };
    let text = String::from_utf8(wire::encode(&hello)).unwrap();
    let mac = token.map(|t| AuthKey::new(t).sign(Proof::PrefillHello, &prefill_nonce, &decode_nonce, text.as_bytes())).unwrap_or([0; 32]);
    let (text, mac) = replay.unwrap_or((tamper(&text), mac));
    let reply = wire::decode_reply(&c.ask(&wire::encode(&Request::Hello { hello: text.clone(), mac: Some(mac) })).unwrap());
    (reply, text, mac, decode_nonce)
}

#[test]
fn a_signed_hello_cannot_be_replayed_or_altered() {
    let dst = Cache::new(2, 2, 8, 64, 8);
    let d = decode(&dst, config(Some(TOKEN), Some(error_log("replay"))));
    let unchanged = |t: &str| t.to_string();
    let (reply, text, mac, _) = hand_handshake(d.port(), Some(TOKEN), unchanged, None);
    assert!(matches!(reply, Ok(Reply::Welcome { mac: Some(_), .. })), "{reply:?}");
    // The same bytes and MAC on a new connection: the decode's nonce differs, so the MAC does not hold.
    let (replayed, ..) = hand_handshake(d.port(), Some(TOKEN), unchanged, Some((text, mac)));
    assert_eq!(replayed.unwrap_err().code(), ErrorCode::Unauthenticated);
    // Signed over this handshake's nonces, then one field changed before sending: the MAC covers the text.
    let (altered, ..) = hand_handshake(d.port(), Some(TOKEN), |t| t.replace("\"block_number\":8", "\"block_number\":9"), None);
    assert_eq!(altered.unwrap_err().code(), ErrorCode::Unauthenticated);
}

/// A decode that proves it holds the token but answers the hello with a welcome not signed with it (as a relay
/// that changed the welcome would): the prefill must not use it.
#[test]
fn a_welcome_that_is_not_signed_is_not_used() {
    use kvtransfer::control::ControlServer;
    use std::sync::Mutex;
    let key = AuthKey::new(TOKEN);
    let nonces = Arc::new(Mutex::new(([0u8; 16], [7u8; 16])));
    let server = ControlServer::bind(&[[127, 0, 0, 1].into()], 0, Duration::from_secs(5), test_log(), move |_, _| {
        let (nonces, key) = (nonces.clone(), key.clone());
        move |req: &[u8]| {
            let reply = match wire::decode_request(req).unwrap() {
                Request::Greeting { nonce, .. } => {
                    let decode = nonces.lock().unwrap().1;
                    nonces.lock().unwrap().0 = nonce;
                    Reply::Challenge { protocol: PROTOCOL_VERSION, nonce: decode, proof: Some(key.sign(Proof::DecodeChallenge, &nonce, &decode, b"")) }
                }
                Request::Hello { .. } => {
                    let welcome = wire::Welcome { protocol: PROTOCOL_VERSION, block_number: 8, transport: TransportKind::Tcp, session: 1, details: serde_json::json!({ "port": 9 }), channel_port: 9, channel_token: 1 };
                    Reply::Welcome { welcome: String::from_utf8(wire::encode(&welcome)).unwrap(), mac: Some([0; 32]) }
                }
            };
            wire::encode(&reply)
        }
    })
    .unwrap();
    let p = prefill(&Cache::new(2, 2, 8, 64, 10), config(Some(TOKEN), None));
    let err = p.connect("127.0.0.1", server.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    assert!(err.message().contains("not signed with KVCACHE_AUTH_TOKEN"), "{err}");
}

#[test]
fn a_hello_without_a_greeting_is_refused() {
    let dst = Cache::new(2, 2, 8, 64, 9);
    let d = decode(&dst, config(None, Some(error_log("nogreeting"))));
    let hello = wire::encode(&Request::Hello { hello: "{}".into(), mac: None });
    let err = wire::decode_reply(&kvtransfer::control::request("127.0.0.1", d.port(), &hello, Duration::from_secs(3)).unwrap()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Protocol);
    assert!(err.message().contains("without a greeting"), "{err}");
}

#[test]
fn a_second_greeting_on_one_connection_is_refused() {
    let dst = Cache::new(2, 2, 8, 64, 11);
    let d = decode(&dst, config(None, Some(error_log("twice"))));
    let mut c = ControlClient::connect("127.0.0.1", d.port(), Duration::from_secs(3)).unwrap();
    let greeting = wire::encode(&Request::Greeting { protocol: PROTOCOL_VERSION, nonce: [1; 16] });
    assert!(matches!(wire::decode_reply(&c.ask(&greeting).unwrap()), Ok(Reply::Challenge { .. })));
    let err = wire::decode_reply(&c.ask(&greeting).unwrap()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Protocol);
    assert!(err.message().contains("second greeting"), "{err}");
}

#[test]
fn a_data_connection_opens_only_with_the_proof_of_its_own_handshake() {
    use kvtransfer::admission::ConnectionHello;
    use kvtransfer::transport::frame;
    use std::io::{Read, Write};
    let dst = Cache::new(2, 2, 8, 64, 12);
    let d = decode(&dst, config(Some(TOKEN), Some(error_log("data-proof"))));
    // What the decode answers a data connection that presents `session` with `proof`: 0, or a refusal's code.
    let open = |port: u16, session: u64, proof: [u8; 32]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token: session, proof }.encode()).unwrap();
        let mut ack = [0u8; frame::HELLO_ACK_LEN];
        s.read_exact(&mut ack).unwrap();
        frame::decode_hello_ack(&ack).err().map(|e| e.message().to_string())
    };
    let welcome = |reply: Result<Reply, kvtransfer::Error>| match reply {
        Ok(Reply::Welcome { welcome, .. }) => wire::decode_welcome(welcome.as_bytes()).unwrap(),
        other => panic!("{other:?}"),
    };
    let key = AuthKey::new(TOKEN);
    let (reply, .., decode_nonce) = hand_handshake(d.port(), Some(TOKEN), |t| t.to_string(), None);
    let w = welcome(reply);
    let port = w.details["port"].as_u64().unwrap() as u16;
    // Someone who saw the session name on the way, without the token: refused, and the name is used up.
    assert!(open(port, w.session, [0; 32]).is_some(), "a data hello without the proof is refused");
    let proof = key.sign(Proof::DataHello, &[42; 16], &decode_nonce, &w.session.to_be_bytes());
    assert!(open(port, w.session, proof).is_some(), "a refused session cannot be opened again");
    // The proof of another handshake (another decode nonce) does not open it either; its own does.
    let (reply, ..) = hand_handshake(d.port(), Some(TOKEN), |t| t.to_string(), None);
    let w = welcome(reply);
    assert!(open(port, w.session, proof).is_some());
    let (reply, .., other_nonce) = hand_handshake(d.port(), Some(TOKEN), |t| t.to_string(), None);
    let w2 = welcome(reply);
    let theirs = key.sign(Proof::DataHello, &[42; 16], &other_nonce, &w2.session.to_be_bytes());
    assert_eq!(open(port, w2.session, theirs), None, "its own handshake's proof opens it");
}

/// Forwards every connection to `listener` to port `to` of loopback, both ways, as a relay (or a NAT) does.
fn relay(listener: std::net::TcpListener, to: u16) {
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A relay takes a prefill's connection to one decode to another that shares the token: the hello names the
/// address the prefill dialed (signed, so the relay cannot change it), and the decode it came to refuses it,
/// unless that decode answers to the address (a NAT or a forwarded port in front of it, `KVCACHE_ANSWERS_TO`).
#[test]
fn a_prefill_relayed_to_another_decode_is_refused_unless_it_answers_to_the_address_dialed() {
    let dst = Cache::new(2, 2, 8, 64, 13);
    let before = dst.snapshot();
    let d = decode(&dst, config(Some(TOKEN), Some(error_log("relay"))));
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dialed = front.local_addr().unwrap();
    relay(front, d.port());
    let src = Cache::new(2, 2, 8, 64, 14);
    let p = prefill(&src, config(Some(TOKEN), None));
    let err = p.connect("127.0.0.1", dialed.port(), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Rejected, "{err}");
    let came_to = format!("127.0.0.1:{}", d.port());
    assert!(err.message().contains(&format!("dialed {dialed}")) && err.message().contains(&came_to), "{err}");
    assert!(err.message().contains("KVCACHE_ANSWERS_TO"), "the refusal says how a NAT is allowed: {err}");
    assert!(!p.is_connected("127.0.0.1", dialed.port()));
    assert_eq!(dst.snapshot(), before, "nothing was written");
    // Dialed directly, the same prefill is admitted; so it is at the same address written as IPv6 (where this
    // kernel has IPv6), which the connection reaches as the IPv4 address it is.
    p.connect("127.0.0.1", d.port(), 1).unwrap();
    if std::net::TcpStream::connect(("::ffff:127.0.0.1", d.port())).is_ok() {
        p.connect("::ffff:127.0.0.1", d.port(), 1).unwrap();
    }
    // A decode that answers to the front's address admits a prefill that dials it there; the bytes arrive.
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dialed = front.local_addr().unwrap();
    let nat = decode(&dst, Config { answers_to: vec![dialed], ..config(Some(TOKEN), None) });
    relay(front, nat.port());
    p.connect("127.0.0.1", dialed.port(), 1).unwrap();
    p.write_cache("127.0.0.1", dialed.port(), &[3, 4], &[6, 0], 1).unwrap();
    assert_eq!(dst.block(1, 1, 6), src.block(1, 1, 3));
    assert_eq!(dst.block(0, 1, 0), src.block(0, 1, 4));
}
