//! Disk mirroring benchmark: real `smpft run` and `smpft standby` processes over loopback, the
//! standby's storage behind qemu-nbd; prints tables (run: `cargo bench -p smp-ft --bench disk`).
//!
//! 1. Guest writes, unprotected and then protected, back to back in the same run, on a 256 MiB
//!    raw image (the standby's a raw image too): sequential 1 MiB writes (MB/s) and random
//!    4 KiB writes (IOPS), one vCPU writing (the other core carries the mirror: both copies share
//!    this host's two cores), no read-back, no flushes. Figures come from the
//!    guest's own progress reports (one a second) after protection began: throughput, and write
//!    latency p50/p99 (the median of the per-second p50s, the largest per-second p99). Also the
//!    most disk data one checkpoint carried to the standby (its staging peak).
//! 2. The initial copy of a 1 GiB image (full of data) to a qemu-nbd target: smpft's time from
//!    start to protected, next to `qemu-img convert -n` into the same kind of target in the same
//!    run; then `--disk-sync compare` against a standby whose image is already identical.
//!
//! 3. Raw files through io_uring against qcow2 through qemu-storage-daemon (`--disk
//!    PATH,format=qcow2,cache=none`, the standby's disk qcow2 too): random 4 KiB IOPS and
//!    sequential 1 MiB MB/s, unprotected and protected, in one run, with the ratios.
//!
//! `SMPFT_BENCH_QUICK=1` runs short windows and small images (a smoke test);
//! `SMPFT_BENCH_ONLY=writes|sync|formats` runs one of the three parts.

#[path = "common.rs"]
mod common;

use common::{measure, qmp, wait_state, Env, Io, Killed};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

const DISK: u64 = 256 << 20;
const INTERVAL: Duration = Duration::from_millis(20);
const VCPUS: &str = "1";

fn sparse(path: &Path, size: u64) {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// An image full of data (no two 4 KiB blocks alike, nothing sparse).
fn filled(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 4096];
    for b in 0..size / 4096 {
        for (i, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(b * 512 + i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

/// `qemu-nbd` serving a raw image on a unix socket; killed on drop.
fn qemu_nbd(image: &Path) -> (Killed, String) {
    let socket = image.with_extension("sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new("qemu-nbd")
        .args(["--persistent", "--export-name", "vm", "--cache", "writeback", "--format", "raw", "--socket"])
        .arg(&socket)
        .arg(image)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (qemu-utils; scripts/setup installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Killed(child), format!("nbd+unix:///vm?socket={}", socket.display()))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A primary (and its standby, if `standby_disk` is given) with one disk.
struct Pair {
    _standby: Option<Killed>,
    _primary: Killed,
}

fn start(env: &Env, disk: &str, standby_disk: Option<&str>, standby_extra: &[&str], guest: &str) -> Pair {
    let tb = env.dir.join("tiebreak");
    let _ = std::fs::remove_file(&tb);
    let standby = standby_disk.map(|sd| {
        let mut a =
            strings(&["standby", "--listen", "127.0.0.1:7497", "--vcpus", VCPUS, "--memory", "256M", "--disk", sd]);
        a.extend(strings(standby_extra));
        a.extend(env.ft_args(&env.b, &env.a, &tb, INTERVAL));
        let s = env.spawn("s", &a);
        wait_state(&env.path("s", "qmp"), "waiting");
        s
    });
    let mut a = strings(&["run", "--vcpus", VCPUS, "--memory", "256M", "--disk", disk, "--guest-args", guest]);
    if standby.is_some() {
        a.extend(strings(&["--ft-peer", "127.0.0.1:7497"]));
        a.extend(env.ft_args(&env.a, &env.b, &tb, INTERVAL));
    }
    Pair { _standby: standby, _primary: env.spawn("p", &a) }
}

fn io_run(env: &Env, workload: &str, protected: bool) -> (Io, Option<u64>) {
    io_run_on(env, workload, protected, "raw", DISK)
}

/// A disk image of `size` in `format` and the `--disk` spec for it: a raw file (io_uring), or
/// qcow2 through qemu-storage-daemon (O_DIRECT, as a raw file where the file system allows).
fn disk_image(path: &Path, format: &str, size: u64) -> String {
    if format == "raw" {
        sparse(path, size);
        return path.display().to_string();
    }
    let _ = std::fs::remove_file(path);
    let o = Command::new("qemu-img").args(["create", "-q", "-f", format]).arg(path).arg(size.to_string()).output();
    assert!(o.is_ok_and(|o| o.status.success()), "qemu-img create (qemu-utils; scripts/setup installs it)");
    format!("{},format={format},cache=none", path.display())
}

fn io_run_on(env: &Env, workload: &str, protected: bool, format: &str, size: u64) -> (Io, Option<u64>) {
    let (p, s) = (env.dir.join(format!("io-p.{format}")), env.dir.join(format!("io-s.{format}")));
    let (p_spec, s_spec) = (disk_image(&p, format, size), disk_image(&s, format, size));
    // Quick: reports every 250 ms, so the whole table is a smoke test of a few seconds a run.
    let report = if quick() { "250ms" } else { "1s" };
    let guest = format!("disk {workload} disk-check=0 flush-every=0 report={report} duration=600s");
    let pair = start(env, &p_spec, protected.then_some(s_spec.as_str()), &[], &guest);
    if protected {
        wait_state(&env.path("p", "qmp"), "protected");
    }
    let io = measure(&env.path("p", "console"), if quick() { 2 } else { 5 });
    let peak = protected
        .then(|| qmp(&env.path("s", "qmp"), "x-smpft-query-ft")["disk-staged-peak-bytes"].as_u64().unwrap_or(0));
    drop(pair);
    (io, peak)
}

/// Raw files through io_uring against qcow2 through qemu-storage-daemon, unprotected and
/// protected, in one run.
fn formats_table(env: &Env) {
    let size: u64 = if quick() { 32 << 20 } else { DISK };
    println!(
        "\nGuest disk writes, {VCPUS} vCPU, {} MiB image: raw/io_uring against qcow2/qemu-storage-daemon (cache=none), {} each",
        size >> 20,
        if quick() { "0.5 s" } else { "5 s" }
    );
    println!(
        "{:>20} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>15}",
        "workload", "raw", "qcow2", "ratio", "raw prot", "qcow2 prot", "ratio", "p50 µs raw/qcow2"
    );
    let rows = [("random 4 KiB (IOPS)", "disk-io=4K", 1.0), ("seq 1 MiB (MB/s)", "disk-io=1M disk-seq", 1.048576)];
    // Quick: the random row alone (four VMs), a smoke test.
    for (name, workload, scale) in rows.into_iter().take(if quick() { 1 } else { 2 }) {
        let (ru, _) = io_run_on(env, workload, false, "raw", size);
        let (qu, _) = io_run_on(env, workload, false, "qcow2", size);
        let (rp, _) = io_run_on(env, workload, true, "raw", size);
        let (qp, _) = io_run_on(env, workload, true, "qcow2", size);
        println!(
            "{:>20} | {:>9.0} {:>9.0} {:>6.2} | {:>9.0} {:>10.0} {:>6.2} | {:>7} {:>7}",
            name,
            ru.per_s * scale,
            qu.per_s * scale,
            qu.per_s / ru.per_s,
            rp.per_s * scale,
            qp.per_s * scale,
            qp.per_s / rp.per_s,
            ru.p50,
            qu.p50
        );
    }
}

fn writes_table(env: &Env) {
    println!(
        "\nGuest disk writes, {VCPUS} vCPU, 256 MiB raw image (standby: raw image); unprotected then protected, {} each",
        if quick() { "0.5 s" } else { "5 s" }
    );
    println!(
        "{:>20} | {:>11} {:>11} {:>6} | {:>15} {:>15} | {:>9} {:>9} | {:>12}",
        "workload", "unprot", "prot", "ratio", "p50 µs un/prot", "p99 µs un/prot", "+p50 µs", "+p99 µs", "staging MiB"
    );
    for (name, workload, scale) in
        [("seq 1 MiB (MB/s)", "disk-io=1M disk-seq", 1.048576), ("random 4 KiB (IOPS)", "disk-io=4K", 1.0)]
    {
        let (u, _) = io_run(env, workload, false);
        let (p, peak) = io_run(env, workload, true);
        println!(
            "{:>20} | {:>11.0} {:>11.0} {:>6.2} | {:>7} {:>7} | {:>7} {:>7} | {:>9} {:>9} | {:>12.1}",
            name,
            u.per_s * scale,
            p.per_s * scale,
            p.per_s / u.per_s,
            u.p50,
            p.p50,
            u.p99,
            p.p99,
            p.p50 as i64 - u.p50 as i64,
            p.p99 as i64 - u.p99 as i64,
            peak.unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
}

/// Time from starting the pair until the primary reports `protected`.
fn time_to_protect(env: &Env, disk: &Path, target: &str, extra: &[&str]) -> Duration {
    let t0 = Instant::now();
    let pair = start(env, &disk.display().to_string(), Some(target), extra, "service duration=600s");
    wait_state(&env.path("p", "qmp"), "protected");
    let took = t0.elapsed();
    drop(pair);
    took
}

fn sync_table(env: &Env) {
    let size: u64 = if quick() { 128 << 20 } else { 1 << 30 };
    let src: PathBuf = env.dir.join("sync-src.raw");
    filled(&src, size);
    let mib = (size >> 20) as f64;

    // qemu-img convert -n into a qemu-nbd target.
    let t1 = env.dir.join("sync-t1.raw");
    sparse(&t1, size);
    let (server, uri) = qemu_nbd(&t1);
    let t0 = Instant::now();
    let o = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&o.stderr));
    let convert = t0.elapsed();
    drop(server);

    // smpft's initial copy into the same kind of target, then compare against the result.
    let t2 = env.dir.join("sync-t2.raw");
    sparse(&t2, size);
    let (server, uri) = qemu_nbd(&t2);
    let full = time_to_protect(env, &src, &uri, &[]);
    let compare = time_to_protect(env, &src, &uri, &["--disk-sync", "compare"]);
    drop(server);
    let identical =
        Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(&src).arg(&t2).status();
    println!("\nInitial copy of a {mib:.0} MiB image (full of data) to qemu-nbd (raw, unix socket)");
    println!("{:>44} | {:>9} | {:>9}", "", "seconds", "MB/s");
    let row = |what: &str, d: Duration| {
        println!("{:>44} | {:>9.2} | {:>9.0}", what, d.as_secs_f64(), size as f64 / 1e6 / d.as_secs_f64());
    };
    row("qemu-img convert -n", convert);
    row("smpft start to protected (--disk-sync full)", full);
    row("smpft start to protected (compare, identical)", compare);
    println!(
        "full ÷ qemu-img (throughput): {:.2}; the target equals the source afterwards: {}",
        convert.as_secs_f64() / full.as_secs_f64(),
        identical.is_ok_and(|s| s.success())
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("disk");
    let only = std::env::var("SMPFT_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "writes" {
        writes_table(&env);
    }
    if only.is_empty() || only == "sync" {
        sync_table(&env);
    }
    if only.is_empty() || only == "formats" {
        formats_table(&env);
    }
    let _ = std::fs::remove_dir_all(&env.dir);
}
