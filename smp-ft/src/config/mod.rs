//! One configuration path: `smpft run`, `smpft standby` and the QEMU persona (libvirt) all
//! describe the VM to [`VmBuilder`] and fault tolerance to [`FtBuilder`], which hold the one set
//! of defaults and every check. A refused setting is named in the caller's words ([`Names`]:
//! the command-line flag, the QEMU option, the libvirt metadata element). Test hooks, the one
//! test-only option (`SMPFT_TEST_HOOKS`), are read once at start ([`hooks`]).

mod disk_boot;
mod error;
pub mod ft;
pub mod hooks;
pub mod metadata;
mod names;
pub mod vm;

pub use error::ConfigError;
pub use ft::{FtBuilder, FtOptions};
pub use hooks::TestHooks;
pub use names::{Names, Setting};
pub use vm::VmBuilder;
