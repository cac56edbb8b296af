//! The guest's CPUID: what the host's KVM offers, made into the domain's CPU model
//! (`cpu_model`), then adjusted per vCPU ([`crate::boot::cpuid_for`]).
//!
//! What KVM offers is `KVM_GET_SUPPORTED_CPUID` plus what KVM itself provides whatever the host
//! CPU: the hypervisor bit, and the TSC-deadline timer of KVM's local APIC where KVM has it.
//!
//! A model's own features the host lacks are left out unless `enforce` is given (then refused),
//! and named in one warning line at start, as QEMU does.
//!
//! On a PVM host (`kvm_pvm`) KVM offers few of the processor's features, and the guest's CPUID
//! follows what smpft sets only in part. Measured with the test guest's `CPUID` request on this
//! platform's PVM: leaf 7 reads the processor's own values whatever the model; in leaves 1 and
//! 0x8000_0001 the bits KVM offers follow the model, the others are the processor's. A model can
//! add nothing KVM does not offer (refused), but some of what it takes away stays visible to
//! the guest: smpft says so once at start when a model takes features away on such a host.

use crate::VmError;
use cpu_model::{CpuSpec, Leaf};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// What the host's KVM offers a guest, as leaves, without the asking CPU's own APIC ids (so two
/// hosts, or two calls, with the same processors and KVM give the same).
pub fn host(kvm: &Kvm) -> Result<Vec<Leaf>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm { what: "get supported CPUID", source: e })?;
    let mut leaves = to_leaves(&supported);
    let deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    for l in leaves.iter_mut() {
        match l.function {
            1 => {
                l.ecx |= 1 << 31; // hypervisor
                if deadline {
                    l.ecx |= 1 << 24;
                }
                // The APIC id of the CPU that asked: each vCPU gets its own (`cpuid_for`).
                l.ebx &= 0x00ff_ffff;
            }
            0xb | 0x1f => l.edx = 0, // the x2APIC id, likewise
            _ => {}
        }
    }
    Ok(leaves)
}

/// What the host's KVM at `device` offers a guest (for the probe's answers).
pub fn host_at(device: &std::path::Path) -> Result<Vec<Leaf>, VmError> {
    host(&crate::open_kvm(device)?)
}

/// The guest's CPUID for `spec` on this host, before per-vCPU details: the same on both copies
/// of an FT pair, or they must not pair.
pub fn guest(kvm: &Kvm, spec: &CpuSpec) -> Result<Vec<Leaf>, VmError> {
    let host = host(kvm)?;
    let guest = spec.guest_cpuid(&host).map_err(VmError::Cpu)?;
    let left_out = spec.left_out(&host);
    if !left_out.is_empty() {
        tracing::warn!(
            "CPU model '{}': this host's KVM does not offer {}, which the guest goes without (give enforce to refuse instead)",
            spec.model_name(),
            left_out.join(", ")
        );
    }
    let hidden = cpu_model::feature_set(&host)
        .into_iter()
        .zip(cpu_model::feature_set(&guest))
        .filter(|((_, h), (_, g))| *h && !*g)
        .count();
    if hidden > 0 && std::path::Path::new("/sys/module/kvm_pvm").exists() {
        tracing::warn!(
            cpu = %spec,
            hidden,
            "this host's KVM is PVM, which hides CPUID features only in part: of the {hidden} features CPU '{spec}' leaves out, those in leaf 7 and those KVM does not offer stay visible to the guest"
        );
    }
    Ok(guest)
}

/// Whether this host's KVM at `device` can give the guest `spec` (quietly: the VM's build says
/// what it leaves out).
pub fn check(device: &std::path::Path, spec: &CpuSpec) -> Result<(), VmError> {
    spec.guest_cpuid(&host_at(device)?).map(drop).map_err(VmError::Cpu)
}

/// The guest's CPUID for `spec` with the KVM device at `device`.
pub fn guest_at(device: &std::path::Path, spec: &CpuSpec) -> Result<Vec<Leaf>, VmError> {
    guest(&crate::open_kvm(device)?, spec)
}

pub fn to_leaves(c: &CpuId) -> Vec<Leaf> {
    c.as_slice()
        .iter()
        .map(|e| Leaf { function: e.function, index: e.index, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx })
        .collect()
}

/// `leaves` as KVM's CPUID, keeping each entry's flags from `like` (KVM's own entries).
pub fn to_cpuid(leaves: &[Leaf], like: &CpuId) -> Result<CpuId, VmError> {
    let entries: Vec<kvm_cpuid_entry2> = leaves
        .iter()
        .map(|l| {
            let flags =
                like.as_slice().iter().find(|e| e.function == l.function && e.index == l.index).map_or(0, |e| e.flags);
            kvm_cpuid_entry2 {
                function: l.function,
                index: l.index,
                flags,
                eax: l.eax,
                ebx: l.ebx,
                ecx: l.ecx,
                edx: l.edx,
                ..Default::default()
            }
        })
        .collect();
    CpuId::from_entries(&entries)
        .map_err(|_| VmError::Cpu(cpu_model::CpuError::Property("too many CPUID leaves".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_and_kvm_entries_convert_both_ways_keeping_flags() {
        let e = |function, index, flags, eax| kvm_cpuid_entry2 { function, index, flags, eax, ..Default::default() };
        let kvm = CpuId::from_entries(&[e(0, 0, 0, 0xd), e(7, 0, 1, 2), e(7, 1, 1, 0)]).unwrap();
        let mut leaves = to_leaves(&kvm);
        assert_eq!(leaves[1], Leaf { function: 7, index: 0, eax: 2, ..Default::default() });
        leaves[1].ebx = 0x20;
        let back = to_cpuid(&leaves, &kvm).unwrap();
        assert_eq!(back.as_slice()[1].flags, 1);
        assert_eq!(back.as_slice()[1].ebx, 0x20);
        assert_eq!(to_leaves(&back), leaves);
    }
}
