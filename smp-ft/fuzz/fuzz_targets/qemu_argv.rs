//! QEMU's command line as the persona reads it (`qemu_shim::argv::parse`, `-blockdev` JSON and
//! `-readconfig` files included), then the values the persona hands on parsed as it parses them
//! (each disk's storage, each NIC's MAC, the VM generation ID, `-smbios` and `-uuid`). Beyond
//! "a Launch or one error, never a panic":
//! - the same command line gives the same result however its maps are hashed (parsed twice);
//! - `-readconfig FILE` reads as its sections' options written on the command line;
//! - the storage the persona opens for a disk is the file or NBD export the command line named,
//!   read-only exactly when it said so; a disk qemu-storage-daemon opens has each node once;
//! - a MAC and a `-cpu` model print as what they parse from; the SMBIOS tables a guest reads
//!   are well formed (structures end with a double NUL, the OEM string count matches its
//!   strings, no empty string).
//!
//! The input: a flags byte (bit 0: the options follow a libvirt domain line with a disk and a
//! NIC, so they can name its nodes and its devices theirs), then text; with bit 1 the text up
//! to the first NUL is a `-readconfig` file. Options are one per line.
#![no_main]

use block::spec::{DiskSpec, Location};
use libfuzzer_sys::fuzz_target;
use qemu_shim::argv::{self, Launch};
use smp_ft::vmm::net::Mac;
use smp_ft::vmm::smbios::{parse_uuid, Smbios};
use smp_ft::vmm::vmgenid::VmGenId;

const DOMAIN: &str = r#"-name guest=t1,debug-threads=on -S -machine smpft,usb=off,memory-backend=pc.ram -accel kvm -cpu qemu64 -m 128 -object {"qom-type":"memory-backend-ram","id":"pc.ram","size":134217728} -smp 1,sockets=1 -uuid 3da36df6-7d74-4192-8df4-612863a386ae -chardev socket,id=charmonitor,fd=27,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control -kernel /guest.elf -blockdev {"driver":"file","filename":"/img/a.raw","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"} -blockdev {"node-name":"libvirt-2-format","read-only":false,"driver":"raw","file":"libvirt-2-storage"} -device {"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-2-format","id":"virtio-disk0","bootindex":1} -netdev {"type":"tap","fd":"30","id":"hostnet0"} -device {"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:aa:bb:cc","bus":"pci.0","addr":"0x3"} -smbios type=1,product=OpenStack,,Compute"#;

fn config_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("smpft-fuzz-readconfig-{}.cfg", std::process::id()))
}

fn parse(args: &[String]) -> Result<Launch, argv::ArgvError> {
    let launch = argv::parse(args);
    assert_eq!(launch, argv::parse(args), "the same command line parsed twice");
    launch
}

/// The launch without the lines that name the `-readconfig` file.
fn without_file(mut l: Launch) -> Launch {
    l.left_out.retain(|w| !w.starts_with("-readconfig "));
    l
}

/// `-readconfig FILE` against its options inline, both at the start of `rest`.
fn readconfig(base: &[String], text: &str, rest: &[String]) {
    let path = config_file();
    std::fs::write(&path, text).expect("write the configuration file");
    let with: Vec<String> = base.iter().cloned().chain(["-readconfig".into(), path.display().to_string()]).collect();
    let with = parse(&[with, rest.to_vec()].concat());
    match qemu_shim::readconfig::read(&path, &mut Vec::new()) {
        Err(_) => assert!(with.is_err(), "a configuration file that does not read was accepted"),
        Ok(options) => {
            let inline: Vec<String> = options.into_iter().flat_map(|(o, v)| [o, v]).collect();
            let inline = parse(&[base.to_vec(), inline, rest.to_vec()].concat());
            assert_eq!(with.map(without_file), inline.map(without_file), "-readconfig differs from its options inline");
        }
    }
}

/// The persona's reading of what the launch names (see `persona::domain::config`).
fn values(l: &Launch) {
    for d in l.disks.iter().filter(|d| d.graph.is_none()) {
        let Ok(spec) = DiskSpec::of_storage(&d.source, d.readonly) else { continue };
        assert_eq!(spec.readonly, d.readonly, "disk {}: {:?} read-only", d.id, d.source);
        match &spec.location {
            Location::Path(p) => assert_eq!(p.to_str(), Some(d.source.as_str()), "disk {}", d.id),
            _ => assert_eq!(DiskSpec { readonly: false, ..spec.clone() }.to_string(), d.source, "disk {}", d.id),
        }
    }
    for g in l.disks.iter().filter_map(|d| d.graph.as_ref()) {
        let mut seen = std::collections::HashSet::new();
        assert!(!g.blockdevs.is_empty() && g.blockdevs.iter().all(|b| seen.insert(b)), "a node opened twice: {g:?}");
    }
    if let Some(c) = &l.cpu {
        assert_eq!(cpu_model::CpuSpec::parse(&c.to_string()).as_ref(), Ok(c), "-cpu {c}");
    }
    for n in &l.nics {
        if let Some(Ok(mac)) = n.mac.as_deref().map(str::parse::<Mac>) {
            assert_eq!(mac.to_string().parse::<Mac>(), Ok(mac));
        }
    }
    if let Some(g) = &l.vmgenid {
        let _ = g.parse::<VmGenId>();
    }
    let mut smbios = Smbios::default();
    if l.smbios.iter().all(|s| smbios.apply(s).is_ok()) {
        if let (None, Some(uuid)) = (smbios.uuid, &l.uuid) {
            smbios.uuid = parse_uuid(uuid).ok();
        }
        if let Ok((_, _, table)) = smbios.tables() {
            well_formed(&table);
        }
    }
}

/// Walks an SMBIOS structure table as a guest does: each structure's formatted area, then its
/// strings up to a double NUL; type 11 says how many strings it has; type 127 ends it.
fn well_formed(t: &[u8]) {
    let mut at = 0;
    loop {
        assert!(at + 4 <= t.len(), "a structure header past the table's end");
        let (kind, len) = (t[at], usize::from(t[at + 1]));
        assert!(len >= 4 && at + len <= t.len(), "structure type {kind}: formatted length {len}");
        let strings = &t[at + len..];
        let end = strings.windows(2).position(|w| w == [0, 0]).expect("a string set ends with a double NUL");
        let set = &strings[..end];
        let count = if set.is_empty() { 0 } else { set.split(|&b| b == 0).count() };
        if kind == 11 {
            assert_eq!(usize::from(t[at + 4]), count, "OEM strings counted");
        }
        assert!(set.split(|&b| b == 0).all(|s| !s.is_empty()) || set.is_empty(), "an empty string in type {kind}");
        at += len + end + 2;
        if kind == 127 {
            assert_eq!(at, t.len(), "bytes after the end-of-table structure");
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let (config, options) = match flags & 2 {
        0 => (None, text.as_ref()),
        _ => text.split_once('\0').map_or((None, text.as_ref()), |(c, o)| (Some(c), o)),
    };
    // A `-readconfig` the input names could be any file: only the one written here is read.
    let options: Vec<String> =
        options.split('\n').filter(|o| !o.is_empty() && !o.contains("readconfig")).map(String::from).collect();
    let base: Vec<String> = match flags & 1 {
        0 => Vec::new(),
        _ => DOMAIN.split(' ').map(String::from).collect(),
    };
    if let Some(config) = config {
        readconfig(&base, config, &options);
    }
    if let Ok(l) = parse(&[base, options].concat()) {
        values(&l);
    }
});
