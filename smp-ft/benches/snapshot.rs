//! Snapshot pause breakdown on real KVM guests; prints a table
//! (run: `cargo bench -p smp-ft --bench snapshot`).
//!
//! For 0, 256, 1k, 4k and 16k dirty pages per interval and 1, 2, 4, 8 vCPUs: time to stop the
//! vCPUs, harvest the dirty log, copy the dirty pages into a buffer, save vCPU/VM/device state,
//! and resume. Writing the snapshot anywhere is not included (it happens after the resume).
//! The guest rewrites a working set of exactly that many pages flat out (`churn-rate=0`), so
//! every page of it is dirty again by the next snapshot 20 ms later; the table shows the pages
//! actually captured. `SMPFT_BENCH_QUICK=1` shortens the run.

use smp_ft::snapshot::{Chain, Kind, PauseTimings};
use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::{Vm, VmConfig, DEFAULT_KVM_DEVICE};
use std::time::Duration;

fn p(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
}

fn main() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is missing: these benchmarks need KVM");
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let rounds = if quick { 10 } else { 60 };
    let dir = std::env::temp_dir().join(format!("smpft-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("\nSnapshot pause breakdown, 256 MiB guest, one incremental snapshot every 20 ms ({rounds} rounds; p50 in µs unless marked)");
    println!(
        "{:>5} {:>6} | {:>6} | {:>7} {:>8} {:>7} {:>7} {:>7} | {:>9} {:>9}",
        "vCPUs", "dirty", "pages", "stop", "harvest", "copy", "state", "resume", "total p50", "total p99"
    );
    println!("{:-<12}-+-{:-<6}-+-{:-<41}-+-{:-<19}", "", "", "", "");
    for vcpus in [1u32, 2, 4, 8] {
        for dirty in [0u64, 256, 1024, 4096, 16384] {
            let args = if dirty == 0 { String::new() } else { format!("churn churn-rate=0 churn-ws={}", dirty * 4096) };
            let config = VmConfig {
                vcpus,
                memory: 256 << 20,
                payload: smp_ft::vmm::Payload::TestGuest { image: smp_ft::guest::BUILTIN.into(), args },
                guest_name: "built-in".into(),
                serial: SerialSpec::Null,
                serial_log: None,
                console: Some(dir.join("console.log")),
                kvm_device: DEFAULT_KVM_DEVICE.into(),
                devices: Default::default(),
                smbios: Default::default(),
                cpu: Default::default(),
                no_reboot: false,
                no_shutdown: false,
            };
            let vm = Vm::create(config).unwrap().start().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let mut chain = Chain::default();
            chain.take(&vm, Kind::Full).unwrap();
            let mut all: Vec<PauseTimings> = Vec::new();
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(20));
                let (_, t) = chain.take(&vm, Kind::Incremental).unwrap();
                all.push(t);
            }
            vm.shutdown().unwrap();
            let col = |f: &dyn Fn(&PauseTimings) -> Duration| {
                let mut v: Vec<Duration> = all.iter().map(f).collect();
                v.sort();
                v
            };
            let mut pages: Vec<u64> = all.iter().map(|t| t.pages).collect();
            pages.sort_unstable();
            let total = col(&|t| t.total());
            println!(
                "{vcpus:>5} {dirty:>6} | {:>6} | {:>7.0} {:>8.0} {:>7.0} {:>7.0} {:>7.0} | {:>9.0} {:>9.0}",
                pages[pages.len() / 2],
                p(&col(&|t| t.stop), 0.5),
                p(&col(&|t| t.harvest), 0.5),
                p(&col(&|t| t.copy), 0.5),
                p(&col(&|t| t.state), 0.5),
                p(&col(&|t| t.resume), 0.5),
                p(&total, 0.5),
                p(&total, 0.99),
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
