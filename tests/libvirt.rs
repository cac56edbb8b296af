//! libvirt manages smpft: a real libvirtd (started here, stopped by its pid) runs smpft through
//! its QEMU persona (a link named qemu-system-x86_64), with the built-in test guest as the
//! domain's kernel. `virsh` does the rest, as an operator would.

mod common;

use common::libvirt::*;
use common::{later, one_at_a_time, wait_for, wait_until};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn virsh_manages_an_smpft_domain_through_its_whole_life() {
    let _one = one_at_a_time();
    let mut lv = Libvirt::start("libvirt-life");
    let caps = ok(&["capabilities"]);
    assert!(caps.contains(&lv.emulator().display().to_string()), "the persona is libvirt's x86_64 emulator:\n{caps}");
    let emu = lv.emulator().display().to_string();
    let dc = ok(&["domcapabilities", "--emulatorbin", &emu, "--arch", "x86_64", "--virttype", "kvm"]);
    assert!(dc.contains("<machine>pc-i440fx-7.2</machine>") && dc.contains("<domain>kvm</domain>"), "{dc}");

    let dom = "lv-life";
    let xml = lv.domain(dom, "counter service duration=600s", "");
    ok(&["define", xml.to_str().unwrap()]);
    let t = Instant::now();
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1", "virsh console reaches the guest's serial line");
    eprintln!("virsh start → the guest answering on its console: {:?}", t.elapsed());
    assert!(ok(&["list"]).contains(dom));
    let info = ok(&["dominfo", dom]);
    assert!(info.contains("running") && info.contains("CPU(s):         2"), "{info}");
    let stats = ok(&["domstats", dom]);
    assert!(stats.contains("vcpu.current=2") && stats.contains("state.state=1"), "{stats}");

    ok(&["suspend", dom]);
    wait_state(dom, "paused");
    let status = ok(&["qemu-monitor-command", dom, r#"{"execute":"query-status"}"#]);
    assert!(status.contains(r#""status":"paused""#), "{status}");
    ok(&["resume", dom]);
    wait_state(dom, "running");
    let ft = ok(&["qemu-monitor-command", dom, r#"{"execute":"x-smpft-query-ft"}"#]);
    assert!(ft.contains(r#""role":"primary""#), "smpft's own commands pass through: {ft}");

    lv.restart_libvirtd();
    wait_state(dom, "running");
    assert_eq!(console_request(dom, "INCR 2"), "OK 2 2", "the domain kept running across the restart");
    // `virsh reset`: system_reset, the guest boots again in the same process.
    let boots = |dom: &str| last_start_log(dom).matches("smpft-guest: ").count();
    ok(&["reset", dom]);
    wait_until(later(|| format!("a second boot\n{}", log(dom))), Duration::from_secs(30), || boots(dom) == 2);
    assert_eq!(console_request(dom, "GET 3"), "VAL 3 0", "the reset guest started over");
    // `virsh reboot` through ACPI: the power button, a clean power-off, then libvirt resets the
    // stopped VM (-no-shutdown) and continues it.
    ok(&["reboot", "--mode", "acpi", dom]);
    wait_until(later(|| format!("a third boot\n{}", log(dom))), Duration::from_secs(30), || boots(dom) == 3);
    wait_state(dom, "running");
    assert_eq!(console_request(dom, "INCR 4"), "OK 4 1", "the rebooted guest serves");
    ok(&["suspend", dom]);
    wait_state(dom, "paused");
    ok(&["resume", dom]);

    ok(&["shutdown", dom]);
    wait_state(dom, "shut off (shutdown)");
    let l = log(dom);
    assert!(l.contains("power button pressed") && l.contains("RESULT: PASS"), "a clean guest shutdown:\n{l}");

    ok(&["start", "--paused", dom]);
    wait_state(dom, "paused");
    ok(&["resume", dom]);
    wait_state(dom, "running");
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1");
    ok(&["destroy", dom]);
    wait_state(dom, "shut off (destroyed)");
    ok(&["undefine", dom]);
}

/// A disk (a raw file and an NBD export) and a NIC on a bridge, through libvirt's XML.
#[test]
fn a_domain_with_disks_and_a_bridged_nic_runs_its_services() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-io");
    let raw = lv.dir.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(32 << 20).unwrap();
    let nbd_file = lv.dir.join("nbd.raw");
    std::fs::File::create(&nbd_file).unwrap().set_len(32 << 20).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "-b", "127.0.0.1", "-p", &port.to_string(), "-x", "e"])
        .arg(&nbd_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd is missing: run scripts/setup");
    let net = Bridge::new();
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='e'><host name='127.0.0.1' port='{port}'/></source><target dev='vdb' bus='virtio'/></disk>\
         <interface type='bridge'><source bridge='{}'/><model type='virtio'/><driver name='qemu'/></interface>",
        raw.display(),
        net.bridge
    );
    let dom = "lv-io";
    let xml = lv.domain(dom, "counter service disk disk-ws=4M net ip=203.0.113.2/24 duration=600s", &devices);
    ok(&["define", xml.to_str().unwrap()]);
    ok(&["start", dom]);
    let never = later(|| format!("the guest's HTTP service never answered\n{}", log(dom)));
    let body = wait_for(never, Duration::from_secs(20), || {
        let o = net.client(&["curl", "-sS", "--max-time", "5", "http://203.0.113.2/incr/1"]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    assert_eq!(body, "OK 1 1");
    let stats = ok(&["domstats", "--block", dom]);
    let field = |k: &str| stats.lines().find_map(|l| l.trim().strip_prefix(k)).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(field("block.count="), Some(2), "{stats}");
    assert!(field("block.0.wr.reqs=").unwrap_or(0) > 0, "the guest's writes are counted:\n{stats}");
    assert!(field("block.0.wr.bytes=").unwrap_or(0) > 0, "{stats}");
    ok(&["shutdown", dom]);
    wait_state(dom, "shut off");
    let l = log(dom);
    assert!(l.contains("RESULT: PASS") && l.contains("disk: writes="), "the guest used both disks and passed:\n{l}");
    ok(&["undefine", dom]);
    let _ = nbd.kill();
    let _ = nbd.wait();
}

#[test]
fn what_smpft_cannot_run_is_refused_with_its_reason() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-bad");
    // A disk that says qcow2 and is not: qemu-storage-daemon refuses it, and smpft quotes it.
    let qcow = lv.dir.join("d.qcow2");
    std::fs::File::create(&qcow).unwrap().set_len(16 << 20).unwrap();
    let cases = [
        ("lv-bad-dev", "<watchdog model='i6300esb'/>".to_string(), "is not supported"),
        (
            "lv-bad-disk",
            format!("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>", qcow.display()),
            "Image is not in qcow2 format",
        ),
    ];
    for (dom, devices, why) in cases {
        let xml = lv.domain(dom, "counter", &devices);
        ok(&["define", xml.to_str().unwrap()]);
        let t = Instant::now();
        let o = virsh(&["start", dom]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("smpft (QEMU persona)") && e.contains(why), "{dom}: {e}");
        assert!(t.elapsed() < Duration::from_secs(20), "{dom}: the refusal took {:?}", t.elapsed());
        ok(&["undefine", dom]);
    }
    let xml = lv.domain("lv-bad-kernel", "counter", "");
    std::fs::write(&xml, std::fs::read_to_string(&xml).unwrap().replace("guest.elf", "missing.elf")).unwrap();
    ok(&["define", xml.to_str().unwrap()]);
    let o = virsh(&["start", "lv-bad-kernel"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing.elf"), "{o:?}");
    ok(&["undefine", "lv-bad-kernel"]);
}

/// The FT pair as two libvirt domains on this host: the standby started paused (and staying
/// paused: `virsh resume` is refused), the primary protected, the primary's process killed
/// with SIGKILL, the standby domain running with nothing lost.
#[test]
fn an_ft_pair_of_libvirt_domains_fails_over() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-ft", true);
    ft_pair(&lv);
    let o = virsh(&["resume", "lv-fts"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("FT standby"), "resuming a standby is refused with the reason: {e}");
    for i in 1..=20 {
        assert_eq!(console_request("lv-ftp", &format!("INCR {i}")), format!("OK {i} {i}"));
    }
    let pid: i32 = std::fs::read_to_string("/run/libvirt/qemu/lv-ftp.pid").unwrap().trim().parse().unwrap();
    let killed = Instant::now();
    // SAFETY: kill sends SIGKILL to the primary domain's process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_state("lv-fts", "running");
    eprintln!("SIGKILL of the primary → the standby domain running: {:?}", killed.elapsed());
    assert!(query_ft("lv-fts").contains("live-after-failover"), "{}", query_ft("lv-fts"));
    assert_eq!(console_request("lv-fts", "INCR 21"), "OK 21 21", "nothing lost: the value goes on from 20");
    wait_state("lv-ftp", "shut off");
    ok(&["destroy", "lv-fts"]);
}

/// `virsh shutdown` of the primary: its guest powers off cleanly and the standby ends with it,
/// both domains shut off (not crashed).
#[test]
fn shutting_down_the_primary_domain_ends_both() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-ftdown", true);
    ft_pair(&lv);
    assert_eq!(console_request("lv-ftp", "INCR 1"), "OK 1 1");
    ok(&["shutdown", "lv-ftp"]);
    wait_state("lv-ftp", "shut off (shutdown)");
    wait_state("lv-fts", "shut off (shutdown)");
    assert!(log("lv-ftp").contains("RESULT: PASS"), "{}", log("lv-ftp"));
}

/// `virsh destroy` of the primary (libvirt's SIGTERM, then SIGKILL if it lingers) is an order
/// too: both domains end, and the standby never goes live.
#[test]
fn destroying_the_primary_domain_ends_both() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-ftdestroy", true);
    ft_pair(&lv);
    assert_eq!(console_request("lv-ftp", "INCR 1"), "OK 1 1");
    ok(&["destroy", "lv-ftp"]);
    wait_state("lv-ftp", "shut off (destroyed)");
    wait_state("lv-fts", "shut off");
    let l = last_start_log("lv-fts");
    assert!(!l.contains("goes live"), "the standby never runs the VM\n{l}");
}

#[test]
fn bad_ft_metadata_stops_the_start_with_the_reason() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-ftbad", true);
    let ft_dir = ft_identities(&lv);
    let peer = "<smpft:peer>127.0.0.1:7400</smpft:peer>";
    for (meta, why) in [
        (ft_meta(&ft_dir, "leader", "a", "b", peer), "role 'leader'"),
        (
            ft_meta(&ft_dir, "primary", "a", "b", "<smpft:peer>no-such-host.invalid:7400</smpft:peer>"),
            "no-such-host.invalid",
        ),
        (ft_meta(&ft_dir, "primary", "a", "nobody", peer), "<smpft:peer-cert>"),
        (ft_meta(&ft_dir, "primary", "missing", "b", peer), "missing"),
    ] {
        let x = lv.domain_with("lv-ftp", "counter", "", &meta);
        ok(&["define", x.to_str().unwrap()]);
        let t = Instant::now();
        let o = virsh(&["start", "lv-ftp"]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(why), "{why}: {e}");
        assert!(t.elapsed() < Duration::from_secs(30), "{why}: the refusal took {:?}", t.elapsed());
        ok(&["undefine", "lv-ftp"]);
    }
}

/// The serial console's `<log>` (Nova's console.log, which `nova console-log` reads): libvirt
/// passes the file as a descriptor (`-add-fd`, `logfile=/dev/fdset/N`), and it receives what
/// the serial port released, once.
#[test]
fn the_serial_consoles_log_file_holds_its_output() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-console-log");
    let dom = "lv-console-log";
    // A run that failed may have left the domain defined.
    let _ = virsh(&["destroy", dom]);
    let _ = virsh(&["undefine", dom]);
    let console_log = lv.dir.join("console.log");
    let xml = lv.domain(dom, "counter service duration=600s", "");
    let text = std::fs::read_to_string(&xml).unwrap();
    let serial = format!("<serial type='pty'><log file='{}' append='off'/></serial>", console_log.display());
    std::fs::write(&xml, text.replace("<serial type='pty'/>", &serial)).unwrap();
    ok(&["define", xml.to_str().unwrap()]);
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1");
    assert_eq!(console_request(dom, "INCR 2"), "OK 2 2");
    let logged = wait_for("the console log to hold both replies", Duration::from_secs(10), || {
        let l = std::fs::read_to_string(&console_log).unwrap_or_default();
        (l.contains("OK 1 1") && l.contains("OK 2 2")).then_some(l)
    });
    assert_eq!(logged.matches("OK 1 1").count(), 1, "each reply is logged once:\n{logged}");
    assert!(log(dom).contains("logfile=/dev/fdset/"), "libvirt passed the log as a descriptor:\n{}", log(dom));
    ok(&["destroy", dom]);
    ok(&["undefine", dom]);
}

/// libvirt's PCI addresses (`<address type='pci' slot=...>`) are where the guest finds the
/// devices; a device without one takes a free slot.
#[test]
fn devices_sit_at_the_pci_slots_the_domain_gives() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-pci");
    let dom = "lv-pci";
    let _ = virsh(&["destroy", dom]);
    let _ = virsh(&["undefine", dom]);
    let (a, b) = (lv.dir.join("a.raw"), lv.dir.join("b.raw"));
    for f in [&a, &b] {
        std::fs::File::create(f).unwrap().set_len(8 << 20).unwrap();
    }
    let disk = |f: &Path, dev: &str, address: &str| {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='{dev}' bus='virtio'/>{address}</disk>",
            f.display()
        )
    };
    let at7 = "<address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>";
    let devices = disk(&a, "vda", at7) + &disk(&b, "vdb", "");
    let xml = lv.domain(dom, "pci counter service duration=600s", &devices);
    ok(&["define", xml.to_str().unwrap()]);
    let dumped = ok(&["dumpxml", dom]);
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1");
    let found: Vec<String> = log(dom).lines().filter_map(|l| l.split("pci 00:").nth(1)).map(String::from).collect();
    assert!(found.iter().any(|f| f.starts_with("07.0 [1af4:1042]")), "vda at slot 7: {found:?}");
    // vdb's slot is the one libvirt chose for it, as virsh dumpxml shows it.
    let vdb = dumped.split("<target dev='vdb'").nth(1).and_then(|r| r.split("slot='0x").nth(1)).unwrap();
    let slot = &vdb[..2];
    assert!(found.iter().any(|f| f.starts_with(&format!("{slot}.0 [1af4:1042]"))), "vdb at slot {slot}: {found:?}");
    ok(&["destroy", dom]);
    ok(&["undefine", dom]);
}

/// The platform elements virt-install and Nova write, unchanged: machine `pc`, no PCI root of
/// its own (libvirt adds it), `<pm>` with suspend disabled, `<clock>` with its timers, a USB
/// controller with a tablet, PS/2 input, video with VNC graphics, vmcoreinfo. The domain starts and runs;
/// each device smpft does not have gets one warning line; `virsh domblkinfo` reads the disk's
/// capacity.
#[test]
fn a_domain_with_the_pc_platform_stacks_write_runs_unchanged() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-pc");
    let raw = lv.dir.join("pc.raw");
    std::fs::File::create(&raw).unwrap().set_len(48 << 20).unwrap();
    let dom = "lv-pc";
    let xml = format!(
        "<domain type='kvm'><name>{dom}</name><memory unit='KiB'>131072</memory><currentMemory unit='KiB'>131072</currentMemory>\
         <vcpu placement='static'>2</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><cmdline>counter service disk disk-ws=4M duration=600s</cmdline></os>\
         <features><acpi/><apic/><vmcoreinfo state='on'/></features><cpu mode='host-passthrough'/>\
         <clock offset='utc'><timer name='pit' tickpolicy='delay'/><timer name='rtc' tickpolicy='catchup'/><timer name='hpet' present='no'/></clock>\
         <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices><emulator>{}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' index='0' model='piix3-uhci'/>\
         <serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>\
         <input type='tablet' bus='usb'/><input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1' keymap='en-us'><listen type='address' address='127.0.0.1'/></graphics>\
         <video><model type='cirrus' vram='16384' heads='1' primary='yes'/></video>\
         <memballoon model='none'/></devices></domain>",
        lv.dir.join("guest.elf").display(),
        lv.emulator().display(),
        raw.display()
    );
    let path = lv.dir.join(format!("{dom}.xml"));
    std::fs::write(&path, xml).unwrap();
    ok(&["define", path.to_str().unwrap()]);
    let defined = ok(&["dumpxml", dom]);
    assert!(defined.contains("machine='pc-i440fx-7.2'"), "libvirt takes 'pc' as smpft's PC:\n{defined}");
    assert!(defined.contains("model='pci-root'"), "libvirt added the PCI root itself:\n{defined}");
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1", "the guest runs");

    let l = last_start_log(dom);
    let warnings = [
        ("no PS/2", 1),
        ("no USB: the USB controller", 1),
        ("no USB tablet", 1),
        ("no display", 2),
        ("no vmcoreinfo", 1),
    ];
    for (what, count) in warnings {
        assert_eq!(l.matches(what).count(), count, "one warning line for '{what}':\n{l}");
    }
    let info = ok(&["domblkinfo", dom, "vda"]);
    let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
    assert_eq!(field("Capacity:").as_deref(), Some("50331648"), "{info}");
    let vnc = ok(&["qemu-monitor-command", dom, r#"{"execute":"query-vnc"}"#]);
    assert!(vnc.contains(r#""enabled":false"#) && vnc.contains("no display"), "{vnc}");
    let pw = r#"{"execute":"set_password","arguments":{"protocol":"vnc","password":"x"}}"#;
    let o = virsh(&["qemu-monitor-command", dom, pw]);
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("no display"), "set_password says there is no display: {said}");

    ok(&["shutdown", dom]);
    wait_state(dom, "shut off");
    assert!(log(dom).contains("RESULT: PASS"), "{}", log(dom));

    // Suspend enabled would promise the guest a sleep state smpft's machine does not have.
    let s3 =
        std::fs::read_to_string(&path).unwrap().replace("suspend-to-mem enabled='no'", "suspend-to-mem enabled='yes'");
    std::fs::write(&path, s3).unwrap();
    ok(&["undefine", dom]);
    ok(&["define", path.to_str().unwrap()]);
    let o = virsh(&["start", dom]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("PIIX4_PM.disable_s3=0") && e.contains("no S3 sleep state"), "{e}");
    ok(&["undefine", dom]);
}

/// virt-install with the usual flags creates and starts a domain: its default CPU (custom
/// kvm64), its virtio-rng on /dev/urandom (the guest reads entropy from it), its PC platform,
/// its guest agent channel (`virsh qemu-agent-command` reaches the test guest's agent). Its
/// balloon answers `virsh dommemstat` and `virsh setmem`.
#[test]
fn virt_install_creates_and_starts_a_domain() {
    let _one = one_at_a_time();
    let found = Command::new("sh").args(["-c", "command -v virt-install"]).output().unwrap();
    assert!(found.status.success(), "virt-install is missing: run scripts/setup (it installs virtinst)");
    let lv = Libvirt::start("libvirt-vi");
    let net = Bridge::new();
    let raw = lv.dir.join("vi.raw");
    std::fs::File::create(&raw).unwrap().set_len(32 << 20).unwrap();
    let dom = "lv-vi";
    let boot = format!(
        "kernel={},cmdline=counter service disk disk-ws=4M rng balloon agent net ip=203.0.113.2/24 duration=600s",
        lv.dir.join("guest.elf").display()
    );
    let o = Command::new("virt-install")
        .args(["--connect", "qemu:///system", "--osinfo", "linux2022", "--name", dom, "--memory", "128"])
        .args(["--vcpus", "2", "--import", "--boot", &boot])
        .arg("--disk")
        .arg(format!("path={}", raw.display()))
        .args(["--network", &format!("bridge={}", net.bridge), "--graphics", "none", "--console", "pty"])
        .args(["--noautoconsole"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "virt-install failed:\n{said}\n{}", log(dom));
    wait_state(dom, "running");
    let xml = ok(&["dumpxml", dom]);
    assert!(xml.contains("<pm>") && xml.contains("name='hpet' present='no'"), "virt-install's defaults:\n{xml}");
    assert!(xml.contains("<model fallback='forbid'>kvm64</model>") || xml.contains(">kvm64</model>"), "{xml}");
    assert!(xml.contains("<rng model='virtio'>"), "{xml}");
    assert!(xml.contains("name='org.qemu.guest_agent.0'"), "the agent's channel: {xml}");
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1", "the guest runs");
    let pong = ok(&["qemu-agent-command", dom, r#"{"execute":"guest-ping"}"#]);
    assert_eq!(pong.trim(), r#"{"return":{}}"#, "{}", log(dom));
    let info = ok(&["qemu-agent-command", dom, r#"{"execute":"guest-info"}"#]);
    assert!(info.contains(r#""name":"guest-sync-delimited""#) && info.contains("smpft-guest"), "{info}");
    let l = last_start_log(dom);
    for what in ["no PS/2", "no USB: the USB controller"] {
        assert_eq!(l.matches(what).count(), 1, "one warning line for '{what}':\n{l}");
    }
    let never = later(|| format!("the guest's HTTP service never answered\n{}", log(dom)));
    let body = wait_for(never, Duration::from_secs(20), || {
        let o = net.client(&["curl", "-sS", "--max-time", "5", "http://203.0.113.2/incr/2"]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    assert_eq!(body, "OK 2 2");
    let info = ok(&["domblkinfo", dom, "vda"]);
    assert!(info.contains("Capacity:       33554432"), "{info}");
    memballoon(dom);
    // `virsh reboot` goes through the agent (guest-shutdown, mode reboot): the guest writes the
    // ACPI reset register and boots again in place; its agent answers again.
    let boots = || last_start_log(dom).matches("smpft-guest: ").count();
    ok(&["reboot", dom]);
    wait_until(later(|| format!("a second boot\n{}", log(dom))), Duration::from_secs(30), || boots() == 2);
    assert_eq!(console_request(dom, "INCR 3"), "OK 3 1", "the rebooted guest started over");
    let pong = wait_for("the agent after the reboot", Duration::from_secs(30), || {
        let o = virsh(&["qemu-agent-command", dom, r#"{"execute":"guest-ping"}"#]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    assert_eq!(pong, r#"{"return":{}}"#);
    ok(&["shutdown", dom]);
    wait_state(dom, "shut off");
    ok(&["undefine", dom]);
}

/// virt-install's `<memballoon model="virtio">`: `virsh dommemstat` shows actual, and the guest's
/// figures once a period is set; `virsh setmem --live` moves actual as the guest follows.
fn memballoon(dom: &str) {
    let stat = |name: &str| {
        let out = ok(&["dommemstat", dom]);
        out.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse::<u64>().ok())
    };
    assert_eq!(stat("actual"), Some(128 << 10), "{}", ok(&["dommemstat", dom]));
    ok(&["dommemstat", dom, "--period", "1", "--live"]);
    let never = later(|| format!("no guest figures in dommemstat: {}", ok(&["dommemstat", dom])));
    let total = wait_for(never, Duration::from_secs(20), || stat("available"));
    assert_eq!(total, 128 << 10, "the guest's total memory, KiB");
    assert!(stat("unused").is_some_and(|free| free > 0 && free < total), "{}", ok(&["dommemstat", dom]));
    ok(&["setmem", dom, "98304", "--live"]);
    let never = later(|| format!("actual never followed setmem: {}", ok(&["dommemstat", dom])));
    wait_until(never, Duration::from_secs(30), || stat("actual") == Some(96 << 10));
    let never = later(|| format!("the guest's figures never followed: {}", ok(&["dommemstat", dom])));
    wait_until(never, Duration::from_secs(30), || stat("available") == Some(96 << 10));
    let info = ok(&["dominfo", dom]);
    assert!(info.contains("Used memory:    98304 KiB"), "{info}");
}

/// `<sysinfo type='smbios'>` (Nova's "OpenStack Compute") reaches the guest's SMBIOS tables,
/// with the domain's UUID as the system UUID.
#[test]
fn the_domains_sysinfo_is_what_the_guest_reads_in_smbios() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-smbios");
    let dom = "lv-smbios";
    let _ = virsh(&["destroy", dom]);
    let _ = virsh(&["undefine", dom]);
    let xml = lv.domain(dom, "smbios counter service duration=600s", "");
    let uuid = "30ad89ac-5906-49ca-8d52-3c6343c598f6";
    let sysinfo = format!(
        "<uuid>{uuid}</uuid><sysinfo type='smbios'><system><entry name='manufacturer'>Red Hat</entry>\
         <entry name='product'>OpenStack Compute</entry><entry name='serial'>S-1</entry>\
         <entry name='family'>Virtual Machine</entry></system></sysinfo><os>"
    );
    let text = std::fs::read_to_string(&xml).unwrap().replacen("<os>", &sysinfo, 1).replacen(
        "hvm</type>",
        "hvm</type><smbios mode='sysinfo'/>",
        1,
    );
    std::fs::write(&xml, text).unwrap();
    ok(&["define", xml.to_str().unwrap()]);
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1");
    let want = format!(
        "smbios: system manufacturer=Red Hat product=OpenStack Compute version= serial=S-1 family=Virtual Machine uuid={uuid}"
    );
    assert!(log(dom).contains(&want), "{}", log(dom));
    ok(&["destroy", dom]);
    ok(&["undefine", dom]);
}

/// Destroys and undefines the domains named, on drop (after a failed assertion too).
struct Domains(&'static [&'static str]);

impl Drop for Domains {
    fn drop(&mut self) {
        for d in self.0 {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
    }
}

/// The guest CPUs stacks write: Nova's default `host-model`, `host-passthrough`, virt-install's
/// `kvm64`, and a named model with features added and removed as Nova writes them. Each domain
/// starts and its guest serves; libvirtd is alive afterwards. A model or feature smpft cannot
/// give is refused with one line naming it.
#[test]
fn every_cpu_mode_starts_and_what_the_host_lacks_is_refused() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-cpu");
    let _cleanup =
        Domains(&["lv-cpu-hm", "lv-cpu-hp", "lv-cpu-kvm64", "lv-cpu-sky", "lv-cpu-bad-model", "lv-cpu-bad-feat"]);
    let libvirtd = lv.started.last().unwrap().1;
    let with_cpu = |dom: &str, cpu: &str| {
        let xml = lv.domain(dom, "counter service duration=600s", "");
        let text = std::fs::read_to_string(&xml).unwrap().replace("<cpu mode='host-passthrough'/>", cpu);
        std::fs::write(&xml, text).unwrap();
        ok(&["define", xml.to_str().unwrap()]);
    };
    let sky = "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>Skylake-Client</model>\
               <feature policy='require' name='hypervisor'/><feature policy='require' name='tsc-deadline'/>\
               <feature policy='disable' name='hle'/><feature policy='disable' name='rtm'/>\
               <feature policy='disable' name='avx2'/></cpu>";
    let good = [
        ("lv-cpu-hm", "<cpu mode='host-model'/>"),
        ("lv-cpu-hp", "<cpu mode='host-passthrough'/>"),
        ("lv-cpu-kvm64", "<cpu mode='custom' match='exact'><model>kvm64</model></cpu>"),
        ("lv-cpu-sky", sky),
    ];
    for (dom, cpu) in good {
        with_cpu(dom, cpu);
        let o = virsh(&["start", dom]);
        assert!(o.status.success(), "{dom}: {}\n{}", String::from_utf8_lossy(&o.stderr), log(dom));
        assert_eq!(console_request(dom, "INCR 1"), "OK 1 1", "{dom}: the guest serves\n{}", log(dom));
        // Leaf 0x8000_0001's ECX follows the model on every host this runs on (on PVM too).
        let e1 = console_request(dom, "CPUID 2147483649");
        let ecx = u32::from_str_radix(e1.split(' ').nth(4).unwrap_or_default(), 16);
        let ecx = ecx.unwrap_or_else(|_| panic!("{dom}: the guest's CPUID: {e1}"));
        let lahf_abm_prefetch = 1 | 1 << 5 | 1 << 8;
        // Where KVM (PVM on AMD, without CPUID faulting) lets ring 3 run CPUID natively, the
        // guest reads the host's own leaf, whatever the model: only the refusals below and
        // the FT pair's comparison of the vCPUs' CPUID can show the model there.
        let native = std::arch::x86_64::__cpuid(0x8000_0001).ecx;
        let modelled = matches!(dom, "lv-cpu-kvm64" | "lv-cpu-sky");
        if modelled && ecx == native && ecx & !lahf_abm_prefetch != 0 {
            eprintln!("{dom}: the guest's ring 3 reads the host's CPUID natively on this host ({e1})");
        } else {
            match dom {
                "lv-cpu-kvm64" => assert_eq!(ecx, 0, "kvm64 has none of leaf 0x80000001's ECX features"),
                "lv-cpu-sky" => assert_eq!(ecx & !lahf_abm_prefetch, 0, "Skylake-Client's only: {ecx:#x}"),
                _ => assert_ne!(ecx, 0, "{dom}: the host's features (LAHF in 64-bit mode at least)"),
            }
        }
        ok(&["destroy", dom]);
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(libvirtd as i32, 0) }, 0, "libvirtd died with {dom}");
    }
    let argv = log("lv-cpu-sky");
    assert!(argv.contains("-cpu Skylake-Client,") && argv.contains("hle=off"), "{argv}");

    let bad = [
        ("lv-cpu-bad-model", "<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu>", "Haswell-noTSX"),
        (
            "lv-cpu-bad-feat",
            // check='none': libvirt leaves the check to smpft.
            "<cpu mode='custom' match='exact' check='none'><model>kvm64</model><feature policy='require' name='pn'/></cpu>",
            "smpft (QEMU persona): CPU 'kvm64,+pn' needs what this host's KVM does not offer: pn",
        ),
    ];
    for (dom, cpu, named) in bad {
        with_cpu(dom, cpu);
        let o = virsh(&["start", dom]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(named), "{dom}: {e}");
    }
    assert!(virsh(&["version"]).status.success(), "libvirtd still answers");
}

/// The two copies of an FT pair must present the same CPU: a standby domain whose CPU model
/// differs from the primary's is refused when the primary connects, naming the leaves, and the
/// primary runs on unprotected.
#[test]
fn an_ft_pair_with_different_cpus_is_refused_naming_the_leaves() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-ft-cpu", true);
    let ft_dir = ft_identities(&lv);
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let guest = "counter service duration=600s";
    let s_meta = ft_meta(&ft_dir, "standby", "b", "a", &format!("<smpft:listen>127.0.0.1:{port}</smpft:listen>"));
    let p_meta = ft_meta(&ft_dir, "primary", "a", "b", &format!("<smpft:peer>127.0.0.1:{port}</smpft:peer>"));
    let (sx, px) = (lv.domain_with("lv-fts", guest, "", &s_meta), lv.domain_with("lv-ftp", guest, "", &p_meta));
    let kvm64 = "<cpu mode='custom' match='exact' check='none'><model>kvm64</model></cpu>";
    std::fs::write(&sx, std::fs::read_to_string(&sx).unwrap().replace("<cpu mode='host-passthrough'/>", kvm64))
        .unwrap();
    ok(&["define", sx.to_str().unwrap()]);
    ok(&["define", px.to_str().unwrap()]);
    ok(&["start", "--paused", "lv-fts"]);
    wait_state("lv-fts", "paused");
    ok(&["start", "lv-ftp"]);
    let never = later(|| format!("the primary never refused the standby: {}\n{}", query_ft("lv-ftp"), log("lv-ftp")));
    wait_until(never, Duration::from_secs(30), || log("lv-ftp").contains("the guest's CPUID differs"));
    let l = log("lv-ftp");
    let line = l.lines().find(|l| l.contains("the guest's CPUID differs")).unwrap();
    assert!(line.contains("in leaves 0x1.0"), "the differing leaves are named: {line}");
    assert!(!query_ft("lv-ftp").contains(r#""state":"protected""#), "{}", query_ft("lv-ftp"));
    assert_eq!(console_request("lv-ftp", "INCR 1"), "OK 1 1", "the primary runs on");
}

/// `<genid>` (libvirt's `-device vmgenid,guid=`): the guest reads that GUID, and QMP reports it.
#[test]
fn the_domains_genid_is_the_guests_vm_generation_id() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-genid");
    let dom = "lv-genid";
    let _gone = Domains(&["lv-genid"]);
    let _ = virsh(&["destroy", dom]);
    let _ = virsh(&["undefine", dom]);
    let guid = "c773c261-d800-4348-9f5d-167fadd53cf8";
    let xml = lv.domain(dom, "vmgenid counter service duration=600s", "");
    let text = std::fs::read_to_string(&xml).unwrap().replacen("</name>", &format!("</name><genid>{guid}</genid>"), 1);
    std::fs::write(&xml, text).unwrap();
    ok(&["define", xml.to_str().unwrap()]);
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1");
    assert!(last_start_log(dom).contains(&format!("vmgenid: {guid}")), "{}", last_start_log(dom));
    let q = ok(&["qemu-monitor-command", dom, r#"{"execute":"query-vm-generation-id"}"#]);
    assert!(q.contains(&format!(r#""guid":"{guid}""#)), "{q}");
    assert!(ok(&["dumpxml", dom]).contains(&format!("<genid>{guid}</genid>")));
}
