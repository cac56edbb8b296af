//! virtio-scsi driven through its queues as Linux's virtio_scsi driver drives it: commands on
//! the request queue with their headers, data-out and data-in, task management on the control
//! queue, the configuration, drivers that break the rules, the disk observer holding the disks,
//! and the device's state across a save and restore.

use super::{Driver, MemDisk, Watcher, AVAIL, DESC, NEXT, SIZE, USED, WRITE};
use crate::component::Component;
use crate::devices::observer::ObserverSlot;
use crate::virtio::disk::DiskIo;
use crate::virtio::scsi::{Scsi, ScsiDisk, CONTROL_QUEUE, REQUEST_QUEUE};
use crate::virtio::{DEVICE_CFG, NEEDS_RESET, NOTIFY};
use block::Op;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const REQ: u64 = 0x20000;
const OUT: u64 = 0x21000;
const RESP: u64 = 0x30000;
const IN: u64 = 0x50000;
/// The control queue's rings.
const CDESC: u64 = 0x6000;
const CAVAIL: u64 = 0x7000;
const CUSED: u64 = 0x8000;
/// Sense and CDB areas at their defaults: the response header is 108 bytes, the request's 51.
const RESP_LEN: usize = 12 + 96;
const REQ_LEN: usize = 19 + 32;

fn device(slot: &Arc<ObserverSlot>) -> (Driver<Scsi>, Arc<MemDisk>) {
    let disk = Arc::new(MemDisk {
        data: std::sync::Mutex::new(vec![0xee; 64 << 10]),
        readonly: false,
        unmapped: Default::default(),
    });
    let io = Arc::new(DiskIo::new(disk.clone(), 1, "disk1", slot.clone()));
    let scsi =
        Scsi::new(vec![ScsiDisk { io, lun: 0, serial: "disk1".into(), write_cache: true }], slot.clone()).unwrap();
    let mut d = Driver::with("virtio-scsi", scsi);
    init(&mut d);
    (d, disk)
}

/// Feature negotiation, then the control queue and the request queue (the event queue is
/// left unused, as a driver may).
fn init(d: &mut Driver<Scsi>) {
    d.w(0x14, 0, 1);
    d.w(0x14, 1 | 2, 1);
    d.w(0x08, 1, 4);
    d.w(0x0c, 1, 4);
    d.w(0x14, 1 | 2 | 8, 1);
    assert_eq!(d.status() & 8, 8, "FEATURES_OK accepted");
    assert_eq!(d.r(0x12, 2), 3, "control, event and one request queue");
    d.setup_queue(CONTROL_QUEUE, SIZE, (CDESC, CAVAIL, CUSED));
    d.setup_queue(REQUEST_QUEUE, SIZE, (DESC, AVAIL, USED));
    d.w(0x14, 1 | 2 | 4 | 8, 1);
    d.avail_idx = 0;
}

/// Offers `head` on the request queue.
fn offer(d: &mut Driver<Scsi>, head: u16) {
    let slot = AVAIL + 4 + 2 * u64::from(d.avail_idx % SIZE);
    d.mem.write(slot, &head.to_le_bytes()).unwrap();
    d.avail_idx = d.avail_idx.wrapping_add(1);
    d.mem.write(AVAIL + 2, &d.avail_idx.to_le_bytes()).unwrap();
    d.w(NOTIFY + 4 * REQUEST_QUEUE as u64, REQUEST_QUEUE as u64, 2);
}

/// A request header for LUN `lun` of target `target` with `cdb`.
fn header(target: u8, lun: u16, cdb: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; REQ_LEN];
    h[..4].copy_from_slice(&[1, target, 0x40 | (lun >> 8) as u8, lun as u8]);
    h[8..16].copy_from_slice(&77u64.to_le_bytes());
    h[19..19 + cdb.len()].copy_from_slice(cdb);
    h
}

/// What the device answered.
#[derive(Debug)]
struct Answer {
    used_len: u32,
    sense_len: u32,
    residual: u32,
    status: u8,
    response: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
}

/// One command: the request header, data-out if any, the response, data-in (`in_len` bytes).
fn command(d: &mut Driver<Scsi>, req: &[u8], out: &[u8], in_len: u32) -> Answer {
    d.mem.write(REQ, req).unwrap();
    d.mem.fill(RESP, RESP_LEN as u64, 0xaa).unwrap();
    d.mem.fill(IN, u64::from(in_len.max(1)), 0xaa).unwrap();
    let head = (d.avail_idx * 4) % SIZE;
    let mut chain = vec![(REQ, req.len() as u32, 0)];
    if !out.is_empty() {
        d.mem.write(OUT, out).unwrap();
        chain.push((OUT, out.len() as u32, 0));
    }
    chain.push((RESP, RESP_LEN as u32, WRITE));
    if in_len > 0 {
        chain.push((IN, in_len, WRITE));
    }
    for (k, &(addr, len, flags)) in chain.iter().enumerate() {
        let i = (head + k as u16) % SIZE;
        let more = k + 1 < chain.len();
        d.desc(i, addr, len, flags | if more { NEXT } else { 0 }, (i + 1) % SIZE);
    }
    let before = d.used().0;
    offer(d, head);
    let (idx, entries) = d.used();
    assert_eq!(idx, before.wrapping_add(1), "the command completed");
    let mut resp = vec![0u8; RESP_LEN];
    d.mem.read(RESP, &mut resp).unwrap();
    let mut data = vec![0u8; in_len as usize];
    d.mem.read(IN, &mut data).unwrap();
    let le32 = |at: usize| u32::from_le_bytes(resp[at..at + 4].try_into().unwrap());
    Answer {
        used_len: entries.last().map_or(0, |e| e.1),
        sense_len: le32(0),
        residual: le32(4),
        status: resp[10],
        response: resp[11],
        sense: resp[12..].to_vec(),
        data,
    }
}

#[test]
fn configuration_says_one_target_and_its_luns() {
    let (d, _) = device(&Arc::new(ObserverSlot::default()));
    let cfg = |at: u64, len: usize| d.r(DEVICE_CFG + at, len);
    assert_eq!(cfg(0, 4), 1, "num_queues");
    assert_eq!((cfg(20, 4), cfg(24, 4)), (96, 32), "sense_size, cdb_size");
    assert_eq!((cfg(28, 2), cfg(30, 2), cfg(32, 4)), (0, 0, 255), "max_channel, max_target, max_lun");
    assert!(cfg(8, 4) >= 8, "max_sectors");
}

#[test]
fn commands_move_data_and_report_status_sense_and_residual() {
    let slot = Arc::new(ObserverSlot::default());
    let (mut d, disk) = device(&slot);
    let a = command(&mut d, &header(0, 0, &[0x12, 0, 0, 0, 96, 0]), &[], 96);
    assert_eq!((a.response, a.status, a.sense_len), (0, 0, 0), "INQUIRY: {a:?}");
    assert_eq!(&a.data[8..13], b"SMPFT");
    assert_eq!(a.residual, 96 - 36, "what was not transferred");
    assert_eq!(a.used_len as usize, RESP_LEN + 36, "the response and the data");

    let data: Vec<u8> = (0..1024u32).map(|i| (i * 3) as u8).collect();
    let w = command(&mut d, &header(0, 0, &[0x2a, 0, 0, 0, 0, 2, 0, 0, 2, 0]), &data, 0);
    assert_eq!((w.response, w.status, w.residual, w.used_len as usize), (0, 0, 0, RESP_LEN), "WRITE(10)");
    assert_eq!(&disk.data.lock().unwrap()[1024..2048], &data[..]);
    let r = command(&mut d, &header(0, 0, &[0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0]), &[], 1024);
    assert_eq!((r.response, r.status, r.residual), (0, 0, 0), "READ(10)");
    assert_eq!(r.data, data);

    let bad = command(&mut d, &header(0, 0, &[0xd5]), &[], 0);
    assert_eq!((bad.response, bad.status, bad.sense_len), (0, 2, 18), "an unknown command: CHECK CONDITION");
    assert_eq!((bad.sense[0], bad.sense[2], bad.sense[12]), (0x70, 5, 0x20), "INVALID COMMAND OPERATION CODE");
    let past = command(&mut d, &header(0, 0, &[0x28, 0, 0, 0, 1, 0, 0, 0, 1, 0]), &[], 512);
    assert_eq!((past.status, past.sense[2], past.sense[12]), (2, 5, 0x21), "LBA OUT OF RANGE");
    let over = command(&mut d, &header(0, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0]), &[], 512);
    assert_eq!(over.response, 1, "OVERRUN: 4 blocks do not fit 512 bytes");
    assert_eq!(over.used_len as usize, RESP_LEN, "no data");
    let other = command(&mut d, &header(1, 0, &[0x00]), &[], 0);
    assert_eq!(other.response, 3, "BAD_TARGET: the device has target 0 only");
    let absent = command(&mut d, &header(0, 5, &[0x00]), &[], 0);
    assert_eq!((absent.status, absent.sense[12]), (2, 0x25), "LOGICAL UNIT NOT SUPPORTED");
    assert_eq!(d.status() & NEEDS_RESET, 0, "bad commands are not a broken driver");
    let ok = command(&mut d, &header(0, 0, &[0x00]), &[], 0);
    assert_eq!((ok.response, ok.status), (0, 0), "TEST UNIT READY");
}

#[test]
fn the_driver_may_shrink_the_sense_area() {
    let (mut d, _) = device(&Arc::new(ObserverSlot::default()));
    d.w(DEVICE_CFG + 20, 8, 4);
    assert_eq!(d.r(DEVICE_CFG + 20, 4), 8);
    d.w(DEVICE_CFG + 24, 100_000, 4);
    assert_eq!(d.r(DEVICE_CFG + 24, 4), 32, "an absurd CDB size is ignored");
    let bad = command(&mut d, &header(0, 0, &[0xd5]), &[], 0);
    assert_eq!((bad.status, bad.sense_len, bad.used_len), (2, 8, 20), "the sense cut to 8 bytes");
    // The device's state carries the sizes, and a reset restores the defaults.
    let saved = d.dev.save().unwrap();
    let (copy, _) = device(&Arc::new(ObserverSlot::default()));
    copy.dev.restore(copy.dev.version(), &saved).unwrap();
    assert_eq!(copy.r(DEVICE_CFG + 20, 4), 8, "restored");
    d.w(0x14, 0, 1);
    assert_eq!(d.r(DEVICE_CFG + 20, 4), 96, "reset");
}

#[test]
fn requests_without_room_for_their_headers_break_the_device() {
    for (req_len, resp_len) in [(REQ_LEN as u32 - 1, RESP_LEN as u32), (REQ_LEN as u32, RESP_LEN as u32 - 1)] {
        let (mut d, _) = device(&Arc::new(ObserverSlot::default()));
        d.mem.write(REQ, &header(0, 0, &[0x00])).unwrap();
        d.desc(0, REQ, req_len, NEXT, 1);
        d.desc(1, RESP, resp_len, WRITE, 0);
        offer(&mut d, 0);
        assert_eq!(d.status() & NEEDS_RESET, NEEDS_RESET, "request {req_len}, response {resp_len}");
    }
}

#[test]
fn writes_are_reported_and_wait_while_the_observer_holds_the_disks() {
    let slot = Arc::new(ObserverSlot::default());
    let watcher = slot.get_or_install(|| Arc::new(Watcher::default())).unwrap();
    let (mut d, disk) = device(&slot);
    command(&mut d, &header(0, 0, &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]), &[9; 512], 0);
    command(&mut d, &header(0, 0, &[0x35]), &[], 0);
    assert_eq!(watcher.take(), vec![(1, Op::Write { offset: 512, data: vec![9; 512] }), (1, Op::Flush)]);
    watcher.hold.store(true, Ordering::SeqCst);
    let done = d.used().0;
    d.mem.write(REQ, &header(0, 0, &[0x2a, 0, 0, 0, 0, 3, 0, 0, 1, 0])).unwrap();
    d.mem.write(OUT, &[4; 512]).unwrap();
    d.desc(0, REQ, REQ_LEN as u32, NEXT, 1);
    d.desc(1, OUT, 512, NEXT, 2);
    d.desc(2, RESP, RESP_LEN as u32, WRITE, 0);
    offer(&mut d, 0);
    assert_eq!(d.used().0, done, "the command waits while the observer holds the disks");
    assert_eq!(disk.data.lock().unwrap()[3 * 512], 0xee);
    assert!(d.dev.device().deferral().take());
    watcher.hold.store(false, Ordering::SeqCst);
    d.dev.process_queue(REQUEST_QUEUE);
    assert_eq!(d.used().0, done + 1, "served once the observer lets go");
    assert_eq!(disk.data.lock().unwrap()[3 * 512], 4);
    assert_eq!(watcher.take(), vec![(1, Op::Write { offset: 3 * 512, data: vec![4; 512] })]);
}

/// One control request (`body` after the type), `reply` writable bytes: what the device wrote.
fn control(d: &mut Driver<Scsi>, body: &[u8], reply: u32) -> (Vec<u8>, u16) {
    d.mem.write(REQ, body).unwrap();
    d.mem.fill(RESP, u64::from(reply), 0xaa).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16| {
        let at = CDESC + 16 * i;
        d.mem.write(at, &addr.to_le_bytes()).unwrap();
        d.mem.write(at + 8, &len.to_le_bytes()).unwrap();
        d.mem.write(at + 12, &flags.to_le_bytes()).unwrap();
        d.mem.write(at + 14, &1u16.to_le_bytes()).unwrap();
    };
    desc(0, REQ, body.len() as u32, NEXT);
    desc(1, RESP, reply, WRITE);
    let mut idx = [0u8; 2];
    d.mem.read(CAVAIL + 2, &mut idx).unwrap();
    let n = u16::from_le_bytes(idx);
    d.mem.write(CAVAIL + 4 + 2 * u64::from(n % SIZE), &0u16.to_le_bytes()).unwrap();
    d.mem.write(CAVAIL + 2, &(n + 1).to_le_bytes()).unwrap();
    d.w(NOTIFY + 4 * CONTROL_QUEUE as u64, CONTROL_QUEUE as u64, 2);
    let mut out = vec![0u8; reply as usize];
    d.mem.read(RESP, &mut out).unwrap();
    d.mem.read(CUSED + 2, &mut idx).unwrap();
    (out, u16::from_le_bytes(idx))
}

#[test]
fn task_management_completes_at_once_and_no_events_are_offered() {
    let (mut d, _) = device(&Arc::new(ObserverSlot::default()));
    let tmf = |subtype: u32, target: u8| {
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&subtype.to_le_bytes());
        b[8..12].copy_from_slice(&[1, target, 0x40, 0]);
        b
    };
    assert_eq!(control(&mut d, &tmf(0, 0), 1), (vec![0], 1), "ABORT TASK: FUNCTION COMPLETE");
    assert_eq!(control(&mut d, &tmf(5, 0), 1), (vec![0], 2), "LOGICAL UNIT RESET");
    assert_eq!(control(&mut d, &tmf(5, 3), 1), (vec![3], 3), "another target: BAD TARGET");
    assert_eq!(control(&mut d, &tmf(99, 0), 1), (vec![11], 4), "an unknown function: REJECTED");
    let mut an = vec![0u8; 16];
    an[..4].copy_from_slice(&1u32.to_le_bytes());
    an[4..8].copy_from_slice(&[1, 0, 0x40, 0]);
    an[12..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(control(&mut d, &an, 5), (vec![0; 5], 5), "AN QUERY: no events, OK");
    assert_eq!(d.status() & NEEDS_RESET, 0);
    let mut bogus = tmf(0, 0);
    bogus[0] = 9;
    control(&mut d, &bogus, 1);
    assert_eq!(d.status() & NEEDS_RESET, NEEDS_RESET, "a control request type that does not exist");
}
