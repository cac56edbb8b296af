//! Every bad input gets a one-line error naming the problem and a non-zero exit, never a panic
//! or a hang.

mod common;
use common::*;
use std::process::Output;

fn run(args: &[&str]) -> Output {
    smpft().arg("run").args(args).output().unwrap()
}

fn fails_with(args: &[&str], needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn missing_guest_file() {
    fails_with(&["--guest", "/nonexistent/guest.elf"], "cannot read /nonexistent/guest.elf");
}

#[test]
fn unreadable_guest_file() {
    let d = scratch("unreadable");
    fails_with(&["--guest", d.to_str().unwrap()], "cannot read");
}

#[test]
fn non_elf_guest() {
    let d = scratch("nonelf");
    let p = d.join("guest");
    std::fs::write(&p, b"#!/bin/sh\necho not a guest\n").unwrap();
    fails_with(&["--guest", p.to_str().unwrap()], "not an ELF file");
}

#[test]
fn truncated_elf_guest() {
    let d = scratch("truncated");
    let p = d.join("guest");
    let mut elf = smp_ft::guest::BUILTIN.to_vec();
    elf.truncate(200);
    std::fs::write(&p, elf).unwrap();
    fails_with(&["--guest", p.to_str().unwrap()], "truncated");
}

#[test]
fn dynamic_elf_guest() {
    // The test binary itself is a PIE executable.
    let me = std::env::current_exe().unwrap();
    fails_with(&["--guest", me.to_str().unwrap()], "not a static executable");
}

#[test]
fn kernels_that_cannot_boot() {
    require_kvm();
    let d = scratch("kernels");
    let p = |name: &str| d.join(name).to_str().unwrap().to_string();
    std::fs::write(d.join("notes.txt"), b"not a kernel\n").unwrap();
    std::fs::write(d.join("guest.elf"), smp_ft::guest::BUILTIN).unwrap();
    fails_with(&["--kernel", &p("notes.txt")], "neither an ELF vmlinux with a PVH entry note nor a bzImage");
    fails_with(&["--kernel", &p("guest.elf")], "without a PVH entry note");
    fails_with(&["--kernel", &p("missing")], "cannot read");
    fails_with(&["--initrd", &p("notes.txt")], "--kernel");
    fails_with(&["--kernel", &p("guest.elf"), "--guest", &p("guest.elf")], "cannot be used with");
    let bz = common::linux::bzimage();
    let bz = bz.to_str().unwrap();
    let cut = std::fs::read(bz).unwrap()[..100_000].to_vec();
    std::fs::write(d.join("cut"), cut).unwrap();
    fails_with(&["--kernel", &p("cut")], "truncated or malformed");
    fails_with(
        &["--kernel", bz, "--cmdline", &"x".repeat(3000)],
        "command line is 3000 bytes; this kernel takes at most 2047",
    );
    fails_with(&["--kernel", bz, "--memory", "16M"], "needs");
    let big = std::fs::File::create(d.join("big.initrd")).unwrap();
    big.set_len(80 << 20).unwrap();
    fails_with(&["--kernel", bz, "--memory", "96M", "--initrd", &p("big.initrd")], "does not fit in guest memory");
}

#[test]
fn zero_and_too_many_vcpus() {
    fails_with(&["--vcpus", "0"], "0 is not in 1..=16");
    fails_with(&["--vcpus", "17"], "17 is not in 1..=16");
    fails_with(&["--vcpus", "many"], "invalid value 'many'");
}

#[test]
fn memory_too_small_or_too_large() {
    require_kvm();
    fails_with(&["--memory", "1M"], "too small for guest");
    fails_with(&["--memory", "64G"], "is larger than");
    fails_with(&["--memory", "lots"], "is not a size");
}

#[test]
fn churn_working_set_larger_than_memory() {
    require_kvm();
    let out = run(&["--memory", "16M", "--serial", "null", "--guest-args", "churn churn-ws=64M"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("exceeds the"), "{}", stderr(&out));
}

#[test]
fn malformed_serial() {
    fails_with(&["--serial", "tcp:1234"], "not a serial backend");
    fails_with(&["--serial", "unix:"], "needs a path");
    fails_with(&["--serial", "unix:/nonexistent-dir/x.sock"], "cannot listen on serial socket");
}

#[test]
fn kvm_device_absent() {
    fails_with(&["--kvm-device", "/nonexistent/kvm"], "/nonexistent/kvm is not present");
    fails_with(&["--kvm-device", "/dev/null"], "/dev/null is not a KVM device");
}

#[test]
fn kvm_not_permitted() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Not root: /dev/kvm may well be permitted; the denied path is covered when run as root.
        return;
    }
    // Run as nobody, from a copy of the binary nobody can execute.
    let d = scratch("nobody");
    let bin = d.join("smpft");
    std::fs::copy(smpft_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--serial", "null"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("permission denied on /dev/kvm"), "{err}");
}

#[test]
fn unknown_cpu_models_and_features_and_features_the_host_lacks() {
    fails_with(
        &["--cpu", "Haswell-noTSX"],
        "CPU model 'Haswell-noTSX' is not known to smpft (it has host, max, qemu64",
    );
    fails_with(&["--cpu", "kvm64,+warp"], "CPU feature 'warp' is not known to smpft");
    if std::path::Path::new("/dev/kvm").exists() {
        // `pn` (the Pentium III serial number) is a feature no KVM offers.
        fails_with(&["--cpu", "kvm64,+pn"], "CPU 'kvm64,+pn' needs what this host's KVM does not offer: pn");
    }
}

#[test]
fn malformed_vm_generation_ids() {
    for bad in
        ["c773c261-d800-4348-9f5d", "c773c261d80043489f5d167fadd53cf8", "x773c261-d800-4348-9f5d-167fadd53cf8", ""]
    {
        let out = run(&["--vmgenid", bad]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{bad:?} should fail");
        assert!(
            err.contains(&format!("'{bad}' is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")),
            "{bad:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    fails_with(&["--vmgenid"], "a value is required for '--vmgenid <GUID|auto>'");
}

#[test]
fn malformed_vmgenid_device_on_qemus_command_line() {
    let d = scratch("bad-vmgenid-qemu");
    let guest = d.join("guest.elf");
    std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
    let out = smpft()
        .args(["qemu", "--", "-m", "64", "-kernel", guest.to_str().unwrap(), "-device", "vmgenid,guid=c773c261-nope"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("-device vmgenid,guid=: 'c773c261-nope' is not a GUID"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
