//! Port I/O, the serial line, the debug console and the exit/idle ports.

use crate::abi;
use core::arch::asm;
use core::fmt;

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: the VMM started us with IOPL=3; port I/O only exits to the VMM.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear) and has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn cpu_relax() {
    core::hint::spin_loop();
}

/// Gives the host CPU away for at most `us` microseconds (0: a plain yield).
pub fn idle(us: u32) {
    outl(abi::IDLE_PORT, us);
}

/// Resets the machine (the ACPI reset register): the guest boots again from the start.
pub fn reboot() -> ! {
    loop {
        outb(abi::RESET_PORT, abi::RESET_VALUE);
        idle(1000);
    }
}

pub fn exit(status: u32) -> ! {
    loop {
        outl(abi::EXIT_PORT, status);
    }
}

/// The guest log: lines on the debug console. Whole lines are assembled first so that lines from
/// different vCPUs do not interleave byte by byte.
pub struct Log {
    buf: [u8; 256],
    len: usize,
}

impl Log {
    pub const fn new() -> Self {
        Log { buf: [0; 256], len: 0 }
    }
    pub fn flush(&mut self) {
        crate::sync::LOG_LOCK.with(|| {
            for &b in &self.buf[..self.len] {
                outb(abi::DEBUGCON, b);
            }
        });
        self.len = 0;
    }
}

impl fmt::Write for Log {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut l = $crate::io::Log::new();
        let _ = writeln!(l, $($arg)*);
        l.flush();
    }};
}

/// Polled 16550 driver (interrupts stay off; the guest never enters ring 0).
pub mod serial {
    use super::{inb, outb};
    use crate::abi::COM1;

    const LSR: u16 = COM1 + 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const FIFO_DEPTH: usize = 16;

    pub fn init() {
        outb(COM1 + 1, 0x00); // no interrupts
        outb(COM1 + 3, 0x80); // DLAB
        outb(COM1, 0x01); // 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1
        outb(COM1 + 2, 0xc7); // FIFO on, cleared
        outb(COM1 + 4, 0x03); // DTR | RTS
    }

    /// One received byte, if any.
    pub fn try_read() -> Option<u8> {
        if inb(LSR) & LSR_DATA_READY != 0 {
            Some(inb(COM1))
        } else {
            None
        }
    }

    /// Writes `bytes`, a FIFO-full at a time once the transmitter is empty.
    pub fn write(bytes: &[u8]) {
        for chunk in bytes.chunks(FIFO_DEPTH) {
            flush();
            for &b in chunk {
                outb(COM1, b);
            }
        }
    }

    /// Waits until the UART has taken every byte written (its transmit FIFO is empty).
    pub fn flush() {
        while inb(LSR) & LSR_THR_EMPTY == 0 {
            super::cpu_relax();
        }
    }
}
