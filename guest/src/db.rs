//! `db`: a database-shaped workload on the first virtio-blk disk, served one request at a time
//! through the service (`DB <id>` and `DBCHECK <id>`, see `service`).
//!
//! The disk holds a log of fixed-size records (`db-record=` bytes, a multiple of 512), record
//! `p` at byte `p * db-record`. `DB <id>` appends one record: it writes it with one virtio-blk
//! write, flushes (VIRTIO_BLK_T_FLUSH), and only after both complete enters `id -> position` in
//! the in-memory index and answers `POS <id> <position>`. An id already in the index gets its
//! position back and nothing is written, so a client that retries after a failover never puts a
//! record in the log twice. A record is a header (magic, log tag, id, position, record size,
//! checksum of every other word) and payload words that are a function of (id, position).
//!
//! `DBCHECK <id>` reads every position the log has room for and checks the rule: each position
//! below the count holds exactly the record the index puts there (so no id is in the log twice,
//! and the index and the log agree on the count), and no position at or past the count holds a
//! record of this log. The one write that may be either way is the one in flight at a cut: a
//! `DB` notes (id, position) in memory before it submits the write and forgets it once the index
//! has the record, so after a cut that record may or may not be on the disk at the count yet,
//! and it is allowed there. `DBCHECK` is served between requests, though, and a copy that resumes
//! from a cut finishes the request in flight (the device serves the write again, or has served
//! it) before it serves another, so in practice a record of this log past the count is always an
//! error: the disk is ahead of the guest's memory (a write of an epoch the surviving memory does
//! not know of). A record of this log below the count that is missing or wrong is the disk
//! behind the memory.
//!
//! The log lives as long as the guest's memory: every boot starts a new one at position 0, with
//! a tag drawn from the TSC in every record, so an earlier boot's records (or any other data on
//! the disk) are not this log's and are overwritten as the log grows.

use crate::abi::{EXIT_BAD_PARAMS, EXIT_DEVICE_FAILED};
use crate::blk::{Blk, SECTOR, T_FLUSH, T_IN, T_OUT};
use crate::sync::{Locked, TakeOnce};
use crate::{dma, fail, log};
use core::fmt;

/// The largest record, and the bytes each read of `DBCHECK` moves.
const MAX_RECORD: u64 = 64 << 10;
/// Index slots (open addressing, at most half of them used).
const SLOTS: usize = 1 << 15;
/// The most records a log holds (the disk may allow fewer).
const MAX_RECORDS: u64 = SLOTS as u64 / 2;
const MAGIC: u64 = u64::from_le_bytes(*b"smpft-db");
/// Header words: magic, tag, id, position, record size, checksum.
const HEADER_WORDS: usize = 6;
const CHECKSUM: usize = 5;

/// `id -> position`: slot `(id + 1, position)`, 0 for a free slot (ids have at most 19 digits).
struct Index {
    slots: [(u64, u64); SLOTS],
    len: u64,
}

static INDEX: TakeOnce<Index> = TakeOnce::new(Index { slots: [(0, 0); SLOTS], len: 0 });

impl Index {
    /// The position of `id`, or the free slot it would take.
    fn find(&self, id: u64) -> Result<u64, usize> {
        let mut i = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize;
        loop {
            match self.slots[i] {
                (0, _) => return Err(i),
                (k, pos) if k == id + 1 => return Ok(pos),
                _ => i = (i + 1) % SLOTS,
            }
        }
    }
}

struct Db {
    blk: Blk,
    index: &'static mut Index,
    /// Bytes per record.
    record: u64,
    /// Records the disk has room for, up to [`MAX_RECORDS`].
    capacity: u64,
    tag: u64,
    /// [`MAX_RECORD`] bytes of device memory: a record to write, or records read back.
    buf: u64,
    /// Records in the log: the next append goes to this position.
    count: u64,
    /// The append in flight: (id, position), noted before the write is submitted.
    pending: Option<(u64, u64)>,
    /// Requests answered from the index without a write.
    repeats: u64,
    /// The next append skips its write (`fail=db`).
    sabotaged: bool,
}

static DB: Locked<Option<Db>> = Locked::new(None);

/// Why a request was refused, or what `DBCHECK` found wrong.
pub enum Error {
    Off,
    Full {
        records: u64,
    },
    /// Position `at` below the count holds no record of this log.
    Missing {
        at: u64,
        count: u64,
    },
    /// Position `at` holds a record of this log that is wrong in `what`.
    Damaged {
        at: u64,
        what: &'static str,
    },
    /// Position `at` below the count holds `id`, which the index puts at `index` (or not at all).
    Misplaced {
        at: u64,
        id: u64,
        index: Option<u64>,
    },
    /// Position `at`, at or past the count, holds a record of this log with `id`.
    Ahead {
        at: u64,
        id: u64,
        count: u64,
    },
    /// The index holds `index` ids, the log `count` records.
    Count {
        index: u64,
        count: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Off => write!(f, "no database: boot parameter db is off"),
            Error::Full { records } => write!(f, "log full ({records} records)"),
            Error::Missing { at, count } => {
                write!(f, "position {at} of {count}: no record of this log on the disk (the disk is behind memory)")
            }
            Error::Damaged { at, what } => write!(f, "position {at}: the record's {what} is wrong"),
            Error::Misplaced { at, id, index: Some(p) } => {
                write!(f, "position {at}: holds id {id}, which the index puts at {p}")
            }
            Error::Misplaced { at, id, index: None } => write!(f, "position {at}: holds id {id}, not in the index"),
            Error::Ahead { at, id, count } => {
                write!(f, "position {at}: holds id {id} past the log's {count} records (the disk is ahead of memory)")
            }
            Error::Count { index, count } => write!(f, "the index holds {index} ids, the log {count} records"),
        }
    }
}

/// Word `i` of the payload of `id`'s record at `position`.
fn payload(id: u64, position: u64, i: u64) -> u64 {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ position.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= i.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a over the record's words, the checksum word left out.
fn checksum(words: &[u64]) -> u64 {
    let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    words.iter().enumerate().filter(|&(i, _)| i != CHECKSUM).fold(0xcbf2_9ce4_8422_2325, |h, (_, &w)| mix(h, w))
}

/// What a position of the disk holds.
enum Found {
    /// Not a record of this log (another tag, or no record at all).
    Other,
    Record(u64),
    Damaged(&'static str),
}

/// Finds and starts the disk and lays out the log (run once, by vCPU 0).
pub fn init(tsc_khz: u64, record: u64) -> Result<(), u32> {
    if record < SECTOR || !record.is_multiple_of(SECTOR) || record > MAX_RECORD {
        log!("db: db-record={record} must be a multiple of 512 up to {MAX_RECORD}");
        return Err(EXIT_BAD_PARAMS);
    }
    let blk = Blk::open(tsc_khz, "db")?;
    if !blk.flush {
        log!("db: the disk does not offer flush (VIRTIO_BLK_F_FLUSH)");
        return Err(EXIT_DEVICE_FAILED);
    }
    let capacity = (blk.size / record).min(MAX_RECORDS);
    if capacity == 0 {
        log!("db: a {}-byte disk has no room for a {record}-byte record", blk.size);
        return Err(EXIT_BAD_PARAMS);
    }
    let Some(buf) = dma::alloc(MAX_RECORD, 4096) else {
        log!("db: {}", crate::virtio::Error::OutOfMemory);
        return Err(EXIT_DEVICE_FAILED);
    };
    let Some(index) = INDEX.take() else {
        log!("db: started twice");
        return Err(EXIT_DEVICE_FAILED);
    };
    let mut tag = crate::io::rdtsc() ^ 0x5851_f42d_4c95_7f2d;
    tag = (tag ^ (tag >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    log!("db: a log of up to {capacity} records of {record} bytes, tag {tag:016x}");
    let db = Db { blk, index, record, capacity, tag, buf, count: 0, pending: None, repeats: 0, sabotaged: false };
    DB.with(|d| *d = Some(db));
    Ok(())
}

/// `DB <id>`: the position of `id`'s record, appended (written and flushed) if it is new.
pub fn append(id: u64) -> Result<u64, Error> {
    DB.with(|d| d.as_mut().ok_or(Error::Off)?.append(id))
}

/// `DBCHECK`: reads the log back; the number of records if all is well.
pub fn check() -> Result<u64, Error> {
    DB.with(|d| d.as_mut().ok_or(Error::Off)?.check())
}

/// (records, requests answered from the index).
pub fn totals() -> (u64, u64) {
    DB.with(|d| d.as_ref().map_or((0, 0), |d| (d.count, d.repeats)))
}

/// Makes the next append claim a record in memory that never reaches the disk (`fail=db`).
pub fn sabotage() {
    DB.with(|d| {
        if let Some(d) = d.as_mut() {
            d.sabotaged = true;
            log!("db: sabotaged: the next record is not written");
        }
    })
}

impl Db {
    /// The first `n` bytes of the buffer, to fill.
    fn words_mut(&mut self, n: u64) -> &mut [u64] {
        debug_assert!(n <= MAX_RECORD);
        // SAFETY: `buf` is MAX_RECORD bytes of device memory owned by this workload, `n` is at
        // most that, and no request is in flight while the lock is held outside `io`.
        unsafe { core::slice::from_raw_parts_mut(self.buf as *mut u64, (n / 8) as usize) }
    }

    /// The first `n` bytes of the buffer, as read.
    fn words(&self, n: u64) -> &[u64] {
        debug_assert!(n <= MAX_RECORD);
        // SAFETY: as for `words_mut`; nothing writes the buffer while this borrow of `self` lives.
        unsafe { core::slice::from_raw_parts(self.buf as *const u64, (n / 8) as usize) }
    }

    /// One request: `len` bytes from or to the buffer at `position`, or a flush.
    fn io(&mut self, kind: u32, position: u64, len: u64) {
        let sector = position * self.record / SECTOR;
        if let Err(e) = self.blk.request(kind, sector, self.buf, len as u32) {
            fail(format_args!("db: request (type {kind}, position {position}) {e}"));
        }
    }

    fn append(&mut self, id: u64) -> Result<u64, Error> {
        let slot = match self.index.find(id) {
            Ok(position) => {
                self.repeats += 1;
                return Ok(position);
            }
            Err(slot) => slot,
        };
        let position = self.count;
        if position == self.capacity {
            return Err(Error::Full { records: self.count });
        }
        let (tag, record) = (self.tag, self.record);
        let words = self.words_mut(record);
        for (i, w) in words.iter_mut().enumerate().skip(HEADER_WORDS) {
            *w = payload(id, position, i as u64);
        }
        words[..HEADER_WORDS].copy_from_slice(&[MAGIC, tag, id, position, record, 0]);
        words[CHECKSUM] = checksum(words);
        // Noted before the device can see it: after a cut, this record may or may not be there.
        self.pending = Some((id, position));
        if core::mem::take(&mut self.sabotaged) {
            log!("db: sabotaged: id {id} at position {position} is not written");
        } else {
            self.io(T_OUT, position, record);
        }
        self.io(T_FLUSH, 0, 0);
        self.index.slots[slot] = (id + 1, position);
        self.index.len += 1;
        self.count += 1;
        self.pending = None;
        Ok(position)
    }

    /// What the record at `at` in `words` is.
    fn classify(&self, words: &[u64], at: u64) -> Found {
        if words[0] != MAGIC || words[1] != self.tag {
            return Found::Other;
        }
        let id = words[2];
        if words[4] != self.record {
            Found::Damaged("size")
        } else if words[3] != at {
            Found::Damaged("position")
        } else if words[CHECKSUM] != checksum(words) {
            Found::Damaged("checksum")
        } else if words.iter().enumerate().skip(HEADER_WORDS).any(|(i, &w)| w != payload(id, at, i as u64)) {
            Found::Damaged("payload")
        } else {
            Found::Record(id)
        }
    }

    /// Whether position `at` holding `found` keeps to the rule (see the module's comment).
    fn judge(&self, at: u64, found: Found) -> Result<(), Error> {
        let count = self.count;
        let in_flight = |id: Option<u64>| {
            self.pending.is_some_and(|(p_id, p_at)| p_at == at && p_at == count && id.is_none_or(|id| id == p_id))
        };
        match found {
            Found::Other if at < count => Err(Error::Missing { at, count }),
            Found::Other => Ok(()),
            Found::Damaged(_) if at >= count && in_flight(None) => Ok(()),
            Found::Damaged(what) => Err(Error::Damaged { at, what }),
            Found::Record(id) if at < count => match self.index.find(id) {
                Ok(p) if p == at => Ok(()),
                Ok(p) => Err(Error::Misplaced { at, id, index: Some(p) }),
                Err(_) => Err(Error::Misplaced { at, id, index: None }),
            },
            Found::Record(id) if in_flight(Some(id)) => Ok(()),
            Found::Record(id) => Err(Error::Ahead { at, id, count }),
        }
    }

    fn check(&mut self) -> Result<u64, Error> {
        if self.index.len != self.count {
            return Err(Error::Count { index: self.index.len, count: self.count });
        }
        let per_read = MAX_RECORD / self.record;
        let mut at = 0;
        while at < self.capacity {
            let n = per_read.min(self.capacity - at);
            self.io(T_IN, at, n * self.record);
            for k in 0..n {
                let words = self.words(n * self.record);
                let one = &words[(k * self.record / 8) as usize..((k + 1) * self.record / 8) as usize];
                let found = self.classify(one, at + k);
                self.judge(at + k, found)?;
            }
            at += n;
        }
        Ok(self.count)
    }
}
