//! The tie-breaker on a file against the tie-breaker on etcd, side by side on this machine (run:
//! `cargo bench -p smp-ft --bench tiebreak`):
//! - claim latency p50/p99: each claim wins the next generation (a read and a write: for the
//!   file, the lock, a read, an fsynced write and a rename; for etcd, a linearizable read and a
//!   transaction through the Raft quorum), on a file in the temporary directory and on a
//!   three-member etcd cluster on loopback (Debian's etcd-server; heartbeat 50 ms, election
//!   timeout 500 ms), with all members up and with one killed;
//! - SIGKILL failover: real `smpft run` and `smpft standby` processes, the primary killed while
//!   a client runs, to the first reply from the standby, with each tie-breaker.
//!
//! `SMPFT_BENCH_QUICK=1` runs 50 claims and 2 failovers per tie-breaker (a smoke test).

use smp_ft::ft::tiebreak::{self, Outcome, Spec, TieBreak};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;
use common::{pct, wait_state, Env};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Three etcd members on loopback, killed on drop.
struct Etcd {
    dir: std::path::PathBuf,
    members: Vec<Option<Child>>,
    peers: Vec<u16>,
    clients: Vec<u16>,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut etcd = Etcd { dir: dir.to_path_buf(), members: vec![None, None, None], peers, clients };
        for i in 0..3 {
            etcd.restart(i);
        }
        let probe = etcd.open("smpft-bench/ready", "probe:1");
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe.read(Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "the etcd cluster never answered (logs in {})", dir.display());
        }
        etcd
    }

    /// Starts member `i` (again, from its data).
    fn restart(&mut self, i: usize) {
        let cluster: Vec<String> =
            self.peers.iter().enumerate().map(|(i, p)| format!("b{i}=http://127.0.0.1:{p}")).collect();
        let client = format!("http://127.0.0.1:{}", self.clients[i]);
        let peer = format!("http://127.0.0.1:{}", self.peers[i]);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("etcd{i}.log")));
        let child = Command::new("etcd")
            .args(["--name", &format!("b{i}"), "--data-dir"])
            .arg(self.dir.join(format!("etcd{i}.data")))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log.unwrap())
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/setup installs it)");
        self.members[i] = Some(child);
    }

    fn spec(&self, key: &str) -> String {
        let eps: Vec<String> = self.clients.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("etcd://{}/{key}", eps.join(","))
    }

    fn open(&self, key: &str, owner: &str) -> std::sync::Arc<dyn TieBreak> {
        tiebreak::open(&Spec::parse(&self.spec(key)).unwrap(), owner).unwrap()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `n` claims, each of the next generation; their latencies.
fn claims(tb: &dyn TieBreak, n: u64) -> Vec<Duration> {
    let from = tb.read(Duration::from_secs(5)).unwrap().map_or(0, |r| r.generation);
    (from + 1..=from + n)
        .map(|g| {
            let t = Instant::now();
            let won = tb.claim(g, Duration::from_secs(5)).unwrap();
            assert_eq!(won, Outcome::Won { generation: g });
            t.elapsed()
        })
        .collect()
}

fn row(what: &str, mut v: Vec<Duration>) {
    let n = v.len();
    let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
    println!("{what:<28} | {n:>6} | {:>7} | {:>7} | {:>7}", ms(p50), ms(p99), ms(v[n - 1]));
}

fn claim_latency(env: &Env, etcd: &mut Etcd) {
    let n = if quick() { 50 } else { 1000 };
    println!("Tie-breaker claim latency: each claim wins the next generation (read + write)");
    println!("{:<28} | {:>6} | {:>7} | {:>7} | {:>7}", "tie-breaker", "claims", "p50 ms", "p99 ms", "max ms");
    let file = tiebreak::open(&Spec::File(env.dir.join("tiebreak-claims")), "bench:1").unwrap();
    row(&format!("file ({})", env.dir.parent().unwrap_or(&env.dir).display()), claims(file.as_ref(), n));
    let tb = etcd.open("smpft-bench/claims", "bench:1");
    row("etcd, 3 members", claims(tb.as_ref(), n));
    etcd.kill(0);
    // The claimant's first member is gone: its claims go to the next.
    row("etcd, 1 of 3 members killed", claims(tb.as_ref(), n));
    etcd.restart(0);
}

/// One SIGKILL failover with `tiebreak`: the kill to the first reply from the standby.
fn failover_once(env: &Env, tiebreak: &str, t: u64) -> Duration {
    let interval = Duration::from_millis(20);
    let port = free_port();
    let ft = |me: &Path, peer: &Path| {
        let mut a = env.ft_args(me, peer, Path::new(tiebreak), interval);
        a.extend(["--ft-timeout".into(), "150ms".into()]);
        a
    };
    let mut sa: Vec<String> = ["standby", "--listen", &format!("127.0.0.1:{port}"), "--vcpus", "2", "--memory", "128M"]
        .map(String::from)
        .to_vec();
    sa.extend(ft(&env.b, &env.a));
    let _standby = env.spawn("ts", &sa);
    wait_state(&env.path("ts", "qmp"), "waiting");
    let guest = "counter churn service churn-rate=2000 churn-ws=4M duration=600s";
    let peer = format!("127.0.0.1:{port}");
    let mut pa: Vec<String> = ["run", "--vcpus", "2", "--memory", "128M", "--ft-peer", &peer, "--guest-args", guest]
        .map(String::from)
        .to_vec();
    pa.extend(ft(&env.a, &env.b));
    let mut primary = env.spawn("tp", &pa);
    wait_state(&env.path("tp", "qmp"), "protected");
    let (p, s) = (env.path("tp", "serial"), env.path("ts", "serial"));
    common::time_failover(p, s, &mut primary, Duration::from_millis(200 + 37 * t))
}

fn failovers(env: &Env, etcd: &Etcd) {
    let trials = if quick() { 2 } else { 10 };
    println!("\nSIGKILL failover: the primary killed to the first reply from the standby (2 vCPUs, 20 ms epochs)");
    println!("{:<28} | {:>6} | {:>7} | {:>7} | {:>7}", "tie-breaker", "trials", "p50 ms", "p99 ms", "max ms");
    let file: Vec<Duration> = (0..trials)
        .map(|t| failover_once(env, &env.dir.join(format!("tiebreak-f{t}")).display().to_string(), t))
        .collect();
    row("file", file);
    let etcd: Vec<Duration> =
        (0..trials).map(|t| failover_once(env, &etcd.spec(&format!("smpft-bench/failover/vm{t}")), t)).collect();
    row("etcd, 3 members", etcd);
    println!("(detection is the --ft-timeout of 150 ms; then the claim, building the VM and the client's reconnect)");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("tiebreak");
    let mut etcd = Etcd::start(&env.dir);
    claim_latency(&env, &mut etcd);
    failovers(&env, &etcd);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&env.dir);
}
