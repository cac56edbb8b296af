//! The host side of virtio-serial ports (`virtserialport` on a `-chardev socket,server=on`):
//! a listening unix socket per port, given as a descriptor (libvirt creates the agent's socket
//! and passes it) or bound at a path, claimed with the VM's other host resources before it runs.
//!
//! One thread serves every port of the device: it accepts one client at a time per port (a
//! second waits in the listen queue until the first leaves, as QEMU's socket chardev does),
//! tells the device when a client comes and goes (the guest then gets PORT_OPEN), reads client
//! bytes into the device while it has room, and puts waiting input and control messages into
//! guest buffers when the device says they can move (after a pause, when a port opens, when the
//! guest made room). Output reaches the client through [`SocketLink`], after the output gate.

use crate::devices::gate::OutputPort;
use crate::virtio::console::{Console, PortDef, PortLink, MAX_PORTS, NAME_MAX};
use crate::virtio::VirtioPci;
use parking_lot::Mutex;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Where a port's host side listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelHost {
    /// A unix socket smpft binds (removing a stale socket file there first).
    Path(PathBuf),
    /// A listening unix socket this process was given (libvirt's); it is duplicated, not taken.
    Fd(i32),
}

/// One `virtserialport`: its number on the device, the name the guest sees, its device id (QMP's
/// `VSERPORT_CHANGE` names it), the chardev id it is reported as, and where its host side
/// listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    pub nr: u32,
    pub name: String,
    pub id: String,
    pub chardev: String,
    pub host: ChannelHost,
}

impl ChannelSpec {
    /// Checks a device's ports: numbers 1 to [`MAX_PORTS`], each once, names short and unique.
    pub fn check_all(ports: &[ChannelSpec]) -> Result<(), String> {
        for (i, p) in ports.iter().enumerate() {
            if p.nr == 0 || p.nr >= MAX_PORTS {
                return Err(format!(
                    "port {} ({}): port numbers are 1 to {} (0 is the virtconsole's)",
                    p.nr,
                    p.name,
                    MAX_PORTS - 1
                ));
            }
            if p.name.len() > NAME_MAX || p.name.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!("port {}: a name of at most {NAME_MAX} printable bytes", p.nr));
            }
            if let Some(q) = ports[..i].iter().find(|q| q.nr == p.nr || (!p.name.is_empty() && q.name == p.name)) {
                return Err(format!("ports {} ({}) and {} ({}) clash", q.nr, q.name, p.nr, p.name));
            }
        }
        Ok(())
    }

    pub fn def(&self) -> PortDef {
        PortDef { nr: self.nr, name: self.name.clone() }
    }

    fn describe(&self) -> String {
        match &self.host {
            ChannelHost::Path(p) => format!("channel {} ({}) at {}", self.chardev, self.name, p.display()),
            ChannelHost::Fd(fd) => format!("channel {} ({}) on descriptor {fd}", self.chardev, self.name),
        }
    }
}

/// `name=NAME,path=PATH|fd=N[,nr=N]`, smpft's `--channel`: a port whose host side listens at
/// a unix socket path or on a listening socket handed over. Without `nr=`, the number is 0 and
/// the caller numbers the ports in order; the chardev id is the caller's too.
impl std::str::FromStr for ChannelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<ChannelSpec, String> {
        let (mut name, mut host, mut nr) = (None, None, 0);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("name", v)) => name = Some(v.to_string()),
                Some(("path", v)) if !v.is_empty() => host = Some(ChannelHost::Path(v.into())),
                Some(("fd", v)) => {
                    host = Some(ChannelHost::Fd(v.parse().map_err(|_| format!("fd={v} is not a descriptor number"))?))
                }
                Some(("nr", v)) => {
                    nr = v.parse().ok().filter(|n| (1..MAX_PORTS).contains(n)).ok_or_else(|| {
                        format!("nr={v}: port numbers are 1 to {} (0 is the virtconsole's)", MAX_PORTS - 1)
                    })?
                }
                _ => return Err(format!("'{part}' is not name=NAME, path=PATH, fd=N or nr=N")),
            }
        }
        let name = name.ok_or("a channel needs name=NAME (the guest agent's is org.qemu.guest_agent.0)")?;
        let host = host.ok_or("a channel needs path=PATH (a unix socket smpft listens on) or fd=N")?;
        Ok(ChannelSpec { nr, name, id: String::new(), chardev: String::new(), host })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the host side of {what}")]
pub struct ChannelError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// A port's listening socket, claimed before the VM runs; a bound path is removed when dropped.
pub struct ChannelListener {
    listener: UnixListener,
    path: Option<PathBuf>,
}

impl Drop for ChannelListener {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl ChannelListener {
    pub fn reserve(spec: &ChannelSpec) -> Result<ChannelListener, ChannelError> {
        let err = |source| ChannelError { what: spec.describe(), source };
        match &spec.host {
            ChannelHost::Path(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                let listener = UnixListener::bind(path).map_err(err)?;
                listener.set_nonblocking(true).map_err(err)?;
                Ok(ChannelListener { listener, path: Some(path.clone()) })
            }
            ChannelHost::Fd(fd) => {
                let fd = dup_listening(*fd).map_err(err)?;
                let listener = UnixListener::from(fd);
                listener.set_nonblocking(true).map_err(err)?;
                Ok(ChannelListener { listener, path: None })
            }
        }
    }
}

/// A duplicate of `fd`, if it is a listening stream socket.
fn dup_listening(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor from `fd` (EBADF if it is not open).
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just created and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(new) };
    let (mut listening, mut len) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let r = unsafe {
        libc::getsockopt(new, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&mut listening as *mut i32).cast(), &mut len)
    };
    if r != 0 || listening == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a listening socket"),
        ));
    }
    Ok(owned)
}

/// Where a port's released output goes: the connected client, if any. A client that does not
/// read loses what its socket cannot take (counted), so release never blocks the VM's owner.
#[derive(Default)]
pub struct SocketLink {
    client: Mutex<Option<UnixStream>>,
    dropped: AtomicU64,
}

impl OutputPort for SocketLink {
    fn deliver(&self, data: &[u8]) {
        let c = self.client.lock();
        let Some(s) = c.as_ref() else { return };
        let mut sent = 0;
        while sent < data.len() {
            // SAFETY: send reads `data[sent..]` only.
            let n = unsafe {
                libc::send(
                    s.as_raw_fd(),
                    data[sent..].as_ptr().cast(),
                    data.len() - sent,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let lost = self.dropped.fetch_add((data.len() - sent) as u64, Ordering::Relaxed);
                if lost == 0 {
                    tracing::warn!(
                        "virtio-serial: a client does not take its output ({e}); what it cannot take is dropped"
                    );
                }
                return;
            }
            sent += n as usize;
        }
    }
}

impl PortLink for SocketLink {
    fn connected(&self) -> bool {
        self.client.lock().is_some()
    }
}

/// The device's host thread, stopped and joined by [`ChannelBackend::stop`].
pub struct ChannelBackend {
    stop: shutdown::Shutdown,
    thread: Option<JoinHandle<Vec<ChannelListener>>>,
}

impl ChannelBackend {
    /// Serves `dev`'s ports on `listeners` (in port order) through `links`; `wake` tells idle
    /// vCPUs that input arrived.
    pub fn start(
        dev: Arc<VirtioPci<Console>>,
        links: Vec<Arc<SocketLink>>,
        listeners: Vec<ChannelListener>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<ChannelBackend> {
        let stop = shutdown::Shutdown::new()?;
        let until = stop.clone();
        let thread = std::thread::Builder::new().name("virtio-serial".into()).spawn(move || {
            confine::enter(confine::Kind::Device);
            serve(&dev, &links, &listeners, &until, &*wake);
            // Dropped by whoever joins: removing a socket file is not this thread's to do.
            listeners
        })?;
        Ok(ChannelBackend { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.fire();
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

impl Drop for ChannelBackend {
    fn drop(&mut self) {
        self.halt();
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn serve(
    dev: &VirtioPci<Console>,
    links: &[Arc<SocketLink>],
    listeners: &[ChannelListener],
    stop: &shutdown::Shutdown,
    wake: &(dyn Fn() + Send + Sync),
) {
    let console = dev.device();
    let mut buf = vec![0u8; 16 << 10];
    // Whatever a restore left waiting (control messages, input) moves at once.
    let mut moved = true;
    loop {
        if moved || console.take_changed() {
            for q in console.deliverable() {
                dev.process_queue(q);
            }
            wake();
        }
        moved = false;
        // Per port: its client while there is room for input, else its listener while free.
        let mut fds = vec![pollfd(stop.fd()), pollfd(console.kick_event().as_raw_fd())];
        let mut watched = Vec::new();
        for (i, (link, l)) in links.iter().zip(listeners).enumerate() {
            // The device's lock is never taken under a client's (the device takes them the
            // other way round).
            let room = console.input_room(i) > 0;
            let c = link.client.lock();
            match c.as_ref() {
                Some(s) if room => fds.push(pollfd(s.as_raw_fd())),
                Some(_) => continue,
                None => fds.push(pollfd(l.listener.as_raw_fd())),
            }
            watched.push(i);
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio-serial: poll failed: {e}; the ports are not served any more");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = console.kick_event().read();
            moved = true;
        }
        for (k, &i) in watched.iter().enumerate() {
            if fds[k + 2].revents != 0 {
                moved |= port_ready(console, i, &links[i], &listeners[i], &mut buf);
            }
        }
    }
}

/// Handles readiness on port `i`: a client to accept, or input (or its end) to read. True if
/// anything changed for the guest.
fn port_ready(console: &Console, i: usize, link: &SocketLink, l: &ChannelListener, buf: &mut [u8]) -> bool {
    let name = &console.ports()[i].name;
    let room = console.input_room(i).min(buf.len());
    let mut client = link.client.lock();
    let Some(s) = client.as_mut() else {
        let Ok((s, _)) = l.listener.accept() else { return false };
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        tracing::info!("virtio-serial: port {name}: a client connected");
        *client = Some(s);
        drop(client);
        return console.host_changed(i);
    };
    match s.read(&mut buf[..room]) {
        Ok(0) => {}
        Ok(n) => {
            drop(client);
            console.push_input(i, &buf[..n]);
            return true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
            return false
        }
        Err(e) => tracing::info!("virtio-serial: port {name}: the client went away ({e})"),
    }
    tracing::info!("virtio-serial: port {name}: the client disconnected");
    *client = None;
    drop(client);
    console.host_changed(i)
}
