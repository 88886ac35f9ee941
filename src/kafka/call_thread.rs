//! A client's blocking calls, run on a thread of the client's own, so that a call that never returns is
//! left behind instead of blocking its caller for ever (docs/DESIGN.md, "Broker outage and shutdown").
//!
//! librdkafka's `send_offsets_to_transaction` can outlive its own timeout without end (librdkafka#5456,
//! #5511). A thread blocked in C cannot be taken back; what can be done is to stop waiting for it, never
//! call its client again, and let the caller start another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::Health;

type Call<C> = Box<dyn FnOnce(&C) + Send>;

/// A call that had not returned after `bound`: it was left behind with its client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{call} did not return within {bound:?} (confluentinc/librdkafka#5456); left behind with its client")]
pub struct Hung {
    pub call: &'static str,
    pub bound: Duration,
}

/// Runs calls of one client, one at a time, on a thread of its own; the caller waits at most `bound` for
/// each. After a call is left behind, every later call fails at once with the same [`Hung`].
pub struct CallThread<C: Send + Sync + 'static> {
    client: Arc<C>,
    calls: Option<mpsc::Sender<Call<C>>>,
    thread: Option<JoinHandle<()>>,
    /// How long a call is waited for.
    pub(super) bound: Duration,
    /// Set once a call is left behind; the thread then tells `health` when it ends.
    left: Arc<AtomicBool>,
    hung: Option<Hung>,
    health: Health,
}

impl<C: Send + Sync + 'static> CallThread<C> {
    pub fn start(name: &str, client: C, bound: Duration, health: &Health) -> std::io::Result<Self> {
        let client = Arc::new(client);
        let (calls, queued) = mpsc::channel::<Call<C>>();
        let left = Arc::new(AtomicBool::new(false));
        let thread = {
            let client = Arc::clone(&client);
            let left = Arc::clone(&left);
            let health = health.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    for call in queued {
                        call(&client);
                    }
                    // A client left behind is closed here, once its call returned.
                    drop(client);
                    if left.load(Ordering::Acquire) {
                        health.left_call_returned();
                    }
                })?
        };
        Ok(Self {
            client,
            calls: Some(calls),
            thread: Some(thread),
            bound,
            left,
            hung: None,
            health: health.clone(),
        })
    }

    /// The client, for its calls that return by themselves.
    pub fn client(&self) -> &C {
        &self.client
    }

    /// Runs `f` on the client's thread and waits for it at most the bound. `call` names it in the error.
    pub fn call<T: Send + 'static>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&C) -> T + Send + 'static,
    ) -> Result<T, Hung> {
        if let Some(hung) = &self.hung {
            return Err(hung.clone());
        }
        let (reply, outcome) = mpsc::sync_channel(1);
        let queued = self.calls.as_ref().is_some_and(|calls| {
            calls
                .send(Box::new(move |c: &C| {
                    // The caller may have stopped waiting: then nobody reads the outcome.
                    let _ = reply.send(f(c));
                }))
                .is_ok()
        });
        let returned = if queued {
            outcome.recv_timeout(self.bound).ok()
        } else {
            None
        };
        // Timed out, or the thread is gone (a call panicked): either way this client is done with.
        returned.ok_or_else(|| self.leave(call))
    }

    fn leave(&mut self, call: &'static str) -> Hung {
        let hung = Hung {
            call,
            bound: self.bound,
        };
        // Counted before the thread can see its queue closed, so that its return is counted after.
        self.left.store(true, Ordering::Release);
        self.health.call_left_behind();
        self.calls = None;
        self.thread = None;
        self.hung = Some(hung.clone());
        hung
    }
}

impl<C: Send + Sync + 'static> Drop for CallThread<C> {
    /// Ends the thread and waits for it, unless a call was left behind on it: the client is then closed
    /// here, before this returns (or by the thread, when the call left behind returns).
    fn drop(&mut self) {
        self.calls = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    /// A client whose `block` call waits until the test lets it go.
    struct Gate(Mutex<mpsc::Receiver<()>>);

    impl Gate {
        fn block(&self) -> &'static str {
            let _ = self.0.lock().map(|r| r.recv());
            "returned"
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A call that returns gives its result; one that does not is left behind at its bound, the caller
    /// gets `Hung` then and at once for every later call, `/healthz` counts the client left behind until
    /// the call returns, and three left behind at once fail it.
    #[test]
    fn a_call_that_does_not_return_is_left_behind_at_its_bound() {
        let health = Health::default();
        let (open, gate) = mpsc::channel();
        let bound = Duration::from_millis(300);
        let mut thread = CallThread::start("test-calls", Gate(Mutex::new(gate)), bound, &health)
            .expect("thread");
        open.send(()).expect("gate");
        assert_eq!(
            thread.call("open", Gate::block).expect("returns"),
            "returned"
        );

        let started = Instant::now();
        let hung = thread.call("block", Gate::block).expect_err("hangs");
        let waited = started.elapsed();
        assert!(
            waited >= bound && waited < bound + Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(hung.call, "block");
        assert!(
            hung.to_string().contains("did not return within 300ms"),
            "{hung}"
        );
        assert_eq!(
            health.live(),
            Ok(()),
            "one left behind is not yet a reason to restart"
        );

        let started = Instant::now();
        let again = thread
            .call("open", Gate::block)
            .expect_err("its client is done with");
        assert!(started.elapsed() < bound, "failed at once");
        assert_eq!(again.call, "block", "the call that hung is named");
        drop(thread);

        open.send(()).expect("gate");
        wait_until("the call left behind returned", || {
            health.left_behind() == 0
        });

        let gates: Vec<_> = (0..3)
            .map(|_| {
                let (open, gate) = mpsc::channel::<()>();
                let mut t = CallThread::start("test-calls", Gate(Mutex::new(gate)), bound, &health)
                    .expect("thread");
                t.call("block", Gate::block).expect_err("hangs");
                open
            })
            .collect();
        let why = health.live().expect_err("three left behind");
        assert!(why.contains("3 producers"), "{why}");
        drop(gates);
        wait_until("all returned", || health.left_behind() == 0);
        assert_eq!(health.live(), Ok(()));
    }

    /// Dropped without a call left behind, the thread ends and the client is closed before `drop` returns.
    #[test]
    fn dropping_closes_the_client_before_returning() {
        let health = Health::default();
        let client = Arc::new(());
        let thread = CallThread::start(
            "test-calls",
            Arc::clone(&client),
            Duration::from_secs(1),
            &health,
        )
        .expect("thread");
        assert_eq!(Arc::strong_count(&client), 2);
        drop(thread);
        assert_eq!(Arc::strong_count(&client), 1);
    }
}
