//! Mirrored disks end to end: a guest that writes its virtio-blk disk hard and checks it against
//! the generations it keeps in memory, protected by a standby with storage of its own (raw files,
//! and images served by qemu-nbd and nbdkit); real SIGKILL, real NBD servers, `qemu-img compare`.

mod common;

use common::disk_kills::{self, console_tail, Kill};
use common::ft::{free_port, log, spawn, wait_exit, wait_query, wait_state, FtSetup, Side};
use common::{later, one_at_a_time, require_kvm, seeded_rng, wait_until, Proc, VmPaths};
use smpft_client::FailoverClient;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DISK_SIZE: &str = "32M";
/// The guest writes its disk flat out (reading each write back), rewrites memory pages whose
/// contents it checks (churn), serves the failover client and keeps its counter invariant; it
/// exits only when told (or after 10 minutes).
const GUEST: &str = "counter churn churn-rate=2000 churn-ws=2M service disk flush-every=8 duration=600s";

fn tool(name: &str) -> Command {
    assert!(
        Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()),
        "{name} is missing: run scripts/setup (it installs qemu-utils, nbdkit and libnbd-bin)"
    );
    Command::new(name)
}

fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn raw_image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn image(path: &Path, format: &str) {
    run_ok(tool("qemu-img").args(["create", "-q", "-f", format]).arg(path).arg(DISK_SIZE));
}

/// An NBD server run for a test, stopped by its pid (SIGKILL if the test fails first).
struct Server {
    child: Proc,
    uri: String,
}

fn wait_for(path: &Path) {
    wait_until(format!("{} did not appear", path.display()), Duration::from_secs(20), || path.exists());
}

/// `qemu-nbd` serving `image` in `format` on a unix socket.
fn qemu_nbd(image: &Path, format: &str) -> Server {
    let socket = image.with_extension("sock");
    let child = tool("qemu-nbd")
        .args(["--persistent", "--export-name", "vm", "--cache", "writeback", "--format", format, "--socket"])
        .arg(&socket)
        .arg(image)
        .spawn()
        .unwrap();
    wait_for(&socket);
    Server { child: Proc::new(child), uri: format!("nbd+unix:///vm?socket={}", socket.display()) }
}

/// `nbdkit` serving `image` with its file plugin on a unix socket.
fn nbdkit_file(image: &Path) -> Server {
    nbdkit_file_with(image, &[], &[])
}

/// As [`nbdkit_file`], with `filters` and the plugin's `params`.
fn nbdkit_file_with(image: &Path, filters: &[&str], params: &[&str]) -> Server {
    let socket = image.with_extension("sock");
    let pidfile = image.with_extension("pid");
    let child = tool("nbdkit")
        .args(["--foreground", "--exportname", "vm", "--unix"])
        .arg(&socket)
        .arg("--pidfile")
        .arg(&pidfile)
        .args(filters)
        .arg("file")
        .arg(image)
        .args(params)
        .spawn()
        .unwrap();
    wait_for(&pidfile);
    Server { child: Proc::new(child), uri: format!("nbd+unix:///vm?socket={}", socket.display()) }
}

impl Server {
    /// SIGTERM, and waits: the server flushes and exits.
    fn stop(self) {
        common::signal(&self.child, libc::SIGTERM);
        wait_exit(self.child, Duration::from_secs(10));
    }
}

fn compare(a: &Path, a_format: &str, b: &Path, b_format: &str) -> Result<(), String> {
    let o = tool("qemu-img").args(["compare", "-f", a_format, "-F", b_format]).arg(a).arg(b).output().unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
}

fn side<'a>(setup: &'a FtSetup, primary: bool) -> Side<'a> {
    let (me, peer) = if primary { (&setup.a, &setup.b) } else { (&setup.b, &setup.a) };
    Side { me, peer, tiebreak: &setup.tiebreak, env: &[], netns: None }
}

fn standby(setup: &FtSetup, p: &VmPaths, listen: &str, disk: &str, env: &[(&str, &str)]) -> Proc {
    standby_with(setup, p, listen, disk, env, &[])
}

fn standby_with(setup: &FtSetup, p: &VmPaths, listen: &str, disk: &str, env: &[(&str, &str)], extra: &[&str]) -> Proc {
    let side = Side { env, ..side(setup, false) };
    let args = ["standby", "--listen", listen, "--vcpus", "2", "--memory", "128M", "--disk", disk];
    spawn(p, &side, &[&args[..], extra].concat())
}

/// (disk bytes sent, disk bytes found identical) of the primary's latest initial copy.
fn last_copy(p: &VmPaths) -> (u64, u64) {
    let log = log(p);
    let line = log.lines().rev().find(|l| l.contains("the VM is protected")).expect("a finished copy");
    let field = |k: &str| -> u64 {
        line.split_whitespace().find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok()).unwrap()
    };
    (field("disk_bytes"), field("disk_same"))
}

fn primary(setup: &FtSetup, p: &VmPaths, peer: &str, disk: &str, guest: &str, env: &[(&str, &str)]) -> Proc {
    primary_with(setup, p, peer, disk, guest, env, &[])
}

fn primary_with(
    setup: &FtSetup,
    p: &VmPaths,
    peer: &str,
    disk: &str,
    guest: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    let side = Side { env, ..side(setup, true) };
    let args = ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--ft-peer", peer, "--disk", disk];
    spawn(p, &side, &[&args[..], extra].concat())
}

/// A protected guest writes for a while and exits by itself; the standby then holds exactly what
/// the primary's disk holds. Standby storage of every kind: a raw file, qcow2 and VMDK images
/// through qemu-nbd, a raw image through nbdkit; the primary's disk raw, and qcow2 through
/// qemu-nbd.
#[test]
fn after_a_clean_shutdown_both_disks_are_identical() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-identical");
    let dir = setup.dir.to_path_buf();
    let cases: [(&str, &str); 4] = [("raw", "raw"), ("raw", "qcow2"), ("qcow2", "vmdk"), ("raw", "nbdkit")];
    for (i, (p_kind, s_kind)) in cases.iter().enumerate() {
        let what = format!("primary {p_kind}, standby {s_kind}");
        let p_img = dir.join(format!("p{i}.{p_kind}"));
        let s_img = dir.join(format!("s{i}.{}", if *s_kind == "nbdkit" { "raw" } else { s_kind }));
        let mut servers = Vec::new();
        let p_spec = if *p_kind == "raw" {
            raw_image(&p_img, 32 << 20);
            p_img.display().to_string()
        } else {
            image(&p_img, p_kind);
            let s = qemu_nbd(&p_img, p_kind);
            let uri = s.uri.clone();
            servers.push(s);
            uri
        };
        let s_spec = match *s_kind {
            "raw" => {
                raw_image(&s_img, 32 << 20);
                s_img.display().to_string()
            }
            "nbdkit" => {
                raw_image(&s_img, 32 << 20);
                let s = nbdkit_file(&s_img);
                let uri = s.uri.clone();
                servers.push(s);
                uri
            }
            format => {
                image(&s_img, format);
                let s = qemu_nbd(&s_img, format);
                let uri = s.uri.clone();
                servers.push(s);
                uri
            }
        };
        let addr = format!("127.0.0.1:{}", free_port());
        let (pp, sp) = (setup.paths(&format!("p{i}")), setup.paths(&format!("s{i}")));
        let sb = standby(&setup, &sp, &addr, &s_spec, &[]);
        wait_state(&sp, "waiting", Duration::from_secs(10));
        let pr = primary(&setup, &pp, &addr, &p_spec, "disk flush-every=8 duration=4s report=1s", &[]);
        wait_state(&pp, "protected", Duration::from_secs(30));
        let status = wait_exit(pr, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{what}: the guest's disk check\n{}\n{}", console_tail(&pp), log(&pp));
        let status = wait_exit(sb, Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "{what}: the standby stands down cleanly\n{}", log(&sp));
        assert!(pp.console().contains("disk: writes="), "{what}: the guest wrote\n{}", pp.console());
        for s in servers {
            s.stop();
        }
        let fmt = |k: &'static str| if k == "nbdkit" { "raw" } else { k };
        compare(&p_img, fmt(p_kind), &s_img, fmt(s_kind)).unwrap_or_else(|e| {
            panic!("{what}: qemu-img compare: {e}\nprimary:\n{}\nstandby:\n{}", log(&pp), log(&sp))
        });
    }
}

/// The primary is SIGKILLed while its guest writes the disk flat out: mid-epoch, right after a
/// send, right after an acknowledgement, while the standby writes a committed epoch to its
/// storage, and at random. The standby goes live; the failover client sees nothing lost; and
/// the guest, told to exit, reads its whole disk back and finds every unit at the generation its
/// memory records, and its churn pages and counters intact (exit status 0), on the promoted copy.
/// Checkpoint pages are encoded in every way over the trials: deltas with the default cache and
/// with a 64 KiB one (evicting all the time), LZ4 only, and whole pages.
#[test]
fn primary_killed_while_the_guest_writes_its_disk() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-kills");
    let (_seed, mut r) = seeded_rng();
    for trial in 0..12u64 {
        let kill = Kill::nth(trial, &mut r);
        let dir = setup.dir.to_path_buf();
        let (p_img, s_img) = (dir.join(format!("p{trial}.raw")), dir.join(format!("s{trial}.raw")));
        raw_image(&p_img, 32 << 20);
        raw_image(&s_img, 32 << 20);
        let encoding: &[&str] = match trial % 4 {
            0 => &[],
            1 => &["--ft-compress-cache", "64K"],
            2 => &["--ft-compress", "lz4"],
            _ => &["--ft-compress", "none"],
        };
        let what = format!("{} {encoding:?}", kill.what);
        let (p_disk, s_disk) = (p_img.display().to_string(), s_img.display().to_string());
        let standby = ["--vcpus", "2", "--memory", "128M", "--disk", &s_disk];
        let primary = [&["--vcpus", "2", "--memory", "128M", "--guest-args", GUEST, "--disk", &p_disk][..], encoding];
        let console = disk_kills::run(&setup, &trial.to_string(), &kill, &standby, &primary.concat());
        let verified = disk_kills::verified(&console);
        assert!(verified > 0, "{what}: the guest read its disk back\n{console}");
        eprintln!("{what}: standby went live; the guest verified {verified} units of its disk");
        std::fs::remove_file(&p_img).ok();
        std::fs::remove_file(&s_img).ok();
    }
}

/// The standby dies during the initial copy, then again once protected: each time the primary
/// carries on unprotected with its disk intact, and a new standby on the same storage protects
/// it again with `--disk-sync compare`, which copies only what differs. At the end the guest
/// finds its whole disk as its memory says, and the last standby's disk equals the primary's.
#[test]
fn standby_killed_during_sync_and_when_protected_then_protected_again() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-standby-killed");
    let dir = setup.dir.to_path_buf();
    let (p_img, s_img) = (dir.join("p.raw"), dir.join("s.raw"));
    raw_image(&p_img, 256 << 20);
    raw_image(&s_img, 256 << 20);
    let s_spec = s_img.display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let pp = setup.paths("p");
    let sp0 = setup.paths("s0");
    let mut sb = standby(&setup, &sp0, &addr, &s_spec, &[]);
    wait_state(&sp0, "waiting", Duration::from_secs(10));
    let guest = "counter service disk disk-ws=32M flush-every=8 duration=600s";
    let pr = primary(&setup, &pp, &addr, &p_img.display().to_string(), guest, &[]);
    let mut client = FailoverClient::new(vec![pp.serial.clone()], 1);
    // 256 MiB of disk go in 32 MiB rounds: the copy is under way for a while.
    wait_query(&pp, "the copy never started", Duration::from_secs(20), |q| q["sync-round"].as_u64() >= Some(2));
    sb.sigkill();
    wait_state(&pp, "unprotected", Duration::from_secs(10));
    for _ in 0..20 {
        client.incr(Duration::from_secs(10)).expect("the primary serves while unprotected");
    }
    for round in 1..=2 {
        let sp = setup.paths(&format!("s{round}"));
        let mut sb = standby_with(&setup, &sp, &addr, &s_spec, &[], &["--disk-sync", "compare"]);
        wait_state(&pp, "protected", Duration::from_secs(30));
        let (sent, same) = last_copy(&pp);
        eprintln!("re-protect {round}: {sent} disk bytes sent, {same} found identical");
        assert!(same >= 128 << 20, "re-protect {round}: most of the disk was already there ({same} bytes)");
        assert!(sent < 128 << 20, "re-protect {round}: only what differs is sent ({sent} bytes)");
        assert!(log(&sp).contains("hashed this copy's disks"), "{}", log(&sp));
        for _ in 0..50 {
            client.incr(Duration::from_secs(10)).expect("protected again");
        }
        if round == 1 {
            sb.sigkill();
            wait_state(&pp, "unprotected", Duration::from_secs(10));
            for _ in 0..20 {
                client.incr(Duration::from_secs(10)).expect("unprotected again");
            }
            continue;
        }
        let bye = client.exit().expect("EXIT");
        assert_eq!(Some(bye), client.last);
        let status = wait_exit(pr, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "the guest's disk check on the primary\n{}", console_tail(&pp));
        let status = wait_exit(sb, Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "{}", log(&sp));
        compare(&p_img, "raw", &s_img, "raw").unwrap_or_else(|e| panic!("qemu-img compare: {e}"));
        return;
    }
}

/// NBD servers that die: the standby's (it stands down; the primary carries on unprotected and
/// its guest keeps a consistent disk) and the primary's (the guest gets I/O errors, and the log
/// says why).
#[test]
fn nbd_servers_that_die_are_survived_or_reported() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-nbd-dies");
    let dir = setup.dir.to_path_buf();
    let (p_img, s_img) = (dir.join("p.raw"), dir.join("s.qcow2"));
    raw_image(&p_img, 32 << 20);
    image(&s_img, "qcow2");
    let server = qemu_nbd(&s_img, "qcow2");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let sb = standby(&setup, &sp, &addr, &server.uri, &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let pr = primary(&setup, &pp, &addr, &p_img.display().to_string(), GUEST, &[]);
    let mut client = FailoverClient::new(vec![pp.serial.clone()], 1);
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut server = server;
    server.child.sigkill();
    // The standby stands down, says why, and refuses to protect until its storage is back.
    let down = later(|| format!("the standby did not stand down\n{}", log(&sp)));
    wait_until(down, Duration::from_secs(20), || log(&sp).contains("could not go live"));
    assert!(log(&sp).contains("writing disk 0 failed"), "the standby says why\n{}", log(&sp));
    assert!(!log(&sp).contains("goes live"), "{}", log(&sp));
    let mut sb = sb;
    sb.sigkill();
    wait_state(&pp, "unprotected", Duration::from_secs(20));
    for _ in 0..50 {
        client.incr(Duration::from_secs(10)).expect("the primary carries on");
    }
    client.exit().expect("EXIT");
    let status = wait_exit(pr, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "the primary's disk is intact\n{}", console_tail(&pp));

    // The primary's own disk behind an NBD server that dies.
    let q_img = dir.join("q.qcow2");
    image(&q_img, "qcow2");
    let mut server = qemu_nbd(&q_img, "qcow2");
    let qp = setup.paths("q");
    let vm = common::smpft()
        .args(["run", "--vcpus", "2", "--memory", "128M", "--guest-args", "disk duration=60s", "--disk", &server.uri])
        .arg("--console")
        .arg(&qp.console)
        .args(["--serial", "null"])
        .stderr(std::fs::File::create(qp.console.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let vm = Proc::new(vm);
    let started = || qp.console().contains("progress") || qp.console().contains("disk: ");
    wait_until(later(|| format!("the guest never started\n{}", log(&qp))), Duration::from_secs(20), started);
    // The time is the point: the guest writes through the server for a while before it dies.
    std::thread::sleep(Duration::from_millis(300));
    server.child.sigkill();
    let status = wait_exit(vm, Duration::from_secs(30));
    // The test guest treats an I/O error as fatal (exit status 3); smpft exits with its status.
    assert_eq!(status.code(), Some(3), "the guest fails its disk workload\n{}", log(&qp));
    assert!(log(&qp).contains("the guest gets an I/O error"), "{}", log(&qp));
    assert!(qp.console().contains("with status 1"), "the guest saw VIRTIO_BLK_S_IOERR\n{}", qp.console());
}

/// A guest's disk workload over an export that accepts only 4 KiB-aligned requests of at most
/// 64 KiB (nbdkit's blocksize-policy filter fails any other with EINVAL): the guest writes
/// 1536-byte units (never aligned) and reads each back, and every check passes; the image then
/// holds what the guest wrote through the server.
#[test]
fn a_guest_writes_through_an_nbd_export_with_block_size_limits() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-nbd-blocks");
    let img = setup.dir.join("b.raw");
    raw_image(&img, 32 << 20);
    let params = ["blocksize-minimum=4096", "blocksize-maximum=65536", "blocksize-error-policy=error"];
    let server = nbdkit_file_with(&img, &["--filter=blocksize-policy"], &params);
    let qp = setup.paths("b");
    let guest = "disk disk-io=1536 disk-check=1 flush-every=4 duration=5s";
    let vm = common::smpft()
        .args(["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--disk", &server.uri])
        .arg("--console")
        .arg(&qp.console)
        .args(["--serial", "null"])
        .stderr(std::fs::File::create(qp.console.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(Proc::new(vm), Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "the guest's checks pass\n{}\n{}", log(&qp), console_tail(&qp));
    assert!(!log(&qp).contains("I/O error"), "{}", log(&qp));
    server.stop();
    let written = std::fs::read(&img).unwrap().iter().filter(|&&b| b != 0).count();
    assert!(written > 1536, "the guest's writes are in the image ({written} non-zero bytes)");
}

/// Disks that cannot pair: sizes differ (refused when the primary connects, on both sides), a
/// standby without the disk, and bad specs on the command line.
#[test]
fn mismatched_disks_and_bad_specs_are_refused_clearly() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("disk-mismatch");
    let dir = setup.dir.to_path_buf();
    let (p_img, s_img) = (dir.join("p.raw"), dir.join("s.raw"));
    raw_image(&p_img, 32 << 20);
    raw_image(&s_img, 16 << 20);
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let sb = standby(&setup, &sp, &addr, &s_img.display().to_string(), &[]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let mut pr = primary(&setup, &pp, &addr, &p_img.display().to_string(), GUEST, &[]);
    let status = wait_exit(sb, Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        log(&sp).contains("disks differ: this side has 16777216 bytes, the peer")
            && log(&sp).contains("33554432 bytes"),
        "{}",
        log(&sp)
    );
    let q = wait_query(&pp, "the primary reports the mismatch", Duration::from_secs(10), |q| {
        q["last-error"].as_str().is_some_and(|e| e.contains("disks differ"))
    });
    assert_eq!(q["state"], "unprotected");
    pr.sigkill();

    // A standby cannot keep a copy on storage it may not write.
    let ro = dir.join("ro.qcow2");
    image(&ro, "qcow2");
    let ro_server = {
        let socket = ro.with_extension("sock");
        let child = tool("qemu-nbd")
            .args(["--persistent", "--read-only", "--export-name", "vm", "--format", "qcow2", "--socket"])
            .arg(&socket)
            .arg(&ro)
            .spawn()
            .unwrap();
        wait_for(&socket);
        Server { child: Proc::new(child), uri: format!("nbd+unix:///vm?socket={}", socket.display()) }
    };
    let o = common::smpft()
        .args(["standby", "--listen", "127.0.0.1:0", "--disk", &ro_server.uri, "--tiebreak"])
        .arg(&setup.tiebreak)
        .arg("--identity")
        .arg(&setup.b)
        .arg("--peer-cert")
        .arg(setup.a.join("cert.pem"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("is read-only: a standby's disk receives"), "{e}");
    ro_server.stop();

    let bad = |args: &[&str], want: &str| {
        let o = common::smpft().args(args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{args:?}: {e}");
    };
    bad(&["run", "--disk", "nbd://host:notaport/x"], "--disk");
    bad(&["run", "--disk", "/nonexistent/disk.raw"], "cannot open /nonexistent/disk.raw");
    bad(&["run", "--disk", &format!("{},fast", p_img.display())], "'fast' is not a disk option");
    bad(&["run", "--disk", "nbd+unix:///vm?socket=/nonexistent.sock"], "/nonexistent.sock");
    bad(&["run", "--disk", "/dev/null"], "neither a regular file nor a block device");
}
