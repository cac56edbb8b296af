//! The disk mirror: what a protected VM's disks are (`spec`), the storage behind them
//! (`backend`: local files and block devices through io_uring), and the standby's per-epoch
//! staging of the primary's writes (`staging`), applied only once their checkpoint commits.
//!
//! Consistency is redo on the standby: a guest write completes on the primary's disk at once and
//! travels in the FT log with the epoch it belongs to; the standby stages epoch N's writes,
//! acknowledges checkpoint N only when they are all staged, writes them to its own storage after
//! commit, and on go-live applies exactly the committed epochs and drops the rest.

pub mod backend;
pub mod nbd;
pub mod spec;
pub mod staging;
