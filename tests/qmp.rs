//! The QMP control socket of a real smpft process: status, stop/cont with events, quit, snapshot
//! errors, and input that is not QMP answered with QMP errors (the connection and the VM
//! survive); input that is not JSON gets an error and that client is let go (the VM survives).

mod common;
use common::*;
use serde_json::json;

#[test]
fn qmp_commands_events_and_errors() {
    require_kvm();
    let dir = scratch("qmp");
    let p = VmPaths::new(&dir, "vm");
    let child = p.spawn(&["--vcpus", "2", "--memory", "32M", "--guest-args", "counter service"]);

    let mut q = Qmp::connect(&p.qmp);
    let r = q.execute("query-status", None);
    assert_eq!(r["error"]["class"], "CommandNotFound", "commands before negotiation are refused: {r}");
    assert_eq!(q.execute("qmp_capabilities", None), json!({"return": {}}));

    for bad in ["[1,2,3]", "{\"arguments\":{}}", "{\"execute\":42}", "\"stop\""] {
        let r = q.raw(bad);
        assert_eq!(r["error"]["class"], "GenericError", "{bad}: {r}");
    }
    assert_eq!(q.execute("frobnicate", None)["error"]["class"], "CommandNotFound");
    assert_eq!(q.execute("x-smpft-snapshot", Some(json!({})))["error"]["desc"], "Parameter 'file' is missing");
    let r = q.execute("x-smpft-snapshot", Some(json!({"file": dir.join("x.snap"), "incremental": true})));
    assert!(r["error"]["desc"].as_str().unwrap().contains("no full snapshot"), "{r}");
    let r = q.execute("x-smpft-snapshot", Some(json!({"file": "/nonexistent-dir/x.snap"})));
    assert!(r["error"]["desc"].as_str().unwrap().contains("cannot write snapshot"), "{r}");
    let r = q.raw(r#"{"execute":"query-status","id":{"tag":7}}"#);
    assert_eq!(r["id"], json!({"tag": 7}));
    assert_eq!(r["return"]["status"], "running");

    q.ok("stop", None);
    assert_eq!(q.ok("query-status", None)["running"], false);
    q.ok("cont", None);
    assert_eq!(q.ok("query-status", None)["status"], "running");
    let names: Vec<&str> = q.events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["STOP", "RESUME"]);

    // Not JSON: that client is told and let go; the others and the VM go on.
    let mut other = Qmp::negotiated(&p.qmp);
    let r = other.raw("{not json}");
    assert!(r["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{r}");
    assert!(other.closed(), "the client that sent it is disconnected");
    assert_eq!(q.ok("query-status", None)["status"], "running");

    // The guest kept running through all of that.
    let mut c = ServiceClient::connect(&p.serial, std::time::Duration::from_secs(10));
    c.send("");
    c.recv();
    assert_eq!(reply(&c.call("INCR 1"), "OK"), (1, 1));

    assert_eq!(q.execute("quit", None), json!({"return": {}}));
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(0));
    assert!(!p.qmp.exists() && !p.serial.exists(), "sockets are removed at exit");
}

#[test]
fn malformed_qmp_address_is_rejected() {
    let out = smpft().args(["run", "--qmp", "tcp:4444"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not a QMP address"), "{}", stderr(&out));
}
