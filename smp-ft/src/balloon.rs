//! QMP for the balloon, as QEMU answers it: `balloon` and `query-balloon` on every VM's monitor,
//! and the QOM properties libvirt reads and sets on the device (`guest-stats`,
//! `guest-stats-polling-interval`: `virsh dommemstat`, `virsh dommemstat --period`).
//!
//! libvirt finds the device by listing `/machine/peripheral` (its id, `child<virtio-balloon-pci>`)
//! and then its properties; smpft's own monitor names it [`DEFAULT_PATH`]. Proxmox VE's `qm`
//! names it by a partial path (`machine/peripheral/balloon0`), which QEMU resolves to the one
//! object whose path ends so ([`names`]), and reads the memory figures Proxmox's QEMU adds to
//! `query-balloon` (`max_mem`, and the guest's statistics once it reported them).

use crate::vmm::RunningVm;
use qemu_shim::qmp::{typed, ErrorClass, QmpError};
use serde_json::{json, Map, Value};

/// The balloon's QOM path on smpft's own monitor (`smpft run --balloon`).
pub const DEFAULT_PATH: &str = "/machine/peripheral/balloon0";
/// The device type libvirt looks for.
pub const DEVICE_TYPE: &str = "virtio-balloon-pci";

fn no_balloon() -> QmpError {
    QmpError { class: ErrorClass::DeviceNotActive, desc: "No balloon device has been activated".into() }
}

#[derive(serde::Deserialize)]
#[serde(tag = "execute", content = "arguments", deny_unknown_fields)]
enum Balloon {
    #[serde(rename = "balloon")]
    Set { value: i64 },
}

#[derive(serde::Deserialize)]
#[serde(tag = "execute", content = "arguments", deny_unknown_fields)]
#[allow(dead_code, reason = "the path is declared so that it is accepted; the caller matched it")]
enum Qom {
    #[serde(rename = "qom-get")]
    Get { path: String, property: String },
    #[serde(rename = "qom-set")]
    Set { path: String, property: String, value: Value },
    #[serde(rename = "qom-list")]
    List { path: String },
}

/// `balloon` and `query-balloon`; `None` for any other command.
pub fn answer(vm: &RunningVm, name: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
    let balloon = vm.devices().balloon();
    Some(match name {
        "balloon" => typed::<Balloon>(name, args).and_then(|Balloon::Set { value }| {
            let b = balloon.ok_or_else(no_balloon)?;
            if value <= 0 {
                return Err(QmpError::generic("Parameter 'value' expects a size"));
            }
            b.set_target(value as u64);
            Ok(json!({}))
        }),
        "query-balloon" => balloon.map(|b| balloon_info(vm, b.device())).ok_or_else(no_balloon),
        _ => return None,
    })
}

/// `query-balloon`: the guest's size now (`actual`), the memory it was given (`max_mem`), and,
/// once the guest has reported statistics, what Proxmox VE's QEMU adds from them (`free_mem`,
/// `total_mem` in bytes; swap and page-fault counts; `last_update`). A statistic the guest
/// does not report is left out.
fn balloon_info(vm: &RunningVm, b: &crate::vmm::virtio::balloon::Balloon) -> Value {
    let mut v = json!({"actual": b.actual(), "max_mem": vm.memory().size()});
    if let Some(stats) = b.stats().filter(|s| s.last_update != 0 && b.poll_interval() > 0) {
        v["last_update"] = json!(stats.last_update);
        for (stat, field) in [
            ("stat-swap-in", "mem_swapped_in"),
            ("stat-swap-out", "mem_swapped_out"),
            ("stat-major-faults", "major_page_faults"),
            ("stat-minor-faults", "minor_page_faults"),
            ("stat-free-memory", "free_mem"),
            ("stat-total-memory", "total_mem"),
        ] {
            if let Some(Some(n)) = stats.values.iter().find(|(k, _)| *k == stat).map(|(_, n)| *n) {
                v[field] = json!(n);
            }
        }
    }
    v
}

/// Whether a QOM command's `path` names the object at `object` (an absolute path): the same
/// path, or a partial path (no leading `/`) that `object` ends with, as QEMU resolves them
/// (the balloon is the only object smpft answers for, so the match is unique).
pub fn names(path: &str, object: &str) -> bool {
    path == object || (!path.is_empty() && !path.starts_with('/') && object.ends_with(&format!("/{path}")))
}

/// The path a QOM command is about, if it is one (`qom-get`, `qom-set`, `qom-list`).
pub fn qom_path(name: &str, args: &Map<String, Value>) -> Option<String> {
    matches!(name, "qom-get" | "qom-set" | "qom-list").then(|| args.get("path")?.as_str().map(str::to_string))?
}

/// A QOM command on the balloon's path (the caller checked it names the balloon). `vm`: none on
/// a standby, whose balloon is the primary's until it goes live (its state comes with the VM),
/// so a polling interval set there is taken and left to the primary's.
pub fn qom(vm: Option<&RunningVm>, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let balloon = vm.and_then(|vm| vm.devices().balloon()).map(|b| b.device());
    match typed::<Qom>(name, args)? {
        Qom::List { .. } => Ok(json!([
            {"name": "type", "type": "string"},
            {"name": "guest-stats", "type": "guest-stats"},
            {"name": "guest-stats-polling-interval", "type": "int"},
        ])),
        Qom::Get { property, .. } => match property.as_str() {
            "type" => Ok(json!(DEVICE_TYPE)),
            "guest-stats-polling-interval" => Ok(json!(balloon.map_or(0, |b| b.poll_interval()))),
            "guest-stats" => {
                let stats = balloon.and_then(|b| b.stats());
                let s = stats.ok_or_else(|| QmpError::generic("guest hasn't updated any stats yet"))?;
                let values: Map<String, Value> =
                    s.values.iter().map(|(k, v)| (k.to_string(), json!(v.map_or(-1, |v| v as i64)))).collect();
                Ok(json!({"stats": values, "last-update": s.last_update}))
            }
            other => Err(QmpError::generic(format!("Property '{DEVICE_TYPE}.{other}' not found"))),
        },
        Qom::Set { property, value, .. } if property == "guest-stats-polling-interval" => {
            let secs = value.as_i64().ok_or_else(|| {
                QmpError::generic("Invalid parameter type for 'value', expected: integer".to_string())
            })?;
            if secs < 0 {
                return Err(QmpError::generic("timer value must be greater than zero"));
            }
            let secs = u32::try_from(secs).map_err(|_| QmpError::generic("timer value is too big"))?;
            if let Some(b) = balloon {
                b.set_poll_interval(secs);
            }
            Ok(json!({}))
        }
        Qom::Set { property, .. } if property == "guest-stats" => {
            Err(QmpError::generic("Insufficient permission to perform this operation"))
        }
        Qom::Set { property, .. } => Err(QmpError::generic(format!("Property '{DEVICE_TYPE}.{property}' not found"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qom_paths_resolve_as_qemu_resolves_them() {
        let balloon = "/machine/peripheral/balloon0";
        for path in [balloon, "machine/peripheral/balloon0", "peripheral/balloon0", "balloon0"] {
            assert!(names(path, balloon), "{path}");
        }
        for path in ["", "/machine/peripheral/balloon1", "loon0", "/peripheral/balloon0", "machine/peripheral"] {
            assert!(!names(path, balloon), "{path}");
        }
    }
}
