//! What a prefill communicator tells about its decode peers' connections as they come and go: each connection
//! that comes up, each that ends (once, with its cause), and each attempt to rebuild one. Told to one sink, on
//! whichever thread saw it happen (a call's, or a request channel's): the sink must not block.

use crate::error::Error;
use crate::sync::lock;
use crate::wire::TransportKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A change in a decode peer's connection (`peer` is `host:port`, as the caller named it).
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A connection is up, over `transport`: from `connect`, or rebuilt after one ended (`reconnected`).
    Connected { peer: String, transport: TransportKind, reconnected: bool },
    /// The connection ended (the decode closed or went away, a write failed on it, or it broke), for `cause`.
    /// The next call that needs it reconnects (see [`crate::config::Reconnect`]). Not told of a connection this
    /// side ended itself (`disconnect`, `close`).
    Disconnected { peer: String, cause: Error },
    /// Attempt `attempt` of `attempts` to rebuild the peer's connection starts; `cause` is why the connection
    /// ended, or why the attempt before this one failed.
    Reconnecting { peer: String, attempt: u32, attempts: u32, cause: Error },
}

/// Where a communicator's peer events go.
pub type PeerEventSink = Arc<dyn Fn(&PeerEvent) + Send + Sync>;

/// The sink, shared with the threads that see connections end.
#[derive(Default)]
pub(super) struct Events {
    /// The sink, and whether the communicator closed (then none is ever set again).
    sink: Mutex<(Option<PeerEventSink>, bool)>,
}

impl Events {
    pub(super) fn set(&self, sink: Option<PeerEventSink>) {
        let mut s = lock(&self.sink);
        if !s.1 {
            s.0 = sink;
        }
    }

    /// Nothing is told from now on: once this returns, the sink is not running and never runs again.
    pub(super) fn close(&self) {
        *lock(&self.sink) = (None, true);
    }

    /// Tells `event`, under the lock: the sink must not block (nor call back into the communicator).
    pub(super) fn tell(&self, event: PeerEvent) {
        if let Some(sink) = &lock(&self.sink).0 {
            sink(&event);
        }
    }
}

/// A peer's connections ending, told once each: connections are numbered from 1, and the highest number told
/// (or passed over in silence) is kept.
#[derive(Default)]
pub(super) struct Endings {
    told: AtomicU64,
    /// Why the last connection ended: the cause of the first attempt to rebuild it.
    cause: Mutex<Option<Error>>,
}

impl Endings {
    /// Connection `number` of `peer` ended for `cause`: told unless it was already.
    pub(super) fn ended(&self, events: &Events, peer: &str, number: u64, cause: Error) {
        if self.told.fetch_max(number, Ordering::AcqRel) < number {
            *lock(&self.cause) = Some(cause.clone());
            events.tell(PeerEvent::Disconnected { peer: peer.to_string(), cause });
        }
    }

    /// Connection `number` is ended by this side: nothing is told of it.
    pub(super) fn ended_here(&self, number: u64) {
        self.told.fetch_max(number, Ordering::AcqRel);
    }

    /// Why the last connection ended, if it was told; forgotten from then on (a rebuild asks once).
    pub(super) fn take_cause(&self) -> Option<Error> {
        lock(&self.cause).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn each_connection_is_told_ended_once_and_not_when_this_side_ended_it() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let events = Events::default();
        let t = told.clone();
        events.set(Some(Arc::new(move |e: &PeerEvent| t.lock().unwrap().push(format!("{e:?}")))));
        let endings = Endings::default();
        endings.ended(&events, "h:1", 1, Error::new(ErrorCode::Transport, "first"));
        endings.ended(&events, "h:1", 1, Error::new(ErrorCode::Transport, "again"));
        endings.ended_here(2);
        endings.ended(&events, "h:1", 2, Error::new(ErrorCode::Transport, "after this side ended it"));
        endings.ended(&events, "h:1", 3, Error::new(ErrorCode::Timeout, "third"));
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told[0].contains("first") && told[1].contains("third"), "{told:?}");
        assert_eq!(endings.take_cause().unwrap().code(), ErrorCode::Timeout);
        assert!(endings.take_cause().is_none());
    }
}
