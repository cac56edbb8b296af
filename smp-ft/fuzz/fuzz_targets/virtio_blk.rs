//! A guest driver may put anything in virtio-blk's queue: requests of any type, headers and
//! data split over any descriptors, sectors and lengths of any size. The device answers with a
//! status or marks itself DEVICE_NEEDS_RESET, never panics, hangs or touches guest memory
//! outside the buffers. Beyond that:
//! - the disk is never read or changed past its end, and a read-only disk is never changed;
//! - every change the disk sees (write, write-zeroes, discard, flush) is reported to the disks'
//!   observer (what the FT engine mirrors to the standby), once, in the order the disk saw it,
//!   also when the observer held the queue for a while and the VM owner served it after;
//! - the device's state saves and restores to the same state.
//!
//! The input: a flags byte (bit 0: a read-only disk; bits 1-3: which rounds the observer holds
//! the disks; bit 7: the rest are bit flips on memory holding valid requests of most types),
//! the queue size selector, then guest memory (see `guest.rs`).
#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;
#[path = "guest.rs"]
mod guest;
#[path = "memdisk.rs"]
mod memdisk;

use block::Op;
use libfuzzer_sys::fuzz_target;
use memdisk::MemDisk;
use smp_ft::vmm::component::Component;
use smp_ft::vmm::devices::observer::ObserverSlot;
use smp_ft::vmm::devices::DiskObserver;
use smp_ft::vmm::virtio::blk::Blk;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The FT engine's place: it records what the disk reports, and holds the disks when told.
#[derive(Default)]
struct Watcher {
    seen: Mutex<Vec<Op>>,
    hold: AtomicBool,
}

impl DiskObserver for Watcher {
    fn completed(&self, disk: u32, op: Op) {
        assert_eq!(disk, 0, "the VM's one disk");
        self.seen.lock().unwrap().push(op);
    }
    fn hold(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }
}

/// Memory with a write, a read, a flush, a write-zeroes and a get-id request, each a header,
/// its data or segment, and a status byte (14 descriptors).
fn valid() -> &'static [u8] {
    static V: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let mut t = guest::Template::new();
        let (header, data, status) = (0x1400, 0x1600, 0x1f00);
        let mut heads = Vec::new();
        let mut i = 0u16;
        for (n, (kind, sector, body)) in
            [(1u32, 1u64, 512u32), (0, 1, 512), (4, 0, 0), (13, 3, 16), (8, 0, 20)].into_iter().enumerate()
        {
            let n = n as u64;
            t.put(header + 16 * n, &[&kind.to_le_bytes()[..], &[0; 4], &sector.to_le_bytes()].concat());
            if body == 16 {
                t.put(
                    data + 0x200 * n,
                    &[&(sector + 4).to_le_bytes()[..], &1u32.to_le_bytes(), &[1, 0, 0, 0]].concat(),
                );
            }
            heads.push(i);
            t.desc(0, i, (header + 16 * n, 16), guest::NEXT, i + 1);
            i += 1;
            if body != 0 {
                let write = if matches!(kind, 0 | 8) { guest::WRITE } else { 0 };
                t.desc(0, i, (data + 0x200 * n, body), guest::NEXT | write, i + 1);
                i += 1;
            }
            t.desc(0, i, (status + n, 1), guest::WRITE, 0);
            i += 1;
        }
        t.avail(0, &heads);
        t.put(data, &[0xa5; 512]);
        t.0
    })
}

fn blk(disk: &Arc<MemDisk>, slot: &Arc<ObserverSlot>) -> Blk {
    Blk::new(disk.clone(), 0, slot.clone(), "disk0")
}

fuzz_target!(|data: &[u8]| {
    let [flags, size_sel, rest @ ..] = data else { return };
    let disk = Arc::new(MemDisk::new(64 << 10, flags & 1 != 0));
    let slot = Arc::new(ObserverSlot::default());
    let watcher = slot.get_or_install(|| Arc::new(Watcher::default())).expect("one observer");
    // Every feature virtio-blk offers but read-only (the device says so itself).
    let features = (1 << 2) | (1 << 6) | (1 << 9) | (1 << 13) | (1 << 14);
    let memory = match flags & 0x80 {
        0 => rest.to_vec(),
        _ => common::flipped(valid(), 0, rest),
    };
    let (mem, dev) = guest::start("virtio-blk", blk(&disk, &slot), 1, *size_sel, features, &memory);
    for round in 0..3 {
        watcher.hold.store(flags >> (1 + round) & 1 != 0, Ordering::SeqCst);
        guest::notify(&dev, 0);
        watcher.hold.store(false, Ordering::SeqCst);
        if dev.device().take_deferred() {
            dev.process_queue(0);
        }
    }
    assert_eq!(*watcher.seen.lock().unwrap(), *disk.changes.lock().unwrap(), "the observer saw other changes");
    let saved = dev.save().expect("state saves");
    let copy = smp_ft::vmm::virtio::VirtioPci::new(
        "virtio-blk",
        blk(&disk, &slot),
        0xe000_0000,
        mem.device_view().expect("view"),
        None,
    );
    copy.restore(dev.version(), &saved).expect("state restores");
    assert_eq!(copy.save().expect("state saves"), saved, "a restored state saves differently");
});
