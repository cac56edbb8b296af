//! Copies that run without root (`--user`): started as root, each becomes the user once what
//! needs root is open, keeps no capabilities and has no_new_privs; switchovers (the copy that
//! hands over builds its VM again as the user), a failover and the protection the new primary
//! takes with a spare all still work, and the client loses nothing. A user that cannot open what
//! a later step needs is refused at start.

mod common;

use common::ft::{background_client, finish_at, free_port, log, spawn, wait_exit, wait_protected_by, wait_state};
use common::ft::{FtSetup, Side, GUEST};
use common::{one_at_a_time, require_kvm, Qmp, VmPaths};
use std::time::Duration;

const USER: &str = "smpft-test";

/// The test's unprivileged user, in the KVM device's group: created if missing.
fn test_user() -> (u32, u32) {
    let id = |flag: &str| std::process::Command::new("id").args([flag, USER]).output().unwrap();
    if !id("-u").status.success() {
        let o = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", "kvm", USER])
            .output()
            .unwrap();
        assert!(o.status.success(), "useradd: {}", String::from_utf8_lossy(&o.stderr));
    }
    let num = |flag: &str| String::from_utf8_lossy(&id(flag).stdout).trim().parse::<u32>().unwrap();
    (num("-u"), num("-g"))
}

fn chown_all(dir: &std::path::Path, uid: u32, gid: u32) {
    let o = std::process::Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(dir).output().unwrap();
    assert!(o.status.success(), "chown: {}", String::from_utf8_lossy(&o.stderr));
}

/// `/proc/PID/status` says the process is the user, with no capabilities and no_new_privs.
fn assert_unprivileged(pid: u32, uid: u32, gid: u32, what: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().collect::<Vec<_>>()).unwrap()
    };
    assert!(field("Uid:").iter().all(|v| *v == uid.to_string().as_str()), "{what}: {status}");
    assert!(field("Gid:").iter().all(|v| *v == gid.to_string().as_str()), "{what}: {status}");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert!(field(cap)[0].trim_start_matches('0').is_empty(), "{what}: {cap} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), ["1"], "{what}: {status}");
}

fn switchover(from: &VmPaths) {
    let r = Qmp::negotiated(&from.qmp).execute("x-smpft-switchover", None);
    assert!(r.get("return").is_some(), "switchover: {r}");
}

#[test]
fn copies_run_as_a_user_switch_over_fail_over_and_protect_again() {
    require_kvm();
    let _one = one_at_a_time();
    let (uid, gid) = test_user();
    let setup = FtSetup::new("user");
    chown_all(&setup.dir, uid, gid);
    let (a_port, b_port, c_port) = (free_port(), free_port(), free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (a_addr, b_addr, c_addr) = (addr(a_port), addr(b_port), addr(c_port));
    let (ap, bp, cp) = (setup.paths("a"), setup.paths("b"), setup.paths("c"));
    let vm = ["--vcpus", "2", "--memory", "128M", "--user", USER];
    let a_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let b_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    // The spare serves b once b runs the VM (it trusts b).
    let c = spawn(&cp, &a_side, &[&["standby", "--listen", &c_addr][..], &vm].concat());
    let b_peers = format!("{a_addr},{c_addr}");
    let b_args = [&["standby", "--listen", &b_addr, "--then-standby", &b_addr, "--ft-peer", &b_peers][..], &vm];
    let b = spawn(&bp, &b_side, &b_args.concat());
    for p in [&bp, &cp] {
        wait_state(p, "waiting", Duration::from_secs(10));
    }
    let a_args = [&["run", "--guest-args", GUEST, "--ft-peer", &b_addr, "--then-standby", &a_addr][..], &vm];
    let mut a = spawn(&ap, &a_side, &a_args.concat());
    wait_state(&ap, "protected", Duration::from_secs(20));
    for (p, what) in [(&a, "primary"), (&b, "standby"), (&c, "spare")] {
        assert_unprivileged(p.pid(), uid, gid, what);
    }
    let client = background_client(vec![ap.serial.clone(), bp.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    let logs = || format!("a:\n{}\nb:\n{}\nc:\n{}", log(&ap), log(&bp), log(&cp));
    // There and back: each time the copy that hands over waits as the standby, its VM built
    // again as the user.
    switchover(&ap);
    wait_state(&bp, "protected", Duration::from_secs(30));
    client.wait_replies(3, Duration::from_secs(20));
    switchover(&bp);
    wait_state(&ap, "protected", Duration::from_secs(30));
    client.wait_replies(3, Duration::from_secs(20));
    // A failover, and the new primary protects the VM with the spare.
    a.sigkill();
    wait_protected_by(&bp, c_port, "the copy that took over, with the spare");
    assert_unprivileged(b.pid(), uid, gid, "the copy that took over");
    let client = client.finish_or(logs);
    finish_at(client, 1, b, &bp, "run as a user");
    assert!(wait_exit(c, Duration::from_secs(20)).success(), "the spare stands down\n{}", log(&cp));
}

#[test]
fn a_user_that_cannot_open_what_a_later_step_needs_is_refused_at_start() {
    require_kvm();
    let _one = one_at_a_time();
    test_user();
    let setup = FtSetup::new("user-refused");
    let p = setup.paths("s");
    let side = setup.side(&setup.b, &setup.a, &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    // The scratch directory is root's: the user can create neither the tie-breaker's records
    // nor the QMP socket there.
    let s = spawn(&p, &side, &["standby", "--listen", &listen, "--user", USER]);
    let st = wait_exit(s, Duration::from_secs(20));
    assert!(!st.success(), "{}", log(&p));
    assert!(log(&p).contains(&format!("is not open to {USER}")), "{}", log(&p));
    let o = common::smpft().args(["standby", "--listen", &listen, "--user", "no-such-user-here"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such user"), "{}", String::from_utf8_lossy(&o.stderr));
}
