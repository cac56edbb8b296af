//! The domains OpenStack Nova writes, through a real libvirtd: an instance's XML with every
//! element Nova puts there (its metadata, `<sysinfo>` "OpenStack Compute", `host-model` CPU,
//! the PC platform with USB tablet, PS/2, VNC and video, the serial console's `<log>`, a virtio
//! disk, NIC, rng and balloon at the slots Nova's libvirt gives, the guest agent's channel),
//! changed only in its emulator, machine and `<kernel>` and with a raw disk; and an FT pair of
//! such instances.

mod common;

use common::libvirt::*;
use common::{later, one_at_a_time, wait_for, wait_until};
use std::path::{Path, PathBuf};
use std::time::Duration;

const UUID: &str = "30ad89ac-5906-49ca-8d52-3c6343c598f6";
const GENID: &str = "c773c261-d800-4348-9f5d-167fadd53cf8";
const MAC: &str = "fa:16:3e:be:fd:48";

fn pci(slot: u8, function: u8) -> String {
    format!("<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='{function:#x}'/>")
}

/// What differs between instances: the name, the disk, the console log, the bridge (if any)
/// and smpft's FT metadata (if any).
struct Instance<'a> {
    name: &'a str,
    /// The domain's UUID (the two copies of an FT pair on one host are two libvirt domains).
    uuid: &'a str,
    /// Its `<genid>`.
    genid: &'a str,
    disk: &'a Path,
    console_log: &'a Path,
    bridge: Option<&'a str>,
    ft: &'a str,
    guest: &'a str,
}

/// A Nova instance's domain XML (as Nova writes it for KVM), with smpft as its emulator, the
/// `pc` machine and the test guest as its kernel.
fn nova_domain(lv: &Libvirt, i: &Instance) -> PathBuf {
    let nova = "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.0'>\
        <nova:package version='16.0.2-9.el7ost'/><nova:name>vm_normal</nova:name>\
        <nova:flavor name='m1.small'><nova:memory>128</nova:memory><nova:disk>1</nova:disk><nova:vcpus>2</nova:vcpus></nova:flavor>\
        <nova:root type='image' uuid='c11a1c31-f703-4ae6-a689-5a6b9a624625'/></nova:instance>";
    let nic = i.bridge.map_or(String::new(), |b| {
        format!(
            "<interface type='bridge'><mac address='{MAC}'/><source bridge='{b}'/><model type='virtio'/>{}</interface>",
            pci(3, 0)
        )
    });
    let log = i.console_log.display();
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><genid>{genid}</genid>\
         <metadata>{nova}{ft}</metadata>\
         <memory unit='KiB'>131072</memory><currentMemory unit='KiB'>131072</currentMemory>\
         <vcpu placement='static'>2</vcpu><cputune><shares>1024</shares></cputune>\
         <sysinfo type='smbios'><system><entry name='manufacturer'>Red Hat</entry>\
         <entry name='product'>OpenStack Compute</entry><entry name='version'>16.0.2-9.el7ost</entry>\
         <entry name='serial'>4c4c4544-004a-5310-804e-b9c04f504d32</entry><entry name='uuid'>{uuid}</entry>\
         <entry name='family'>Virtual Machine</entry></system></sysinfo>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel><cmdline>{guest}</cmdline>\
         <boot dev='hd'/><smbios mode='sysinfo'/></os>\
         <features><acpi/><apic/><vmcoreinfo state='on'/></features><cpu mode='host-model' check='partial'/>\
         <clock offset='utc'><timer name='pit' tickpolicy='delay'/><timer name='rtc' tickpolicy='catchup'/>\
         <timer name='hpet' present='no'/></clock>\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices><emulator>{emulator}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='{disk}'/>\
         <target dev='vda' bus='virtio'/>{disk_at}</disk>\
         <controller type='usb' index='0' model='piix3-uhci'>{usb_at}</controller>\
         <controller type='pci' index='0' model='pci-root'/>{nic}\
         <serial type='pty'><log file='{log}' append='off'/><target port='0'/></serial>\
         <console type='pty'><log file='{log}' append='off'/><target type='serial' port='0'/></console>\
         <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>\
         <input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1' keymap='en-us'><listen type='address' address='127.0.0.1'/></graphics>\
         <video><model type='cirrus' vram='16384' heads='1' primary='yes'/>{video_at}</video>\
         <memballoon model='virtio'><stats period='10'/>{balloon_at}</memballoon>\
         <rng model='virtio'><backend model='random'>/dev/urandom</backend>{rng_at}</rng>\
         </devices></domain>",
        name = i.name,
        uuid = i.uuid,
        genid = i.genid,
        ft = i.ft,
        kernel = lv.dir.join("guest.elf").display(),
        guest = i.guest,
        emulator = lv.emulator().display(),
        disk = i.disk.display(),
        disk_at = pci(6, 0),
        usb_at = pci(1, 2),
        video_at = pci(2, 0),
        balloon_at = pci(7, 0),
        rng_at = pci(8, 0),
    );
    let path = lv.dir.join(format!("{}.xml", i.name));
    std::fs::write(&path, xml).unwrap();
    path
}

fn raw_disk(lv: &Libvirt, name: &str) -> PathBuf {
    let p = lv.dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(32 << 20).unwrap();
    p
}

fn agent_ping(dom: &str) -> String {
    let what = format!("{dom}: the guest agent never answered");
    wait_for(what, Duration::from_secs(30), || {
        let o = virsh(&["qemu-agent-command", dom, r#"{"execute":"guest-ping"}"#]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    })
}

fn genid(dom: &str) -> String {
    let reply = ok(&["qemu-monitor-command", dom, r#"{"execute":"query-vm-generation-id"}"#]);
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply}: {e}"));
    v["return"]["guid"].as_str().unwrap_or_else(|| panic!("no guid: {reply}")).to_string()
}

fn balloon_actual(dom: &str) -> Option<u64> {
    let out = ok(&["dommemstat", dom]);
    out.lines().find_map(|l| l.strip_prefix("actual ")?.trim().parse().ok())
}

#[test]
fn a_nova_instance_runs_unchanged_but_for_emulator_machine_kernel_and_disk_format() {
    let _one = one_at_a_time();
    let lv = Libvirt::start("libvirt-nova");
    let net = Bridge::new();
    let (disk, console_log) = (raw_disk(&lv, "nova.raw"), lv.dir.join("console.log"));
    let dom = "lv-nova";
    let guest =
        "smbios pci counter service disk disk-ws=4M rng balloon agent vmgenid net ip=203.0.113.2/24 duration=600s";
    let xml = nova_domain(
        &lv,
        &Instance {
            name: dom,
            uuid: UUID,
            genid: GENID,
            disk: &disk,
            console_log: &console_log,
            bridge: Some(&net.bridge),
            ft: "",
            guest,
        },
    );
    ok(&["define", xml.to_str().unwrap()]);
    ok(&["start", dom]);
    assert_eq!(console_request(dom, "INCR 1"), "OK 1 1", "the instance runs\n{}", log(dom));
    let l = last_start_log(dom);
    // cloud-init's OpenStack check reads the system product.
    let smbios = format!(
        "smbios: system manufacturer=Red Hat product=OpenStack Compute version=16.0.2-9.el7ost \
         serial=4c4c4544-004a-5310-804e-b9c04f504d32 family=Virtual Machine uuid={UUID}"
    );
    assert!(l.contains(&smbios), "{l}");
    // Every virtio device where the XML puts it (Linux names NICs after their slot).
    let found: Vec<&str> = l.lines().filter_map(|l| l.split("pci 00:").nth(1)).collect();
    for (at, what) in [("06.0 [1af4:1042]", "disk"), ("03.0 [1af4:1041]", "NIC"), ("07.0 [1af4:1045]", "balloon")]
        .into_iter()
        .chain([("08.0 [1af4:1044]", "rng")])
    {
        assert!(found.iter().any(|f| f.starts_with(at)), "the {what} at {at}: {found:?}");
    }
    assert!(l.contains(&format!("vmgenid: {GENID}")), "{l}");
    assert_eq!(agent_ping(dom), r#"{"return":{}}"#);
    let never = later(|| format!("the instance's HTTP service never answered\n{}", log(dom)));
    let body = wait_for(never, Duration::from_secs(20), || {
        let o = net.client(&["curl", "-sS", "--max-time", "5", "http://203.0.113.2/incr/2"]);
        o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    assert_eq!(body, "OK 2 2");
    assert_eq!(balloon_actual(dom), Some(128 << 10));
    // `nova console-log` reads the serial console's log file.
    let logged = wait_for("the console log to hold the reply", Duration::from_secs(10), || {
        let l = std::fs::read_to_string(&console_log).unwrap_or_default();
        l.contains("OK 1 1").then_some(l)
    });
    assert_eq!(logged.matches("OK 1 1").count(), 1, "{logged}");
    ok(&["shutdown", dom]);
    wait_state(dom, "shut off");
    assert!(log(dom).contains("RESULT: PASS"), "{}", log(dom));
    ok(&["undefine", dom]);
}

/// An FT pair of Nova instances (each with its own disk, console log and agent socket): the
/// primary's process SIGKILLed, the standby goes live with every acknowledged value, its
/// agent answers, the balloon's target and the VM generation ID are what they were, and the
/// console log on the standby's side holds each reply once.
#[test]
fn an_ft_pair_of_nova_instances_fails_over_with_agent_balloon_and_generation_id() {
    let _one = one_at_a_time();
    let lv = Libvirt::start_with("libvirt-nova-ft", true);
    let ft_dir = ft_identities(&lv);
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s_meta = ft_meta(&ft_dir, "standby", "b", "a", &format!("<smpft:listen>127.0.0.1:{port}</smpft:listen>"));
    let p_meta = ft_meta(&ft_dir, "primary", "a", "b", &format!("<smpft:peer>127.0.0.1:{port}</smpft:peer>"));
    let guest = "smbios counter service disk disk-ws=4M rng balloon agent vmgenid duration=600s";
    let (pd, sd) = (raw_disk(&lv, "p.raw"), raw_disk(&lv, "s.raw"));
    let (pl, sl) = (lv.dir.join("p-console.log"), lv.dir.join("s-console.log"));
    let primary = Instance {
        name: "lv-novap",
        uuid: UUID,
        genid: GENID,
        disk: &pd,
        console_log: &pl,
        bridge: None,
        ft: &p_meta,
        guest,
    };
    let standby = Instance {
        name: "lv-novas",
        uuid: "4f1c1f38-0f7e-4a57-9a55-3b0f6f2a9d11",
        // Another ID in the standby's XML: the one the VM has comes with its memory.
        genid: "0e4a8b1c-6a3f-4d8e-9b2a-5c7d1e0f3a42",
        disk: &sd,
        console_log: &sl,
        bridge: None,
        ft: &s_meta,
        guest,
    };
    let (px, sx) = (nova_domain(&lv, &primary), nova_domain(&lv, &standby));
    ok(&["define", sx.to_str().unwrap()]);
    ok(&["define", px.to_str().unwrap()]);
    ok(&["start", "--paused", "lv-novas"]);
    wait_state("lv-novas", "paused");
    ok(&["start", "lv-novap"]);
    let never = later(|| format!("never protected: {}\n{}", query_ft("lv-novap"), log("lv-novap")));
    wait_until(never, Duration::from_secs(60), || query_ft("lv-novap").contains(r#""state":"protected""#));
    for i in 1..=10 {
        assert_eq!(console_request("lv-novap", &format!("INCR {i}")), format!("OK {i} {i}"));
    }
    assert_eq!(agent_ping("lv-novap"), r#"{"return":{}}"#);
    ok(&["setmem", "lv-novap", "98304", "--live"]);
    let never = later(|| format!("the balloon never followed: {}", ok(&["dommemstat", "lv-novap"])));
    wait_until(never, Duration::from_secs(30), || balloon_actual("lv-novap") == Some(96 << 10));
    let id = genid("lv-novap");
    assert_eq!(id, GENID);
    // Let a checkpoint carry the balloon's state, then kill the primary's process.
    assert_eq!(console_request("lv-novap", "INCR 11"), "OK 11 11");
    let pid: i32 = std::fs::read_to_string("/run/libvirt/qemu/lv-novap.pid").unwrap().trim().parse().unwrap();
    // SAFETY: kill sends SIGKILL to the primary domain's process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_state("lv-novas", "running");
    assert!(query_ft("lv-novas").contains("live-after-failover"), "{}", query_ft("lv-novas"));
    assert_eq!(console_request("lv-novas", "INCR 12"), "OK 12 12", "nothing lost: the value goes on from 11");
    assert_eq!(agent_ping("lv-novas"), r#"{"return":{}}"#, "the agent answers on the standby's channel");
    assert_eq!(balloon_actual("lv-novas"), Some(96 << 10), "the balloon's target came with the VM");
    assert_eq!(genid("lv-novas"), GENID, "the same VM goes on: the primary's generation ID");
    let s_log = std::fs::read_to_string(&sl).unwrap_or_default();
    assert_eq!(s_log.matches("OK 12 12").count(), 1, "the standby's console log holds its replies once:\n{s_log}");
    assert!(!s_log.contains("OK 11 11"), "the primary's replies are in the primary's log:\n{s_log}");
    wait_state("lv-novap", "shut off");
    ok(&["destroy", "lv-novas"]);
}
