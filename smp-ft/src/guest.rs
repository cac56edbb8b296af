//! The built-in test guest (`guest/` in the source tree), compiled by the build script.

/// The ELF image of the built-in test guest.
pub static BUILTIN: &[u8] = include_bytes!(env!("SMPFT_GUEST_ELF"));

/// Name used in messages for the built-in guest.
pub const BUILTIN_NAME: &str = "built-in test guest";
