//! Boot the test guest on 1, 2, 4 and 8 vCPUs with `counter` + `churn`; every vCPU must run and
//! the guest's invariants must hold. And the checker must be able to fail.

mod common;
use common::*;

fn boot(vcpus: usize) {
    require_kvm();
    let out = smpft()
        .args(["run", "--vcpus", &vcpus.to_string(), "--memory", "128M", "--serial", "null"])
        .args(["--guest-args", "counter churn churn-rate=2000 churn-ws=4M duration=2s"])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "guest failed:\n{log}");
    assert!(log.contains("RESULT: PASS"), "no PASS in:\n{log}");
    let reports = cpu_reports(&log);
    assert_eq!(reports.len(), vcpus, "one report per vCPU expected:\n{log}");
    for r in &reports {
        assert!(r.loops > 0 && r.counter > 0 && r.churn > 0, "vCPU {} did not make progress: {r:?}", r.cpu);
    }
}

#[test]
fn boots_1_vcpu() {
    boot(1);
}

#[test]
fn boots_2_vcpus() {
    boot(2);
}

#[test]
fn boots_4_vcpus() {
    boot(4);
}

#[test]
fn boots_8_vcpus() {
    boot(8);
}

fn sabotaged(what: &str) {
    require_kvm();
    let out = smpft()
        .args(["run", "--vcpus", "4", "--serial", "null", "--guest-args"])
        .arg(format!("counter churn fail={what} duration=3s"))
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "a broken invariant must exit 3:\n{log}");
    assert!(log.contains(&format!("INVARIANT FAILED: {what}")), "{log}");
    assert!(!log.contains("RESULT: PASS"), "{log}");
}

#[test]
fn broken_counter_invariant_is_reported() {
    sabotaged("counter");
}

#[test]
fn broken_churn_page_is_reported() {
    sabotaged("churn");
}

#[test]
fn bad_guest_parameter_is_reported() {
    require_kvm();
    let out = smpft().args(["run", "--serial", "null", "--guest-args", "counter churn-rate=fast"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad boot parameter: \"churn-rate=fast\""), "{}", stderr(&out));
}

/// The SMBIOS tables tell the guest what the stack says the machine is (cloud-init recognises
/// OpenStack by the system product), and smpft's defaults otherwise; bad specs are refused.
#[test]
fn the_guest_reads_the_smbios_tables_it_is_given() {
    require_kvm();
    let run = |extra: &[&str]| {
        smpft()
            .args(["run", "--vcpus", "1", "--memory", "64M", "--serial", "null"])
            .args(["--guest-args", "smbios counter duration=200ms"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--smbios",
        "type=1,manufacturer=Red Hat,product=OpenStack Compute,version=16.0.2,serial=4c4c,,x,uuid=30ad89ac-5906-49ca-8d52-3c6343c598f6,family=Virtual Machine",
        "--smbios",
        "type=11,value=cloud-name:test",
    ]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("smbios: system manufacturer=Red Hat product=OpenStack Compute version=16.0.2 serial=4c4c,x family=Virtual Machine uuid=30ad89ac-5906-49ca-8d52-3c6343c598f6"),
        "{log}"
    );
    assert!(log.contains("smbios: oem string 1=cloud-name:test"), "{log}");
    let log = stderr(&run(&[]));
    assert!(log.contains("smbios: system manufacturer=smpft product=smpft VM"), "smpft's defaults: {log}");
    for (spec, says) in [("type=4,x=y", "type=4 is not one smpft writes"), ("type=1,uuid=abc", "is not a UUID")] {
        let out = run(&["--smbios", spec]);
        assert_ne!(out.status.code(), Some(0));
        let e = stderr(&out);
        assert!(e.contains(&format!("--smbios {spec}")) && e.contains(says), "{spec}: {e}");
    }
}
