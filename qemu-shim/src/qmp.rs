//! A QMP (QEMU Machine Protocol) server on a unix socket.
//!
//! Each client gets the greeting, must negotiate with `qmp_capabilities`, then sends one JSON
//! object per line (`{"execute": "...", "arguments": {...}, "id": ...}`) and gets one reply per
//! command (`{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, echoing `id`).
//! Asynchronous events (`{"event": "STOP", "timestamp": {...}}`) go to every negotiated client.

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use shutdown::{Shutdown, Wake};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A command the VM owner must carry out: QEMU's lifecycle commands, typed, and every other
/// command as it came, for the VM owner to parse with its own types (smpft's `x-smpft-*`
/// commands, see [`typed`]), to answer (the QEMU persona answers libvirt's questions this way)
/// or to refuse with `CommandNotFound`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    QueryStatus,
    Stop,
    Cont,
    Quit,
    #[serde(skip)]
    Other {
        name: String,
        args: Map<String, Value>,
    },
}

/// The commands [`Command`] types itself.
const TYPED: [&str; 4] = ["query-status", "stop", "cont", "quit"];

/// `name` with `args` as the serde type `T` (an enum tagged `execute`, its arguments in
/// `arguments`), with QMP's wording for arguments that are missing, unexpected or mistyped.
pub fn typed<T: serde::de::DeserializeOwned>(name: &str, args: &Map<String, Value>) -> Result<T, QmpError> {
    // A command without arguments may be sent with `"arguments": {}` or none, while serde
    // wants none for a unit variant and an object for a struct variant: try both.
    let mut v = json!({"execute": name});
    if !args.is_empty() {
        v["arguments"] = Value::Object(args.clone());
    }
    match serde_json::from_value(v.clone()) {
        Err(e) if args.is_empty() && e.to_string().starts_with("missing field `arguments`") => {
            v["arguments"] = json!({});
            serde_json::from_value(v)
        }
        r => r,
    }
    .map_err(|e| QmpError::generic(qmp_wording(&e.to_string())))
}

/// serde's messages in QEMU's words (libvirt and operators know those).
fn qmp_wording(e: &str) -> String {
    let quoted = |s: &str| s.split('`').nth(1).unwrap_or_default().to_string();
    if e.starts_with("missing field") {
        format!("Parameter '{}' is missing", quoted(e))
    } else if e.starts_with("unknown field") {
        format!("Parameter '{}' is unexpected", quoted(e))
    } else if e.contains("expected unit") {
        "Parameter is unexpected: this command takes no arguments".into()
    } else if let Some(rest) = e.strip_prefix("invalid type: ") {
        format!("Invalid parameter type: {rest}")
    } else {
        format!("Invalid arguments: {e}")
    }
}

/// QMP error classes (as QEMU names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    /// A device the command needs is not there (`balloon` without one).
    DeviceNotActive,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
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
    pub reply: Reply,
}

/// Answers one command. The reply is queued for the client by the thread that answers, so it
/// keeps its place among the events that thread emits (a `quit` reply before its `SHUTDOWN`, a
/// `stop` reply after its `STOP`). A request dropped unanswered gets an error reply.
pub struct Reply {
    client: Arc<Client>,
    id: Option<Value>,
    answered: Arc<AtomicBool>,
    done: Sender<()>,
}

impl Reply {
    pub fn send(self, result: Result<Value, QmpError>) {
        if !self.answered.swap(true, Ordering::SeqCst) {
            self.client.queue(&reply_value(self.id.clone(), result));
        }
        let _ = self.done.send(());
    }
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

/// Output queued for a client beyond this (a client that does not read) disconnects it.
const OUTPUT_MAX: usize = 1 << 20;
/// A line longer than this is refused and the client disconnected.
const LINE_MAX: usize = 1 << 20;
/// How long a client gets to take its last replies and events once the server stops.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// One connected client. Its thread is the only one that touches its socket: replies and events
/// are queued here and written when the socket takes them, so neither the VM owner (emitting an
/// event) nor a stopping server ever waits on a client that does not read.
struct Client {
    out: Mutex<Outbox>,
    wake: Wake,
    negotiated: AtomicBool,
}

#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    overflow: bool,
}

impl Client {
    fn queue(&self, v: &Value) {
        let mut line = v.to_string();
        line.push_str("\r\n");
        let mut o = self.out.lock();
        if o.bytes.len() + line.len() > OUTPUT_MAX {
            o.overflow = true;
        } else {
            o.bytes.extend_from_slice(line.as_bytes());
        }
        drop(o);
        self.wake.notify();
    }

    fn pending(&self) -> bool {
        !self.out.lock().bytes.is_empty()
    }

    /// Writes what the socket takes now; false if the client is gone.
    fn flush(&self, stream: &UnixStream) -> bool {
        let mut o = self.out.lock();
        while !o.bytes.is_empty() {
            match (&*stream).write(&o.bytes) {
                Ok(0) => return false,
                Ok(n) => {
                    o.bytes.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

struct Shared {
    clients: Mutex<Vec<Arc<Client>>>,
    shutdown: Shutdown,
    version: String,
}

pub struct QmpServer {
    shared: Arc<Shared>,
    /// The socket file to remove at the end (none for an inherited socket).
    path: Option<PathBuf>,
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
        Self::serve_listener(listener, Some(path.to_path_buf()), version, listen_err)
    }

    /// Serves on a listening unix socket inherited from whoever started smpft (libvirt passes
    /// its monitor socket as `-chardev socket,fd=N`). The socket file is not smpft's to remove.
    pub fn from_fd(fd: std::os::fd::RawFd, version: &str) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        let path = PathBuf::from(format!("fd:{fd}"));
        let listen_err = |source| ServerError::Listen { path: path.clone(), source };
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `kind`; a descriptor that is not a socket fails.
        let r =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&raw mut kind).cast(), &mut len) };
        if r != 0 || kind == 0 {
            return Err(listen_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a listening socket")));
        }
        // SAFETY: the descriptor was handed to this process for the monitor; the listener owns it.
        let listener = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Self::serve_listener(listener, None, version, listen_err)
    }

    fn serve_listener(
        listener: UnixListener,
        path: Option<PathBuf>,
        version: &str,
        listen_err: impl Fn(std::io::Error) -> ServerError,
    ) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            clients: Mutex::new(Vec::new()),
            shutdown: Shutdown::new().map_err(&listen_err)?,
            version: version.into(),
        });
        let client_threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let shared = shared.clone();
            let threads = client_threads.clone();
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(&listener, &shared, &tx, &threads))
                .map_err(&listen_err)?
        };
        Ok((QmpServer { shared, path, accept: Some(accept), client_threads }, rx))
    }

    /// Queues an event for every client that has negotiated capabilities. Never blocks.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        self.emitter().emit(event, data);
    }

    /// A handle that emits events on this server from any thread (to no one once it stopped).
    pub fn emitter(&self) -> Emitter {
        Emitter(self.shared.clone())
    }

    /// Stops accepting, answers every command still waiting with an error, gives each client
    /// [`FLUSH_GRACE`] to take what is queued for it, disconnects them all and joins every
    /// server thread. Bounded whatever the clients do.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.shutdown.fire();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in self.client_threads.lock().drain(..) {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Emits events on a [`QmpServer`]'s clients (see [`QmpServer::emitter`]).
#[derive(Clone)]
pub struct Emitter(Arc<Shared>);

impl Emitter {
    /// Queues an event for every client that has negotiated capabilities. Never blocks.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut v = json!({
            "event": event,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let Some(d) = data {
            v["data"] = d;
        }
        for c in self.0.clients.lock().iter() {
            if c.negotiated.load(Ordering::SeqCst) {
                c.queue(&v);
            }
        }
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
    shared: &Arc<Shared>,
    tx: &Sender<Request>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: shared.shutdown.fd(), events: libc::POLLIN, revents: 0 },
        ];
        if shutdown::poll(&mut fds, None).is_err() || fds[1].revents != 0 {
            return;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        let Ok(wake) = Wake::new() else { continue };
        let client = Arc::new(Client { out: Mutex::new(Outbox::default()), wake, negotiated: AtomicBool::new(false) });
        shared.clients.lock().push(client.clone());
        let (shared2, tx) = (shared.clone(), tx.clone());
        let t = std::thread::Builder::new().name("qmp-client".into()).spawn(move || {
            serve(&stream, &client, &shared2, &tx);
            shared2.clients.lock().retain(|c| !Arc::ptr_eq(c, &client));
        });
        match t {
            Ok(t) => {
                let mut ts = threads.lock();
                ts.retain(|t| !t.is_finished());
                ts.push(t);
            }
            Err(e) => {
                tracing::warn!("QMP: cannot serve a new client: {e}");
                shared.clients.lock().pop();
            }
        }
    }
}

/// One client's thread: reads lines, answers them, writes replies and events as the socket
/// takes them; returns when the client leaves, misbehaves, or the server stops.
fn serve(stream: &UnixStream, client: &Arc<Client>, shared: &Shared, tx: &Sender<Request>) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    client.queue(&json!({"QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": shared.version},
        "capabilities": []
    }}));
    let mut input: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = input.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            if !line.trim().is_empty() {
                if let Some(reply) = handle_line(line.trim(), client, tx, &shared.shutdown) {
                    client.queue(&reply);
                }
            }
        }
        if input.len() > LINE_MAX {
            client
                .queue(&error_reply(None, &QmpError::generic(format!("QMP input line longer than {LINE_MAX} bytes"))));
            eof = true;
            input.clear();
        }
        if !client.flush(stream) {
            return;
        }
        if client.out.lock().overflow {
            tracing::warn!("QMP: a client that does not read its replies was disconnected");
            return;
        }
        if shared.shutdown.is_fired() {
            let rest = std::mem::take(&mut client.out.lock().bytes);
            let _ = shutdown::write_all(stream.as_raw_fd(), &rest, &shared.shutdown, FLUSH_GRACE);
            return;
        }
        if eof && !client.pending() {
            return;
        }
        let mut events = if eof { 0 } else { libc::POLLIN };
        if client.pending() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd { fd: stream.as_raw_fd(), events, revents: 0 },
            libc::pollfd { fd: client.wake.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: shared.shutdown.fd(), events: libc::POLLIN, revents: 0 },
        ];
        if shutdown::poll(&mut fds, None).is_err() {
            return;
        }
        if fds[1].revents != 0 {
            client.wake.clear();
        }
        if !eof && fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            eof = !read_available(stream, &mut input);
        }
    }
}

/// Reads what the non-blocking `stream` has; false at end of input or on an error.
fn read_available(mut stream: &UnixStream, input: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Parses and executes one line; returns the reply to queue, unless whoever answered the
/// command queued it already.
fn handle_line(line: &str, client: &Arc<Client>, tx: &Sender<Request>, shutdown: &Shutdown) -> Option<Value> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Some(error_reply(None, &QmpError::generic(format!("JSON parse error, {e}")))),
    };
    let id = v.get("id").cloned();
    let result = parse_command(&v, client.negotiated.load(Ordering::SeqCst));
    let result = match result {
        Err(e) => Err(e),
        Ok(None) => {
            client.negotiated.store(true, Ordering::SeqCst);
            Ok(json!({}))
        }
        Ok(Some(command)) => return execute(command, id, client, tx, shutdown),
    };
    Some(reply_value(id, result))
}

fn reply_value(id: Option<Value>, result: Result<Value, QmpError>) -> Value {
    match result {
        Ok(ret) => {
            let mut r = json!({"return": ret});
            if let Some(id) = id {
                r["id"] = id;
            }
            r
        }
        Err(e) => error_reply(id, &e),
    }
}

/// Hands `command` to the VM owner and waits until it has queued its answer, or until the
/// server stops; the reply this returns (if any) is the error for a command left unanswered.
fn execute(
    command: Command,
    id: Option<Value>,
    client: &Arc<Client>,
    tx: &Sender<Request>,
    shutdown: &Shutdown,
) -> Option<Value> {
    let answered = Arc::new(AtomicBool::new(false));
    let unanswered = || {
        (!answered.swap(true, Ordering::SeqCst))
            .then(|| reply_value(id.clone(), Err(QmpError::generic("the VM is shutting down"))))
    };
    if shutdown.is_fired() {
        return unanswered();
    }
    let (done, done_rx) = crossbeam_channel::bounded(1);
    let reply = Reply { client: client.clone(), id: id.clone(), answered: answered.clone(), done };
    if tx.send(Request { command, reply }).is_err() {
        return unanswered();
    }
    crossbeam_channel::select! {
        recv(done_rx) -> r => match r {
            Ok(()) => None,
            Err(_) => unanswered(),
        },
        recv(shutdown.channel()) -> _ => unanswered(),
    }
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
    match name {
        "qmp_capabilities" => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        typed_name if TYPED.contains(&typed_name) => typed(name, args).map(Some),
        other => Ok(Some(Command::Other { name: other.to_string(), args: args.clone() })),
    }
}

/// The reply to a command nobody here implements.
pub fn not_found(name: &str) -> QmpError {
    QmpError { class: ErrorClass::CommandNotFound, desc: format!("The command {name} has not been found") }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            typed::<Own>("x-do", &args(r#"{"file":"a","x":1}"#)).unwrap_err().desc,
            "Parameter 'x' is unexpected"
        );
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
    fn server_round_trip_and_malformed_input() {
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
    fn an_endless_line_is_refused() {
        let (_dir, path, server, _rx) = bound("qmp-long");
        let (mut r, mut w) = negotiate(&path);
        let junk = vec![b'x'; LINE_MAX + 10];
        let _ = w.write_all(&junk);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("longer than"), "{line}");
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap_or(0), 0, "the client is disconnected");
        server.stop();
    }
}
