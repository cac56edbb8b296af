//! The PCI bus and a virtio device in real VMs: the test guest enumerates the bus, drives
//! virtio-rng by polling, and checks every completion (length, bytes written exactly where the
//! device said, fresh entropy). The device's state travels in snapshots and checkpoints: a
//! restored or promoted VM carries on using it, and the guest's checks must keep passing.

mod common;
use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side};
use common::*;
use std::time::Duration;

/// Exit status of the test guest when a workload's device is missing (boot-abi).
const EXIT_NO_DEVICE: i32 = 5;

fn rng_line(console: &str) -> Option<(u64, u64)> {
    let l = console.lines().rev().find_map(|l| l.split("rng: requests=").nth(1))?;
    let (req, bytes) = l.split_once(" bytes=")?;
    Some((req.trim().parse().ok()?, bytes.trim().parse().ok()?))
}

#[test]
fn the_rng_workload_uses_the_device_and_needs_it() {
    require_kvm();
    let dir = scratch("rng-run");
    let p = VmPaths::new(&dir, "vm");
    let out = p
        .spawn(&["--rng", "--vcpus", "2", "--memory", "64M", "--guest-args", "rng counter duration=1s"])
        .wait_with_output();
    let console = p.console();
    assert_eq!(out.status.code(), Some(0), "{console}");
    let (requests, bytes) = rng_line(&console).expect("the guest reports its rng use");
    assert!(requests > 100 && bytes > requests * 16, "{requests} requests, {bytes} bytes");

    let q = VmPaths::new(&dir, "none");
    let out = q.spawn(&["--vcpus", "1", "--memory", "64M", "--guest-args", "rng duration=1s"]).wait_with_output();
    assert_eq!(out.status.code(), Some(EXIT_NO_DEVICE), "without --rng the guest finds no device: {}", q.console());
}

#[test]
fn snapshot_and_restore_carry_the_device_and_the_guest_continues() {
    require_kvm();
    let dir = scratch("rng-snap");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--rng", "--vcpus", "2", "--memory", "64M", "--guest-args", "rng counter duration=3s"]);
    let mut q = Qmp::negotiated(&a.qmp);
    std::thread::sleep(Duration::from_millis(800));
    let snap = dir.join("rng.snap");
    q.stop_and_snapshot(&snap, false);
    sigkill(&mut child);
    let info = smpft().arg("snapshot-info").arg(&snap).output().unwrap();
    assert!(info.status.success(), "{}", stderr(&info));

    // Restored without saying --rng: the snapshot's device state brings the device.
    let b = VmPaths::new(&dir, "b");
    let out = b.spawn(&["--restore", snap.to_str().unwrap()]).wait_with_output();
    let console = b.console();
    assert_eq!(out.status.code(), Some(0), "the restored guest's checks pass: {console}");
    assert!(console.contains("RESULT: PASS"), "{console}");
    let (requests, _) = rng_line(&console).expect("rng report after the restore");
    assert!(requests > 100, "{requests}");
}

#[test]
fn a_promoted_standby_carries_on_with_the_device() {
    require_kvm();
    let setup = FtSetup::new("rng-failover");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let standby = spawn(&sp, &s_side, &["standby", "--listen", &addr, "--vcpus", "2", "--memory", "64M", "--rng"]);
    let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let guest = "rng counter churn churn-rate=500 duration=4s";
    let args = ["run", "--rng", "--vcpus", "2", "--memory", "64M", "--guest-args", guest, "--ft-peer", &addr];
    let mut primary = spawn(&pp, &p_side, &args);
    wait_state(&pp, "protected", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(700));
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let status = wait_exit(standby, Duration::from_secs(60));
    let console = sp.console();
    assert_eq!(status.code(), Some(0), "the promoted guest's checks pass: {console}\n{}", log(&sp));
    assert!(console.contains("RESULT: PASS"), "{console}");
    assert!(rng_line(&console).is_some(), "{console}");
}

#[test]
fn a_standby_without_the_device_is_refused() {
    require_kvm();
    let setup = FtSetup::new("rng-mismatch");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let _standby = spawn(&sp, &s_side, &["standby", "--listen", &addr, "--vcpus", "2", "--memory", "64M"]);
    let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let args = [
        "run",
        "--rng",
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest-args",
        "counter duration=600s",
        "--ft-peer",
        &addr,
    ];
    let _primary = spawn(&pp, &p_side, &args);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !log(&pp).contains("devices differ") {
        assert!(std::time::Instant::now() < deadline, "no refusal\n{}", log(&pp));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(common::ft::query(&pp)["state"], "unprotected");
}
