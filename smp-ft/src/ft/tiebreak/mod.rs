//! The tie-breaker: a lock with a generation number that both copies of a VM reach. A side
//! that wants to act alone claims generation `g`. It wins if `g` is higher than any generation
//! recorded before (or it already holds `g`), and then the record names it. Everyone else loses
//! at `g`.
//!
//! One rule ([`decide`]), one record format ([`Record`]), several places to keep the record
//! behind one trait ([`TieBreak`]):
//! - a file on storage both hosts share ([`file::FileTieBreaker`], `--tiebreak PATH`): made
//!   atomic by a lock on `PATH.lock` and a rename;
//! - a key in etcd ([`etcd::EtcdTieBreaker`], `--tiebreak etcd://HOST:PORT,.../PREFIX/VM`): made
//!   atomic by a transaction that writes only if the record is still the one read.
//!
//! A record that cannot be parsed is an error, never a win. If the record cannot be reached
//! within the claim timeout (the storage is gone, or no etcd quorum answers) the claim fails,
//! and the caller must not go live: the protocol core treats every error alike.

pub mod etcd;
pub mod file;
pub mod holder;
#[cfg(test)]
pub(crate) mod memory;
pub mod spec;

pub use spec::Spec;

use std::sync::Arc;
use std::time::{Duration, Instant};

const MAGIC: &str = "smpft-tiebreak v1";

/// What a holder's name ends with when the copy that held the tie-breaker ended the VM on
/// purpose (see [`TieBreak::record_stop`]).
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

/// The record: the highest generation claimed and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub holder: String,
}

impl Record {
    /// The record's text, the same for every backend: `smpft-tiebreak v1 GENERATION HOLDER\n`.
    pub fn encode(&self) -> String {
        format!("{MAGIC} {} {}\n", self.generation, self.holder)
    }

    /// Parses [`Record::encode`]'s text; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<Record, &'static str> {
        let line = text.strip_suffix('\n').ok_or("no final newline")?;
        let rest = line.strip_prefix(MAGIC).and_then(|r| r.strip_prefix(' ')).ok_or("bad header")?;
        let (generation, holder) = rest.split_once(' ').ok_or("missing holder")?;
        let generation = generation.parse().map_err(|_| "bad generation")?;
        if !valid_name(holder) {
            return Err("bad holder");
        }
        Ok(Record { generation, holder: holder.to_string() })
    }

    /// A claim lost to this record.
    pub fn lost(&self) -> Outcome {
        Outcome::Lost { generation: self.generation, holder: self.holder.clone() }
    }

    /// The copy that held it ended the VM on purpose.
    pub fn stopped(&self) -> bool {
        self.holder.ends_with(STOPPED)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace)
}

/// What a claim of `generation` for `holder` does to the record `current`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Someone else holds this generation or a later one (this record): the claim is lost,
    /// nothing written.
    Lost(Record),
    /// `holder` holds `generation` already: won, nothing to write.
    Held,
    /// Write `generation` and `holder`; the claim is won if the write is.
    Write,
}

/// The rule every backend applies atomically.
pub(crate) fn decide(current: Option<&Record>, generation: u64, holder: &str) -> Decision {
    match current {
        Some(r) if r.generation > generation || (r.generation == generation && r.holder != holder) => {
            Decision::Lost(r.clone())
        }
        Some(r) if r.generation == generation => Decision::Held,
        _ => Decision::Write,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TieBreakError {
    #[error("tie-breaker {at} is unreachable")]
    Unreachable { at: String, source: std::io::Error },
    #[error("tie-breaker {at} could not be locked within {timeout:?}")]
    LockTimeout { at: String, timeout: Duration },
    #[error("tie-breaker {at}: no etcd member answered with a quorum within {timeout:?} (last: {last})")]
    NoQuorum { at: String, timeout: Duration, last: String },
    #[error("tie-breaker {at}: {why}")]
    Etcd { at: String, why: String },
    #[error("tie-breaker record {at} is corrupt ({detail}); refusing to act on it")]
    Corrupt { at: String, detail: String },
    #[error("tie-breaker owner name {0:?} must be non-empty, one line, without spaces")]
    BadOwner(String),
    #[error("tie-breaker {at}: cannot start the etcd client")]
    Runtime { at: String, source: std::io::Error },
}

/// What a copy last learnt from its tie-breaker, for `x-smpft-query-ft`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `file` or `etcd`.
    pub backend: &'static str,
    /// The record: a path, or etcd's endpoints and key.
    pub at: String,
    /// The etcd member that answered last (`host:port`).
    pub endpoint: Option<String>,
    /// The record as last read or written.
    pub record: Option<Record>,
    /// The last request's outcome: `won`, `lost`, `read`, `cleared` or the error.
    pub last: Option<String>,
    /// How long the last request took, in milliseconds.
    pub last_ms: Option<u64>,
}

impl Status {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend,
            "at": self.at,
            "endpoint": self.endpoint,
            "generation": self.record.as_ref().map(|r| r.generation),
            "holder": self.record.as_ref().map(|r| r.holder.clone()),
            "last": self.last,
            "last-ms": self.last_ms,
        })
    }
}

/// A backend's [`Status`], kept up to date as requests are answered.
#[derive(Debug)]
pub(crate) struct Observed(parking_lot::Mutex<Status>);

impl Observed {
    pub fn new(backend: &'static str, at: String) -> Observed {
        Observed(parking_lot::Mutex::new(Status { backend, at, ..Status::default() }))
    }

    pub fn get(&self) -> Status {
        self.0.lock().clone()
    }

    /// A request started at `start` ended: `endpoint` answered (if one did), the record is
    /// `record` (if known), with `last` as the outcome.
    pub fn saw(&self, start: Instant, endpoint: Option<String>, record: Option<Option<Record>>, last: String) {
        let mut s = self.0.lock();
        if endpoint.is_some() {
            s.endpoint = endpoint;
        }
        if let Some(r) = record {
            s.record = r;
        }
        s.last = Some(last);
        s.last_ms = Some(start.elapsed().as_millis() as u64);
    }
}

/// A tie-breaker a copy claims. Every backend applies [`decide`] atomically; the provided
/// methods are the requests the FT roles make, each logged with its outcome.
pub trait TieBreak: Send + Sync {
    /// This side's name in the record.
    fn owner(&self) -> &str;

    /// The current record, or `None` if nobody ever claimed (or it was cleared).
    fn read(&self, timeout: Duration) -> Result<Option<Record>, TieBreakError>;

    /// Claims `generation` for `holder` by the rule of [`decide`], atomically.
    fn claim_as(&self, generation: u64, holder: &str, timeout: Duration) -> Result<Outcome, TieBreakError>;

    /// Removes the record if it is still `expected`; `false` if it changed meanwhile.
    fn clear(&self, expected: &Record, timeout: Duration) -> Result<bool, TieBreakError>;

    /// What this copy last learnt.
    fn status(&self) -> Status;

    /// Claims `generation` for this side; see the module documentation for the rule.
    fn claim(&self, generation: u64, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let r = self.claim_as(generation, self.owner(), timeout);
        logged(self, "claim", generation, self.owner(), r)
    }

    /// Claims `generation` on behalf of `holder` (a planned switchover: the primary records its
    /// standby, which then claims the same generation and wins without writing). The same rule
    /// as [`TieBreak::claim`], with `holder` in place of this side.
    fn hand_over(&self, generation: u64, holder: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        if !valid_name(holder) {
            return Err(TieBreakError::BadOwner(holder.to_string()));
        }
        let r = self.claim_as(generation, holder, timeout);
        logged(self, "hand-over", generation, holder, r)
    }

    /// The VM was ended on purpose by this copy, which holds `generation`: the record says so
    /// at the next generation, so a standby that did not hear the stop and claims loses to a
    /// holder named `OWNER/stopped`, and knows the VM ended rather than failed.
    fn record_stop(&self, generation: u64, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let holder = format!("{}{STOPPED}", self.owner());
        let r = self.claim_as(generation + 1, &holder, timeout);
        logged(self, "stop record", generation + 1, &holder, r)
    }
}

/// Logs a request's outcome with where it was answered.
fn logged<T: TieBreak + ?Sized>(
    tb: &T,
    what: &str,
    generation: u64,
    holder: &str,
    r: Result<Outcome, TieBreakError>,
) -> Result<Outcome, TieBreakError> {
    let s = tb.status();
    let (backend, endpoint, ms) = (s.backend, s.endpoint.unwrap_or_else(|| s.at.clone()), s.last_ms.unwrap_or(0));
    match &r {
        Ok(Outcome::Won { .. }) => {
            tracing::info!(backend, %endpoint, generation, %holder, ms, "tie-breaker: {what} won");
        }
        Ok(Outcome::Lost { generation: held, holder: by }) => tracing::info!(
            backend,
            %endpoint,
            generation,
            %holder,
            ms,
            "tie-breaker: {what} lost: generation {held} is held by {by}"
        ),
        Err(e) => tracing::warn!(
            backend,
            generation,
            %holder,
            ms,
            "tie-breaker: {what} failed: {}",
            crate::error::error_chain(e)
        ),
    }
    r
}

/// Opens the tie-breaker `spec` names, as `owner`. Opened once per process: a standby that goes
/// live keeps, as the primary it becomes, the one it claimed with (what it learnt, for
/// `x-smpft-query-ft`, and its connections to etcd).
pub fn open(spec: &Spec, owner: &str) -> Result<Arc<dyn TieBreak>, TieBreakError> {
    type Opened = Vec<((Spec, String), Arc<dyn TieBreak>)>;
    static OPENED: parking_lot::Mutex<Opened> = parking_lot::Mutex::new(Vec::new());
    if !valid_name(owner) {
        return Err(TieBreakError::BadOwner(owner.to_string()));
    }
    let mut opened = OPENED.lock();
    if let Some((_, tb)) = opened.iter().find(|((s, o), _)| s == spec && o == owner) {
        return Ok(tb.clone());
    }
    let tb: Arc<dyn TieBreak> = match spec {
        Spec::File(path) => Arc::new(file::FileTieBreaker::new(path, owner)?),
        Spec::Etcd(e) => Arc::new(etcd::EtcdTieBreaker::new(e.clone(), owner)?),
    };
    opened.push(((spec.clone(), owner.to_string()), tb.clone()));
    Ok(tb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let r = |g: u64, h: &str| Record { generation: g, holder: h.into() };
        assert_eq!(decide(None, 1, "a"), Decision::Write);
        assert_eq!(decide(Some(&r(1, "a")), 2, "b"), Decision::Write);
        assert_eq!(decide(Some(&r(2, "a")), 2, "a"), Decision::Held);
        assert_eq!(decide(Some(&r(2, "a")), 2, "b"), Decision::Lost(r(2, "a")));
        assert_eq!(decide(Some(&r(3, "a")), 2, "a"), Decision::Lost(r(3, "a")));
    }

    #[test]
    fn records_round_trip_and_bad_ones_say_why() {
        let r = Record { generation: 7, holder: "host:12".into() };
        assert_eq!(Record::decode(&r.encode()), Ok(r));
        assert_eq!(Record::decode("smpft-tiebreak v1 3 a"), Err("no final newline"));
        assert_eq!(Record::decode("smpft-tiebreak v2 3 a\n"), Err("bad header"));
        assert_eq!(Record::decode("smpft-tiebreak v1 x a\n"), Err("bad generation"));
        assert_eq!(Record::decode("smpft-tiebreak v1 3\n"), Err("missing holder"));
        assert_eq!(Record::decode("smpft-tiebreak v1 3 a b\n"), Err("bad holder"));
    }
}
