//! What a listener accepts: a TCP connection from an address, or a Unix-socket connection from a process of
//! this host, which the kernel names ([`Origin`]). The two behave alike for the servers ([`Connection`]).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::time::Duration;

/// Where a connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A TCP connection from this address (which may be of this host too: an address says nothing about which
    /// process it is).
    Network(SocketAddr),
    /// A Unix-socket connection from a process of this host and network namespace, as the kernel names it
    /// (`SO_PEERCRED`, when it connected): its pid in this process's pid namespace (0 where that namespace
    /// cannot see it) and its user.
    Process { pid: u32, uid: u32 },
}

impl Origin {
    /// The address it counts against: a process of this host counts as loopback, like a local TCP connection.
    pub fn ip(&self) -> IpAddr {
        match self {
            Origin::Network(addr) => addr.ip(),
            Origin::Process { .. } => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// The process the kernel names, for a connection of this host whose process this namespace can see.
    pub fn process(&self) -> Option<u32> {
        match *self {
            Origin::Process { pid, .. } if pid > 0 => Some(pid),
            _ => None,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Network(addr) => write!(f, "{addr}"),
            Origin::Process { pid, uid } => write!(f, "process {pid} (uid {uid}) of this host"),
        }
    }
}

/// The abstract Unix socket name (no file; scoped to the network namespace, like a TCP port) on which a server
/// listening on TCP `addr` also answers this host's processes, for `what` ("control").
pub fn local_name(what: &str, addr: SocketAddr) -> String {
    format!("kvtransfer/{what}/{addr}")
}

/// Listens on the abstract Unix socket `name`.
pub(super) fn bind_local(name: &str) -> std::io::Result<UnixListener> {
    UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)
}

/// Connects to the abstract Unix socket `name`, without waiting: where its listener's queue is full (a process
/// that holds the name and never accepts), this fails at once (`WouldBlock`) instead of blocking without limit.
pub fn connect_local(name: &str) -> std::io::Result<UnixStream> {
    let stream = mio::net::UnixStream::connect_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    // SAFETY: the descriptor is taken out of the mio stream, which gives up owning it; the std stream owns it
    // from here on (one owner, closed once).
    let stream = unsafe { UnixStream::from_raw_fd(stream.into_raw_fd()) };
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The process at the other end of a Unix-socket connection, as the kernel recorded it when it connected.
pub(super) fn peer_process(stream: &impl AsRawFd) -> std::io::Result<Origin> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a `ucred` on this frame, on a descriptor the
    // caller owns for the length of the call.
    let got = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Origin::Process { pid: u32::try_from(cred.pid).unwrap_or(0), uid: cred.uid })
}

/// A connection past its hello, as a server gets it: TCP or a Unix socket.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Local(UnixStream),
}

impl Connection {
    /// Takes over the descriptor of an accepted connection of this kind.
    ///
    /// # Safety
    /// `fd` must be an open socket of this kind that nothing else owns or closes.
    pub(super) unsafe fn from_raw_fd(local: bool, fd: RawFd) -> Connection {
        // SAFETY: the caller's promise: `fd` is an open socket of this kind, owned by nothing else.
        unsafe {
            if local {
                Connection::Local(UnixStream::from_raw_fd(fd))
            } else {
                Connection::Tcp(TcpStream::from_raw_fd(fd))
            }
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Local(s) => Connection::Local(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
            Connection::Local(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_nonblocking(on),
            Connection::Local(s) => s.set_nonblocking(on),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(timeout),
            Connection::Local(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_write_timeout(timeout),
            Connection::Local(s) => s.set_write_timeout(timeout),
        }
    }

    /// Sends small messages at once (TCP); a Unix socket always does.
    pub fn set_nodelay(&self) {
        if let Connection::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

impl TryFrom<Connection> for TcpStream {
    type Error = Connection;

    fn try_from(connection: Connection) -> Result<TcpStream, Connection> {
        match connection {
            Connection::Tcp(s) => Ok(s),
            other => Err(other),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Local(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Local(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
