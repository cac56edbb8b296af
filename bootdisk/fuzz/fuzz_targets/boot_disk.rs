//! Any disk image gives what it boots or a one-line error, never a panic, a hang or unbounded
//! memory: the whole reader (partition tables, ext2/3/4 through ext4-view, the boot
//! configuration) over an in-memory disk, as the sandboxed child runs it. Seed it with a small
//! image made by `mkfs.ext4 -d` (see tests/common/disk_image.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = bootdisk::Limits { kernel: 1 << 20, initrd: 1 << 20, total: 64 << 20, ..Default::default() };
    let _ = bootdisk::read_boot(std::rc::Rc::new(data.to_vec()), &limits);
});
