//! The tie-breaker on a real three-member etcd cluster (Debian's etcd-server), at the level of
//! the tie-breaker itself: claimants on hosts of their own (network namespaces), members killed
//! by pid or cut from the others, claims racing, and TLS. The FT copies' failover and
//! switchover with etcd are in tests/failover.rs and tests/switchover.rs.

mod common;

use common::etcd::{on_host, EtcdCluster};
use common::{scratch, stderr};
use smp_ft::ft::tiebreak::etcd::EtcdTieBreaker;
use smp_ft::ft::tiebreak::{Outcome, Record, Spec, TieBreak, TieBreakError};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// A claimant of its own (not the process's shared one `tiebreak::open` gives: its connections
/// are made from the network namespace of the thread that uses it first).
fn claimant(spec: &str, owner: &str) -> Arc<dyn TieBreak> {
    match Spec::parse(spec).unwrap() {
        Spec::Etcd(e) => Arc::new(EtcdTieBreaker::new(e, owner).unwrap()),
        Spec::File(_) => panic!("{spec} is not etcd"),
    }
}

/// `f` with a claimant `owner` of `spec`, on the host `ns`.
fn as_host<T: Send + 'static>(
    ns: &str,
    spec: &str,
    owner: &str,
    f: impl FnOnce(&dyn TieBreak) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (spec, owner) = (spec.to_string(), owner.to_string());
    on_host(ns, move || f(claimant(&spec, &owner).as_ref()))
}

#[test]
fn claims_hand_overs_and_stops_follow_the_rule_and_survive_a_member_killed() {
    let dir = scratch("etcd-rule");
    let mut etcd = EtcdCluster::start(&dir, false);
    let spec = etcd.spec("smpft/rule/vm1");
    let hosts = etcd.hosts.clone();
    let s = spec.clone();
    let first = as_host(&hosts, &spec, "host-a:1", move |a| {
        let b = claimant(&s, "host-b:2");
        assert_eq!(a.read(T).unwrap(), None);
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 });
        assert_eq!(a.claim(1, T).unwrap(), Outcome::Won { generation: 1 }, "idempotent for the holder");
        assert_eq!(b.claim(1, T).unwrap(), Outcome::Lost { generation: 1, holder: "host-a:1".into() });
        assert_eq!(a.hand_over(2, "host-b:2", T).unwrap(), Outcome::Won { generation: 2 });
        assert_eq!(b.claim(2, T).unwrap(), Outcome::Won { generation: 2 }, "the named standby holds 2");
        assert_eq!(a.claim(2, T).unwrap(), Outcome::Lost { generation: 2, holder: "host-b:2".into() });
        let status = b.status();
        assert_eq!((status.backend, status.last.as_deref()), ("etcd", Some("won")), "{status:?}");
        assert_eq!(status.record, Some(Record { generation: 2, holder: "host-b:2".into() }));
        status.endpoint.expect("the member that answered")
    })
    .join()
    .unwrap();
    // The member that answered last is killed: the next claim is answered by another.
    let killed = etcd.members.iter().position(|m| first.starts_with(&m.addr)).unwrap();
    etcd.kill(killed);
    let after = as_host(&hosts, &spec, "host-b:2", |b| {
        let won = b.claim(3, T);
        let stop = b.record_stop(3, T);
        (won.map_err(|e| e.to_string()), stop.map_err(|e| e.to_string()), b.status())
    })
    .join()
    .unwrap();
    assert_eq!(after.0, Ok(Outcome::Won { generation: 3 }), "{}", etcd.logs());
    assert_eq!(after.1, Ok(Outcome::Won { generation: 4 }));
    let endpoint = after.2.endpoint.unwrap();
    assert!(!endpoint.starts_with(&etcd.members[killed].addr), "answered by {endpoint}, which was killed");
    assert!(after.2.record.unwrap().stopped(), "the stop is recorded");
    // A second member killed: no quorum, so nobody can claim; the error says so in time.
    etcd.kill((killed + 1) % 3);
    let t = std::time::Instant::now();
    let r = as_host(&hosts, &spec, "host-a:1", |a| a.claim(5, Duration::from_secs(2))).join().unwrap();
    assert!(matches!(r, Err(TieBreakError::NoQuorum { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "the claim timeout bounds it: {:?}", t.elapsed());
}

/// Two copies that cannot hear each other (a partition between them only) claim the same
/// generation at once: exactly one wins, every time, and the loser learns who.
#[test]
fn both_copies_claiming_at_once_exactly_one_wins_fifty_times() {
    let dir = scratch("etcd-race");
    let etcd = EtcdCluster::start(&dir, false);
    // Each copy lists the members in another order: they start at different members.
    let (spec_a, spec_b) = (etcd.spec_on("smpft/race/vm1", &[0, 1, 2]), etcd.spec_on("smpft/race/vm1", &[2, 1, 0]));
    const ROUNDS: u64 = 50;
    let barrier = Arc::new(Barrier::new(2));
    let run = |spec: &str, me: &'static str| {
        let barrier = barrier.clone();
        as_host(&etcd.hosts, spec, me, move |tb| {
            (1..=ROUNDS)
                .map(|g| {
                    barrier.wait();
                    tb.claim(g, T).unwrap_or_else(|e| panic!("{me}, generation {g}: {e}"))
                })
                .collect::<Vec<Outcome>>()
        })
    };
    let (a, b) = (run(&spec_a, "host-a:1"), run(&spec_b, "host-b:2"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let mut wins = [0, 0];
    for g in 1..=ROUNDS {
        let (ra, rb) = (&a[g as usize - 1], &b[g as usize - 1]);
        match (ra, rb) {
            (Outcome::Won { generation }, Outcome::Lost { generation: lg, holder }) => {
                assert_eq!((*generation, *lg, holder.as_str()), (g, g, "host-a:1"));
                wins[0] += 1;
            }
            (Outcome::Lost { generation: lg, holder }, Outcome::Won { generation }) => {
                assert_eq!((*generation, *lg, holder.as_str()), (g, g, "host-b:2"));
                wins[1] += 1;
            }
            other => panic!("generation {g}: not exactly one winner: {other:?}"),
        }
    }
    eprintln!("{ROUNDS} rounds: host-a won {}, host-b won {}", wins[0], wins[1]);
}

/// A copy on the minority side of a partition of the etcd cluster (its host reaches only the
/// member cut from the other two) cannot claim within the claim timeout; the other copy, which
/// reaches the majority, wins; once healed, the first learns it lost.
#[test]
fn a_copy_cut_off_with_an_etcd_minority_cannot_claim_and_the_other_wins() {
    let dir = scratch("etcd-cut");
    let etcd = EtcdCluster::start(&dir, false);
    let key = "smpft/cut/vm1";
    // Host A lives beside member 0 and reaches it alone; host B reaches all three.
    let (spec_a, spec_b) = (etcd.spec_on(key, &[0]), etcd.spec(key));
    let minority = etcd.members[0].ns.clone();
    assert_eq!(
        as_host(&minority, &spec_a, "host-a:1", |a| a.claim(1, T)).join().unwrap().unwrap(),
        Outcome::Won { generation: 1 }
    );
    etcd.cut(0);
    let a = as_host(&minority, &spec_a, "host-a:1", |a| (a.claim(2, Duration::from_secs(3)), a.status()));
    let b = as_host(&etcd.hosts, &spec_b, "host-b:2", |b| (b.claim(2, Duration::from_secs(8)), b.status()));
    let ((ra, sa), (rb, sb)) = (a.join().unwrap(), b.join().unwrap());
    assert!(matches!(ra, Err(TieBreakError::NoQuorum { .. })), "the minority's copy must not win: {ra:?}");
    assert_eq!(rb.unwrap(), Outcome::Won { generation: 2 }, "the majority's copy wins\n{}", etcd.logs());
    assert!(sa.last.unwrap().contains("203.0.113.1:2379"), "A's status names the member it tried");
    assert_ne!(sb.endpoint.as_deref(), Some("203.0.113.1:2379"), "B was answered by the majority");
    etcd.heal(0);
    let again = as_host(&minority, &spec_a, "host-a:1", |a| a.claim(2, T)).join().unwrap();
    assert_eq!(again.unwrap(), Outcome::Lost { generation: 2, holder: "host-b:2".into() });
}

/// The leader killed while two copies claim: each generation is decided once, for one copy,
/// and a claim whose answer was lost with the leader, asked again, finds itself the holder.
#[test]
fn the_leader_killed_during_claims_each_generation_still_has_one_winner() {
    let dir = scratch("etcd-leader");
    let mut etcd = EtcdCluster::start(&dir, false);
    let spec = etcd.spec("smpft/leader/vm1");
    for g in 1..=3u64 {
        let leader = common::wait_for("a leader", Duration::from_secs(20), || etcd.leader());
        let barrier = Arc::new(Barrier::new(3));
        let go = |me: &'static str| {
            let barrier = barrier.clone();
            as_host(&etcd.hosts, &spec, me, move |tb| {
                barrier.wait();
                tb.claim(g, Duration::from_secs(10)).map_err(|e| e.to_string())
            })
        };
        let (a, b) = (go("host-a:1"), go("host-b:2"));
        barrier.wait();
        std::thread::sleep(Duration::from_millis(g * 2));
        etcd.kill(leader);
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        let won = [&ra, &rb].iter().filter(|r| matches!(r, Ok(Outcome::Won { .. }))).count();
        assert_eq!(won, 1, "generation {g}: {ra:?} {rb:?}\n{}", etcd.logs());
        assert!(ra.is_ok() && rb.is_ok(), "both got an answer: {ra:?} {rb:?}");
        etcd.restart(leader);
    }
}

#[test]
fn tls_a_wrong_certificate_is_refused_with_the_reason() {
    let dir = scratch("etcd-tls");
    let etcd = EtcdCluster::start(&dir, true);
    let c = etcd.certs.as_ref().unwrap();
    let eps = etcd.endpoints(&[0, 1, 2]);
    let show = |query: String| {
        etcd.smpft(&["tiebreak", "show", "--timeout", "2s", &format!("etcd://{eps}/smpft/tls/vm1?{query}")])
    };
    let d = |p: &std::path::Path| p.display().to_string();
    let good = show(format!("cacert={}&cert={}&key={}", d(&c.ca), d(&c.client.0), d(&c.client.1)));
    assert!(good.status.success(), "{}", stderr(&good));
    // A client certificate the cluster's CA did not sign: the members refuse it.
    let other = show(format!("cacert={}&cert={}&key={}", d(&c.ca), d(&c.other_client.0), d(&c.other_client.1)));
    let e = stderr(&other);
    assert!(!other.status.success());
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(e.contains("certificate") || e.contains("Certificate"), "the reason: {e}");
    // Members whose certificate this host's CA did not sign: this host refuses them.
    let wrong_ca = show(format!("cacert={}&cert={}&key={}", d(&c.other_ca), d(&c.client.0), d(&c.client.1)));
    let e = stderr(&wrong_ca);
    assert!(!wrong_ca.status.success());
    assert!(e.contains("UnknownIssuer") || e.contains("unknown issuer"), "the reason: {e}");
    // No client certificate at all, against a cluster that asks for one.
    let none = show(format!("cacert={}", d(&c.ca)));
    assert!(!none.status.success() && stderr(&none).contains("no client certificate"), "{}", stderr(&none));
    eprintln!("refusals: {}\n{}\n{}", stderr(&other).trim(), stderr(&wrong_ca).trim(), stderr(&none).trim());
}

#[test]
fn an_unreachable_cluster_at_start_is_one_clear_error() {
    common::require_kvm();
    let dir = scratch("etcd-unreachable");
    let id = dir.join("id");
    let o = common::smpft().args(["keygen", "--out"]).arg(&id).output().unwrap();
    assert!(o.status.success());
    // Nothing listens on the port: the standby cannot read the record, so it does not start.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = format!("etcd://127.0.0.1:{port}/smpft/vm1");
    let started = std::time::Instant::now();
    let o = common::smpft()
        .args(["standby", "--listen", "127.0.0.1:0", "--vcpus", "1", "--memory", "64M", "--serial", "null"])
        .arg("--identity")
        .arg(&id)
        .arg("--peer-cert")
        .arg(id.join("cert.pem"))
        .args(["--tiebreak", &spec])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(
        e.contains(&format!("tie-breaker etcd://127.0.0.1:{port}/smpft/vm1")) && e.contains("no etcd member"),
        "{e}"
    );
    assert!(e.contains("refused"), "the reason: {e}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    // A spec that is not one: the setting is named.
    let o = common::smpft().args(["tiebreak", "show", "etcd://127.0.0.1/smpft/vm1"]).output().unwrap();
    assert!(stderr(&o).contains("member '127.0.0.1': no port"), "{}", stderr(&o));
}

/// `smpft tiebreak show` and `clear`: the record and whether its holder answers; clearing is
/// refused while it does (a running smpft on this host, or a host that is up), unless forced.
#[test]
fn show_and_clear_refuse_to_clear_a_holder_that_answers() {
    common::require_kvm();
    let dir = scratch("etcd-clear");
    let etcd = EtcdCluster::start(&dir, false);
    let spec = etcd.spec("smpft/clear/vm1");
    // A live smpft process on this host, named as a copy names itself (HOST:PID).
    let id = dir.join("id");
    assert!(common::smpft().args(["keygen", "--out"]).arg(&id).output().unwrap().status.success());
    let mut live = common::Proc::new(
        common::smpft()
            .args(["standby", "--listen", "127.0.0.1:0", "--vcpus", "1", "--memory", "64M", "--serial", "null"])
            .arg("--identity")
            .arg(&id)
            .arg("--peer-cert")
            .arg(id.join("cert.pem"))
            .arg("--tiebreak")
            .arg(dir.join("unused-tiebreak"))
            .spawn()
            .unwrap(),
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let holder = format!("{host}:{}", live.pid());
    let record = |owner: &str, g: u64| {
        let (spec, owner) = (spec.clone(), owner.to_string());
        let won = as_host(&etcd.hosts, &spec, &owner, move |tb| tb.claim(g, T)).join().unwrap().unwrap();
        assert_eq!(won, Outcome::Won { generation: g });
    };
    let tb = |args: &[&str]| etcd.smpft(&[&["tiebreak"][..], args, &[&spec]].concat());
    record(&holder, 1);
    let show = tb(&["show"]);
    let out = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(out.contains("generation: 1") && out.contains(&format!("holder: {holder} (answers: process")), "{out}");
    assert!(out.contains("answered by: 203.0.113."), "{out}");
    let refused = tb(&["clear"]);
    let e = stderr(&refused);
    assert!(!refused.status.success() && e.contains("still answers") && e.contains("--force"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // The copy is gone: its record may be cleared.
    live.sigkill();
    let _ = live.wait();
    let cleared = tb(&["clear"]);
    assert!(cleared.status.success(), "{}", stderr(&cleared));
    assert!(String::from_utf8_lossy(&cleared.stdout).contains("no smpft process"), "{:?}", cleared);
    let json = tb(&["show", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((v["backend"].as_str(), v["generation"].as_u64()), (Some("etcd"), None), "{v}");
    // A holder on another host that is up (a member's address answers on port 22 by refusing)
    // answers; one whose host does not, and a stopped VM's record, do not.
    record("203.0.113.3:7", 2);
    let up = tb(&["clear"]);
    assert!(stderr(&up).contains("host 203.0.113.3 answers"), "{}", stderr(&up));
    let forced = tb(&["clear", "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    record("203.0.113.99:7", 3);
    let down = tb(&["clear"]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert!(String::from_utf8_lossy(&down.stdout).contains("does not answer"), "{:?}", down);
    record(&format!("{holder}/stopped"), 4);
    let stopped = tb(&["clear"]);
    assert!(String::from_utf8_lossy(&stopped.stdout).contains("ended on purpose"), "{:?}", stopped);
    let nothing = tb(&["clear"]);
    assert!(String::from_utf8_lossy(&nothing.stdout).contains("no record; nothing to clear"), "{:?}", nothing);
}
