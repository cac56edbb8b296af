//! A guest network on one machine, made of network namespaces (root and iproute2 needed), for
//! the demo and the system tests and benchmarks:
//!
//! ```text
//!   client ns (192.0.2.1) ── eth0 ═══ pc ─┐
//!                                          ├─ br0 in the switch ns (the guest's L2 segment)
//!   host A ns: tap0 ─ brh ─ uplink ═══ pa ─┤
//!   host B ns: tap0 ─ brh ─ uplink ═══ pb ─┘
//!   host A ns: ft (198.51.100.1) ═══ ft (198.51.100.2) in host B ns   (the FT link, on its own)
//! ```
//!
//! The guest is 192.0.2.2/24 with a fixed MAC on either host. IPv6 is off in every namespace,
//! so the only frames on the segment are the guest's and the client's. Addresses are from the
//! documentation ranges (RFC 5737). Everything is removed on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const CLIENT_IP: &str = "192.0.2.1";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const FT_A: &str = "198.51.100.1";
pub const FT_B: &str = "198.51.100.2";
/// Boot parameters for the built-in guest's network.
pub const GUEST_NET: &str = "net ip=192.0.2.2/24";

/// Runs `ip ARGS`; the error says what failed.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// `cmd` run in namespace `ns`, to completion.
pub fn in_ns(ns: &str, cmd: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(["netns", "exec", ns]).args(cmd).output()
}

pub struct Lan {
    pub switch: String,
    pub a: String,
    pub b: String,
    pub client: String,
}

impl Lan {
    /// Builds the namespaces and links, named after this process (`tag` tells users apart).
    pub fn new(tag: &str) -> Result<Lan, String> {
        let id = std::process::id() % 100_000;
        let n = |s: &str| format!("smpft-{tag}{s}{id}");
        let lan = Lan { switch: n("sw"), a: n("ha"), b: n("hb"), client: n("cl") };
        lan.build().map(|()| lan)
    }

    fn build(&self) -> Result<(), String> {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            ip(&["netns", "add", ns])?;
            for key in ["all", "default"] {
                let _ = in_ns(ns, &["sysctl", "-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]);
            }
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        }
        let sw = self.switch.as_str();
        ip(&["-n", sw, "link", "add", "name", "br0", "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", "dev", "br0", "up"])?;
        for (host, port) in [(&self.a, "pa"), (&self.b, "pb")] {
            ip(&["link", "add", "uplink", "netns", host, "type", "veth", "peer", "name", port, "netns", sw])?;
            ip(&["-n", sw, "link", "set", "dev", port, "master", "br0", "up"])?;
            ip(&["-n", host, "link", "add", "name", "brh", "type", "bridge"])?;
            ip(&["-n", host, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            for dev in ["uplink", "tap0"] {
                ip(&["-n", host, "link", "set", "dev", dev, "master", "brh"])?;
                ip(&["-n", host, "link", "set", "dev", dev, "up"])?;
            }
            ip(&["-n", host, "link", "set", "dev", "brh", "up"])?;
        }
        ip(&["link", "add", "eth0", "netns", &self.client, "type", "veth", "peer", "name", "pc", "netns", sw])?;
        ip(&["-n", sw, "link", "set", "dev", "pc", "master", "br0", "up"])?;
        ip(&["-n", &self.client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", &self.client, "link", "set", "dev", "eth0", "up"])?;
        ip(&["link", "add", "ft", "netns", &self.a, "type", "veth", "peer", "name", "ft", "netns", &self.b])?;
        for (ns, addr) in [(&self.a, FT_A), (&self.b, FT_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "ft"])?;
            ip(&["-n", ns, "link", "set", "dev", "ft", "up"])?;
        }
        Ok(())
    }

    fn all(&self) -> [&String; 4] {
        [&self.switch, &self.a, &self.b, &self.client]
    }

    /// Cuts the FT link only (the guest network stays up on both hosts).
    pub fn cut_ft_link(&self) -> Result<(), String> {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let o = in_ns(&self.a, &["iptables", "-A", chain, dir, "ft", "-j", "DROP"]).map_err(|e| e.to_string())?;
            if !o.status.success() {
                return Err(format!("iptables: {}", String::from_utf8_lossy(&o.stderr).trim()));
            }
        }
        Ok(())
    }

    /// Packets host `port` ("pa" or "pb") sent into the switch so far.
    pub fn sent_by(&self, port: &str) -> u64 {
        in_ns(&self.switch, &["cat", &format!("/sys/class/net/{port}/statistics/rx_packets")])
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Frames carrying the guest's MAC as their source that host `port` ("pa" or "pb") sent
    /// into the switch so far (what the guest sent from that host; none of the host's own).
    pub fn guest_frames_sent_by(&self, port: &str) -> u64 {
        let sw = self.switch.as_str();
        let table = ["nft", "list", "chain", "bridge", "smpft", port];
        if in_ns(sw, &table).map_or(true, |o| !o.status.success()) {
            // First use: a chain of its own per port, counting the guest's frames.
            let _ = in_ns(sw, &["nft", "add", "table", "bridge", "smpft"]);
            let hook = "{ type filter hook forward priority 0 ; }";
            let _ = in_ns(sw, &["nft", "add", "chain", "bridge", "smpft", port, hook]);
            let rule = ["nft", "add", "rule", "bridge", "smpft", port, "iifname", port, "ether", "saddr", GUEST_MAC];
            let _ = in_ns(sw, &[&rule[..], &["counter"]].concat());
        }
        let out = in_ns(sw, &table).map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
        out.split("packets ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// A command to run in the client's namespace.
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
            .unwrap_or_else(|_| Err(std::io::Error::other("the connect thread panicked")))
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}
