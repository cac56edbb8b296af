//! The tie-breaker as a file on storage both hosts share (`--tiebreak PATH`).
//!
//! How it stays atomic:
//! - `PATH.lock` is locked with an open-file-description lock (`F_OFD_SETLK`). Linux implements
//!   these over NFS (v3 through NLM, v4 natively) as well as on local filesystems.
//! - Under that lock the record `PATH` is read, compared, written to `PATH.tmp`, fsynced, and
//!   renamed over `PATH`. Rename is atomic on local filesystems and on an NFS server, so a crash
//!   never leaves a torn record.
//!
//! If the storage cannot be reached, or the lock not taken within the timeout, the claim fails.

use super::{decide, Decision, Observed, Outcome, Record, Status, TieBreak, TieBreakError};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct FileTieBreaker {
    path: PathBuf,
    owner: String,
    observed: Observed,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl FileTieBreaker {
    /// `owner` names this side in the record (e.g. host name and VM name).
    pub fn new(path: &Path, owner: &str) -> Result<FileTieBreaker, TieBreakError> {
        if !super::valid_name(owner) {
            return Err(TieBreakError::BadOwner(owner.to_string()));
        }
        let observed = Observed::new("file", path.display().to_string());
        Ok(FileTieBreaker { path: path.to_path_buf(), owner: owner.to_string(), observed })
    }

    fn at(&self) -> String {
        self.path.display().to_string()
    }

    fn unreachable(&self) -> impl Fn(std::io::Error) -> TieBreakError + '_ {
        move |source| TieBreakError::Unreachable { at: self.at(), source }
    }

    fn load(&self) -> Result<Option<Record>, TieBreakError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.unreachable()(e)),
        };
        Record::decode(&text).map(Some).map_err(|d| TieBreakError::Corrupt { at: self.at(), detail: d.into() })
    }

    /// Takes the lock on `PATH.lock` within `timeout`; it is released when the descriptor is
    /// closed.
    fn lock(&self, timeout: Duration) -> Result<std::fs::File, TieBreakError> {
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(with_suffix(&self.path, ".lock"))
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
                return Ok(lock);
            }
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES | libc::EINTR)) {
                return Err(self.unreachable()(e));
            }
            if Instant::now() >= deadline {
                return Err(TieBreakError::LockTimeout { at: self.at(), timeout });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn claim_locked(&self, generation: u64, owner: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let lock = self.lock(timeout)?;
        let current = self.load()?;
        let outcome = match decide(current.as_ref(), generation, owner) {
            Decision::Lost(r) => r.lost(),
            Decision::Held => Outcome::Won { generation },
            Decision::Write => {
                self.write(&Record { generation, holder: owner.to_string() })?;
                Outcome::Won { generation }
            }
        };
        drop(lock);
        Ok(outcome)
    }

    fn write(&self, record: &Record) -> Result<(), TieBreakError> {
        let tmp = with_suffix(&self.path, ".tmp");
        let mut f = std::fs::File::create(&tmp).map_err(self.unreachable())?;
        f.write_all(record.encode().as_bytes()).map_err(self.unreachable())?;
        f.sync_all().map_err(self.unreachable())?;
        std::fs::rename(&tmp, &self.path).map_err(self.unreachable())?;
        self.sync_dir();
        Ok(())
    }

    fn sync_dir(&self) {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
    }
}

impl TieBreak for FileTieBreaker {
    fn owner(&self) -> &str {
        &self.owner
    }

    fn read(&self, _timeout: Duration) -> Result<Option<Record>, TieBreakError> {
        let start = Instant::now();
        let r = self.load();
        match &r {
            Ok(rec) => self.observed.saw(start, None, Some(rec.clone()), "read".into()),
            Err(e) => self.observed.saw(start, None, None, crate::error::error_chain(e)),
        }
        r
    }

    fn claim_as(&self, generation: u64, holder: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let start = Instant::now();
        let r = self.claim_locked(generation, holder, timeout);
        match &r {
            Ok(Outcome::Won { generation }) => {
                let rec = Record { generation: *generation, holder: holder.to_string() };
                self.observed.saw(start, None, Some(Some(rec)), "won".into());
            }
            Ok(Outcome::Lost { generation, holder }) => {
                let rec = Record { generation: *generation, holder: holder.clone() };
                self.observed.saw(start, None, Some(Some(rec)), "lost".into());
            }
            Err(e) => self.observed.saw(start, None, None, crate::error::error_chain(e)),
        }
        r
    }

    fn clear(&self, expected: &Record, timeout: Duration) -> Result<bool, TieBreakError> {
        let start = Instant::now();
        let lock = self.lock(timeout)?;
        match self.load()? {
            None => return Ok(true),
            Some(r) if r != *expected => return Ok(false),
            Some(_) => {}
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.unreachable()(e)),
        }
        self.sync_dir();
        drop(lock);
        self.observed.saw(start, None, Some(None), "cleared".into());
        Ok(true)
    }

    fn status(&self) -> Status {
        self.observed.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ft::tiebreak::TieBreak;
    use std::sync::{Arc, Barrier};

    fn dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("smpft-tiebreak-{name}-")).tempdir().unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn a_hand_over_names_the_standby_which_then_wins_without_the_primary() {
        let d = dir("handover");
        let path = d.path().join("tb");
        let (a, b) = (FileTieBreaker::new(&path, "a").unwrap(), FileTieBreaker::new(&path, "b").unwrap());
        assert_eq!(a.claim(3, T).unwrap(), Outcome::Won { generation: 3 });
        assert_eq!(a.hand_over(4, "b", T).unwrap(), Outcome::Won { generation: 4 });
        assert_eq!(a.read(T).unwrap(), Some(Record { generation: 4, holder: "b".into() }));
        assert_eq!(b.claim(4, T).unwrap(), Outcome::Won { generation: 4 }, "the named standby holds 4");
        assert_eq!(a.claim(4, T).unwrap(), Outcome::Lost { generation: 4, holder: "b".into() });
        assert!(matches!(a.hand_over(4, "c", T).unwrap(), Outcome::Lost { .. }), "no hand-over below the record");
        assert!(matches!(a.hand_over(5, "has space", T), Err(TieBreakError::BadOwner(_))));
    }

    #[test]
    fn higher_generations_win_and_the_holder_may_claim_again() {
        let d = dir("rules");
        let path = d.path().join("vm1");
        let a = FileTieBreaker::new(&path, "host-a").unwrap();
        let b = FileTieBreaker::new(&path, "host-b").unwrap();
        assert_eq!(a.read(T).unwrap(), None);
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 });
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 }, "idempotent for the holder");
        assert_eq!(b.claim(1, T).unwrap(), Outcome::Lost { generation: 1, holder: "host-a".into() });
        assert_eq!(b.claim(0, T).unwrap(), Outcome::Lost { generation: 1, holder: "host-a".into() });
        assert_eq!(b.claim(2, T).unwrap(), Outcome::Won { generation: 2 });
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Lost { generation: 2, holder: "host-b".into() });
        assert_eq!(a.read(T).unwrap(), Some(Record { generation: 2, holder: "host-b".into() }));
    }

    #[test]
    fn corrupt_records_and_unreachable_storage_never_win() {
        let d = dir("bad");
        let path = d.path().join("vm1");
        std::fs::write(&path, "smpft-tiebreak v1 banana host\n").unwrap();
        let a = FileTieBreaker::new(&path, "host-a").unwrap();
        assert!(matches!(a.claim(9, T), Err(TieBreakError::Corrupt { .. })));
        std::fs::write(&path, "smpft-tiebreak v1 3 host-b").unwrap();
        assert!(matches!(a.claim(9, T), Err(TieBreakError::Corrupt { .. })), "a torn record (no newline) is corrupt");
        let gone = FileTieBreaker::new(&d.path().join("no-such-dir").join("vm1"), "host-a").unwrap();
        assert!(matches!(gone.claim(1, T), Err(TieBreakError::Unreachable { .. })));
        assert!(matches!(FileTieBreaker::new(&path, "two words"), Err(TieBreakError::BadOwner(_))));
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
        let a = FileTieBreaker::new(&path, "host-a").unwrap();
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
                    let tb = FileTieBreaker::new(&path, &format!("host-{i}")).unwrap();
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
