//! Background threads with an owner: whoever starts one keeps it in a [`Workers`] set, which
//! joins those that have ended as it goes and all of them, within a bound, when its owner stops.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The background threads one owner started (a connect, a tie-breaker claim, a channel
/// closing, a snapshot being written).
#[derive(Default)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn new() -> Workers {
        Workers::default()
    }

    /// Starts `f` on a thread named `name`, owned by this set.
    pub fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        self.reap();
        let t = std::thread::Builder::new().name(name.into()).spawn(f)?;
        self.threads.push(t);
        Ok(())
    }

    /// Joins the threads that have ended.
    pub fn reap(&mut self) {
        // Called on every turn of an owner's event loop: nothing to allocate unless one ended.
        if !self.threads.iter().any(JoinHandle::is_finished) {
            return;
        }
        let (done, running): (Vec<_>, Vec<_>) = self.threads.drain(..).partition(|t| t.is_finished());
        self.threads = running;
        for t in done {
            join(t);
        }
    }

    /// Threads still running.
    pub fn running(&mut self) -> usize {
        self.reap();
        self.threads.len()
    }

    /// Joins every thread that ends within `bound`; returns the names of those that did not
    /// (each is bounded by its own timeout and ends with the process).
    pub fn join_within(&mut self, bound: Duration) -> Vec<String> {
        let deadline = Instant::now() + bound;
        while self.running() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.threads.drain(..).map(|t| t.thread().name().unwrap_or("?").to_string()).collect()
    }
}

fn join(t: JoinHandle<()>) {
    let name = t.thread().name().unwrap_or("?").to_string();
    if t.join().is_err() {
        tracing::error!("thread {name} panicked");
    }
}

impl Drop for Workers {
    /// Joins what has ended; a thread still running (a claim waiting on storage) is left to
    /// end on its own, bounded by its own timeout.
    fn drop(&mut self) {
        let left = self.join_within(Duration::from_millis(500));
        if !left.is_empty() {
            tracing::debug!("threads still ending: {left:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_threads_are_joined_and_a_slow_one_is_bounded() {
        let mut w = Workers::new();
        w.spawn("quick", || {}).unwrap();
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        w.spawn("slow", move || {
            let _ = rx.recv();
        })
        .unwrap();
        let left = w.join_within(Duration::from_millis(20));
        assert_eq!(left, vec!["slow".to_string()], "the quick one was joined, the slow one named");
        drop(tx);
        let mut w = Workers::new();
        w.spawn("a", || {}).unwrap();
        assert!(w.join_within(Duration::from_secs(5)).is_empty());
        assert_eq!(w.running(), 0);
    }
}
