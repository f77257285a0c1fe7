//! A same-host peer's process, as the kernel named it when it connected: whether it has ended. A same-host link
//! cannot be cut off, so the decode waits for its process; a pid alone may name another process once the first
//! ended and its number was handed out again (on a busy host within seconds: every thread takes one), so the
//! process is held by a pidfd, which names that one process for as long as it is open.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One peer process, watched from its handshake on.
#[derive(Debug)]
pub struct PeerProcess {
    pid: u32,
    /// `None` where the kernel has no pidfds (before Linux 5.3): the pid is all there is.
    fd: Option<OwnedFd>,
}

impl PeerProcess {
    /// Watches process `pid`: called while it is connected to this one (its handshake), so that the pid names it.
    pub fn watch(pid: u32) -> PeerProcess {
        let fd = libc::pid_t::try_from(pid).ok().and_then(|p| {
            // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1; nothing is borrowed.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
            // SAFETY: a descriptor pidfd_open just returned is open and owned by no one else.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
        });
        PeerProcess { pid, fd }
    }

    /// Its pid, as it connected.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it has ended (a zombie counts: it has no memory left to write from).
    pub fn gone(&self) -> bool {
        self.ended_within(Duration::ZERO)
    }

    /// Waits until it has ended or `until` passes; whether it has ended. A killed process closes its sockets
    /// before it has ended: whoever sees one of them close gives it a moment.
    pub fn ends_by(&self, until: Instant) -> bool {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if self.ended_within(left.min(Duration::from_millis(50))) {
                return true;
            }
            if left.is_zero() {
                return false;
            }
        }
    }

    /// Whether it ends within `wait` (a pidfd is waited on; a bare pid is looked at, then slept on).
    fn ended_within(&self, wait: Duration) -> bool {
        match &self.fd {
            Some(fd) => {
                // A pidfd reads as readable once its process has ended.
                let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // Rounded up: a wait of less than a millisecond is one, not a spin.
                let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd; an interrupted wait reads as not yet ended (the caller asks again).
                unsafe { libc::poll(&mut p, 1, ms) > 0 }
            }
            None => {
                let gone = pid_gone(self.pid);
                if !gone {
                    std::thread::sleep(wait);
                }
                gone
            }
        }
    }
}

/// Whether process `pid` has ended, by its number only: gone, or a zombie with no thread left (a leader that
/// exited while other threads run reads as a zombie too, and can still write). A reused pid reads as alive: the
/// safe side.
fn pid_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let zombie = field("State:").is_some_and(|s| s.starts_with(['Z', 'X']));
    let threads = field("Threads:").and_then(|n| n.parse::<u32>().ok());
    zombie && threads.is_some_and(|n| n <= 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_process_reads_gone_once_it_ended_whether_reaped_or_not() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let watched = PeerProcess::watch(child.id());
        assert!(watched.fd.is_some(), "this kernel has pidfds");
        assert!(!watched.gone());
        child.kill().unwrap();
        // Not reaped yet: a zombie has ended.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !watched.gone() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(watched.gone(), "a zombie");
        child.wait().unwrap();
        assert!(watched.gone(), "reaped");
        let alive = Command::new("sleep").arg("30").spawn();
        let mut alive = alive.unwrap();
        let started = Instant::now();
        assert!(!PeerProcess::watch(alive.id()).ends_by(started + Duration::from_millis(200)), "a live process does not end");
        assert!(started.elapsed() >= Duration::from_millis(200), "it was waited for");
        let watched = PeerProcess::watch(alive.id());
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            alive.kill().unwrap();
            alive
        });
        assert!(watched.ends_by(Instant::now() + Duration::from_secs(5)), "ended while waited for");
        killer.join().unwrap().wait().unwrap();
        assert!(PeerProcess { pid: watched.pid, fd: None }.gone(), "by its pid alone, while nothing took the number");
    }

    #[test]
    fn a_pidfd_still_names_its_process_after_its_number_went_to_another() {
        // The number is handed out again on purpose through ns_last_pid (root only; elsewhere there is nothing to
        // test with), and another fork may take it first: a few tries.
        for _ in 0..20 {
            let mut first = Command::new("sleep").arg("30").spawn().unwrap();
            let pid = first.id();
            let watched = PeerProcess::watch(pid);
            first.kill().unwrap();
            first.wait().unwrap();
            if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
                eprintln!("skipped: ns_last_pid cannot be written here (not root)");
                return;
            }
            let mut second = Command::new("sleep").arg("30").spawn().unwrap();
            let reused = second.id() == pid;
            let (by_pidfd, by_number) = (watched.gone(), pid_gone(pid));
            second.kill().unwrap();
            second.wait().unwrap();
            if reused {
                assert!(by_pidfd, "the pidfd names the first process, which ended");
                assert!(!by_number, "the number alone names the second, which lives");
                return;
            }
        }
        panic!("the number never went to the second process in twenty tries");
    }
}
