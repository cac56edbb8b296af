//! Pause and resume the running guest 1000 times: every pause is acknowledged by every vCPU,
//! no vCPU is lost or stuck (all of them reach the guest's final barrier), invariants hold.

#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use smp_ft::vmm::control::VcpuState;
use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::state;
use smp_ft::vmm::{Vm, VmConfig, VmEvent, DEFAULT_KVM_DEVICE};
use std::time::Duration;

/// A 4-vCPU guest running every workload, its serial socket and console in `d`.
fn busy_guest(d: &std::path::Path) -> VmConfig {
    VmConfig {
        vcpus: 4,
        memory: 64 << 20,
        payload: smp_ft::vmm::Payload::TestGuest {
            image: smp_ft::guest::BUILTIN.into(),
            args: "counter churn churn-rate=5000 churn-ws=4M service".into(),
        },
        guest_name: "built-in".into(),
        serial: SerialSpec::Unix(d.join("serial.sock")),
        serial_log: None,
        console: Some(d.join("console.log")),
        kvm_device: DEFAULT_KVM_DEVICE.into(),
        devices: Default::default(),
        smbios: Default::default(),
        cpu: Default::default(),
        no_reboot: false,
        no_shutdown: false,
    }
}

#[test]
fn pause_resume_1000_times_while_the_guest_runs() {
    require_kvm();
    let d = scratch("pause");
    let (sock, console) = (d.join("serial.sock"), d.join("console.log"));
    let vm = Vm::create(busy_guest(&d)).unwrap().start().unwrap();
    let mut client = ServiceClient::connect(&sock, Duration::from_secs(10));
    let mut last = 0;
    for i in 0..1000u64 {
        vm.pause().unwrap_or_else(|e| panic!("pause {i}: {e}"));
        let states = vm.control().states();
        assert!(states.iter().all(|s| *s == VcpuState::Paused), "pause {i}: {states:?}");
        vm.resume();
        if i % 100 == 0 {
            // The guest keeps serving between pauses, and its value never goes backwards.
            let (_, v) = reply(&client.call(&format!("INCR {i}")), "OK");
            assert!(v > last);
            last = v;
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(vm.wait_event(Some(Duration::from_millis(10))).is_none(), "the guest must still be running");
    client.call("EXIT 5000");
    assert_eq!(vm.wait_event(Some(Duration::from_secs(30))), Some(VmEvent::GuestExit(0)));
    vm.shutdown().unwrap();
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("RESULT: PASS"), "{log}");
    let reports = cpu_reports(&log);
    assert_eq!(reports.len(), 4, "{log}");
    assert!(reports.iter().all(|r| r.loops > 0 && r.counter > 0 && r.churn > 0), "{reports:?}");
}

/// At a pause each vCPU thread reads its own registers as it stops; the checkpoint completes them
/// once every vCPU has stopped. The result must equal a whole read made then (apart from the TSC,
/// which moves on), at every pause, while the guest runs flat out.
#[test]
fn registers_read_by_each_vcpu_as_it_stops_equal_a_full_read() {
    require_kvm();
    let d = scratch("early-state");
    let vm = Vm::create(busy_guest(&d)).unwrap().start().unwrap();
    let early = vm.early_states().clone();
    const MSR_IA32_TSC: u32 = 0x10;
    let mut rips = std::collections::HashSet::new();
    for i in 0..200u64 {
        vm.pause().unwrap_or_else(|e| panic!("pause {i}: {e}"));
        let pause = vm.control().pause_seq();
        for (v, fd) in vm.vcpu_fds().iter().enumerate() {
            assert_eq!(early.recorded(v), Some(pause), "pause {i}: vCPU {v} left no registers");
            let fd = fd.lock();
            let mut a = early.capture(v, pause, &fd).unwrap();
            let mut b = state::VcpuState::capture(&fd, early.caps()).unwrap();
            assert_eq!(early.recorded(v), None, "an entry is used once");
            for s in [&mut a, &mut b] {
                s.msrs.retain(|(index, _)| *index != MSR_IA32_TSC);
            }
            assert_eq!(a, b, "pause {i}, vCPU {v}");
            rips.insert(a.regs.clone());
        }
        vm.resume();
        // Every vCPU runs again before the next pause, so each will stop (and read) anew.
        vm.control().resume_and_wait(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    // The vCPUs ran between pauses: the registers read were not all the same.
    assert!(rips.len() > 4, "only {} distinct register sets", rips.len());
    vm.shutdown().unwrap();
}
