//! Resetting a VM in place: a guest that reboots (the ACPI reset register) and QMP
//! `system_reset` restart the same VM in the same process, its memory cleared and the guest
//! booted again, its devices and clients kept; `--no-reboot` makes a guest's reboot end the VM;
//! a protected VM stays protected through a reset and fails over after it with nothing lost.

mod common;

use common::ft::{log, wait_exit, wait_state, FtSetup};
use common::*;
use std::time::Duration;

/// How many times the guest has booted, from its console.
fn boots(p: &VmPaths) -> usize {
    p.console().matches("smpft-guest: ").count()
}

fn event<'a>(q: &'a Qmp, name: &str) -> Option<&'a serde_json::Value> {
    q.events.iter().find(|e| e["event"] == name)
}

#[test]
fn a_guest_reboot_and_system_reset_restart_the_vm_in_place() {
    require_kvm();
    let d = scratch("reset");
    let p = VmPaths::new(&d, "vm");
    let vm = p.spawn(&["--vcpus", "2", "--memory", "64M", "--guest-args", "service counter churn churn-ws=1M"]);
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    assert_eq!(c.call("INCR 1"), "OK 1 1");
    assert_eq!(c.call("INCR 2"), "OK 2 2");
    let mut q = Qmp::negotiated(&p.qmp);
    // The guest reboots itself: same process, same serial client, its state back to boot.
    assert_eq!(c.call("REBOOT 3"), "REBOOT 3");
    wait_until(later(|| format!("a second boot\n{}", p.console())), Duration::from_secs(20), || boots(&p) == 2);
    assert_eq!(c.call("GET 4"), "VAL 4 0", "memory was cleared and the guest started over");
    assert_eq!(c.call("INCR 5"), "OK 5 1");
    q.ok("query-status", None);
    let reset = event(&q, "RESET").unwrap_or_else(|| panic!("no RESET event: {:?}", q.events)).clone();
    assert_eq!(reset["data"], serde_json::json!({"guest": true, "reason": "guest-reset"}));
    // The host resets it.
    q.events.clear();
    q.ok("system_reset", None);
    wait_until(later(|| format!("a third boot\n{}", p.console())), Duration::from_secs(20), || boots(&p) == 3);
    assert_eq!(c.call("GET 6"), "VAL 6 0");
    let reset = event(&q, "RESET").unwrap_or_else(|| panic!("no RESET event: {:?}", q.events)).clone();
    assert_eq!(reset["data"], serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"}));
    // Paused, a reset leaves it paused until `cont`.
    q.ok("stop", None);
    q.ok("system_reset", None);
    assert_eq!(q.ok("query-status", None)["status"], "paused");
    q.ok("cont", None);
    wait_until("a fourth boot", Duration::from_secs(20), || boots(&p) == 4);
    assert_eq!(c.call("INCR 7"), "OK 7 1");
    assert_eq!(c.call("EXIT 8"), "BYE 8 1");
    let status = vm.wait();
    assert_eq!(status.code(), Some(0), "the guest's invariants held after every reset\n{}", p.console());
}

#[test]
fn with_no_reboot_a_guest_reboot_ends_the_vm() {
    require_kvm();
    let d = scratch("no-reboot");
    let p = VmPaths::new(&d, "vm");
    let vm = p.spawn(&["--vcpus", "1", "--memory", "32M", "--no-reboot", "--guest-args", "service"]);
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    let mut q = Qmp::negotiated(&p.qmp);
    // The host may still reset it.
    q.ok("system_reset", None);
    wait_until("a second boot", Duration::from_secs(20), || boots(&p) == 2);
    assert_eq!(c.call("REBOOT 1"), "REBOOT 1");
    let status = vm.wait();
    assert_eq!(status.code(), Some(0), "{}", p.console());
    assert_eq!(boots(&p), 2, "the guest's own reboot did not boot it again");
}

#[test]
fn with_no_shutdown_a_powered_off_guest_waits_for_a_reset() {
    require_kvm();
    let d = scratch("no-shutdown");
    let p = VmPaths::new(&d, "vm");
    let vm = p.spawn(&["--vcpus", "1", "--memory", "32M", "--no-shutdown", "--guest-args", "service"]);
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    let mut q = Qmp::negotiated(&p.qmp);
    assert_eq!(c.call("INCR 1"), "OK 1 1");
    // libvirt's reboot through ACPI: the guest powers off, then system_reset and cont.
    assert_eq!(c.call("EXIT 2"), "BYE 2 1");
    let stopped = || Qmp::negotiated(&p.qmp).ok("query-status", None)["status"] == "shutdown";
    wait_until(later(|| format!("the VM stopped\n{}", p.console())), Duration::from_secs(20), stopped);
    let refused = q.execute("cont", None);
    assert!(refused["error"]["desc"].as_str().unwrap_or_default().contains("Resetting"), "{refused}");
    q.ok("system_reset", None);
    q.ok("cont", None);
    wait_until("a second boot", Duration::from_secs(20), || boots(&p) == 2);
    assert_eq!(c.call("GET 3"), "VAL 3 0");
    q.ok("quit", None);
    assert!(vm.wait().success(), "{}", p.console());
    let shutdown = q.events.iter().find(|e| e["event"] == "SHUTDOWN").cloned();
    assert_eq!(
        shutdown.map(|e| e["data"].clone()),
        Some(serde_json::json!({"guest": true, "reason": "guest-shutdown"}))
    );
}

/// A standby and a primary started with `extra`, protected: (setup, primary's paths,
/// standby's paths, primary, standby).
fn protected_pair(name: &str, extra: &[&str]) -> (FtSetup, VmPaths, VmPaths, Proc, Proc) {
    let setup = FtSetup::new(name);
    let addr = format!("127.0.0.1:{}", common::ft::free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary = setup.primary(&pp, &addr, &[], extra);
    wait_state(&pp, "protected", Duration::from_secs(20));
    (setup, pp, sp, primary, standby)
}

#[test]
fn a_protected_vm_stays_protected_through_a_reset_and_fails_over_after_it() {
    require_kvm();
    let _serial = one_at_a_time();
    let (_setup, pp, sp, mut primary, standby) = protected_pair("ft-reset", &[]);
    let mut c = ServiceClient::connect(&pp.serial, Duration::from_secs(10));
    assert_eq!(c.call("INCR 1"), "OK 1 1");
    assert_eq!(c.call("REBOOT 2"), "REBOOT 2");
    wait_until(later(|| format!("a second boot\n{}", log(&pp))), Duration::from_secs(30), || boots(&pp) == 2);
    assert_eq!(c.call("INCR 3"), "OK 3 1", "the rebooted guest started over");
    assert_eq!(c.call("INCR 4"), "OK 4 2");
    let q = wait_state(&pp, "protected", Duration::from_secs(20));
    assert_eq!(q["state"], "protected", "still protected after the reset: {q}");
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(20));
    let mut c = ServiceClient::connect(&sp.serial, Duration::from_secs(10));
    // The standby took over the rebooted machine, with every acknowledged increment.
    assert_eq!(c.call("GET 5"), "VAL 5 2", "{}", log(&sp));
    assert_eq!(c.call("EXIT 6"), "BYE 6 2");
    assert_eq!(wait_exit(standby, Duration::from_secs(20)).code(), Some(0), "{}", log(&sp));
}

#[test]
fn a_protected_vm_powered_off_with_no_shutdown_stays_protected_and_both_copies_end_on_sigterm() {
    require_kvm();
    let _serial = one_at_a_time();
    let (_setup, pp, sp, primary, standby) = protected_pair("ft-no-shutdown", &["--no-shutdown"]);
    let mut c = ServiceClient::connect(&pp.serial, Duration::from_secs(10));
    assert_eq!(c.call("INCR 1"), "OK 1 1");
    assert_eq!(c.call("EXIT 2"), "BYE 2 1");
    let stopped = || Qmp::negotiated(&pp.qmp).ok("query-status", None)["status"] == "shutdown";
    wait_until(later(|| format!("the VM stopped\n{}", log(&pp))), Duration::from_secs(20), stopped);
    // Stopped is not silent: the standby keeps the pair (a host that goes quiet is the only
    // failure), for longer than it takes to notice a silent primary.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(common::ft::query(&sp)["state"], "standby", "{}", log(&sp));
    assert_eq!(common::ft::query(&pp)["state"], "protected", "{}", log(&pp));
    // libvirt ends a powered-off domain with SIGTERM: an orderly end of both copies.
    signal(&primary, libc::SIGTERM);
    wait_exit(primary, Duration::from_secs(20));
    let status = wait_exit(standby, Duration::from_secs(20));
    assert!(!log(&sp).contains("goes live"), "the standby must not take over an ended VM\n{}", log(&sp));
    assert!(status.code().is_some(), "{}", log(&sp));
}
