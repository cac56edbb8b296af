//! What smpft tells libvirt about itself as an emulator: the answers to the questions libvirt
//! asks when it probes an emulator binary (and asks again on a domain's monitor). They describe
//! what smpft implements, in QMP's terms:
//!
//! - one machine, for x86_64 guests under KVM only, up to 16 vCPUs, under the names libvirt
//!   treats as a PC (`pc-i440fx-7.2`, alias `pc`) and its own, `smpft` (see
//!   [`crate::platform`]);
//! - three device types, `virtio-blk-pci`, `virtio-net-pci` and `isa-serial`, with no
//!   properties a user can set, and the PC devices smpft accepts and leaves out of the VM
//!   ([`crate::platform::ABSENT_DEVICE_TYPES`]: USB, video, vmcoreinfo);
//! - S3 and S4 that can be disabled (`PIIX4_PM`'s `disable_s3`/`disable_s4`: they are) and the
//!   PIT's lost-tick policy;
//! - the QMP commands in [`COMMANDS`], as QEMU 7.2 defines them, and no QMP schema beyond that
//!   list (libvirt then writes devices in key=value form, which `argv` reads);
//! - no migration capabilities, no command-line option introspection.
//!
//! `query-version` reports the QMP dialect (7.2.0: the commands above behave as in QEMU 7.2)
//! with smpft's own name and version as the package.

use crate::qmp::{not_found, ErrorClass, QmpError};
use serde_json::{json, Map, Value};

/// The machine type's canonical name (the default).
pub const MACHINE: &str = crate::platform::PC_MACHINE;
/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 16;
/// Device types smpft implements.
pub const DEVICE_TYPES: [&str; 10] = [
    "virtio-blk-pci",
    "virtio-scsi-pci",
    "scsi-hd",
    "virtio-net-pci",
    "virtio-rng-pci",
    "virtio-balloon-pci",
    "isa-serial",
    "vmgenid",
    "virtio-serial-pci",
    "virtserialport",
];

/// The virtio-balloon's options libvirt probes for (`autodeflate`, `freePageReporting`).
pub const BALLOON_PROPERTIES: [&str; 2] = ["deflate-on-oom", "free-page-reporting"];

/// The object types a domain may use: entropy sources for virtio-rng (both are the host's
/// getrandom(2) in smpft).
pub const OBJECT_TYPES: [&str; 2] = ["rng-random", "rng-builtin"];

/// Every QMP command smpft answers (as a probed emulator and on a domain's monitor).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-target",
    "query-qmp-schema",
    "query-commands",
    "query-kvm",
    "qom-list-types",
    "device-list-properties",
    "qom-list-properties",
    "query-machines",
    "query-command-line-options",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "query-chardev",
    "query-named-block-nodes",
    "qom-list",
    "qom-get",
    "query-block",
    "query-blockstats",
    "query-jobs",
    "query-status",
    "query-cpus-fast",
    "stop",
    "cont",
    "system_powerdown",
    "quit",
    "balloon",
    "query-balloon",
    "qom-set",
    "x-smpft-query-ft",
    "x-smpft-protect",
    "x-smpft-snapshot",
    // Guest CPU models (answered in `cpu`).
    "query-cpu-definitions",
    "query-cpu-model-expansion",
    // The VM generation ID (answered by the VM's runner, from guest memory).
    "query-vm-generation-id",
    // What Proxmox VE's qm asks (`crate::qm`, and the persona for the VM's devices).
    "system_reset",
    "query-pci",
    "query-proxmox-support",
    "human-monitor-command",
];

/// Commands about the PC platform (the display smpft does not have).
pub const PLATFORM_COMMANDS: [&str; 2] = ["query-vnc", "query-spice"];

/// The answer to `name` if it is a question about the emulator itself (the same on every VM);
/// `None` for anything else.
pub fn answer(name: &str, args: &Map<String, Value>, package: &str) -> Option<Result<Value, QmpError>> {
    let typename = || args.get("typename").and_then(Value::as_str).unwrap_or_default().to_string();
    Some(Ok(match name {
        "query-version" => json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": package}),
        "query-target" => json!({"arch": "x86_64"}),
        "query-qmp-schema" => json!([]),
        "query-commands" => Value::Array(
            COMMANDS
                .iter()
                .chain(&PLATFORM_COMMANDS)
                .chain(&crate::platform::DISPLAY_COMMANDS)
                .map(|c| json!({"name": c}))
                .collect(),
        ),
        "query-kvm" => json!({"enabled": true, "present": true}),
        "qom-list-types" => Value::Array(
            DEVICE_TYPES
                .iter()
                .chain(&OBJECT_TYPES)
                .chain(crate::platform::ABSENT_DEVICE_TYPES.iter().map(|(t, _)| t))
                .map(|t| json!({"name": t}))
                .collect(),
        ),
        "device-list-properties" => {
            let t = typename();
            if let Some(props) = crate::platform::device_properties(&t) {
                return Some(Ok(props));
            }
            if t == "virtio-balloon-pci" {
                return Some(Ok(Value::Array(
                    BALLOON_PROPERTIES.iter().map(|p| json!({"name": p, "type": "bool"})).collect(),
                )));
            }
            if !DEVICE_TYPES.contains(&t.as_str()) {
                return Some(Err(QmpError {
                    class: ErrorClass::DeviceNotFound,
                    desc: format!("Device '{t}' not found"),
                }));
            }
            json!([])
        }
        // No object has properties a user sets. (An error here crashes libvirt 9.0's probe.)
        "qom-list-properties" => json!([]),
        "query-machines" => crate::platform::machines(MAX_VCPUS),
        "query-command-line-options" | "query-migrate-capabilities" => json!([]),
        "migrate-set-capabilities" => json!({}),
        "query-named-block-nodes" | "query-block" | "query-jobs" => json!([]),
        _ => return crate::platform::display_answer(name).or_else(|| crate::qm::answer(name, args)),
    }))
}

/// As [`answer`], with `CommandNotFound` for anything it does not know (a probed emulator has no
/// VM to ask).
pub fn answer_or_not_found(name: &str, args: &Map<String, Value>, package: &str) -> Result<Value, QmpError> {
    answer(name, args, package).unwrap_or_else(|| Err(not_found(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(name: &str, args: Value) -> Result<Value, QmpError> {
        answer_or_not_found(name, args.as_object().unwrap(), "smpft test")
    }

    #[test]
    fn the_probe_gets_what_smpft_implements() {
        assert_eq!(ask("query-version", json!({})).unwrap()["qemu"]["major"], 7);
        assert_eq!(ask("query-kvm", json!({})).unwrap(), json!({"enabled": true, "present": true}));
        let names = ask("query-commands", json!({})).unwrap();
        assert!(names.as_array().unwrap().iter().any(|c| c["name"] == "x-smpft-query-ft"));
        assert_eq!(ask("query-machines", json!({})).unwrap()[0]["name"], MACHINE);
        assert_eq!(ask("device-list-properties", json!({"typename": "virtio-net-pci"})).unwrap(), json!([]));
        let props = ask("device-list-properties", json!({"typename": "virtio-balloon-pci"})).unwrap();
        assert_eq!(
            props,
            json!([{"name": "deflate-on-oom", "type": "bool"}, {"name": "free-page-reporting", "type": "bool"}])
        );
        let e = ask("device-list-properties", json!({"typename": "vmware-svga"})).unwrap_err();
        assert_eq!((e.class, e.desc.as_str()), (ErrorClass::DeviceNotFound, "Device 'vmware-svga' not found"));
        // The PC devices smpft leaves out are listed, so libvirt accepts them.
        let types = ask("qom-list-types", json!({})).unwrap();
        assert!(types.as_array().unwrap().iter().any(|t| t["name"] == "usb-tablet"), "{types}");
        assert_eq!(ask("device-list-properties", json!({"typename": "VGA"})).unwrap(), json!([]));
        assert!(names.as_array().unwrap().iter().any(|c| c["name"] == "query-vnc"));
        assert_eq!(ask("query-vnc", json!({})).unwrap()["enabled"], false);
        assert_eq!(ask("qom-list-properties", json!({"typename": "memory-backend-file"})).unwrap(), json!([]));
        assert_eq!(ask("query-tpm-models", json!({})).unwrap_err().class, ErrorClass::CommandNotFound);
    }
}
