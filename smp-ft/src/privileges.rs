//! Running without root (`--user NAME`): once everything that needs root is open (`/dev/kvm`
//! and the VM, taps, disks, the QMP and serial sockets, the FT listener), the process becomes
//! NAME (its group and supplementary groups), with no capabilities and `no_new_privs`, so nothing
//! it runs later (event hooks) can gain privileges either.
//!
//! What a copy opens later must then be open to NAME, and is checked as NAME right after the
//! drop, so a missing permission stops the copy at start, not at a failover: the KVM device (a
//! standby builds its VM again when it waits for a new primary), the disks' image files, the
//! file tie-breaker's directory (each claim writes a new record there), the directories of the
//! QMP and serial sockets (bound again when a copy waits anew), and the serial log and console
//! files.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The account to become.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user")]
    NoUser(String),
    #[error("--user {0}: only root can become another user (running as uid {1})")]
    NotRoot(String, libc::uid_t),
    #[error("--user {user}: {step} failed: {source}")]
    Drop { user: String, step: &'static str, source: std::io::Error },
    #[error("--user {user}: still privileged after the drop ({what})")]
    StillPrivileged { user: String, what: String },
    #[error("--user {user}: {what} {} is not open to {user}, and a later step opens it as {user}", path.display())]
    NoAccess { user: String, what: &'static str, path: PathBuf, source: std::io::Error },
}

impl User {
    /// Looks NAME up in the password database.
    pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
        let cname = CString::new(name).map_err(|_| PrivilegeError::NoUser(name.into()))?;
        // SAFETY: getpwnam_r fills `pw` with pointers into `buf`, which outlives their use here.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as above; every pointer is valid for the sizes given.
        let r = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
        if r != 0 || found.is_null() {
            return Err(PrivilegeError::NoUser(name.into()));
        }
        Ok(User { name: name.into(), uid: pw.pw_uid, gid: pw.pw_gid })
    }

    /// Checks, before anything starts, that this process can become the user.
    pub fn check(&self) -> Result<(), PrivilegeError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && euid != self.uid {
            return Err(PrivilegeError::NotRoot(self.name.clone(), euid));
        }
        Ok(())
    }
}

/// Sets `no_new_privs` on the calling thread; threads it starts later inherit it. Called first
/// thing with `--user`, before any thread exists, so that every thread has it.
pub fn no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) changes only this thread's flag.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn os(user: &User, step: &'static str, r: libc::c_int) -> Result<(), PrivilegeError> {
    if r != 0 {
        return Err(PrivilegeError::Drop { user: user.name.clone(), step, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Becomes `user` in every thread of the process (glibc applies set*id to all threads), with
/// its supplementary groups and no capabilities; then checks that root cannot be regained.
pub fn become_user(user: &User) -> Result<(), PrivilegeError> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == user.uid {
        return Ok(());
    }
    let name = CString::new(user.name.as_str()).map_err(|_| PrivilegeError::NoUser(user.name.clone()))?;
    // SAFETY: initgroups reads the group database for `name` (a valid C string) and sets this
    // process's supplementary groups.
    os(user, "initgroups", unsafe { libc::initgroups(name.as_ptr(), user.gid) })?;
    // SAFETY: setresgid/setresuid change the process's ids (glibc: in every thread).
    os(user, "setresgid", unsafe { libc::setresgid(user.gid, user.gid, user.gid) })?;
    // SAFETY: as above.
    os(user, "setresuid", unsafe { libc::setresuid(user.uid, user.uid, user.uid) })?;
    // Leaving uid 0 cleared the permitted and effective capabilities; the ambient set too.
    // SAFETY: prctl with PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    os(user, "clearing ambient capabilities", unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    })?;
    // SAFETY: setuid(0) must fail now; if it does not, the drop did not happen.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::StillPrivileged { user: user.name.clone(), what: "setuid(0) succeeded".into() });
    }
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    for field in ["CapPrm:", "CapEff:", "CapAmb:"] {
        let value = status.lines().find_map(|l| l.strip_prefix(field)).map(str::trim);
        if value.is_some_and(|v| !v.trim_start_matches('0').is_empty()) {
            return Err(PrivilegeError::StillPrivileged {
                user: user.name.clone(),
                what: format!("{field} {}", value.unwrap_or_default()),
            });
        }
    }
    tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "running without root from here on");
    Ok(())
}

/// What a later step opens, to check as the user.
#[derive(Debug, Clone)]
pub enum Need {
    /// A file or device opened for reading and writing.
    ReadWrite(&'static str, PathBuf),
    /// A file opened for reading.
    Read(&'static str, PathBuf),
    /// A directory a file is created in (or replaced in).
    CreateIn(&'static str, PathBuf),
    /// A file this copy writes (a log): opened again later, or created if missing then. One
    /// created as root before the drop is handed to the user, as QEMU's logs are.
    File(&'static str, PathBuf),
    /// A tap attached to again by name: without CAP_NET_ADMIN only a persistent tap owned by
    /// the user can be.
    TapOwned(String),
}

impl Need {
    /// The directory `path` is in (`.` for a bare name).
    pub fn dir_of(what: &'static str, path: &Path) -> Need {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Need::CreateIn(what, dir.to_path_buf())
    }

    /// A file this copy writes: see [`Need::File`].
    pub fn file(what: &'static str, path: &Path) -> Need {
        Need::File(what, path.to_path_buf())
    }
}

/// What a copy with this configuration opens after the drop: see the module's documentation.
pub fn needs(config: &vmm::VmConfig, ft: Option<&crate::config::FtOptions>, qmp: Option<&Path>) -> Vec<Need> {
    use block::spec::Location;
    use vmm::devices::serial::{SerialLog, SerialSpec};
    let mut v = vec![Need::ReadWrite("the KVM device", config.kvm_device.clone())];
    for d in config.devices.disks.iter().filter(|d| d.graph.is_none()) {
        match &d.location {
            Location::Path(p) if d.readonly => v.push(Need::Read("the disk", p.clone())),
            Location::Path(p) => v.push(Need::ReadWrite("the disk", p.clone())),
            Location::NbdUnix { socket, .. } => v.push(Need::ReadWrite("the NBD socket", socket.clone())),
            Location::NbdTcp { .. } => {}
        }
    }
    for n in &config.devices.nets {
        if let vmm::net::TapSource::Name(name) = &n.tap {
            v.push(Need::TapOwned(name.clone()));
        }
    }
    match &config.serial {
        SerialSpec::Unix(p) => v.push(Need::dir_of("the serial socket's directory", p)),
        SerialSpec::File(p) => v.push(Need::file("the serial file", p)),
        _ => {}
    }
    if let Some(SerialLog::File { path, .. }) = &config.serial_log {
        v.push(Need::file("the serial log", path));
    }
    if let Some(c) = &config.console {
        v.push(Need::file("the console log", c));
    }
    for c in config.devices.virtio_serial.iter().flatten() {
        if let vmm::devices::channel::ChannelHost::Path(p) = &c.host {
            v.push(Need::dir_of("the virtio-serial socket's directory", p));
        }
    }
    if let Some(q) = qmp {
        v.push(Need::dir_of("the QMP socket's directory", q));
    }
    if let Some(crate::ft::tiebreak::Spec::File(p)) = ft.map(|f| &f.tiebreak) {
        v.push(Need::dir_of("the tie-breaker's directory", p));
        let mut lock = p.clone().into_os_string();
        lock.push(".lock");
        v.push(Need::file("the tie-breaker's lock file", Path::new(&lock)));
    }
    v
}

/// Whether the tap `name` is persistent and owned by `uid` (so that it can be attached to again
/// without privileges).
fn tap_owned(name: &str, uid: libc::uid_t) -> Result<(), String> {
    let sys = Path::new("/sys/class/net").join(name);
    let read = |f: &str| std::fs::read_to_string(sys.join(f)).map(|s| s.trim().to_string());
    let flags = read("tun_flags").map_err(|_| "is not a tap that exists now".to_string())?;
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
    let owner = read("owner").unwrap_or_default();
    const IFF_PERSIST: u32 = 0x0800;
    if flags & IFF_PERSIST == 0 || owner != uid.to_string() {
        return Err(format!(
            "must be a persistent tap owned by the user (ip tuntap add {name} mode tap user UID); owner is {owner}"
        ));
    }
    Ok(())
}

/// Hands the files this copy writes and created as root to `user` (before the drop).
pub fn hand_over_files(user: &User, needs: &[Need]) -> Result<(), PrivilegeError> {
    use std::os::unix::fs::MetadataExt;
    for need in needs {
        let Need::File(what, path) = need else { continue };
        if std::fs::metadata(path).is_ok_and(|m| m.uid() == 0 && m.is_file()) {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|source| {
                PrivilegeError::NoAccess { user: user.name.clone(), what, path: path.clone(), source }
            })?;
        }
    }
    Ok(())
}

/// Checks every need as the (already dropped to) `user`: the first one it lacks is the error.
pub fn check_access(user: &User, needs: &[Need]) -> Result<(), PrivilegeError> {
    for need in needs {
        let need = match need {
            Need::File(w, p) if p.exists() => &Need::ReadWrite(w, p.clone()),
            Need::File(w, p) => &Need::dir_of(w, p),
            other => other,
        };
        let (what, path, mode) = match need {
            Need::ReadWrite(w, p) => (*w, p, libc::R_OK | libc::W_OK),
            Need::Read(w, p) => (*w, p, libc::R_OK),
            Need::CreateIn(w, p) => (*w, p, libc::W_OK | libc::X_OK),
            Need::File(..) => continue,
            Need::TapOwned(name) => {
                if let Err(why) = tap_owned(name, user.uid) {
                    let source = std::io::Error::other(why);
                    let path = PathBuf::from(name);
                    return Err(PrivilegeError::NoAccess { user: user.name.clone(), what: "the tap", path, source });
                }
                continue;
            }
        };
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: access() reads the path, a valid C string.
        if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(PrivilegeError::NoAccess { user: user.name.clone(), what, path: path.clone(), source });
        }
    }
    Ok(())
}
