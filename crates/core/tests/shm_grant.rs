//! Under Yama's `ptrace_scope` 1, a decode lets only the process of an authenticated shm peer write into it, and
//! only while that peer has a session; a second peer process takes another transport. The other processes are
//! this test binary run again as a child (`child`, ignored when run alone).
//!
//! Runs only where `kernel.yama.ptrace_scope` is 1 and the user is not root (root may trace anything): the
//! Soft-RoCE VM runs it as `nobody` (`.ci/rdma-tests.sh`). Elsewhere it says so and passes, unless
//! `KVTRANSFER_REQUIRE_YAMA=1`.

mod common;

use common::Cache;
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, Setting, SettingValue, TransportChoice};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "shm-grant-test-token-of-32-characters-or-more";

fn config() -> Config {
    let token = [(Setting::AuthToken, SettingValue::from(TOKEN))];
    Config { transport: TransportChoice::Auto, timeouts: kvtransfer::Timeouts::all(Duration::from_secs(5)), ..Config::load_from(|_| None, &token).unwrap() }
}

/// What the children write: a cache made alike in each of them.
fn source() -> Cache {
    Cache::new(2, 1, 16, 4096, 9)
}

fn communicator(role: Role, cache: &Cache) -> Communicator {
    let spec = CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: common::layout(cache.spec()), tp_size: 1, tp_idx: 0 };
    Communicator::new(spec, config()).unwrap()
}

/// One child process, driven a line at a time.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(port: u16, target: u64) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("SHM_GRANT_PORT", port.to_string())
            .env("SHM_GRANT_TARGET", format!("{}:{target}", std::process::id()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Peer { child, stdin, stdout }
    }

    /// Sends `command`, returns the child's answer.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "the child ended while asked {command:?}");
            // The test harness prints its own text too ("test child ... " before the first answer): an answer
            // is what follows its '='.
            if let Some((_, answer)) = line.trim_end().split_once('=') {
                return answer.to_string();
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn yama_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

#[test]
fn only_the_authenticated_peers_process_may_write_under_yama() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if yama_scope() != Some(1) || root {
        let why = format!("needs kernel.yama.ptrace_scope = 1 (here {:?}) and a user other than root (root: {root})", yama_scope());
        assert!(std::env::var("KVTRANSFER_REQUIRE_YAMA").as_deref() != Ok("1"), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dst = Cache::new(2, 1, 16, 4096, 2);
    let decode = communicator(Role::Decode, &dst);
    let port = decode.port();
    // The children poke the first 8 bytes of key block 15, which nothing else writes.
    let target = dst.addrs(0)[0] + 15 * 4096;
    let (mut a, mut b, mut stranger) = (Peer::spawn(port, target), Peer::spawn(port, target), Peer::spawn(port, target));

    assert_eq!(stranger.ask("poke"), format!("poke errno {}", libc::EPERM), "a process that never connected");
    assert_eq!(a.ask("connect"), "linked shm");
    assert_eq!(a.ask("write"), "wrote ok");
    assert_eq!(a.ask("poke"), "poke ok", "the authenticated peer may write");
    assert_eq!(stranger.ask("poke"), format!("poke errno {}", libc::EPERM), "the grant is for the peer's process only");
    assert_ne!(b.ask("connect"), "linked shm", "a second peer process, while the first holds the grant, takes another transport");
    assert_eq!(b.ask("write"), "wrote ok");
    assert_eq!(b.ask("poke"), format!("poke errno {}", libc::EPERM), "a peer over another transport gets no grant");
    let src = source();
    for (t, b) in [(0, 0), (0, 1), (1, 2)] {
        assert_eq!(dst.block(t, 0, b), src.block(t, 0, b), "tensor {t} block {b}: the peers' bytes arrived");
    }

    // Once its link ends, the first peer's process may write no more, and the next peer gets shm.
    assert_eq!(a.ask("close"), "closed");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = a.ask("poke");
        if answer == format!("poke errno {}", libc::EPERM) {
            break;
        }
        assert!(Instant::now() < deadline, "the closed peer may still write: {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = Peer::spawn(port, target);
    assert_eq!(c.ask("connect"), "linked shm");
    assert_eq!(c.ask("write"), "wrote ok");
    assert_eq!(stranger.ask("poke"), format!("poke errno {}", libc::EPERM));
}

/// A child: a prefill process (connect, write, close) that can also try to write into the decode on its own
/// (poke). Answers each command with one line starting with '='.
#[test]
#[ignore = "run by only_the_authenticated_peers_process_may_write_under_yama"]
fn child() {
    let port: u16 = std::env::var("SHM_GRANT_PORT").unwrap().parse().unwrap();
    let target = std::env::var("SHM_GRANT_TARGET").unwrap();
    let (pid, addr) = target.split_once(':').unwrap();
    let (pid, addr): (libc::pid_t, u64) = (pid.parse().unwrap(), addr.parse().unwrap());
    let src = source();
    let mut prefill = None;
    for line in std::io::stdin().lock().lines() {
        let answer = match line.unwrap().as_str() {
            "connect" => {
                let p = communicator(Role::Prefill, &src);
                p.connect("127.0.0.1", port, 1).unwrap();
                let kind = p.connected_transport("127.0.0.1", port).unwrap();
                prefill = Some(p);
                format!("linked {kind}")
            }
            "write" => match prefill.as_ref().unwrap().write_cache("127.0.0.1", port, &[0, 1, 2], &[0, 1, 2], 0) {
                Ok(()) => "wrote ok".into(),
                Err(e) => format!("wrote {e}"),
            },
            "close" => {
                drop(prefill.take());
                "closed".into()
            }
            "poke" => {
                let word = [0xABu8; 8];
                let local = libc::iovec { iov_base: word.as_ptr() as *mut _, iov_len: 8 };
                let remote = libc::iovec { iov_base: addr as *mut _, iov_len: 8 };
                // SAFETY: the local range is `word`, only read; the kernel checks the remote one and this
                // process's right to write there.
                match unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } {
                    8 => "poke ok".into(),
                    _ => format!("poke errno {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
                }
            }
            other => panic!("unknown command {other}"),
        };
        println!("={answer}");
    }
}
