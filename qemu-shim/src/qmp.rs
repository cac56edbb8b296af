//! A QMP (QEMU Machine Protocol) server on a unix socket.
//!
//! Each client gets the greeting, must negotiate with `qmp_capabilities`, then sends one JSON
//! object per line (`{"execute": "...", "arguments": {...}, "id": ...}`) and gets one reply per
//! command (`{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, echoing `id`).
//! Asynchronous events (`{"event": "STOP", "timestamp": {...}}`) go to every negotiated client.

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A command the VM owner must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    QueryStatus,
    Stop,
    Cont,
    Quit,
    /// `x-smpft-snapshot`: write a snapshot to `file`, incremental on the previous one if asked.
    Snapshot {
        file: PathBuf,
        incremental: bool,
    },
    /// `x-smpft-query-ft`: the fault-tolerance role, state and figures.
    QueryFt,
    /// `x-smpft-protect`: attach a standby at `peer` (host:port) to this unprotected VM.
    Protect {
        peer: String,
    },
}

/// QMP error classes (as QEMU names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }
}

/// A command from a client, with where to send the reply.
pub struct Request {
    pub command: Command,
    pub reply: Sender<Result<Value, QmpError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on QMP socket {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("'{0}' is not a QMP address; use unix:PATH")]
    Address(String),
}

/// Parses `unix:PATH` (QEMU's `,server` / `,wait=off` / `,nowait` suffixes are accepted and
/// ignored: smpft always listens and never waits).
pub fn parse_address(s: &str) -> Result<PathBuf, ServerError> {
    let rest = s.strip_prefix("unix:").ok_or_else(|| ServerError::Address(s.into()))?;
    let path = rest.split(',').next().unwrap_or("");
    for opt in rest.split(',').skip(1) {
        if !matches!(opt, "server" | "server=on" | "nowait" | "wait=off") {
            return Err(ServerError::Address(s.into()));
        }
    }
    if path.is_empty() {
        return Err(ServerError::Address(s.into()));
    }
    Ok(PathBuf::from(path))
}

/// How long a client waits for the VM owner to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

struct Client {
    writer: Mutex<UnixStream>,
    negotiated: AtomicBool,
}

impl Client {
    fn send(&self, v: &Value) -> std::io::Result<()> {
        let mut line = v.to_string();
        line.push_str("\r\n");
        self.writer.lock().write_all(line.as_bytes())
    }
}

struct Shared {
    clients: Mutex<Vec<Arc<Client>>>,
    stopping: AtomicBool,
    version: String,
}

pub struct QmpServer {
    shared: Arc<Shared>,
    path: PathBuf,
    wake: UnixStream,
    accept: Option<JoinHandle<()>>,
    client_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl QmpServer {
    /// Listens on `path` (a stale socket there is replaced). `version` is reported in the
    /// greeting's `package` field.
    pub fn bind(path: &Path, version: &str) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(path);
        }
        let listen_err = |source| ServerError::Listen { path: path.to_path_buf(), source };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(listen_err)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            clients: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            version: version.into(),
        });
        let client_threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let shared = shared.clone();
            let threads = client_threads.clone();
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(&listener, &wake_rx, &shared, &tx, &threads))
                .map_err(listen_err)?
        };
        Ok((QmpServer { shared, path: path.to_path_buf(), wake, accept: Some(accept), client_threads }, rx))
    }

    /// Sends an event to every client that has negotiated capabilities.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut v = json!({
            "event": event,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let Some(d) = data {
            v["data"] = d;
        }
        for c in self.shared.clients.lock().iter() {
            if c.negotiated.load(Ordering::SeqCst) {
                let _ = c.send(&v);
            }
        }
    }

    /// Stops accepting, disconnects every client and joins every server thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.wake.write_all(b"x");
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.shared.clients.lock().iter() {
            let _ = c.writer.lock().shutdown(std::net::Shutdown::Both);
        }
        for t in self.client_threads.lock().drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    wake: &UnixStream,
    shared: &Arc<Shared>,
    tx: &Sender<Request>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        let Ok(writer) = stream.try_clone() else { continue };
        let client = Arc::new(Client { writer: Mutex::new(writer), negotiated: AtomicBool::new(false) });
        shared.clients.lock().push(client.clone());
        let (shared, tx) = (shared.clone(), tx.clone());
        let t = std::thread::Builder::new().name("qmp-client".into()).spawn(move || {
            serve(stream, &client, &shared, &tx);
            shared.clients.lock().retain(|c| !Arc::ptr_eq(c, &client));
        });
        if let Ok(t) = t {
            let mut ts = threads.lock();
            ts.retain(|t| !t.is_finished());
            ts.push(t);
        }
    }
}

fn serve(stream: UnixStream, client: &Client, shared: &Shared, tx: &Sender<Request>) {
    let greeting = json!({"QMP": {
        "version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": shared.version},
        "capabilities": []
    }});
    if client.send(&greeting).is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let (reply, quit) = handle_line(line.trim(), client, tx);
        if client.send(&reply).is_err() || quit || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Parses and executes one line; returns the reply and whether the client asked to quit.
fn handle_line(line: &str, client: &Client, tx: &Sender<Request>) -> (Value, bool) {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return (error_reply(None, &QmpError::generic(format!("JSON parse error, {e}"))), false),
    };
    let id = v.get("id").cloned();
    let result = parse_command(&v, client.negotiated.load(Ordering::SeqCst));
    let (result, quit) = match result {
        Err(e) => (Err(e), false),
        Ok(None) => {
            client.negotiated.store(true, Ordering::SeqCst);
            (Ok(json!({})), false)
        }
        Ok(Some(command)) => {
            let quit = command == Command::Quit;
            let (rtx, rrx) = crossbeam_channel::bounded(1);
            let sent = tx.send(Request { command, reply: rtx });
            let r = match sent {
                Err(_) => Err(QmpError::generic("the VM is shutting down")),
                Ok(()) => rrx
                    .recv_timeout(REPLY_TIMEOUT)
                    .unwrap_or_else(|_| Err(QmpError::generic("the VM did not answer the command"))),
            };
            (r, quit)
        }
    };
    let reply = match result {
        Ok(ret) => {
            let mut r = json!({"return": ret});
            if let Some(id) = id {
                r["id"] = id;
            }
            r
        }
        Err(e) => error_reply(id, &e),
    };
    (reply, quit)
}

fn error_reply(id: Option<Value>, e: &QmpError) -> Value {
    let mut r = json!({"error": {"class": e.class.as_str(), "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

/// Turns a QMP input object into a command (`None` for `qmp_capabilities`).
pub fn parse_command(v: &Value, negotiated: bool) -> Result<Option<Command>, QmpError> {
    let obj = v.as_object().ok_or_else(|| QmpError::generic("QMP input must be a JSON object"))?;
    let name = match obj.get("execute") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(QmpError::generic("QMP input member 'execute' must be a string")),
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
    };
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id")) {
        return Err(QmpError::generic(format!("QMP input member '{k}' is unexpected")));
    }
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err(QmpError::generic("QMP input member 'arguments' must be an object")),
    };
    if !negotiated {
        if name == "qmp_capabilities" {
            return Ok(None);
        }
        return Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        });
    }
    let no_args = |cmd: Command| {
        if let Some(k) = args.keys().next() {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        Ok(Some(cmd))
    };
    match name {
        "qmp_capabilities" => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        "query-status" => no_args(Command::QueryStatus),
        "stop" => no_args(Command::Stop),
        "cont" => no_args(Command::Cont),
        "quit" => no_args(Command::Quit),
        "x-smpft-snapshot" => {
            if let Some(k) = args.keys().find(|k| !matches!(k.as_str(), "file" | "incremental")) {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
            let file = match args.get("file") {
                Some(Value::String(f)) if !f.is_empty() => PathBuf::from(f),
                Some(_) => return Err(QmpError::generic("Invalid parameter type for 'file', expected: string")),
                None => return Err(QmpError::generic("Parameter 'file' is missing")),
            };
            let incremental = match args.get("incremental") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(QmpError::generic("Invalid parameter type for 'incremental', expected: boolean"))
                }
            };
            Ok(Some(Command::Snapshot { file, incremental }))
        }
        "x-smpft-query-ft" => no_args(Command::QueryFt),
        "x-smpft-protect" => {
            if let Some(k) = args.keys().find(|k| k.as_str() != "peer") {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
            match args.get("peer") {
                Some(Value::String(p)) if !p.is_empty() => Ok(Some(Command::Protect { peer: p.clone() })),
                Some(_) => Err(QmpError::generic("Invalid parameter type for 'peer', expected: string")),
                None => Err(QmpError::generic("Parameter 'peer' is missing")),
            }
        }
        other => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {other} has not been found"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            cmd(r#"{"execute":"x-smpft-snapshot","arguments":{"file":"/tmp/a","incremental":true}}"#, true),
            Ok(Some(Command::Snapshot { file: "/tmp/a".into(), incremental: true }))
        );
        assert_eq!(
            cmd(r#"{"execute":"x-smpft-snapshot","arguments":{}}"#, true).unwrap_err().desc,
            "Parameter 'file' is missing"
        );
        assert!(cmd(r#"{"execute":"x-smpft-snapshot","arguments":{"file":1}}"#, true).is_err());
        assert!(cmd(r#"{"execute":"x-smpft-snapshot","arguments":{"file":"a","incremental":"yes"}}"#, true).is_err());
        assert!(cmd(r#"{"execute":"stop","arguments":{"now":true}}"#, true).is_err());
        assert_eq!(cmd(r#"{"execute":"frobnicate"}"#, true).unwrap_err().class, ErrorClass::CommandNotFound);
        assert!(cmd(r#"[1,2]"#, true).is_err());
        assert!(cmd(r#"{"arguments":{}}"#, true).is_err());
        assert!(cmd(r#"{"execute":"stop","bogus":1}"#, true).is_err());
        assert_eq!(cmd(r#"{"execute":"x-smpft-query-ft"}"#, true), Ok(Some(Command::QueryFt)));
        assert_eq!(
            cmd(r#"{"execute":"x-smpft-protect","arguments":{"peer":"10.0.0.2:7400"}}"#, true),
            Ok(Some(Command::Protect { peer: "10.0.0.2:7400".into() }))
        );
        assert!(cmd(r#"{"execute":"x-smpft-protect","arguments":{}}"#, true).is_err());
        assert!(cmd(r#"{"execute":"x-smpft-protect","arguments":{"peer":7}}"#, true).is_err());
        assert!(cmd(r#"{"execute":"x-smpft-protect","arguments":{"peer":"a:1","x":1}}"#, true).is_err());
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
    fn server_round_trip_and_malformed_input() {
        let dir = std::env::temp_dir().join(format!("qmp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let (server, rx) = QmpServer::bind(&path, "test").unwrap();
        let owner = std::thread::spawn(move || {
            let req = rx.recv().unwrap();
            assert_eq!(req.command, Command::QueryStatus);
            req.reply.send(Ok(json!({"status": "running", "running": true}))).unwrap();
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
        w.write_all(b"{not json\n").unwrap();
        assert!(next(&mut r)["error"]["desc"].as_str().unwrap().starts_with("JSON parse error"));
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
        assert_eq!(next(&mut r), json!({"return": {}}));
        w.write_all(b"{\"execute\":\"query-status\",\"id\":\"a\"}\n").unwrap();
        assert_eq!(next(&mut r), json!({"return": {"status": "running", "running": true}, "id": "a"}));
        server.emit("STOP", None);
        assert_eq!(next(&mut r)["event"], "STOP");
        owner.join().unwrap();
        server.stop();
        assert!(!path.exists());
    }
}
