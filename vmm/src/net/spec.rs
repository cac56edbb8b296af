//! `--net SPEC`: which tap a virtio-net device uses, and its MAC address.
//!
//! ```text
//! tap=vm1-eth0
//! tap=vm1-eth0,mac=52:54:00:12:34:56
//! tap-fd=23,mac=52:54:00:12:34:56     (an open tap handed over, as libvirt does)
//! ```

use std::fmt;
use std::str::FromStr;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered address in QEMU's 52:54:00 range, the rest from the host's
    /// random source (what a VM gets when no `mac=` is given).
    pub fn random() -> Mac {
        let mut b = [0u8; 3];
        // SAFETY: getrandom writes at most 3 bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 3 {
            // No entropy (never on Linux ≥ 3.17): the process id still tells VMs apart.
            b = (std::process::id() & 0xff_ffff).to_be_bytes()[1..].try_into().unwrap_or([0; 3]);
        }
        Mac([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("'{s}' is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        let mac = Mac(m);
        if mac.is_multicast() {
            return Err(format!("'{s}' is a multicast address; a NIC needs a unicast one (even first byte)"));
        }
        if m == [0; 6] {
            return Err(format!("'{s}' is the all-zero address"));
        }
        Ok(mac)
    }
}

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An existing tap interface, attached to by name.
    Name(String),
    /// A tap already open in this process (inherited descriptor).
    Fd(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: TapSource,
    /// `None`: a random one when the VM boots (a restored VM keeps the one it had).
    pub mac: Option<Mac>,
}

impl fmt::Display for NetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tap {
            TapSource::Name(n) => write!(f, "tap={n}")?,
            TapSource::Fd(fd) => write!(f, "tap-fd={fd}")?,
        }
        if let Some(m) = self.mac {
            write!(f, ",mac={m}")?;
        }
        Ok(())
    }
}

/// Longest interface name Linux takes (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

impl FromStr for NetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<NetSpec, String> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("'{part}' in network spec '{s}' is not KEY=VALUE (tap=NAME, tap-fd=N, mac=MAC)")
            })?;
            match key {
                "tap" | "tap-fd" if tap.is_some() => return Err(format!("network spec '{s}' names more than one tap")),
                "tap" => {
                    if value.is_empty() || value.len() > IFNAME_MAX || value.contains(['/', ' ', '\0']) {
                        return Err(format!(
                            "'{value}' is not an interface name (1 to {IFNAME_MAX} characters, no '/')"
                        ));
                    }
                    tap = Some(TapSource::Name(value.to_string()));
                }
                "tap-fd" => {
                    let fd: i32 = value
                        .parse()
                        .ok()
                        .filter(|&fd| fd >= 0)
                        .ok_or_else(|| format!("tap-fd '{value}' is not a file descriptor number"))?;
                    tap = Some(TapSource::Fd(fd));
                }
                "mac" => mac = Some(value.parse()?),
                _ => return Err(format!("unknown network spec option '{key}' (known: tap, tap-fd, mac)")),
            }
        }
        let tap = tap.ok_or_else(|| format!("network spec '{s}' needs tap=NAME or tap-fd=N"))?;
        Ok(NetSpec { tap, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in ["tap=vm1-eth0", "tap=t0,mac=52:54:00:12:34:56", "tap-fd=23,mac=52:54:00:ab:cd:ef"] {
            let n: NetSpec = s.parse().unwrap();
            assert_eq!(n.to_string(), s);
        }
        let n: NetSpec = "mac=52:54:00:00:00:01,tap=x".parse().unwrap();
        assert_eq!(n.tap, TapSource::Name("x".into()));
    }

    #[test]
    fn bad_specs_say_why() {
        for (s, why) in [
            ("", "KEY=VALUE"),
            ("tap=", "interface name"),
            ("tap=a-name-far-too-long", "interface name"),
            ("tap-fd=-1", "file descriptor"),
            ("tap-fd=x", "file descriptor"),
            ("mac=52:54:00:00:00:01", "needs tap"),
            ("tap=a,tap=b", "more than one"),
            ("tap=a,mac=52:54:00:00:00", "not a MAC"),
            ("tap=a,mac=52:54:00:00:00:0g", "not a MAC"),
            ("tap=a,mac=53:54:00:00:00:01", "multicast"),
            ("tap=a,mac=00:00:00:00:00:00", "all-zero"),
            ("tap=a,queues=4", "unknown network spec option"),
        ] {
            let e = s.parse::<NetSpec>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let m = Mac::random();
        assert_eq!(&m.0[..3], &[0x52, 0x54, 0x00]);
        assert!(!m.is_multicast());
    }
}
