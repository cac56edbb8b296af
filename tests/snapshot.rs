//! Snapshot and restore with real processes: the VM is stopped and snapshotted over QMP, the
//! process is SIGKILLed, and a new process resumes the VM from the files.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const GUEST: &str = "counter churn churn-rate=2000 churn-ws=8M service";

/// What a client has seen of the service across restores: replies never go backwards.
#[derive(Default)]
struct Observed {
    value: u64,
    time: u64,
}

impl Observed {
    fn incr(&mut self, c: &mut ServiceClient, id: u64) -> u64 {
        let (rid, v) = reply(&c.call(&format!("INCR {id}")), "OK");
        assert_eq!(rid, id);
        assert!(v > self.value, "value went backwards or repeated: {} then {v}", self.value);
        self.value = v;
        v
    }

    fn time(&mut self, c: &mut ServiceClient, id: u64) {
        let (_, t) = reply(&c.call(&format!("TIME {id}")), "TIME");
        assert!(t >= self.time, "guest time went backwards: {} then {t}", self.time);
        self.time = t;
    }
}

/// Connects to a fresh (or restored) VM's serial line and finds a line boundary, as a real
/// client of a byte stream must. The guest may hold half a request from before the snapshot, so
/// an empty line may only finish that; the `GET` after it is whole, and its reply marks the
/// boundary. Returns the client and the complete `OK` replies that came before (the tail of a
/// reply cut by the snapshot is not one of them).
fn resync_with(path: &Path) -> (ServiceClient, Vec<(u64, u64)>) {
    const MARK: u64 = 4_000_000_000;
    let mut c = ServiceClient::connect(path, Duration::from_secs(10));
    c.send(&format!("\nGET {MARK}"));
    let mut early = Vec::new();
    loop {
        let line = c.recv();
        if line.starts_with(&format!("VAL {MARK} ")) {
            return (c, early);
        }
        if let Ok(r) = smpft_client::parse_reply(&line, "OK") {
            early.push(r);
        }
    }
}

fn resync(path: &Path) -> ServiceClient {
    resync_with(path).0
}

fn finish(c: &mut ServiceClient, child: Proc, paths: &VmPaths) {
    c.send("EXIT 999999999");
    let out = child.wait_with_output();
    let log = paths.console();
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("RESULT: PASS"), "{log}");
}

#[test]
fn snapshot_kill_restore_keeps_every_value_and_invariant() {
    require_kvm();
    let dir = scratch("snap-restore");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--vcpus", "4", "--memory", "128M", "--guest-args", GUEST]);
    let mut c = resync(&a.serial);
    let mut seen = Observed::default();
    for id in 1..=200 {
        seen.incr(&mut c, id);
        if id % 20 == 0 {
            seen.time(&mut c, 100_000 + id);
        }
    }
    let snap = dir.join("full.snap");
    Qmp::negotiated(&a.qmp).stop_and_snapshot(&snap, false);
    sigkill(&mut child);

    let b = VmPaths::new(&dir, "b");
    let child = b.spawn(&["--restore", snap.to_str().unwrap()]);
    let mut c = resync(&b.serial);
    seen.time(&mut c, 200_000);
    // The last acknowledged id is answered again, unchanged; new ids continue from there.
    assert_eq!(reply(&c.call("INCR 200"), "OK"), (200, 200));
    for id in 201..=300 {
        assert_eq!(seen.incr(&mut c, id), id);
    }
    seen.time(&mut c, 200_001);
    finish(&mut c, child, &b);
}

#[test]
fn twenty_snapshot_restore_cycles_on_one_lineage() {
    require_kvm();
    let dir = scratch("snap-20");
    let mut seen = Observed::default();
    let mut snap: Option<PathBuf> = None;
    let mut id = 0;
    for cycle in 0..20 {
        let p = VmPaths::new(&dir, &format!("vm{cycle}"));
        let mut child = match &snap {
            None => p.spawn(&["--vcpus", "4", "--memory", "64M", "--guest-args", GUEST]),
            Some(s) => p.spawn(&["--restore", s.to_str().unwrap()]),
        };
        let mut c = resync(&p.serial);
        seen.time(&mut c, 1_000_000 + cycle);
        for _ in 0..10 {
            id += 1;
            assert_eq!(seen.incr(&mut c, id), id, "cycle {cycle}");
        }
        if cycle == 19 {
            finish(&mut c, child, &p);
            break;
        }
        let next = dir.join(format!("cycle{cycle}.snap"));
        Qmp::negotiated(&p.qmp).stop_and_snapshot(&next, false);
        sigkill(&mut child);
        snap = Some(next);
    }
}

fn memory_hash(files: &[&Path]) -> String {
    let out = smpft().arg("snapshot-info").args(files).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().find_map(|l| l.strip_prefix("memory-hash: ")).unwrap().to_string()
}

#[test]
fn full_plus_five_increments_equals_a_full_snapshot_of_the_same_instant() {
    require_kvm();
    let dir = scratch("snap-incr");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--vcpus", "4", "--memory", "64M", "--guest-args", GUEST]);
    let mut c = resync(&a.serial);
    let mut q = Qmp::negotiated(&a.qmp);
    let mut chain = vec![dir.join("base.snap")];
    q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": chain[0]})));
    let mut seen = Observed::default();
    for i in 1..=5u64 {
        for k in 0..20 {
            seen.incr(&mut c, i * 100 + k);
        }
        let f = dir.join(format!("inc{i}.snap"));
        if i == 5 {
            q.ok("stop", None);
        }
        q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": f, "incremental": true})));
        chain.push(f);
    }
    let full = dir.join("same-instant.snap");
    q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": full})));
    sigkill(&mut child);
    let chain_refs: Vec<&Path> = chain.iter().map(PathBuf::as_path).collect();
    assert_eq!(memory_hash(&chain_refs), memory_hash(&[&full]));
    // Increments only hold what changed.
    let inc_size = std::fs::metadata(&chain[3]).unwrap().len();
    assert!(inc_size < std::fs::metadata(&full).unwrap().len());

    // And the chain restores to a VM that carries on.
    let b = VmPaths::new(&dir, "b");
    let mut args: Vec<&str> = vec!["--restore"];
    args.extend(chain.iter().map(|p| p.to_str().unwrap()));
    let child = b.spawn(&args);
    let mut c = resync(&b.serial);
    assert_eq!(seen.incr(&mut c, 9999), 101);
    finish(&mut c, child, &b);
}

#[test]
fn snapshot_with_a_thousand_requests_in_flight_loses_and_repeats_nothing() {
    require_kvm();
    let dir = scratch("snap-inflight");
    let a = VmPaths::new(&dir, "a");
    let mut child = a.spawn(&["--vcpus", "2", "--memory", "64M", "--guest-args", GUEST]);
    let mut c = resync(&a.serial);
    const N: u64 = 1000;
    // All requests at once; the serial line's flow control holds what the guest has not read.
    let batch: String = (1..=N).map(|id| format!("INCR {id}\n")).collect();
    c.send(batch.trim_end());
    let mut answers: BTreeMap<u64, u64> = BTreeMap::new();
    while answers.len() < 300 {
        let (id, v) = reply(&c.recv(), "OK");
        assert!(answers.insert(id, v).is_none(), "id {id} answered twice");
    }
    let snap = dir.join("inflight.snap");
    Qmp::negotiated(&a.qmp).stop_and_snapshot(&snap, false);
    // Replies already on their way before the stop may still arrive; they count too.
    drop(c);
    sigkill(&mut child);

    let b = VmPaths::new(&dir, "b");
    let child = b.spawn(&["--restore", snap.to_str().unwrap()]);
    let (mut c, early) = resync_with(&b.serial);
    for (id, v) in early {
        if let Some(&old) = answers.get(&id) {
            assert_eq!(old, v, "id {id} answered with two values");
        }
        answers.insert(id, v);
    }
    // Retry every id without an answer, by id, one at a time; skip replies to requests the
    // restored FIFO still held (answered again by id, so they must agree).
    for id in 1..=N {
        if answers.contains_key(&id) {
            continue;
        }
        c.send(&format!("INCR {id}"));
        loop {
            let line = c.recv();
            let Ok((rid, v)) = smpft_client::parse_reply(&line, "OK") else {
                // The tail of a reply cut by the snapshot, or a resync answer.
                continue;
            };
            if let Some(&old) = answers.get(&rid) {
                assert_eq!(old, v, "id {rid} answered with two values");
            }
            answers.insert(rid, v);
            if rid == id {
                break;
            }
        }
    }
    // Every id has exactly one value, and the values are 1..=N: no gap, no duplicate.
    assert_eq!(answers.len() as u64, N);
    let mut values: Vec<u64> = answers.values().copied().collect();
    values.sort_unstable();
    assert_eq!(values, (1..=N).collect::<Vec<_>>());
    finish(&mut c, child, &b);
}

fn make_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let a = VmPaths::new(dir, "src");
    let mut child = a.spawn(&["--vcpus", "2", "--memory", "32M", "--guest-args", "counter service"]);
    let mut q = Qmp::negotiated(&a.qmp);
    let (full, i1, i2) = (dir.join("full.snap"), dir.join("i1.snap"), dir.join("i2.snap"));
    q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": full})));
    q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": i1, "incremental": true})));
    q.ok("x-smpft-snapshot", Some(serde_json::json!({"file": i2, "incremental": true})));
    sigkill(&mut child);
    (full, i1, i2)
}

fn restore_fails(files: &[&Path], extra: &[&str], needle: &str) {
    let mut cmd = smpft();
    cmd.args(["run", "--serial", "null", "--restore"]).args(files).args(extra);
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "restore of {files:?} must fail");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_snapshot_files_are_rejected_with_a_clear_error() {
    require_kvm();
    let dir = scratch("snap-bad");
    let (full, i1, i2) = make_chain(&dir);
    let bytes = std::fs::read(&full).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    restore_fails(&[&write("corrupt", &corrupt)], &[], "checksum mismatch");
    restore_fails(&[&write("truncated", &bytes[..bytes.len() / 3])], &[], "is truncated");
    let mut version = bytes.clone();
    version[8] = 99;
    restore_fails(&[&write("version", &version)], &[], "format version 99 is not supported");
    restore_fails(&[&write("garbage", b"not a snapshot at all")], &[], "not an smpft snapshot");
    restore_fails(&[&i1], &[], "a chain must start with a full snapshot");
    restore_fails(&[&full, &i2], &[], "does not follow the previous file");
    restore_fails(&[&full, &i1, &full], &[], "only the first file of a chain");
    restore_fails(
        &[&full],
        &["--vcpus", "4"],
        "the snapshot is of a VM with 2 vCPUs and 32 MiB, but 4 vCPUs and 32 MiB",
    );
    restore_fails(&[&full], &["--memory", "64M"], "but 2 vCPUs and 64 MiB was asked for");
    restore_fails(&[&dir.join("missing.snap")], &[], "cannot read snapshot");
    // The good chain still restores.
    let b = VmPaths::new(&dir, "good");
    let child = b.spawn(&["--restore", full.to_str().unwrap(), i1.to_str().unwrap(), i2.to_str().unwrap()]);
    let mut c = resync(&b.serial);
    finish(&mut c, child, &b);
}
