//! A QMP (QEMU Machine Protocol) server on unix sockets.
//!
//! Each client gets the greeting, must negotiate with `qmp_capabilities`, then sends JSON
//! objects (`{"execute": "...", "arguments": {...}, "id": ...}`) as a stream, as QEMU reads them
//! (no newline needed, see [`stream`]), and gets one reply line per command (`{"return": ...}`
//! or `{"error": {"class": ..., "desc": ...}}`, echoing `id`). Asynchronous events
//! (`{"event": "STOP", "timestamp": {...}}`) go to every negotiated client.
//!
//! One server serves every monitor a VM has: sockets it listens on (a path, or a listening
//! socket inherited from libvirt) and sockets it connects to itself (QEMU's `server=off`
//! chardevs, as Proxmox VE's `qmeventd` expects), reconnecting as QEMU does.
//! `human-monitor-command` is lowered to the QMP command it stands for here ([`hmp`]).

pub mod hmp;
pub mod stream;

pub use stream::{JsonStream, StreamError, VALUE_MAX};

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
    /// The command came as `human-monitor-command`: the answer is printed so.
    hmp: Option<hmp::Output>,
}

impl Reply {
    pub fn send(self, result: Result<Value, QmpError>) {
        if !self.answered.swap(true, Ordering::SeqCst) {
            let result = match self.hmp {
                Some(output) => hmp::render(output, result),
                None => result,
            };
            self.client.queue(&reply_value(self.id.clone(), result));
        }
        let _ = self.done.send(());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on QMP socket {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot connect to the monitor socket {path}")]
    Connect { path: PathBuf, source: std::io::Error },
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
/// The most bytes read from a client before what was read is handled.
const READ_BATCH: usize = 64 << 10;
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
    /// Clients served so far, by endpoint (for a monitor with `wait=on`).
    connected: Mutex<Vec<u64>>,
    connected_cv: parking_lot::Condvar,
}

pub struct QmpServer {
    shared: Arc<Shared>,
    requests: Sender<Request>,
    /// The socket files to remove at the end (not inherited sockets').
    paths: Vec<PathBuf>,
    /// The accepting and connecting threads.
    endpoints: Vec<JoinHandle<()>>,
    client_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stopped: bool,
}

impl QmpServer {
    /// A server with no socket yet: add them with [`QmpServer::listen`], [`QmpServer::listen_fd`]
    /// and [`QmpServer::connect`]. `version` is reported in the greeting's `package` field.
    pub fn new(version: &str) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shutdown = Shutdown::new().map_err(|source| ServerError::Listen { path: PathBuf::new(), source })?;
        let shared = Arc::new(Shared {
            clients: Mutex::new(Vec::new()),
            shutdown,
            version: version.into(),
            connected: Mutex::new(Vec::new()),
            connected_cv: parking_lot::Condvar::new(),
        });
        let server = QmpServer {
            shared,
            requests: tx,
            paths: Vec::new(),
            endpoints: Vec::new(),
            client_threads: Arc::new(Mutex::new(Vec::new())),
            stopped: false,
        };
        Ok((server, rx))
    }

    /// A server listening on `path` (see [`QmpServer::listen`]).
    pub fn bind(path: &Path, version: &str) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        let (mut server, rx) = Self::new(version)?;
        server.listen(path)?;
        Ok((server, rx))
    }

    /// A server on a listening socket inherited from whoever started smpft (see
    /// [`QmpServer::listen_fd`]).
    pub fn from_fd(fd: std::os::fd::RawFd, version: &str) -> Result<(QmpServer, Receiver<Request>), ServerError> {
        let (mut server, rx) = Self::new(version)?;
        server.listen_fd(fd)?;
        Ok((server, rx))
    }

    /// Listens on `path` too (a stale socket there is replaced; the file is removed at the end).
    /// Returns the endpoint's number (for [`QmpServer::wait_for_client`]).
    pub fn listen(&mut self, path: &Path) -> Result<usize, ServerError> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(path);
        }
        let listen_err = |source| ServerError::Listen { path: path.to_path_buf(), source };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        self.paths.push(path.to_path_buf());
        self.serve_listener(listener).map_err(listen_err)
    }

    /// Serves on a listening unix socket inherited from whoever started smpft too (libvirt
    /// passes its monitor socket as `-chardev socket,fd=N`). The socket file is not smpft's to
    /// remove. Returns the endpoint's number.
    pub fn listen_fd(&mut self, fd: std::os::fd::RawFd) -> Result<usize, ServerError> {
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
        self.serve_listener(listener).map_err(listen_err)
    }

    fn serve_listener(&mut self, listener: UnixListener) -> std::io::Result<usize> {
        let endpoint = self.new_endpoint();
        let (shared, tx, threads) = (self.shared.clone(), self.requests.clone(), self.client_threads.clone());
        let t = std::thread::Builder::new().name("qmp-accept".into()).spawn(move || {
            confine::enter(confine::Kind::Qmp);
            accept_loop(&listener, endpoint, &shared, &tx, &threads)
        })?;
        self.endpoints.push(t);
        Ok(endpoint)
    }

    fn new_endpoint(&self) -> usize {
        let mut c = self.shared.connected.lock();
        c.push(0);
        c.len() - 1
    }

    /// Connects to a client's listening socket at `path` and serves it as a monitor (QEMU's
    /// `-chardev socket,server=off`): the greeting, commands, events. Without `reconnect` the
    /// first connection must succeed now and is not made again once it closes; with it, a
    /// connection that fails or closes is tried again every `reconnect`, as QEMU's
    /// `reconnect-ms=` does, and the first one may come later. Returns the endpoint's number.
    pub fn connect(&mut self, path: &Path, reconnect: Option<Duration>) -> Result<usize, ServerError> {
        let connect_err = |source| ServerError::Connect { path: path.to_path_buf(), source };
        let first = match reconnect {
            None => Some(UnixStream::connect(path).map_err(connect_err)?),
            Some(_) => None,
        };
        let endpoint = self.new_endpoint();
        let (shared, tx, path2) = (self.shared.clone(), self.requests.clone(), path.to_path_buf());
        let t = std::thread::Builder::new()
            .name("qmp-connect".into())
            .spawn(move || {
                confine::enter(confine::Kind::Qmp);
                connect_loop(&path2, reconnect, first, endpoint, &shared, &tx)
            })
            .map_err(connect_err)?;
        self.endpoints.push(t);
        Ok(endpoint)
    }

    /// Waits until a first client has connected to `endpoint` (a monitor with `wait=on`), for
    /// at most `within`; whether one has.
    pub fn wait_for_client(&self, endpoint: usize, within: Duration) -> bool {
        let served = |c: &Vec<u64>| c.get(endpoint).is_some_and(|n| *n > 0);
        let mut c = self.shared.connected.lock();
        if !served(&c) {
            self.shared.connected_cv.wait_for(&mut c, within);
        }
        served(&c)
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
        self.stopped = true;
        self.shared.shutdown.fire();
        for t in self.endpoints.drain(..) {
            let _ = t.join();
        }
        for t in self.client_threads.lock().drain(..) {
            let _ = t.join();
        }
        for p in &self.paths {
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
        if !self.stopped {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    endpoint: usize,
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
        let (shared2, tx) = (shared.clone(), tx.clone());
        let t = std::thread::Builder::new()
            .name("qmp-client".into())
            .spawn(move || serve_client(&stream, endpoint, &shared2, &tx));
        match t {
            Ok(t) => {
                let mut ts = threads.lock();
                ts.retain(|t| !t.is_finished());
                ts.push(t);
            }
            Err(e) => tracing::warn!("QMP: cannot serve a new client: {e}"),
        }
    }
}

/// Serves one connection, from its greeting until it closes or the server stops.
fn serve_client(stream: &UnixStream, endpoint: usize, shared: &Shared, tx: &Sender<Request>) {
    let Ok(wake) = Wake::new() else { return };
    let client = Arc::new(Client { out: Mutex::new(Outbox::default()), wake, negotiated: AtomicBool::new(false) });
    shared.clients.lock().push(client.clone());
    if let Some(n) = shared.connected.lock().get_mut(endpoint) {
        *n += 1;
    }
    shared.connected_cv.notify_all();
    serve(stream, &client, shared, tx);
    shared.clients.lock().retain(|c| !Arc::ptr_eq(c, &client));
}

/// A monitor smpft connects out to: served while connected, then connected again every
/// `reconnect` (if given) until the server stops. A connection that cannot be made is tried
/// again quietly, as QEMU does; the first failure and every new connection are logged.
fn connect_loop(
    path: &Path,
    reconnect: Option<Duration>,
    mut next: Option<UnixStream>,
    endpoint: usize,
    shared: &Shared,
    tx: &Sender<Request>,
) {
    let mut told = false;
    loop {
        if next.is_none() {
            match UnixStream::connect(path) {
                Ok(s) => next = Some(s),
                Err(e) if !told => {
                    tracing::info!("QMP: cannot connect to the monitor socket {}: {e}; trying again", path.display());
                    told = true;
                }
                Err(_) => {}
            }
        }
        if let Some(stream) = next.take() {
            tracing::info!("QMP: connected to the monitor socket {}", path.display());
            told = false;
            serve_client(&stream, endpoint, shared, tx);
            if !shared.shutdown.is_fired() {
                tracing::info!("QMP: the monitor connection to {} closed", path.display());
            }
        }
        let Some(every) = reconnect else { return };
        if shared.shutdown.wait_timeout(every) {
            return;
        }
    }
}

/// One client's thread: reads commands, answers them, writes replies and events as the socket
/// takes them; returns when the client leaves, misbehaves, or the server stops.
fn serve(stream: &UnixStream, client: &Arc<Client>, shared: &Shared, tx: &Sender<Request>) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    client.queue(&json!({"QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": shared.version},
        "capabilities": []
    }}));
    let mut input = JsonStream::new();
    let mut eof = false;
    loop {
        while let Some(value) = input.next_value() {
            match value {
                Ok(v) => {
                    if let Some(reply) = handle_value(&v, client, tx, &shared.shutdown) {
                        client.queue(&reply);
                    }
                }
                // No telling where the next value would start: the client is told and let go.
                Err(e) => {
                    tracing::warn!("QMP: a client sent input that is not JSON and was disconnected: {e}");
                    client.queue(&error_reply(None, &QmpError::generic(e.to_string())));
                    eof = true;
                }
            }
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

/// Reads what the non-blocking `stream` has (up to [`READ_BATCH`] bytes); false at end of
/// input or on an error.
fn read_available(mut stream: &UnixStream, input: &mut JsonStream) -> bool {
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < READ_BATCH {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                input.push(&buf[..n]);
                read += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Executes one input value; returns the reply to queue, unless whoever answered the command
/// queued it already.
fn handle_value(v: &Value, client: &Arc<Client>, tx: &Sender<Request>, shutdown: &Shutdown) -> Option<Value> {
    let id = v.get("id").cloned();
    let result = parse_command(v, client.negotiated.load(Ordering::SeqCst));
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
    // HMP is carried out as the QMP command it stands for; a line smpft does not implement is
    // refused here.
    let (command, hmp) = match command {
        Command::Other { name, args } if name == "human-monitor-command" => match hmp::lower(&args) {
            Ok((command, output)) => (command, Some(output)),
            Err(e) => return Some(reply_value(id, Err(e))),
        },
        command => (command, None),
    };
    let (done, done_rx) = crossbeam_channel::bounded(1);
    let reply = Reply { client: client.clone(), id: id.clone(), answered: answered.clone(), done, hmp };
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
mod tests;
