//! `smpft libvirt protect|unprotect|status` between two libvirt hosts the test starts: each a
//! libvirtd (and virtlogd) in a mount namespace of its own (its /etc/libvirt, /run/libvirt,
//! /var/lib/libvirt, logs and /run/smpft are the test's directories), host B also in a network
//! namespace, with a host name of its own, joined to this one by a veth pair. Identities come
//! from a site CA the test makes; each side accepts the other by the name libvirt reports.

mod common;

use common::{later, one_at_a_time, scratch, smpft, wait_for, wait_until, Scratch};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DOM: &str = "lvp-vm";
const POOL: &str = "ftpool";
const A_ADDR: &str = "198.51.100.1";
const B_ADDR: &str = "198.51.100.2";

/// A libvirt host of the test's.
struct Host {
    dir: Scratch,
    uri: String,
    pids: Vec<u32>,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn must(cmd: &mut Command) {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
}

impl Host {
    /// libvirtd and virtlogd with directories of their own; in `netns` and with `hostname` if
    /// given; `bin` first in their PATH (the persona as qemu-system-x86_64).
    fn start(name: &str, netns: Option<&str>, hostname: Option<&str>, bin: &Path) -> Host {
        let dir = scratch(name);
        std::fs::set_permissions(&*dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        must(Command::new("cp").args(["-a", "/etc/libvirt"]).arg(dir.join("etc")));
        must(Command::new("cp").args(["-a", "/var/lib/libvirt"]).arg(dir.join("lib")));
        // Nothing of the machine's own domains, pools or hooks: smpft's hook only.
        for sub in ["qemu", "storage", "storage/autostart", "hooks"] {
            for e in std::fs::read_dir(dir.join("etc").join(sub)).into_iter().flatten().flatten() {
                if e.path().is_file() || e.path().is_symlink() {
                    std::fs::remove_file(e.path()).unwrap();
                }
            }
        }
        let hook = dir.join("etc/hooks/qemu");
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(&hook, format!("#!/bin/sh\nexec {} libvirt-hook \"$@\"\n", common::smpft_bin().display()))
            .unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for d in ["run", "log", "cache", "smpft"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::create_dir_all("/run/smpft").unwrap();
        let mounts = [("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"), ("run", "/run/libvirt")]
            .into_iter()
            .chain([("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"), ("smpft", "/run/smpft")]);
        let mut script = String::from("set -e\n");
        if let Some(h) = hostname {
            script += &format!("hostname {h}\n");
        }
        for (from, to) in mounts {
            std::fs::create_dir_all(to).unwrap();
            script += &format!("mount --bind {} {to}\n", dir.join(from).display());
        }
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        script +=
            &format!("virtlogd -d -p {0}/virtlogd.pid\nPATH={path} libvirtd -d -p {0}/libvirtd.pid\n", dir.display());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        must(cmd.args(["--mount", "--uts", "--propagation", "private", "sh", "-c", &script]));
        let uri = format!("qemu+unix:///system?socket={}/run/libvirt-sock", dir.display());
        let mut host = Host { dir, uri, pids: Vec::new() };
        for d in ["virtlogd", "libvirtd"] {
            let pidfile = host.dir.join(format!("{d}.pid"));
            let pid = wait_for(format!("{d} wrote no pidfile"), Duration::from_secs(10), || {
                std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
            });
            host.pids.push(pid);
        }
        wait_until("libvirtd does not answer", Duration::from_secs(20), || host.virsh(&["version"]).status.success());
        host
    }

    fn virsh(&self, args: &[&str]) -> Output {
        run(Command::new("virsh").arg("-c").arg(&self.uri).args(args))
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(o.status.success(), "virsh {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn state(&self, dom: &str) -> String {
        String::from_utf8_lossy(&self.virsh(&["domstate", dom]).stdout).trim().to_string()
    }

    fn wait_state(&self, dom: &str, want: &str) {
        let what = later(|| format!("{dom} never became '{want}': {}\n{}", self.state(dom), self.log(dom)));
        wait_until(what, Duration::from_secs(30), || self.state(dom) == want);
    }

    fn log(&self, dom: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("log/qemu/{dom}.log"))).unwrap_or_default()
    }

    fn query_ft(&self, dom: &str) -> serde_json::Value {
        let out = self.ok(&["qemu-monitor-command", dom, r#"{"execute":"x-smpft-query-ft"}"#]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["return"].clone()
    }

    fn pid(&self, dom: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("run/qemu/{dom}.pid"))).unwrap().trim().parse().unwrap()
    }

    fn volumes(&self) -> String {
        self.ok(&["vol-list", POOL])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let names = String::from_utf8_lossy(&self.virsh(&["list", "--all", "--name"]).stdout).to_string();
        for d in names.lines().filter(|l| !l.trim().is_empty()) {
            let _ = self.virsh(&["destroy", d]);
            let _ = self.virsh(&["undefine", d]);
        }
        for pid in self.pids.drain(..).rev() {
            // SAFETY: signals only a daemon this test started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            // SAFETY: signal 0 only checks the process still exists.
            common::poll(Duration::from_secs(10), || unsafe { libc::kill(pid as i32, 0) } != 0);
        }
    }
}

/// Two hosts, the network between them, a bridge of one name on each, identities from a CA.
struct World {
    shared: Scratch,
    id: u32,
    bridge: String,
    a: Host,
    b: Host,
}

impl World {
    fn new(name: &str) -> World {
        common::require_kvm();
        let id = std::process::id() % 100_000;
        let (ns, bridge) = (format!("smpft-pb{id}"), format!("smpftpbr{id}"));
        let (va, vb) = (format!("smpftpa{id}"), format!("smpftpb{id}"));
        World::cleanup_net(id);
        let ip = |a: &[&str]| smp_ft::lan::ip(a).unwrap();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &ns]);
        ip(&["addr", "add", &format!("{A_ADDR}/24"), "dev", &va]);
        ip(&["link", "set", "dev", &va, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{B_ADDR}/24"), "dev", &vb]);
        ip(&["-n", &ns, "link", "set", "dev", &vb, "up"]);
        ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]);
        for netns in [None, Some(ns.as_str())] {
            let n: Vec<&str> = netns.map(|n| vec!["-n", n]).unwrap_or_default();
            ip(&[&n[..], &["link", "add", "name", &bridge, "type", "bridge"]].concat());
            ip(&[&n[..], &["link", "set", "dev", &bridge, "up"]].concat());
        }
        let shared = scratch(&format!("{name}-shared"));
        std::fs::set_permissions(&*shared, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let bin = shared.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(common::smpft_bin(), bin.join("qemu-system-x86_64")).unwrap();
        std::fs::write(shared.join("guest.elf"), smp_ft::guest::BUILTIN).unwrap();
        let a = Host::start(&format!("{name}-a"), None, None, &bin);
        let b = Host::start(&format!("{name}-b"), Some(&ns), Some("hostb"), &bin);
        let w = World { shared, id, bridge, a, b };
        w.identities();
        w
    }

    fn cleanup_net(id: u32) {
        for args in [
            vec!["netns".to_string(), "del".into(), format!("smpft-pb{id}")],
            vec!["link".into(), "del".into(), format!("smpftpa{id}")],
            vec!["link".into(), "del".into(), format!("smpftpbr{id}")],
        ] {
            let _ = Command::new("ip").args(&args).stderr(Stdio::null()).status();
        }
    }

    /// The site CA, and each host's identity signed by it under the name libvirt gives the host.
    fn identities(&self) {
        let ft = self.ft();
        let keygen = |args: &[&str]| {
            let o = run(smpft().arg("keygen").args(args));
            assert!(o.status.success(), "keygen {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        keygen(&["--new-ca", "--name", "test site CA", "--out", ft.join("ca").to_str().unwrap()]);
        for (host, dir) in [(&self.a, "a"), (&self.b, "b")] {
            let name = host.ok(&["hostname"]);
            let out = ft.join(dir);
            keygen(&["--name", &name, "--ca-sign", ft.join("ca").to_str().unwrap(), "--out", out.to_str().unwrap()]);
        }
        std::fs::create_dir_all(ft.join("tiebreak")).unwrap();
        let uid = String::from_utf8(run(Command::new("id").args(["-u", "libvirt-qemu"])).stdout).unwrap();
        must(Command::new("chown").args(["-R", uid.trim()]).arg(&ft));
    }

    fn ft(&self) -> PathBuf {
        self.shared.join("ft")
    }

    /// Host B's storage pool for the standby's volumes.
    fn pool(&self) {
        let target = self.b.dir.join("pool");
        self.b.ok(&["pool-define-as", POOL, "dir", "--target", target.to_str().unwrap()]);
        self.b.ok(&["pool-build", POOL]);
        self.b.ok(&["pool-start", POOL]);
    }

    /// The primary on host A: the test guest's serial service (and disk writes), a raw disk of
    /// `disk_mib`, a NIC on `bridge`.
    fn primary(&self, disk_mib: u64, bridge: &str) {
        let disk = self.shared.join("vm.raw");
        std::fs::File::create(&disk).unwrap().set_len(disk_mib << 20).unwrap();
        let xml = format!(
            "<domain type='kvm'><name>{DOM}</name><memory unit='MiB'>128</memory><vcpu>2</vcpu>\
             <os><type arch='x86_64' machine='smpft'>hvm</type><kernel>{}</kernel>\
             <cmdline>counter service disk disk-ws=4M duration=600s</cmdline></os>\
             <cpu mode='host-passthrough'/><on_poweroff>destroy</on_poweroff><devices><emulator>{}</emulator>\
             <controller type='pci' model='pci-root'/><controller type='usb' model='none'/><memballoon model='none'/>\
             <serial type='pty'/><console type='pty'/>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/></interface>\
             </devices></domain>",
            self.shared.join("guest.elf").display(),
            self.shared.join("bin/qemu-system-x86_64").display(),
            disk.display()
        );
        let path = self.shared.join("vm.xml");
        std::fs::write(&path, xml).unwrap();
        self.a.ok(&["define", path.to_str().unwrap()]);
        self.a.ok(&["start", DOM]);
    }

    /// `smpft libvirt ARGS` against host A: its output (stdout then stderr) and whether it
    /// succeeded.
    fn smpft_libvirt(&self, args: &[&str]) -> (bool, String) {
        let o = run(smpft().env("SMPFT_LOG", "info").arg("libvirt").args(args).args(["--connect", &self.a.uri]));
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        eprintln!("$ smpft libvirt {}\n{text}", args.join(" "));
        (o.status.success(), text)
    }

    /// `smpft libvirt protect` of the primary onto host B, with `extra` arguments.
    fn protect(&self, extra: &[&str]) -> (bool, String) {
        self.protect_at(&format!("{B_ADDR}:{}", self.port()), extra)
    }

    /// As [`World::protect`], the primary told to reach its standby at `addr`.
    fn protect_at(&self, addr: &str, extra: &[&str]) -> (bool, String) {
        let (ft, tb) = (self.ft(), self.ft().join("tiebreak"));
        let (a, b) = (ft.join("a"), ft.join("b"));
        let mut args = vec!["protect", DOM, "--to", &self.b.uri, "--pool", POOL, "--standby-addr", addr];
        args.extend(["--tiebreak-dir", tb.to_str().unwrap(), "--identity", a.to_str().unwrap()]);
        args.extend(["--standby-identity", b.to_str().unwrap(), "--set", "timeout=600ms"]);
        args.extend(extra);
        self.smpft_libvirt(&args)
    }

    fn port(&self) -> u16 {
        7400 + (self.id % 1000) as u16
    }

    /// Host B holds nothing of the domain: no domain, no volume.
    fn target_clean(&self) {
        assert_eq!(self.b.ok(&["list", "--all", "--name"]), "", "no domain left on host B");
        let vols = self.b.volumes();
        assert!(!vols.contains(DOM), "no volume left on host B:\n{vols}");
    }

    /// The primary runs, unprotected, and its service answers.
    fn primary_runs_unprotected(&self, console: &mut Console, id: u64) {
        assert_eq!(self.a.state(DOM), "running");
        assert_eq!(self.a.query_ft(DOM)["state"], "unprotected");
        assert_eq!(console.incr(id), Some(format!("OK {id} {id}")));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        World::cleanup_net(self.id);
    }
}

/// The guest's serial service through a domain's pseudo-terminal.
struct Console {
    f: std::fs::File,
    buf: Vec<u8>,
}

impl Console {
    fn open(host: &Host, dom: &str) -> Console {
        let pty = host.ok(&["ttyconsole", dom]);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&pty).unwrap();
        // SAFETY: termios calls on a terminal this test opened; `t` is written by tcgetattr first.
        unsafe {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            let mut t = std::mem::zeroed::<libc::termios>();
            libc::tcgetattr(fd, &mut t);
            libc::cfmakeraw(&mut t);
            t.c_cc[libc::VMIN] = 0;
            t.c_cc[libc::VTIME] = 1;
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
        Console { f, buf: Vec::new() }
    }

    /// `INCR id`; its reply line, or none within 3 s. Replies to earlier ids are passed over:
    /// after a failover the standby answers a request it holds from before the primary died,
    /// and then the client's retry of it again (idempotent: the same value).
    fn incr(&mut self, id: u64) -> Option<String> {
        self.f.write_all(format!("INCR {id}\n").as_bytes()).ok()?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                let l = String::from_utf8_lossy(&l).trim().to_string();
                if l.starts_with(&format!("OK {id} ")) {
                    return Some(l);
                }
                continue;
            }
            let mut b = [0u8; 256];
            let n = self.f.read(&mut b).unwrap_or(0);
            self.buf.extend_from_slice(&b[..n]);
        }
        None
    }
}

/// A client of the service under load: `INCR 1, 2, ...` back to back, each reply checked
/// (`OK n n`: every increment counted once). A request without a reply is sent again, on the
/// console the test hands over next if any (the standby's, after a failover). Returns the last
/// id answered and the longest wait for a reply on the first console (the protect included),
/// then on any (the failover included).
fn load(mut console: Console, next: mpsc::Receiver<Console>, stop: mpsc::Receiver<()>) -> (u64, Duration, Duration) {
    let (mut id, mut worst, mut worst_first, mut switched) = (0u64, Duration::ZERO, Duration::ZERO, false);
    while stop.try_recv().is_err() {
        id += 1;
        let sent = Instant::now();
        let reply = loop {
            if let Some(r) = console.incr(id) {
                break r;
            }
            console = next.recv_timeout(Duration::from_secs(60)).expect("no reply, and no other console to try");
            switched = true;
        };
        assert_eq!(reply, format!("OK {id} {id}"), "every increment counted once");
        worst = worst.max(sent.elapsed());
        if !switched {
            worst_first = worst;
        }
    }
    (id, worst_first, worst)
}

/// A running domain is protected with one command while its service is under load, with
/// nothing lost; then SIGKILL of the primary: the standby domain runs the VM, nothing lost.
#[test]
fn a_running_domain_is_protected_in_one_command_and_fails_over_with_nothing_lost() {
    let _one = one_at_a_time();
    let w = World::new("lvp-fail");
    w.pool();
    w.primary(1024, &w.bridge);
    let console = Console::open(&w.a, DOM);
    let (next_tx, next_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let client = std::thread::spawn(move || load(console, next_rx, stop_rx));
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let (ok, out) = w.protect(&[]);
    assert!(ok, "{out}\n{}", w.a.log(DOM));
    eprintln!("1 GiB raw disk: protected in {:.1} s", t.elapsed().as_secs_f64());
    assert!(out.contains(&format!("{DOM} protected by standby domain {DOM}")), "{out}");
    assert_eq!(w.b.state(DOM), "paused", "the standby domain shows paused");
    assert_eq!(w.a.query_ft(DOM)["state"], "protected");
    let vols = w.b.volumes();
    assert!(vols.contains(&format!("{DOM}-vda.raw")), "{vols}");
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill sends SIGKILL to the primary domain's process.
    unsafe { libc::kill(w.a.pid(DOM), libc::SIGKILL) };
    w.b.wait_state(DOM, "running");
    assert_eq!(w.b.query_ft(DOM)["state"], "live-after-failover");
    next_tx.send(Console::open(&w.b, DOM)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop_tx.send(()).unwrap();
    let (last, worst_protect, worst) = client.join().expect("the client saw every reply, in order");
    eprintln!("{last} requests; the longest wait for a reply {worst_protect:?} before the failover (the protect included), {worst:?} with it");
    let mut c = Console::open(&w.b, DOM);
    let n = last + 1;
    assert_eq!(c.incr(n), Some(format!("OK {n} {n}")), "nothing lost: the value goes on");
    w.a.wait_state(DOM, "shut off");
}

/// `status` lists the pair; a restart of both domains through libvirt protects the VM again
/// (the metadata kept); `unprotect` leaves the primary running unprotected and host B clean.
#[test]
fn the_pair_is_listed_kept_across_restarts_and_unprotect_leaves_the_primary_alone() {
    let _one = one_at_a_time();
    let w = World::new("lvp-pair");
    w.pool();
    w.primary(64, &w.bridge);
    let (ok, out) = w.protect(&[]);
    assert!(ok, "{out}");
    let (ok, a_status) = w.smpft_libvirt(&["status"]);
    assert!(ok && a_status.contains(&format!("{DOM} primary protected peer={B_ADDR}:{}", w.port())), "{a_status}");
    let b_status =
        String::from_utf8_lossy(&run(smpft().args(["libvirt", "status", "-c", &w.b.uri])).stdout).to_string();
    assert!(b_status.contains(&format!("{DOM} standby standby")), "{b_status}");
    // Both domains stopped and started again through libvirt: the pair holds.
    w.a.ok(&["destroy", DOM]);
    w.b.wait_state(DOM, "shut off");
    w.b.ok(&["start", "--paused", DOM]);
    w.a.ok(&["start", DOM]);
    let never = later(|| format!("never protected again: {}\n{}", w.a.query_ft(DOM), w.a.log(DOM)));
    wait_until(never, Duration::from_secs(60), || w.a.query_ft(DOM)["state"] == "protected");
    let mut c = Console::open(&w.a, DOM);
    assert_eq!(c.incr(1), Some("OK 1 1".into()), "the restarted VM's service answers");
    let (ok, out) = w.smpft_libvirt(&["unprotect", DOM, "--delete-storage"]);
    assert!(ok, "{out}");
    w.primary_runs_unprotected(&mut c, 2);
    w.target_clean();
    assert!(!w.a.ok(&["dumpxml", DOM]).contains("urn:smpft"), "the metadata is cleared");
    let (_, listed) = w.smpft_libvirt(&["status"]);
    assert!(listed.contains("no domain at") && listed.contains("has FT settings"), "{listed}");
}

/// Failures midway: each is named, what was created is undone, host B is left clean and the
/// VM never stops.
#[test]
fn failures_midway_are_undone_and_named_and_the_vm_runs_on() {
    let _one = one_at_a_time();
    let w = World::new("lvp-bad");
    // Only host A has this bridge.
    let only_a = format!("smpftpx{}", w.id);
    smp_ft::lan::ip(&["link", "add", "name", &only_a, "type", "bridge"]).unwrap();
    smp_ft::lan::ip(&["link", "set", "dev", &only_a, "up"]).unwrap();
    let _del = Defer(|| drop(Command::new("ip").args(["link", "del", &only_a]).status()));
    w.primary(64, &only_a);
    let mut c = Console::open(&w.a, DOM);
    let (ok, out) = w.protect(&[]);
    assert!(!ok && out.contains(&format!("no storage pool '{POOL}'")), "{out}");
    w.pool();
    let (ok, out) = w.protect(&[]);
    assert!(!ok && out.contains(&format!("there is no bridge {only_a}")), "{out}");
    w.primary_runs_unprotected(&mut c, 1);
    // The NIC moved to a bridge both hosts have (the domain restarted once for that).
    w.a.ok(&["destroy", DOM]);
    w.a.ok(&["undefine", DOM]);
    w.primary(64, &w.bridge);
    let mut c = Console::open(&w.a, DOM);
    let unreachable = format!("qemu+unix:///system?socket={}/nobody", w.shared.display());
    let (ok, out) = w.smpft_libvirt(&["protect", DOM, "--to", &unreachable, "--tiebreak-dir", "/tmp"]);
    assert!(!ok && out.contains("cannot connect to libvirt at"), "{out}");
    // The standby is created, and the primary cannot reach it (an address nobody has): the
    // volume and the standby domain are removed again.
    let (ok, out) = w.protect_at("198.51.100.3:7399", &[]);
    assert!(!ok && out.contains("cannot reach the standby 198.51.100.3:7399"), "{out}");
    assert!(out.contains("undone: deleted volume") && out.contains("undone: undefined the standby domain"), "{out}");
    w.target_clean();
    // (The restarted VM counts from zero again.)
    w.primary_runs_unprotected(&mut c, 1);
    // A standby whose certificate names another host than the one expected is refused.
    let (ok, out) = w.protect(&["--standby-name", "host-c"]);
    assert!(!ok && out.contains("does not name host-c"), "{out}");
    w.target_clean();
    w.primary_runs_unprotected(&mut c, 2);
}

/// The QMP command the protect uses: a VM started without FT settings is refused with how to
/// give them; settings are checked by their metadata names before anything starts; turning
/// protection off on an unprotected VM changes nothing.
#[test]
fn protect_over_qmp_checks_its_settings_and_unprotect_of_an_unprotected_vm_is_harmless() {
    let _one = one_at_a_time();
    let dir = scratch("lvp-qmp");
    let p = common::VmPaths::new(&dir, "vm");
    let _vm = p.spawn(&["--vcpus", "1", "--memory", "32M", "--guest-args", "counter service"]);
    let mut q = common::Qmp::negotiated(&p.qmp);
    let refused = |q: &mut common::Qmp, args: serde_json::Value| {
        let r = q.execute("x-smpft-protect", Some(args));
        r["error"]["desc"].as_str().unwrap_or_else(|| panic!("accepted: {r}")).to_string()
    };
    let peer = "127.0.0.1:9";
    let e = refused(&mut q, serde_json::json!({ "peer": peer }));
    assert!(e.contains("give x-smpft-protect its settings"), "{e}");
    let e = refused(&mut q, serde_json::json!({ "peer": peer, "settings": {"colour": "red"} }));
    assert!(e.contains("'colour' is not a fault tolerance setting"), "{e}");
    let e = refused(&mut q, serde_json::json!({ "peer": peer, "settings": {"tiebreak": "/tmp/tb"} }));
    assert!(e.contains("fault tolerance needs <smpft:identity>, <smpft:peer-cert>"), "{e}");
    let e = refused(&mut q, serde_json::json!({ "peer": peer, "settings": {"peer": "a:1"} }));
    assert!(e.contains("'peer' is not a fault tolerance setting"), "the peer is the command's own: {e}");
    assert_eq!(q.ok("x-smpft-unprotect", None), serde_json::json!({}));
    assert_eq!(q.ok("x-smpft-query-ft", None)["state"], "unprotected");
    assert_eq!(q.ok("query-status", None)["status"], "running");
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
