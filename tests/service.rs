//! The `service` workload over a unix-socket serial line: 10,000 requests from a real client,
//! every reply checked (values count up by one, retried ids are answered without a second
//! increment, values never go backwards).

mod common;
use common::*;
use std::time::Duration;

#[test]
fn ten_thousand_requests_over_unix_socket_serial() {
    require_kvm();
    let d = scratch("service");
    let sock = d.join("serial.sock");
    let child = Proc::new(
        smpft()
            .args(["run", "--vcpus", "2", "--memory", "64M", "--serial"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--guest-args", "service counter"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut c = ServiceClient::connect(&sock, Duration::from_secs(10));
    const N: u64 = 10_000;
    const WINDOW: u64 = 16;
    let mut expected = 0u64;
    let mut last_seen = 0u64;
    let mut sent = 0u64;
    let mut received = 0u64;
    // Pipelined: keep WINDOW requests in flight. Every 100th request retries the id before it.
    let request = |i: u64| {
        if i % 100 == 99 {
            format!("INCR {}", i - 1)
        } else {
            format!("INCR {i}")
        }
    };
    while received < N {
        while sent < N && sent - received < WINDOW {
            c.send(&request(sent));
            sent += 1;
        }
        let line = c.recv();
        let (id, value) = reply(&line, "OK");
        let i = received;
        received += 1;
        if i % 100 == 99 {
            assert_eq!(id, i - 1, "reply out of order");
            assert_eq!(value, expected, "a retried id must return its first value and not increment");
        } else {
            assert_eq!(id, i, "reply out of order");
            expected += 1;
            assert_eq!(value, expected, "INCR {id} must count up by exactly one");
        }
        assert!(value >= last_seen, "value went backwards: {last_seen} then {value}");
        last_seen = value;
    }
    let (_, v) = reply(&c.call("GET 1000000"), "VAL");
    assert_eq!(v, expected);
    assert_eq!(c.call("FROB 7"), "ERR 7 unknown command");
    assert_eq!(c.call("INCR"), "ERR 0 missing or bad request id");
    let (_, v) = reply(&c.call("EXIT 1000001"), "BYE");
    assert_eq!(v, expected);
    let out = child.wait_with_output();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains(&format!("service: value={expected} ")), "{log}");
    assert!(!sock.exists(), "the serial socket is removed at exit");
}

#[test]
fn a_new_client_replaces_the_old_one_and_state_survives() {
    require_kvm();
    let d = scratch("reconnect");
    let sock = d.join("serial.sock");
    let child = Proc::new(
        smpft()
            .args(["run", "--vcpus", "1", "--memory", "32M", "--serial"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--guest-args", "service"])
            .spawn()
            .unwrap(),
    );
    let mut a = ServiceClient::connect(&sock, Duration::from_secs(10));
    assert_eq!(reply(&a.call("INCR 1"), "OK"), (1, 1));
    drop(a);
    let mut b = ServiceClient::connect(&sock, Duration::from_secs(10));
    // The retried id is answered from the guest's table, not incremented again.
    assert_eq!(reply(&b.call("INCR 1"), "OK"), (1, 1));
    assert_eq!(reply(&b.call("INCR 2"), "OK"), (2, 2));
    b.call("EXIT 3");
    assert_eq!(child.wait().code(), Some(0));
}
