//! Reads the SMBIOS tables the VMM wrote (the `smbios` boot parameter) and logs what they say,
//! as a guest's own tools would find them: the `_SM3_` entry point in the BIOS area, then the
//! structures it points at.

use crate::log;

/// Where a scan for the entry point looks (as Linux's DMI scan does without firmware).
const AREA: usize = 0xf_0000;
const AREA_LEN: usize = 0x1_0000;

/// The bytes at guest-physical `addr` (identity mapped, readable from ring 3).
fn bytes(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: the VMM identity-maps all guest memory user-readable, and the callers keep
    // `addr..addr + len` below 1 MiB or inside the table the entry point bounds.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// The structure table: its address and length, if the entry point is there and sums to zero.
fn find() -> Option<(usize, usize)> {
    (AREA..AREA + AREA_LEN - 24).step_by(16).find_map(|at| {
        let ep = bytes(at, 24);
        let sum = ep.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        if &ep[..5] != b"_SM3_" || sum != 0 || ep[7] != 3 {
            return None;
        }
        let len = u32::from_le_bytes([ep[12], ep[13], ep[14], ep[15]]) as usize;
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&ep[16..24]);
        Some((u64::from_le_bytes(addr) as usize, len))
    })
}

/// String `n` (1-based) of a structure's string set.
fn string(set: &[u8], n: u8) -> &str {
    if n == 0 {
        return "";
    }
    set.split(|&b| b == 0).nth(usize::from(n) - 1).and_then(|s| core::str::from_utf8(s).ok()).unwrap_or("?")
}

/// Logs the system (type 1) and OEM strings (type 11) structures; false if there are none.
pub fn report() -> bool {
    let Some((addr, len)) = find() else {
        log!("smbios: no entry point");
        return false;
    };
    if addr + len > AREA + AREA_LEN || len < 4 {
        log!("smbios: the entry point's table {addr:#x}+{len} is outside the BIOS area");
        return false;
    }
    let t = bytes(addr, len);
    let mut at = 0;
    while at + 4 <= t.len() {
        let (kind, flen) = (t[at], usize::from(t[at + 1]));
        let f = &t[at..(at + flen).min(t.len())];
        let strings_at = at + flen;
        let end = (strings_at..t.len().saturating_sub(1)).find(|&i| t[i] == 0 && t[i + 1] == 0).unwrap_or(t.len());
        let set = &t[strings_at.min(end)..end];
        if kind == 1 && f.len() >= 0x1b {
            let mut u = [0u8; 16];
            u.copy_from_slice(&f[8..24]);
            u[..4].reverse();
            u[4..6].reverse();
            u[6..8].reverse();
            log!(
                "smbios: system manufacturer={} product={} version={} serial={} family={} uuid={:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                string(set, f[4]),
                string(set, f[5]),
                string(set, f[6]),
                string(set, f[7]),
                string(set, f[0x1a]),
                u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]
            );
        }
        if kind == 11 && f.len() >= 5 {
            for i in 1..=f[4] {
                log!("smbios: oem string {i}={}", string(set, i));
            }
        }
        if kind == 127 {
            return true;
        }
        at = end + 2;
    }
    true
}
