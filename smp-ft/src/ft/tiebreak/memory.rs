//! An in-memory model of the tie-breaker, for tests: one shared record with a revision, and a
//! claimant per copy. It applies [`decide`] as etcd's backend does (read, then write only if
//! the revision is still the one read), so the protocol's randomized schedules and the unit
//! tests run against the same trait and the same rule the real backends use.

use super::{decide, Decision, Observed, Outcome, Record, Status, TieBreak, TieBreakError};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shared record and its revision (bumped by every write).
#[derive(Debug, Default)]
pub struct Store(Mutex<(Option<Record>, u64)>);

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    /// The record now.
    pub fn record(&self) -> Option<Record> {
        self.0.lock().0.clone()
    }

    /// Writes `record` if the revision is still `revision`; the revision now otherwise.
    fn compare_and_set(&self, revision: u64, record: Option<Record>) -> Result<(), u64> {
        let mut s = self.0.lock();
        if s.1 != revision {
            return Err(s.1);
        }
        *s = (record, revision + 1);
        Ok(())
    }
}

/// One copy's view of a [`Store`].
#[derive(Debug)]
pub struct MemoryTieBreaker {
    store: Arc<Store>,
    owner: String,
    observed: Observed,
}

impl MemoryTieBreaker {
    pub fn new(store: &Arc<Store>, owner: &str) -> MemoryTieBreaker {
        MemoryTieBreaker {
            store: store.clone(),
            owner: owner.into(),
            observed: Observed::new("memory", "memory".into()),
        }
    }
}

impl TieBreak for MemoryTieBreaker {
    fn owner(&self) -> &str {
        &self.owner
    }

    fn read(&self, _timeout: Duration) -> Result<Option<Record>, TieBreakError> {
        Ok(self.store.record())
    }

    fn claim_as(&self, generation: u64, holder: &str, _timeout: Duration) -> Result<Outcome, TieBreakError> {
        let start = Instant::now();
        loop {
            let (current, revision) = self.store.0.lock().clone();
            let (outcome, record) = match decide(current.as_ref(), generation, holder) {
                Decision::Lost(r) => (r.lost(), r),
                Decision::Held => (Outcome::Won { generation }, Record { generation, holder: holder.into() }),
                Decision::Write => {
                    let r = Record { generation, holder: holder.into() };
                    if self.store.compare_and_set(revision, Some(r.clone())).is_err() {
                        continue; // changed since read: decide again
                    }
                    (Outcome::Won { generation }, r)
                }
            };
            let last = if matches!(outcome, Outcome::Won { .. }) { "won" } else { "lost" };
            self.observed.saw(start, None, Some(Some(record)), last.into());
            return Ok(outcome);
        }
    }

    fn clear(&self, expected: &Record, _timeout: Duration) -> Result<bool, TieBreakError> {
        let (current, revision) = self.store.0.lock().clone();
        match current {
            None => Ok(true),
            Some(r) if r != *expected => Ok(false),
            Some(_) => Ok(self.store.compare_and_set(revision, None).is_ok()),
        }
    }

    fn status(&self) -> Status {
        self.observed.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn the_model_follows_the_rule_and_one_racer_wins_each_generation() {
        let store = Store::new();
        let (a, b) = (MemoryTieBreaker::new(&store, "a"), MemoryTieBreaker::new(&store, "b"));
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 });
        assert_eq!(b.claim(1, T).unwrap(), Outcome::Lost { generation: 1, holder: "a".into() });
        assert_eq!(a.hand_over(2, "b", T).unwrap(), Outcome::Won { generation: 2 });
        assert_eq!(b.claim(2, T).unwrap(), Outcome::Won { generation: 2 });
        assert_eq!(b.record_stop(2, T).unwrap(), Outcome::Won { generation: 3 });
        assert!(store.record().unwrap().stopped());
        assert!(!a.clear(&Record { generation: 2, holder: "b".into() }, T).unwrap(), "not the record any more");
        assert!(a.clear(&store.record().unwrap(), T).unwrap());
        assert_eq!(store.record(), None);

        let barrier = Arc::new(Barrier::new(4));
        let wins: Vec<Vec<bool>> = (0..4)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let tb = MemoryTieBreaker::new(&store, &format!("c{i}"));
                    (1..=200)
                        .map(|g| {
                            barrier.wait();
                            matches!(tb.claim(g, T).unwrap(), Outcome::Won { .. })
                        })
                        .collect()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for g in 0..200 {
            assert_eq!(wins.iter().filter(|w| w[g]).count(), 1, "generation {}", g + 1);
        }
    }
}
