//! The disk mirror: the fault-tolerance side of a protected VM's disks. The primary's per-epoch
//! write log with the initial copy's block bitmap (`log`), block digests for a standby that
//! already holds a copy (`digest`), and point-in-time views of the standby's disks that backup
//! tools read while the disks keep following the primary (`pit`). The storage itself is the
//! `block` crate's.
//!
//! Consistency is redo on the standby: a guest write completes on the primary's disk at once and
//! travels in the FT log with the epoch it belongs to; the standby acknowledges checkpoint N only
//! when it holds N's writes as well as N's memory, writes them to its own storage after that,
//! and so goes live with a disk that matches the memory it resumes from: not one write more, not
//! one less.

pub mod digest;
pub mod log;
pub mod pit;
