//! Threads the library owns, one per decode peer: a prefill's asynchronous calls to one peer run on that peer's
//! thread, in the order they were made, so a slow peer holds up only its own calls and never a pool that the
//! rest of the process (a Node.js event loop's file and DNS work, say) depends on.

use crate::sync::lock;
use crate::error::{Error, ErrorCode, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a peer's thread waits for its next call before it ends (the next call starts another).
const IDLE: Duration = if cfg!(test) { Duration::from_millis(300) } else { Duration::from_secs(30) };

/// One call: the work, and what to do with its outcome (run on the peer's thread, even after a panic).
struct Job {
    work: Box<dyn FnOnce() -> Result<()> + Send>,
    done: Box<dyn FnOnce(Result<()>) + Send>,
}

/// The peers' threads, by peer key (`ip:port`). A thread starts with its peer's first call and ends when it has
/// had none for a while, or once [`Workers::close`] has dropped its queue; either way after the calls queued
/// before that have run.
pub(super) struct Workers {
    /// Each peer's queue and its thread's number; `None` once closed.
    queues: Arc<Mutex<Option<HashMap<String, (Sender<Job>, u64)>>>>,
    next: AtomicU64,
}

impl Workers {
    pub(super) fn new() -> Workers {
        Workers { queues: Arc::new(Mutex::new(Some(HashMap::new()))), next: AtomicU64::new(0) }
    }

    /// Runs `work` on the thread of peer `key`, then `done` with its outcome (an `INTERNAL` error if it
    /// panicked). After [`Workers::close`], or if no thread can be started, `done` gets the error at once.
    pub(super) fn submit(
        &self,
        key: &str,
        work: impl FnOnce() -> Result<()> + Send + 'static,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let job = Job { work: Box::new(work), done: Box::new(done) };
        // `done` never runs under the lock: it may submit again.
        if let Err((job, why)) = self.enqueue(key, job) {
            (job.done)(Err(why));
        }
    }

    fn enqueue(&self, key: &str, job: Job) -> std::result::Result<(), (Job, Error)> {
        let mut queues = self.queues.lock().unwrap();
        let Some(queues) = queues.as_mut() else {
            return Err((job, Error::new(ErrorCode::Closed, "the communicator is closed")));
        };
        let job = match queues.get(key) {
            None => job,
            Some((queue, _)) => match queue.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it cannot be, while its queue is here; but never lose a call).
                Err(mpsc::SendError(job)) => job,
            },
        };
        let (queue, jobs) = mpsc::channel::<Job>();
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (all, name) = (self.queues.clone(), key.to_string());
        let spawned = std::thread::Builder::new().name(format!("kvtransfer-peer {key}")).spawn(move || {
            let run = |job: Job| {
                let outcome = Error::catch_panic(job.work);
                // A panic in the caller's own completion must not end the thread that serves its peer.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.done)(outcome)));
            };
            loop {
                match jobs.recv_timeout(IDLE) {
                    Ok(job) => run(job),
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {
                        // Idle: leave the map, but only with an empty queue. Calls are queued under the map's
                        // lock, so none can arrive after this; one that arrived just before is run first, in
                        // order, and the thread stays.
                        let mut guard = lock(&all);
                        match jobs.try_recv() {
                            Ok(job) => {
                                drop(guard);
                                run(job);
                            }
                            Err(_) => {
                                if let Some(map) = guard.as_mut() {
                                    if map.get(&name).is_some_and(|(_, n)| *n == number) {
                                        map.remove(&name);
                                    }
                                }
                                return;
                            }
                        }
                    }
                }
            }
        });
        match spawned {
            Ok(_) => {
                queue.send(job).expect("the new thread holds the queue's other end");
                queues.insert(key.to_string(), (queue, number));
                Ok(())
            }
            Err(e) => Err((job, Error::io("starting a thread for the peer", e))),
        }
    }

    /// Stops taking calls; each thread finishes the calls already queued, then ends.
    pub(super) fn close(&self) {
        self.queues.lock().unwrap().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn calls_to_one_peer_run_in_order_on_its_own_thread() {
        let workers = Workers::new();
        let (tx, rx) = channel();
        for i in 0..50 {
            let tx = tx.clone();
            let name = move || std::thread::current().name().unwrap_or("").to_string();
            let key = if i % 2 == 0 { "a:1" } else { "b:2" };
            workers.submit(key, move || Ok(()), move |r| tx.send((i, name(), r.is_ok())).unwrap());
        }
        let got: Vec<(i32, String, bool)> = (0..50).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        let order = |key: &str| got.iter().filter(|(_, n, _)| n.ends_with(key)).map(|(i, ..)| *i).collect::<Vec<_>>();
        assert_eq!(order("a:1"), (0..50).step_by(2).collect::<Vec<_>>());
        assert_eq!(order("b:2"), (1..50).step_by(2).collect::<Vec<_>>());
        assert!(got.iter().all(|(_, _, ok)| *ok));
    }

    #[test]
    fn a_panicking_call_reports_internal_and_the_thread_goes_on() {
        let workers = Workers::new();
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        workers.submit("p:1", || panic!("broken call"), move |r| tx.send(r).unwrap());
        workers.submit("p:1", || Ok(()), move |r| tx2.send(r).unwrap());
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap_err();
        assert_eq!(first.code(), ErrorCode::Internal);
        assert!(first.message().contains("broken call"), "{first}");
        rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    }

    #[test]
    fn an_idle_peer_thread_ends_and_the_next_call_starts_another() {
        let workers = Workers::new();
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        let id = || std::thread::current().id();
        workers.submit("p:1", || Ok(()), move |_| tx.send(id()).unwrap());
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Wait for the idle thread to leave the map.
        let deadline = std::time::Instant::now() + IDLE + Duration::from_secs(10);
        while workers.queues.lock().unwrap().as_ref().unwrap().contains_key("p:1") {
            assert!(std::time::Instant::now() < deadline, "the idle thread never left");
            std::thread::sleep(Duration::from_millis(100));
        }
        workers.submit("p:1", || Ok(()), move |_| tx2.send(id()).unwrap());
        assert_ne!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), first);
    }

    #[test]
    fn after_close_calls_fail_at_once() {
        let workers = Workers::new();
        workers.close();
        let (tx, rx) = channel();
        workers.submit("p:1", || Ok(()), move |r| tx.send(r).unwrap());
        assert_eq!(rx.try_recv().unwrap().unwrap_err().code(), ErrorCode::Closed);
    }
}
