//! Transports: how a prefill side moves a [`BlockPlan`]'s bytes into a decode side's cache.
//! Transports never import each other.

pub mod cuda_ipc;
pub mod rdma;
pub mod shm;
pub mod tcp;

use crate::error::Result;
use crate::plan::{BlockPlan, PlanForm};

/// The prefill end of one connection to a decode peer.
pub trait Link: Send {
    /// The form this link takes calls in.
    fn plan_form(&self) -> PlanForm {
        PlanForm::Runs
    }

    /// Moves every tensor of the plan's blocks into the peer. Returns once the bytes are in the peer's
    /// memory.
    fn write(&mut self, plan: &BlockPlan) -> Result<()>;

    /// The transport's name (`"tcp"`, `"rdma"`, `"shm"`, `"cuda-ipc"`).
    fn transport(&self) -> &'static str;
}

/// A number that differs between processes and runs (tokens, nonces); not for cryptography.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
