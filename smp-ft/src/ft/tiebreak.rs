//! The tie-breaker: a lock with a generation number on storage both hosts share. A side that
//! wants to act alone claims generation `g`. It wins if `g` is higher than any generation
//! recorded before (or it already holds `g`), and then the record names it. Everyone else loses
//! at `g`.
//!
//! How it stays atomic:
//! - `PATH.lock` is locked with an open-file-description lock (`F_OFD_SETLK`). Linux implements
//!   these over NFS (v3 through NLM, v4 natively) as well as on local filesystems.
//! - Under that lock the record `PATH` is read, compared, written to `PATH.tmp`, fsynced, and
//!   renamed over `PATH`. Rename is atomic on local filesystems and on an NFS server, so a crash
//!   never leaves a torn record.
//! - A record that cannot be parsed is an error, never a win.
//!
//! If the storage cannot be reached within the timeout the claim fails with
//! [`TieBreakError::Unreachable`], and the caller must not go live.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &str = "smpft-tiebreak v1";

/// What a holder's name ends with when the copy that held the tie-breaker ended the VM on
/// purpose (see [`TieBreaker::record_stop`]).
pub const STOPPED: &str = "/stopped";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Won {
        generation: u64,
    },
    /// Someone holds `generation` (≥ the one asked for).
    Lost {
        generation: u64,
        holder: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TieBreakError {
    #[error("tie-breaker {path} is unreachable")]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("tie-breaker {path} could not be locked within {timeout:?}")]
    LockTimeout { path: PathBuf, timeout: Duration },
    #[error("tie-breaker record {path} is corrupt ({detail}); refusing to act on it")]
    Corrupt { path: PathBuf, detail: String },
    #[error("tie-breaker owner name {0:?} must be non-empty, one line, without spaces")]
    BadOwner(String),
}

#[derive(Debug, Clone)]
pub struct TieBreaker {
    path: PathBuf,
    owner: String,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl TieBreaker {
    /// `owner` names this side in the record (e.g. host name and VM name).
    pub fn new(path: &Path, owner: &str) -> Result<TieBreaker, TieBreakError> {
        if owner.is_empty() || owner.contains(char::is_whitespace) {
            return Err(TieBreakError::BadOwner(owner.to_string()));
        }
        Ok(TieBreaker { path: path.to_path_buf(), owner: owner.to_string() })
    }

    fn unreachable(&self) -> impl Fn(std::io::Error) -> TieBreakError + '_ {
        move |source| TieBreakError::Unreachable { path: self.path.clone(), source }
    }

    /// The current record: (generation, holder), or `None` if nobody ever claimed.
    pub fn read(&self) -> Result<Option<(u64, String)>, TieBreakError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.unreachable()(e)),
        };
        let corrupt = |detail: &str| TieBreakError::Corrupt { path: self.path.clone(), detail: detail.into() };
        let line = text.strip_suffix('\n').ok_or_else(|| corrupt("no final newline"))?;
        let rest = line.strip_prefix(MAGIC).and_then(|r| r.strip_prefix(' ')).ok_or_else(|| corrupt("bad header"))?;
        let (generation, holder) = rest.split_once(' ').ok_or_else(|| corrupt("missing holder"))?;
        let generation = generation.parse().map_err(|_| corrupt("bad generation"))?;
        if holder.is_empty() || holder.contains(char::is_whitespace) {
            return Err(corrupt("bad holder"));
        }
        Ok(Some((generation, holder.to_string())))
    }

    /// Claims `generation`; see the module documentation for the rule.
    pub fn claim(&self, generation: u64, timeout: Duration) -> Result<Outcome, TieBreakError> {
        self.claim_for(generation, &self.owner, timeout)
    }

    /// Claims `generation` on behalf of `holder` (a planned switchover: the primary records its
    /// standby, which then claims the same generation and wins without writing). The same rule
    /// as [`TieBreaker::claim`], with `holder` in place of this side.
    pub fn hand_over(&self, generation: u64, holder: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        if holder.is_empty() || holder.contains(char::is_whitespace) {
            return Err(TieBreakError::BadOwner(holder.to_string()));
        }
        self.claim_for(generation, holder, timeout)
    }

    /// The VM was ended on purpose by this copy, which holds `generation`: the record says so
    /// at the next generation, so a standby that did not hear the stop and claims loses to a
    /// holder named `OWNER/stopped`, and knows the VM ended rather than failed.
    pub fn record_stop(&self, generation: u64, timeout: Duration) -> Result<Outcome, TieBreakError> {
        self.claim_for(generation + 1, &format!("{}{STOPPED}", self.owner), timeout)
    }

    fn claim_for(&self, generation: u64, owner: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let lock_path = with_suffix(&self.path, ".lock");
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(self.unreachable())?;
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: fcntl on a descriptor we own with a pointer to a valid flock.
            if unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES | libc::EINTR)) {
                return Err(self.unreachable()(e));
            }
            if Instant::now() >= deadline {
                return Err(TieBreakError::LockTimeout { path: self.path.clone(), timeout });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The lock is released when `lock` is closed, at the end of this function.
        let current = self.read()?;
        let outcome = match &current {
            Some((g, holder)) if *g > generation || (*g == generation && holder != owner) => {
                Outcome::Lost { generation: *g, holder: holder.clone() }
            }
            Some((g, _)) if *g == generation => Outcome::Won { generation },
            _ => {
                self.write(generation, owner)?;
                Outcome::Won { generation }
            }
        };
        drop(lock);
        Ok(outcome)
    }

    fn write(&self, generation: u64, owner: &str) -> Result<(), TieBreakError> {
        let tmp = with_suffix(&self.path, ".tmp");
        let mut f = std::fs::File::create(&tmp).map_err(self.unreachable())?;
        writeln!(f, "{MAGIC} {generation} {owner}").map_err(self.unreachable())?;
        f.sync_all().map_err(self.unreachable())?;
        std::fs::rename(&tmp, &self.path).map_err(self.unreachable())?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("smpft-tiebreak-{name}-")).tempdir().unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn a_hand_over_names_the_standby_which_then_wins_without_the_primary() {
        let d = dir("handover");
        let path = d.path().join("tb");
        let (a, b) = (TieBreaker::new(&path, "a").unwrap(), TieBreaker::new(&path, "b").unwrap());
        assert_eq!(a.claim(3, T).unwrap(), Outcome::Won { generation: 3 });
        assert_eq!(a.hand_over(4, "b", T).unwrap(), Outcome::Won { generation: 4 });
        assert_eq!(a.read().unwrap(), Some((4, "b".to_string())));
        assert_eq!(b.claim(4, T).unwrap(), Outcome::Won { generation: 4 }, "the named standby holds 4");
        assert_eq!(a.claim(4, T).unwrap(), Outcome::Lost { generation: 4, holder: "b".into() });
        assert!(matches!(a.hand_over(4, "c", T).unwrap(), Outcome::Lost { .. }), "no hand-over below the record");
        assert!(matches!(a.hand_over(5, "has space", T), Err(TieBreakError::BadOwner(_))));
    }

    #[test]
    fn higher_generations_win_and_the_holder_may_claim_again() {
        let d = dir("rules");
        let path = d.path().join("vm1");
        let a = TieBreaker::new(&path, "host-a").unwrap();
        let b = TieBreaker::new(&path, "host-b").unwrap();
        assert_eq!(a.read().unwrap(), None);
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 });
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 }, "idempotent for the holder");
        assert_eq!(b.claim(1, T).unwrap(), Outcome::Lost { generation: 1, holder: "host-a".into() });
        assert_eq!(b.claim(0, T).unwrap(), Outcome::Lost { generation: 1, holder: "host-a".into() });
        assert_eq!(b.claim(2, T).unwrap(), Outcome::Won { generation: 2 });
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Lost { generation: 2, holder: "host-b".into() });
        assert_eq!(a.read().unwrap(), Some((2, "host-b".into())));
    }

    #[test]
    fn corrupt_records_and_unreachable_storage_never_win() {
        let d = dir("bad");
        let path = d.path().join("vm1");
        std::fs::write(&path, "smpft-tiebreak v1 banana host\n").unwrap();
        let a = TieBreaker::new(&path, "host-a").unwrap();
        assert!(matches!(a.claim(9, T), Err(TieBreakError::Corrupt { .. })));
        std::fs::write(&path, "smpft-tiebreak v1 3 host-b").unwrap();
        assert!(matches!(a.claim(9, T), Err(TieBreakError::Corrupt { .. })), "a torn record (no newline) is corrupt");
        let gone = TieBreaker::new(&d.path().join("no-such-dir").join("vm1"), "host-a").unwrap();
        assert!(matches!(gone.claim(1, T), Err(TieBreakError::Unreachable { .. })));
        assert!(matches!(TieBreaker::new(&path, "two words"), Err(TieBreakError::BadOwner(_))));
    }

    #[test]
    fn a_held_lock_times_out_instead_of_hanging() {
        let d = dir("timeout");
        let path = d.path().join("vm1");
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(with_suffix(&path, ".lock"))
            .unwrap();
        let fl = libc::flock { l_type: libc::F_WRLCK as libc::c_short, l_whence: 0, l_start: 0, l_len: 0, l_pid: 0 };
        // SAFETY: fcntl on a descriptor we own with a valid flock.
        assert_eq!(unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0);
        let a = TieBreaker::new(&path, "host-a").unwrap();
        assert!(matches!(a.claim(1, Duration::from_millis(50)), Err(TieBreakError::LockTimeout { .. })));
        drop(lock);
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 });
    }

    #[test]
    fn racing_claimants_exactly_one_wins_each_generation() {
        let d = dir("race");
        let path = d.path().join("vm1");
        const RACERS: usize = 6;
        const ROUNDS: u64 = 60;
        let barrier = Arc::new(Barrier::new(RACERS));
        let handles: Vec<_> = (0..RACERS)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let tb = TieBreaker::new(&path, &format!("host-{i}")).unwrap();
                    (1..=ROUNDS)
                        .map(|g| {
                            barrier.wait();
                            matches!(tb.claim(g, T).unwrap(), Outcome::Won { .. })
                        })
                        .collect::<Vec<bool>>()
                })
            })
            .collect();
        let results: Vec<Vec<bool>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for g in 0..ROUNDS as usize {
            let winners = results.iter().filter(|r| r[g]).count();
            assert_eq!(winners, 1, "generation {} had {winners} winners", g + 1);
        }
    }
}
