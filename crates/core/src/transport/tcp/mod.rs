//! The TCP transport: works between any two machines. Blocks go from the cache to the socket with
//! vectored writes (one range per run) and from the socket into the cache with vectored reads; a cache in GPU
//! memory goes through pinned staging buffers ([`staging`]).

pub mod frame;
pub mod io;
mod receiver;
mod sender;
pub mod staging;

pub use receiver::{Session, TcpReceiver};
pub use sender::TcpLink;
