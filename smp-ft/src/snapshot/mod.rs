//! Consistent snapshots of a running VM, and restoring a VM from a chain of them.
//!
//! A snapshot is taken with every vCPU stopped at the pause handshake (no port or MMIO access in
//! flight) and device input held, so memory, vCPU, in-kernel device and serial state are one
//! instant. A full snapshot holds every non-zero page; an incremental one holds the pages the
//! dirty log reports since the previous snapshot of the same VM and names it as its parent.

pub mod format;

use crate::vmm::dirty::{Bitmap, PAGE_SIZE};
use crate::vmm::memory::GuestMemory;
use crate::vmm::state::VmState;
use crate::vmm::{RunningVm, Vm, VmConfig, VmError};
pub use format::{FormatError, MemoryPages, Snapshot};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot pause the VM")]
    Pause(#[from] crate::vmm::control::PauseError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot write snapshot {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read snapshot {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("snapshot {path}")]
    Format { path: PathBuf, source: FormatError },
    #[error("no full snapshot has been taken of this VM yet; take one before an incremental snapshot")]
    NoBase,
    #[error("no snapshot files given")]
    Empty,
    #[error("snapshot {path} is incremental; a chain must start with a full snapshot")]
    StartsIncremental { path: PathBuf },
    #[error("snapshot {path} is a full snapshot; only the first file of a chain may be")]
    FullInChain { path: PathBuf },
    #[error("snapshot {path} does not follow the previous file (its parent is {parent:016x}, the previous is {previous:016x})")]
    Chain { path: PathBuf, parent: u64, previous: u64 },
    #[error("snapshot {path} is of a VM with {vcpus} vCPUs and {mem_mib} MiB, unlike the first file of the chain")]
    ChainConfig { path: PathBuf, vcpus: u32, mem_mib: u64 },
    #[error("the snapshot is of a VM with {want}, but {got} was asked for")]
    Config { want: String, got: String },
    #[error("snapshot memory data is inconsistent: {0}")]
    Pages(String),
}

/// Where the time of one snapshot pause went.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseTimings {
    pub stop: Duration,
    pub harvest: Duration,
    pub copy: Duration,
    pub state: Duration,
    pub resume: Duration,
    pub pages: u64,
}

impl PauseTimings {
    pub fn total(&self) -> Duration {
        self.stop + self.harvest + self.copy + self.state + self.resume
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Full,
    Incremental,
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Fall back to time and pid; ids only need to differ between snapshots.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words; align_to handles alignment.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Copies the pages in `set` (or every non-zero page when `set` is `None`) into `out`.
fn copy_pages(mem: &GuestMemory, set: Option<&Bitmap>, out: &mut MemoryPages) -> Result<(), VmError> {
    if let Some(set) = set {
        out.data.reserve(set.count() as usize * PAGE_SIZE as usize);
    }
    let mut one = |page: u64, sparse: bool| -> Result<(), VmError> {
        let data = mem.page(page)?;
        if is_zero(data) {
            if !sparse {
                out.zero_pages.push(page);
            }
        } else {
            out.pages.push(page);
            out.data.extend_from_slice(data);
        }
        Ok(())
    };
    match set {
        Some(set) => set.iter().try_for_each(|p| one(p, false)),
        None => mem
            .data_ranges()
            .into_iter()
            .try_for_each(|(s, e)| (s / PAGE_SIZE..e.div_ceil(PAGE_SIZE)).try_for_each(|p| one(p, true))),
    }
}

impl RunningVm {
    /// Takes a snapshot. The VM is paused for the capture and resumed afterwards unless it was
    /// already paused. Writing the result anywhere is the caller's business.
    pub fn snapshot(&self, kind: Kind) -> Result<(Snapshot, PauseTimings), SnapshotError> {
        let previous = *self.chain.lock();
        if kind == Kind::Incremental && previous.is_none() {
            return Err(SnapshotError::NoBase);
        }
        let was_paused = self.is_paused();
        let mut t = PauseTimings::default();
        let t0 = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        let t1 = Instant::now();
        t.stop = t1 - t0;
        let result = self.capture_paused(kind, &mut t);
        let t4 = Instant::now();
        if !was_paused {
            self.resume();
        }
        t.resume = t4.elapsed();
        let mut snap = result?;
        snap.id = random_id();
        match (kind, previous) {
            (Kind::Incremental, Some((parent, seq))) => {
                snap.parent = Some(parent);
                snap.seq = seq + 1;
            }
            _ => {
                snap.parent = None;
                snap.seq = 0;
            }
        }
        *self.chain.lock() = Some((snap.id, snap.seq));
        Ok((snap, t))
    }

    /// One FT checkpoint: pauses the vCPUs, runs `on_paused` (which seals the output of the
    /// epoch being closed), captures the pages dirtied since the previous harvest and the whole
    /// machine state, and resumes.
    pub fn checkpoint(
        &self,
        on_paused: impl FnOnce(),
    ) -> Result<(MemoryPages, crate::ft::wire::MachineState, PauseTimings), SnapshotError> {
        let was_paused = self.is_paused();
        let mut t = PauseTimings::default();
        let t0 = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        on_paused();
        t.stop = t0.elapsed();
        let result = self.capture_paused(Kind::Incremental, &mut t);
        let t4 = Instant::now();
        if !was_paused {
            self.resume();
        }
        t.resume = t4.elapsed();
        let s = result?;
        // The dirty bits went to the standby: an increment on an earlier snapshot would miss them.
        *self.chain.lock() = None;
        Ok((s.memory, crate::ft::wire::MachineState { cpus: s.cpus, vm: s.vm, serial: s.serial }, t))
    }

    /// A pre-copy round, with the VM running: the pages dirtied since the previous harvest, or
    /// (`all`) every non-zero page, with the dirty log reset first.
    pub fn copy_running(&self, all: bool) -> Result<MemoryPages, SnapshotError> {
        let vm = self.vm.as_ref().ok_or(VmError::ExitTimeout(Duration::ZERO))?;
        let mut dirty = self.dirty.lock();
        dirty.harvest(vm, &self.memory).map_err(VmError::from)?;
        let pages = dirty.take();
        *self.chain.lock() = None;
        let mut memory = MemoryPages::default();
        if all {
            copy_pages(&self.memory, None, &mut memory)?;
        } else {
            copy_pages(&self.memory, Some(&pages), &mut memory)?;
        }
        Ok(memory)
    }

    /// Pages dirtied since the last harvest, without taking them.
    pub fn dirty_pending(&self) -> Result<u64, SnapshotError> {
        let vm = self.vm.as_ref().ok_or(VmError::ExitTimeout(Duration::ZERO))?;
        let mut dirty = self.dirty.lock();
        dirty.harvest(vm, &self.memory).map_err(VmError::from)?;
        Ok(dirty.pending())
    }

    fn capture_paused(&self, kind: Kind, t: &mut PauseTimings) -> Result<Snapshot, SnapshotError> {
        let vm = self.vm.as_ref().ok_or(VmError::ExitTimeout(Duration::ZERO))?;
        let mut dirty = self.dirty.lock();
        let t1 = Instant::now();
        dirty.harvest(vm, &self.memory).map_err(VmError::from)?;
        let pages = dirty.take();
        let t2 = Instant::now();
        t.harvest = t2 - t1;
        let mut memory = MemoryPages::default();
        let copied = match kind {
            Kind::Incremental => copy_pages(&self.memory, Some(&pages), &mut memory),
            // A full snapshot covers everything, including what the log had collected.
            Kind::Full => copy_pages(&self.memory, None, &mut memory),
        };
        if let Err(e) = copied {
            dirty.put_back(&pages);
            return Err(e.into());
        }
        t.pages = (memory.pages.len() + memory.zero_pages.len()) as u64;
        let t3 = Instant::now();
        t.copy = t3 - t2;
        let state = (|| -> Result<_, VmError> {
            let pause = self.control.pause_seq();
            let cpus = self
                .vcpu_fds
                .iter()
                .enumerate()
                .map(|(i, fd)| self.early.capture(i, pause, &fd.lock()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((cpus, VmState::capture(vm)?, self.devices.serial.snapshot()))
        })();
        let (cpus, vm_state, serial) = match state {
            Ok(s) => s,
            Err(e) => {
                dirty.put_back(&pages);
                return Err(e.into());
            }
        };
        t.state = t3.elapsed();
        Ok(Snapshot {
            id: 0,
            parent: None,
            seq: 0,
            vcpus: self.vcpus,
            mem_size: self.memory.size(),
            cpus,
            vm: vm_state,
            serial,
            memory,
        })
    }

    /// Takes a snapshot and writes it to `path`; returns the file size and the pause timings.
    pub fn snapshot_to_file(&self, kind: Kind, path: &Path) -> Result<(u64, PauseTimings), SnapshotError> {
        let (snap, t) = self.snapshot(kind)?;
        let size = format::write_file(path, &snap).map_err(|source| {
            // The chain must not advance past a snapshot that was never written.
            *self.chain.lock() = snap.parent.map(|p| (p, snap.seq.saturating_sub(1)));
            SnapshotError::Write { path: path.to_path_buf(), source }
        })?;
        tracing::info!(path = %path.display(), bytes = size, pages = t.pages, pause_us = t.total().as_micros() as u64, ?kind, "snapshot written");
        Ok((size, t))
    }
}

/// Reads and validates a chain of snapshot files: one full snapshot, then its increments in order.
pub fn read_chain(paths: &[PathBuf]) -> Result<Vec<Snapshot>, SnapshotError> {
    let mut chain: Vec<Snapshot> = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Read { path: path.clone(), source })?;
        let s = format::decode(&bytes).map_err(|source| SnapshotError::Format { path: path.clone(), source })?;
        match (chain.last(), s.parent) {
            (None, Some(_)) => return Err(SnapshotError::StartsIncremental { path: path.clone() }),
            (Some(_), None) => return Err(SnapshotError::FullInChain { path: path.clone() }),
            (Some(prev), Some(parent)) if parent != prev.id => {
                return Err(SnapshotError::Chain { path: path.clone(), parent, previous: prev.id })
            }
            _ => {}
        }
        if let Some(first) = chain.first() {
            if (s.vcpus, s.mem_size) != (first.vcpus, first.mem_size) {
                return Err(SnapshotError::ChainConfig {
                    path: path.clone(),
                    vcpus: s.vcpus,
                    mem_mib: s.mem_size >> 20,
                });
            }
        }
        validate_pages(&s).map_err(SnapshotError::Pages)?;
        chain.push(s);
    }
    if chain.is_empty() {
        return Err(SnapshotError::Empty);
    }
    Ok(chain)
}

fn validate_pages(s: &Snapshot) -> Result<(), String> {
    let m = &s.memory;
    if m.data.len() as u64 != m.pages.len() as u64 * PAGE_SIZE {
        return Err(format!("{} pages but {} bytes of data", m.pages.len(), m.data.len()));
    }
    let limit = s.mem_size / PAGE_SIZE;
    if let Some(p) = m.pages.iter().chain(&m.zero_pages).find(|&&p| p >= limit) {
        return Err(format!("page {p} is beyond the {} MiB of memory", s.mem_size >> 20));
    }
    if s.cpus.len() != s.vcpus as usize {
        return Err(format!("{} vCPU states for {} vCPUs", s.cpus.len(), s.vcpus));
    }
    Ok(())
}

/// Applies a chain's memory, in order, to `mem`.
pub fn apply_memory(chain: &[Snapshot], mem: &GuestMemory) -> Result<(), VmError> {
    for s in chain {
        for (i, &page) in s.memory.pages.iter().enumerate() {
            let at = i * PAGE_SIZE as usize;
            mem.write(page * PAGE_SIZE, &s.memory.data[at..at + PAGE_SIZE as usize])?;
        }
        for &page in &s.memory.zero_pages {
            mem.fill(page * PAGE_SIZE, PAGE_SIZE, 0)?;
        }
    }
    Ok(())
}

/// FNV-1a over a chain's reconstructed memory: equal hashes, equal memory.
pub fn memory_hash(chain: &[Snapshot]) -> Result<u64, VmError> {
    let last = chain.last().ok_or(VmError::ExitTimeout(Duration::ZERO))?;
    let mem = GuestMemory::new(last.mem_size)?;
    apply_memory(chain, &mem)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < mem.size() {
        let n = buf.len().min((mem.size() - at) as usize);
        mem.read(at, &mut buf[..n])?;
        for &b in &buf[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        at += n as u64;
    }
    Ok(h)
}

impl Vm {
    /// Builds a VM in the state of a validated chain (from [`read_chain`]). `config.vcpus` and
    /// `config.memory` must match the snapshot.
    pub fn restore(config: VmConfig, chain: &[Snapshot]) -> Result<Vm, SnapshotError> {
        let last = chain.last().ok_or(SnapshotError::Empty)?;
        if (config.vcpus, config.memory) != (last.vcpus, last.mem_size) {
            return Err(SnapshotError::Config {
                want: format!("{} vCPUs and {} MiB", last.vcpus, last.mem_size >> 20),
                got: format!("{} vCPUs and {} MiB", config.vcpus, config.memory >> 20),
            });
        }
        let vm = Vm::from_state(config, None, |mem, fds, vm, devices, caps| {
            apply_memory(chain, mem)?;
            for (fd, state) in fds.iter().zip(&last.cpus) {
                state.restore(&fd.lock(), caps)?;
            }
            last.vm.restore(vm)?;
            devices.serial.restore(&last.serial)?;
            Ok(())
        })?;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::format::tests::sample;
    use super::*;

    fn write_all(dir: &Path, snaps: &[Snapshot]) -> Vec<PathBuf> {
        snaps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let p = dir.join(format!("{i}.snap"));
                format::write_file(&p, s).unwrap();
                p
            })
            .collect()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smpft-unit-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn valid(mut s: Snapshot) -> Snapshot {
        s.cpus = vec![];
        s.vcpus = 0;
        s
    }

    #[test]
    fn chain_rules() {
        let d = dir("chain");
        let full = valid(sample(1, None, 0));
        let i1 = valid(sample(2, Some(1), 1));
        let i2 = valid(sample(3, Some(2), 2));
        let stray = valid(sample(4, Some(99), 1));
        let ok = write_all(&d, &[full.clone(), i1.clone(), i2.clone()]);
        assert_eq!(read_chain(&ok).unwrap().len(), 3);
        let p = write_all(&d, std::slice::from_ref(&i1));
        assert!(matches!(read_chain(&p), Err(SnapshotError::StartsIncremental { .. })));
        let p = write_all(&d, &[full.clone(), i2.clone()]);
        assert!(matches!(read_chain(&p), Err(SnapshotError::Chain { parent: 2, previous: 1, .. })));
        let p = write_all(&d, &[full.clone(), stray]);
        assert!(matches!(read_chain(&p), Err(SnapshotError::Chain { .. })));
        let p = write_all(&d, &[full.clone(), full.clone()]);
        assert!(matches!(read_chain(&p), Err(SnapshotError::FullInChain { .. })));
        let mut other = i1;
        other.mem_size *= 2;
        let p = write_all(&d, &[full.clone(), other]);
        assert!(matches!(read_chain(&p), Err(SnapshotError::ChainConfig { .. })));
        let mut bad = full;
        bad.memory.pages.push(1 << 40);
        bad.memory.data.extend_from_slice(&[0; 4096]);
        let p = write_all(&d, &[bad]);
        assert!(matches!(read_chain(&p), Err(SnapshotError::Pages(_))));
        assert!(matches!(read_chain(&[]), Err(SnapshotError::Empty)));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn increments_overlay_memory_in_order() {
        let mem_size = 1 << 20;
        let page = |b: u8| vec![b; PAGE_SIZE as usize];
        let mut full = valid(sample(1, None, 0));
        full.mem_size = mem_size;
        full.memory = MemoryPages { pages: vec![1, 2], data: [page(1), page(2)].concat(), zero_pages: vec![] };
        let mut inc = valid(sample(2, Some(1), 1));
        inc.mem_size = mem_size;
        inc.memory = MemoryPages { pages: vec![2], data: page(9), zero_pages: vec![1] };
        let mem = GuestMemory::new(mem_size).unwrap();
        apply_memory(&[full.clone(), inc.clone()], &mem).unwrap();
        let mut b = [0u8; 1];
        mem.read(PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 0, "a page zeroed in the increment is zero");
        mem.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 9, "the increment's page wins");
        assert_ne!(memory_hash(&[full.clone()]).unwrap(), memory_hash(&[full, inc]).unwrap());
    }
}
