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

/// Restores `file` and checks the service carries on from `last`, and the guest's invariants.
fn restores_to(setup: &FtSetup, name: &str, file: &std::path::Path, last: u64) {
    let rp = VmPaths::new(&setup.dir, name);
    let restored = rp.spawn(&["--restore", file.to_str().unwrap()]);
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
    restores_to(&setup, "restored-1", &first, at_first);
    restores_to(&setup, "restored-2", &second, at_second);
}
