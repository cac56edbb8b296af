//! A busy host raises no false alarm, and a false alarm that does happen costs no protection for
//! long: real pairs of `smpft` processes sharing this machine with a CPU hog (one spinning
//! thread per core), and a primary frozen (SIGSTOP) past its standby's failure detector.
//! Its own test binary: the hog would slow the tests of any binary it ran beside.

mod common;

use common::ft::{
    background_client, background_client_waiting, finish_at, free_port, log, query, wait_exit, wait_protected_by,
    FtSetup, Side,
};
use common::{one_at_a_time, require_kvm};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One spinning thread per core until `stop`, at nice 10: a batch job that takes every cycle
/// the VMs leave. (At the VMs' own priority it would starve this debug build's guest so far
/// that a request waits longer than any client would; `cargo bench --bench soak` runs the
/// release build beside a hog at full priority.)
fn hog(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: setpriority on this thread (its tid), which it owns.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect()
}

/// The host stops scheduling both copies at once (as a hypervisor taking the host's CPUs, or
/// memory pressure, does): every 1 to 3 s, both are stopped for 100 to 400 ms, past the 150 ms
/// floor. A plain timeout would declare the peer failed after most of them. Returns how many.
fn host_stalls(pids: [u32; 2], stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut r = common::rng(u64::from(pids[0]) | 1);
        let mut made = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1_000 + r(2_000)));
            for p in pids {
                // SAFETY: kill(2) with the pid of a child this test started.
                unsafe { libc::kill(p as i32, libc::SIGSTOP) };
            }
            std::thread::sleep(Duration::from_millis(100 + r(301)));
            for p in pids {
                // SAFETY: as above.
                unsafe { libc::kill(p as i32, libc::SIGCONT) };
            }
            made += 1;
        }
        made
    })
}

/// A protected pair and a paced client run beside a CPU hog on every core, with the host
/// stalling both copies now and then, for `SMPFT_BUSY_SECONDS` (default 30): neither copy
/// declares the other failed, the primary is protected at every look, and the client loses
/// nothing.
#[test]
fn a_busy_host_raises_no_false_alarm() {
    require_kvm();
    let _serial = one_at_a_time();
    let secs = std::env::var("SMPFT_BUSY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let setup = FtSetup::new("ft-busy");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    common::ft::wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary = setup.primary(&pp, &addr, &[], &[]);
    common::ft::wait_state(&pp, "protected", Duration::from_secs(30));
    // A guest short of CPU answers in seconds: the client waits for it rather than retrying.
    let client = background_client_waiting(vec![pp.serial.clone(), sp.serial.clone()], Duration::from_secs(5));
    client.wait_replies(5, Duration::from_secs(20));
    let stop = Arc::new(AtomicBool::new(false));
    let hogs = hog(stop.clone());
    let stalls = host_stalls([primary.pid(), standby.pid()], stop.clone());
    let (t, mut looks, mut unprotected) = (Instant::now(), 0, Vec::new());
    while t.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        looks += 1;
        let q = query(&pp);
        if q["state"] != "protected" {
            unprotected.push(format!("{:?}: {q}", t.elapsed()));
        }
    }
    stop.store(true, Ordering::SeqCst);
    hogs.into_iter().for_each(|h| h.join().unwrap());
    let stalls = stalls.join().unwrap();
    assert!(stalls >= 5, "only {stalls} host stalls were made");
    let (plog, slog) = (log(&pp), log(&sp));
    let alarms = plog.matches("FT peer silent").count() + slog.matches("FT peer silent").count();
    assert_eq!(alarms, 0, "false alarms under the hog and {stalls} host stalls\nprimary:\n{plog}\nstandby:\n{slog}");
    assert!(unprotected.is_empty(), "unprotected at {} of {looks} looks: {unprotected:?}", unprotected.len());
    let client = client.finish_or(|| format!("primary:\n{}\nstandby:\n{}", log(&pp), log(&sp)));
    assert!(client.replies > 5, "the client made progress under the hog: {} replies", client.replies);
    finish_at(client, 0, primary, &pp, "busy host");
    assert!(wait_exit(standby, Duration::from_secs(20)).success(), "{}", log(&sp));
}

/// A primary frozen (SIGSTOP) past its standby's failure detector: the standby wins the
/// tie-breaker, goes live and protects the VM with its own spare by itself; thawed, the old
/// primary's claim loses and it halts with status 75 (it ran the VM, so it may not wait as a
/// standby). The client loses nothing, and the time from the freeze until the VM is protected
/// again is printed.
#[test]
fn a_frozen_primary_is_replaced_and_the_vm_protected_again() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-frozen-primary");
    let (port1, port2) = (free_port(), free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (pp, s1p, s2p) = (setup.paths("p"), setup.paths("s1"), setup.paths("s2"));
    let vcpus = ["--vcpus", "4", "--memory", "128M"];
    let b_trusts_a = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let a_trusts_b = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let (a1, a2) = (addr(port1), addr(port2));
    let s1 =
        common::ft::spawn(&s1p, &b_trusts_a, &[&["standby", "--listen", &a1, "--ft-peer", &a2], &vcpus[..]].concat());
    // The spare serves whoever runs the VM after the takeover: the copy with identity b.
    let s2 = common::ft::spawn(&s2p, &a_trusts_b, &[&["standby", "--listen", &a2], &vcpus[..]].concat());
    for p in [&s1p, &s2p] {
        common::ft::wait_state(p, "waiting", Duration::from_secs(10));
    }
    let primary = setup.primary(&pp, &a1, &[], &[]);
    wait_protected_by(&pp, port1, "the first standby");
    let client = background_client(vec![pp.serial.clone(), s1p.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    let frozen = Instant::now();
    common::signal(&primary, libc::SIGSTOP);
    wait_protected_by(&s1p, port2, "the copy that took over, with its spare");
    let protected_again = frozen.elapsed();
    common::signal(&primary, libc::SIGCONT);
    let st = wait_exit(primary, Duration::from_secs(20));
    assert_eq!(st.code(), Some(75), "the thawed primary lost the tie-breaker and halts\n{}", log(&pp));
    eprintln!("frozen primary: the VM was protected again {protected_again:?} after the freeze");
    let client = client.finish_or(|| format!("primary:\n{}\ns1:\n{}", log(&pp), log(&s1p)));
    let client = finish_at(client, 1, s1, &s1p, "frozen primary");
    assert!(client.replies > 10, "the client made progress");
    assert!(wait_exit(s2, Duration::from_secs(20)).success(), "the spare stands down when the VM ends\n{}", log(&s2p));
}
