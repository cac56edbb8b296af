//! Snapshots of a protected VM (QMP `x-smpft-snapshot` on the primary): forwarded to the
//! standby, which writes its committed copy (see `snapshot::committed`), so the primary never
//! pauses for them and its checkpoints keep their exclusive use of the dirty log. The QMP reply
//! waits for the standby's report while the primary runs on.

use super::PrimaryFt;
use crate::ft::protocol::PrimaryState;
use crate::ft::wire::{self, SnapshotDone, SnapshotRequest};
use qemu_shim::qmp::{QmpError, Reply};
use std::path::Path;
use transport::Message;

impl PrimaryFt {
    /// Asks the standby for a snapshot of its committed copy, written to `file` on its host;
    /// `reply` is answered when it reports (or at once, if it cannot be asked).
    pub fn forward_snapshot(&mut self, file: &Path, incremental: bool, reply: Reply) {
        self.forward(file, incremental, false, reply)
    }

    /// Asks the standby to end the disk exports of the snapshot at `file`.
    pub fn forward_release(&mut self, file: &Path, reply: Reply) {
        self.forward(file, false, true, reply)
    }

    fn forward(&mut self, file: &Path, incremental: bool, release: bool, reply: Reply) {
        if let Err(why) = self.may_forward(incremental, release) {
            return reply.send(Err(QmpError::generic(why)));
        }
        let Some(link) = &self.link else { return };
        self.next_snapshot += 1;
        let id = self.next_snapshot;
        let req = SnapshotRequest { id, file: file.display().to_string(), release };
        let msg = Message::App { kind: wire::APP_SNAPSHOT, data: wire::encode_app(&req) };
        if let Err(e) = link.chan.send(&msg) {
            return reply.send(Err(QmpError::generic(format!("cannot ask the standby: {e}"))));
        }
        tracing::info!(id, file = %file.display(), standby = %link.peer, release, "FT: snapshot request forwarded to the standby");
        self.pending_snapshots.push((id, reply));
    }

    /// Why the standby cannot be asked (for a snapshot unless `release`), if it cannot.
    fn may_forward(&self, incremental: bool, release: bool) -> Result<(), String> {
        let Some(link) = &self.link else { return Err("the VM is not protected".into()) };
        if incremental {
            return Err(
                "a protected VM's snapshots are full snapshots of the standby's committed copy (no increments)".into(),
            );
        }
        let committed =
            self.proto.state() == PrimaryState::Protected && self.sync.is_none() && self.proto.acked().is_some();
        if !release && !committed {
            return Err(format!(
                "the standby holds no committed copy yet (the VM is {}); ask again once it is protected",
                self.state_name()
            ));
        }
        let version = link.chan.version();
        if version < wire::SWITCHOVER_VERSION {
            return Err(format!(
                "the standby {} speaks FT wire version {version}, which cannot write snapshots of its copy: upgrade it",
                link.peer
            ));
        }
        Ok(())
    }

    /// The standby's report on a snapshot.
    pub(super) fn snapshot_done(&mut self, data: &[u8]) {
        let done: SnapshotDone = match wire::decode_app(data, "snapshot report") {
            Ok(d) => d,
            Err(e) => return tracing::error!("FT: {e}; ignored"),
        };
        let Some(at) = self.pending_snapshots.iter().position(|(id, _)| *id == done.id) else {
            return tracing::warn!(id = done.id, "FT: a report on a snapshot nobody waits for");
        };
        let (_, reply) = self.pending_snapshots.remove(at);
        let standby = self.link.as_ref().map(|l| l.peer.to_string());
        reply.send(match done.result {
            Ok(text) => {
                let mut v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({}));
                v["standby"] = serde_json::json!(standby);
                Ok(v)
            }
            Err(e) => Err(QmpError::generic(format!("the standby could not write the snapshot: {e}"))),
        });
    }

    /// The standby is gone: snapshots it had not reported on fail.
    pub(super) fn fail_pending_snapshots(&mut self) {
        for (_, reply) in self.pending_snapshots.drain(..) {
            reply.send(Err(QmpError::generic("the standby went away before it wrote the snapshot")));
        }
    }
}
