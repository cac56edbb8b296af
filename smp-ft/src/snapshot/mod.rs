//! Consistent snapshots of a running VM, and restoring a VM from a chain of them.
//!
//! A snapshot is taken with every vCPU stopped at the pause handshake (no port or MMIO access in
//! flight) and device input held, so memory, vCPU, in-kernel device and serial state are one
//! instant. A full snapshot holds every non-zero page; an incremental one holds the pages the
//! dirty log reports since the previous snapshot of the same VM and names it as its parent.

pub mod committed;
pub mod format;

pub use crate::vmm::capture::PauseTimings;
use crate::vmm::capture::{CaptureError, PageSet};
use crate::vmm::host::HostResources;
use crate::vmm::memory::GuestMemory;
use crate::vmm::{RunningVm, Vm, VmConfig, VmError};
pub use format::{FormatError, MachineState, MemoryPages, Snapshot};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
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
    #[error("the dirty-page log was used by something else (FT) since the last snapshot; take a full snapshot first")]
    BrokenChain,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Full,
    Incremental,
}

pub(crate) fn random_id() -> u64 {
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

/// The last snapshot taken of a VM, which the next incremental one builds on.
#[derive(Debug, Default)]
pub struct Chain {
    last: Option<Link>,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    id: u64,
    seq: u32,
    /// The VM's dirty-log harvest count right after that snapshot: an increment holds every
    /// change since it only if nothing else harvested the log in between.
    harvests: u64,
}

impl Chain {
    /// Takes a snapshot of `vm`. A running VM is paused for the capture and resumed; one paused
    /// already stays paused. Writing the result anywhere is the caller's business.
    pub fn take(&mut self, vm: &RunningVm, kind: Kind) -> Result<(Snapshot, PauseTimings), SnapshotError> {
        let parent = match (kind, self.last) {
            (Kind::Full, _) => None,
            (Kind::Incremental, None) => return Err(SnapshotError::NoBase),
            (Kind::Incremental, Some(l)) if l.harvests != vm.harvests() => return Err(SnapshotError::BrokenChain),
            (Kind::Incremental, Some(l)) => Some(l),
        };
        let set = if kind == Kind::Full { PageSet::All } else { PageSet::Dirty };
        let c = vm.capture(set, || {})?;
        let snap = Snapshot {
            id: random_id(),
            parent: parent.map(|l| l.id),
            seq: parent.map_or(0, |l| l.seq + 1),
            vcpus: vm.vcpus(),
            mem_size: vm.memory().size(),
            state: c.state,
            memory: c.memory,
        };
        self.last = Some(Link { id: snap.id, seq: snap.seq, harvests: vm.harvests() });
        Ok((snap, c.timings))
    }

    /// Takes a snapshot and writes it to `path`; returns the file size and the pause timings.
    pub fn take_to_file(
        &mut self,
        vm: &RunningVm,
        kind: Kind,
        path: &Path,
    ) -> Result<(u64, PauseTimings), SnapshotError> {
        let before = self.last;
        let (snap, t) = self.take(vm, kind)?;
        let size = format::write_file(path, &snap).map_err(|source| {
            // The pages this snapshot harvested are only in the file that was not written: no
            // increment may build on the chain until a new full snapshot.
            self.last = before.map(|l| Link { harvests: u64::MAX, ..l });
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
    s.memory.validate(s.mem_size).map_err(|e| e.to_string())?;
    if s.state.cpus.len() != s.vcpus as usize {
        return Err(format!("{} vCPU states for {} vCPUs", s.state.cpus.len(), s.vcpus));
    }
    Ok(())
}

/// Applies a chain's memory, in order, to `mem`.
pub fn apply_memory(chain: &[Snapshot], mem: &GuestMemory) -> Result<(), VmError> {
    for s in chain {
        s.memory.apply(mem)?;
    }
    Ok(())
}

/// FNV-1a over a chain's reconstructed memory: equal hashes, equal memory.
pub fn memory_hash(chain: &[Snapshot]) -> Result<u64, VmError> {
    let last = chain.last().ok_or(VmError::Stopped)?;
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

/// Builds a VM in the state of a validated chain (from [`read_chain`]). `config.vcpus` and
/// `config.memory` must match the snapshot. The VM is a new generation of the one saved (the
/// snapshot may be restored again, or its VM still run): it gets a new VM generation ID, as
/// QEMU gives a restored VM, so its guest reseeds what must not be shared between copies.
pub fn restore(config: VmConfig, chain: &[Snapshot]) -> Result<Vm, SnapshotError> {
    let last = chain.last().ok_or(SnapshotError::Empty)?;
    if (config.vcpus, config.memory) != (last.vcpus, last.mem_size) {
        return Err(SnapshotError::Config {
            want: format!("{} vCPUs and {} MiB", last.vcpus, last.mem_size >> 20),
            got: format!("{} vCPUs and {} MiB", config.vcpus, config.memory >> 20),
        });
    }
    let host = HostResources::reserve(&config)?;
    let memory = GuestMemory::new(config.memory).map_err(VmError::from)?;
    apply_memory(chain, &memory)?;
    let vm = Vm::from_state(config, Arc::new(memory), host, &last.state)?;
    vm.new_generation()?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::format::tests::sample;
    use super::*;
    use crate::vmm::dirty::PAGE_SIZE;

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
        s.state.cpus = vec![];
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
