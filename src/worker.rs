//! A thread of its own that takes jobs in the order they are handed over and reports each one's outcome in
//! that order: the commit thread and the decode thread of the pipeline ([`crate::pipeline`],
//! [`crate::ahead`]).

use std::sync::mpsc;
use std::thread::JoinHandle;

/// The worker's thread has ended: it takes no job and reports nothing more.
#[derive(Debug)]
pub struct Ended;

/// Dropping it ends the thread and waits for it (not while the dropping thread panics: the worker may be
/// in a job that waits for something that will not come).
pub struct Worker<J, R> {
    /// `None` once dropped: the thread's loop ends.
    jobs: Option<mpsc::Sender<J>>,
    done: mpsc::Receiver<R>,
    thread: Option<JoinHandle<()>>,
    name: &'static str,
}

impl<J: Send + 'static, R: Send + 'static> Worker<J, R> {
    /// Starts the thread `name`, which turns each job into its outcome with `f`.
    pub fn start(
        name: &'static str,
        f: impl FnMut(J) -> R + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn(std::thread::Builder::new(), name, f)
    }

    /// [`Worker::start`] with a stack of `bytes` (the default is 2 MiB).
    pub fn start_with_stack(
        name: &'static str,
        bytes: usize,
        f: impl FnMut(J) -> R + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn(std::thread::Builder::new().stack_size(bytes), name, f)
    }

    fn spawn(
        builder: std::thread::Builder,
        name: &'static str,
        mut f: impl FnMut(J) -> R + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, todo) = mpsc::channel::<J>();
        let (report, done) = mpsc::channel();
        let thread = builder.name(name.into()).spawn(move || {
            // Ends when the worker is dropped (its sender with it).
            for job in todo {
                if report.send(f(job)).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            name,
        })
    }

    /// Hands a job over.
    pub fn send(&self, job: J) -> Result<(), Ended> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or(Ended)
    }

    /// The oldest outcome not yet taken, once it is in.
    pub fn recv(&self) -> Result<R, Ended> {
        self.done.recv().map_err(|_| Ended)
    }

    /// The oldest outcome not yet taken, if it is in already.
    pub fn try_recv(&self) -> Result<Option<R>, Ended> {
        match self.done.try_recv() {
            Ok(outcome) => Ok(Some(outcome)),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(Ended),
        }
    }
}

impl<J, R> Drop for Worker<J, R> {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take().filter(|_| !std::thread::panicking()) {
            if thread.join().is_err() {
                tracing::error!(thread = self.name, "worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_come_back_in_the_order_of_the_jobs() {
        let w = Worker::start("test-worker", |n: u32| n * 2).unwrap();
        for n in 0..100 {
            w.send(n).unwrap();
        }
        for n in 0..100 {
            assert_eq!(w.recv().unwrap(), n * 2);
        }
        assert!(w.try_recv().unwrap().is_none());
    }
}
