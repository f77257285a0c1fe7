//! A prefill spoken by hand, as a hostile or buggy peer would: the handshake, a raw data connection, its acks
//! (included by path next to `common`).
#![allow(dead_code)]

use kvtransfer::channel::{ChannelClient, Directive};
use kvtransfer::control;
use kvtransfer::admission::ConnectionHello;
use kvtransfer::transport::frame;
use kvtransfer::wire::{self, Hello, Reply, Request, Welcome, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::time::Duration;

/// The decode's welcome to a TCP prefill of `layers` layers of `block_bytes` blocks (without a token).
pub fn handshake(port: u16, layers: u32, block_bytes: u64) -> Welcome {
    handshake_hello(port, &crate::common::hello(layers, block_bytes))
}

/// The decode's welcome to `hello` (without a token).
pub fn handshake_hello(port: u16, hello: &Hello) -> Welcome {
    let mut c = control::ControlClient::connect("127.0.0.1", port, Duration::from_secs(5)).unwrap();
    let greeting = wire::encode(&Request::Greeting { protocol: PROTOCOL_VERSION, nonce: [1; 16] });
    assert!(matches!(wire::decode_reply(&c.ask(&greeting).unwrap()).unwrap(), Reply::Challenge { proof: None, .. }));
    let hello = Request::Hello { hello: String::from_utf8(wire::encode(hello)).unwrap(), mac: None };
    let Reply::Welcome { welcome, .. } = wire::decode_reply(&c.ask(&wire::encode(&hello)).unwrap()).unwrap() else { panic!("no welcome") };
    wire::decode_welcome(welcome.as_bytes()).unwrap()
}

/// The decode's answer to `hello`, said by hand over `control` (a connection to its control port, TCP or
/// Unix): the greeting, then the hello, each a frame (a big-endian length and its bytes), without a token.
pub fn handshake_over(mut control: impl Read + Write, hello: &Hello) -> Reply {
    let mut ask = |body: Vec<u8>| {
        control.write_all(&[&(body.len() as u32).to_be_bytes()[..], &body].concat()).unwrap();
        let mut len = [0u8; 4];
        control.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        control.read_exact(&mut reply).unwrap();
        wire::decode_reply(&reply)
    };
    let challenge = ask(wire::encode(&Request::Greeting { protocol: PROTOCOL_VERSION, nonce: [1; 16] })).unwrap();
    assert!(matches!(challenge, Reply::Challenge { proof: None, .. }));
    let hello = Request::Hello { hello: String::from_utf8(wire::encode(hello)).unwrap(), mac: None };
    match ask(wire::encode(&hello)) {
        Ok(reply) => reply,
        Err(refusal) => panic!("refused: {refusal}"),
    }
}

/// Opens the request channel `welcome` admits, reads its first frames, and goes without a goodbye (as a process
/// that froze or vanished would); returns once the decode has had time to see it end.
pub fn open_channel_and_vanish(welcome: &Welcome) {
    let mut channel = TcpStream::connect(("127.0.0.1", welcome.channel_port)).unwrap();
    let opening = ConnectionHello { magic: kvtransfer::channel::frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token: welcome.channel_token, proof: [0; 32] };
    channel.write_all(&opening.encode()).unwrap();
    channel.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = channel.read(&mut [0u8; 64]);
    drop(channel);
    std::thread::sleep(Duration::from_millis(200));
}

/// What this host and pid namespace are called in a hello (what a peer of this host says it is).
pub fn this_host() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    format!("{}/{}", boot.trim(), std::fs::read_link("/proc/self/ns/pid").unwrap().display())
}

/// Performs the handshake and opens the data connection it admits (its request channel never opens: the
/// decode cuts the link off once the channel's token expires).
pub fn data_connection(port: u16, layers: u32, block_bytes: u64) -> TcpStream {
    open_data(&handshake(port, layers, block_bytes))
}

/// Performs the handshake and opens the data connection and the request channel it admits: a link that lasts.
pub fn link(port: u16, layers: u32, block_bytes: u64) -> (TcpStream, ChannelClient) {
    let welcome = handshake(port, layers, block_bytes);
    let data = open_data(&welcome);
    let obey = std::sync::Arc::new(|_: &Directive| {});
    let (channel, _) = ChannelClient::connect("127.0.0.1", welcome.channel_port, welcome.channel_token, [0; 32], std::time::Instant::now() + Duration::from_secs(5), Duration::from_secs(5), obey, Box::new(|_| {})).unwrap();
    (data, channel)
}

/// Opens a data connection of the session `welcome` admits.
pub fn open_data(welcome: &Welcome) -> TcpStream {
    try_open_data(welcome).unwrap()
}

/// Opens a data connection of the session `welcome` admits, or says how the decode refused it.
pub fn try_open_data(welcome: &Welcome) -> kvtransfer::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", welcome.details["port"].as_u64().unwrap() as u16)).unwrap();
    s.write_all(&ConnectionHello { magic: frame::HELLO_MAGIC, protocol: PROTOCOL_VERSION, token: welcome.session, proof: [0; 32] }.encode()).unwrap();
    let mut ack = [0u8; frame::HELLO_ACK_LEN];
    s.read_exact(&mut ack).map_err(|e| kvtransfer::Error::new(kvtransfer::ErrorCode::Transport, e.to_string()))?;
    frame::decode_hello_ack(&ack)?;
    Ok(s)
}

/// The next ack on a data connection: its status and reason.
pub fn read_ack(s: &mut TcpStream) -> (u32, String) {
    let mut fixed = [0u8; frame::ACK_LEN];
    s.read_exact(&mut fixed).unwrap();
    let (status, _, len) = frame::Ack::decode_fixed(&fixed).unwrap();
    let mut reason = vec![0u8; len as usize];
    s.read_exact(&mut reason).unwrap();
    (status, String::from_utf8(reason).unwrap())
}

/// A connection to `127.0.0.1:port` from 127.0.0.2: another host, as the decode sees it.
pub fn connect_from_elsewhere(port: u16) -> std::io::Result<TcpStream> {
    let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_be_bytes(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns from the start (the `TcpStream` closes
    // it on every path); the addresses are valid `sockaddr_in`s of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let (from, to) = (addr([127, 0, 0, 2], 0), addr([127, 0, 0, 1], port));
        if libc::bind(fd, &from as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &to as *const _ as *const libc::sockaddr, len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
