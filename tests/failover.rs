//! SMP-FT end to end: a 4-vCPU guest (counter + churn + service) protected by a standby on this
//! machine; real processes, real SIGKILL, a client that reconnects and retries by request id and
//! checks that no acknowledged value is lost, duplicated or rolled back.

mod common;

use common::ft::{
    background_client, finish_at, finish_on, free_port, log, query, wait_exit, wait_protected_by, wait_query,
    wait_state, FtSetup, Side,
};
use common::{accepts_connections, later, one_at_a_time, require_kvm, seeded_rng, wait_for, wait_until};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one trial of a primary killed at a random moment saw: replies, client outages and the
/// tie-breaker as the copy that went live reported it (none when the primary died before the
/// standby held anything).
type Trial = Option<(u64, Vec<Duration>, serde_json::Value)>;

/// One trial of [`primary_killed_at_random_moments_loses_nothing`] with `setup`'s tie-breaker:
/// the kind of moment follows `trial % 8`.
fn kill_trial(setup: &FtSetup, trial: u64, r: &mut impl FnMut(u64) -> u64) -> Trial {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (pp, sp) = (setup.paths(&format!("p{trial}")), setup.paths(&format!("s{trial}")));
    let k = 3 + r(40);
    let (what, p_fault, s_fault) = match trial % 8 {
        0 => ("kill during pre-copy".to_string(), Some("kill-in-precopy".to_string()), None),
        1 | 2 => (format!("kill after send #{k}"), Some(format!("kill-after-send:{k}")), None),
        3 | 4 => (format!("kill right after ack #{k}"), Some(format!("kill-after-ack:{k}")), None),
        5 => (
            format!("kill while the standby applies #{k}"),
            Some(format!("kill-after-ack:{k}")),
            Some(format!("stall-apply:{k}:200")),
        ),
        _ => (format!("SIGKILL {} ms after protection", r(400)), None, None),
    };
    let what = format!("trial {trial} ({what})");
    let s_hooks: Option<String> = s_fault.as_ref().map(|f| format!("fault={f}"));
    let s_env: Vec<(&str, &str)> = s_hooks.iter().map(|h| ("SMPFT_TEST_HOOKS", h.as_str())).collect();
    let p_hooks: Option<String> = p_fault.as_ref().map(|f| format!("fault={f}"));
    let p_env: Vec<(&str, &str)> = p_hooks.iter().map(|h| ("SMPFT_TEST_HOOKS", h.as_str())).collect();
    let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &s_env);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let mut primary = setup.primary(&pp, &addr, &p_env, &[]);
    if trial % 8 == 0 {
        // Nothing whole reached the standby: it must not go live, and waits for a new primary.
        let status = wait_exit(primary, Duration::from_secs(20));
        assert_eq!(status.signal(), Some(9), "{what}: the primary should have been killed");
        let waits_again = "standby waiting for a primary again";
        let lost = later(|| format!("{what}: the standby never noticed\n{}", log(&sp)));
        wait_until(lost, Duration::from_secs(10), || log(&sp).contains(waits_again));
        assert!(standby.is_running(), "{what}: the standby must keep waiting\n{}", log(&sp));
        assert_eq!(query(&sp)["state"], "waiting", "{what}\n{}", log(&sp));
        assert!(!accepts_connections(&sp.serial), "{what}: the standby's serial port must stay closed");
        standby.sigkill();
        return None;
    }
    let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
    if p_fault.is_none() {
        wait_state(&pp, "protected", Duration::from_secs(20));
        let ms: u64 = what.split("SIGKILL ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap();
        // The moment is the point: a random time into the protected run.
        std::thread::sleep(Duration::from_millis(ms));
        primary.sigkill();
    }
    let status = wait_exit(primary, Duration::from_secs(30));
    assert_eq!(status.signal(), Some(9), "{what}: primary ended otherwise\n{}", log(&pp));
    let live = wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let client = client.finish_or(|| format!("{what}\nprimary:\n{}\nstandby:\n{}", log(&pp), log(&sp)));
    let client = finish_on(client, standby, &sp, &what);
    assert!(client.replies > 20, "{what}: the client made progress");
    Some((client.replies, client.outages.clone(), live["tiebreak"].clone()))
}

#[test]
fn primary_killed_at_random_moments_loses_nothing() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-kills");
    let (_seed, mut r) = seeded_rng();
    let mut outages = Vec::new();
    let mut total_replies = 0;
    for trial in 0..32u64 {
        if let Some((replies, o, _)) = kill_trial(&setup, trial, &mut r) {
            total_replies += replies;
            outages.extend(o);
        }
    }
    outages.sort();
    eprintln!(
        "32 trials, {total_replies} acknowledged requests, none lost; client outages: median {:?}, max {:?}",
        outages.get(outages.len() / 2),
        outages.last()
    );
}

/// The same with the tie-breaker in a three-member etcd cluster (the copies on a host of their
/// own): each kind of moment once, the standby going live only after winning in etcd, then the
/// record read back.
#[test]
fn primary_killed_with_the_etcd_tiebreaker_loses_nothing() {
    require_kvm();
    let _serial = one_at_a_time();
    let etcd = common::etcd::EtcdCluster::start(&common::scratch("ft-etcd-cluster"), false);
    let (_seed, mut r) = seeded_rng();
    let mut won = 0;
    for trial in 0..8u64 {
        // A record per trial, as a VM of its own.
        let setup = FtSetup::on_etcd(&format!("ft-etcd-kills{trial}"), &etcd, &format!("smpft/kills/vm{trial}"));
        if let Some((_, _, tb)) = kill_trial(&setup, trial, &mut r) {
            let (generation, holder) = setup.record().expect("the standby's claim is recorded in etcd");
            assert_eq!(generation, 1, "trial {trial}: {holder}");
            // What the live copy says of its tie-breaker: etcd, the member that answered, and
            // itself as the holder of generation 1.
            assert_eq!((tb["backend"].as_str(), tb["last"].as_str()), (Some("etcd"), Some("won")), "{tb}");
            assert_eq!((tb["generation"].as_u64(), tb["holder"].as_str()), (Some(1), Some(holder.as_str())), "{tb}");
            assert!(tb["endpoint"].as_str().is_some_and(|e| e.starts_with("203.0.113.")), "{tb}");
            won += 1;
        } else {
            assert_eq!(setup.record(), None, "trial {trial}: nobody claimed");
        }
    }
    eprintln!("8 trials with etcd: the standby won {won} failovers, each once, nothing lost");
}

#[test]
fn standby_killed_primary_continues_unprotected_and_releases_output() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-standby-kill");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    let primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let client = background_client(vec![pp.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    standby.sigkill();
    let q = wait_state(&pp, "unprotected", Duration::from_secs(10));
    assert_eq!(q["held-bytes"], 0, "nothing stays held once unprotected: {q}");
    let t = Instant::now();
    client.wait_replies(5, Duration::from_secs(5));
    let mut client = client.finish();
    assert!(t.elapsed() < Duration::from_secs(5), "replies flow unprotected: {:?}", t.elapsed());
    let before = client.replies;
    for _ in 0..50 {
        client.incr(Duration::from_secs(5)).unwrap();
    }
    assert_eq!(client.replies, before + 50);
    let (generation, holder) = setup.record().expect("the primary claimed the tie-breaker");
    assert_eq!(generation, 1);
    assert!(holder.ends_with(&format!(":{}", primary.pid())), "holder {holder}");
    let bye = client.exit().unwrap();
    assert_eq!(Some(bye), client.last);
    assert_eq!(wait_exit(primary, Duration::from_secs(20)).code(), Some(0), "{}", log(&pp));
}

#[test]
fn reprotect_after_failover_and_fail_over_again() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-reprotect");
    let (addr1, addr2) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (ap, bp, cp) = (setup.paths("a"), setup.paths("b"), setup.paths("c"));
    let mut b = setup.standby(&bp, &addr1, &setup.b, &setup.a, 4, &[]);
    let mut a = setup.primary(&ap, &addr1, &[], &[]);
    wait_state(&ap, "protected", Duration::from_secs(20));
    let client = background_client(vec![ap.serial.clone(), bp.serial.clone(), cp.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    a.sigkill();
    wait_state(&bp, "live-after-failover", Duration::from_secs(10));
    // A new standby (on the old primary's host, so with its identity) protects B.
    let c = setup.standby(&cp, &addr2, &setup.a, &setup.b, 4, &[]);
    wait_state(&cp, "waiting", Duration::from_secs(10));
    common::Qmp::negotiated(&bp.qmp).ok("x-smpft-protect", Some(serde_json::json!({"peer": addr2})));
    let q = wait_state(&bp, "protected", Duration::from_secs(20));
    assert_eq!(q["generation"], 1, "{q}");
    client.wait_replies(5, Duration::from_secs(20));
    b.sigkill();
    wait_state(&cp, "live-after-failover", Duration::from_secs(10));
    let mut client = client.finish();
    assert_eq!(setup.record().unwrap().0, 2, "two failovers, two generations");
    for _ in 0..20 {
        client.incr(Duration::from_secs(10)).unwrap();
    }
    assert_eq!(client.connected_to, Some(2));
    assert!(client.outages.len() >= 2, "both failovers were seen by the client: {:?}", client.outages);
    let bye = client.exit().unwrap();
    assert_eq!(Some(bye), client.last);
    assert_eq!(wait_exit(c, Duration::from_secs(20)).code(), Some(0), "{}", log(&cp));
}

#[test]
fn unreachable_tiebreaker_keeps_the_standby_from_going_live() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-tb-unreachable");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let shared = setup.dir.join("not-mounted-yet");
    let tb = shared.join("tiebreak");
    let standby =
        setup.standby_side(&sp, &addr, 4, &Side { me: &setup.b, peer: &setup.a, tiebreak: &tb, env: &[], netns: None });
    let side = Side { me: &setup.a, peer: &setup.b, tiebreak: &tb, env: &[], netns: None };
    let mut primary = setup.primary_side(&pp, &addr, &side, &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    primary.sigkill();
    wait_state(&sp, "arbitrating", Duration::from_secs(10));
    let tried = later(|| format!("the standby never tried the tie-breaker\n{}", log(&sp)));
    wait_until(tried, Duration::from_secs(10), || log(&sp).contains("unreachable"));
    // The time is the point: the standby keeps failing its claims for a while and stays put.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(query(&sp)["state"], "arbitrating", "never live without winning the tie-breaker");
    assert!(!accepts_connections(&sp.serial), "the standby's serial port stays closed");
    assert!(log(&sp).contains("unreachable"), "{}", log(&sp));
    // The storage comes back: now the standby wins and takes over.
    std::fs::create_dir_all(&shared).unwrap();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let client = client.finish();
    finish_on(client, standby, &sp, "after the tie-breaker came back");
}

#[test]
fn wrong_certificate_or_shape_is_refused_with_a_clear_error() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-refused");
    // A standby that trusts someone else.
    let stranger = setup.dir.join("id-stranger");
    assert!(common::smpft().args(["keygen", "--out"]).arg(&stranger).output().unwrap().status.success());
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let mut standby = setup.standby(&sp, &addr, &setup.b, &stranger, 4, &[]);
    let mut primary = setup.primary(&pp, &addr, &[], &[]);
    let q = wait_query(&pp, "no error reported", Duration::from_secs(20), |q| q["last-error"].is_string());
    assert_eq!(q["state"], "unprotected", "{q}");
    assert!(q["last-error"].as_str().unwrap().contains("cannot reach the standby"), "{q}");
    assert_eq!(query(&sp)["state"], "waiting");
    standby.sigkill();
    primary.sigkill();

    // A standby sized differently.
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p2"), setup.paths("s2"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 2, &[]);
    let mut primary = setup.primary(&pp, &addr, &[], &[]);
    let status = wait_exit(standby, Duration::from_secs(20));
    assert!(!status.success());
    assert!(log(&sp).contains("VM shape differs"), "{}", log(&sp));
    let mismatch = |q: &serde_json::Value| q["last-error"].as_str().is_some_and(|e| e.contains("shape"));
    wait_query(&pp, "the primary did not report the mismatch", Duration::from_secs(10), mismatch);
    assert_eq!(query(&pp)["state"], "unprotected");
    primary.sigkill();
}

#[test]
fn bad_ft_arguments_are_refused() {
    let setup = FtSetup::new("ft-args");
    let run = |args: &[&str]| {
        let o = common::smpft().arg("run").args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&["--ft-peer", "127.0.0.1:7400"]);
    assert!(e.contains("fault tolerance needs --identity, --peer-cert, --tiebreak"), "{e}");
    let id = setup.a.to_str().unwrap();
    let cert = setup.b.join("cert.pem");
    let cert = cert.to_str().unwrap();
    let tb = setup.tiebreak.to_str().unwrap();
    let base = ["--identity", id, "--peer-cert", cert, "--tiebreak", tb];
    let e = run(&[&base[..], &["--ft-peer", "nowhere"]].concat());
    assert!(e.contains("--ft-peer") && e.contains("not a host:port"), "{e}");
    let e = run(&[&base[..], &["--ft-timeout", "30ms", "--ft-heartbeat", "20ms"]].concat());
    assert!(e.contains("--ft-timeout"), "{e}");
    let e = run(&[&base[..], &["--ft-interval", "soon"]].concat());
    assert!(e.contains("not a duration"), "{e}");
    let e = run(&["--identity", "/nonexistent", "--peer-cert", cert, "--tiebreak", tb]);
    assert!(e.contains("/nonexistent"), "{e}");
    let e = run(&["--identity", id, "--peer-cert", "/nonexistent.pem", "--tiebreak", tb]);
    assert!(e.contains("--peer-cert"), "{e}");
    let o = common::smpft().args(["standby", "--listen", "not-an-address"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = common::smpft().args(["standby", "--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("fault tolerance needs"), "{o:?}");
}

/// Two network namespaces joined by a veth pair (10.214.0.1 and .2); removed on drop.
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed (the partition test needs root and iproute2)");
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("smpft-fa{id}"), format!("smpft-fb{id}"));
        for ns in [&a, &b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let (va, vb) = (format!("fa{id}"), format!("fb{id}"));
        ip(&["link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, "10.214.0.1/24"), (&b, &vb, "10.214.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Netns { a, b }
    }

    fn partition(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            let st = std::process::Command::new("ip")
                .args(["netns", "exec", &self.a, "iptables", "-A", chain, "-j", "DROP"])
                .status()
                .unwrap();
            assert!(st.success(), "iptables in {} failed", self.a);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn partition_leaves_exactly_one_live_copy() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-partition");
    let mut winners = Vec::new();
    for trial in 0..3 {
        let net = Netns::new();
        let tb = setup.dir.join(format!("tiebreak{trial}"));
        let (pp, sp) = (setup.paths(&format!("p{trial}")), setup.paths(&format!("s{trial}")));
        let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &tb, env: &[], netns: Some(&net.b) };
        let mut standby = setup.standby_side(&sp, "10.214.0.2:7400", 4, &s_side);
        let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &tb, env: &[], netns: Some(&net.a) };
        let mut primary = setup.primary_side(&pp, "10.214.0.2:7400", &p_side, &[]);
        wait_state(&pp, "protected", Duration::from_secs(20));
        let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
        client.wait_replies(5, Duration::from_secs(20));
        net.partition();
        // Both sides notice the silence and race for the tie-breaker. A primary that loses
        // halts (it ran the VM); a standby that loses never ran it: it stands down and waits
        // for a primary again.
        let lost = wait_for("nobody lost after the partition", Duration::from_secs(15), || {
            if let Some(st) = primary.try_wait() {
                return Some((Some(st), "primary"));
            }
            if let Some(st) = standby.try_wait() {
                return Some((Some(st), "standby"));
            }
            log(&sp).contains("lost to a live primary").then_some((None, "standby"))
        });
        let (winner, at, winner_paths, who) = match lost {
            (st, "primary") => {
                assert_eq!(st.and_then(|s| s.code()), Some(75), "the primary ended otherwise\n{}", log(&pp));
                (standby, 1, &sp, "standby")
            }
            (st, _) => {
                assert!(st.is_none(), "the standby must wait for a primary again, not end\n{}", log(&sp));
                assert!(standby.is_running() && !log(&sp).contains("goes live"), "{}", log(&sp));
                standby.sigkill();
                (primary, 0, &pp, "primary")
            }
        };
        let decided = |l: String| {
            l.lines().filter(|l| l.contains("tie-breaker")).find_map(|l| {
                l.split("decided_ms=").nth(1).map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            })
        };
        eprintln!(
            "partition trial {trial}: the {who} won; from silence to the tie-breaker's answer: primary {:?} ms, standby {:?} ms",
            decided(log(&pp)),
            decided(log(&sp))
        );
        let mut winner = winner;
        let running_alone = |q: &serde_json::Value| q["state"] == "live-after-failover" || q["state"] == "unprotected";
        wait_query(winner_paths, &format!("the {who} won"), Duration::from_secs(10), running_alone);
        assert!(winner.is_running(), "the {who} won and must keep running");
        let (generation, holder) = std::fs::read_to_string(&tb)
            .ok()
            .and_then(|t| {
                let mut w = t.trim_end().rsplitn(3, ' ');
                let h = w.next()?.to_string();
                Some((w.next()?.parse::<u64>().ok()?, h))
            })
            .expect("a tie-breaker record");
        assert_eq!(generation, 1);
        assert!(holder.ends_with(&format!(":{}", winner.pid())), "record names {holder}, not the {who}");
        let client = client.finish();
        finish_at(client, at, winner, winner_paths, &format!("partition trial {trial}, {who} won"));
        winners.push(who);
    }
    eprintln!("partition winners: {winners:?}");
}

#[test]
fn the_demo_fails_over_and_loses_nothing() {
    require_kvm();
    let _serial = one_at_a_time();
    let o = common::smpft().args(["demo", "--requests", "50"]).env("SMPFT_LOG", "warn").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("first reply from host B"), "{out}");
    assert!(out.contains("101 replies in all"), "{out}");
    assert!(out.contains("none lost, none duplicated, none rolled back"), "{out}");
    // As root (as in CI) the demo's client holds one TCP connection across the failover.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(out.contains("TCP connection") && out.contains("survived the failover"), "{out}");
    }
}

/// A guest that dirties memory flat out, protected with a tight output-latency bound: the vCPUs
/// are throttled (and the output hold is reported as a figure), nothing is lost across a SIGKILL
/// of the primary, and the guest's churn and counter invariants hold on the promoted copy with
/// deltas, LZ4 and throttling all on.
#[test]
fn a_guest_dirtying_flat_out_is_throttled_and_loses_nothing() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-throttle");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 2, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let guest = "counter churn churn-rate=0 churn-ws=16M service duration=600s";
    let args = ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--ft-peer", &addr];
    let mut primary = common::ft::spawn(&pp, &side, &[&args[..], &["--ft-max-latency", "5ms"]].concat());
    // A guest dirtying flat out makes the initial copy run all its rounds (the test build's
    // encoder is unoptimised): it takes a while.
    wait_state(&pp, "protected", Duration::from_secs(90));
    let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
    let throttled =
        |q: &serde_json::Value| q["throttled-ms"].as_u64().unwrap_or(0) > 500 && q["output-hold-p50-us"].is_u64();
    let q = wait_query(&pp, "the vCPUs were never throttled", Duration::from_secs(20), throttled);
    eprintln!(
        "throttle {}% ({} ms so far); output hold p50 {} µs, p99 {} µs; pages {} bytes captured, {} sent",
        q["throttle-percent"],
        q["throttled-ms"],
        q["output-hold-p50-us"],
        q["output-hold-p99-us"],
        q["page-bytes-captured"],
        q["page-bytes-sent"]
    );
    assert!(log(&pp).contains("FT: vCPU throttle set"), "the log says so\n{}", log(&pp));
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let client = client.finish_or(|| format!("primary:\n{}\nstandby:\n{}", log(&pp), log(&sp)));
    finish_on(client, standby, &sp, "after a throttled primary died");
}

/// A spare pool: the primary protects itself with the first spare, then (that standby killed)
/// with the second; the primary killed, the second goes live and protects the VM with its own
/// spare. A client sees nothing lost throughout.
#[test]
fn spares_take_over_protection_in_turn() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-spares");
    let (port1, port2, port3) = (free_port(), free_port(), free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (pp, s1p, s2p, s3p) = (setup.paths("p"), setup.paths("s1"), setup.paths("s2"), setup.paths("s3"));
    let vcpus = ["--vcpus", "4", "--memory", "128M"];
    let b_trusts_a = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let a_trusts_b = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let mut s1 = common::ft::spawn(&s1p, &b_trusts_a, &[&["standby", "--listen", &addr(port1)], &vcpus[..]].concat());
    let (a2, a3) = (addr(port2), addr(port3));
    let s2 =
        common::ft::spawn(&s2p, &b_trusts_a, &[&["standby", "--listen", &a2, "--ft-peer", &a3], &vcpus[..]].concat());
    // The third spare serves whoever runs the VM after the first failover: the copy with identity b.
    let s3 = common::ft::spawn(&s3p, &a_trusts_b, &[&["standby", "--listen", &addr(port3)], &vcpus[..]].concat());
    for p in [&s1p, &s2p, &s3p] {
        wait_state(p, "waiting", Duration::from_secs(10));
    }
    let spares = format!("{},{}", addr(port1), addr(port2));
    let mut primary = setup.primary(&pp, &spares, &[], &[]);
    wait_protected_by(&pp, port1, "first spare");
    let client = background_client(vec![pp.serial.clone(), s2p.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    s1.sigkill();
    wait_protected_by(&pp, port2, "the first spare killed");
    client.wait_replies(5, Duration::from_secs(20));
    primary.sigkill();
    // Protected by its own spare, so live: the copy goes live and is protected again at once
    // (its live-after-failover state may last too short a time for a poll to see).
    wait_protected_by(&s2p, port3, "the promoted copy's own spare");
    let client = client.finish_or(|| format!("primary:\n{}\ns2:\n{}", log(&pp), log(&s2p)));
    let client = finish_at(client, 1, s2, &s2p, "spares");
    assert!(client.replies > 20, "the client made progress");
    let st = wait_exit(s3, Duration::from_secs(20));
    assert!(st.success(), "the last spare stands down when the VM ends\n{}", log(&s3p));
}

/// The lag policy: a standby slowed by SIGSTOP bursts (stopped most of the time, never long
/// enough to count as silent) lags behind; the primary first takes the tie-breaker, then drops
/// it and protects the VM with the next spare. The primary never halts, the client loses
/// nothing, and the replaced standby never goes live: once thawed, its own claim loses and it
/// halts (it was started with --ft-halt-on-loss; without it, it would wait for a primary again).
#[test]
fn a_lagging_standby_is_replaced_by_a_spare() {
    require_kvm();
    let _serial = one_at_a_time();
    lagging_standby_replaced(&FtSetup::new("ft-lag"));
}

/// The same with the tie-breaker in a three-member etcd cluster: the replacement is the
/// primary's transaction on the generation, and the replaced standby's claim loses to it.
#[test]
fn a_lagging_standby_is_replaced_with_the_etcd_tiebreaker() {
    require_kvm();
    let _serial = one_at_a_time();
    let etcd = common::etcd::EtcdCluster::start(&common::scratch("ft-lag-etcd-cluster"), false);
    let setup = FtSetup::on_etcd("ft-lag-etcd", &etcd, "smpft/lag/vm1");
    lagging_standby_replaced(&setup);
    let (generation, holder) = setup.record().expect("the replacement is recorded in etcd");
    // 1: the replacement; 2: the VM ended on purpose afterwards.
    assert_eq!(generation, 2, "{holder}");
    assert!(holder.ends_with("/stopped"), "the VM ended after the replacement: {holder}");
}

fn lagging_standby_replaced(setup: &FtSetup) {
    let (port1, port2) = (free_port(), free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (pp, s1p, s2p) = (setup.paths("p"), setup.paths("s1"), setup.paths("s2"));
    // A stopped standby is slow, not silent: the silence timeout is above each stop.
    let shape = ["--vcpus", "4", "--memory", "128M", "--ft-timeout", "600ms"];
    let b_trusts_a = setup.side(&setup.b, &setup.a, &[]);
    let (a1, a2) = (addr(port1), addr(port2));
    let halt = ["--ft-halt-on-loss"];
    let s1 = common::ft::spawn(&s1p, &b_trusts_a, &[&["standby", "--listen", &a1], &shape[..], &halt[..]].concat());
    let s2 = common::ft::spawn(&s2p, &b_trusts_a, &[&["standby", "--listen", &a2], &shape[..]].concat());
    for p in [&s1p, &s2p] {
        wait_state(p, "waiting", Duration::from_secs(10));
    }
    // The primary's event hook records each change (--on-event).
    let (hook, events) = (setup.dir.join("hook"), setup.dir.join("events"));
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$SMPFT_EVENT $SMPFT_PEER\" >> {}\n", events.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let policy = ["--ft-max-lag", "80ms", "--ft-max-lag-for", "1s", "--ft-timeout", "600ms", "--on-event"];
    let primary = setup.primary(&pp, &format!("{a1},{a2}"), &[], &[&policy[..], &[hook.to_str().unwrap()]].concat());
    wait_protected_by(&pp, port1, "first spare");
    let client = background_client(vec![pp.serial.clone()]);
    let stop = Arc::new(AtomicBool::new(false));
    let (s1_pid, st) = (s1.pid() as i32, stop.clone());
    let bursts = std::thread::spawn(move || {
        // The times are the point: stopped 150 ms (under the 600 ms silence timeout), 30 ms
        // running, over and over.
        while !st.load(Ordering::SeqCst) {
            // SAFETY: kill only sends signals to the standby's process.
            unsafe { libc::kill(s1_pid, libc::SIGSTOP) };
            std::thread::sleep(Duration::from_millis(150));
            // SAFETY: as above.
            unsafe { libc::kill(s1_pid, libc::SIGCONT) };
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    wait_protected_by(&pp, port2, "the lagging standby replaced");
    stop.store(true, Ordering::SeqCst);
    bursts.join().unwrap();
    let status = wait_exit(s1, Duration::from_secs(20));
    assert_eq!(status.code(), Some(75), "the replaced standby halts\n{}", log(&s1p));
    assert!(log(&s1p).contains("replaced: acknowledgements lagged"), "the standby is told why\n{}", log(&s1p));
    assert!(!log(&s1p).contains("goes live"), "the replaced standby never ran the VM\n{}", log(&s1p));
    let q = query(&pp);
    assert_eq!(q["standbys-replaced"], 1, "{q}");
    let seen = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(seen.contains(&format!("standby-replaced {a1}")), "the hook ran for the replacement: {seen}");
    assert!(seen.ends_with(&format!("protected {a2}\n")), "then for the spare's protection: {seen}");
    let client = client.finish_or(|| format!("primary:\n{}\ns1:\n{}", log(&pp), log(&s1p)));
    let client = finish_at(client, 0, primary, &pp, "lag");
    assert!(client.replies > 20, "the client made progress");
    assert!(wait_exit(s2, Duration::from_secs(20)).success(), "the spare stands down with the VM\n{}", log(&s2p));
}

/// The `OK <id> <value>` replies in a serial log, in order.
fn ok_replies(log: &str) -> Vec<(u64, u64)> {
    log.lines().filter_map(|l| smpft_client::parse_reply(l.trim_end_matches('\r'), "OK").ok()).collect()
}

#[test]
fn the_serial_log_continues_on_the_standby_after_a_failover() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-serial-log");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let (plog, slog) = (setup.dir.join("p-console.log"), setup.dir.join("s-console.log"));
    let (pl, sl) = (plog.display().to_string(), slog.display().to_string());
    let side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let args = ["standby", "--listen", &addr, "--vcpus", "4", "--memory", "128M", "--serial-log", &sl];
    let standby = common::ft::spawn(&sp, &side, &args);
    let mut primary = setup.primary(&pp, &addr, &[], &["--serial-log", &pl]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
    client.wait_replies(30, Duration::from_secs(20));
    primary.sigkill();
    let client = finish_on(client.finish(), standby, &sp, "serial log");
    let (p, s) = (std::fs::read_to_string(&plog).unwrap(), std::fs::read_to_string(&slog).unwrap());
    let (on_p, on_s) = (ok_replies(&p), ok_replies(&s));
    assert!(on_p.len() >= 30, "the primary's log holds what its serial port released: {} replies", on_p.len());
    assert!(!on_s.is_empty(), "the standby's log goes on after the failover");
    // Together, the two logs are one stream: each request answered once (or again, the same,
    // when the client retried it), every value once, in order, with no gap at the failover.
    let all = ok_replies(&(p + &s));
    for w in all.windows(2) {
        let ((id1, v1), (id2, v2)) = (w[0], w[1]);
        let ok = if id2 == id1 { v2 == v1 } else { id2 > id1 && v2 == v1 + 1 };
        assert!(ok, "the logs break the stream at {:?} -> {:?}", w[0], w[1]);
    }
    assert_eq!(all.last().map(|r| r.1), client.last, "the last value acknowledged is the last logged");
}

/// A false alarm costs no protection: the standby is stopped (SIGSTOP) past the primary's
/// silence timeout, so the primary takes the tie-breaker and runs on unprotected; thawed, the
/// standby's own claim loses to the live primary. It never ran the VM, so it discards its copy
/// and waits again, and the primary protects the VM with it again by itself (its disks compared,
/// not copied whole). The client loses nothing throughout.
#[test]
fn a_false_alarm_costs_no_protection() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-false-alarm");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let client = background_client(vec![pp.serial.clone()]);
    client.wait_replies(5, Duration::from_secs(20));
    // SAFETY: kill only sends signals to the standby's process.
    unsafe { libc::kill(standby.pid() as i32, libc::SIGSTOP) };
    wait_state(&pp, "unprotected", Duration::from_secs(10));
    // SAFETY: as above.
    unsafe { libc::kill(standby.pid() as i32, libc::SIGCONT) };
    let stood_down = later(|| format!("the standby never stood down\n{}", log(&sp)));
    wait_until(stood_down, Duration::from_secs(20), || log(&sp).contains("lost to a live primary"));
    let t = Instant::now();
    let q = wait_query(&pp, "protected again", Duration::from_secs(60), |q| q["state"] == "protected");
    eprintln!("false alarm: protected again {:?} after the standby stood down", t.elapsed());
    assert_eq!(q["generation"], 1, "the primary's claim: {q}");
    assert!(!log(&sp).contains("goes live"), "the standby never ran the VM\n{}", log(&sp));
    client.wait_replies(5, Duration::from_secs(20));
    let client = client.finish_or(|| format!("primary:\n{}\nstandby:\n{}", log(&pp), log(&sp)));
    let client = finish_at(client, 0, primary, &pp, "false alarm");
    assert!(client.replies > 10, "the client made progress");
    let st = wait_exit(standby, Duration::from_secs(20));
    assert!(st.success(), "the standby stands down when the VM ends\n{}", log(&sp));
}

/// Stopping a protected primary is an order, not a failure, even when the standby never hears
/// it: with the stand-down message dropped (test hook), SIGTERM ends the primary, the standby
/// notices the silence, claims, finds the stop in the tie-breaker record, and ends with status
/// 0 without going live.
#[test]
fn a_stop_whose_message_is_lost_still_ends_both_copies() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("ft-lost-stop");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary = setup.primary(&pp, &addr, &[("SMPFT_TEST_HOOKS", "drop-goodbye")], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    common::signal(&primary, libc::SIGTERM);
    assert_eq!(wait_exit(primary, Duration::from_secs(20)).code(), Some(128 + libc::SIGTERM), "{}", log(&pp));
    assert!(log(&pp).contains("the tie-breaker records the stop"), "{}", log(&pp));
    let st = wait_exit(standby, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "the standby ends, not halts\n{}", log(&sp));
    assert!(!log(&sp).contains("goes live"), "the standby must not take over a stopped VM\n{}", log(&sp));
    assert!(log(&sp).contains("records that the primary ended the VM"), "{}", log(&sp));
}
