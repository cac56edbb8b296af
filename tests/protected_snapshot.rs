//! Snapshots of a protected VM come from the standby's committed copy: asked on the primary's
//! QMP (forwarded) or on the standby's own. The primary keeps running; the file restores with
//! `--restore` to a VM whose guest invariants hold and whose service counter is exactly the
//! last value acknowledged before the snapshot was asked for.

mod common;

use common::ft::{free_port, log, query, wait_exit, wait_state, FtSetup};
use common::{require_kvm, Qmp, VmPaths};
use serde_json::json;
use smpft_client::FailoverClient;
use std::time::Duration;

/// Restores `file` (with `extra` arguments) and checks that the service carries on from `last`
/// and that the guest's invariants hold (its disk's check against its memory included).
fn restores_to(setup: &FtSetup, name: &str, file: &std::path::Path, last: u64, extra: &[&str]) {
    let rp = VmPaths::new(&setup.dir, name);
    let restored = rp.spawn(&[&["--restore", file.to_str().unwrap()][..], extra].concat());
    let mut c = FailoverClient::new(vec![rp.serial.clone()], 1_000_000);
    c.last = Some(last);
    for _ in 0..5 {
        c.incr(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{name}: the restored service: {e}"));
    }
    c.exit().unwrap();
    let st = wait_exit(restored, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{name}: the restored guest's invariants\n{}", rp.console());
}

#[test]
fn a_protected_vm_is_snapshotted_from_its_standby() {
    require_kvm();
    let setup = FtSetup::new("protected-snapshot");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let _standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let mut c = FailoverClient::new(vec![pp.serial.clone()], 1);
    for _ in 0..50 {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    let before = query(&pp)["checkpoints"].as_u64().unwrap();

    // Asked on the primary: the standby writes it; the primary's checkpoints go on meanwhile.
    let first = setup.dir.join("from-primary.snap");
    let r = Qmp::negotiated(&pp.qmp).execute("x-smpft-snapshot", Some(json!({"file": first})));
    let r = r.get("return").unwrap_or_else(|| panic!("{r}\n{}", log(&sp)));
    assert_eq!(r["standby"], addr.as_str());
    assert!(r["epoch"].as_u64().unwrap() > 0 && r["bytes"].as_u64().unwrap() > 0, "{r}");
    let at_first = c.last.unwrap();
    for _ in 0..20 {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    assert!(query(&pp)["checkpoints"].as_u64().unwrap() > before, "the primary kept checkpointing");

    // Asked on the standby's own QMP.
    let second = setup.dir.join("from-standby.snap");
    let r = Qmp::negotiated(&sp.qmp).ok("x-smpft-snapshot", Some(json!({"file": second})));
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    let at_second = c.last.unwrap();
    // Increments are the VM's own business: refused, with the reason.
    let r = Qmp::negotiated(&pp.qmp).execute("x-smpft-snapshot", Some(json!({"file": second, "incremental": true})));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("full snapshots"), "{r}");
    assert_eq!(query(&pp)["state"], "protected");

    c.exit().unwrap();
    assert_eq!(wait_exit(primary, Duration::from_secs(20)).code(), Some(0), "{}", log(&pp));
    restores_to(&setup, "restored-1", &first, at_first, &[]);
    restores_to(&setup, "restored-2", &second, at_second, &[]);
}

/// With mirrored disks, a snapshot of the protected VM also exports the standby's disks as of
/// the same instant (read-only NBD, point in time) while the guest keeps writing: `qemu-img
/// convert` copies the export, `qemu-img compare` finds the export unchanged against the copy
/// (the guest's later writes do not show through), and the snapshot restored on the copy runs a
/// guest whose check of its disk against its memory passes.
#[test]
fn a_protected_vms_disks_are_exported_as_of_its_snapshot() {
    require_kvm();
    let setup = FtSetup::new("protected-snapshot-disk");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let image = |name: &str| {
        let p = setup.dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
        p.display().to_string()
    };
    let (pdisk, sdisk) = (image("primary.raw"), image("standby.raw"));
    let b = common::ft::Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let a = common::ft::Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let shape = ["--vcpus", "2", "--memory", "128M"];
    let _standby =
        common::ft::spawn(&sp, &b, &[&["standby", "--listen", &addr, "--disk", &sdisk][..], &shape[..]].concat());
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let guest = "counter churn churn-rate=2000 churn-ws=2M service disk flush-every=8 duration=600s";
    let run = ["run", "--guest-args", guest, "--ft-peer", &addr, "--disk", &pdisk];
    let primary = common::ft::spawn(&pp, &a, &[&run[..], &shape[..]].concat());
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut c = FailoverClient::new(vec![pp.serial.clone()], 1);
    for _ in 0..30 {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    let snap = setup.dir.join("disk.snap");
    let r = Qmp::negotiated(&pp.qmp).execute("x-smpft-snapshot", Some(json!({"file": snap})));
    let r = r.get("return").cloned().unwrap_or_else(|| panic!("{r}\n{}", log(&sp)));
    let at = c.last.unwrap();
    let uri = r["exports"][0].as_str().unwrap_or_else(|| panic!("an export per disk: {r}")).to_string();
    // The guest writes on; the copy of the export is of the snapshot's instant all the same.
    for _ in 0..20 {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    let copy = setup.dir.join("exported.raw");
    let qemu_img = |args: &[&str]| {
        let o = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (scripts/setup installs qemu-utils)");
        (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr))
    };
    let (st, out) = qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, copy.to_str().unwrap()]);
    assert_eq!(st, Some(0), "qemu-img convert from the export: {out}\n{}", log(&sp));
    for _ in 0..20 {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    let (st, out) = qemu_img(&["compare", "-f", "raw", "-F", "raw", &uri, copy.to_str().unwrap()]);
    assert_eq!(st, Some(0), "the export still shows the snapshot's instant: {out}");
    // libnbd's view of it too (NBD_OPT_GO rather than qemu's fallback).
    let o = std::process::Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .expect("nbdinfo (scripts/setup installs libnbd-bin)");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (64u64 << 20).to_string(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = Qmp::negotiated(&pp.qmp).ok("x-smpft-release-snapshot", Some(json!({"file": snap})));
    assert_eq!(r["released"], 1, "{r}");
    let socket = uri.split("socket=").nth(1).unwrap().to_string();
    assert!(!std::path::Path::new(&socket).exists(), "a released export's socket is gone");
    c.exit().unwrap();
    assert_eq!(wait_exit(primary, Duration::from_secs(30)).code(), Some(0), "{}", log(&pp));

    // The snapshot's memory on the exported disk: the guest's disk check passes.
    restores_to(&setup, "restored", &snap, at, &["--disk", copy.to_str().unwrap()]);
}
