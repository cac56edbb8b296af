//! A guest driver may put anything on virtio-balloon's queues: page frame numbers of any value
//! on the inflate and deflate queues, statistics buffers of any length and tags, free page
//! reports of any address and size. The device answers with used entries or
//! DEVICE_NEEDS_RESET, never a panic, a hang or a write outside guest memory; beyond that:
//! - what the guest says it holds (`actual`) never makes the guest's memory negative, and the
//!   host's target is never changed by the guest;
//! - only statistics with known tags are reported;
//! - the device's state saves and restores to the same state.
//!
//! The input: the queue size selector, a byte of host events (which rounds the host changes
//! the target or polls the statistics), then guest memory (see `guest.rs`).
#![no_main]

#[path = "guest.rs"]
#[allow(dead_code)]
mod guest;

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::component::Component;
use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::virtio::balloon::{Balloon, BalloonSpec, STAT_NAMES};
use smp_ft::vmm::virtio::VirtioPci;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// inflateq, deflateq, statsq, reporting_vq.
const QUEUES: u64 = 4;
/// VIRTIO_BALLOON_F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING.
const FEATURES: u32 = (1 << 1) | (1 << 2) | (1 << 5);

fn spec() -> BalloonSpec {
    BalloonSpec { deflate_on_oom: true, free_page_reporting: true }
}

fuzz_target!(|data: &[u8]| {
    let [size_sel, events, rest @ ..] = data else { return };
    // The device's memory: the driver's rings and buffers live in the guest's, which `start`
    // makes; the balloon discards pages of the same memory.
    let mem = Arc::new(GuestMemory::new(guest::MEM).expect("guest memory"));
    let (ram, dev) = guest::start_with_memory(
        "virtio-balloon",
        mem.clone(),
        Balloon::new(spec(), mem),
        QUEUES,
        *size_sel,
        FEATURES,
        rest,
    );
    let balloon = dev.device();
    let size = ram.size();
    balloon.set_poll_interval(1);
    for round in 0..4u8 {
        for q in [0u64, 1, 2, 3] {
            guest::notify(&dev, q);
        }
        if events >> round & 1 != 0 {
            balloon.set_target(size / 2);
        }
        if events >> (round + 4) & 1 != 0 {
            dev.tick(Instant::now() + Duration::from_secs(10));
        }
        assert!(balloon.actual() <= size, "actual {} > memory {size}", balloon.actual());
        let want = if events & ((1 << (round + 1)) - 1) != 0 { size / 2 } else { size };
        assert_eq!(balloon.target(), want, "only the host sets the target");
        if let Some(s) = balloon.stats() {
            assert!(s.values.iter().all(|(name, _)| STAT_NAMES.contains(name)));
        }
    }
    let saved = dev.save().expect("state saves");
    let copy = VirtioPci::new(
        "virtio-balloon",
        Balloon::new(spec(), ram.clone()),
        0xe000_0000,
        ram.device_view().expect("view"),
        None,
    );
    copy.restore(1, &saved).expect("state restores");
    assert_eq!(copy.save().expect("state saves again"), saved, "the same state");
});
