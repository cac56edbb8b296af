//! Complete vCPU and VM-wide KVM state, captured from a paused VM and restored into a fresh one.
//!
//! KVM's state structures are plain C data; they are carried as their raw bytes (checked for
//! length on the way back) inside rkyv-archived records, so the snapshot format does not depend on
//! kvm-bindings' Rust types.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use parking_lot::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM: cannot {what}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("state record {what} has {got} bytes, expected {want}")]
    Size { what: &'static str, got: usize, want: usize },
    #[error("KVM restored {done} of {want} MSRs (first failing index {index:#x})")]
    Msrs { done: usize, want: usize, index: u32 },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Plain C structures from kvm-bindings that may be copied to and from bytes.
///
/// # Safety
/// Implementors are `repr(C)` plain data: every bit pattern is a valid value.
unsafe trait Pod: Copy + Default {}
// SAFETY: bindgen-generated repr(C) structs of integers and arrays of integers (this and the
// impls below).
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above (the union inside holds only byte arrays and integer structs).
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}

fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: T is plain data (Pod), so all of its size_of::<T>() bytes may be read.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Pod>(what: &'static str, b: &[u8]) -> Result<T, StateError> {
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(StateError::Size { what, got: b.len(), want });
    }
    let mut v = T::default();
    // SAFETY: exactly size_of::<T>() bytes are copied into a T, and any bit pattern is valid.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), want) };
    Ok(v)
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VcpuState {
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    /// XSAVE area (KVM_GET_XSAVE2 when the host has it, else the 4 KiB legacy area), as u32s.
    pub xsave: Vec<u32>,
    pub xcrs: Vec<u8>,
    pub lapic: Vec<u8>,
    /// (index, value) for every MSR KVM lets us save.
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: u32,
    pub events: Vec<u8>,
    pub debugregs: Vec<u8>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmState {
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
    pub pit: Vec<u8>,
    pub clock: Vec<u8>,
}

/// Host facts needed to capture vCPU state, found once per VM.
pub struct StateCaps {
    /// MSRs that can be read on this host (from KVM's index list, each checked).
    pub msrs: Vec<u32>,
    /// XSAVE2 area size in u32s, if the host has KVM_CAP_XSAVE2.
    xsave2_len: Option<usize>,
}

/// MSRs whose save/restore is not meaningful for this VM or fails on some hosts.
const MSR_SKIP: &[u32] = &[
    0x0000_0c8f, // IA32_PQR_ASSOC (resource director): not virtualised
];

impl StateCaps {
    pub fn probe(host: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Result<StateCaps, StateError> {
        let list = host.get_msr_index_list().map_err(kvm("get the MSR index list"))?;
        let mut msrs = Vec::new();
        for &index in list.as_slice() {
            if MSR_SKIP.contains(&index) {
                continue;
            }
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|_| StateError::Msrs { done: 0, want: 1, index })?;
            if vcpu.get_msrs(&mut one).unwrap_or(0) == 1 {
                msrs.push(index);
            }
        }
        let size = vm.check_extension_int(Cap::Xsave2);
        let xsave2_len = (size > 0).then(|| (size as usize).div_ceil(4));
        Ok(StateCaps { msrs, xsave2_len })
    }
}

/// The part of a vCPU's state that only the vCPU itself changes: registers, FPU/XSAVE, MSRs.
/// It can be read as soon as the vCPU has left the guest, on its own thread, while the other
/// vCPUs are still stopping.
#[derive(Debug)]
pub struct OwnState {
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u32>,
    xcrs: Vec<u8>,
    msrs: Vec<(u32, u64)>,
    debugregs: Vec<u8>,
}

impl VcpuState {
    pub fn capture(fd: &VcpuFd, caps: &StateCaps) -> Result<VcpuState, StateError> {
        // The MP state first: reading it applies a pending INIT, which resets the registers.
        let mp_state = fd.get_mp_state().map_err(kvm("get the MP state"))?.mp_state;
        VcpuState::assemble(fd, mp_state, VcpuState::capture_own(fd, caps)?)
    }

    /// Reads [`OwnState`]. The vCPU must be out of the guest.
    pub fn capture_own(fd: &VcpuFd, caps: &StateCaps) -> Result<OwnState, StateError> {
        let xsave = match caps.xsave2_len {
            Some(len) => {
                // The FAM holds what follows the 4 KiB legacy area.
                let extra = len.saturating_sub(1024);
                let mut x = Xsave::new(extra).map_err(|_| StateError::Size { what: "xsave", got: len, want: 1024 })?;
                // SAFETY: `x` was allocated with room for the size KVM_CAP_XSAVE2 reported.
                unsafe { fd.get_xsave2(&mut x) }.map_err(kvm("get XSAVE2 state"))?;
                let fam = x.as_fam_struct_ref();
                let mut v = fam.xsave.region.to_vec();
                v.extend_from_slice(x.as_slice());
                v
            }
            None => fd.get_xsave().map_err(kvm("get XSAVE state"))?.region.to_vec(),
        };
        let mut msrs = Msrs::from_entries(
            &caps.msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect::<Vec<_>>(),
        )
        .map_err(|_| StateError::Msrs { done: 0, want: caps.msrs.len(), index: 0 })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
        if n != caps.msrs.len() {
            return Err(StateError::Msrs {
                done: n,
                want: caps.msrs.len(),
                index: caps.msrs.get(n).copied().unwrap_or(0),
            });
        }
        Ok(OwnState {
            regs: to_bytes(&fd.get_regs().map_err(kvm("get registers"))?),
            sregs: to_bytes(&fd.get_sregs().map_err(kvm("get special registers"))?),
            xsave,
            xcrs: to_bytes(&fd.get_xcrs().map_err(kvm("get XCRs"))?),
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            debugregs: to_bytes(&fd.get_debug_regs().map_err(kvm("get debug registers"))?),
        })
    }

    /// Adds what other vCPUs and the in-kernel devices can still change until every vCPU has
    /// stopped (local APIC, MP state, pending events) to `own`, read once all have. An INIT
    /// taken in the meantime resets the registers: then `own` is read again.
    pub fn complete(fd: &VcpuFd, caps: &StateCaps, own: OwnState) -> Result<VcpuState, StateError> {
        let mp_state = fd.get_mp_state().map_err(kvm("get the MP state"))?.mp_state;
        let own = match mp_state {
            KVM_MP_STATE_RUNNABLE | KVM_MP_STATE_HALTED => own,
            _ => VcpuState::capture_own(fd, caps)?,
        };
        VcpuState::assemble(fd, mp_state, own)
    }

    /// `own` and `mp_state`, with the local APIC and pending events read now.
    fn assemble(fd: &VcpuFd, mp_state: u32, own: OwnState) -> Result<VcpuState, StateError> {
        Ok(VcpuState {
            regs: own.regs,
            sregs: own.sregs,
            xsave: own.xsave,
            xcrs: own.xcrs,
            lapic: to_bytes(&fd.get_lapic().map_err(kvm("get the local APIC"))?),
            msrs: own.msrs,
            mp_state,
            events: to_bytes(&fd.get_vcpu_events().map_err(kvm("get vCPU events"))?),
            debugregs: own.debugregs,
        })
    }

    /// Loads this state into `fd`. Order matters: special registers (modes) before general
    /// registers, the APIC before MSRs that refer to it, events last.
    pub fn restore(&self, fd: &VcpuFd, caps: &StateCaps) -> Result<(), StateError> {
        // The XSAVE area must be exactly this host's size: KVM reads that many bytes.
        let host_len = caps.xsave2_len.unwrap_or(1024).max(1024);
        if self.xsave.len() != host_len {
            return Err(StateError::Size { what: "xsave", got: self.xsave.len() * 4, want: host_len * 4 });
        }
        fd.set_sregs(&from_bytes("sregs", &self.sregs)?).map_err(kvm("set special registers"))?;
        fd.set_regs(&from_bytes("regs", &self.regs)?).map_err(kvm("set registers"))?;
        fd.set_xcrs(&from_bytes("xcrs", &self.xcrs)?).map_err(kvm("set XCRs"))?;
        if self.xsave.len() > 1024 {
            let mut x = Xsave::new(self.xsave.len() - 1024).map_err(|_| StateError::Size {
                what: "xsave",
                got: self.xsave.len(),
                want: 1024,
            })?;
            // SAFETY: the FAM struct was allocated with `len - 1024` trailing entries, which is
            // what both copies fill.
            unsafe {
                x.as_mut_fam_struct().xsave.region.copy_from_slice(&self.xsave[..1024]);
                x.as_mut_slice().copy_from_slice(&self.xsave[1024..]);
            }
            // SAFETY: `x` holds an XSAVE area of this host's size (checked above).
            unsafe { fd.set_xsave2(&x) }.map_err(kvm("set XSAVE2 state"))?;
        } else {
            let mut x = kvm_bindings::kvm_xsave::default();
            if self.xsave.len() != x.region.len() {
                return Err(StateError::Size { what: "xsave", got: self.xsave.len() * 4, want: x.region.len() * 4 });
            }
            x.region.copy_from_slice(&self.xsave);
            // SAFETY: this host's XSAVE size is at most 4 KiB (checked above), which is all
            // KVM reads from the legacy struct.
            unsafe { fd.set_xsave(&x) }.map_err(kvm("set XSAVE state"))?;
        }
        fd.set_lapic(&from_bytes("lapic", &self.lapic)?).map_err(kvm("set the local APIC"))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::Msrs { done: 0, want: entries.len(), index: 0 })?;
        let n = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if n != entries.len() {
            return Err(StateError::Msrs { done: n, want: entries.len(), index: entries[n].index });
        }
        fd.set_mp_state(kvm_mp_state { mp_state: self.mp_state }).map_err(kvm("set the MP state"))?;
        fd.set_debug_regs(&from_bytes("debugregs", &self.debugregs)?).map_err(kvm("set debug registers"))?;
        fd.set_vcpu_events(&from_bytes("events", &self.events)?).map_err(kvm("set vCPU events"))?;
        Ok(())
    }

    /// The guest's TSC value in this state, if it was saved.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == 0x10).map(|&(_, v)| v)
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<Vec<u8>, StateError> {
    let mut c = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kvm("get interrupt controller state"))?;
    Ok(to_bytes(&c))
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<VmState, StateError> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: to_bytes(&vm.get_pit2().map_err(kvm("get PIT state"))?),
            clock: to_bytes(&vm.get_clock().map_err(kvm("get the KVM clock"))?),
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for (what, b) in [("PIC master", &self.pic_master), ("PIC slave", &self.pic_slave), ("IOAPIC", &self.ioapic)] {
            vm.set_irqchip(&from_bytes::<kvm_irqchip>(what, b)?).map_err(kvm("set interrupt controller state"))?;
        }
        vm.set_pit2(&from_bytes("pit", &self.pit)?).map_err(kvm("set PIT state"))?;
        let mut clock: kvm_clock_data = from_bytes("clock", &self.clock)?;
        // Only the clock value is restored; flags describe the host it came from.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("set the KVM clock"))?;
        Ok(())
    }
}

/// Each vCPU's [`OwnState`], read by the vCPU's thread as it stops for a pause, so that a
/// checkpoint does not read every vCPU's registers one after another while the VM is stopped.
/// An entry counts only for the pause it was read in (pauses are numbered by
/// [`crate::control::VcpuControl`]); otherwise the state is read whole.
pub struct EarlyStates {
    caps: StateCaps,
    slots: Vec<Mutex<Option<(u64, OwnState)>>>,
}

impl EarlyStates {
    pub fn new(caps: StateCaps, vcpus: usize) -> EarlyStates {
        EarlyStates { caps, slots: (0..vcpus).map(|_| Mutex::new(None)).collect() }
    }

    pub fn caps(&self) -> &StateCaps {
        &self.caps
    }

    /// On vCPU `vcpu`'s thread, out of the guest, stopping for pause number `pause`.
    pub fn record(&self, vcpu: usize, pause: u64, fd: &VcpuFd) {
        let own = VcpuState::capture_own(fd, &self.caps);
        if let Some(slot) = self.slots.get(vcpu) {
            // A failure is reported by the whole read that follows.
            *slot.lock() = own.ok().map(|o| (pause, o));
        }
    }

    /// Drops vCPU `vcpu`'s entry: its registers were set since (a reset), so the next capture
    /// reads them whole.
    pub fn forget(&self, vcpu: usize) {
        if let Some(slot) = self.slots.get(vcpu) {
            *slot.lock() = None;
        }
    }

    /// The pause number of vCPU `vcpu`'s entry, if it has one.
    pub fn recorded(&self, vcpu: usize) -> Option<u64> {
        self.slots.get(vcpu).and_then(|s| s.lock().as_ref().map(|(p, _)| *p))
    }

    /// vCPU `vcpu`'s whole state during pause number `pause`, every vCPU stopped.
    pub fn capture(&self, vcpu: usize, pause: u64, fd: &VcpuFd) -> Result<VcpuState, StateError> {
        let early = self.slots.get(vcpu).and_then(|s| s.lock().take());
        match early {
            Some((p, own)) if p == pause => VcpuState::complete(fd, &self.caps, own),
            _ => VcpuState::capture(fd, &self.caps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_round_trip_and_size_check() {
        let r = kvm_regs { rip: 0x1234, rsp: 0x5678, ..Default::default() };
        let b = to_bytes(&r);
        assert_eq!(b.len(), std::mem::size_of::<kvm_regs>());
        let back: kvm_regs = from_bytes("regs", &b).unwrap();
        assert_eq!((back.rip, back.rsp), (0x1234, 0x5678));
        assert!(matches!(from_bytes::<kvm_regs>("regs", &b[1..]), Err(StateError::Size { .. })));
    }
}
