//! COM1: a 16550 UART (vm-superio) and the host side it is wired to (`--serial`).
//!
//! Output from the guest goes through an [`OutputQueue`] drained by its own thread, so a vCPU
//! never blocks on a slow reader; this queue is the seam where output commit will hold bytes
//! until a checkpoint is acknowledged. Input is fed into the UART's 16-byte FIFO by an I/O thread
//! that stops reading from the host while the FIFO is full (no byte is dropped) and resumes when
//! the guest reads.

use super::gate::{OutputGate, OutputPort};
use crate::component::{self, Component, ComponentError};
use crate::irq::Irq;
use crate::layout::COM1_IRQ;
use parking_lot::{Condvar, Mutex};
use shutdown::{Shutdown, WriteEnd};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where COM1 is connected on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Standard input and output of smpft.
    Stdio,
    /// A unix socket smpft listens on; one client at a time, a new client replaces the old.
    Unix(PathBuf),
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    Null,
    /// A pseudo-terminal smpft creates (what `virsh console` attaches to); its path is logged
    /// and reported by [`SerialBackend::pty_path`]. Output nobody reads is dropped, as on a
    /// serial line with nothing plugged in.
    Pty,
}

impl std::str::FromStr for SerialSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str, kind: &str| {
            if p.is_empty() {
                Err(format!("'{kind}:' needs a path, e.g. {kind}:/run/vm.sock"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once(':') {
            None if s == "stdio" => Ok(SerialSpec::Stdio),
            None if s == "null" || s == "none" => Ok(SerialSpec::Null),
            None if s == "pty" => Ok(SerialSpec::Pty),
            Some(("unix", p)) => path(p, "unix").map(SerialSpec::Unix),
            Some(("file", p)) => path(p, "file").map(SerialSpec::File),
            _ => Err(format!("'{s}' is not a serial backend; use stdio, unix:PATH, file:PATH, pty or null")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot listen on serial socket {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot open serial output file {path}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot create serial event")]
    Event(#[source] std::io::Error),
    #[error("bad serial state: {0}")]
    State(String),
    #[error("cannot create a pseudo-terminal for the serial port")]
    Pty(#[source] std::io::Error),
}

/// Serial output not yet written to the host side.
pub struct OutputQueue {
    inner: Mutex<OutputInner>,
    cv: Condvar,
}

struct OutputInner {
    bytes: Vec<u8>,
    closed: bool,
    dropped: u64,
}

/// Bytes beyond this (a reader that does not keep up) are dropped and counted.
const OUTPUT_MAX: usize = 4 << 20;

impl OutputQueue {
    fn new() -> Arc<Self> {
        Arc::new(OutputQueue {
            inner: Mutex::new(OutputInner { bytes: Vec::new(), closed: false, dropped: 0 }),
            cv: Condvar::new(),
        })
    }

    pub fn push(&self, data: &[u8]) {
        let mut q = self.inner.lock();
        let room = OUTPUT_MAX.saturating_sub(q.bytes.len());
        if data.len() > room {
            q.dropped += (data.len() - room) as u64;
        }
        let was_empty = q.bytes.is_empty();
        q.bytes.extend_from_slice(&data[..data.len().min(room)]);
        if was_empty {
            self.cv.notify_one();
        }
    }

    /// Blocks until there is output (returned) or the queue is closed and drained (`None`).
    fn take(&self) -> Option<Vec<u8>> {
        let mut q = self.inner.lock();
        while q.bytes.is_empty() && !q.closed {
            self.cv.wait(&mut q);
        }
        if q.bytes.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut q.bytes))
        }
    }

    fn close(&self) {
        self.inner.lock().closed = true;
        self.cv.notify_all();
    }

    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }
}

impl OutputPort for OutputQueue {
    fn deliver(&self, data: &[u8]) {
        self.push(data);
    }
}

/// The UART's transmit side: every byte passes the output gate on its way to the queue.
struct Sink {
    gate: Arc<OutputGate>,
    port: Arc<dyn OutputPort>,
}

impl Sink {
    fn new(gate: &Arc<OutputGate>, output: &Arc<OutputQueue>) -> Sink {
        Sink { gate: gate.clone(), port: output.clone() }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gate.emit(&self.port, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises COM1's interrupt (an edge on IRQ 4), synchronously (see `vmm::irq`). `None` in
/// tests and fuzzing, where no VM takes interrupts.
#[derive(Clone)]
pub struct IrqTrigger(Option<Arc<Irq>>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        if let Some(irq) = &self.0 {
            irq.pulse(COM1_IRQ);
        }
        Ok(())
    }
}

/// Tells the input thread when the guest has made room in the receive FIFO.
struct InputRoom {
    event: EventFd,
    /// The input thread is waiting for room.
    waiting: AtomicBool,
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.event.write(1);
        }
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

type Uart = Serial<IrqTrigger, Arc<InputRoom>, Sink>;

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    fn from_state(s: &SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }

    fn to_state(&self) -> SerialState {
        let r = self.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

pub struct SerialDevice {
    uart: Mutex<Uart>,
    irq: IrqTrigger,
    room: Arc<InputRoom>,
    output: Arc<OutputQueue>,
    gate: Arc<OutputGate>,
    received: AtomicU64,
    /// While the VM is paused no input enters the FIFO, so saved state is one instant.
    input_paused: AtomicBool,
}

impl SerialDevice {
    pub fn new(irq: Option<Arc<Irq>>, gate: Arc<OutputGate>) -> Result<Arc<Self>, SerialError> {
        let irq = IrqTrigger(irq);
        let room = Arc::new(InputRoom {
            event: EventFd::new(EFD_NONBLOCK).map_err(SerialError::Event)?,
            waiting: AtomicBool::new(false),
        });
        let output = OutputQueue::new();
        let trigger = irq.clone();
        let uart = Serial::with_events(trigger, room.clone(), Sink::new(&gate, &output));
        Ok(Arc::new(SerialDevice {
            uart: Mutex::new(uart),
            irq,
            room,
            output,
            gate,
            received: AtomicU64::new(0),
            input_paused: AtomicBool::new(false),
        }))
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from_state(&self.uart.lock().state())
    }

    pub fn restore_snapshot(&self, snap: &SerialSnapshot) -> Result<(), SerialError> {
        let trigger = self.irq.clone();
        let uart =
            Serial::from_state(&snap.to_state(), trigger, self.room.clone(), Sink::new(&self.gate, &self.output))
                .map_err(|e| SerialError::State(format!("{e:?}")))?;
        *self.uart.lock() = uart;
        Ok(())
    }

    pub fn read(&self, offset: u8) -> u8 {
        self.uart.lock().read(offset)
    }

    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = self.uart.lock().write(offset, value) {
            tracing::warn!("serial: {e:?}");
        }
    }

    /// Puts as much of `bytes` into the receive FIFO as fits; returns how much that was.
    /// When not all fit, [`Self::room_event`] fires once the guest has read.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock();
        let n = if uart.fifo_capacity() == 0 || self.input_paused.load(Ordering::SeqCst) {
            0
        } else {
            uart.enqueue_raw_bytes(bytes).unwrap_or(0)
        };
        if n < bytes.len() {
            self.room.waiting.store(true, Ordering::SeqCst);
        }
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    pub fn room_event(&self) -> &EventFd {
        &self.room.event
    }

    pub fn output(&self) -> &Arc<OutputQueue> {
        &self.output
    }
}

/// COM1's registers and receive FIFO are replicated; while paused, no host input enters the FIFO,
/// so the saved state is one instant.
impl Component for SerialDevice {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn pause(&self) {
        self.input_paused.store(true, Ordering::SeqCst);
    }

    /// Lets input flow again and wakes the input thread if it was held back.
    fn resume(&self) {
        // Under the UART lock, so an `enqueue` that saw "paused" has already asked for a wakeup.
        let _uart = self.uart.lock();
        self.input_paused.store(false, Ordering::SeqCst);
        if self.room.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.room.event.write(1);
        }
    }

    fn save(&self) -> Result<Vec<u8>, ComponentError> {
        component::encode(self.name(), &self.snapshot())
    }

    fn restore(&self, version: u32, state: &[u8]) -> Result<(), ComponentError> {
        component::expect_version(self.name(), version, self.version())?;
        let snap: SerialSnapshot = component::decode(self.name(), state)?;
        self.restore_snapshot(&snap).map_err(|e| ComponentError::Failed { component: "serial", why: e.to_string() })
    }
}

/// The host side of COM1: its I/O threads, stopped and joined by [`SerialBackend::stop`].
pub struct SerialBackend {
    stop: Shutdown,
    output: Arc<OutputQueue>,
    threads: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    pty: Option<Arc<Pty>>,
}

enum Source {
    Stdin,
    Listener(UnixListener),
    Pty(Arc<Pty>),
    Nothing,
}

enum Target {
    Stdout,
    File(std::fs::File),
    Client(Arc<Mutex<Option<UnixStream>>>),
    Pty(Arc<Pty>),
    Discard,
}

/// A pseudo-terminal in raw mode: smpft holds the master and keeps the slave open itself, so
/// the master never reports a hang-up when no console is attached.
pub struct Pty {
    master: std::os::fd::OwnedFd,
    _slave: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Pty {
    fn open() -> std::io::Result<Pty> {
        use std::os::fd::FromRawFd;
        let (mut m, mut sl) = (0, 0);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: openpty writes two descriptors and a NUL-terminated name of at most 128 bytes
        // (glibc uses ptsname_r into the buffer, which is large enough for /dev/pts/N).
        let r = unsafe { libc::openpty(&mut m, &mut sl, name.as_mut_ptr(), std::ptr::null(), std::ptr::null()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (master, slave) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(m), std::os::fd::OwnedFd::from_raw_fd(sl)) };
        // SAFETY: `name` was NUL-terminated by openpty.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: termios calls on the slave we own; `t` is fully written by tcgetattr first.
        unsafe {
            let mut t = std::mem::zeroed::<libc::termios>();
            if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
            }
            let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Pty { master, _slave: slave, path: PathBuf::from(path) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what the terminal takes now and drops the rest (nobody is reading).
    fn write(&self, bytes: &[u8]) -> usize {
        // SAFETY: write reads `bytes` only.
        let n = unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        n.max(0) as usize
    }

    fn read(&self, buf: &mut [u8]) -> usize {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n.max(0) as usize
    }
}

/// A unix socket bound at a path but not listening: connections are refused until
/// [`SerialHost`] is started. Removes its path when dropped unless it was started.
struct BoundSocket {
    socket: Option<socket2::Socket>,
    path: PathBuf,
    /// Device and inode of the socket file we bound, to tell it from a file put there since.
    id: (u64, u64),
}

impl BoundSocket {
    fn bind(path: &Path) -> Result<BoundSocket, SerialError> {
        let err = |source| SerialError::Listen { path: path.to_path_buf(), source };
        // A stale socket from an earlier run would make bind fail; only remove sockets.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(err)?;
        socket.bind(&socket2::SockAddr::unix(path).map_err(err)?).map_err(err)?;
        let m = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(BoundSocket { socket: Some(socket), path: path.to_path_buf(), id: (m.dev(), m.ino()) })
    }

    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.id)
    }

    fn listen(mut self) -> Result<(UnixListener, PathBuf), SerialError> {
        let socket = self.socket.take().expect("a bound socket is listened on once");
        let path = std::mem::take(&mut self.path);
        socket.listen(128).map_err(|source| SerialError::Listen { path: path.clone(), source })?;
        Ok((socket.into(), path))
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.socket.is_some() && self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

enum Reserved {
    Stdio,
    Null,
    File(std::fs::File),
    Unix(BoundSocket),
    Pty(Arc<Pty>),
}

/// COM1's host side, claimed ahead of use: a unix socket is bound (connections are refused
/// until the VM runs), an output file is open. A standby holds one from its start, so that it
/// never accepts protection it could not honour, and [`SerialHost::check`]s it again before it
/// claims the tie-breaker.
pub struct SerialHost(Reserved);

impl SerialHost {
    pub fn reserve(spec: &SerialSpec) -> Result<SerialHost, SerialError> {
        Ok(SerialHost(match spec {
            SerialSpec::Stdio => Reserved::Stdio,
            SerialSpec::Null => Reserved::Null,
            SerialSpec::File(path) => Reserved::File(
                std::fs::File::create(path).map_err(|source| SerialError::File { path: path.clone(), source })?,
            ),
            SerialSpec::Unix(path) => Reserved::Unix(BoundSocket::bind(path)?),
            SerialSpec::Pty => Reserved::Pty(Arc::new(Pty::open().map_err(SerialError::Pty)?)),
        }))
    }

    /// The pseudo-terminal reserved, for `SerialSpec::Pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.0 {
            Reserved::Pty(p) => Some(p.path()),
            _ => None,
        }
    }

    /// Verifies the reservation still holds: a socket whose file was removed or replaced is
    /// bound again at its path, and if that fails the VM cannot go live with it.
    pub fn check(&mut self) -> Result<(), SerialError> {
        if let Reserved::Unix(b) = &mut self.0 {
            if !b.is_ours() {
                tracing::warn!(path = %b.path.display(), "serial socket file is gone; binding it again");
                *b = BoundSocket::bind(&b.path.clone())?;
            }
        }
        Ok(())
    }
}

impl SerialBackend {
    /// Connects `device` to the host side `host` reserved; `on_input` runs whenever input
    /// reached the guest.
    pub fn start(
        host: SerialHost,
        device: Arc<SerialDevice>,
        on_input: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Self, SerialError> {
        let client: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let mut socket = None;
        let mut pty = None;
        let (source, target) = match host.0 {
            Reserved::Stdio => (Source::Stdin, Target::Stdout),
            Reserved::Null => (Source::Nothing, Target::Discard),
            Reserved::File(f) => (Source::Nothing, Target::File(f)),
            Reserved::Pty(p) => {
                tracing::info!("serial: COM1 is the pseudo-terminal {}", p.path().display());
                pty = Some(p.clone());
                (Source::Pty(p.clone()), Target::Pty(p))
            }
            Reserved::Unix(bound) => {
                let (l, path) = bound.listen()?;
                socket = Some(path);
                (Source::Listener(l), Target::Client(client.clone()))
            }
        };
        let stop = Shutdown::new().map_err(SerialError::Event)?;
        let output = device.output().clone();
        let mut threads = Vec::new();
        let q = output.clone();
        let out_stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || output_loop(&q, target, &out_stop))
                .expect("spawn serial-out thread"),
        );
        if !matches!(source, Source::Nothing) {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || input_loop(&device, source, &client, &stop, &*on_input))
                    .expect("spawn serial-in thread"),
            );
        }
        Ok(SerialBackend { stop, output, threads, socket, pty })
    }

    /// The pseudo-terminal COM1 is connected to, for `SerialSpec::Pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty.as_deref().map(Pty::path)
    }

    /// Writes out what the guest has produced (a reader gets [`DRAIN_GRACE`] to take it),
    /// then stops and joins the I/O threads.
    pub fn stop(mut self) {
        self.output.close();
        self.stop.fire();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
        let dropped = self.output.dropped();
        if dropped > 0 {
            tracing::warn!("serial: {dropped} output bytes were dropped because the reader did not keep up");
        }
    }
}

/// How long a reader gets to take the guest's last output once the VM stops.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

fn output_loop(q: &OutputQueue, mut target: Target, stop: &Shutdown) {
    while let Some(bytes) = q.take() {
        // The client's stream is duplicated so that a new client replacing it meanwhile cannot
        // close the descriptor under this write.
        let client = match &target {
            Target::Client(c) => c.lock().as_ref().and_then(|s| s.try_clone().ok()),
            _ => None,
        };
        if let Target::Pty(p) = &target {
            p.write(&bytes);
            continue;
        }
        let fd = match &target {
            Target::Stdout => Some(libc::STDOUT_FILENO),
            Target::File(f) => Some(f.as_raw_fd()),
            // No client: like a serial line with nothing plugged in.
            Target::Client(_) => client.as_ref().map(|s| s.as_raw_fd()),
            Target::Discard | Target::Pty(_) => None,
        };
        let Some(fd) = fd else { continue };
        match shutdown::write_all(fd, &bytes, stop, DRAIN_GRACE) {
            Ok(()) => {}
            Err(WriteEnd::Failed(e)) if matches!(target, Target::Client(_)) => {
                tracing::info!("serial: client went away ({e})");
                if let Target::Client(c) = &target {
                    *c.lock() = None;
                }
            }
            Err(WriteEnd::Failed(e)) => tracing::warn!("serial: output lost: {e}"),
            Err(WriteEnd::Abandoned(n)) => {
                tracing::warn!("serial: {n} output bytes were not taken by the reader before the VM stopped");
                target = Target::Discard;
            }
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn input_loop(
    device: &SerialDevice,
    source: Source,
    client: &Mutex<Option<UnixStream>>,
    stop: &Shutdown,
    on_input: &(dyn Fn() + Send + Sync),
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut reader: Option<UnixStream> = None;
    let mut stdin_open = matches!(source, Source::Stdin);
    let stdin = std::io::stdin();
    loop {
        let mut fds = vec![pollfd(stop.fd()), pollfd(device.room_event().as_raw_fd())];
        let listener_at = if let Source::Listener(l) = &source {
            fds.push(pollfd(l.as_raw_fd()));
            Some(fds.len() - 1)
        } else {
            None
        };
        let mut input_at = None;
        if pending.is_empty() {
            if let Some(r) = &reader {
                fds.push(pollfd(r.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            } else if let Source::Pty(p) = &source {
                fds.push(pollfd(p.master.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            } else if stdin_open {
                fds.push(pollfd(stdin.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("serial: poll failed: {e}");
            return;
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(0) {
            return;
        }
        if ready(1) {
            let _ = device.room_event().read();
        }
        if let (Some(i), Source::Listener(l)) = (listener_at, &source) {
            if ready(i) {
                if let Ok((s, _)) = l.accept() {
                    if reader.is_some() {
                        tracing::info!("serial: new client replaces the previous one");
                    }
                    // Input the old client sent but the guest has not taken is the old client's.
                    pending.clear();
                    *client.lock() = s.try_clone().ok();
                    reader = Some(s);
                }
            }
        }
        if let (true, Source::Pty(p)) = (input_at.is_some_and(ready), &source) {
            let n = p.read(&mut buf);
            pending.extend_from_slice(&buf[..n]);
        } else if input_at.is_some_and(ready) {
            let r = match &mut reader {
                Some(s) => s.read(&mut buf),
                None => stdin.lock().read(&mut buf),
            };
            match r {
                Ok(0) | Err(_) => {
                    if reader.take().is_some() {
                        *client.lock() = None;
                        tracing::debug!("serial: client disconnected");
                    } else {
                        stdin_open = false;
                    }
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        if !pending.is_empty() {
            let n = device.enqueue(&pending);
            if n > 0 {
                pending.drain(..n);
                on_input();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serial_specs() {
        assert_eq!("stdio".parse(), Ok(SerialSpec::Stdio));
        assert_eq!("null".parse(), Ok(SerialSpec::Null));
        assert_eq!("unix:/tmp/a.sock".parse(), Ok(SerialSpec::Unix("/tmp/a.sock".into())));
        assert_eq!("file:/tmp/out".parse(), Ok(SerialSpec::File("/tmp/out".into())));
        assert_eq!("pty".parse(), Ok(SerialSpec::Pty));
        assert!("unix:".parse::<SerialSpec>().unwrap_err().contains("needs a path"));
        assert!("tcp:1234".parse::<SerialSpec>().unwrap_err().contains("not a serial backend"));
        assert!("".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn a_pty_passes_bytes_both_ways_raw_and_drops_what_nobody_reads() {
        let p = Pty::open().unwrap();
        assert!(p.path().starts_with("/dev/pts"), "{}", p.path().display());
        let mut console = std::fs::OpenOptions::new().read(true).write(true).open(p.path()).unwrap();
        assert_eq!(p.write(b"a\nb"), 3);
        let mut got = [0u8; 3];
        console.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\nb", "raw: no CR added");
        console.write_all(b"INCR 1\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 16];
        let n = p.read(&mut buf);
        assert_eq!(&buf[..n], b"INCR 1\n", "raw: no echo, no line editing");
        drop(console);
        let big = vec![b'x'; 1 << 20];
        assert!(p.write(&big) < big.len(), "a full terminal takes no more; the write does not block");
    }

    #[test]
    fn input_waits_for_room_and_nothing_is_lost() {
        let dev = SerialDevice::new(None, OutputGate::new()).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let mut sent = dev.enqueue(&data);
        assert!(sent < data.len(), "a 16550 FIFO holds fewer than 100 bytes");
        let mut got = Vec::new();
        while got.len() < data.len() {
            // Guest side: read while data is ready (LSR bit 0).
            while dev.read(5) & 1 != 0 {
                got.push(dev.read(0));
            }
            assert_eq!(dev.room_event().read().unwrap(), 1, "a read after a full FIFO signals room");
            sent += dev.enqueue(&data[sent..]);
            if sent == data.len() {
                while dev.read(5) & 1 != 0 {
                    got.push(dev.read(0));
                }
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn output_is_queued_in_order_and_bounded() {
        let dev = SerialDevice::new(None, OutputGate::new()).unwrap();
        for &b in b"hello\n" {
            dev.write(0, b);
        }
        assert_eq!(dev.output().take().unwrap(), b"hello\n");
        dev.output().push(&vec![0; OUTPUT_MAX + 10]);
        assert_eq!(dev.output().dropped(), 10);
    }
}
