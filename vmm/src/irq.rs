//! Interrupt injection, synchronous with respect to capture.
//!
//! A checkpoint reads each vCPU's local APIC and then the IOAPIC/PIC while the vCPUs are stopped
//! and every component is paused. An interrupt that is still on its way during those reads would
//! be half in the cut: raised by a device whose state says "delivered", but in no APIC, or in the
//! IOAPIC and not yet in the LAPIC read a moment before. irqfds deliver that way: KVM injects
//! from the eventfd's wakeup, and for IOAPIC pins (and MSIs it cannot deliver at once) through a
//! kernel work item that runs whenever it runs.
//!
//! So smpft injects with ioctls that return only once the interrupt has reached the interrupt
//! controllers (`KVM_IRQ_LINE` for pins, `KVM_SIGNAL_MSI` for MSI/MSI-X). Every injection is
//! made by a vCPU thread handling an exit, or by a device thread; a pause waits for the vCPUs to
//! stop and then for each component to pause (which waits for its threads), so by the time
//! state is read no injection is in flight and every injection made is complete.

use kvm_bindings::{kvm_irq_level, kvm_msi};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

const KVMIO: u32 = 0xae;
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);

/// Injects interrupts into one VM (it holds its own descriptor of the VM).
#[derive(Debug)]
pub struct Irq {
    vm: File,
}

impl Irq {
    pub fn new(vm: &kvm_ioctls::VmFd) -> std::io::Result<Irq> {
        // SAFETY: dup(2) of a live descriptor; the result is checked before it is owned.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Irq { vm: unsafe { File::from_raw_fd(fd) } })
    }

    /// Raises or lowers an interrupt pin (GSI) of the PIC/IOAPIC.
    pub fn set_line(&self, gsi: u32, level: bool) {
        let mut l = kvm_irq_level::default();
        l.__bindgen_anon_1.irq = gsi;
        l.level = u32::from(level);
        // SAFETY: KVM_IRQ_LINE reads a kvm_irq_level we own for the duration of the call.
        let r = unsafe { ioctl_with_ref(&self.vm, KVM_IRQ_LINE(), &l) };
        if r < 0 {
            tracing::warn!(gsi, "KVM_IRQ_LINE failed: {}", std::io::Error::last_os_error());
        }
    }

    /// An edge on `gsi`: raised and lowered.
    pub fn pulse(&self, gsi: u32) {
        self.set_line(gsi, true);
        self.set_line(gsi, false);
    }

    /// Delivers one MSI with the address and data the guest programmed.
    pub fn msi(&self, address: u64, data: u32) {
        let m = kvm_msi { address_lo: address as u32, address_hi: (address >> 32) as u32, data, ..Default::default() };
        // SAFETY: KVM_SIGNAL_MSI reads a kvm_msi we own for the duration of the call.
        let r = unsafe { ioctl_with_ref(&self.vm, KVM_SIGNAL_MSI(), &m) };
        if r < 0 {
            tracing::warn!(address, data, "KVM_SIGNAL_MSI failed: {}", std::io::Error::last_os_error());
        }
    }
}
