//! qemu-storage-daemon: QEMU's block layer as a process of its own, for the disks smpft does not
//! serve itself (qcow2 and its backing chains, VMDK and the other formats, throttle groups, every
//! option of QEMU's block nodes).
//!
//! One daemon serves all of a VM's such disks: their `--blockdev` graphs and `--object`s are
//! passed to it verbatim, each disk's top node is exported over NBD on a unix socket in the
//! daemon's runtime directory (beside its QMP socket, its pidfile and its log), and the disk is
//! then an NBD export like any other ([`crate::nbd`]). The daemon writes its pidfile only after
//! every node, export and socket exists, so the pidfile is its signal that it is ready.
//!
//! It lives as long as the disks it serves: each disk holds it, and the last one to go (after the
//! VM's final flush) stops it with SIGTERM, on which it closes its images cleanly. It is started
//! by a thread that lives as long as it does, with the parent-death signal set: if smpft itself
//! dies, so does its daemon, and nothing keeps the images locked. If the daemon dies first, its
//! disks' I/O fails (the guest sees errors) and one log line names it.

use crate::spec::{DiskSpec, Location};
use crate::{Backend, BackendError};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The program, unless `SMPFT_QEMU_STORAGE_DAEMON` names another.
pub const PROGRAM: &str = "qemu-storage-daemon";
/// How long the daemon may take to open its images.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum QsdError {
    #[error(
        "{program} is not installed: it comes with Debian's qemu-system-common package (apt-get install qemu-system-common qemu-utils, at one version)"
    )]
    Missing { program: String },
    #[error("cannot start {program}")]
    Spawn { program: String, source: std::io::Error },
    #[error("cannot create the storage daemon's runtime directory {path}")]
    Dir { path: PathBuf, source: std::io::Error },
    /// The daemon refused the graph of the disk at `index`: its own message, quoted.
    #[error("qemu-storage-daemon: {message}")]
    Refused { index: usize, message: String },
    #[error("qemu-storage-daemon did not get ready within {0:?}")]
    Timeout(Duration),
}

/// Where a daemon's runtime directories go: `SMPFT_RUN_DIR`, else `/run/smpft` if this user
/// may create directories there (libvirt runs the emulator as an unprivileged user, for whom
/// root's `/run/smpft` is not writable), else `$XDG_RUNTIME_DIR/smpft`, else the temporary
/// directory.
fn runtime_base() -> PathBuf {
    if let Some(d) = std::env::var_os("SMPFT_RUN_DIR") {
        return PathBuf::from(d);
    }
    let writable = |p: &Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: access(2) reads the NUL-terminated path we own; the result is checked.
        std::fs::create_dir_all(p).is_ok() && unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0
    };
    let run = Path::new("/run/smpft");
    if writable(run) {
        return run.to_path_buf();
    }
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("smpft")) {
        if writable(&xdg) {
            return xdg;
        }
    }
    std::env::temp_dir()
}

fn program() -> String {
    std::env::var("SMPFT_QEMU_STORAGE_DAEMON").unwrap_or_else(|_| PROGRAM.into())
}

/// What the daemon's watcher knows of it.
#[derive(Default)]
struct Watch {
    /// The daemon was reaped: its pid may belong to another process now.
    reaped: bool,
    /// smpft is stopping it: its end is no failure.
    stopping: bool,
    /// It served its disks (an end before is a refusal, reported as such).
    ready: bool,
}

/// A running qemu-storage-daemon.
pub struct StorageDaemon {
    pid: i32,
    dir: PathBuf,
    watch: Arc<Mutex<Watch>>,
    /// Starts the daemon, waits for its end, logs an unexpected one, and reaps it.
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// The runtime files of one daemon.
struct Files {
    dir: PathBuf,
    nbd: PathBuf,
    qmp: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Files {
    fn new() -> Result<Files, QsdError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = runtime_base().join(format!("qsd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| QsdError::Dir { path: dir.clone(), source })?;
        Ok(Files {
            nbd: dir.join("nbd.sock"),
            qmp: dir.join("qmp.sock"),
            pidfile: dir.join("qsd.pid"),
            log: dir.join("qsd.log"),
            dir,
        })
    }
}

/// The disks' export names, in order.
fn export_name(i: usize) -> String {
    format!("disk{i}")
}

/// The daemon's command line for `disks` (those with a graph): every object and node once, in
/// order, then the NBD server, one export per disk, the QMP monitor and the pidfile last.
fn arguments(disks: &[(usize, &DiskSpec)], files: &Files) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let push = |opt: &str, v: &str, args: &mut Vec<String>| {
        if !args.chunks(2).any(|p| p[0] == opt && p[1] == v) {
            args.extend([opt.to_string(), v.to_string()]);
        }
    };
    for (_, d) in disks {
        let g = d.graph.as_ref().expect("only disks with a graph");
        g.objects.iter().for_each(|o| push("--object", o, &mut args));
        g.blockdevs.iter().for_each(|b| push("--blockdev", b, &mut args));
    }
    args.extend(["--nbd-server".into(), format!("addr.type=unix,addr.path={}", files.nbd.display())]);
    for (i, d) in disks {
        let g = d.graph.as_ref().expect("only disks with a graph");
        let writable = if d.readonly { "off" } else { "on" };
        args.extend([
            "--export".into(),
            format!("type=nbd,id=export{i},node-name={},name={},writable={writable}", g.node, export_name(*i)),
        ]);
    }
    args.extend([
        "--chardev".into(),
        format!("socket,id=qmp,path={},server=on,wait=off", files.qmp.display()),
        "--monitor".into(),
        "chardev=qmp".into(),
        "--pidfile".into(),
        files.pidfile.display().to_string(),
    ]);
    args
}

/// The daemon's complaint about `disks`, as one line naming the disk whose option it quotes
/// (`qemu-storage-daemon: --blockdev VALUE: MESSAGE`).
fn refusal(log: &str, disks: &[(usize, &DiskSpec)], status: &str) -> QsdError {
    let line = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let line = line.strip_prefix("qemu-storage-daemon: ").unwrap_or(line);
    for (i, d) in disks {
        let g = d.graph.as_ref().expect("only disks with a graph");
        let quoted = g.objects.iter().map(|o| ("--object", o)).chain(g.blockdevs.iter().map(|b| ("--blockdev", b)));
        for (opt, v) in quoted {
            if let Some(message) = line.strip_prefix(&format!("{opt} {v}: ")) {
                return QsdError::Refused { index: *i, message: message.into() };
            }
        }
    }
    let message = if line.is_empty() { format!("exited ({status}) without a message") } else { line.to_string() };
    QsdError::Refused { index: disks.first().map(|(i, _)| *i).unwrap_or(0), message }
}

/// A daemon started, with where it serves each disk (by index in the specs).
pub type Started = (Arc<StorageDaemon>, Vec<(usize, Location)>);

impl StorageDaemon {
    /// Starts one daemon for the disks of `specs` that have a graph and returns it with where
    /// each such disk is served (by index in `specs`). `None` when no disk needs it.
    pub fn start(specs: &[DiskSpec]) -> Result<Option<Started>, QsdError> {
        let disks: Vec<(usize, &DiskSpec)> = specs.iter().enumerate().filter(|(_, d)| d.graph.is_some()).collect();
        if disks.is_empty() {
            return Ok(None);
        }
        let files = Files::new()?;
        let args = arguments(&disks, &files);
        let names = disks.iter().map(|(_, d)| d.to_string()).collect::<Vec<_>>().join(", ");
        let (pid, watch, watcher, exited) = spawn(args, &files, names)?;
        let daemon = StorageDaemon { pid, dir: files.dir.clone(), watch, watcher: Some(watcher) };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(status) = exited.recv_timeout(Duration::from_millis(10)) {
                let log = std::fs::read_to_string(&files.log).unwrap_or_default();
                return Err(refusal(&log, &disks, &status));
            }
            let ready = std::fs::read_to_string(&files.pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok());
            if ready.is_some() {
                daemon.watch.lock().unwrap_or_else(|e| e.into_inner()).ready = true;
                break;
            }
            if Instant::now() > deadline {
                return Err(QsdError::Timeout(READY_TIMEOUT));
            }
        }
        tracing::info!(pid, dir = %files.dir.display(), disks = disks.len(), "qemu-storage-daemon serves the disks");
        let served = disks
            .iter()
            .map(|(i, _)| (*i, Location::NbdUnix { socket: files.nbd.clone(), export: export_name(*i) }))
            .collect();
        Ok(Some((Arc::new(daemon), served)))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The daemon's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Stops the daemon (SIGTERM: it closes its images) and waits for its end.
    fn stop(&mut self) {
        {
            let mut w = self.watch.lock().unwrap_or_else(|e| e.into_inner());
            w.stopping = true;
            if !w.reaped {
                // SAFETY: kill(2) on our child's pid, which is not reaped yet (checked under the
                // lock the watcher reaps under), so it is still ours.
                unsafe { libc::kill(self.pid, libc::SIGTERM) };
            }
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

type Spawned = (i32, Arc<Mutex<Watch>>, std::thread::JoinHandle<()>, crossbeam_channel::Receiver<String>);

/// Starts the daemon on a watcher thread of its own (the parent-death signal follows the thread
/// that started a child) and returns its pid, the watch, the thread and where its end is told
/// (with its exit status) while smpft waits for it to get ready.
fn spawn(args: Vec<String>, files: &Files, names: String) -> Result<Spawned, QsdError> {
    let program = program();
    let log = std::fs::File::create(&files.log).map_err(|source| QsdError::Dir { path: files.log.clone(), source })?;
    let mut cmd = Command::new(&program);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec: prctl(2), sigemptyset(3) and
    // sigprocmask(2) on a local set. smpft blocks the termination signals in all its threads (its
    // signal thread takes them); the daemon must not inherit that mask, or SIGTERM never stops it.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let (started_tx, started_rx) = crossbeam_channel::bounded(1);
    let (exit_tx, exit_rx) = crossbeam_channel::bounded(1);
    let watch = Arc::new(Mutex::new(Watch::default()));
    let w = watch.clone();
    let thread = std::thread::Builder::new()
        .name("qsd-watch".into())
        .spawn(move || match cmd.spawn() {
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
            Ok(child) => {
                let _ = started_tx.send(Ok(child.id() as i32));
                // The daemon was started unconfined by this thread's filter (it inherits the
                // process's); watching it is all that is left.
                confine::enter(confine::Kind::Storage);
                watch_child(child, &w, &names, exit_tx);
            }
        })
        .map_err(|source| QsdError::Spawn { program: program.clone(), source })?;
    match started_rx.recv() {
        Ok(Ok(pid)) => Ok((pid, watch, thread, exit_rx)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(match e.kind() {
                std::io::ErrorKind::NotFound => QsdError::Missing { program },
                _ => QsdError::Spawn { program, source: e },
            })
        }
        Err(_) => {
            let _ = thread.join();
            Err(QsdError::Spawn { program, source: std::io::Error::other("the watcher thread ended") })
        }
    }
}

/// Waits for the daemon's end without reaping it (its pid stays its own until the watch says
/// so), tells it, logs it if smpft did not ask for it, then reaps it.
fn watch_child(
    mut child: std::process::Child,
    watch: &Mutex<Watch>,
    names: &str,
    exit: crossbeam_channel::Sender<String>,
) {
    let pid = child.id() as libc::pid_t;
    loop {
        // SAFETY: a zeroed siginfo_t is a valid buffer for waitid(2) to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid buffer; WNOWAIT leaves it unreaped.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    let mut w = watch.lock().unwrap_or_else(|e| e.into_inner());
    let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    w.reaped = true;
    if w.ready && !w.stopping {
        tracing::error!(
            "qemu-storage-daemon (pid {pid}) serving disk {names} died ({status}): I/O to those disks fails from now on"
        );
    }
    let _ = exit.send(status);
}

/// A disk served by the storage daemon: its NBD export, and the daemon it keeps running.
struct Served {
    export: crate::nbd::Nbd,
    _daemon: Arc<StorageDaemon>,
}

impl Backend for Served {
    fn size(&self) -> u64 {
        self.export.size()
    }
    fn readonly(&self) -> bool {
        self.export.readonly()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.export.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.export.write_at(data, offset)
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        self.export.write_batch(writes)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.export.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.export.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.export.discard(offset, len)
    }
}

/// Opens every disk of `specs`: raw files and block devices through io_uring, NBD exports
/// directly, and the disks with a graph through one storage daemon started for them. An error
/// comes with the index of the disk it concerns.
pub fn open_all(specs: &[DiskSpec]) -> Result<Vec<Arc<dyn Backend>>, (usize, BackendError)> {
    let daemon = StorageDaemon::start(specs).map_err(|e| {
        let i = match e {
            QsdError::Refused { index, .. } => index,
            _ => specs.iter().position(|d| d.graph.is_some()).unwrap_or(0),
        };
        (i, BackendError::Daemon(e))
    })?;
    let mut out: Vec<Arc<dyn Backend>> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let served = daemon.as_ref().and_then(|(d, s)| s.iter().find(|(j, _)| *j == i).map(|(_, l)| (d, l)));
        out.push(match served {
            Some((daemon, location)) => {
                let export = crate::nbd::Nbd::connect(location, spec.readonly).map_err(|e| (i, e))?;
                Arc::new(Served { export, _daemon: daemon.clone() })
            }
            None => crate::open(spec).map_err(|e| (i, e))?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let s = Command::new("qemu-img").args(args).stdout(Stdio::null()).status().expect("qemu-img");
        assert!(s.success(), "qemu-img {args:?}");
    }

    fn spec(s: &str) -> DiskSpec {
        s.parse().unwrap()
    }

    #[test]
    fn a_qcow2_overlay_is_served_and_its_backing_file_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let (base, overlay) = (dir.path().join("base.raw"), dir.path().join("ov.qcow2"));
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ]);
        let raw = dir.path().join("plain.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let specs = [spec(raw.to_str().unwrap()), spec(&format!("{},format=qcow2,cache=writeback", overlay.display()))];
        let disks = open_all(&specs).unwrap();
        assert_eq!(disks[1].size(), 1 << 20);
        let mut b = [0u8; 512];
        disks[1].read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7u8; 512], "the backing file's data reads through");
        disks[1].write_at(&[9u8; 512], 4096).unwrap();
        disks[1].flush().unwrap();
        disks[1].read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [9u8; 512]);
        drop(disks);
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 1 << 20], "the backing file is unchanged");
        let check = Command::new("qemu-img").args(["check", "-q"]).arg(&overlay).status().unwrap();
        assert!(check.success(), "the daemon stopped and closed the image cleanly");
    }

    #[test]
    fn the_daemons_refusal_is_one_line_naming_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("ov.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/nonexistent/base.raw",
            "-F",
            "raw",
            "-u",
            overlay.to_str().unwrap(),
            "1M",
        ]);
        let specs = [spec(&format!("{},format=qcow2", overlay.display()))];
        let (i, e) = open_all(&specs).err().expect("a missing backing file is refused");
        let line = crate::error_chain(&e);
        assert_eq!(i, 0);
        assert!(line.starts_with("qemu-storage-daemon: ") && line.contains("/nonexistent/base.raw"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let specs = [spec(&format!("{},format=nosuch", overlay.display()))];
        let line = crate::error_chain(&open_all(&specs).err().unwrap().1);
        assert!(line.contains("'nosuch'"), "{line}");
    }

    #[test]
    fn a_missing_daemon_names_its_package() {
        let err = QsdError::Missing { program: "qemu-storage-daemon".into() };
        assert!(err.to_string().contains("qemu-system-common"), "{err}");
    }
}
