//! Planned switchover (QMP `x-smpft-switchover`): the VM moves to its standby on purpose and
//! back, the copy that handed it over waiting as the new standby each time (`--then-standby`);
//! a client under load sees no value lost, duplicated or rolled back, and the tie-breaker's
//! generation goes up by exactly one per switchover. A standby whose wire version predates the
//! switchover is refused one, and the VM stays protected where it was.

mod common;

use common::ft::{background_client, free_port, log, query, spawn, wait_exit, wait_state, FtSetup, Side, GUEST};
use common::{require_kvm, Qmp, VmPaths};
use smpft_client::FailoverClient;
use std::time::Duration;

fn side<'a>(
    setup: &'a FtSetup,
    me: &'a std::path::Path,
    peer: &'a std::path::Path,
    env: &'a [(&'a str, &'a str)],
) -> Side<'a> {
    setup.side(me, peer, env)
}

fn switchover(from: &VmPaths) -> serde_json::Value {
    Qmp::negotiated(&from.qmp).execute("x-smpft-switchover", None)
}

#[test]
fn twenty_switchovers_back_and_forth_lose_nothing() {
    require_kvm();
    let _one = common::one_at_a_time();
    switch_back_and_forth(&FtSetup::new("switchover"), 20);
}

/// The same with the tie-breaker in a three-member etcd cluster: each hand-over is a
/// transaction on the generation, recorded where the copies' next claims look.
#[test]
fn switchovers_with_the_etcd_tiebreaker_lose_nothing() {
    require_kvm();
    let _one = common::one_at_a_time();
    let etcd = common::etcd::EtcdCluster::start(&common::scratch("switchover-etcd-cluster"), false);
    switch_back_and_forth(&FtSetup::on_etcd("switchover-etcd", &etcd, "smpft/switchover/vm1"), 6);
}

/// `rounds` switchovers between two copies under a client's load, each waiting as the other's
/// standby in turn; nothing lost, and one generation up per switchover in `setup`'s tie-breaker.
fn switch_back_and_forth(setup: &FtSetup, rounds: u64) {
    let (a_addr, b_addr) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (ap, bp) = (setup.paths("a"), setup.paths("b"));
    let vm = ["--vcpus", "2", "--memory", "128M"];
    let b_args =
        [&["standby", "--listen", &b_addr][..], &vm, &["--then-standby", &b_addr, "--ft-peer", &a_addr]].concat();
    let b = spawn(&bp, &side(setup, &setup.b, &setup.a, &[]), &b_args);
    wait_state(&bp, "waiting", Duration::from_secs(10));
    let a_args =
        [&["run", "--guest-args", GUEST][..], &vm, &["--ft-peer", &b_addr, "--then-standby", &a_addr]].concat();
    let a = spawn(&ap, &side(setup, &setup.a, &setup.b, &[]), &a_args);
    wait_state(&ap, "protected", Duration::from_secs(20));
    let client = background_client(vec![ap.serial.clone(), bp.serial.clone()]);

    let mut generation = setup.record().map_or(0, |r| r.0);
    let (mut from, mut to) = (&ap, &bp);
    let mut pauses = Vec::new();
    let logs = || format!("a:\n{}\nb:\n{}", log(&ap), log(&bp));
    for i in 0..rounds {
        wait_state(from, "protected", Duration::from_secs(20));
        client.wait_replies(3, Duration::from_secs(20)); // the client's requests flow meanwhile
        let r = switchover(from);
        let r = r.get("return").cloned().unwrap_or_else(|| panic!("switchover {i}: {r}\n{}", logs()));
        generation += 1;
        assert_eq!(r["generation"], generation, "switchover {i}: one generation up\n{}", logs());
        assert_eq!(setup.record().map(|r| r.0), Some(generation), "switchover {i}: the tie-breaker's record");
        pauses.push(r["pause-ms"].as_f64().unwrap());
        // The new primary protects the VM with the copy that handed it over.
        wait_state(to, "protected", Duration::from_secs(20));
        (from, to) = (to, from);
    }
    let mut client = client.finish_or(logs);
    assert!(
        client.replies > 2 * rounds,
        "the client made progress through the switchovers ({} replies)",
        client.replies
    );
    for _ in 0..10 {
        client.incr(Duration::from_secs(10)).unwrap();
    }
    let bye = client.exit().unwrap();
    assert_eq!(Some(bye), client.last, "the service's final value is the last one acknowledged");
    // `from` runs the VM now; its guest checks its invariants and exits 0, and the standby
    // stands down with it.
    let (live, standby) = if std::ptr::eq(from, &ap) { (a, b) } else { (b, a) };
    assert_eq!(wait_exit(live, Duration::from_secs(20)).code(), Some(0), "guest invariants\n{}", logs());
    assert_eq!(wait_exit(standby, Duration::from_secs(20)).code(), Some(0), "the standby stood down\n{}", logs());
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "{rounds} switchovers ({}), {} requests acknowledged, none lost; primary pause p50 {:.1} ms, max {:.1} ms; client outages max {:?}",
        setup.tiebreak.display(),
        client.replies,
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        client.outages.iter().max()
    );
}

#[test]
fn a_switchover_needs_a_standby_that_speaks_it() {
    require_kvm();
    let _one = common::one_at_a_time();
    let setup = FtSetup::new("switchover-version");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    // A standby that speaks wire version 1 (an older build): it can protect, not take a switchover.
    let old = [("SMPFT_TEST_HOOKS", "wire-version=1")];
    let _standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &old);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let _primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let r = switchover(&pp);
    let why = r["error"]["desc"].as_str().unwrap_or_else(|| panic!("refused: {r}")).to_string();
    assert!(why.contains("wire version 1") && why.contains("upgrade the standby"), "{why}");
    // The time is the point: nothing changes for a while after the refusal.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(query(&pp)["state"], "protected", "the VM stays protected where it was\n{}", log(&pp));
    assert_eq!(setup.record(), None, "nobody touched the tie-breaker");
    let mut c = FailoverClient::new(vec![pp.serial.clone()], 1);
    for _ in 0..5 {
        c.incr(Duration::from_secs(10)).expect("the VM keeps serving");
    }

    // A standby older than any this build talks to is refused when it connects.
    let addr2 = format!("127.0.0.1:{}", free_port());
    let (pp2, sp2) = (setup.paths("p2"), setup.paths("s2"));
    let _standby2 = setup.standby(&sp2, &addr2, &setup.b, &setup.a, 4, &[("SMPFT_TEST_HOOKS", "wire-version=0")]);
    wait_state(&sp2, "waiting", Duration::from_secs(10));
    let _primary2 = setup.primary(&pp2, &addr2, &[], &[]);
    let refused = common::later(|| format!("the primary never refused the old standby\n{}", log(&pp2)));
    common::wait_until(refused, Duration::from_secs(15), || log(&pp2).contains("peer speaks FT wire version 0"));
    assert_eq!(query(&pp2)["state"], "unprotected", "{}", log(&pp2));
}
