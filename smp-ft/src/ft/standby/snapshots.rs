//! Snapshots of the committed copy (QMP `x-smpft-snapshot`, on this standby or forwarded by its
//! primary) and the point-in-time NBD exports of its disks that go with them.

use super::{Session, StandbyRunner, EXPORT_OVERLAY_LIMIT};
use crate::error::error_chain;
use block::export::Export;
use serde_json::{json, Value};
use transport::Message;

impl StandbyRunner<'_> {
    /// A snapshot of the committed copy (the state as of the last acknowledged checkpoint),
    /// written to `file` on a thread of its own; `done` gets the QMP reply.
    pub(super) fn snapshot_committed(
        &self,
        s: Option<&Session>,
        file: std::path::PathBuf,
        done: impl FnOnce(Result<Value, String>) + Send + 'static,
    ) {
        let Some((s, state)) = s.and_then(|s| s.state.as_ref().map(|st| (s, st))) else {
            return done(Err("this standby holds no committed copy of the VM yet".into()));
        };
        match crate::snapshot::committed::take(&s.memory, state, self.opts.config.vcpus) {
            Ok((snap, mut report)) => {
                report["epoch"] = json!(s.proto.applied());
                // The disks as of the same instant, for backup tools to read.
                match self.export_disks(&file) {
                    Ok(uris) if uris.is_empty() => {}
                    Ok(uris) => report["exports"] = json!(uris),
                    Err(e) => return done(Err(e)),
                }
                crate::snapshot::committed::write_in_background(&mut self.workers.lock(), snap, file, report, done);
            }
            Err(e) => done(Err(error_chain(&e))),
        }
    }

    /// Read-only NBD exports of every disk as it is now, next to the snapshot `file` (one unix
    /// socket per disk, `FILE.diskN.nbd`), until released; their NBD URIs.
    fn export_disks(&self, file: &std::path::Path) -> Result<Vec<String>, String> {
        let mut exports = Vec::new();
        for (i, f) in self.fleeces.iter().enumerate() {
            let mut path = file.as_os_str().to_owned();
            path.push(format!(".disk{i}.nbd"));
            let e = Export::serve(f.view(EXPORT_OVERLAY_LIMIT), std::path::Path::new(&path))
                .map_err(|e| format!("cannot export disk{i} at {}: {e}", std::path::Path::new(&path).display()))?;
            exports.push(e);
        }
        let uris = exports.iter().map(Export::uri).collect();
        if !exports.is_empty() {
            self.release_exports(Some(file));
            self.exports.lock().push((file.to_path_buf(), exports));
        }
        Ok(uris)
    }

    /// Ends the exports of the snapshot at `file` (all of them if `None`); how many ended.
    pub(super) fn release_exports(&self, file: Option<&std::path::Path>) -> usize {
        let mut exports = self.exports.lock();
        let before = exports.len();
        exports.retain(|(f, _)| file.is_some_and(|file| f != file));
        before - exports.len()
    }

    /// The primary asked for a snapshot of the committed copy: the outcome goes back to it.
    pub(super) fn snapshot_for_primary(&self, s: &Session, data: &[u8]) {
        let req: crate::ft::wire::SnapshotRequest = match crate::ft::wire::decode_app(data, "snapshot request") {
            Ok(r) => r,
            Err(e) => return tracing::error!("FT: {e}; ignored"),
        };
        let (chan, id) = (s.chan.clone(), req.id);
        let report = move |result: Result<Value, String>| {
            let done = crate::ft::wire::SnapshotDone { id, result: result.map(|v| v.to_string()) };
            let msg =
                Message::App { kind: crate::ft::wire::APP_SNAPSHOT_DONE, data: crate::ft::wire::encode_app(&done) };
            if let Err(e) = chan.send(&msg) {
                tracing::warn!("FT: cannot report snapshot {id} to the primary: {e}");
            }
        };
        if req.release {
            let released = self.release_exports(Some(std::path::Path::new(&req.file)));
            report(Ok(json!({ "released": released })));
        } else {
            self.snapshot_committed(Some(s), req.file.into(), report);
        }
    }
}
