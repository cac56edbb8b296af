//! The QMP server's tests: parsing, the stream of commands, monitors smpft connects to.

use super::*;
use std::io::{BufRead, BufReader};

fn cmd(s: &str, negotiated: bool) -> Result<Option<Command>, QmpError> {
    parse_command(&serde_json::from_str(s).unwrap(), negotiated)
}

#[test]
fn negotiation_comes_first() {
    assert_eq!(cmd(r#"{"execute":"qmp_capabilities"}"#, false), Ok(None));
    assert_eq!(cmd(r#"{"execute":"stop"}"#, false).unwrap_err().class, ErrorClass::CommandNotFound);
    assert!(cmd(r#"{"execute":"qmp_capabilities"}"#, true).is_err());
}

#[test]
fn commands_and_arguments() {
    assert_eq!(cmd(r#"{"execute":"stop","id":1}"#, true), Ok(Some(Command::Stop)));
    assert_eq!(cmd(r#"{"execute":"cont","arguments":{}}"#, true), Ok(Some(Command::Cont)));
    let e = cmd(r#"{"execute":"stop","arguments":{"now":true}}"#, true).unwrap_err();
    assert!(e.desc.contains("takes no arguments"), "{}", e.desc);
    assert_eq!(
        cmd(r#"{"execute":"frobnicate","arguments":{"a":1}}"#, true),
        Ok(Some(Command::Other { name: "frobnicate".into(), args: serde_json::from_str(r#"{"a":1}"#).unwrap() }))
    );
    assert!(cmd(r#"[1,2]"#, true).is_err());
    assert!(cmd(r#"{"arguments":{}}"#, true).is_err());
    assert!(cmd(r#"{"execute":"stop","bogus":1}"#, true).is_err());
}

/// A VM owner's own commands, typed the same way.
#[test]
fn typed_arguments_are_checked_in_qmps_words() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(tag = "execute", content = "arguments", deny_unknown_fields)]
    enum Own {
        #[serde(rename = "x-do")]
        Do {
            file: String,
            #[serde(default)]
            fast: bool,
        },
    }
    let args = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
    assert_eq!(typed::<Own>("x-do", &args(r#"{"file":"a"}"#)), Ok(Own::Do { file: "a".into(), fast: false }));
    assert_eq!(typed::<Own>("x-do", &args("{}")).unwrap_err().desc, "Parameter 'file' is missing");
    assert_eq!(typed::<Own>("x-do", &args(r#"{"file":"a","x":1}"#)).unwrap_err().desc, "Parameter 'x' is unexpected");
    assert!(typed::<Own>("x-do", &args(r#"{"file":1}"#)).unwrap_err().desc.starts_with("Invalid parameter type"));
}

#[test]
fn an_inherited_listening_socket_serves_and_anything_else_is_refused() {
    use std::os::fd::IntoRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mon.sock");
    let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
    let (server, _rx) = QmpServer::from_fd(fd, "test").unwrap();
    let s = UnixStream::connect(&path).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
    server.stop();
    assert!(path.exists(), "an inherited socket's file is not smpft's to remove");
    let f = std::fs::File::open("/dev/null").unwrap();
    assert!(QmpServer::from_fd(f.as_raw_fd(), "test").is_err(), "not a socket");
}

#[test]
fn addresses() {
    assert_eq!(parse_address("unix:/run/q.sock").unwrap(), PathBuf::from("/run/q.sock"));
    assert_eq!(parse_address("unix:/run/q.sock,server,nowait").unwrap(), PathBuf::from("/run/q.sock"));
    assert!(parse_address("tcp:1").is_err());
    assert!(parse_address("unix:").is_err());
    assert!(parse_address("unix:/a,bogus").is_err());
}

#[test]
fn server_round_trip_and_input_that_is_not_json() {
    let dir = std::env::temp_dir().join(format!("qmp-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qmp.sock");
    let (server, rx) = QmpServer::bind(&path, "test").unwrap();
    let owner = std::thread::spawn(move || {
        let req = rx.recv().unwrap();
        assert_eq!(req.command, Command::QueryStatus);
        req.reply.send(Ok(json!({"status": "running", "running": true})));
    });
    let s = UnixStream::connect(&path).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    let mut next = |r: &mut BufReader<UnixStream>| -> Value {
        line.clear();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    assert!(next(&mut r)["QMP"]["version"].is_object());
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    assert_eq!(next(&mut r), json!({"return": {}}));
    w.write_all(b"[1,2]").unwrap();
    assert_eq!(next(&mut r)["error"]["desc"], "QMP input must be a JSON object", "valid JSON, not QMP: answered");
    w.write_all(b"{\"execute\":\"query-status\",\"id\":\"a\"}\n").unwrap();
    assert_eq!(next(&mut r), json!({"return": {"status": "running", "running": true}, "id": "a"}));
    server.emit("STOP", None);
    assert_eq!(next(&mut r)["event"], "STOP");
    owner.join().unwrap();
    // Not JSON: no telling where the next command would start; the client is told and let go.
    w.write_all(b"{not json} {\"execute\":\"stop\"}").unwrap();
    let e = next(&mut r);
    assert!(e["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{e}");
    assert_eq!(e["error"]["class"], "GenericError");
    line.clear();
    assert_eq!(r.read_line(&mut line).unwrap_or(0), 0, "disconnected: {line}");
    server.stop();
    assert!(!path.exists());
}

fn bound(name: &str) -> (tempfile::TempDir, PathBuf, QmpServer, Receiver<Request>) {
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let (server, rx) = QmpServer::bind(&path, "test").unwrap();
    (dir, path, server, rx)
}

fn negotiate(path: &Path) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), r#"{"return":{}}"#);
    (r, w)
}

/// The VM owner stops serving (it ended) while commands wait and clients never read: the
/// waiting command gets an error, events never block the owner, and stop returns.
#[test]
fn stop_is_bounded_whatever_the_clients_do() {
    let (_dir, path, server, rx) = bound("qmp-stop");
    // A client that sends commands and never reads a reply.
    let mut mute = UnixStream::connect(&path).unwrap();
    mute.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    // A client whose command the owner never answers.
    let (mut r, mut w) = negotiate(&path);
    w.write_all(b"{\"execute\":\"query-status\",\"id\":9}\n").unwrap();
    let pending = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            got.push(serde_json::from_str::<Value>(&line).unwrap());
            line.clear();
        }
        got
    });
    // More events than the mute client's socket buffer holds: the owner is not held up.
    let big = "x".repeat(4096);
    for _ in 0..200 {
        server.emit("NOISE", Some(json!({"pad": big})));
    }
    let t = std::time::Instant::now();
    server.stop();
    assert!(t.elapsed() < Duration::from_secs(20), "stop took {:?}", t.elapsed());
    let got = reader.join().unwrap();
    assert_eq!(got.iter().filter(|v| v["event"] == "NOISE").count(), 200, "a reading client gets every event");
    let reply = got.iter().find(|v| v.get("id").is_some()).expect("the waiting command was answered");
    assert_eq!(reply["error"]["desc"], "the VM is shutting down", "{reply}");
    assert!(!path.exists());
    drop((pending, rx));
}

/// A reply the owner gave before the server stopped is not replaced by the shutdown error,
/// and the event that follows it still reaches the client (as after `quit`).
#[test]
fn quit_reply_and_shutdown_event_are_delivered() {
    let (_dir, path, server, rx) = bound("qmp-quit");
    let (mut r, mut w) = negotiate(&path);
    w.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    let req = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(req.command, Command::Quit);
    req.reply.send(Ok(json!({})));
    server.emit("SHUTDOWN", None);
    server.stop();
    let mut all = String::new();
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        all.push_str(&line);
        line.clear();
    }
    let mut lines = all.lines();
    assert_eq!(lines.next(), Some(r#"{"return":{}}"#));
    assert!(lines.next().unwrap().contains("SHUTDOWN"), "{all}");
}

#[test]
fn an_endless_value_is_refused() {
    let (_dir, path, server, _rx) = bound("qmp-long");
    let (mut r, mut w) = negotiate(&path);
    let junk = vec![b'x'; VALUE_MAX + 10];
    let _ = w.write_all(&junk);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
    line.clear();
    assert_eq!(r.read_line(&mut line).unwrap_or(0), 0, "the client is disconnected");
    server.stop();
}

/// A connection to `path`: its reading and writing ends.
fn open(path: &Path) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

/// Reads lines until one is `what`; returns it.
fn next_that(r: &mut BufReader<UnixStream>, what: &str, is: impl Fn(&Value) -> bool) -> Value {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "connection closed before {what}");
        let v: Value = serde_json::from_str(&line).unwrap();
        if is(&v) {
            return v;
        }
    }
}

/// Reads reply and event lines until one has `id` (or is an error without one); returns it.
fn until_id(r: &mut BufReader<UnixStream>, id: impl Into<Value>) -> Value {
    let id = id.into();
    next_that(r, &format!("the reply to {id}"), |v| {
        v["id"] == id || (v.get("error").is_some() && v.get("id").is_none())
    })
}

/// Answers every request: `query-status` running, `query-version`, anything else `{}`; each
/// command name is sent on `seen`.
fn owner(rx: Receiver<Request>) -> (std::thread::JoinHandle<()>, Receiver<Command>) {
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let t = std::thread::spawn(move || {
        for req in rx {
            let answer = match &req.command {
                Command::QueryStatus => json!({"status": "running", "running": true, "singlestep": false}),
                Command::Other { name, .. } if name == "query-version" => {
                    json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"})
                }
                _ => json!({}),
            };
            let _ = seen_tx.send(req.command.clone());
            req.reply.send(Ok(answer));
        }
    });
    (t, seen)
}

/// Proxmox VE's client: bare JSON with no newline, `qmp_capabilities` sent before the greeting
/// is read, then the next command once the reply to the last came; several in one write and
/// one split across writes work as well.
#[test]
fn commands_are_a_json_stream() {
    let (_dir, path, server, rx) = bound("qmp-stream");
    let (owner, seen) = owner(rx);
    let (mut r, mut w) = open(&path);
    w.write_all(br#"{"arguments":{},"id":"77:1","execute":"qmp_capabilities"}"#).unwrap();
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    assert!(greeting.contains("\"QMP\""), "the greeting comes first: {greeting}");
    assert_eq!(until_id(&mut r, "77:1"), json!({"return": {}, "id": "77:1"}));
    w.write_all(br#"{"execute":"query-status","id":"a"}{"execute":"stop","id":"b"}"#).unwrap();
    assert_eq!(until_id(&mut r, "a")["return"]["status"], "running");
    assert_eq!(until_id(&mut r, "b"), json!({"return": {}, "id": "b"}));
    let split = br#"{"execute":"query-version","arguments":{},"id":"c"}"#;
    w.write_all(&split[..20]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    w.write_all(&split[20..]).unwrap();
    assert_eq!(until_id(&mut r, "c")["return"]["package"], "test");
    let names: Vec<Command> = seen.try_iter().collect();
    assert_eq!(names.len(), 3, "{names:?}");
    drop((r, w));
    server.stop();
    owner.join().unwrap();
}

/// qm opens one connection per command (or per queue of commands) and closes it after the
/// last reply: many in a row, each negotiating anew.
#[test]
fn one_connection_per_command() {
    let (_dir, path, server, rx) = bound("qmp-percmd");
    let (owner, seen) = owner(rx);
    for (i, cmd) in
        ["query-status", "query-version", "system_reset", "query-status"].iter().cycle().take(40).enumerate()
    {
        let (mut r, mut w) = open(&path);
        let caps = format!(r#"{{"execute":"qmp_capabilities","arguments":{{}},"id":"{i}:0"}}"#);
        w.write_all(caps.as_bytes()).unwrap();
        assert_eq!(until_id(&mut r, format!("{i}:0"))["return"], json!({}));
        let c = format!(r#"{{"execute":"{cmd}","arguments":{{}},"id":"{i}:1"}}"#);
        w.write_all(c.as_bytes()).unwrap();
        let reply = until_id(&mut r, format!("{i}:1"));
        assert!(reply.get("return").is_some(), "{cmd}: {reply}");
    }
    assert_eq!(seen.try_iter().count(), 40);
    server.stop();
    owner.join().unwrap();
}

#[test]
fn human_monitor_commands_are_carried_out_as_qmp() {
    let (_dir, path, server, rx) = bound("qmp-hmp");
    let (owner, seen) = owner(rx);
    let (mut r, mut w) = negotiate(&path);
    w.write_all(br#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":1}"#).unwrap();
    assert_eq!(until_id(&mut r, 1), json!({"return": "VM status: running\r\n", "id": 1}));
    assert_eq!(seen.recv_timeout(Duration::from_secs(30)).unwrap(), Command::QueryStatus);
    w.write_all(br#"{"execute":"human-monitor-command","arguments":{"command-line":"stop"},"id":2}"#).unwrap();
    assert_eq!(until_id(&mut r, 2), json!({"return": "", "id": 2}));
    assert_eq!(seen.recv_timeout(Duration::from_secs(30)).unwrap(), Command::Stop);
    w.write_all(br#"{"execute":"human-monitor-command","arguments":{"command-line":"savevm s1"},"id":3}"#).unwrap();
    let e = until_id(&mut r, 3);
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(e["error"]["desc"].as_str().unwrap().contains("'savevm s1'"), "{e}");
    assert!(seen.try_recv().is_err(), "a command smpft does not implement never reaches the VM");
    drop((r, w));
    server.stop();
    owner.join().unwrap();
}

/// A monitor smpft connects out to (`server=off`, qmeventd's): greeting, commands and events
/// flow as on a listening one; with a reconnect interval it is connected when the socket
/// appears, and again after the peer closes it. Without one, a missing socket is an error now.
#[test]
fn monitors_smpft_connects_to_and_reconnects() {
    let dir = tempfile::Builder::new().prefix("qmp-out").tempdir().unwrap();
    let path = dir.path().join("qmeventd.sock");
    let (mut server, rx) = QmpServer::new("test").unwrap();
    let e = server.connect(&path, None).unwrap_err();
    assert!(matches!(e, ServerError::Connect { .. }), "{e}");
    server.connect(&path, Some(Duration::from_millis(20))).unwrap();
    let (owner, seen) = owner(rx);
    std::thread::sleep(Duration::from_millis(100));
    let listener = UnixListener::bind(&path).unwrap();
    for round in 0..2 {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("\"QMP\""), "round {round}: {greeting}");
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), r#"{"return":{}}"#);
        w.write_all(br#"{"execute":"query-status","id":"q"}"#).unwrap();
        assert_eq!(until_id(&mut r, "q")["return"]["status"], "running");
        server.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
        let ev = until_event(&mut r);
        assert_eq!((ev["event"].as_str(), &ev["data"]["guest"]), (Some("SHUTDOWN"), &json!(true)));
        // The peer goes away: smpft connects again.
    }
    assert_eq!(seen.try_iter().count(), 2);
    server.stop();
    owner.join().unwrap();
}

fn until_event(r: &mut BufReader<UnixStream>) -> Value {
    next_that(r, "an event", |v| v.get("event").is_some())
}

#[test]
fn a_monitor_with_wait_on_waits_for_its_first_client() {
    let (_dir, path, server, _rx) = bound("qmp-wait");
    assert!(!server.wait_for_client(0, Duration::from_millis(20)));
    let c = UnixStream::connect(&path).unwrap();
    assert!(server.wait_for_client(0, Duration::from_secs(30)));
    assert!(!server.wait_for_client(1, Duration::from_millis(1)), "no such endpoint");
    drop(c);
    server.stop();
}
