//! The one error type of the core.
//!
//! Every failure carries a stable [`ErrorCode`] (what kind of failure, for programs) and a message (what
//! happened and what to do, for people). The Node binding forwards both unchanged.

use std::fmt;

/// What kind of failure an [`Error`] is. The string form ([`ErrorCode::as_str`]) is stable API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// An argument was refused before anything moved (bad id, mismatched lists, bad layer, bad pointer).
    InvalidArgument,
    /// An environment variable or option has a value that cannot be used.
    Config,
    /// The operation needs a connection that does not exist (or no longer works).
    NotConnected,
    /// The peer answered with something that breaks the protocol, or the handshake found the two sides
    /// incompatible (version, geometry, roles).
    Protocol,
    /// The peer refused the request (its own validation failed).
    Rejected,
    /// No progress within the configured timeout.
    Timeout,
    /// A transport failed to move the bytes (socket error, RDMA completion error).
    Transport,
    /// The transport asked for is not usable on this machine (no device, no library).
    Unavailable,
    /// The communicator was closed.
    Closed,
    /// The peer did not prove it holds the shared secret (`KVCACHE_AUTH_TOKEN`), or this side holds none and the
    /// peer requires one.
    Unauthenticated,
    /// A bug in kvtransfer (a panic, caught before it could take the process down): please report it.
    Internal,
    /// The request was aborted: by its prefill (`abortRequest`), or by the caller's signal before the call
    /// started.
    Aborted,
    /// The decode revoked the request (`revoke`): its writes move nothing any more.
    Revoked,
    /// The request made no progress for its time to live (`KVCACHE_REQUEST_TTL_MS`): the decode gave up on it.
    Expired,
    /// The memory is in use by an open communicator: close it first.
    InUse,
    /// Nothing answers at the peer's address: the connection was refused (nothing listens there) or the host or
    /// network is unreachable. The message names the address.
    Unreachable,
}

impl ErrorCode {
    /// The stable name of the code, as seen by every binding (e.g. `"INVALID_ARGUMENT"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Config => "CONFIG",
            ErrorCode::NotConnected => "NOT_CONNECTED",
            ErrorCode::Protocol => "PROTOCOL",
            ErrorCode::Rejected => "REJECTED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Transport => "TRANSPORT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Aborted => "ABORTED",
            ErrorCode::Revoked => "REVOKED",
            ErrorCode::Expired => "EXPIRED",
            ErrorCode::InUse => "IN_USE",
            ErrorCode::Unreachable => "UNREACHABLE",
        }
    }

    /// The code for a wire value (see [`ErrorCode::to_wire`]); unknown values read as `Protocol`.
    pub fn from_wire(v: u32) -> ErrorCode {
        match v {
            1 => ErrorCode::InvalidArgument,
            2 => ErrorCode::Config,
            3 => ErrorCode::NotConnected,
            5 => ErrorCode::Rejected,
            6 => ErrorCode::Timeout,
            7 => ErrorCode::Transport,
            8 => ErrorCode::Unavailable,
            9 => ErrorCode::Closed,
            10 => ErrorCode::Internal,
            11 => ErrorCode::Unauthenticated,
            12 => ErrorCode::Aborted,
            13 => ErrorCode::Revoked,
            14 => ErrorCode::Expired,
            15 => ErrorCode::InUse,
            16 => ErrorCode::Unreachable,
            _ => ErrorCode::Protocol,
        }
    }

    /// A number for this code on the wire (never 0, which means success).
    pub fn to_wire(self) -> u32 {
        match self {
            ErrorCode::InvalidArgument => 1,
            ErrorCode::Config => 2,
            ErrorCode::NotConnected => 3,
            ErrorCode::Protocol => 4,
            ErrorCode::Rejected => 5,
            ErrorCode::Timeout => 6,
            ErrorCode::Transport => 7,
            ErrorCode::Unavailable => 8,
            ErrorCode::Closed => 9,
            ErrorCode::Internal => 10,
            ErrorCode::Unauthenticated => 11,
            ErrorCode::Aborted => 12,
            ErrorCode::Revoked => 13,
            ErrorCode::Expired => 14,
            ErrorCode::InUse => 15,
            ErrorCode::Unreachable => 16,
        }
    }
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::InvalidArgument,
        ErrorCode::Config,
        ErrorCode::NotConnected,
        ErrorCode::Protocol,
        ErrorCode::Rejected,
        ErrorCode::Timeout,
        ErrorCode::Transport,
        ErrorCode::Unavailable,
        ErrorCode::Closed,
        ErrorCode::Internal,
        ErrorCode::Unauthenticated,
        ErrorCode::Aborted,
        ErrorCode::Revoked,
        ErrorCode::Expired,
        ErrorCode::InUse,
        ErrorCode::Unreachable,
    ];
}

impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of a kvtransfer operation: a stable code and a message that says what went wrong.
///
/// ```
/// use kvtransfer::{Error, ErrorCode};
/// let e = Error::invalid("local block id 9 is outside [0, 8)");
/// assert_eq!(e.code(), ErrorCode::InvalidArgument);
/// assert_eq!(e.to_string(), "INVALID_ARGUMENT: local block id 9 is outside [0, 8)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: ErrorCode,
    message: String,
}

impl Error {
    /// An error of the given code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }
    /// An [`ErrorCode::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::InvalidArgument, message)
    }
    /// An [`ErrorCode::Config`] error.
    pub fn config(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Config, message)
    }
    /// An [`ErrorCode::Protocol`] error.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Protocol, message)
    }
    /// An [`ErrorCode::Transport`] error for an I/O failure, saying what was being done.
    pub fn io(context: &str, err: std::io::Error) -> Error {
        let code = match err.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ErrorCode::Timeout,
            _ => ErrorCode::Transport,
        };
        Error::new(code, format!("{context}: {err}"))
    }
    /// An [`ErrorCode::Internal`] error for a panic caught at a boundary (`payload` from `catch_unwind`).
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Error {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        Error::new(ErrorCode::Internal, format!("kvtransfer hit a bug and stopped this call ({what}); please report it"))
    }
    /// Runs `f`, turning a panic into an [`ErrorCode::Internal`] error: for the edges where a panic must not
    /// unwind further (a foreign caller, a thread that must report back).
    pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(Error::from_panic(&*p)))
    }
    /// The kind of failure.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
    /// What went wrong, without the code.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// The result type of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip_and_never_zero() {
        for code in ErrorCode::ALL {
            assert_ne!(code.to_wire(), 0);
            assert_eq!(ErrorCode::from_wire(code.to_wire()), code);
        }
        assert_eq!(ErrorCode::from_wire(12345), ErrorCode::Protocol);
    }

    #[test]
    fn panics_become_internal_errors() {
        let e = Error::catch_panic::<()>(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(e.message().contains("boom 7"), "{e}");
        assert_eq!(Error::catch_panic(|| Ok(5)).unwrap(), 5);
    }

    #[test]
    fn timeouts_are_classified() {
        let e = Error::io("reading", std::io::Error::from(std::io::ErrorKind::WouldBlock));
        assert_eq!(e.code(), ErrorCode::Timeout);
        let e = Error::io("reading", std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(e.code(), ErrorCode::Transport);
    }
}
