//! Fault tolerance for domains libvirt runs: the FT settings an operator puts in a domain's
//! `<metadata>`, handed from libvirt's qemu hook to the smpft process libvirt starts.
//!
//! ```xml
//! <metadata>
//!   <smpft:ft xmlns:smpft="urn:smpft:libvirt:1">
//!     <smpft:role>primary</smpft:role>                  <!-- or standby -->
//!     <smpft:peer>host-b:7400</smpft:peer>              <!-- primary: its standby, or spares
//!                                                            A,B,... tried in turn; standby:
//!                                                            spares once it has gone live -->
//!     <smpft:listen>0.0.0.0:7400</smpft:listen>         <!-- standby: where it waits -->
//!     <smpft:tiebreak>/shared/vm1.tiebreak</smpft:tiebreak>
//!     <smpft:identity>/etc/smpft/host-a</smpft:identity>
//!     <smpft:peer-cert>/etc/smpft/host-b.pem</smpft:peer-cert>
//!     <!-- or, with certificates from the site CA: -->
//!     <smpft:ca>/etc/smpft/ca.pem</smpft:ca>
//!     <smpft:peer-name>host-b</smpft:peer-name>
//!     <smpft:metrics>127.0.0.1:9740</smpft:metrics>     <!-- optional: Prometheus endpoint -->
//!     <smpft:on-event>/etc/smpft/page</smpft:on-event>  <!-- optional: run on FT changes -->
//!     <smpft:on-event-timeout>10s</smpft:on-event-timeout>
//!     <smpft:disk-sync>compare</smpft:disk-sync>         <!-- standby: send only the blocks
//!                                                            its disks lack (default: full) -->
//!     <smpft:standby-uri>qemu+ssh://host-b/system</smpft:standby-uri> <!-- primary: where
//!                                                            `smpft libvirt protect` put its standby -->
//!   </smpft:ft>
//! </metadata>
//! ```
//!
//! `smpft libvirt-hook DOMAIN prepare begin -` (the hook, run by libvirtd as root before it
//! starts the emulator) checks them and writes `/run/smpft/DOMAIN.ft` (`key=value` lines); the
//! persona reads that file by the domain's name. `release` removes it. Bad settings make the
//! hook fail, and libvirt then refuses the start with the hook's message.
//!
//! Proxmox VE's hookscript (contrib/proxmox) writes the same file as `/run/smpft/pve-VMID.ft`,
//! found by the VM's `-id`.

use smp_ft::config::{self, FtBuilder, FtOptions, Names, Setting};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use smp_ft::config::metadata::{disk_sync, from_domain_xml, Settings, DISK_SYNC, NAMESPACE};
/// Where the hook leaves each domain's settings for the persona.
pub const DIR: &str = "/run/smpft";

/// A domain's fault tolerance, as its settings describe it, checked.
pub struct DomainFt {
    /// The role is standby (primary otherwise).
    pub standby: bool,
    pub opts: FtOptions,
    /// A primary's standbys, tried in turn; a standby's spares once it has gone live.
    pub peers: Vec<SocketAddr>,
    /// Where a standby waits for its primary.
    pub listen: Option<SocketAddr>,
    /// How a standby's disks are brought in step (`<smpft:disk-sync>`).
    pub disk_sync: smp_ft::ft::disk::DiskSync,
}

impl DomainFt {
    /// The settings on the configuration builders, errors naming their metadata elements.
    pub fn new(s: &Settings) -> Result<DomainFt, config::ConfigError> {
        let mut ft = FtBuilder::new(Names::Libvirt);
        for (key, value) in &s.0 {
            match Setting::from_libvirt(key) {
                None | Some(Setting::Peer | Setting::Listen) => {}
                Some(setting) => ft = ft.parse(setting, value)?,
            }
        }
        let standby = s.get("role") == Some("standby");
        Ok(DomainFt {
            standby,
            opts: ft.build()?,
            peers: s.get("peer").map(|p| config::ft::peers(Names::Libvirt, p)).transpose()?.unwrap_or_default(),
            listen: match s.get("listen") {
                Some(l) if standby => Some(config::ft::listen(Names::Libvirt, l)?),
                _ => None,
            },
            // (Checked with the metadata: `Settings::check`.)
            disk_sync: s.get(DISK_SYNC).and_then(|v| disk_sync(v).ok()).unwrap_or_default(),
        })
    }
}

fn file(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{domain}.ft"))
}

/// The hook: `DOMAIN OPERATION ...` with the domain XML on standard input.
pub fn hook(args: &[String], xml: &str, dir: &Path) -> Result<(), String> {
    let (Some(domain), Some(op)) = (args.first(), args.get(1)) else {
        return Err("usage: smpft libvirt-hook DOMAIN OPERATION SUB-OPERATION EXTRA (XML on stdin)".into());
    };
    if domain.contains('/') || domain.is_empty() {
        return Err(format!("'{domain}' is not a domain name"));
    }
    match op.as_str() {
        "prepare" => match from_domain_xml(xml)? {
            Some(s) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                std::fs::write(file(dir, domain), s.to_text())
                    .map_err(|e| format!("cannot write {}: {e}", file(dir, domain).display()))
            }
            None => {
                let _ = std::fs::remove_file(file(dir, domain));
                Ok(())
            }
        },
        "release" => {
            let _ = std::fs::remove_file(file(dir, domain));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The settings the hook left for `domain`, if any (in `$SMPFT_FT_DIR`, else [`DIR`]).
pub fn for_domain(domain: &str) -> Option<Settings> {
    let dir = std::env::var_os("SMPFT_FT_DIR").map_or_else(|| PathBuf::from(DIR), PathBuf::from);
    std::fs::read_to_string(file(&dir, domain)).ok().map(|t| Settings::from_text(&t))
}

/// What a VM's settings are found by: Proxmox VE's hookscript leaves them as `pve-VMID` (the
/// VM's `-id`), libvirt's hook by the domain's name.
pub fn key(launch: &qemu_shim::argv::Launch, name: &str) -> String {
    launch.id.as_ref().map_or_else(|| name.to_string(), |id| format!("pve-{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm'><name>vm1</name><metadata>
      <smpft:ft xmlns:smpft="urn:smpft:libvirt:1"><smpft:role>primary</smpft:role>
      <smpft:peer>host-b:7400</smpft:peer><smpft:tiebreak>/shared/tb</smpft:tiebreak>
      <smpft:identity>/etc/smpft/a</smpft:identity><smpft:peer-cert>/etc/smpft/b.pem</smpft:peer-cert></smpft:ft>
      <other:x xmlns:other="urn:other"><other:role>ignored</other:role></other:x></metadata></domain>"#;

    #[test]
    fn metadata_is_read_checked_and_handed_over() {
        let s = from_domain_xml(XML).unwrap().unwrap();
        assert_eq!(s.get("role"), Some("primary"));
        assert_eq!(s.get("peer"), Some("host-b:7400"));
        assert_eq!(Settings::from_text(&s.to_text()), s);
        assert_eq!(from_domain_xml("<domain><name>x</name></domain>").unwrap(), None, "no FT: left alone");
        // The operators' elements are taken beside the FT settings.
        let more = "<smpft:metrics>127.0.0.1:9740</smpft:metrics><smpft:on-event>/bin/true</smpft:on-event></smpft:ft>";
        let s2 = from_domain_xml(&XML.replace("</smpft:ft>", more)).unwrap().unwrap();
        assert_eq!((s2.get("metrics"), s2.get("on-event")), (Some("127.0.0.1:9740"), Some("/bin/true")));
        // (The FT settings' files do not exist here: the error, if any, is about them.)
        let e = DomainFt::new(&s2).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!e.contains("metrics") && !e.contains("on-event"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let args = |op: &str| vec!["vm1".to_string(), op.to_string(), "begin".into(), "-".into()];
        hook(&args("prepare"), XML, dir.path()).unwrap();
        assert!(dir.path().join("vm1.ft").exists());
        hook(&args("release"), "", dir.path()).unwrap();
        assert!(!dir.path().join("vm1.ft").exists());
    }

    #[test]
    fn bad_metadata_is_refused_with_its_reason() {
        for (from, to, why) in [
            ("<smpft:role>primary</smpft:role>", "<smpft:role>leader</smpft:role>", "role 'leader'"),
            ("<smpft:peer>host-b:7400</smpft:peer>", "", "lacks <peer>"),
            ("<smpft:tiebreak>/shared/tb</smpft:tiebreak>", "", "lacks <tiebreak>"),
            ("<smpft:peer>", "<smpft:colour>red</smpft:colour><smpft:peer>", "unknown element <colour>"),
            ("</metadata>", "</metadata", "does not parse"),
        ] {
            let e = from_domain_xml(&XML.replace(from, to)).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }
}
