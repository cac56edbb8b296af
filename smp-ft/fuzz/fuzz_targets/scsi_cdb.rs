//! A guest driver may put any CDB in a virtio-scsi request, with any data-out and any room for
//! data-in: the command emulation must answer GOOD, CHECK CONDITION with sense data, or OVERRUN,
//! never panic, touch a disk past its end, write to a read-only disk, or write when it answers
//! otherwise than GOOD. The input: a LUN selector (a disk, a read-only disk, no disk), the
//! length of the CDB area (6 to 32 bytes, as a driver may set cdb_size), the room for data-in,
//! then the CDB area and the data-out bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::devices::observer::ObserverSlot;
use smp_ft::vmm::virtio::disk::DiskIo;
use smp_ft::vmm::virtio::scsi::emulate::{Buffers, MAX_BLOCKS};
use smp_ft::vmm::virtio::scsi::sense::{CHECK_CONDITION, GOOD};
use smp_ft::vmm::virtio::scsi::{Scsi, ScsiDisk};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 64 << 10;

/// A disk in memory that counts the changes made to it and refuses any past its end.
struct Disk {
    data: Mutex<Vec<u8>>,
    readonly: bool,
    changes: AtomicU64,
}

impl Disk {
    fn change(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert!(!self.readonly, "a read-only disk was changed");
        assert!(offset.checked_add(len).is_some_and(|e| e <= SIZE), "a change past the end of the disk");
        self.changes.fetch_add(1, Ordering::Relaxed);
        offset as usize..(offset + len) as usize
    }
}

impl block::Backend for Disk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::BackendError> {
        assert!(offset + buf.len() as u64 <= SIZE, "a read past the end of the disk");
        buf.copy_from_slice(&self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), block::BackendError> {
        let r = self.change(offset, data.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), block::BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), block::BackendError> {
        let r = self.change(offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), block::BackendError> {
        self.write_zeroes(offset, len)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else { return };
    let slot = Arc::new(ObserverSlot::default());
    let disks: Vec<Arc<Disk>> = [false, true]
        .map(|readonly| {
            Arc::new(Disk { data: Mutex::new(vec![0; SIZE as usize]), readonly, changes: AtomicU64::new(0) })
        })
        .to_vec();
    let units = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let io = Arc::new(DiskIo::new(d.clone(), i as u32, "disk", slot.clone()));
            ScsiDisk { io, lun: i as u16, serial: format!("disk{i}"), write_cache: head[0] & 4 == 0 }
        })
        .collect();
    let scsi = Scsi::new(units, slot).expect("two LUNs");
    let lun = u16::from(head[0] & 3);
    let cdb_len = (6 + usize::from(head[1]) % 27).min(rest.len());
    let in_len = usize::from(u16::from_le_bytes([head[2], head[3]])) * 64;
    let (cdb, mut out) = rest.split_at(cdb_len);
    let out_len = out.len();
    let reply = scsi.target().command(lun, cdb, Buffers { out: &mut out, out_len, in_len });
    let changes: u64 = disks.iter().map(|d| d.changes.load(Ordering::Relaxed)).sum();
    match (reply.status, reply.sense, reply.overrun) {
        (_, _, true) => assert_eq!(changes, 0, "an OVERRUN changed the disk"),
        (GOOD, None, false) => {}
        (CHECK_CONDITION, Some(_), false) => assert_eq!(changes, 0, "a CHECK CONDITION changed the disk"),
        other => panic!("an answer that is none of GOOD, CHECK CONDITION with sense, OVERRUN: {other:?}"),
    }
    assert!(reply.data.len() <= (MAX_BLOCKS as usize) * 512, "more data than one command moves");
});
