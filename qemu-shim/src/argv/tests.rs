use super::*;

/// Splits a command line as libvirt wrote it (single spaces; JSON values contain no spaces).
fn args(line: &str) -> Vec<String> {
    line.split(' ').filter(|s| !s.is_empty()).map(String::from).collect()
}

/// The probe and a domain start, verbatim from libvirt 9.0 (the domain's machine renamed to
/// smpft's; the rest as libvirt wrote it for QEMU 7.2, JSON device syntax included).
const PROBE: &str = "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg -qmp unix:/var/lib/libvirt/qemu/qmp-DI77Y3/qmp.monitor,server=on,wait=off -pidfile /var/lib/libvirt/qemu/qmp-DI77Y3/qmp.pid -daemonize";
const DOMAIN: &str = r#"-name guest=t1,debug-threads=on -S -object {"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-t1/master-key.aes"} -machine smpft,usb=off,dump-guest-core=off,memory-backend=pc.ram -accel kvm -cpu qemu64 -m 128 -object {"qom-type":"memory-backend-ram","id":"pc.ram","size":134217728} -overcommit mem-lock=off -smp 1,sockets=1,cores=1,threads=1 -uuid 3da36df6-7d74-4192-8df4-612863a386ae -display none -no-user-config -nodefaults -chardev socket,id=charmonitor,fd=27,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown -no-acpi -boot strict=on -device {"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"} -chardev pty,id=charserial0 -device {"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0} -audiodev {"id":"audio1","driver":"none"} -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny -msg timestamp=on"#;

#[test]
fn libvirts_probe_line_is_a_probe() {
    let l = parse(&args(PROBE)).unwrap();
    assert!(l.probe && l.start_paused && l.daemonize);
    assert_eq!(l.monitors, vec![Monitor::Path("/var/lib/libvirt/qemu/qmp-DI77Y3/qmp.monitor".into())]);
    assert_eq!(l.pidfile, Some("/var/lib/libvirt/qemu/qmp-DI77Y3/qmp.pid".into()));
}

#[test]
fn libvirts_domain_line_becomes_a_launch() {
    let l = parse(&args(DOMAIN)).unwrap();
    assert!(!l.probe);
    assert_eq!(l.name.as_deref(), Some("t1"));
    assert_eq!(l.uuid.as_deref(), Some("3da36df6-7d74-4192-8df4-612863a386ae"));
    assert!(l.start_paused);
    assert_eq!(l.memory_bytes, Some(128 << 20));
    assert_eq!(l.vcpus, Some(1));
    assert_eq!(l.monitors, vec![Monitor::Fd(27)]);
    assert_eq!(l.serial, Some(Serial::Pty));
    assert!(l.ignored.iter().any(|i| i.starts_with("-sandbox")), "{:?}", l.ignored);
    assert_eq!(l.seccomp, Some(confine::Mode::Kill), "-sandbox on is smpft's filters with kill");
    assert!(l.left_out.iter().any(|i| i.contains("[usb (piix3-usb-uhci)")), "{:?}", l.left_out);
}

#[test]
fn sandbox_maps_onto_the_seccomp_mode() {
    let mode = |v: &str| parse(&args(&format!("-m 64 -sandbox {v}"))).map(|l| l.seccomp);
    assert_eq!(mode("off"), Ok(Some(confine::Mode::Off)));
    assert_eq!(mode("on,spawn=deny"), Ok(Some(confine::Mode::Kill)));
    assert_eq!(parse(&args("-m 64")).map(|l| l.seccomp), Ok(None));
    for bad in ["maybe", "on,spawn=sometimes", "spawn=deny"] {
        let e = mode(bad).unwrap_err().to_string();
        assert!(e.contains("-sandbox"), "{bad}: {e}");
    }
}

#[test]
fn disks_and_nics_resolve_through_their_nodes() {
    let line = r#"-m 256 -smp 2 -kernel /guest.elf -initrd /boot/initrd -append counter -blockdev {"driver":"file","filename":"/img/a.raw","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"} -blockdev {"node-name":"libvirt-2-format","read-only":false,"driver":"raw","file":"libvirt-2-storage"} -device {"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-2-format","id":"virtio-disk0","bootindex":1} -blockdev {"driver":"nbd","server":{"type":"unix","path":"/run/n.sock"},"export":"e","node-name":"libvirt-1-storage","read-only":true} -blockdev {"node-name":"libvirt-1-format","read-only":true,"driver":"raw","file":"libvirt-1-storage"} -device {"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk1"} -netdev {"type":"tap","fd":"30","vhost":true,"vhostfd":"31","id":"hostnet0"} -device {"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:aa:bb:cc","bus":"pci.0","addr":"0x3"}"#;
    let l = parse(&args(line)).unwrap();
    assert_eq!(l.kernel, Some("/guest.elf".into()));
    assert_eq!(l.initrd, Some("/boot/initrd".into()));
    assert_eq!(l.append.as_deref(), Some("counter"));
    assert_eq!(
        l.disks,
        vec![
            Disk {
                id: "virtio-disk0".into(),
                node: "libvirt-2-format".into(),
                source: "/img/a.raw".into(),
                readonly: false,
                slot: Some(4),
                graph: None,
            },
            Disk {
                id: "virtio-disk1".into(),
                node: "libvirt-1-format".into(),
                source: "nbd+unix:///e?socket=/run/n.sock".into(),
                readonly: true,
                slot: None,
                graph: None,
            },
        ]
    );
    assert_eq!(
        l.nics,
        vec![Nic { id: "net0".into(), tap: TapSpec::Fd(30), mac: Some("52:54:00:aa:bb:cc".into()), slot: Some(3) }]
    );
}

#[test]
fn what_smpft_cannot_honour_is_refused_by_name() {
    for (line, why) in [
        ("-accel tcg", "only with KVM"),
        ("-machine virt,usb=off", "-machine virt: machine type not supported"),
        ("-machine none,accel=tcg", "only with KVM"),
        ("-device {\"driver\":\"i6300esb\",\"id\":\"watchdog0\"}", "device 'i6300esb' is not supported"),
        ("-drive file=/x,if=virtio", "if=virtio: smpft takes drives with if=none"),
        ("-object {\"qom-type\":\"memory-backend-file\",\"id\":\"m\",\"mem-path\":\"/dev/hugepages\"}", "memory-backend-file"),
        ("-blockdev {\"driver\":\"qcow2\",\"node-name\":\"f\",\"file\":\"s\"} -device {\"driver\":\"virtio-blk-pci\",\"drive\":\"f\",\"id\":\"d\"}", "d: no -blockdev 's'"),
        ("-netdev {\"type\":\"user\",\"id\":\"n\"} -device {\"driver\":\"virtio-net-pci\",\"netdev\":\"n\",\"id\":\"net0\"}", "only tap"),
        ("-frobnicate 1", "option -frobnicate is not supported"),
        ("-m", "needs a value"),
        ("-m lots", "not a size"),
        ("stray", "stray argument"),
        ("-mon chardev=x,mode=readline", "mode=control"),
        ("-chardev socket,id=m,fd=3 -mon chardev=other,mode=control", "no -chardev 'other'"),
        ("-object {\"qom-type\":", "not a JSON object"),
    ] {
        let e = parse(&args(line)).unwrap_err().to_string();
        assert!(e.starts_with("smpft (QEMU persona): ") && e.contains(why), "{line}: {e}");
    }
}

#[test]
fn key_value_options_follow_qemus_rules() {
    let m = props("pc,usb=off,path=/a,,b,x", "type").unwrap();
    assert_eq!(text(&m, "type").as_deref(), Some("pc"));
    assert_eq!(text(&m, "path").as_deref(), Some("/a,b"));
    assert!(flag(&m, "x"));
    assert_eq!(size("128", 1 << 20), Some(128 << 20));
    assert_eq!(size("2G", 1), Some(2 << 30));
    assert_eq!(size("1x", 1), None);
    assert_eq!(size("99999999999999999999", 1), None);
}

/// The line libvirt 9.0 wrote for smpft's own answers (key=value devices, no memory backend).
#[test]
fn libvirts_line_for_smpft_is_understood() {
    let line = r#"-name guest=t1,debug-threads=on -S -object secret,id=masterKey0,format=raw,file=/var/lib/libvirt/qemu/domain-4-t1/master-key.aes -machine smpft,usb=off,dump-guest-core=off -accel kvm -cpu host -m 256 -overcommit mem-lock=off -smp 2,sockets=2,cores=1,threads=1 -uuid 156b2a43-2502-4e84-9359-8185b84f5f9e -display none -no-user-config -nodefaults -chardev socket,id=charmonitor,fd=31,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown -no-acpi -boot strict=on -kernel /bin/true -append console=ttyS0 -blockdev {"driver":"file","filename":"/img/disk0.raw","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"} -blockdev {"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"} -device virtio-blk-pci,bus=pci.0,addr=0x2,drive=libvirt-1-format,id=virtio-disk0,bootindex=1 -netdev tap,fd=32,id=hostnet0 -device virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:a4:ee:9d,bus=pci.0,addr=0x1 -chardev pty,id=charserial0 -device isa-serial,chardev=charserial0,id=serial0,index=0 -audiodev {"id":"audio1","driver":"none"} -msg timestamp=on"#;
    let l = parse(&args(line)).unwrap();
    assert_eq!((l.vcpus, l.memory_bytes), (Some(2), Some(256 << 20)));
    assert_eq!(l.monitors, vec![Monitor::Fd(31)]);
    assert_eq!(l.serial, Some(Serial::Pty));
    let disk0 = Disk {
        id: "virtio-disk0".into(),
        node: "libvirt-1-format".into(),
        source: "/img/disk0.raw".into(),
        readonly: false,
        slot: Some(2),
        graph: None,
    };
    assert_eq!(l.disks, vec![disk0]);
    let net0 = Nic { id: "net0".into(), tap: TapSpec::Fd(32), mac: Some("52:54:00:a4:ee:9d".into()), slot: Some(1) };
    assert_eq!(l.nics, vec![net0]);
    assert_eq!(l.kernel, Some("/bin/true".into()));
    assert!(!l.no_reboot);
    assert!(parse(&args("-no-reboot")).unwrap().no_reboot);
    assert!(l.no_shutdown, "libvirt always passes -no-shutdown");
    assert!(!parse(&args("-m 64")).unwrap().no_shutdown);
}

#[test]
fn a_serial_log_is_a_path_or_a_passed_descriptor() {
    // Nova's console.log: libvirt passes the file as a descriptor in an fd set.
    let f = std::fs::File::open("/dev/null").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let line = format!(
        "-add-fd set=6,fd={fd} -chardev pty,id=charserial0,logfile=/dev/fdset/6,logappend=on -device isa-serial,chardev=charserial0,id=serial0"
    );
    let l = parse(&args(&line)).unwrap();
    assert_eq!(l.serial, Some(Serial::Pty));
    assert_eq!(l.serial_log, Some(SerialLog::Fd(fd)));
    let l = parse(&args("-chardev pty,id=c,logfile=/var/log/c.log -device isa-serial,chardev=c")).unwrap();
    assert_eq!(l.serial_log, Some(SerialLog::File { path: "/var/log/c.log".into(), append: false }));
    assert_eq!(parse(&args("-chardev pty,id=c -device isa-serial,chardev=c")).unwrap().serial_log, None);
    for (line, says) in [
        ("-chardev pty,id=c,logfile=/dev/fdset/9 -device isa-serial,chardev=c", "names no -add-fd set"),
        ("-add-fd set=1,fd=987654", "is not open"),
        ("-add-fd set=1", "needs set=N,fd=M"),
        ("-add-fd fd=3,set=x", "needs set=N,fd=M"),
    ] {
        let e = parse(&args(line)).unwrap_err().to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
    drop(f);
}

#[test]
fn pci_addresses_are_honoured_and_a_clash_is_refused() {
    let blk = r#"-blockdev {"driver":"file","filename":"/a","node-name":"s"} -blockdev {"node-name":"f","driver":"raw","file":"s"}"#;
    let net = r#"-netdev {"type":"tap","fd":"30","id":"h0"}"#;
    let dev = |extra: &str| {
        format!("{blk} {net} -device {{\"driver\":\"virtio-blk-pci\",\"drive\":\"f\",\"id\":\"disk0\"{extra}}}")
    };
    let l = parse(&args(&format!(
        "{} -device virtio-net-pci,netdev=h0,id=n0,bus=pci.0,addr=0x3",
        dev(r#","bus":"pci.0","addr":"0x6""#)
    )))
    .unwrap();
    assert_eq!((l.disks[0].slot, l.nics[0].slot), (Some(6), Some(3)));
    let l = parse(&args(&format!("{} -device virtio-net-pci,netdev=h0,id=n0", dev("")))).unwrap();
    assert_eq!((l.disks[0].slot, l.nics[0].slot), (None, None), "no addr: the next free slot");
    for (extra, says) in [
        (r#","addr":"0x3""#, "disk0 and n0 are both at PCI slot 0x3"),
        (r#","addr":"0x0""#, "is not a PCI slot"),
        (r#","addr":"0x20""#, "is not a PCI slot"),
        (r#","addr":"0x5.0x1""#, "function 0"),
        (r#","bus":"pci.1","addr":"0x5""#, "one PCI bus"),
    ] {
        let line = format!("{} -device virtio-net-pci,netdev=h0,id=n0,addr=0x3", dev(extra));
        let e = parse(&args(&line)).unwrap_err().to_string();
        assert!(e.contains(says), "{extra}: {e}");
    }
}

#[test]
fn a_virtio_rng_takes_the_entropy_sources_libvirt_writes() {
    let l = parse(&args(r#"-object {"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"} -device {"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","bus":"pci.0","addr":"0x5"}"#)).unwrap();
    assert_eq!((l.rng, l.rng_slot), (true, Some(5)));
    let l = parse(&args("-object rng-builtin,id=r -device virtio-rng-pci,rng=r")).unwrap();
    assert_eq!((l.rng, l.rng_slot), (true, None));
    assert!(!parse(&args("-m 64")).unwrap().rng);
    for (line, says) in [
        ("-object rng-random,id=r,filename=/dev/hwrng -device virtio-rng-pci,rng=r", "getrandom"),
        ("-device virtio-rng-pci,rng=nope", "no -object rng-random or rng-builtin 'nope'"),
        ("-object rng-builtin,id=r -device virtio-rng-pci,rng=r -device virtio-rng-pci,rng=r", "only one virtio-rng"),
    ] {
        let e = parse(&args(line)).unwrap_err().to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
}

#[test]
fn a_vmgenid_takes_the_guid_libvirt_and_proxmox_write() {
    let guid = "c773c261-d800-4348-9f5d-167fadd53cf8";
    let json = format!(r#"-device {{"driver":"vmgenid","guid":"{guid}","id":"vmgenid0"}}"#);
    let plain = format!("-device vmgenid,guid={guid}");
    for line in [json.as_str(), plain.as_str()] {
        assert_eq!(parse(&args(line)).unwrap().vmgenid.as_deref(), Some(guid), "{line}");
    }
    let l = parse(&args("-device vmgenid,guid=auto,id=vmgenid0")).unwrap();
    assert_eq!(l.vmgenid.as_deref(), Some("auto"));
    assert!(l.device_ids.contains(&("vmgenid0".into(), "vmgenid".into())), "{:?}", l.device_ids);
    assert_eq!(parse(&args("-device vmgenid")).unwrap().vmgenid.as_deref(), Some("auto"));
    assert_eq!(parse(&args("-m 64")).unwrap().vmgenid, None);
    let e = parse(&args("-device vmgenid,guid=auto -device vmgenid,guid=auto")).unwrap_err().to_string();
    assert!(e.contains("at most one vmgenid"), "{e}");
}

#[test]
fn a_virtio_balloon_as_libvirt_nova_and_proxmox_write_it() {
    let l =
        parse(&args(r#"-device {"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x7"}"#)).unwrap();
    let plain = Balloon { id: "balloon0".into(), slot: Some(7), ..Default::default() };
    assert_eq!(l.balloon, Some(plain));
    assert!(l.device_ids.contains(&("balloon0".into(), "virtio-balloon-pci".into())), "listed in QOM");
    let l = parse(&args("-device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,free-page-reporting=on")).unwrap();
    let b = l.balloon.unwrap();
    assert_eq!((b.slot, b.deflate_on_oom, b.free_page_reporting), (Some(3), false, true));
    let json =
        r#"-device {"driver":"virtio-balloon-pci","id":"balloon0","deflate-on-oom":true,"free-page-reporting":false}"#;
    let b = parse(&args(json)).unwrap().balloon.unwrap();
    assert_eq!((b.slot, b.deflate_on_oom, b.free_page_reporting), (None, true, false));
    assert_eq!(parse(&args("-m 64")).unwrap().balloon, None);
    for (line, says) in [
        ("-device virtio-balloon-pci,id=b,deflate-on-oom=maybe", "deflate-on-oom=maybe: expected on or off"),
        ("-device virtio-balloon-pci,id=b,free-page-hint=on", "free-page-hint is not supported"),
        ("-device virtio-balloon-pci,id=a -device virtio-balloon-pci,id=b", "only one virtio-balloon"),
        ("-device virtio-balloon-pci,id=b,bus=pci.0,addr=0x20", "not a PCI slot"),
        (
            "-device virtio-rng-pci,id=r,addr=0x7 -device virtio-balloon-pci,id=b,addr=0x7",
            "r and b are both at PCI slot 0x7",
        ),
    ] {
        let e = parse(&args(line)).unwrap_err().to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
}

#[test]
fn the_guest_agent_channel_is_a_virtio_serial_port() {
    use super::{Channel, ChannelSocket};
    let json = r#"-chardev socket,id=charchannel0,fd=5,server=on,wait=off -device {"driver":"virtio-serial-pci","id":"virtio-serial0","bus":"pci.0","addr":"0x5"} -device {"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#;
    let l = parse(&args(json)).unwrap();
    let v = l.virtio_serial.unwrap();
    assert_eq!((v.id.as_str(), v.slot), ("virtio-serial0", Some(5)));
    let agent = Channel {
        id: "channel0".into(),
        chardev: "charchannel0".into(),
        nr: Some(1),
        name: "org.qemu.guest_agent.0".into(),
        socket: ChannelSocket::Fd(5),
    };
    assert_eq!(v.ports, vec![agent]);
    let plain = "-chardev socket,id=c,path=/run/a.sock,server=on,wait=off -device virtio-serial-pci,id=vs -device virtserialport,bus=vs.0,chardev=c,id=p,name=x";
    let v = parse(&args(plain)).unwrap().virtio_serial.unwrap();
    assert_eq!((v.slot, v.ports[0].nr, &v.ports[0].socket), (None, None, &ChannelSocket::Path("/run/a.sock".into())));
    for (line, says) in [
        (
            "-chardev socket,id=c,path=/a,server=on -device virtserialport,chardev=c",
            "needs a -device virtio-serial-pci",
        ),
        ("-device virtio-serial-pci,id=vs -device virtserialport,bus=other.0,chardev=c", "bus=other.0"),
        ("-device virtio-serial-pci,id=vs -device virtserialport,bus=vs.0,chardev=nope,id=p", "no -chardev 'nope'"),
        (
            "-chardev pty,id=c -device virtio-serial-pci,id=vs -device virtserialport,chardev=c",
            "'pty' is not supported",
        ),
        ("-chardev socket,id=c,path=/a -device virtio-serial-pci,id=vs -device virtserialport,chardev=c", "server=on"),
        ("-device virtio-serial-pci,id=a -device virtio-serial-pci,id=b", "only one virtio-serial"),
    ] {
        let e = parse(&args(line)).unwrap_err().to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
}

#[test]
fn the_boot_disk_is_the_one_with_the_lowest_bootindex_or_the_first_with_order_c() {
    let disk = |n: u32, boot: &str| {
        format!(
            r#"-blockdev {{"driver":"file","filename":"/img/{n}.raw","node-name":"s{n}"}} -blockdev {{"node-name":"f{n}","driver":"raw","file":"s{n}"}} -device virtio-blk-pci,drive=f{n},id=virtio-disk{n}{boot}"#
        )
    };
    let line = |s: String| parse(&s.split(' ').map(String::from).collect::<Vec<_>>()).unwrap();
    let l = line(format!("-m 256 {} {} {}", disk(0, ""), disk(1, ",bootindex=2"), disk(2, ",bootindex=1")));
    assert_eq!((l.boot_disk, l.boot_order_disk), (Some(2), false));
    let l = line(format!("-m 256 -boot order=c {}", disk(0, "")));
    assert_eq!((l.boot_disk, l.boot_order_disk), (None, true));
    let l = line(format!("-m 256 -boot strict=on {}", disk(0, "")));
    assert_eq!((l.boot_disk, l.boot_order_disk), (None, false));
}

/// A command line as `qm showcmd --pretty` prints it: the program, then one option per line with
/// its value in single quotes where it needs them.
pub(crate) fn qm_words(cmd: &str) -> Vec<String> {
    let (mut words, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in cmd.replace("\\\n", " ").chars() {
        match c {
            '\'' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => (cur, any) = (cur + &c.to_string(), true),
        }
    }
    if any {
        words.push(cur);
    }
    words.remove(0);
    words
}

const PVE: [(&str, &str); 3] = [
    ("pve9-simple1", include_str!("../../../tests/data/proxmox/pve9-simple1.conf.cmd")),
    ("pve9-simple-virtio-blk", include_str!("../../../tests/data/proxmox/pve9-simple-virtio-blk.conf.cmd")),
    ("pve8-simple1-drive", include_str!("../../../tests/data/proxmox/pve8-simple1-drive.conf.cmd")),
];

#[test]
fn proxmoxs_command_lines_are_read_whole() {
    for (name, cmd) in PVE {
        let l = parse(&qm_words(cmd)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(l.id.as_deref(), Some("8006"), "{name}");
        assert!(l.daemonize && !l.probe, "{name}");
        assert_eq!(l.pidfile, Some("/var/run/qemu-server/8006.pid".into()), "{name}");
        assert_eq!((l.vcpus, l.memory_bytes), (Some(3), Some(768 << 20)), "{name}");
        assert_eq!(l.vmgenid.as_deref(), Some("c773c261-d800-4348-9f5d-167fadd53cf8"), "{name}");
        assert!(l.balloon.as_ref().is_some_and(|b| b.free_page_reporting), "{name}");
        assert_eq!(l.disks.len(), 1, "{name}");
        assert_eq!(l.disks[0].source, "/var/lib/vz/images/8006/vm-8006-disk-0.qcow2", "{name}");
        assert_eq!(l.boot_disk, Some(0), "{name}: the disk's bootindex=100 is the lowest");
        let tap = TapSpec::Named {
            ifname: "tap8006i0".into(),
            script: Some("/usr/libexec/qemu-server/pve-bridge".into()),
            downscript: Some("/usr/libexec/qemu-server/pve-bridgedown".into()),
        };
        assert_eq!(
            l.nics,
            vec![Nic { id: "net0".into(), tap, mac: Some("A2:C0:43:77:08:A0".into()), slot: Some(0x12) }]
        );
        for said in
            ["pc+pve0: runs as smpft's one machine", "ide2 (ide-cd)", "VNC server", "tablet (usb-tablet)", "vga (VGA)"]
        {
            assert!(l.left_out.iter().any(|w| w.contains(said)), "{name}: no line for {said}: {:?}", l.left_out);
        }
        assert!(l.ignored.iter().any(|i| i.contains("pci-bridge,id=pci.1")), "{name}: {:?}", l.ignored);
    }
}

#[test]
fn devices_behind_a_bridge_go_on_bus_0_and_a_cdrom_with_a_medium_is_refused() {
    let line = "-kernel /g -device pci-bridge,id=pci.1,chassis_nr=1,bus=pci.0,addr=0x1e -netdev type=tap,id=n,ifname=tap1,script=no -device virtio-net-pci,netdev=n,id=net0,bus=pci.1,addr=0x3";
    let l = parse(&args(line)).unwrap();
    assert_eq!(l.nics[0].slot, None, "a free slot on bus 0");
    assert_eq!(l.nics[0].tap, TapSpec::Named { ifname: "tap1".into(), script: None, downscript: None });
    assert!(l.left_out.iter().any(|w| w.contains("net0: placed on PCI bus 0")), "{:?}", l.left_out);
    for (line, why) in [
        (
            "-drive file=/i.iso,if=none,id=cd,media=cdrom -device ide-cd,bus=ide.1,unit=0,drive=cd,id=ide2",
            "a CD-ROM with a medium",
        ),
        ("-drive if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/pve-edk2-firmware/OVMF_CODE.fd", "UEFI VM"),
        ("-machine pc+pve0,pflash0=fw", "UEFI VM"),
        ("-netdev type=tap,id=n -device virtio-net-pci,netdev=n,id=net0", "fd=N or named with ifname="),
        (
            "-netdev type=tap,id=n,ifname=a-name-far-too-long -device virtio-net-pci,netdev=n,id=net0",
            "not an interface name",
        ),
        ("-device virtio-net-pci,netdev=n,id=net0,bus=pci.7,addr=0x3 -netdev type=tap,id=n,fd=3", "bus=pci.7"),
        ("-readconfig /nonexistent/pve-q35.cfg", "cannot read it"),
    ] {
        let e = parse(&args(line)).expect_err(why).to_string();
        assert!(e.contains(why), "{line}: {e}");
    }
}

/// Proxmox VE's two monitors: its own socket (listened on, no wait) and qmeventd's, which the
/// emulator connects to (`server=off` by default) and reconnects to; `wait=` and `server=` as
/// QEMU reads them.
#[test]
fn monitors_smpft_listens_on_or_connects_to() {
    use std::time::Duration;
    let mons = |s: &str| parse(&args(s)).map(|l| l.monitors);
    let pve = "-chardev socket,id=qmp,path=/var/run/qemu-server/8006.qmp,server=on,wait=off -mon chardev=qmp,mode=control -chardev socket,id=qmp-event,path=/var/run/qmeventd.sock,reconnect-ms=5000 -mon chardev=qmp-event,mode=control";
    assert_eq!(
        mons(pve).unwrap(),
        vec![
            Monitor::Path("/var/run/qemu-server/8006.qmp".into()),
            Monitor::Connect { path: "/var/run/qmeventd.sock".into(), reconnect: Some(Duration::from_millis(5000)) },
        ]
    );
    let one = |chardev: &str| mons(&format!("-chardev {chardev} -mon chardev=m,mode=control")).map(|mut m| m.remove(0));
    assert_eq!(
        one("socket,id=m,path=/q,reconnect=5").unwrap(),
        Monitor::Connect { path: "/q".into(), reconnect: Some(Duration::from_secs(5)) }
    );
    assert_eq!(one("socket,id=m,path=/q,server=off").unwrap(), Monitor::Connect { path: "/q".into(), reconnect: None });
    assert_eq!(
        one("socket,id=m,path=/q,reconnect-ms=0").unwrap(),
        Monitor::Connect { path: "/q".into(), reconnect: None }
    );
    assert_eq!(one("socket,id=m,path=/q,server=on").unwrap(), Monitor::Wait(Box::new(Monitor::Path("/q".into()))));
    assert_eq!(
        one("socket,id=m,path=/q,server=on,wait=on").unwrap(),
        Monitor::Wait(Box::new(Monitor::Path("/q".into())))
    );
    assert_eq!(one("socket,id=m,path=/q,server,nowait").unwrap(), Monitor::Path("/q".into()));
    assert_eq!(one("socket,id=m,fd=7,server=on,wait=off").unwrap(), Monitor::Fd(7));
    for (chardev, why) in [
        ("socket,id=m,path=/q,reconnect-ms=soon", "reconnect-ms=soon is not a number"),
        ("socket,id=m,server=on", "needs path= or fd="),
        ("pty,id=m", "a monitor on 'pty'"),
    ] {
        let e = one(chardev).unwrap_err().to_string();
        assert!(e.contains(why), "{chardev}: {e}");
    }
}
