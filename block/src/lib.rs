//! Block storage: what a VM's disks are (`spec`), the storage behind them (`backend`: local
//! files and block devices through io_uring; `nbd`: NBD exports), one completed change to a disk
//! as a value (`op`), read-only NBD exports of disk images (`export`), and qemu-storage-daemon
//! for the disks QEMU's block layer opens (`qsd`).
//!
//! Nothing here knows of fault tolerance: the VMM serves its disks from these backends, and the
//! disk mirror builds its write log, digests and point-in-time views on top.

pub mod backend;
pub mod export;
pub mod nbd;
pub mod op;
pub mod qsd;
pub mod spec;

pub use backend::{Backend, BackendError};
pub use op::Op;

use std::sync::Arc;

/// Opens the storage `spec` names.
pub fn open(spec: &spec::DiskSpec) -> Result<Arc<dyn Backend>, BackendError> {
    if spec.graph.is_some() {
        return Err(BackendError::NeedsDaemon);
    }
    Ok(match &spec.location {
        spec::Location::Path(p) => Arc::new(backend::RawFile::open(p, spec.readonly)?),
        other => Arc::new(nbd::Nbd::connect(other, spec.readonly)?),
    })
}

/// An error and its sources as the one line an operator reads: `outer: inner: innermost`. (The
/// crates above use this one; it lives in the lowest crate that needs it.)
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let next = inner.to_string();
        // `#[error(transparent)]` and "{source}" messages repeat their source: say it once.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        src = inner.source();
    }
    s
}
