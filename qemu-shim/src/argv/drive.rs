//! `-drive if=none,...` as Nova (through libvirt before `-blockdev`) and Proxmox VE 8 write it,
//! with a `-device ...,drive=ID` that uses it: made into the block nodes QEMU itself makes of it
//! (a format node over a protocol node, under a throttle node with its group when the drive has
//! I/O limits), named by the drive's id, so the device finds it as it finds a `-blockdev`.

use super::{err, flag, text, ArgvError};
use serde_json::{json, Map, Value};

/// What a `-drive` is.
pub enum Drive {
    /// An empty drive (Proxmox's CD-ROM without a medium), by id: nothing to open.
    Empty(String),
    /// A node named by the drive's id (JSON, as `-blockdev` takes it), with the throttle group
    /// it needs (`id`, JSON) if it has limits.
    Node { id: String, node: String, throttle_group: Option<(String, String)> },
}

/// The legacy and `throttling.` I/O limit keys, with the throttle group's name for each.
const LIMITS: &[(&str, &str)] = &[
    ("bps", "bps-total"),
    ("bps_rd", "bps-read"),
    ("bps_wr", "bps-write"),
    ("iops", "iops-total"),
    ("iops_rd", "iops-read"),
    ("iops_wr", "iops-write"),
    ("bps_max", "bps-total-max"),
    ("bps_rd_max", "bps-read-max"),
    ("bps_wr_max", "bps-write-max"),
    ("iops_max", "iops-total-max"),
    ("iops_rd_max", "iops-read-max"),
    ("iops_wr_max", "iops-write-max"),
    ("iops_size", "iops-size"),
];

/// Keys a drive may have that concern the device or nothing smpft does.
const IGNORED: &[&str] = &["if", "id", "media", "index", "werror", "rerror", "serial", "boot"];

/// Reads a `-drive` (parsed by `props`).
pub fn parse(value: &str, d: &Map<String, Value>) -> Result<Drive, ArgvError> {
    if text(d, "if").as_deref() == Some("pflash") {
        return err(format!("-drive {value}: {}", crate::platform::UEFI));
    }
    if let Some(i) = text(d, "if").filter(|i| i != "none") {
        return err(format!("-drive {value}: if={i}: smpft takes drives with if=none and a -device"));
    }
    let id = text(d, "id").ok_or_else(|| ArgvError(format!("-drive {value}: no id")))?;
    let Some(file) = text(d, "file").filter(|f| !f.is_empty()) else { return Ok(Drive::Empty(id)) };
    let readonly = flag(d, "readonly") || flag(d, "read-only");
    let (direct, no_flush) = match text(d, "cache").as_deref() {
        None | Some("writeback" | "writethrough") => (false, false),
        Some("none" | "directsync") => (true, false),
        Some("unsafe") => (false, true),
        Some(c) => return err(format!("-drive {id}: cache={c}: not a cache mode")),
    };
    let cache = json!({"direct": direct, "no-flush": no_flush});
    let discard = match text(d, "discard").as_deref() {
        None | Some("ignore" | "off") => "ignore",
        Some("unmap" | "on") => "unmap",
        Some(v) => return err(format!("-drive {id}: discard={v}: expected unmap or ignore")),
    };
    let driver = if file.starts_with("/dev/") { "host_device" } else { "file" };
    let mut protocol =
        json!({"driver": driver, "filename": file, "cache": cache, "read-only": readonly, "discard": discard});
    if let Some(aio) = text(d, "aio") {
        protocol["aio"] = Value::String(aio);
    }
    let mut node = json!({
        "driver": text(d, "format").unwrap_or_else(|| "raw".into()), "file": protocol, "cache": cache,
        "read-only": readonly, "discard": discard,
    });
    if let Some(z) = text(d, "detect-zeroes") {
        node["detect-zeroes"] = Value::String(z);
    }
    let mut limits = Map::new();
    for (k, v) in d {
        let key = k.strip_prefix("throttling.").or_else(|| LIMITS.iter().find(|(l, _)| l == k).map(|(_, g)| *g));
        match key {
            Some("group") => {
                return err(format!("-drive {id}: throttling.group: give the group as -object throttle-group"))
            }
            Some(key) => {
                let n = text(d, k).and_then(|v| v.parse::<u64>().ok());
                let n = n.ok_or_else(|| ArgvError(format!("-drive {id}: {k}={v}: not a number")))?;
                limits.insert(key.to_string(), json!(n));
            }
            None if ["file", "format", "cache", "discard", "aio", "detect-zeroes", "readonly", "read-only"]
                .contains(&k.as_str())
                || IGNORED.contains(&k.as_str()) => {}
            None => return err(format!("-drive {id}: option {k} is not supported")),
        }
    }
    if limits.is_empty() {
        node["node-name"] = Value::String(id.clone());
        return Ok(Drive::Node { id: id.clone(), node: node.to_string(), throttle_group: None });
    }
    node["node-name"] = Value::String(format!("{id}-format"));
    let group = format!("throttle-{id}");
    let throttle = json!({"driver": "throttle", "node-name": id, "throttle-group": group, "file": node});
    let object = json!({"qom-type": "throttle-group", "id": group, "limits": limits});
    Ok(Drive::Node { id, node: throttle.to_string(), throttle_group: Some((group, object.to_string())) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(v: &str) -> Drive {
        parse(v, &super::super::props(v, "file").unwrap()).unwrap()
    }

    #[test]
    fn novas_and_proxmoxs_drives_become_the_nodes_qemu_makes_of_them() {
        let nova = "file=/var/lib/nova/instances/x/disk,format=qcow2,if=none,id=drive-virtio-disk0,cache=none";
        let Drive::Node { id, node, throttle_group: None } = drive(nova) else { panic!("a node, no limits") };
        let n: Value = serde_json::from_str(&node).unwrap();
        assert_eq!(id, "drive-virtio-disk0");
        assert_eq!((n["driver"].as_str(), n["node-name"].as_str()), (Some("qcow2"), Some("drive-virtio-disk0")));
        assert_eq!(n["file"]["filename"], "/var/lib/nova/instances/x/disk");
        assert_eq!(n["file"]["cache"]["direct"], true);
        let pve = "file=/v.qcow2,if=none,id=drive-scsi0,discard=on,format=qcow2,cache=none,aio=io_uring,detect-zeroes=unmap,throttling.bps-write=1048576,iops_rd=100";
        let Drive::Node { node, throttle_group: Some((group, object)), .. } = drive(pve) else { panic!("limits") };
        let (n, o): (Value, Value) = (serde_json::from_str(&node).unwrap(), serde_json::from_str(&object).unwrap());
        assert_eq!((n["driver"].as_str(), n["throttle-group"].as_str()), (Some("throttle"), Some(group.as_str())));
        assert_eq!(n["file"]["file"]["aio"], "io_uring");
        assert_eq!(o["limits"], json!({"bps-write": 1048576, "iops-read": 100}));
        assert!(matches!(drive("if=none,id=drive-ide2,media=cdrom,aio=io_uring"), Drive::Empty(_)));
        let bad = "file=/x,if=virtio,id=d";
        assert!(parse(bad, &super::super::props(bad, "file").unwrap()).is_err());
    }
}
