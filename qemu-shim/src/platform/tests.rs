use super::*;
use crate::argv::parse;

fn args(line: &str) -> Vec<String> {
    line.split(' ').filter(|s| !s.is_empty()).map(String::from).collect()
}

fn refused(line: &str) -> String {
    parse(&args(line)).expect_err(line).to_string()
}

/// What libvirt 9.0 wrote for a domain with virt-install's and Nova's platform elements
/// (`pc` machine, `<clock>` timers, `<pm>` with suspend disabled, a qemu-xhci controller
/// with a tablet, cirrus video with VNC, vmcoreinfo), with smpft's devices around them.
const PC_DOMAIN: &str = r#"-name guest=vm1,debug-threads=on -S -machine pc-i440fx-7.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram -accel kvm -m 256 -object {"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456} -smp 2 -no-user-config -nodefaults -chardev socket,id=charmonitor,fd=27,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc,driftfix=slew -global kvm-pit.lost_tick_policy=delay -no-hpet -no-shutdown -global PIIX4_PM.disable_s3=1 -global PIIX4_PM.disable_s4=1 -boot strict=on -kernel /guest.elf -device {"driver":"qemu-xhci","p2":15,"p3":15,"id":"usb","bus":"pci.0","addr":"0x2"} -chardev pty,id=charserial0 -device {"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0} -device {"driver":"usb-tablet","id":"input0","bus":"usb.0","port":"1"} -audiodev {"id":"audio1","driver":"none"} -vnc 127.0.0.1:0,audiodev=audio1 -k en-us -device {"driver":"cirrus-vga","id":"video0","bus":"pci.0","addr":"0x3"} -device {"driver":"vmcoreinfo"} -msg timestamp=on"#;

#[test]
fn a_pc_domain_starts_with_what_smpft_lacks_left_out_one_line_each() {
    let l = parse(&args(PC_DOMAIN)).unwrap();
    assert!(!l.probe);
    assert_eq!(l.machine.as_deref(), Some("pc-i440fx-7.2 (memory pc.ram)"));
    assert_eq!(l.serial, Some(crate::argv::Serial::Pty));
    let lines = l.left_out.join("\n");
    assert_eq!(l.left_out.len(), 6, "PS/2, USB controller, tablet, VNC, video, vmcoreinfo:\n{lines}");
    for what in
        ["no PS/2", "[usb (qemu-xhci)", "[input0 (usb-tablet)", "VNC server", "[video0 (cirrus-vga)", "vmcoreinfo"]
    {
        assert!(lines.contains(what), "no warning about {what}:\n{lines}");
    }
    let ignored = l.ignored.join("\n");
    for what in [
        "-no-hpet",
        "kvm-pit.lost_tick_policy=delay",
        "PIIX4_PM.disable_s3=1",
        "PIIX4_PM.disable_s4=1",
        "-rtc base=utc,driftfix=slew",
        "usb=off",
        "vmport=off",
        "dump-guest-core=off",
        "-k en-us",
    ] {
        assert!(ignored.contains(what), "{what} is not accepted with its reason:\n{ignored}");
    }
    assert!(
        l.device_ids.iter().all(|(_, d)| d == "isa-serial"),
        "left-out devices are not in the VM: {:?}",
        l.device_ids
    );
}

#[test]
fn every_machine_name_is_smpfts_one_machine() {
    for name in MACHINES {
        let l = parse(&args(&format!("-machine {name},accel=kvm -kernel /g"))).unwrap();
        assert_eq!(l.machine.as_deref(), Some(name));
        let ps2 = l.left_out.iter().any(|w| w.contains("PS/2"));
        assert_eq!(ps2, name != SMPFT_MACHINE, "{name}: PS/2 is a PC's: {:?}", l.left_out);
        let hpet = l.left_out.iter().any(|w| w.contains("no HPET"));
        assert_eq!(hpet, name != SMPFT_MACHINE, "{name}: without -no-hpet a PC has an HPET: {:?}", l.left_out);
    }
    let l = parse(&args("-machine pc,i8042=off -kernel /g -no-hpet")).unwrap();
    assert!(l.left_out.is_empty(), "i8042=off, -no-hpet: nothing to warn about: {:?}", l.left_out);
    let l = parse(&args("-machine pc,hpet=on,i8042=off")).unwrap();
    assert_eq!(l.left_out.len(), 1, "hpet=on: one line: {:?}", l.left_out);
    assert!(parse(&args("-machine none,accel=kvm:tcg")).unwrap().probe);
    assert!(refused("-machine virt").contains("-machine virt: machine type not supported"));
    assert!(refused("-machine pc+vmware1").contains("machine type not supported"));
}

#[test]
fn other_stacks_pc_names_run_as_smpfts_machine_with_one_line() {
    for name in ["pc+pve0", "q35", "q35+pve1", "pc-i440fx-8.1", "pc-q35-8.1+pve0", "pc-i440fx-7.2+pve0"] {
        let l = parse(&args(&format!("-machine type={name},hpet=off -kernel /g"))).unwrap();
        let said = l.left_out.iter().filter(|w| w.contains(&format!("-machine {name}: runs as smpft's one machine")));
        assert_eq!(said.count(), 1, "{name}: {:?}", l.left_out);
        assert!(l.left_out.iter().any(|w| w.contains("PS/2")), "{name}: a PC's PS/2: {:?}", l.left_out);
    }
    let l = parse(&args("-machine pc+pve0 -kernel /g")).unwrap();
    assert!(l.left_out.iter().any(|w| w.contains("no HPET")), "a pc+pve0 has an HPET: {:?}", l.left_out);
    assert!(refused("-machine pc-i440fx-rhel7.4.0").contains("pc-i440fx-7.2, pc, smpft"));
}

#[test]
fn machine_options_are_honoured_accepted_or_refused_with_the_reason() {
    let l = parse(&args("-machine pc,usb=on,mem-merge=off,smm=off,kernel_irqchip=on,hpet=off,graphics=off")).unwrap();
    assert!(l.left_out.iter().any(|w| w.contains("usb=on")), "{:?}", l.left_out);
    assert_eq!(l.ignored.len(), 5, "{:?}", l.ignored);
    for (opt, why) in [
        ("accel=tcg", "only with KVM"),
        ("vmport=on", "VMware I/O port"),
        ("smm=on", "no firmware"),
        ("kernel_irqchip=split", "in-kernel irqchip"),
        ("nvdimm=on", "-machine nvdimm=on: option not supported"),
    ] {
        let e = refused(&format!("-machine pc,{opt}"));
        assert!(e.contains(why) && e.contains("-machine"), "{opt}: {e}");
    }
}

#[test]
fn timers_and_sleep_states_that_would_change_the_guest_are_refused() {
    for (g, why) in [
        ("kvm-pit.lost_tick_policy=discard", "re-injects missed ticks"),
        ("kvm-pit.lost_tick_policy=slew", "only 'delay'"),
        ("PIIX4_PM.disable_s3=0", "no S3 sleep state (write <suspend-to-mem enabled='no'/>)"),
        ("PIIX4_PM.disable_s4=0", "no S4 sleep state (write <suspend-to-disk enabled='no'/>)"),
        ("driver=cfi.pflash01,property=secure,value=on", "-global cfi.pflash01.secure=on: not supported"),
        ("nonsense", "expected DRIVER.PROPERTY=VALUE"),
    ] {
        let e = refused(&format!("-machine pc -global {g}"));
        assert!(e.contains(why), "{g}: {e}");
    }
    let l = parse(&args("-global driver=PIIX4_PM,property=disable_s3,value=1 -global VGA.vgamem_mb=16")).unwrap();
    assert_eq!(l.ignored.len(), 2, "{:?}", l.ignored);
    assert!(refused("-rtc base=utc,driftfix=wobble").contains("-rtc driftfix=wobble: not supported"));
    assert!(refused("-rtc base=utc,clock=wall").contains("-rtc clock=wall"));
    assert!(parse(&args("-rtc base=localtime,clock=host")).is_ok());
}

#[test]
fn displays_are_left_out_with_one_line_each() {
    let l = parse(&args("-spice port=5900,addr=127.0.0.1 -vga std -device VGA,id=video1")).unwrap();
    assert_eq!(l.left_out.len(), 3, "{:?}", l.left_out);
    assert!(l.left_out.iter().all(|w| w.starts_with("no display")), "{:?}", l.left_out);
    assert!(parse(&args("-vga none")).unwrap().left_out.is_empty());
}

#[test]
fn the_probe_lists_the_pc_and_its_knobs() {
    let m = machines(16);
    assert_eq!((m[0]["name"].as_str(), m[0]["alias"].as_str()), (Some(PC_MACHINE), Some(PC_ALIAS)));
    assert_eq!(m[0]["is-default"], true);
    assert_eq!(m[1]["name"], SMPFT_MACHINE);
    let pm = device_properties("PIIX4_PM").unwrap();
    assert_eq!(pm[0]["name"], "disable_s3");
    assert_eq!(pm[1]["name"], "disable_s4");
    assert_eq!(device_properties("kvm-pit").unwrap()[0]["name"], "lost_tick_policy");
    assert_eq!(device_properties("usb-tablet").unwrap(), json!([]));
    assert!(device_properties("virtio-blk-pci").is_none());
}

#[test]
fn display_commands_say_there_is_no_display() {
    assert_eq!(display_answer("query-vnc").unwrap().unwrap()["enabled"], false);
    assert_eq!(display_answer("query-spice").unwrap().unwrap()["enabled"], false);
    for c in DISPLAY_COMMANDS {
        let e = display_answer(c).unwrap().unwrap_err();
        assert!(e.desc.contains("no display") && e.desc.starts_with(c), "{c}: {}", e.desc);
    }
    assert!(display_answer("query-status").is_none());
}

#[test]
fn a_disks_nodes_are_followed_to_its_storage() {
    let line = r#"-blockdev {"driver":"file","filename":"/img/a.raw","node-name":"libvirt-1-storage"} -blockdev {"node-name":"libvirt-1-format","read-only":true,"driver":"raw","file":"libvirt-1-storage"} -device {"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"} -blockdev {"driver":"file","filename":"/img/b.raw","node-name":"libvirt-2-storage"} -device {"driver":"virtio-blk-pci","drive":"libvirt-2-storage","id":"virtio-disk1"}"#;
    let l = parse(&args(line)).unwrap();
    let names: Vec<Vec<(&str, &str)>> =
        l.disk_nodes.iter().map(|c| c.iter().map(|n| (n.name.as_str(), n.driver.as_str())).collect()).collect();
    assert_eq!(
        names,
        vec![vec![("libvirt-1-format", "raw"), ("libvirt-1-storage", "file")], vec![("libvirt-2-storage", "file")]]
    );
    assert!(l.disk_nodes[0][0].readonly && !l.disk_nodes[0][1].readonly);
}
