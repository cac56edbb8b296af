//! VMM benchmarks on real KVM guests; prints tables (run: `cargo bench -p smp-ft --bench vmm`).
//!
//! - pause and resume latency of all vCPUs (p50/p99) for 1, 2, 4, 8 vCPUs;
//! - serial round trips per second through the guest's `service` (one at a time, and pipelined);
//! - `churn` pages per second achieved per vCPU with the rate unlimited.
//!
//! `SMPFT_BENCH_QUICK=1` shortens every run (for a smoke test).

use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::{RunningVm, Vm, VmConfig, DEFAULT_KVM_DEVICE};
use smpft_client::{parse_reply, ServiceClient};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("smpft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(vcpus: u32, args: &str, serial: SerialSpec, console: Option<PathBuf>) -> RunningVm {
    let config = VmConfig {
        vcpus,
        memory: 256 << 20,
        payload: smp_ft::vmm::Payload::TestGuest { image: smp_ft::guest::BUILTIN.into(), args: args.into() },
        guest_name: "built-in".into(),
        serial,
        serial_log: None,
        console,
        kvm_device: DEFAULT_KVM_DEVICE.into(),
        devices: Default::default(),
        smbios: Default::default(),
        cpu: Default::default(),
        no_reboot: false,
        no_shutdown: false,
    };
    Vm::create(config).expect("create VM (is /dev/kvm there?)").start().expect("start VM")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn pause_resume() {
    let cycles = if quick() { 50 } else { 1000 };
    println!("\nPause / resume of all vCPUs ({cycles} cycles each; guest: counter + churn 1000 pages/s/vCPU)");
    println!(
        "{:>6} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10}",
        "vCPUs", "pause p50", "pause p99", "resume p50", "resume p99", "total p50", "total p99"
    );
    println!("{:-<6}-+-{:-<21}-+-{:-<21}-+-{:-<21}", "", "", "", "");
    for vcpus in [1, 2, 4, 8] {
        let vm = start(
            vcpus,
            "counter churn churn-rate=1000 churn-ws=8M",
            SerialSpec::Null,
            Some(scratch().join("pause-console.log")),
        );
        std::thread::sleep(Duration::from_millis(100));
        let (mut p, mut r, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cycles {
            let t0 = Instant::now();
            vm.pause().unwrap();
            let t1 = Instant::now();
            vm.control().resume_and_wait(Duration::from_secs(5)).unwrap();
            let t2 = Instant::now();
            p.push(t1 - t0);
            r.push(t2 - t1);
            t.push(t2 - t0);
            std::thread::sleep(Duration::from_millis(2));
        }
        vm.shutdown().unwrap();
        for v in [&mut p, &mut r, &mut t] {
            v.sort();
        }
        println!(
            "{vcpus:>6} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10}",
            us(pct(&p, 0.5)),
            us(pct(&p, 0.99)),
            us(pct(&r, 0.5)),
            us(pct(&r, 0.99)),
            us(pct(&t, 0.5)),
            us(pct(&t, 0.99))
        );
    }
    println!("(microseconds)");
}

fn serial_round_trips() {
    let n: u64 = if quick() { 200 } else { 3000 };
    println!("\nSerial round trips through the guest service ({n} INCR requests; 2 vCPUs, guest: service + counter)");
    println!("{:>10} | {:>10} | {:>10} {:>10}", "in flight", "requests/s", "RTT p50", "RTT p99");
    println!("{:-<10}-+-{:-<10}-+-{:-<21}", "", "", "");
    let d = scratch();
    for window in [1u64, 16] {
        let sock = d.join(format!("serial-{window}.sock"));
        let vm = start(2, "service counter", SerialSpec::Unix(sock.clone()), Some(d.join("serial-console.log")));
        let mut c = ServiceClient::connect(&sock, Duration::from_secs(10)).unwrap();
        let mut sent_at = std::collections::VecDeque::new();
        let mut rtts = Vec::new();
        let (mut sent, mut got) = (0u64, 0u64);
        let start_t = Instant::now();
        while got < n {
            while sent < n && sent - got < window {
                c.send(&format!("INCR {sent}")).unwrap();
                sent_at.push_back(Instant::now());
                sent += 1;
            }
            parse_reply(&c.recv().unwrap(), "OK").unwrap();
            rtts.push(sent_at.pop_front().unwrap().elapsed());
            got += 1;
        }
        let rate = n as f64 / start_t.elapsed().as_secs_f64();
        vm.shutdown().unwrap();
        rtts.sort();
        println!("{window:>10} | {rate:>10.0} | {:>10} {:>10}", us(pct(&rtts, 0.5)), us(pct(&rtts, 0.99)));
    }
    println!("(RTT in microseconds, including time queued behind earlier requests)");
}

fn churn_rate() {
    let secs = if quick() { 1 } else { 3 };
    println!("\nChurn with the rate unlimited ({secs} s; 4 KiB pages written per second per vCPU; working set 64 MiB)");
    println!("{:>6} | {:>16} | {:>16}", "vCPUs", "pages/s per vCPU", "pages/s total");
    println!("{:-<6}-+-{:-<16}-+-{:-<16}", "", "", "");
    let d = scratch();
    for vcpus in [1u32, 2, 4, 8] {
        let console = d.join(format!("churn-{vcpus}.log"));
        let vm = start(
            vcpus,
            &format!("churn churn-rate=0 churn-ws=64M duration={secs}s"),
            SerialSpec::Null,
            Some(console.clone()),
        );
        let ev = vm.wait_event(Some(Duration::from_secs(60)));
        vm.shutdown().unwrap();
        assert_eq!(ev, Some(smp_ft::vmm::VmEvent::GuestExit(0)));
        let log = std::fs::read_to_string(&console).unwrap();
        let total: u64 = log
            .lines()
            .filter_map(|l| l.strip_prefix("RESULT: PASS "))
            .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("churn_pages=")))
            .filter_map(|v| v.parse().ok())
            .next()
            .expect("churn total in the guest's report");
        let per_s = total as f64 / secs as f64;
        println!("{vcpus:>6} | {:>16.0} | {per_s:>16.0}", per_s / f64::from(vcpus));
    }
    println!(
        "(host: {} CPUs; vCPUs beyond that share them)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing special. Either way, run.
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing: these benchmarks need KVM");
    pause_resume();
    serial_round_trips();
    churn_rate();
}
