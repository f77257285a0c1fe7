//! Threads the library owns, one per decode peer: a prefill's asynchronous calls to one peer run on that peer's
//! thread, in the order they were made, so a slow peer holds up only its own calls and never a pool that the
//! rest of the process (a Node.js event loop's file and DNS work, say) depends on.

use crate::error::{Error, ErrorCode, Result};
use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;

/// One call: the work, and what to do with its outcome (run on the peer's thread, even after a panic).
struct Job {
    work: Box<dyn FnOnce() -> Result<()> + Send>,
    done: Box<dyn FnOnce(Result<()>) + Send>,
}

/// The peers' threads, by peer key (`ip:port`). A thread starts with its peer's first call and ends once
/// [`Workers::close`] has dropped its queue and the calls queued before that have run.
#[derive(Default)]
pub(super) struct Workers {
    /// `None` once closed.
    queues: Mutex<Option<HashMap<String, Sender<Job>>>>,
}

impl Workers {
    pub(super) fn new() -> Workers {
        Workers { queues: Mutex::new(Some(HashMap::new())) }
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
            Some(queue) => match queue.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it cannot be, while its queue is here; but never lose a call).
                Err(mpsc::SendError(job)) => job,
            },
        };
        let (queue, jobs) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name(format!("kvtransfer-peer {key}")).spawn(move || {
            for job in jobs {
                let outcome = Error::catch_panic(job.work);
                // A panic in the caller's own completion must not end the thread that serves its peer.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.done)(outcome)));
            }
        });
        match spawned {
            Ok(_) => {
                queue.send(job).expect("the new thread holds the queue's other end");
                queues.insert(key.to_string(), queue);
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
    fn after_close_calls_fail_at_once() {
        let workers = Workers::new();
        workers.close();
        let (tx, rx) = channel();
        workers.submit("p:1", || Ok(()), move |r| tx.send(r).unwrap());
        assert_eq!(rx.try_recv().unwrap().unwrap_err().code(), ErrorCode::Closed);
    }
}
