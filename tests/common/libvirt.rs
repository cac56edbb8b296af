//! A real libvirtd for the tests of smpft's QEMU persona (started by a test, stopped by its
//! pid), `virsh` as an operator runs it, a bridge for guests' NICs, FT pairs of domains.

use super::{later, poll, require_kvm, scratch, wait_for, wait_until, Scratch};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// libvirt's daemons, started by this test with the persona first in libvirtd's PATH, and
/// stopped by their pids on drop.
pub struct Libvirt {
    pub started: Vec<(&'static str, u32)>,
    pub dir: Scratch,
    /// This test installed libvirt's qemu hook (removed on drop).
    pub hook: bool,
}

pub const HOOK: &str = "/etc/libvirt/hooks/qemu";

pub fn pid_of(pidfile: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    (unsafe { libc::kill(pid as i32, 0) } == 0).then_some(pid)
}

impl Libvirt {
    pub fn start(name: &str) -> Libvirt {
        Self::start_with(name, false)
    }

    /// As [`Libvirt::start`]; with `hook`, smpft's qemu hook is installed first (it must not
    /// be there already: it would be someone else's).
    pub fn start_with(name: &str, hook: bool) -> Libvirt {
        require_kvm();
        for tool in ["virsh", "libvirtd", "virtlogd"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
            assert!(found.status.success(), "{tool} is missing: run scripts/setup (it installs libvirt)");
        }
        for (d, p) in [("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")] {
            assert!(pid_of(p).is_none(), "a {d} not started by this test is running; stop it first");
        }
        let dir = scratch(name);
        // libvirt runs the emulator as an unprivileged user: everything it reads must be readable.
        std::fs::set_permissions(&*dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(super::smpft_bin(), bin.join("qemu-system-x86_64")).unwrap();
        std::fs::write(dir.join("guest.elf"), smp_ft::guest::BUILTIN).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        if hook {
            assert!(!Path::new(HOOK).exists(), "{HOOK} exists and is not this test's: remove it to run this test");
            std::fs::create_dir_all("/etc/libvirt/hooks").unwrap();
            let script = format!("#!/bin/sh\nexec {} libvirt-hook \"$@\"\n", super::smpft_bin().display());
            std::fs::write(HOOK, script).unwrap();
            std::fs::set_permissions(HOOK, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let mut lv = Libvirt { started: Vec::new(), dir, hook };
        for (d, p) in [("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")] {
            let st = Command::new(d).arg("-d").env("PATH", &path).status().unwrap();
            assert!(st.success(), "{d} -d failed");
            let pid = wait_for(format!("{d} wrote no pidfile"), Duration::from_secs(10), || pid_of(p));
            lv.started.push((d, pid));
        }
        wait_until("libvirtd does not answer", Duration::from_secs(20), || virsh(&["version"]).status.success());
        lv
    }

    pub fn emulator(&self) -> PathBuf {
        self.dir.join("bin/qemu-system-x86_64")
    }

    /// Restarts libvirtd (domains keep running; libvirt reconnects to them).
    pub fn restart_libvirtd(&mut self) {
        let (_, pid) = self.started.pop().unwrap();
        stop(pid);
        let st = Command::new("libvirtd").arg("-d").env("PATH", self.path()).status().unwrap();
        assert!(st.success());
        let pid = wait_for("libvirtd did not come back", Duration::from_secs(10), || pid_of("/run/libvirtd.pid"));
        self.started.push(("libvirtd", pid));
        let answers = || virsh(&["version"]).status.success();
        wait_until("the restarted libvirtd does not answer", Duration::from_secs(20), answers);
    }

    pub fn path(&self) -> String {
        format!("{}:{}", self.dir.join("bin").display(), std::env::var("PATH").unwrap_or_default())
    }

    /// A domain XML running the test guest with `args`, and `devices` added.
    pub fn domain(&self, name: &str, args: &str, devices: &str) -> PathBuf {
        self.domain_with(name, args, devices, "")
    }

    /// As [`Libvirt::domain`], with `metadata` (the inside of `<metadata>`).
    pub fn domain_with(&self, name: &str, args: &str, devices: &str, metadata: &str) -> PathBuf {
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><metadata>{metadata}</metadata><memory unit='MiB'>128</memory><vcpu>2</vcpu>\
             <os><type arch='x86_64' machine='smpft'>hvm</type><kernel>{}</kernel><cmdline>{args}</cmdline></os>\
             <cpu mode='host-passthrough'/><on_poweroff>destroy</on_poweroff><devices><emulator>{}</emulator>\
             <controller type='pci' model='pci-root'/><controller type='usb' model='none'/><memballoon model='none'/>\
             <serial type='pty'/><console type='pty'/>{devices}</devices></domain>",
            self.dir.join("guest.elf").display(),
            self.emulator().display()
        );
        let path = self.dir.join(format!("{name}.xml"));
        std::fs::write(&path, xml).unwrap();
        path
    }
}

pub fn stop(pid: u32) {
    // SAFETY: signals only the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // (No failure if it lingers: this runs on drop too.)
    // SAFETY: signal 0 only checks the process still exists.
    poll(Duration::from_secs(10), || unsafe { libc::kill(pid as i32, 0) } != 0);
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for d in
            ["lv-life", "lv-io", "lv-bad-kernel", "lv-bad-dev", "lv-bad-disk", "lv-ftp", "lv-fts", "lv-pc", "lv-vi"]
                .into_iter()
                .chain(["lv-nova", "lv-novap", "lv-novas"])
        {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
        for (_, pid) in self.started.drain(..).rev() {
            stop(pid);
        }
        if self.hook {
            let _ = std::fs::remove_file(HOOK);
        }
    }
}

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().unwrap()
}

/// `virsh ARGS`, which must succeed; its output.
pub fn ok(args: &[&str]) -> String {
    let o = virsh(args);
    assert!(o.status.success(), "virsh {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn state(dom: &str) -> String {
    ok(&["domstate", "--reason", dom])
}

pub fn wait_state(dom: &str, want: &str) {
    let what = later(|| format!("{dom} never became '{want}': {}", state(dom)));
    wait_until(what, Duration::from_secs(20), || state(dom).starts_with(want));
}

/// A request to the guest's service over `virsh console`'s terminal (the domain's pty).
pub fn console_request(dom: &str, line: &str) -> String {
    let pty = ok(&["ttyconsole", dom]);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&pty).unwrap();
    // SAFETY: termios calls on a terminal we opened; `t` is written by tcgetattr first.
    unsafe {
        let mut t = std::mem::zeroed::<libc::termios>();
        libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(&f), &mut t);
        libc::cfmakeraw(&mut t);
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 1;
        libc::tcsetattr(std::os::fd::AsRawFd::as_raw_fd(&f), libc::TCSANOW, &t);
    }
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"\n") && Instant::now() < deadline {
        let mut b = [0u8; 256];
        let n = f.read(&mut b).unwrap_or(0);
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&got).trim().to_string()
}

pub fn log(dom: &str) -> String {
    std::fs::read_to_string(format!("/var/log/libvirt/qemu/{dom}.log")).unwrap_or_default()
}

/// The domain's log since libvirt last started it (libvirt appends to the log of a name).
pub fn last_start_log(dom: &str) -> String {
    let l = log(dom);
    let from = l.rfind("starting up libvirt").unwrap_or(0);
    l[from..].to_string()
}

/// A bridge in this namespace for the guests' NICs (no address of its own) and a client in a
/// namespace of its own on it, 203.0.113.1/24.
pub struct Bridge {
    pub bridge: String,
    pub ns: String,
}

impl Bridge {
    pub fn new() -> Bridge {
        let id = std::process::id() % 100_000;
        let b = Bridge { bridge: format!("smpftbr{id}"), ns: format!("smpft-lvcl{id}") };
        let ip = |a: &[&str]| smp_ft::lan::ip(a).unwrap();
        let _ = Command::new("ip").args(["netns", "del", &b.ns]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["link", "del", &b.bridge]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &b.ns]);
        ip(&["link", "add", "name", &b.bridge, "type", "bridge"]);
        ip(&["link", "set", "dev", &b.bridge, "up"]);
        let port = format!("smpftcl{id}");
        // A namespace just deleted may leave its veth's other end behind for a moment.
        let _ = Command::new("ip").args(["link", "del", &port]).stderr(Stdio::null()).status();
        ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &b.ns]);
        ip(&["link", "set", "dev", &port, "master", &b.bridge, "up"]);
        ip(&["-n", &b.ns, "addr", "add", "203.0.113.1/24", "dev", "eth0"]);
        ip(&["-n", &b.ns, "link", "set", "dev", "eth0", "up"]);
        ip(&["-n", &b.ns, "link", "set", "dev", "lo", "up"]);
        b
    }

    pub fn client(&self, cmd: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.ns]).args(cmd).output().unwrap()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// FT metadata for a domain: `role`, this host's identity `me`, the peer's certificate, and
/// `addr` (the `<smpft:peer>` or `<smpft:listen>` element). The silence timeout is generous:
/// these tests run several domains at once on two cores, and a standby starved of CPU past the
/// default 150 ms would be declared lost (correctly, but not what the tests are about).
pub fn ft_meta(ft_dir: &Path, role: &str, me: &str, peer: &str, addr: &str) -> String {
    let (id, cert, tb) = (ft_dir.join(me), ft_dir.join(peer).join("cert.pem"), ft_dir.join("tiebreak"));
    format!(
        "<smpft:ft xmlns:smpft='urn:smpft:libvirt:1'><smpft:role>{role}</smpft:role>{addr}\
         <smpft:tiebreak>{}</smpft:tiebreak><smpft:identity>{}</smpft:identity><smpft:peer-cert>{}</smpft:peer-cert><smpft:timeout>600ms</smpft:timeout></smpft:ft>",
        tb.display(),
        id.display(),
        cert.display()
    )
}

/// Identities for hosts a and b, owned by the user libvirt runs domains as (with the
/// tie-breaker's directory).
pub fn ft_identities(lv: &Libvirt) -> PathBuf {
    let uid = String::from_utf8(Command::new("id").args(["-u", "libvirt-qemu"]).output().unwrap().stdout).unwrap();
    let ft_dir = lv.dir.join("ft");
    std::fs::create_dir_all(&ft_dir).unwrap();
    for host in ["a", "b"] {
        let o = super::smpft().args(["keygen", "--name", host, "--out"]).arg(ft_dir.join(host)).output().unwrap();
        assert!(o.status.success());
    }
    assert!(Command::new("chown").args(["-R", uid.trim()]).arg(&ft_dir).status().unwrap().success());
    ft_dir
}

pub fn query_ft(dom: &str) -> String {
    ok(&["qemu-monitor-command", dom, r#"{"execute":"x-smpft-query-ft"}"#])
}

/// Defines the pair lv-fts (standby, started paused) and lv-ftp (primary), starts them and
/// waits until the primary is protected.
pub fn ft_pair(lv: &Libvirt) {
    let ft_dir = ft_identities(lv);
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let guest = "counter service duration=600s";
    let s_meta = ft_meta(&ft_dir, "standby", "b", "a", &format!("<smpft:listen>127.0.0.1:{port}</smpft:listen>"));
    // A list of spares: the standby, then an address where nothing listens.
    let p_meta =
        ft_meta(&ft_dir, "primary", "a", "b", &format!("<smpft:peer>127.0.0.1:{port},127.0.0.1:9</smpft:peer>"));
    let (sx, px) = (lv.domain_with("lv-fts", guest, "", &s_meta), lv.domain_with("lv-ftp", guest, "", &p_meta));
    ok(&["define", sx.to_str().unwrap()]);
    ok(&["define", px.to_str().unwrap()]);
    ok(&["start", "--paused", "lv-fts"]);
    wait_state("lv-fts", "paused");
    ok(&["start", "lv-ftp"]);
    let never = later(|| format!("never protected: {}\n{}", query_ft("lv-ftp"), log("lv-ftp")));
    wait_until(never, Duration::from_secs(30), || query_ft("lv-ftp").contains(r#""state":"protected""#));
}
