//! smpft: a fault-tolerant VMM for KVM. This crate holds the VMM ([`vmm`]) and, on top of it,
//! the fault-tolerance engine; the `smpft` binary is its command line.

pub mod error;
pub mod ft;
pub mod guest;
pub mod runner;
pub mod snapshot;
pub mod units;
pub mod vmm;
