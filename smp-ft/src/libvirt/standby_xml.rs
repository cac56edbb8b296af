//! The standby domain's XML, made from the running primary's: the same CPU, memory, devices,
//! MACs, name and UUID, each disk on a new volume of the target's, and the FT metadata of each
//! role. Pure text work (no libvirt), so every case is a unit test.

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};

/// A disk of the primary that the standby needs its own copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The guest's name for it (`vda`), as libvirt's block APIs take it.
    pub target: String,
    /// Its format (`raw`, `qcow2`, ...), as `<driver type=...>` says (raw if it says nothing).
    pub format: String,
    /// Where the primary's copy is (a path, or `protocol:name` for a network disk).
    pub source: String,
    /// A network disk (`type='network'`): not a file the target's pool can hold a copy of.
    pub network: bool,
}

/// A NIC and what it is plugged into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: Option<String>,
    pub plug: Plug,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plug {
    /// A host bridge of this name (`<interface type='bridge'>`).
    Bridge(String),
    /// A libvirt network of this name (`<interface type='network'>`).
    Network(String),
    /// Anything else (`direct`, `user`, `ethernet`, ...): its type.
    Other(String),
}

/// What the standby needs of a domain's XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// The controllers: (type, index, model).
    pub controllers: Vec<Controller>,
}

/// A controller: its type, index and model (libvirt's defaults if absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub kind: String,
    pub index: String,
    pub model: Option<String>,
}

fn attr(e: &BytesStart, name: &str) -> Option<String> {
    e.try_get_attribute(name).ok().flatten().and_then(|a| a.unescape_value().ok()).map(|v| v.into_owned())
}

/// A disk's `device` (libvirt's default is `disk`): only disks get a copy; CD-ROMs and floppies
/// are left as they are (the same image must exist on the target).
fn is_copied_disk(e: &BytesStart) -> bool {
    attr(e, "device").is_none_or(|d| d == "disk")
}

/// Reads what the standby needs: the disks to copy and the NICs to plug in on the target.
pub fn needs(xml: &str) -> Result<Needs, String> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut needs = Needs::default();
    let mut disk: Option<Disk> = None;
    let mut nic: Option<Nic> = None;
    loop {
        let ev = reader.read_event().map_err(|e| format!("the domain's XML does not parse: {e}"))?;
        let (e, empty) = match &ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                match path.pop().as_deref() {
                    Some("disk") => needs.disks.extend(disk.take()),
                    Some("interface") => needs.nics.extend(nic.take()),
                    _ => {}
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
        let parent = path.last().map(String::as_str);
        match (parent, name.as_str()) {
            (Some("devices"), "disk") if is_copied_disk(e) => {
                let network = attr(e, "type").as_deref() == Some("network");
                disk = Some(Disk { target: String::new(), format: "raw".into(), source: String::new(), network });
            }
            (Some("disk"), "driver") => {
                if let (Some(d), Some(t)) = (&mut disk, attr(e, "type")) {
                    d.format = t;
                }
            }
            (Some("disk"), "source") => {
                if let Some(d) = &mut disk {
                    let net = || Some(format!("{}:{}", attr(e, "protocol")?, attr(e, "name").unwrap_or_default()));
                    let pool = || Some(format!("{}/{}", attr(e, "pool")?, attr(e, "volume")?));
                    d.source =
                        attr(e, "file").or_else(|| attr(e, "dev")).or_else(net).or_else(pool).unwrap_or_default();
                }
            }
            (Some("disk"), "target") => {
                if let Some(d) = &mut disk {
                    d.target = attr(e, "dev").unwrap_or_default();
                }
            }
            (Some("devices"), "controller") => needs.controllers.push(Controller {
                kind: attr(e, "type").unwrap_or_default(),
                index: attr(e, "index").unwrap_or_else(|| "0".into()),
                model: attr(e, "model"),
            }),
            (Some("devices"), "interface") => {
                let kind = attr(e, "type").unwrap_or_default();
                nic = Some(Nic { mac: None, plug: Plug::Other(kind) });
            }
            (Some("interface"), "source") => {
                if let Some(n) = &mut nic {
                    if let Plug::Other(kind) = &n.plug {
                        n.plug = match (kind.as_str(), attr(e, "bridge"), attr(e, "network")) {
                            ("bridge", Some(b), _) => Plug::Bridge(b),
                            ("network", _, Some(net)) => Plug::Network(net),
                            _ => n.plug.clone(),
                        };
                    }
                }
            }
            (Some("interface"), "mac") => {
                if let Some(n) = &mut nic {
                    n.mac = attr(e, "address");
                }
            }
            _ => {}
        }
        if empty {
            match name.as_str() {
                "disk" => needs.disks.extend(disk.take()),
                "interface" => needs.nics.extend(nic.take()),
                _ => {}
            }
        } else {
            path.push(name);
        }
    }
    Ok(needs)
}

/// A copied disk's new home on the target: a file, or a block device (a logical pool's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewSource {
    File(String),
    Block(String),
}

impl NewSource {
    /// A volume's path: block devices live under /dev.
    pub fn of_path(path: &str) -> NewSource {
        if path.starts_with("/dev/") {
            NewSource::Block(path.to_string())
        } else {
            NewSource::File(path.to_string())
        }
    }
}

/// The standby's XML: `xml` (the primary's, as libvirt gives it for a migration) with the i-th
/// copied disk on `sources[i]` (its backing chain dropped: the copy is whole), the `running`
/// controllers it lacks put back, and `metadata` (an element of smpft's namespace) in place of
/// any of smpft's in `<metadata>`.
///
/// For a migration libvirt leaves out controllers it would add again by itself on the same
/// machine type (the PCI root of an i440FX machine); it does not know smpft's machine type, so
/// the standby would have no PCI bus.
pub fn standby(xml: &str, sources: &[NewSource], running: &[Controller], metadata: &str) -> Result<String, String> {
    let have = needs(xml)?.controllers;
    let missing: String = running
        .iter()
        .filter(|c| !have.iter().any(|h| h.kind == c.kind && h.index == c.index))
        .map(|c| {
            let model = c.model.as_ref().map(|m| format!(" model='{}'", quick_xml::escape::escape(m.as_str())));
            let (kind, index) =
                (quick_xml::escape::escape(c.kind.as_str()), quick_xml::escape::escape(c.index.as_str()));
            format!("<controller type='{kind}' index='{index}'{}/>", model.unwrap_or_default())
        })
        .collect();
    let bad = |e: &dyn std::fmt::Display| format!("the domain's XML does not parse: {e}");
    let mut reader = Reader::from_str(xml);
    let mut w = Writer::new(Vec::new());
    let mut path: Vec<String> = Vec::new();
    // Inside the i-th copied disk; the depth of a subtree being left out.
    let (mut disk, mut copied, mut skip) = (None::<usize>, 0usize, 0usize);
    let mut metadata_done = false;
    loop {
        let ev = reader.read_event().map_err(|e| bad(&e))?;
        if skip > 0 {
            match ev {
                Event::Start(_) => skip += 1,
                Event::End(_) => skip -= 1,
                Event::Eof => return Err(bad(&"it ends inside an element")),
                _ => {}
            }
            continue;
        }
        let out = match ev {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                let parent = path.last().map(String::as_str);
                let replaced = match (parent, name.as_str(), disk) {
                    (Some("devices"), "disk", _) if is_copied_disk(e) => {
                        let s = sources.get(copied).ok_or("more disks than new volumes")?;
                        disk = Some(copied);
                        copied += 1;
                        let kind = match s {
                            NewSource::File(_) => "file",
                            NewSource::Block(_) => "block",
                        };
                        Some(with_attr(e, "type", kind))
                    }
                    (Some("disk"), "source", Some(i)) => {
                        skip = usize::from(!empty);
                        let s = match &sources[i] {
                            NewSource::File(p) => BytesStart::new("source").with_attributes([("file", p.as_str())]),
                            NewSource::Block(p) => BytesStart::new("source").with_attributes([("dev", p.as_str())]),
                        };
                        w.write_event(Event::Empty(s)).map_err(|e| bad(&e))?;
                        continue;
                    }
                    (Some("disk"), "backingStore", Some(_)) => {
                        skip = usize::from(!empty);
                        continue;
                    }
                    // One of smpft's elements from before: replaced below.
                    (Some("metadata"), _, _) if in_smpft_namespace(e) => {
                        skip = usize::from(!empty);
                        continue;
                    }
                    (Some("domain"), "metadata", _) if empty => {
                        metadata_done = true;
                        w.write_event(Event::Start(BytesStart::new("metadata"))).map_err(|e| bad(&e))?;
                        w.get_mut().extend_from_slice(metadata.as_bytes());
                        w.write_event(Event::End(quick_xml::events::BytesEnd::new("metadata"))).map_err(|e| bad(&e))?;
                        continue;
                    }
                    _ => None,
                };
                if !empty {
                    path.push(name);
                }
                let e = replaced.unwrap_or_else(|| e.clone());
                if empty {
                    Event::Empty(e)
                } else {
                    Event::Start(e)
                }
            }
            Event::End(e) => {
                let name = path.pop().unwrap_or_default();
                match name.as_str() {
                    "disk" => disk = None,
                    "devices" if path.last().map(String::as_str) == Some("domain") => {
                        w.get_mut().extend_from_slice(missing.as_bytes());
                    }
                    "metadata" if path.last().map(String::as_str) == Some("domain") => {
                        metadata_done = true;
                        w.get_mut().extend_from_slice(metadata.as_bytes());
                    }
                    // No <metadata> at all: one before the domain ends.
                    "domain" if !metadata_done => {
                        metadata_done = true;
                        w.get_mut().extend_from_slice(format!("<metadata>{metadata}</metadata>").as_bytes());
                    }
                    _ => {}
                }
                Event::End(e)
            }
            other => other,
        };
        w.write_event(out).map_err(|e| bad(&e))?;
    }
    if copied != sources.len() {
        return Err(format!("the domain has {copied} disks to copy, not {}", sources.len()));
    }
    String::from_utf8(w.into_inner()).map_err(|e| bad(&e))
}

/// `e` with attribute `name` set to `value` (the others as they were).
fn with_attr<'a>(e: &BytesStart<'a>, name: &str, value: &str) -> BytesStart<'static> {
    let mut out = BytesStart::new(String::from_utf8_lossy(e.name().as_ref()).into_owned());
    for a in e.attributes().flatten() {
        if a.key.as_ref() != name.as_bytes() {
            out.push_attribute(a);
        }
    }
    out.push_attribute((name, value));
    out
}

/// Whether an element declares smpft's namespace (its FT settings).
fn in_smpft_namespace(e: &BytesStart) -> bool {
    e.attributes().flatten().any(|a| {
        a.key.as_ref().starts_with(b"xmlns") && a.value.as_ref() == crate::persona::libvirt_ft::NAMESPACE.as_bytes()
    })
}

/// smpft's metadata element with these settings, in order (`role` first), as libvirt stores it
/// (`virDomainSetMetadata` takes it with the namespace's prefix and URI apart).
pub fn ft_element(settings: &[(String, String)]) -> String {
    let mut s = String::from("<ft>");
    for (k, v) in settings {
        s.push_str(&format!("<{k}>{}</{k}>", quick_xml::escape::escape(v.as_str())));
    }
    s.push_str("</ft>");
    s
}

/// As [`ft_element`], with the namespace declared (to stand alone in a domain's XML).
pub fn ft_element_ns(settings: &[(String, String)]) -> String {
    let mut s = format!("<smpft:ft xmlns:smpft='{}'>", crate::persona::libvirt_ft::NAMESPACE);
    for (k, v) in settings {
        s.push_str(&format!("<smpft:{k}>{}</smpft:{k}>", quick_xml::escape::escape(v.as_str())));
    }
    s.push_str("</smpft:ft>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm' id='3'><name>vm1</name><uuid>u</uuid><metadata><x:y xmlns:x='urn:x'/></metadata>\
        <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/a/vm1.qcow2' index='2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/var/lib/a/base.qcow2'/><backingStore/></backingStore>\
        <target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>\
        <disk type='block' device='disk'><source dev='/dev/vg/vm1-data'/><target dev='vdb' bus='virtio'/></disk>\
        <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><model type='virtio'/></interface>\
        <interface type='network'><mac address='52:54:00:00:00:02'/><source network='default' bridge='virbr0'/></interface>\
        <interface type='user'><mac address='52:54:00:00:00:03'/></interface>\
        </devices></domain>";

    #[test]
    fn the_disks_to_copy_and_the_nics_to_plug_in_are_read() {
        let n = needs(XML).unwrap();
        let d = |target: &str, format: &str, source: &str| Disk {
            target: target.into(),
            format: format.into(),
            source: source.into(),
            network: false,
        };
        assert_eq!(n.disks, vec![d("vda", "qcow2", "/var/lib/a/vm1.qcow2"), d("vdb", "raw", "/dev/vg/vm1-data")]);
        let nic = |mac: &str, plug| Nic { mac: Some(mac.into()), plug };
        assert_eq!(
            n.nics,
            vec![
                nic("52:54:00:00:00:01", Plug::Bridge("br0".into())),
                nic("52:54:00:00:00:02", Plug::Network("default".into())),
                nic("52:54:00:00:00:03", Plug::Other("user".into())),
            ]
        );
        let net = "<domain><devices><disk type='network' device='disk'><source protocol='nbd' name='e'/><target dev='vdc'/></disk></devices></domain>";
        assert!(needs(net).unwrap().disks[0].network);
        assert!(needs("<domain><devices>").is_ok_and(|n| n.disks.is_empty()) || needs("<domain><devices>").is_err());
    }

    #[test]
    fn the_standby_has_the_same_devices_on_new_volumes_and_its_own_metadata() {
        let meta = ft_element_ns(&[("role".into(), "standby".into()), ("listen".into(), "0.0.0.0:7400".into())]);
        let sources = [NewSource::of_path("/pool/vm1-vda.qcow2"), NewSource::of_path("/dev/vg2/vm1-vdb")];
        let x = standby(XML, &sources, &[], &meta).unwrap();
        assert!(x.contains("<disk device=\"disk\" type=\"file\"><driver name='qemu' type='qcow2'/><source file=\"/pool/vm1-vda.qcow2\"/><target dev='vda'"), "{x}");
        assert!(x.contains("<disk device=\"disk\" type=\"block\"><source dev=\"/dev/vg2/vm1-vdb\"/>"), "{x}");
        assert!(!x.contains("base.qcow2") && !x.contains("backingStore") && !x.contains("/var/lib/a"), "{x}");
        assert!(x.contains("<target dev='sda' bus='sata'/><readonly/>"), "the CD-ROM is left as it is: {x}");
        for kept in
            ["52:54:00:00:00:01", "<source bridge='br0'/>", "<name>vm1</name><uuid>u</uuid>", "<x:y xmlns:x='urn:x'/>"]
        {
            assert!(x.contains(kept), "{kept}: {x}");
        }
        assert!(x.contains(&format!("{meta}</metadata>")), "{x}");
        // Read back, the FT settings are the standby's.
        let s = crate::persona::libvirt_ft::from_domain_xml(&x);
        assert!(s.as_ref().is_err_and(|e| e.contains("lacks")), "{s:?}");
        // smpft's metadata from before is replaced, and a domain without <metadata> gets one.
        let again = standby(&x, &sources, &[], &ft_element_ns(&[("role".into(), "primary".into())])).unwrap();
        assert!(!again.contains("standby") && again.contains("<smpft:role>primary</smpft:role>"), "{again}");
        let bare = "<domain><name>v</name><devices></devices></domain>";
        assert_eq!(
            standby(bare, &[], &[], "<m/>").unwrap(),
            "<domain><name>v</name><devices></devices><metadata><m/></metadata></domain>"
        );
        assert_eq!(
            standby("<domain><metadata/></domain>", &[], &[], "<m/>").unwrap(),
            "<domain><metadata><m/></metadata></domain>"
        );
        assert!(standby(XML, &sources[..1], &[], &meta).is_err(), "one volume per copied disk");
    }

    #[test]
    fn controllers_libvirt_leaves_out_for_a_migration_are_put_back() {
        let live =
            "<domain><devices><controller type='pci' index='0' model='pci-root'><alias name='pci.0'/></controller>\
            <controller type='usb' index='0' model='none'/></devices></domain>";
        let running = needs(live).unwrap().controllers;
        let migratable = "<domain><devices><controller type='usb' index='0' model='none'/></devices></domain>";
        let x = standby(migratable, &[], &running, "").unwrap();
        assert_eq!(
            x,
            "<domain><devices><controller type='usb' index='0' model='none'/><controller type='pci' index='0' model='pci-root'/></devices><metadata></metadata></domain>"
        );
    }

    #[test]
    fn settings_are_escaped() {
        let e = ft_element(&[("tiebreak".into(), "/a&b<c".into())]);
        assert_eq!(e, "<ft><tiebreak>/a&amp;b&lt;c</tiebreak></ft>");
    }
}
