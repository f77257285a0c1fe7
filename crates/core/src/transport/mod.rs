//! Transports: how a prefill side moves a [`BlockPlan`]'s bytes into a decode side's cache.
//! Transports never import each other.

pub mod rdma;
pub mod tcp;

use crate::error::Result;
use crate::plan::BlockPlan;

/// The prefill end of one connection to a decode peer.
pub trait Link: Send {
    /// Moves every tensor of the plan's blocks into the peer. Returns once the bytes are in the peer's
    /// memory.
    fn write(&mut self, plan: &BlockPlan) -> Result<()>;

    /// The transport's name (`"tcp"`, `"rdma"`).
    fn transport(&self) -> &'static str;
}
