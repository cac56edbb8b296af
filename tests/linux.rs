//! Linux boot smoke tests: Debian's cloud kernel, through its PVH entry (an extracted vmlinux)
//! and through the bzImage's 64-bit boot protocol, with a busybox initrd, reading the serial
//! console for boot milestones in order.
//!
//! Where KVM is PVM (this project's CI hosts), guest ring-0 code is emulated instruction by
//! instruction: a kernel gets through its early setup (version, command line, e820 map, ACPI
//! tables, memory) and no further. The tests require those milestones there and report how
//! far the boot got; on a VMX/SVM host they also require the virtio devices and the initrd's
//! marker, and a clean power-off.

mod common;
use common::ft::{free_port, spawn_with_serial, wait_state, FtSetup, Side};
use common::linux::*;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave clearcpuid=cx16 smpft.test=milestones";
const VCPUS: u32 = 2;
const MEMORY_MIB: u64 = 256;

/// A milestone: what it is, and how to recognise its line.
struct Milestone {
    what: String,
    found: Box<dyn Fn(&str) -> bool>,
}

fn line(what: &str, needle: String) -> Milestone {
    Milestone { what: what.into(), found: Box::new(move |l| l.contains(&needle)) }
}

/// The early milestones, which any host must reach, in the order Linux prints them.
fn early() -> Vec<Milestone> {
    let map = smp_ft::vmm::linux::e820::map(MEMORY_MIB << 20);
    let ram_kib = smp_ft::vmm::linux::e820::ram(&map) / 1024;
    let mut m =
        vec![line("Linux version", "Linux version ".into()), line("command line", format!("Command line: {CMDLINE}"))];
    for e in &map {
        m.push(line(&format!("e820 {}", e.linux_line()), format!("BIOS-e820: {}", e.linux_line())));
    }
    m.push(line("ACPI RSDP found", "ACPI: RSDP 0x00000000000E0000".into()));
    m.push(line("ACPI MADT found", "ACPI: APIC 0x".into()));
    m.push(line(&format!("{VCPUS} CPUs from the MADT"), format!("smpboot: Allowing {VCPUS} CPUs, 0 hotplug CPUs")));
    // "Memory: 214644K/261752K available": the second figure is the RAM the map gave, less
    // page 0 and the partial page below the EBDA.
    m.push(Milestone {
        what: format!("memory size (~{ram_kib}K)"),
        found: Box::new(move |l| {
            let Some(rest) = l.split("Memory: ").nth(1) else { return false };
            let total = rest.split('/').nth(1).and_then(|t| t.split('K').next()).and_then(|t| t.parse::<u64>().ok());
            total.is_some_and(|t| t <= ram_kib && t + 1024 >= ram_kib)
        }),
    });
    m
}

/// The rest, reached only where ring 0 runs natively.
fn late() -> Vec<Milestone> {
    vec![
        line("PCI host bridge from the DSDT", "PCI Root Bridge [PCI0]".into()),
        line("COM1 driver", "ttyS0 at I/O 0x3f8 (irq = 4".into()),
        line("init ran, saw the virtio device", format!("{INIT_MARKER} virtio=1")),
    ]
}

/// How many of `milestones` the console text shows, in order, and the lines that showed them.
fn reached(milestones: &[Milestone], text: &str) -> usize {
    let mut next = 0;
    for l in text.lines() {
        while next < milestones.len() && (milestones[next].found)(l) {
            next += 1;
        }
    }
    next
}

/// Boots `kernel` and follows the console until every milestone is seen in order, the VM
/// ends, or `bound` passes. Returns the seconds at which each milestone was seen.
/// How the kernel is started: `smpft run --kernel`, or the QEMU persona's command line as
/// libvirt writes it for `<kernel>`, `<initrd>` and `<cmdline>`.
#[derive(PartialEq)]
enum How {
    Run,
    Persona,
}

fn boot(name: &str, kernel: &std::path::Path, bound: Duration) -> Vec<(String, Option<f64>)> {
    boot_as(How::Run, name, kernel, bound)
}

fn boot_as(how: How, name: &str, kernel: &std::path::Path, bound: Duration) -> Vec<(String, Option<f64>)> {
    require_kvm();
    let d = scratch(name);
    let initrd = initrd(&d);
    let serial = d.join("serial.log");
    let start = Instant::now();
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let (vcpus, serial_arg) = (VCPUS.to_string(), format!("file:{}", serial.display()));
    let (run_memory, persona_memory) = (format!("{MEMORY_MIB}M"), MEMORY_MIB.to_string());
    let args: Vec<&str> = match how {
        How::Run => vec!["run", "--vcpus", &vcpus, "--memory", &run_memory, "--rng", "--kernel", kernel]
            .into_iter()
            .chain(["--initrd", initrd, "--cmdline", CMDLINE, "--serial", &serial_arg])
            .collect(),
        How::Persona => vec!["qemu", "-machine", "smpft", "-nodefaults", "-smp", &vcpus, "-m", &persona_memory]
            .into_iter()
            .chain(["-kernel", kernel, "-initrd", initrd, "-append", CMDLINE, "-serial", &serial_arg])
            .collect(),
    };
    let log = std::fs::File::create(d.join("smpft.log")).unwrap();
    let mut vm = Proc::new(smpft().args(&args).stderr(log).spawn().unwrap());
    let full = ring0_is_native() && how == How::Run;
    let mut milestones = early();
    if how == How::Persona {
        // Enough to show the persona hands the kernel its initrd and command line.
        milestones.truncate(2 + smp_ft::vmm::linux::e820::map(MEMORY_MIB << 20).len());
    } else if full {
        milestones.extend(late());
    }
    let mut seen: Vec<Option<f64>> = vec![None; milestones.len()];
    let mut next = 0;
    let mut consumed = 0;
    let mut ended = None;
    while next < milestones.len() && start.elapsed() < bound {
        ended = vm.try_wait();
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        // Only whole lines, each looked at once, in order.
        let upto = text.rfind('\n').map_or(0, |i| i + 1);
        for l in text[consumed.min(upto)..upto].lines() {
            while next < milestones.len() && (milestones[next].found)(l) {
                seen[next] = Some(start.elapsed().as_secs_f64());
                next += 1;
            }
        }
        consumed = upto;
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let log = std::fs::read_to_string(d.join("smpft.log")).unwrap_or_default();
    if full && next == milestones.len() {
        let st = ended.or_else(|| {
            std::thread::sleep(Duration::from_secs(5));
            vm.try_wait()
        });
        assert_eq!(st.and_then(|s| s.code()), Some(0), "the guest powered off cleanly\n{log}");
    }
    vm.sigkill();
    let table: Vec<(String, Option<f64>)> = milestones.into_iter().map(|m| m.what).zip(seen).collect();
    eprintln!("{name}: boot milestones ({}):", if full { "full boot" } else { "PVM host: early setup only" });
    for (what, at) in &table {
        eprintln!("  {:>8}  {what}", at.map_or("-".into(), |s| format!("{s:.1} s")));
    }
    eprintln!("  last console line: {}", console.lines().last().unwrap_or("(none)"));
    eprintln!("  smpft: {}", log.lines().rev().find(|l| l.contains("error")).unwrap_or("no error").trim());
    let required = table.len().min(if full { usize::MAX } else { early().len() });
    if let Some((what, _)) = table[..required].iter().find(|(_, at)| at.is_none()) {
        panic!(
            "{name}: milestone '{what}' not reached within {bound:?}\n--- console (last 40 lines) ---\n{}\n--- smpft ---\n{log}",
            console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    table
}

#[test]
fn linux_boots_through_its_pvh_entry() {
    boot("linux-pvh", &vmlinux(), Duration::from_secs(120));
}

#[test]
fn the_qemu_persona_boots_linux_from_kernel_initrd_and_append() {
    boot_as(How::Persona, "linux-persona", &vmlinux(), Duration::from_secs(60));
}

#[test]
fn linux_boots_through_the_bzimage_64_bit_entry() {
    boot("linux-bzimage", &bzimage(), Duration::from_secs(240));
}

/// Waits until `path` shows every milestone in `upto`, or panics after `bound`.
fn wait_console(path: &Path, upto: &[Milestone], bound: Duration, what: &str) {
    let deadline = Instant::now() + bound;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if reached(upto, &text) == upto.len() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: console never reached the milestones\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Linux guest is protected like any other: the primary is SIGKILLed in the middle of the
/// kernel's early setup; the standby goes live from the last checkpoint and the boot carries on
/// there. The two consoles together hold the boot log once, in order: every milestone, no
/// line repeated, timestamps never going back.
#[test]
fn a_protected_linux_guest_fails_over_mid_boot() {
    require_kvm();
    let ft = FtSetup::new("linux-ft");
    let (pp, sp) = (ft.paths("primary"), ft.paths("standby"));
    let (pcon, scon) = (ft.dir.join("primary.ttyS0"), ft.dir.join("standby.ttyS0"));
    let listen = format!("127.0.0.1:{}", free_port());
    let (kernel, initrd) = (vmlinux(), initrd(&ft.dir));
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let (vcpus, memory) = (VCPUS.to_string(), format!("{MEMORY_MIB}M"));
    let b = Side { me: &ft.b, peer: &ft.a, tiebreak: &ft.tiebreak, env: &[], netns: None };
    let a = Side { me: &ft.a, peer: &ft.b, tiebreak: &ft.tiebreak, env: &[], netns: None };
    let standby_args = ["standby", "--listen", &listen, "--vcpus", &vcpus, "--memory", &memory];
    let mut standby = spawn_with_serial(&sp, &b, &standby_args, &format!("file:{}", scon.display()));
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let run = ["run", "--vcpus", &vcpus, "--memory", &memory, "--kernel", kernel, "--initrd", initrd];
    let args = [&run[..], &["--cmdline", CMDLINE, "--ft-peer", &listen]].concat();
    let mut primary = spawn_with_serial(&pp, &a, &args, &format!("file:{}", pcon.display()));
    wait_state(&pp, "protected", Duration::from_secs(30));

    let milestones = early();
    let rsdp = milestones.iter().position(|m| m.what == "ACPI RSDP found").unwrap();
    wait_console(&pcon, &milestones[..=rsdp], Duration::from_secs(90), "primary");
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(10));
    let joined = || {
        let p = std::fs::read_to_string(&pcon).unwrap_or_default();
        p + &std::fs::read_to_string(&scon).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while reached(&milestones, &joined()) < milestones.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let primary_text = std::fs::read_to_string(&pcon).unwrap();
    let standby_text = std::fs::read_to_string(&scon).unwrap_or_default();
    let all = joined();
    standby.sigkill();
    let context = || format!("--- primary ---\n{primary_text}\n--- standby ---\n{standby_text}");
    assert_eq!(reached(&milestones, &all), milestones.len(), "the boot went on after the failover\n{}", context());
    assert!(reached(&milestones, &primary_text) < milestones.len(), "the kill came before the last milestone");
    let mut last = -1.0f64;
    let mut seen = std::collections::HashSet::new();
    for l in all.lines().filter(|l| l.starts_with('[')) {
        let Some(t) = l[1..].split(']').next().and_then(|t| t.trim().parse::<f64>().ok()) else { continue };
        assert!(t >= last, "time went back at {l:?}\n{}", context());
        assert!(seen.insert(l.to_string()), "line repeated: {l:?}\n{}", context());
        last = t;
    }
    eprintln!(
        "failover mid-boot: primary console ended at {:?}; standby console began at {:?}",
        primary_text.lines().last().unwrap_or(""),
        standby_text.lines().next().unwrap_or("")
    );
}
