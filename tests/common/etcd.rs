//! A three-member etcd cluster for the tie-breaker tests (Debian's `etcd-server`), made by the
//! test and removed on drop:
//!
//! ```text
//!   member 0 ns (203.0.113.1) ── eth0 ═══ p0 ─┐
//!   member 1 ns (203.0.113.2) ── eth0 ═══ p1 ─┼─ br0 in the hub ns
//!   member 2 ns (203.0.113.3) ── eth0 ═══ p2 ─┤
//!   hosts ns    (203.0.113.10) ─ eth0 ═══ ph ─┘   (the FT copies and the tests' claimants)
//! ```
//!
//! Each member runs in a namespace of its own, so one can be cut from the others (its eth0
//! dropped by iptables: a process in its namespace still reaches it, as a host on the minority
//! side of a partition does) or killed, by its pid. With `tls`, clients must present a
//! certificate signed by the test's CA (`--client-cert-auth`); the certificates are made with
//! openssl.

use smp_ft::lan::{in_ns, ip};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const HOSTS_IP: &str = "203.0.113.10";

pub struct Member {
    pub ns: String,
    pub addr: String,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

/// The certificates of a TLS cluster.
pub struct Certs {
    pub ca: PathBuf,
    /// A client certificate the cluster's CA signed: (cert, key).
    pub client: (PathBuf, PathBuf),
    /// Another CA, and a client certificate it signed (the cluster does not trust it).
    pub other_ca: PathBuf,
    pub other_client: (PathBuf, PathBuf),
}

pub struct EtcdCluster {
    pub hub: String,
    pub hosts: String,
    pub members: Vec<Member>,
    pub dir: PathBuf,
    pub certs: Option<Certs>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(o.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

/// A CA named `name` (name.pem, name.key) and, signed by it, `name-server` (for the members'
/// addresses) and `name-client`.
fn make_ca(dir: &Path, name: &str) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    let ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"];
    let subj = format!("/CN={name}");
    openssl(
        dir,
        &[&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj], &ca_ext].concat(),
    );
    let sans = "subjectAltName=IP:203.0.113.1,IP:203.0.113.2,IP:203.0.113.3,IP:127.0.0.1";
    for (who, ext) in [
        ("server", format!("{sans}\nextendedKeyUsage=serverAuth,clientAuth\n")),
        ("client", "extendedKeyUsage=clientAuth\n".into()),
    ] {
        let base = format!("{name}-{who}");
        std::fs::write(dir.join(format!("{base}.ext")), ext).unwrap();
        let (csr, k, c, e) =
            (format!("{base}.csr"), format!("{base}.key"), format!("{base}.pem"), format!("{base}.ext"));
        openssl(dir, &[&["req"][..], &ec, &["-keyout", &k, "-out", &csr, "-subj", &format!("/CN={base}")]].concat());
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &pem,
                "-CAkey",
                &key,
                "-CAcreateserial",
                "-out",
                &c,
                "-days",
                "2",
                "-extfile",
                &e,
            ],
        );
    }
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        make_ca(dir, "ca");
        make_ca(dir, "other");
        Certs {
            ca: dir.join("ca.pem"),
            client: (dir.join("ca-client.pem"), dir.join("ca-client.key")),
            other_ca: dir.join("other.pem"),
            other_client: (dir.join("other-client.pem"), dir.join("other-client.key")),
        }
    }
}

impl EtcdCluster {
    /// Three members, started, with a quorum; `tls`: clients need a certificate.
    pub fn start(dir: &Path, tls: bool) -> EtcdCluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}{}", N.fetch_add(1, Ordering::Relaxed), std::process::id() % 100_000);
        let dir = dir.join(format!("etcd{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = tls.then(|| Certs::make(&dir));
        let mut c = EtcdCluster {
            hub: format!("smpft-eh{id}"),
            hosts: format!("smpft-ec{id}"),
            members: (0..3)
                .map(|i| Member {
                    ns: format!("smpft-e{i}m{id}"),
                    addr: format!("203.0.113.{}", i + 1),
                    child: None,
                    args: Vec::new(),
                    log: dir.join(format!("m{i}.log")),
                })
                .collect(),
            dir,
            certs,
        };
        c.build_net().unwrap_or_else(|e| panic!("etcd test network: {e}"));
        for i in 0..3 {
            c.members[i].args = c.member_args(i);
            c.restart(i);
        }
        c.wait_ready();
        c
    }

    fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.hub.clone(), self.hosts.clone()];
        v.extend(self.members.iter().map(|m| m.ns.clone()));
        v
    }

    fn build_net(&self) -> Result<(), String> {
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            ip(&["netns", "add", &ns])?;
            for key in ["all", "default"] {
                let _ = in_ns(&ns, &["sysctl", "-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]);
            }
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"])?;
        }
        ip(&["-n", &self.hub, "link", "add", "name", "br0", "type", "bridge"])?;
        ip(&["-n", &self.hub, "link", "set", "dev", "br0", "up"])?;
        let mut ends: Vec<(String, String, String)> =
            self.members.iter().enumerate().map(|(i, m)| (m.ns.clone(), format!("p{i}"), m.addr.clone())).collect();
        ends.push((self.hosts.clone(), "ph".into(), HOSTS_IP.into()));
        for (ns, port, addr) in ends {
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &self.hub])?;
            ip(&["-n", &self.hub, "link", "set", "dev", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "dev", "eth0", "up"])?;
        }
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.certs.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn member_args(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let cluster: Vec<String> =
            self.members.iter().enumerate().map(|(j, m)| format!("m{j}=http://{}:2380", m.addr)).collect();
        let client = format!("{}://{}:2379", self.scheme(), m.addr);
        let mut a: Vec<String> = [
            "--name",
            &format!("m{i}"),
            "--data-dir",
            &self.dir.join(format!("m{i}.data")).display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &format!("http://{}:2380", m.addr),
            "--initial-advertise-peer-urls",
            &format!("http://{}:2380", m.addr),
            "--initial-cluster",
            &cluster.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "smpft-test",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(c) = &self.certs {
            let d = |f: &str| self.dir.join(f).display().to_string();
            a.extend(["--cert-file".into(), d("ca-server.pem"), "--key-file".into(), d("ca-server.key")]);
            a.extend(["--trusted-ca-file".into(), c.ca.display().to_string(), "--client-cert-auth".into()]);
        }
        a
    }

    /// Starts member `i` (again, from its data, after [`EtcdCluster::kill`]).
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &m.ns, "etcd"])
            .args(&m.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/setup installs it)");
        m.child = Some(child);
    }

    /// SIGKILLs member `i` by its pid (`ip netns exec` became etcd).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Cuts member `i` from everyone outside its namespace; [`EtcdCluster::heal`] undoes it.
    pub fn cut(&self, i: usize) {
        let ns = &self.members[i].ns;
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let o = in_ns(ns, &["iptables", "-A", chain, dir, "eth0", "-j", "DROP"]).unwrap();
            assert!(o.status.success(), "iptables: {}", String::from_utf8_lossy(&o.stderr));
        }
    }

    pub fn heal(&self, i: usize) {
        let o = in_ns(&self.members[i].ns, &["iptables", "-F"]).unwrap();
        assert!(o.status.success(), "iptables: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// `host:port` of the members `which`.
    pub fn endpoints(&self, which: &[usize]) -> String {
        which.iter().map(|&i| format!("{}:2379", self.members[i].addr)).collect::<Vec<_>>().join(",")
    }

    /// A `--tiebreak` naming `key` on the members `which`, with the cluster's CA and the client
    /// certificate if it is a TLS cluster.
    pub fn spec_on(&self, key: &str, which: &[usize]) -> String {
        let mut s = format!("etcd://{}/{key}", self.endpoints(which));
        if let Some(c) = &self.certs {
            s += &format!("?cacert={}&cert={}&key={}", c.ca.display(), c.client.0.display(), c.client.1.display());
        }
        s
    }

    /// [`EtcdCluster::spec_on`] all members.
    pub fn spec(&self, key: &str) -> String {
        self.spec_on(key, &[0, 1, 2])
    }

    /// `smpft ARGS` run in the hosts' namespace, to completion.
    pub fn smpft(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip").args(["netns", "exec", &self.hosts]).arg(super::smpft_bin()).args(args).output().unwrap()
    }

    fn wait_ready(&self) {
        let spec = self.spec("smpft-test/ready");
        let mut last = String::new();
        let ready = super::poll(Duration::from_secs(30), || {
            let o = self.smpft(&["tiebreak", "show", "--timeout", "1s", &spec]);
            last = super::stderr(&o);
            o.status.success()
        });
        assert!(ready, "the etcd cluster never answered: {last}\n{}", self.logs());
    }

    /// The members' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("== {}\n{}", m.log.display(), std::fs::read_to_string(&m.log).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The member that leads now (its index), as the members say (a cluster without TLS).
    pub fn leader(&self) -> Option<usize> {
        let urls: Vec<String> = self.members.iter().map(|m| format!("http://{}:2379", m.addr)).collect();
        let ask = move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                for (i, url) in urls.iter().enumerate() {
                    let Ok(mut c) = etcd_client::Client::connect([url], None).await else { continue };
                    let status = tokio::time::timeout(Duration::from_millis(500), c.status()).await;
                    if let Ok(Ok(s)) = status {
                        if s.header().is_some_and(|h| h.member_id() == s.leader()) {
                            return Some(i);
                        }
                    }
                }
                None
            })
        };
        on_host(&self.hosts, ask).join().unwrap()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
    }
}

/// Runs `f` on a thread of its own inside network namespace `ns` (the tests' claimants: each
/// is on a host of its own).
pub fn on_host<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a descriptor we own, for this thread only (CLONE_NEWNET).
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}
