//! What the Linux boot tests need: Debian's cloud kernel (installed by `scripts/setup`), its
//! vmlinux (extracted once by `scripts/extract-vmlinux`), and an initrd made here from
//! busybox-static.

use std::path::{Path, PathBuf};

/// The newest installed `/boot/vmlinuz-*-cloud-amd64`. Missing, the test fails and says how to
/// install it (a Linux boot test must not pass without a kernel).
pub fn bzimage() -> PathBuf {
    let mut found: Vec<PathBuf> =
        std::fs::read_dir("/boot").map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    found.retain(|p| {
        let n = p.file_name().unwrap().to_string_lossy();
        n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
    });
    found.sort();
    found.pop().expect("no /boot/vmlinuz-*-cloud-amd64: run scripts/setup (it installs linux-image-cloud-amd64)")
}

/// The ELF vmlinux inside `bzimage()`, extracted once per kernel into the test build's
/// scratch directory.
pub fn vmlinux() -> PathBuf {
    let bz = bzimage();
    let name = bz.file_name().unwrap().to_string_lossy().replace("vmlinuz", "vmlinux");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if !out.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/extract-vmlinux");
        let st = std::process::Command::new(script).arg(&bz).arg(&out).status().unwrap();
        assert!(st.success(), "extract-vmlinux {} failed", bz.display());
    }
    out
}

/// Whether this host's KVM runs guest ring 0 natively (VMX/SVM), so a kernel boots all the way;
/// under PVM (`kvm_pvm`) it is emulated and a kernel gets only through early setup.
pub fn ring0_is_native() -> bool {
    !Path::new("/sys/module/kvm_pvm").exists()
}

/// The marker the initrd's `/init` prints before it powers the VM off.
pub const INIT_MARKER: &str = "SMPFT-INIT-OK";

/// A newc cpio initrd in `dir`: busybox-static and an `/init` that mounts sysfs, prints
/// [`INIT_MARKER`] with the virtio devices it sees, and powers off.
pub fn initrd(dir: &Path) -> PathBuf {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox is missing: run scripts/setup (it installs busybox-static)");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /sys\n/bin/busybox mount -t sysfs sysfs /sys\n\
         /bin/busybox echo {INIT_MARKER} virtio=$(/bin/busybox ls /sys/bus/virtio/devices | /bin/busybox wc -l)\n\
         /bin/busybox poweroff -f\n"
    );
    let mut cpio = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, data: &[u8]| {
        let name0 = format!("{name}\0");
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name0.len(),
            0
        );
        ino += 1;
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(name0.as_bytes());
        cpio.resize(cpio.len().next_multiple_of(4), 0);
        cpio.extend_from_slice(data);
        cpio.resize(cpio.len().next_multiple_of(4), 0);
    };
    entry("bin", 0o040755, b"");
    entry("bin/busybox", 0o100755, &busybox);
    entry("init", 0o100755, init.as_bytes());
    entry("TRAILER!!!", 0, b"");
    let path = dir.join("initrd.cpio");
    std::fs::write(&path, cpio).unwrap();
    path
}
