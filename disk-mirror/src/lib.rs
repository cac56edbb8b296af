//! The disk mirror: what a protected VM's disks are (`spec`), the storage behind them
//! (`backend`: local files and block devices through io_uring; `nbd`: NBD exports), and the
//! primary's per-epoch write log with the initial copy's block bitmap (`log`).
//!
//! Consistency is redo on the standby: a guest write completes on the primary's disk at once and
//! travels in the FT log with the epoch it belongs to; the standby acknowledges checkpoint N only
//! when it holds N's writes as well as N's memory, writes them to its own storage after that,
//! and so goes live with a disk that matches the memory it resumes from: not one write more, not
//! one less.

pub mod backend;
pub mod digest;
pub mod log;
pub mod nbd;
pub mod pit;
pub mod spec;

use std::sync::Arc;

/// Opens the storage `spec` names.
pub fn open(spec: &spec::DiskSpec) -> Result<Arc<dyn backend::Backend>, backend::BackendError> {
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
