//! The boot ABI between smpft and this guest. Mirrored by `smp-ft/src/vmm/layout.rs`; keep in step.
//!
//! Every vCPU enters `_start` in 64-bit ring 3 with IOPL=3 and interrupts disabled, on an identity
//! mapping of all guest memory, with:
//! - `rdi` = the vCPU index (0-based),
//! - `rsi` = the guest-physical (= virtual) address of [`BootInfo`],
//! - `rsp` = the top of a stack private to that vCPU.

/// "SMPFTBI1" as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SMPFTBI1");
pub const BOOT_VERSION: u32 = 1;

/// COM1: a 16550 UART.
pub const COM1: u16 = 0x3f8;
/// Debug console: each byte written is a byte of the guest's log (shown by the VMM).
pub const DEBUGCON: u16 = 0xe9;
/// 32-bit write: the guest is done; the value is its exit status.
pub const EXIT_PORT: u16 = 0xf4;
/// 32-bit write: nothing to do for up to this many microseconds (0 = just yield the host CPU).
/// The VMM returns early when serial input arrives.
pub const IDLE_PORT: u16 = 0xf5;

/// Exit statuses the guest reports.
pub const EXIT_OK: u32 = 0;
pub const EXIT_BAD_PARAMS: u32 = 2;
pub const EXIT_INVARIANT: u32 = 3;
pub const EXIT_BAD_BOOT: u32 = 4;

#[repr(C)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub vcpus: u32,
    pub mem_size: u64,
    /// First byte of memory the guest may use freely (page aligned, above the image and stacks).
    pub free_start: u64,
    /// One past the last free byte.
    pub free_end: u64,
    /// TSC frequency in kHz, for turning `rdtsc` into time.
    pub tsc_khz: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
}
