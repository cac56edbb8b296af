//! Snapshots of a protected VM taken from the standby's committed copy: the memory and machine
//! state as of the last checkpoint the standby acknowledged (everything any client has seen is
//! in it). The primary does not pause for them; the standby copies its memory (a memory-speed
//! pass, between two checkpoints it applies) and writes the file on a thread of its own.
//! The file is an ordinary full snapshot, restorable with `smpft run --restore`.

use super::format::{self, Snapshot};
use super::SnapshotError;
use crate::vmm::machine::MachineState;
use crate::vmm::memory::GuestMemory;
use crate::vmm::pages::{copy_pages, MemoryPages};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// A full snapshot of the committed copy (`memory` and `state` as of checkpoint `epoch`).
pub fn take(memory: &GuestMemory, state: &MachineState, vcpus: u32) -> Result<(Snapshot, Value), SnapshotError> {
    let started = Instant::now();
    let mut pages = MemoryPages::default();
    copy_pages(memory, None, &mut pages).map_err(crate::vmm::VmError::from)?;
    let snap = Snapshot {
        id: super::random_id(),
        parent: None,
        seq: 0,
        vcpus,
        mem_size: memory.size(),
        state: state.clone(),
        memory: pages,
    };
    let report = json!({ "pages": snap.memory.count(), "copy-ms": started.elapsed().as_secs_f64() * 1000.0 });
    Ok((snap, report))
}

/// Writes `snap` to `path` on a thread `workers` owns and hands `done` the QMP reply: `report` with
/// the file's size and where it was written, or why it was not.
pub fn write_in_background(
    workers: &mut shutdown::Workers,
    snap: Snapshot,
    path: PathBuf,
    mut report: Value,
    done: impl FnOnce(Result<Value, String>) + Send + 'static,
) {
    let spawned = workers.spawn("snapshot-write", move || {
        confine::enter(confine::Kind::Snapshot);
        let started = Instant::now();
        let r = format::write_file(&path, &snap)
            .map(|bytes| {
                report["bytes"] = json!(bytes);
                report["file"] = json!(path.display().to_string());
                report["write-ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
                tracing::info!(path = %path.display(), bytes, "snapshot of the committed copy written");
                report
            })
            .map_err(|e| format!("cannot write snapshot {}: {e}", path.display()));
        done(r);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the snapshot writer: {e}");
    }
}
