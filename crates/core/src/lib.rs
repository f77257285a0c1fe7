//! kvtransfer moves an LLM's KV cache from a prefill engine into a decode engine's memory.
//!
//! A decode [`Communicator`] registers its cache (one address per layer for keys, values and optional
//! scales) and listens; a prefill communicator connects to it and writes blocks, layer by layer, with
//! [`Communicator::write_cache`]. Each call is validated ([`plan`]) before anything moves, and the decode
//! side checks every write again against its own cache before a byte lands.
//!
//! Layers, top to bottom: [`communicator`] (prefill side, decode side, requests) → [`control`] (the
//! handshake: its channel, both its halves in [`control::handshake`], its rules in [`control::negotiation`])
//! and [`transport`] (one folder per transport, each with its accepting and connecting half, listed once in
//! [`transport::REGISTRY`]) → [`plan`] → [`wire`] (the handshake's messages, [`TransportKind`]), [`config`],
//! [`memory`] → [`error`].

pub mod admission;
pub mod auth;
pub mod channel;
pub mod codec;
pub mod communicator;
pub mod config;
pub mod control;
pub mod cuda;
pub mod error;
pub mod iov;
pub mod listener;
pub mod log;
pub mod memory;
mod net;
pub mod plan;
pub mod system;
pub mod transport;
pub mod wire;

pub use communicator::{Communicator, CommunicatorSpec, Role, TransportKind};
pub use config::{Config, Reconnect, Setting, SettingValue, Timeouts, TransportChoice};
pub use error::{Error, ErrorCode, Result};

/// This library's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
