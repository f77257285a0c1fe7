//! Who may write into this process with `process_vm_writev`, as the kernel's Yama module sees it.
//!
//! - `kernel.yama.ptrace_scope` 0 (or no Yama): every process of the same user already may; nothing is granted,
//!   and nothing can be withdrawn.
//! - 1: only descendants, and the one process this process names with `PR_SET_PTRACER` (and that process's
//!   descendants). The grant goes to the process of an authenticated shm peer, as the kernel named it when its
//!   handshake connected over this host's Unix socket (never a pid a hello claims), while it has a session, and is withdrawn when its last session ends. Yama keeps one name per process: while one peer
//!   process holds the grant, shm is unavailable to any other (its connections take the next transport both
//!   sides have).
//! - 2 and 3: no process may; shm is unavailable.
//!
//! One grant per process, so one table per process, shared by every decode communicator in it.

use crate::sync::lock;
use crate::error::{Error, ErrorCode, Result};
use std::sync::Mutex;

/// Yama's `ptrace_scope` (0 where Yama is absent).
fn ptrace_scope() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Whether processes of the same user can be let write into this one, under this machine's Yama scope.
pub(super) fn writers_permitted() -> Result<()> {
    permits_writers(ptrace_scope())
}

/// Whether processes of the same user can be let write into this one under Yama scope `scope`.
fn permits_writers(scope: u32) -> Result<()> {
    match scope {
        0 | 1 => Ok(()),
        n => Err(Error::new(
            ErrorCode::Unavailable,
            format!("shm: kernel.yama.ptrace_scope is {n}, which forbids process_vm_writev between processes"),
        )),
    }
}

/// The sessions holding this process's grant, with the peer process each belongs to (all the same one).
static HOLDERS: Mutex<Vec<(u64, u32)>> = Mutex::new(Vec::new());

/// Lets process `pid` write into this one for `session`. `Unavailable` where Yama forbids it, or while another
/// process holds the grant.
pub(super) fn grant(session: u64, pid: u32) -> Result<()> {
    let scope = ptrace_scope();
    permits_writers(scope)?;
    // Process 1 is every process's ancestor: naming it would let them all write.
    if pid <= 1 || pid > i32::MAX as u32 {
        return Err(Error::new(ErrorCode::Unavailable, format!("shm: the peer names process {pid}")));
    }
    // This process itself (a prefill in the same process) and its ancestors need no grant: Yama lets an
    // ancestor trace its descendants. Naming one grants nothing (a grant would reach all its descendants).
    if scope == 0 || pid == std::process::id() || ancestors().contains(&pid) {
        return Ok(());
    }
    let mut holders = lock(&HOLDERS);
    if let Some(&(_, holder)) = holders.iter().find(|&&(_, holder)| holder != pid) {
        return Err(Error::new(
            ErrorCode::Unavailable,
            format!(
                "shm: process {holder} holds this process's ptrace grant, and kernel.yama.ptrace_scope 1 allows one \
                 writer process at a time"
            ),
        ));
    }
    if holders.is_empty() {
        set_ptracer(pid as libc::c_ulong)?;
    }
    holders.push((session, pid));
    Ok(())
}

/// Ends the grant of every session `ended` names; the last one's end withdraws the grant from its process.
pub(super) fn withdraw(ended: impl Fn(u64) -> bool) {
    let mut holders = lock(&HOLDERS);
    let before = holders.len();
    holders.retain(|&(session, _)| !ended(session));
    if before > 0 && holders.is_empty() {
        // Withdrawing cannot fail for a valid argument; were it to, the next grant would replace the name.
        let _ = set_ptracer(0);
    }
}

/// This process's ancestors, from its parent up (as `/proc` shows them; a pid namespace's root has parent 0).
fn ancestors() -> Vec<u32> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) S ppid ...": the fields after the last ')'.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let mut list = Vec::new();
    let mut pid = std::process::id();
    while let Some(p) = parent(pid).filter(|&p| p > 0 && !list.contains(&p)) {
        list.push(p);
        pid = p;
    }
    list
}

/// `PR_SET_PTRACER`: names the one process (0: none) that may trace this one besides its ancestors.
fn set_ptracer(pid: libc::c_ulong) -> Result<()> {
    // SAFETY: PR_SET_PTRACER takes integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PTRACER, pid, 0, 0, 0) };
    if rc != 0 {
        return Err(Error::new(
            ErrorCode::Unavailable,
            format!("shm: cannot let process {pid} write (prctl PR_SET_PTRACER): {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_1_ancestors_and_impossible_pids_are_never_granted() {
        for pid in [0, 1, u32::MAX] {
            let err = grant(7, pid).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Unavailable, "{pid}");
        }
        // An ancestor already may write (where Yama allows writers at all); it is granted nothing more.
        let parent = *ancestors().first().expect("this process has a parent");
        if writers_permitted().is_ok() {
            grant(8, parent).unwrap();
        }
        assert!(HOLDERS.lock().unwrap().iter().all(|&(s, _)| s != 7 && s != 8), "nothing recorded");
    }
}
