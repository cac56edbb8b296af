//! virtio-balloon in real VMs: QMP `balloon` sets a target, the test guest inflates to it (its
//! pages leave the host: the process's shared memory shrinks) and deflates again (pages come
//! back as zero, which the guest checks); `query-balloon` and BALLOON_CHANGE follow the guest;
//! statistics come at the polling interval set through QOM; the state survives a snapshot and
//! restore and a failover.

mod common;
use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side};
use common::*;
use serde_json::json;
use std::time::Duration;

const MEM: u64 = 128 << 20;
const PATH: &str = "/machine/peripheral/balloon0";
/// Exit status of the test guest when a workload's device is missing (boot-abi).
const EXIT_NO_DEVICE: i32 = 5;

/// The process's shared memory (guest memory is a memfd), in bytes.
fn rss_shmem(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("RssShmem:")).expect("RssShmem in /proc/PID/status");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() << 10
}

fn actual(q: &mut Qmp) -> u64 {
    q.ok("query-balloon", None)["actual"].as_u64().unwrap()
}

fn lines(p: &VmPaths, line: &str) -> usize {
    p.console().lines().filter(|l| l.contains(line)).count()
}

#[test]
fn the_guest_follows_the_target_and_its_pages_leave_the_host() {
    require_kvm();
    let dir = scratch("balloon");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--balloon", "--vcpus", "1", "--memory", "128M", "--guest-args", "balloon counter"]);
    let mut q = Qmp::negotiated(&a.qmp);
    wait_until(later(|| format!("the guest starts its balloon: {}", a.console())), Duration::from_secs(30), || {
        lines(&a, "balloon: actual=0 target=0") == 1
    });
    assert_eq!(actual(&mut q), MEM);
    let full = rss_shmem(child.pid());
    q.ok("balloon", Some(json!({"value": MEM / 2})));
    wait_until(later(|| format!("the guest inflates: {}", a.console())), Duration::from_secs(30), || {
        lines(&a, "balloon: actual=16384 target=16384") == 1
    });
    wait_until("query-balloon follows the guest", Duration::from_secs(10), || actual(&mut q) == MEM / 2);
    assert!(q.events.iter().any(|e| e["event"] == "BALLOON_CHANGE"), "{:?}", q.events);
    let last = q.events.iter().rev().find(|e| e["event"] == "BALLOON_CHANGE").unwrap();
    assert_eq!(last["data"]["actual"], MEM / 2, "{last}");
    let ballooned = rss_shmem(child.pid());
    assert!(ballooned + (MEM / 2 - (4 << 20)) <= full, "the host released the pages: {full} -> {ballooned}");

    // Statistics at the polling interval libvirt sets.
    q.ok("qom-set", Some(json!({"path": PATH, "property": "guest-stats-polling-interval", "value": 1})));
    assert_eq!(q.ok("qom-get", Some(json!({"path": PATH, "property": "guest-stats-polling-interval"}))), 1);
    // The figures the guest gave when its driver started, until the first poll.
    let first = q.ok("qom-get", Some(json!({"path": PATH, "property": "guest-stats"})));
    assert_eq!(first["stats"]["stat-major-faults"], -1, "not reported: {first}");
    let refreshed = wait_for("the guest refreshes its statistics", Duration::from_secs(20), || {
        let s = q.ok("qom-get", Some(json!({"path": PATH, "property": "guest-stats"})));
        (s["stats"]["stat-total-memory"] == MEM / 2).then_some(s)
    });
    assert_eq!(refreshed["stats"]["stat-free-memory"], refreshed["stats"]["stat-available-memory"], "{refreshed}");
    assert!(refreshed["last-update"].as_u64() >= first["last-update"].as_u64(), "{refreshed}");
    for (cmd, args, says) in [
        ("balloon", json!({"value": 0}), "expects a size"),
        ("balloon", json!({}), "'value' is missing"),
        (
            "qom-set",
            json!({"path": PATH, "property": "guest-stats-polling-interval", "value": -1}),
            "greater than zero",
        ),
        ("qom-get", json!({"path": PATH, "property": "nope"}), "not found"),
    ] {
        let r = q.execute(cmd, Some(args.clone()));
        assert!(r["error"]["desc"].as_str().unwrap_or_default().contains(says), "{cmd} {args}: {r}");
    }

    // The state travels in a snapshot: the restored VM keeps target and actual, and its guest
    // deflates when asked.
    let snap = dir.join("balloon.snap");
    q.stop_and_snapshot(&snap, false);
    sigkill(&mut child);
    let b = VmPaths::new(&dir, "b");
    let restored = b.spawn(&["--restore", snap.to_str().unwrap()]);
    let mut q = Qmp::negotiated(&b.qmp);
    assert_eq!(actual(&mut q), MEM / 2, "actual survives the snapshot");
    q.ok("balloon", Some(json!({"value": MEM})));
    wait_until(later(|| format!("the restored guest deflates: {}", b.console())), Duration::from_secs(30), || {
        lines(&b, "balloon: actual=0 target=0") == 1
    });
    wait_until("query-balloon follows", Duration::from_secs(10), || actual(&mut q) == MEM);
    q.ok("quit", None);
    let status = restored.wait();
    assert!(!b.console().contains("INVARIANT FAILED"), "{}", b.console());
    assert!(status.success() || status.code().is_none() || status.code() == Some(0), "{status:?}");
}

#[test]
fn without_a_balloon_qmp_says_so_and_the_guest_finds_none() {
    require_kvm();
    let dir = scratch("no-balloon");
    let p = VmPaths::new(&dir, "vm");
    let child = p.spawn(&["--vcpus", "1", "--memory", "64M", "--guest-args", "counter"]);
    let mut q = Qmp::negotiated(&p.qmp);
    for (cmd, args) in [("query-balloon", None), ("balloon", Some(json!({"value": 1 << 20})))] {
        let r = q.execute(cmd, args);
        assert_eq!(r["error"]["class"], "DeviceNotActive", "{r}");
        assert_eq!(r["error"]["desc"], "No balloon device has been activated", "{r}");
    }
    q.ok("quit", None);
    child.wait();
    let n = VmPaths::new(&dir, "none");
    let out = n.spawn(&["--vcpus", "1", "--memory", "64M", "--guest-args", "balloon duration=1s"]).wait_with_output();
    assert_eq!(out.status.code(), Some(EXIT_NO_DEVICE), "without --balloon the guest finds no device: {}", n.console());
}

#[test]
fn a_failover_keeps_the_target_and_actual_and_the_guest_goes_on_following() {
    require_kvm();
    let setup = FtSetup::new("balloon-failover");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let vm = ["--vcpus", "1", "--memory", "128M", "--balloon"];
    let standby = spawn(&sp, &s_side, &[&["standby", "--listen", &addr][..], &vm].concat());
    let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let args = [&["run", "--guest-args", "balloon counter", "--ft-peer", &addr][..], &vm].concat();
    let mut primary = spawn(&pp, &p_side, &args);
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut q = Qmp::negotiated(&pp.qmp);
    q.ok("balloon", Some(json!({"value": MEM / 2})));
    wait_until(later(|| format!("the guest inflates: {}", log(&pp))), Duration::from_secs(30), || {
        actual(&mut q) == MEM / 2
    });
    // A checkpoint or two after the guest's last step.
    std::thread::sleep(Duration::from_millis(300));
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let mut q = Qmp::negotiated(&sp.qmp);
    assert_eq!(actual(&mut q), MEM / 2, "actual survives the failover");
    q.ok("balloon", Some(json!({"value": MEM})));
    wait_until(later(|| format!("the promoted guest deflates: {}", log(&sp))), Duration::from_secs(30), || {
        actual(&mut q) == MEM
    });
    q.ok("quit", None);
    let status = wait_exit(standby, Duration::from_secs(30));
    assert!(status.code().is_some(), "the promoted copy ends on quit: {status:?}");
    assert!(!sp.console().contains("INVARIANT FAILED"), "{}", sp.console());
}
