//! `smpft libvirt protect`: everything is checked before anything is created; what is created
//! is recorded, and undone in reverse order if a later step fails. The VM never stops.

use super::standby_xml::{self, NewSource, Plug};
use super::{msg, open, qmp, query_ft, ProtectArgs, STANDBY_URI};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

/// The standby's port when --standby-addr does not say.
const DEFAULT_PORT: u16 = 7400;
/// How long the primary may take to reach its standby before the command gives up.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

/// Everything the command needs, checked; nothing created yet.
struct Plan {
    dom: Domain,
    dst: Connect,
    to: String,
    pool: StoragePool,
    pool_name: String,
    name: String,
    /// The primary's XML as libvirt gives it for a migration.
    xml: String,
    /// The controllers the primary runs with.
    controllers: Vec<standby_xml::Controller>,
    disks: Vec<(standby_xml::Disk, u64)>,
    /// Where the primary reaches the standby.
    standby_addr: String,
    primary: Vec<(String, String)>,
    standby: Vec<(String, String)>,
}

/// Something created, to be removed if a later step fails.
enum Created {
    Volume { vol: StorageVol, what: String },
    Defined { dom: Domain, what: String },
    Started { dom: Domain, what: String },
    Protecting { dom: Domain },
}

pub(crate) fn protect(a: &ProtectArgs) -> Result<(), String> {
    let started = Instant::now();
    let plan = Plan::make(a)?;
    let mut created = Vec::new();
    match plan.carry_out(&mut created, started) {
        Ok(()) => Ok(()),
        Err(e) => {
            for line in undo(created) {
                println!("undone: {line}");
            }
            Err(format!(
                "protecting {} failed: {e}; what was created for it is removed, and it runs on unprotected",
                plan.name
            ))
        }
    }
}

impl Plan {
    fn make(a: &ProtectArgs) -> Result<Plan, String> {
        let src = open(&a.connect)?;
        let dom = super::domain(&src, &a.connect, &a.domain)?;
        let name = a.domain.clone();
        if !dom.is_active().map_err(|e| msg(&e))? {
            return Err(format!("domain {name} is not running: protect turns fault tolerance on for a running domain"));
        }
        let q = query_ft(&dom).map_err(|e| format!("{e} (is smpft the domain's emulator?)"))?;
        let state = q["state"].as_str().unwrap_or_default();
        if state != "unprotected" && state != "live-after-failover" {
            return Err(format!("domain {name} is {state} already (peer {}): unprotect it first", q["peer"]));
        }
        let flags = sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE;
        let xml = dom.get_xml_desc(flags).map_err(|e| format!("domain {name}: {}", msg(&e)))?;
        let needs = standby_xml::needs(&xml)?;
        let live = dom.get_xml_desc(0).map_err(|e| format!("domain {name}: {}", msg(&e)))?;
        let controllers = standby_xml::needs(&live)?.controllers;
        let mut disks = Vec::new();
        for d in needs.disks {
            if d.network {
                return Err(format!(
                    "disk {} is a network disk ({}): protect copies file and block disks into a pool",
                    d.target, d.source
                ));
            }
            let info = dom.get_block_info(&d.target, 0).map_err(|e| format!("disk {}: {}", d.target, msg(&e)))?;
            disks.push((d, info.capacity));
        }
        let dst = open(&a.to)?;
        if virt::domain::Domain::lookup_by_name(&dst, &name).is_ok() {
            return Err(format!("a domain named {name} exists at {} already", a.to));
        }
        let pool = StoragePool::lookup_by_name(&dst, &a.pool)
            .map_err(|e| format!("no storage pool '{}' at {} (--pool): {}", a.pool, a.to, msg(&e)))?;
        if !pool.is_active().map_err(|e| msg(&e))? {
            return Err(format!("storage pool '{}' at {} is not active (virsh pool-start {})", a.pool, a.to, a.pool));
        }
        for nic in &needs.nics {
            plugged_in(&dst, &a.to, nic)?;
        }
        let (primary, standby, standby_addr) = settings(a, &src, &dst, &dom)?;
        Ok(Plan {
            dom,
            dst,
            to: a.to.clone(),
            pool,
            pool_name: a.pool.clone(),
            name,
            xml,
            controllers,
            disks,
            standby_addr,
            primary,
            standby,
        })
    }

    fn carry_out(&self, created: &mut Vec<Created>, started: Instant) -> Result<(), String> {
        let mut sources = Vec::new();
        for (d, capacity) in &self.disks {
            let vol = self.volume(d, *capacity)?;
            let path = vol.get_path().map_err(|e| msg(&e))?;
            let what = format!("volume {path} in pool {} at {}", self.pool_name, self.to);
            println!("created {what} ({} MiB, {}) for disk {}", capacity >> 20, d.format, d.target);
            sources.push(NewSource::of_path(&path));
            created.push(Created::Volume { vol, what });
        }
        let meta = standby_xml::ft_element_ns(&self.standby);
        let xml = standby_xml::standby(&self.xml, &sources, &self.controllers, &meta)?;
        let what = format!("standby domain {} at {}", self.name, self.to);
        let standby = Domain::define_xml(&self.dst, &xml).map_err(|e| format!("defining the {what}: {}", msg(&e)))?;
        created.push(Created::Defined { dom: standby.clone(), what: what.clone() });
        standby
            .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| format!("starting the {what}: {}", msg(&e)))?;
        created.push(Created::Started { dom: standby, what: what.clone() });
        println!("{what} defined and started paused, waiting for its primary on {}", self.standby_addr);
        let settings: serde_json::Map<String, Value> = self
            .primary
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "role" | "peer" | STANDBY_URI))
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let args = json!({ "peer": self.standby_addr, "settings": settings });
        qmp(&self.dom, "x-smpft-protect", Some(args))?;
        created.push(Created::Protecting { dom: self.dom.clone() });
        let q = wait_protected(&self.dom)?;
        self.keep_pair()?;
        let pause = q["pause-p99-us"].as_u64().map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0));
        println!(
            "{} protected by {what} in {:.1} s (checkpoint pauses p99 {pause}); restarts keep the pair",
            self.name,
            started.elapsed().as_secs_f64(),
        );
        Ok(())
    }

    /// A new volume for `disk`, of its size and format, in the pool (never someone else's).
    fn volume(&self, disk: &standby_xml::Disk, capacity: u64) -> Result<StorageVol, String> {
        let vol_name = format!("{}-{}.{}", self.name, disk.target, disk.format);
        if StorageVol::lookup_by_name(&self.pool, &vol_name).is_ok() {
            return Err(format!(
                "volume {vol_name} exists in pool {} at {} already: remove it, or use another pool",
                self.pool_name, self.to
            ));
        }
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity><allocation unit='bytes'>0</allocation>\
             <target><format type='{}'/></target></volume>",
            quick_xml::escape::escape(vol_name.as_str()),
            quick_xml::escape::escape(disk.format.as_str())
        );
        StorageVol::create_xml(&self.pool, &xml, 0).map_err(|e| {
            format!(
                "creating a {} volume of {capacity} bytes for disk {} in pool {} at {}: {}",
                disk.format,
                disk.target,
                self.pool_name,
                self.to,
                msg(&e)
            )
        })
    }

    /// The primary's metadata names its standby: restarts through libvirt keep the pair.
    fn keep_pair(&self) -> Result<(), String> {
        let persistent = self.dom.is_persistent().unwrap_or(false);
        let flags = sys::VIR_DOMAIN_AFFECT_LIVE | if persistent { sys::VIR_DOMAIN_AFFECT_CONFIG } else { 0 };
        let ns = crate::persona::libvirt_ft::NAMESPACE;
        let element = standby_xml::ft_element(&self.primary);
        self.dom
            .set_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(&element), Some("smpft"), Some(ns), flags)
            .map(drop)
            .map_err(|e| format!("recording the pair in {}'s metadata: {}", self.name, msg(&e)))
    }
}

/// Whether the target has what `nic` plugs into (a bridge or an active network of its name).
fn plugged_in(dst: &Connect, to: &str, nic: &standby_xml::Nic) -> Result<(), String> {
    let mac = nic.mac.as_deref().unwrap_or("(no MAC)");
    match &nic.plug {
        Plug::Bridge(b) => match virt::interface::Interface::lookup_by_name(dst, b) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("NIC {mac} is on bridge {b}, and there is no bridge {b} at {to}: {}", msg(&e))),
        },
        Plug::Network(n) => match virt::network::Network::lookup_by_name(dst, n) {
            Ok(net) if net.is_active().unwrap_or(false) => Ok(()),
            Ok(_) => Err(format!("NIC {mac} is on network {n}, which is not active at {to}")),
            Err(e) => Err(format!("NIC {mac} is on network {n}, and there is no network {n} at {to}: {}", msg(&e))),
        },
        Plug::Other(kind) => Err(format!(
            "NIC {mac} is of type '{kind}': protect plugs the standby's NICs into a bridge or a libvirt network of the same name"
        )),
    }
}

type Settings = Vec<(String, String)>;

/// Both domains' FT settings (role first), and the standby's address.
fn settings(
    a: &ProtectArgs,
    src: &Connect,
    dst: &Connect,
    dom: &Domain,
) -> Result<(Settings, Settings, String), String> {
    let host = |c: &Connect, uri: &str| c.get_hostname().map_err(|e| format!("libvirt at {uri}: {}", msg(&e)));
    let me = a.name.clone().map_or_else(|| host(src, &a.connect), Ok)?;
    let peer = a.standby_name.clone().map_or_else(|| host(dst, &a.to), Ok)?;
    let addr = match &a.standby_addr {
        Some(s) => s.clone(),
        None => format!(
            "{}:{DEFAULT_PORT}",
            uri_host(&a.to).ok_or_else(|| format!("--to {} names no host: give --standby-addr HOST:PORT", a.to))?
        ),
    };
    let port = addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let port = port.ok_or_else(|| format!("--standby-addr {addr}: not HOST:PORT"))?;
    let uuid = dom.get_uuid_string().map_err(|e| msg(&e))?;
    let tiebreak = a.tiebreak_dir.join(format!("{uuid}.tiebreak")).display().to_string();
    let standby_id = a.standby_identity.clone().unwrap_or_else(|| a.identity.clone());
    let side = |role: &str, id: &std::path::Path, peer_name: &str| -> Settings {
        let mut s = vec![
            ("role".to_string(), role.to_string()),
            ("identity".into(), id.display().to_string()),
            ("ca".into(), id.join(transport::identity::CA_FILE).display().to_string()),
            ("peer-name".into(), peer_name.to_string()),
            ("tiebreak".into(), tiebreak.clone()),
        ];
        s.extend(a.settings.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())));
        s
    };
    for kv in &a.settings {
        let key = kv.split_once('=').map(|(k, _)| k).ok_or_else(|| format!("--set {kv}: not KEY=VALUE"))?;
        smp_ft::config::Setting::from_libvirt(key)
            .ok_or_else(|| format!("--set {kv}: '{key}' is not an FT setting"))?;
    }
    let mut primary = side("primary", &a.identity, &peer);
    primary.insert(1, ("peer".into(), addr.clone()));
    primary.push((STANDBY_URI.into(), a.to.clone()));
    let mut standby = side("standby", &standby_id, &me);
    standby.insert(1, ("listen".into(), format!("0.0.0.0:{port}")));
    // Its volumes are new and sparse: it hashes them, and only the blocks that differ (those
    // the primary's guest wrote) are sent, not every zero of the disk.
    standby.push((crate::persona::libvirt_ft::DISK_SYNC.into(), "compare".into()));
    Ok((primary, standby, addr))
}

/// The host a libvirt URI names (`qemu+ssh://root@host-b:22/system` → `host-b`).
fn uri_host(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => host.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// Waits until the primary is protected, showing the initial copy's progress; why not, if it
/// is not.
fn wait_protected(dom: &Domain) -> Result<Value, String> {
    let progress = smp_ft::ft::stats::Progress::new("initial copy");
    let since = Instant::now();
    let (mut synced, mut last) = (false, (0, 0));
    loop {
        let q = query_ft(dom)?;
        match q["state"].as_str().unwrap_or_default() {
            "protected" => {
                progress.finish();
                return Ok(q);
            }
            "syncing" => {
                synced = true;
                let now = (q["sync-round"].as_u64().unwrap_or(0), q["sync-bytes"].as_u64().unwrap_or(0));
                if now != last {
                    progress.update(now.0 as u32, now.1, 0);
                    last = now;
                }
            }
            "unprotected" => {
                // (The primary's own line goes on to say what it tries next: not here.)
                let why = q["last-error"]
                    .as_str()
                    .map(|e| e.split("; the VM runs unprotected").next().unwrap_or(e).to_string());
                match (why, synced) {
                    (Some(why), _) => return Err(why),
                    (None, true) => return Err("the standby was dropped during the initial copy".into()),
                    (None, false) if since.elapsed() > CONNECT_WITHIN => {
                        return Err(format!("the primary did not reach its standby within {CONNECT_WITHIN:?}"))
                    }
                    _ => {}
                }
            }
            other => return Err(format!("the primary is {other} ({})", q["last-error"])),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes what was created, last first; one line for each.
fn undo(created: Vec<Created>) -> Vec<String> {
    let mut lines = Vec::new();
    for c in created.into_iter().rev() {
        lines.push(match c {
            Created::Protecting { dom } => match qmp(&dom, "x-smpft-unprotect", None) {
                Ok(_) => {
                    let off = || query_ft(&dom).is_ok_and(|q| q["state"] == "unprotected");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !off() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    "protection turned off on the primary".to_string()
                }
                Err(e) => format!("turning protection off on the primary failed: {e}"),
            },
            Created::Started { dom, what } => match dom.destroy() {
                Ok(()) => format!("stopped the {what}"),
                Err(e) => format!("stopping the {what} failed: {}", msg(&e)),
            },
            Created::Defined { dom, what } => match dom.undefine() {
                Ok(()) => format!("undefined the {what}"),
                Err(e) => format!("undefining the {what} failed: {}", msg(&e)),
            },
            Created::Volume { vol, what } => match vol.delete(0) {
                Ok(()) => format!("deleted {what}"),
                Err(e) => format!("deleting {what} failed: {}", msg(&e)),
            },
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standby_host_is_the_uris() {
        assert_eq!(uri_host("qemu+ssh://root@host-b:22/system").as_deref(), Some("host-b"));
        assert_eq!(uri_host("qemu+tls://host-b/system?pkipath=/x").as_deref(), Some("host-b"));
        assert_eq!(uri_host("qemu+tcp://[fd00::2]:16509/system").as_deref(), Some("fd00::2"));
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("qemu+unix:///system?socket=/run/b/libvirt-sock"), None);
    }
}
