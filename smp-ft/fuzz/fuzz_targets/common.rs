//! What both targets build on: a small valid machine state, and bit flips driven by the input.

use smp_ft::vmm::component::Component;
use smp_ft::vmm::devices::gate::OutputGate;
use smp_ft::vmm::devices::serial::SerialDevice;
use smp_ft::vmm::machine::{ComponentState, MachineState};
use smp_ft::vmm::state::{VcpuState, VmState};
use std::sync::Arc;

pub fn vcpu() -> VcpuState {
    VcpuState {
        regs: vec![1; 16],
        sregs: vec![2; 16],
        xsave: vec![3; 8],
        xcrs: vec![4; 8],
        lapic: vec![5; 16],
        msrs: vec![(0x10, 99)],
        mp_state: 0,
        events: vec![6; 8],
        debugregs: vec![7; 8],
    }
}

pub fn vm_state() -> VmState {
    VmState { pic_master: vec![1], pic_slave: vec![2], ioapic: vec![3], pit: vec![4], clock: vec![5] }
}

/// A device of each kind a machine state can name, for restoring fuzzed states into.
pub fn devices() -> Vec<Arc<dyn Component>> {
    vec![SerialDevice::new(None, OutputGate::new()).expect("serial")]
}

/// A valid machine state of `cpus` vCPUs with every device's state.
pub fn machine(cpus: usize) -> MachineState {
    let components = devices()
        .iter()
        .map(|c| ComponentState { name: c.name().into(), version: c.version(), data: c.save().expect("save") })
        .collect();
    MachineState { cpus: (0..cpus).map(|_| vcpu()).collect(), vm: vm_state(), components }
}

/// Restores every component state `m` holds into fresh devices; errors are fine, panics not.
pub fn restore_components(m: &MachineState) {
    let devices = devices();
    for s in &m.components {
        if let Some(d) = devices.iter().find(|d| d.name() == s.name) {
            let _ = d.restore(s.version, &s.data);
        }
    }
}

/// `valid` with `flips` applied (each 3 bytes: a position, then a mask) from offset `from` on.
pub fn flipped(valid: &[u8], from: usize, flips: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    let span = v.len().saturating_sub(from).max(1);
    for f in flips.chunks_exact(3) {
        let at = from + usize::from(u16::from_le_bytes([f[0], f[1]])) % span;
        if let Some(b) = v.get_mut(at) {
            *b ^= f[2];
        }
    }
    v
}
