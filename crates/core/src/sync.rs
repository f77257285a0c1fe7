//! The one lock helper: a mutex is taken even where a thread panicked while holding it. The library catches
//! panics at its boundaries (a bug must not take the process down), so a poisoned lock is expected there; each
//! holder keeps its data consistent at every point it could panic, or repairs it on taking the lock.

use std::sync::{Mutex, MutexGuard};

/// Takes `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
