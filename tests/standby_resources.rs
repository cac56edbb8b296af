//! A standby that could not go live never accepts protection and never claims the tie-breaker:
//! its serial socket and console are claimed when it starts and checked again before it accepts
//! a primary and before it claims. Checked with a real SIGSTOP and a real SIGKILL of the primary.
//! And a standby waiting for the tie-breaker's lock keeps answering QMP.

mod common;
use common::ft::{free_port, log, query, wait_state, FtSetup};
use common::*;
use std::time::{Duration, Instant};

/// Paths whose serial socket lives in its own directory, which a test can take away.
fn paths_in_subdir(setup: &FtSetup, name: &str) -> (VmPaths, std::path::PathBuf) {
    let sub = setup.dir.join(format!("{name}-run"));
    std::fs::create_dir_all(&sub).unwrap();
    let mut p = setup.paths(name);
    p.serial = sub.join("serial.sock");
    (p, sub)
}

/// Waits until the standby at `sp` noticed the silent primary, declined to claim, and waits for
/// a primary again.
fn wait_standing_down(sp: &VmPaths) {
    let what = later(|| format!("the standby never stood down\n{}", log(sp)));
    wait_until(what, Duration::from_secs(20), || {
        let l = log(sp);
        l.contains("not claiming the tie-breaker") && l.contains("standby waiting for a primary again")
    });
}

#[test]
fn a_standby_that_could_not_go_live_refuses_to_start() {
    require_kvm();
    let setup = FtSetup::new("standby-refuses");
    let regular = setup.dir.join("not-a-socket");
    std::fs::write(&regular, "data").unwrap();
    let missing = setup.dir.join("missing");
    let cases = [
        (format!("unix:{}/s.sock", missing.display()), None, "serial socket in a missing directory"),
        (format!("unix:{}", regular.display()), None, "serial path that is a regular file"),
        ("null".to_string(), Some(missing.join("console.log")), "console in a missing directory"),
    ];
    for (serial, console, what) in cases {
        let port = free_port().to_string();
        let mut c = smpft();
        c.args(["standby", "--listen", &format!("127.0.0.1:{port}"), "--vcpus", "2", "--memory", "32M"])
            .args(["--serial", &serial])
            .arg("--identity")
            .arg(&setup.b)
            .arg("--peer-cert")
            .arg(setup.a.join("cert.pem"))
            .arg("--tiebreak")
            .arg(&setup.tiebreak);
        if let Some(con) = &console {
            c.arg("--console").arg(con);
        }
        let out = c.output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("could not go live"), "{what}: {err}");
        let named = console
            .as_ref()
            .map_or_else(|| serial.trim_start_matches("unix:").to_string(), |c| c.display().to_string());
        assert!(err.contains(&named), "{what}: the message names {named}: {err}");
    }
    assert_eq!(std::fs::read_to_string(&regular).unwrap(), "data", "the regular file is left alone");
}

/// The standby's serial socket directory disappears while it protects a primary. A primary
/// that stalls (SIGSTOP) must not lose the VM to a standby that could not run it: the standby
/// does not claim, the primary resumes, wins the tie-breaker and runs on; and when it then tries
/// to protect itself again, the standby refuses it with a reason the primary logs.
#[test]
fn a_stalled_primary_keeps_the_vm_when_the_standby_could_not_go_live() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("standby-broken-stop");
    let addr = format!("127.0.0.1:{}", free_port());
    let pp = setup.paths("p");
    let (sp, sub) = paths_in_subdir(&setup, "s");
    let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    let primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut client = ServiceClient::connect(&pp.serial, Duration::from_secs(10));
    assert_eq!(reply(&client.call("INCR 1"), "OK"), (1, 1));
    std::fs::remove_dir_all(&sub).unwrap();

    signal(&primary, libc::SIGSTOP);
    wait_standing_down(&sp);
    assert!(standby.is_running(), "the standby keeps running\n{}", log(&sp));
    assert_eq!(setup.record(), None, "the standby never claimed the tie-breaker\n{}", log(&sp));
    assert!(log(&sp).contains("could not go live"), "{}", log(&sp));
    signal(&primary, libc::SIGCONT);

    // The primary runs on and answers; it holds the tie-breaker.
    assert_eq!(reply(&client.call("INCR 2"), "OK"), (2, 2));
    let refused = later(|| format!("the primary never logged the standby's refusal\n{}", log(&pp)));
    wait_until(refused, Duration::from_secs(20), || log(&pp).contains("could not go live"));
    wait_state(&pp, "unprotected", Duration::from_secs(10));
    let (_, holder) = setup.record().expect("the primary claimed the tie-breaker");
    assert!(holder.ends_with(&format!(":{}", primary.pid())), "holder {holder}");
    assert_eq!(query(&sp)["state"], "waiting");
    assert_eq!(reply(&client.call("INCR 3"), "OK"), (3, 3));
    standby.sigkill();
}

/// The same loss, and the primary is killed: the standby must not claim (it could not run the
/// VM, and a claim would only keep a recovered primary from running it).
#[test]
fn a_standby_that_could_not_go_live_does_not_claim_when_the_primary_dies() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("standby-broken-kill");
    let addr = format!("127.0.0.1:{}", free_port());
    let pp = setup.paths("p");
    let (sp, sub) = paths_in_subdir(&setup, "s");
    let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    let mut primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(30));
    std::fs::remove_dir_all(&sub).unwrap();
    primary.sigkill();
    wait_standing_down(&sp);
    assert!(standby.is_running(), "{}", log(&sp));
    assert_eq!(query(&sp)["state"], "waiting", "{}", log(&sp));
    assert_eq!(setup.record(), None, "no claim\n{}", log(&sp));
    assert!(log(&sp).contains("not claiming the tie-breaker"), "{}", log(&sp));
    standby.sigkill();
}

/// Only the socket file was removed (its directory is still there): the standby binds it again
/// when it checks, and goes live with it.
#[test]
fn a_removed_serial_socket_is_bound_again_before_going_live() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("standby-rebind");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    let mut primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(30));
    assert!(sp.serial.exists() && !accepts_connections(&sp.serial), "reserved, not listening");
    std::fs::remove_file(&sp.serial).unwrap();
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let mut c = ServiceClient::connect(&sp.serial, Duration::from_secs(10));
    c.send("");
    c.recv();
    let (id, _) = reply(&c.call("INCR 5"), "OK");
    assert_eq!(id, 5);
    assert!(log(&sp).contains("binding it again"), "{}", log(&sp));
    drop(standby);
}

/// The tie-breaker's lock is held elsewhere (the other side mid-claim, or slow storage) while
/// the standby wants to go live: it keeps answering QMP throughout, with every answer well
/// inside one claim attempt (2 s), and goes live once the lock is free.
#[test]
fn a_standby_waiting_for_the_tie_breaker_keeps_answering_qmp() {
    use std::os::fd::AsRawFd;
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("standby-claim-qmp");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    let mut primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut lock_path = setup.tiebreak.clone().into_os_string();
    lock_path.push(".lock");
    let lock =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path).unwrap();
    let fl =
        libc::flock { l_type: libc::F_WRLCK as i16, l_whence: libc::SEEK_SET as i16, l_start: 0, l_len: 0, l_pid: 0 };
    // SAFETY: fcntl on a descriptor we own with a valid flock.
    assert_eq!(unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0);
    primary.sigkill();
    wait_state(&sp, "arbitrating", Duration::from_secs(10));
    let mut q = Qmp::negotiated(&sp.qmp);
    for _ in 0..30 {
        let t = Instant::now();
        let r = q.ok("x-smpft-query-ft", None);
        assert_eq!(r["state"], "arbitrating", "{r}");
        assert!(t.elapsed() < Duration::from_secs(1), "QMP took {:?} while the lock was held", t.elapsed());
        // The time is the point: asked every 100 ms for 3 s, across several claim attempts.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log(&sp).contains("could not be locked"), "the claims did wait for the lock\n{}", log(&sp));
    drop(lock);
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    drop(standby);
}
