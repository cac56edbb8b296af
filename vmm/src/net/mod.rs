//! The guest network's host side: where a virtio-net device's frames go (`--net`), the tap
//! that carries them, the thread that receives them, and the announcements a copy that goes
//! live sends so the network finds it on its new host.
//!
//! Transmitted frames leave through the output gate (held while the VM is protected, one gate
//! item per frame); received frames enter guest memory and so the next checkpoint. See
//! `virtio::net` for the device itself.

pub mod announce;
pub mod backend;
pub mod spec;
pub mod tap;

pub use spec::{Mac, NetSpec, TapSource};
