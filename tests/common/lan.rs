//! A guest network for the FT tests, made of network namespaces (root and iproute2 needed):
//!
//! ```text
//!   client ns (192.0.2.1) ── eth0 ═══ pc ─┐
//!                                          ├─ br0 in the switch ns (the guest's L2 segment)
//!   host A ns: tap0 ─ brh ─ uplink ═══ pa ─┤
//!   host B ns: tap0 ─ brh ─ uplink ═══ pb ─┘
//!   host A ns: ft (198.51.100.1) ═══ ft (198.51.100.2) in host B ns   (the FT link, cut apart)
//! ```
//!
//! The guest is 192.0.2.2/24 with a fixed MAC on either host. IPv6 is off in every namespace,
//! so the only frames on the segment are the guest's and the client's. Everything is removed
//! on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const CLIENT_IP: &str = "192.0.2.1";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const FT_A: &str = "198.51.100.1";
pub const FT_B: &str = "198.51.100.2";
/// Boot parameters for the guest's network.
pub const GUEST_NET: &str = "net ip=192.0.2.2/24";

pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).stderr(Stdio::piped()).output().expect("iproute2 (ip) must be installed");
    assert!(
        o.status.success(),
        "ip {} failed: {} (the network tests need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

pub fn in_ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().unwrap()
}

pub struct Lan {
    pub switch: String,
    pub a: String,
    pub b: String,
    pub client: String,
}

impl Lan {
    pub fn new() -> Lan {
        let id = std::process::id() % 100_000;
        let n = |s: &str| format!("smpft-{s}{id}");
        let lan = Lan { switch: n("sw"), a: n("ha"), b: n("hb"), client: n("cl") };
        for ns in lan.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            ip(&["netns", "add", ns]);
            let _ = in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            let _ = in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let sw = lan.switch.as_str();
        ip(&["-n", sw, "link", "add", "name", "br0", "type", "bridge"]);
        ip(&["-n", sw, "link", "set", "dev", "br0", "up"]);
        for (host, port) in [(&lan.a, "pa"), (&lan.b, "pb")] {
            ip(&["link", "add", "uplink", "netns", host, "type", "veth", "peer", "name", port, "netns", sw]);
            ip(&["-n", sw, "link", "set", "dev", port, "master", "br0", "up"]);
            ip(&["-n", host, "link", "add", "name", "brh", "type", "bridge"]);
            ip(&["-n", host, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
            for dev in ["uplink", "tap0"] {
                ip(&["-n", host, "link", "set", "dev", dev, "master", "brh"]);
                ip(&["-n", host, "link", "set", "dev", dev, "up"]);
            }
            ip(&["-n", host, "link", "set", "dev", "brh", "up"]);
        }
        ip(&["link", "add", "eth0", "netns", &lan.client, "type", "veth", "peer", "name", "pc", "netns", sw]);
        ip(&["-n", sw, "link", "set", "dev", "pc", "master", "br0", "up"]);
        ip(&["-n", &lan.client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        ip(&["-n", &lan.client, "link", "set", "eth0", "up"]);
        ip(&["link", "add", "ft", "netns", &lan.a, "type", "veth", "peer", "name", "ft", "netns", &lan.b]);
        for (ns, addr) in [(&lan.a, FT_A), (&lan.b, FT_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "ft"]);
            ip(&["-n", ns, "link", "set", "ft", "up"]);
        }
        lan
    }

    fn all(&self) -> [&String; 4] {
        [&self.switch, &self.a, &self.b, &self.client]
    }

    /// Cuts the FT link only (the guest network stays up on both hosts).
    pub fn cut_ft_link(&self) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let o = in_ns(&self.a, &["iptables", "-A", chain, dir, "ft", "-j", "DROP"]);
            assert!(o.status.success(), "iptables: {}", String::from_utf8_lossy(&o.stderr));
        }
    }

    /// Packets host `port` ("pa" or "pb") sent into the switch so far.
    pub fn sent_by(&self, port: &str) -> u64 {
        let o = in_ns(&self.switch, &["cat", &format!("/sys/class/net/{port}/statistics/rx_packets")]);
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(0)
    }

    /// A command run in the client's namespace.
    pub fn client_cmd(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client, cmd]);
        c
    }

    /// A TCP connection from the client's namespace to the guest's `port` (the socket lives in
    /// that namespace; this process uses it from any thread).
    pub fn connect(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.client))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns moves only this short-lived thread into the namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                TcpStream::connect_timeout(&SocketAddr::from((GUEST_IP, port)), timeout)
            })
            .join()
            .expect("connect thread")
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
