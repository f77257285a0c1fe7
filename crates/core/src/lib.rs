//! kvtransfer moves an LLM's KV cache from a prefill engine into a decode engine's memory.
//!
//! A decode [`Communicator`] registers its cache (one address per layer for keys, values and optional
//! scales) and listens; a prefill communicator connects to it and writes blocks, layer by layer, with
//! [`Communicator::write_cache`]. Each call is validated (`plan`) before anything moves, and the decode
//! side checks every write again against its own cache before a byte lands.
//!
//! Layers, top to bottom: [`communicator`] (prefill side, decode side, requests) → `control` (the
//! handshake: its channel, both its halves in `control::handshake`, its rules in `control::negotiation`)
//! and `transport` (one folder per transport, each with its accepting and connecting half, listed once in
//! `transport::REGISTRY`) → `plan` → `wire` (the handshake's messages, [`TransportKind`]), [`config`],
//! [`memory`] → [`error`].
//!
//! The stable surface is what these docs show: [`Communicator`] and its [`communicator`] module (requests,
//! peer events), [`config`], [`error`], [`memory`], [`metrics`], [`system`], [`ceilings`] and [`rdma_devices`]. The other
//! modules are the library's internals, public only with the feature `internals` (for this crate's own tests,
//! fuzzers and benchmarks, which speak the protocol by hand).

/// Declares the library's internals: `pub(crate)`, and public only with the feature `internals` (hidden from the
/// docs), which the crate's own tests, fuzzers and benchmarks turn on to play a hostile or buggy peer at the
/// wire. Not part of the stable surface.
macro_rules! internals {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports, unreachable_pub)]
        pub(crate) mod $name;
    )*};
}

internals!(admission, auth, channel, codec, control, cuda, iov, listener, log, plan, process, transport, wire);
mod net;
mod sync;

// The stable surface: communicators, their configuration and errors, cache memory, the machine report, and
// what the machine can do without kvtransfer (the bench's ceilings).
pub mod ceilings;
pub mod communicator;
pub mod config;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod system;

pub use communicator::{Communicator, CommunicatorSpec, Role, TransportKind};
pub use transport::rdma::{devices as rdma_devices, DeviceInfo as RdmaDeviceInfo, GidInfo as RdmaGidInfo, PortInfo as RdmaPortInfo};
pub use config::{Config, Reconnect, Setting, SettingValue, Timeouts, TransportChoice};
pub use error::{Error, ErrorCode, Result};

/// This library's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
