//! smpft: a fault-tolerant VMM for KVM. This crate holds, on top of the VMM ([`vmm`], a crate of
//! its own), snapshots and the fault-tolerance engine; the `smpft` binary is its command line.

pub mod balloon;
pub mod config;
pub mod error;
pub mod ft;
pub mod guest;
pub mod lan;
pub mod observe;
pub mod privileges;
pub mod qmp;
pub mod runner;
pub mod snapshot;
pub mod units;
/// The VMM (its own crate, `vmm/`), re-exported so that `smp_ft::vmm` names it.
pub use vmm;
