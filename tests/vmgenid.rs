//! The VM generation ID on real KVM VMs: the test guest logs the GUID it reads from guest
//! memory and QMP `query-vm-generation-id` reports the same; a restore from a snapshot gives a
//! new one (the guest sees it change), a failover keeps it.

mod common;

use common::ft::{free_port, log, spawn, wait_state, FtSetup, Side, GUEST};
use common::*;
use std::time::Duration;

const GUID: &str = "c773c261-d800-4348-9f5d-167fadd53cf8";

/// The GUID the guest logged last (`vmgenid: GUID` or `vmgenid: NEW (changed from OLD)`).
fn guest_guid(console: &str) -> Option<String> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("vmgenid: "))
        .next_back()
        .map(|l| l.split(' ').next().unwrap().to_string())
}

/// Waits until the guest at `p` has logged a generation ID, `want` if given.
fn wait_guest_guid(p: &VmPaths, want: Option<&str>) -> String {
    let shown = later(|| {
        format!("the guest's generation ID{}:\n{}", want.map_or(String::new(), |w| format!(" {w}")), p.console())
    });
    wait_for(shown, Duration::from_secs(20), || guest_guid(&p.console()).filter(|g| want.is_none_or(|w| g == w)))
}

/// `query-vm-generation-id` of the process at `p`.
fn qmp_guid(p: &VmPaths) -> serde_json::Value {
    Qmp::negotiated(&p.qmp).execute("query-vm-generation-id", None)
}

#[test]
fn the_guest_and_qmp_see_the_guid_given_and_each_restore_gives_a_new_one() {
    require_kvm();
    let dir = scratch("vmgenid-restore");
    let a = VmPaths::new(&dir, "a");
    let guest = ["--memory", "64M", "--guest-args", "counter vmgenid duration=600s"];
    let mut child = a.spawn(&[&guest[..], &["--vmgenid", GUID]].concat());
    assert_eq!(wait_guest_guid(&a, Some(GUID)), GUID);
    assert_eq!(qmp_guid(&a)["return"]["guid"], GUID);
    let snap = dir.join("full.snap");
    Qmp::negotiated(&a.qmp).stop_and_snapshot(&snap, false);
    sigkill(&mut child);

    // Restored, the VM is a new generation: a new random ID the guest sees change, and QMP
    // reports it. The device comes with the snapshot; `auto` or nothing gives a random ID.
    let mut seen = vec![GUID.to_string()];
    for (name, extra) in [("b", &[][..]), ("c", &["--vmgenid", "auto"][..])] {
        let p = VmPaths::new(&dir, name);
        let _child = p.spawn(&[&["--restore", snap.to_str().unwrap()][..], extra].concat());
        let shown = later(|| format!("{name}: the guest sees a new ID:\n{}", p.console()));
        let new = wait_for(shown, Duration::from_secs(20), || {
            let c = p.console();
            c.contains(&format!("(changed from {GUID})")).then(|| guest_guid(&c)).flatten()
        });
        assert!(!seen.contains(&new), "{name}: {new} is new: {seen:?}");
        assert_eq!(qmp_guid(&p)["return"]["guid"], new.as_str(), "{name}");
        seen.push(new);
    }
    // A GUID given with --restore is the one written.
    let other = "0e1e2d3c-4b5a-4978-8695-a4b3c2d1e0f1";
    let d = VmPaths::new(&dir, "d");
    let _child = d.spawn(&["--restore", snap.to_str().unwrap(), "--vmgenid", other]);
    assert_eq!(wait_guest_guid(&d, Some(other)), other);
    assert_eq!(qmp_guid(&d)["return"]["guid"], other);
}

#[test]
fn without_the_device_the_guest_finds_none_and_qmp_says_so() {
    require_kvm();
    let dir = scratch("vmgenid-none");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--memory", "64M", "--guest-args", "counter vmgenid duration=600s"]);
    assert_eq!(wait_guest_guid(&a, None), "none");
    let r = qmp_guid(&a);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(r["error"]["desc"], "VM Generation ID device not found", "{r}");
    // Its snapshot cannot be restored with a generation ID: the VM keeps its devices.
    let snap = dir.join("full.snap");
    Qmp::negotiated(&a.qmp).stop_and_snapshot(&snap, false);
    sigkill(&mut child);
    let out = smpft().args(["run", "--restore", snap.to_str().unwrap(), "--vmgenid", "auto"]).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("the snapshot's VM has no VM generation ID device"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_failover_keeps_the_guid() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("vmgenid-failover");
    let addr = format!("127.0.0.1:{}", free_port());
    let (ap, bp) = (setup.paths("a"), setup.paths("b"));
    let side = |me, peer| Side { me, peer, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let vm = ["--vcpus", "2", "--memory", "128M"];
    let b_args = [&["standby", "--listen", &addr][..], &vm, &["--vmgenid"]].concat();
    let b = spawn(&bp, &side(&setup.b, &setup.a), &b_args);
    wait_state(&bp, "waiting", Duration::from_secs(10));
    let guest = format!("{GUEST} vmgenid report=200ms");
    let a_args = [&["run", "--guest-args", &guest, "--ft-peer", &addr][..], &vm, &["--vmgenid", "auto"]].concat();
    let mut a = spawn(&ap, &side(&setup.a, &setup.b), &a_args);
    wait_state(&ap, "protected", Duration::from_secs(20));
    let guid = wait_guest_guid(&ap, None);
    assert_eq!(qmp_guid(&ap)["return"]["guid"], guid.as_str());
    a.sigkill();
    wait_state(&bp, "live-after-failover", Duration::from_secs(10));
    assert_eq!(qmp_guid(&bp)["return"]["guid"], guid.as_str(), "the same VM goes on\n{}", log(&bp));
    // The guest on B keeps checking its ID: wait for progress it made after going live (its
    // checks run at least as often as its reports) and look for a change it would have logged.
    let reports = |c: &str| c.lines().filter(|l| l.starts_with("progress:")).count();
    let at_go_live = reports(&bp.console());
    wait_until("six reports from the guest on B", Duration::from_secs(20), || reports(&bp.console()) >= at_go_live + 6);
    let console = bp.console();
    assert!(!console.contains("changed from"), "the guest saw its ID change:\n{console}");
    drop(b);
}
