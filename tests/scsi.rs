//! Disks on virtio-scsi end to end: the test guest's virtio-scsi driver scans the controller
//! (REPORT LUNS, INQUIRY, READ CAPACITY(16)) and runs the disk workload on its first LUN
//! (READ(16), WRITE(16), SYNCHRONIZE CACHE), unprotected and through SIGKILL failovers; the
//! writes go through the same write log to the standby as virtio-blk's; and Proxmox's command
//! line for it through the QEMU persona.

mod common;

use common::disk_kills::{self, verified, Kill};
use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side};
use common::{one_at_a_time, require_kvm, seeded_rng, Proc, VmPaths};
use std::path::Path;
use std::time::Duration;

/// The disk workload's unit: every 8-byte word of a unit written with generation `g` is
/// `word(unit, g, i)` (guest/src/disk.rs).
const UNIT: usize = 4096;
const DISK_SIZE: u64 = 8 << 20;

fn word(unit: u64, generation: u64, i: u64) -> u64 {
    let mut x = unit.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= i.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 29)
}

/// The generation a unit's first word says it was written with, if that is a plausible one:
/// the mixing is undone (the shift-xor, then the odd multiplier by its inverse modulo 2^64).
fn generation(unit: u64, first: u64) -> Option<u64> {
    let x = first ^ (first >> 29) ^ (first >> 58);
    let mut inverse: u64 = 0xbf58_476d_1ce4_e5b9;
    for _ in 0..6 {
        inverse = inverse.wrapping_mul(2u64.wrapping_sub(0xbf58_476d_1ce4_e5b9u64.wrapping_mul(inverse)));
    }
    let g = (x ^ unit.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(inverse);
    (1..=u64::from(u32::MAX)).contains(&g).then_some(g)
}

/// Checks every unit of `image` against the guest's data: untouched (zeroes), or whole at one
/// generation, of its own unit. Returns the number of units written.
fn units_written(image: &Path) -> Result<u64, String> {
    let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
    let mut written = 0;
    for (unit, data) in bytes.chunks_exact(UNIT).enumerate() {
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        let words: Vec<u64> = data.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
        let unit = unit as u64;
        let g =
            generation(unit, words[0]).ok_or_else(|| format!("unit {unit} holds data the guest never wrote there"))?;
        if let Some(i) = (0..words.len()).find(|&i| words[i] != word(unit, g, i as u64)) {
            return Err(format!("unit {unit}: word {i} is not generation {g}'s (a torn or misplaced write)"));
        }
        written += 1;
    }
    Ok(written)
}

fn raw_image(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(DISK_SIZE).unwrap();
}

#[test]
fn generations_are_recovered_from_the_guests_data() {
    for (unit, g) in [(0, 1), (7, 2), (4095, 123_456), (1, u64::from(u32::MAX))] {
        assert_eq!(generation(unit, word(unit, g, 0)), Some(g));
    }
    assert_eq!(generation(5, word(6, 3, 0)), None, "another unit's data");
}

/// Unprotected, the guest scans the controller and writes, flushes and reads back its disk;
/// afterwards the image holds, unit by unit, exactly what the guest wrote there (each unit at
/// one generation of its own data), as many units as the guest verified.
#[test]
fn the_disk_workload_runs_on_virtio_scsi_and_the_image_holds_what_the_guest_wrote() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("scsi-unprotected");
    let img = dir.join("d.raw");
    raw_image(&img);
    let p = VmPaths::new(&dir, "vm");
    let guest = "disk disk-bus=scsi disk-check=4 flush-every=8 duration=4s";
    let disk = format!("{},bus=scsi", img.display());
    let vm = p.spawn(&["--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--disk", &disk]);
    let status = wait_exit(vm, Duration::from_secs(60));
    let console = p.console();
    assert_eq!(status.code(), Some(0), "the guest's checks pass\n{console}");
    assert!(console.contains("scsi: target 0 has 1 LUN(s)"), "REPORT LUNS\n{console}");
    assert!(console.contains("'SMPFT   smpft disk"), "INQUIRY\n{console}");
    assert!(console.contains(&format!("{} blocks of 512 bytes", DISK_SIZE / 512)), "READ CAPACITY(16)\n{console}");
    assert!(console.contains("virtio-scsi LUN 0"), "{console}");
    let flushes: u64 = console
        .lines()
        .find_map(|l| l.split("flushes=").nth(1)?.split(' ').next()?.parse().ok())
        .expect("the guest's totals");
    assert!(flushes > 0, "SYNCHRONIZE CACHE was sent\n{console}");
    let written = units_written(&img).unwrap_or_else(|e| panic!("{e}\n{console}"));
    assert!(written > 0, "the guest wrote\n{console}");
    assert_eq!(written, verified(&console), "every unit the guest verified, and no other, is in the image");
}

/// A disk on virtio-scsi and one on virtio-blk side by side: each workload finds its own.
#[test]
fn scsi_and_blk_disks_side_by_side() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("scsi-beside-blk");
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    raw_image(&a);
    raw_image(&b);
    for (bus, image) in [("scsi", &b), ("virtio", &a)] {
        let p = VmPaths::new(&dir, bus);
        let guest = format!("disk disk-bus={bus} duration=2s");
        let (blk, scsi) = (a.display().to_string(), format!("{},bus=scsi,lun=4", b.display()));
        let vm =
            p.spawn(&["--vcpus", "1", "--memory", "128M", "--guest-args", &guest, "--disk", &blk, "--disk", &scsi]);
        let status = wait_exit(vm, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{bus}\n{}", p.console());
        let written = units_written(image).unwrap_or_else(|e| panic!("{bus}: {e}"));
        assert_eq!(written, verified(&p.console()), "{bus}: the workload wrote its own disk");
    }
    assert!(VmPaths::new(&dir, "scsi").console().contains("the disk workload uses LUN 4"));
}

/// Proxmox VE 8's command line for a virtio-scsi disk, as qm writes it (the controller at slot
/// 5, a qcow2 drive qemu-storage-daemon opens, the scsi-hd on it), through the QEMU persona:
/// the guest finds the controller where qm put it and its disk workload passes, and the image,
/// read back by qemu-img, holds unit by unit what the guest verified.
#[test]
fn proxmox_virtio_scsi_through_the_qemu_persona() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("scsi-proxmox");
    let img = dir.join("vm-8006-disk-0.qcow2");
    let qemu_img = |args: &[&str]| {
        let o = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img (scripts/setup)");
        assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let guest = dir.join("guest.elf");
    std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
    let drive = format!(
        "file={},if=none,id=drive-scsi0,discard=on,format=qcow2,cache=none,aio=io_uring,detect-zeroes=unmap",
        img.display()
    );
    let p = VmPaths::new(&dir, "pve8");
    let c = common::smpft()
        .env("SMPFT_LOG", "info")
        .args(["qemu", "--", "-m", "128", "-smp", "2", "-kernel", guest.to_str().unwrap()])
        .args(["-append", "disk disk-bus=scsi flush-every=8 duration=3s", "-drive", &drive])
        .args(["-device", "virtio-scsi-pci,id=scsihw0,bus=pci.0,addr=0x5"])
        .args([
            "-device",
            "scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,bootindex=100,write-cache=on",
        ])
        .args(["-serial", "null"])
        .stderr(std::fs::File::create(p.console.with_extension("log")).unwrap())
        .stdout(std::fs::File::create(&p.console).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(Proc::new(c), Duration::from_secs(60));
    let out = format!("{}{}", p.console(), log(&p));
    assert_eq!(status.code(), Some(0), "the guest's disk check\n{out}");
    assert!(out.contains("qemu-storage-daemon serves the disks"), "{out}");
    assert!(out.contains("00:05.0 [1af4:1048]"), "the controller is where qm put it\n{out}");
    let raw = dir.join("back.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let written = units_written(&raw).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert!(written > 0 && written == verified(&out), "the image holds what the guest verified ({written} units)");
}

fn side<'a>(setup: &'a FtSetup, primary: bool) -> Side<'a> {
    let (me, peer) = if primary { (&setup.a, &setup.b) } else { (&setup.b, &setup.a) };
    Side { me, peer, tiebreak: &setup.tiebreak, env: &[], netns: None }
}

/// The primary is SIGKILLed while its guest writes its virtio-scsi disk flat out: right after a
/// send, right after an acknowledgement, while the standby writes a committed epoch, and at
/// random. The standby goes live; the failover client sees nothing acknowledged lost; the
/// guest, told to exit, reads its whole disk back and finds every unit at the generation its
/// memory records (exit status 0), and the standby's image holds, unit by unit, what the guest
/// verified.
#[test]
fn primary_killed_while_the_guest_writes_its_scsi_disk() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("scsi-kills");
    let (_seed, mut r) = seeded_rng();
    let guest = "counter churn churn-rate=2000 churn-ws=2M service disk disk-bus=scsi flush-every=8 duration=600s";
    for trial in 0..6u64 {
        let kill = Kill::nth(trial, &mut r);
        let what = &kill.what;
        let (p_img, s_img) = (setup.dir.join(format!("p{trial}.raw")), setup.dir.join(format!("s{trial}.raw")));
        raw_image(&p_img);
        raw_image(&s_img);
        let (p_disk, s_disk) = (format!("{},bus=scsi", p_img.display()), format!("{},bus=scsi", s_img.display()));
        let standby = ["--vcpus", "2", "--memory", "128M", "--disk", &s_disk];
        let primary = ["--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--disk", &p_disk];
        let console = disk_kills::run(&setup, &trial.to_string(), &kill, &standby, &primary);
        let written = units_written(&s_img).unwrap_or_else(|e| panic!("{what}: the standby's image: {e}"));
        assert!(verified(&console) > 0, "{what}: the guest read its disk back\n{console}");
        assert_eq!(written, verified(&console), "{what}: the standby's image holds what the guest verified");
        eprintln!("{what}: standby went live; the guest verified {written} units of its SCSI disk");
        std::fs::remove_file(&p_img).ok();
        std::fs::remove_file(&s_img).ok();
    }
}

/// A standby whose disks are not on the same buses as the primary's cannot protect it: both
/// copies must show the guest the same devices.
#[test]
fn a_standby_with_its_disk_on_another_bus_is_refused() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("scsi-mismatch");
    let (p_img, s_img) = (setup.dir.join("p.raw"), setup.dir.join("s.raw"));
    raw_image(&p_img);
    raw_image(&s_img);
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let s_disk = s_img.display().to_string();
    let sb = spawn(&sp, &side(&setup, false), &["standby", "--listen", &addr, "--disk", &s_disk]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let p_disk = format!("{},bus=scsi", p_img.display());
    let mut pr: Proc = spawn(
        &pp,
        &side(&setup, true),
        &["run", "--guest-args", "disk disk-bus=scsi duration=60s", "--ft-peer", &addr, "--disk", &p_disk],
    );
    let status = wait_exit(sb, Duration::from_secs(20));
    assert!(!status.success(), "{}", log(&sp));
    assert!(log(&sp).contains("virtio-scsi"), "the standby says which devices differ\n{}", log(&sp));
    pr.sigkill();
}
