//! `query-pci`: the guest's PCI bus as the VMM lays it out, read from each function's
//! configuration space (what the guest's own enumeration finds), with the id of the `-device`
//! that made each function. Proxmox VE's `qm` reads the ids to learn which devices a running VM
//! has (before hot-plugging, which smpft does not do).
//!
//! smpft's machine has one bus, 0, with the host bridge in slot 0 and the virtio functions in
//! the slots the command line asked for (`addr=`), or the next free ones. Devices the VM leaves
//! out (USB, video) are not there; a `pci-bridge` is there only if the VMM gives the guest one.

use qemu_shim::argv::Launch;
use serde_json::{json, Value};
use smp_ft::vmm::pci::PciFunction;

/// Which `-device` made each function the VMM names: its names (`disk0`, `net1`,
/// `virtio-balloon`, ...) with the ids the command line gave.
pub fn device_ids(launch: &Launch) -> Vec<(String, String)> {
    let mut v = Vec::new();
    v.extend(launch.disks.iter().enumerate().map(|(i, d)| (format!("disk{i}"), d.id.clone())));
    v.extend(launch.nics.iter().enumerate().map(|(i, n)| (format!("net{i}"), n.id.clone())));
    if let Some(c) = &launch.scsi {
        v.push(("virtio-scsi".into(), c.id.clone()));
    }
    if let Some(b) = &launch.balloon {
        v.push(("virtio-balloon".into(), b.id.clone()));
    }
    if let Some(s) = &launch.virtio_serial {
        v.push(("virtio-serial".into(), s.id.clone()));
    }
    if let Some((id, _)) = launch.device_ids.iter().find(|(_, driver)| driver == "virtio-rng-pci") {
        v.push(("virtio-rng".into(), id.clone()));
    }
    v
}

/// QEMU's names for the classes smpft's functions have (QEMU leaves `desc` out for others).
fn class_desc(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0200 => "Ethernet controller",
        0x0600 => "Host bridge",
        0x0604 => "PCI bridge",
        0x0780 => "Communication controller",
        _ => return None,
    })
}

/// The answer to `query-pci` for `functions`, each named by `ids` (see [`device_ids`]).
pub fn query_pci(functions: &[PciFunction], ids: &[(String, String)]) -> Value {
    let devices: Vec<Value> = functions
        .iter()
        .map(|f| {
            let class = u16::from(f.class[0]) << 8 | u16::from(f.class[1]);
            let mut class_info = json!({"class": class});
            if let Some(desc) = class_desc(class) {
                class_info["desc"] = json!(desc);
            }
            let qdev_id = f.name.and_then(|n| ids.iter().find(|(name, _)| name == n)).map_or("", |(_, id)| id);
            let regions: Vec<Value> = f
                .bars
                .iter()
                .map(|&(bar, address, size)| {
                    json!({"bar": bar, "type": "memory", "address": address, "size": size,
                           "prefetch": false, "mem_type_64": true})
                })
                .collect();
            let mut d = json!({
                "bus": 0, "slot": f.slot, "function": 0,
                "class_info": class_info,
                "id": {"vendor": f.vendor, "device": f.device,
                       "subsystem-vendor": f.subsystem_vendor, "subsystem": f.subsystem},
                "irq_pin": f.irq_pin,
                "qdev_id": qdev_id,
                "regions": regions,
            });
            if f.irq_pin != 0 {
                d["irq"] = json!(f.irq_line);
            }
            d
        })
        .collect();
    json!([{"bus": 0, "devices": devices}])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(slot: u8, name: &'static str, class: [u8; 3]) -> PciFunction {
        PciFunction {
            slot,
            name: Some(name),
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            revision: 1,
            class,
            irq_pin: 0,
            irq_line: 0,
            bars: vec![(0, 0xc000_0000, 0x8000)],
        }
    }

    #[test]
    fn each_function_is_reported_with_the_device_that_made_it() {
        let launch = qemu_shim::argv::parse(
            &"-device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3 -device virtio-rng-pci,id=rng0"
                .split(' ')
                .map(String::from)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let ids = device_ids(&launch);
        let mut bridge = function(0, "host-bridge", [6, 0, 0]);
        bridge.bars.clear();
        let fs = [bridge, function(3, "virtio-balloon", [0xff, 0, 0]), function(4, "virtio-rng", [0xff, 0, 0])];
        let v = query_pci(&fs, &ids);
        let devs = v[0]["devices"].as_array().unwrap();
        assert_eq!(v[0]["bus"], 0);
        assert_eq!(devs[0]["class_info"], json!({"class": 0x0600, "desc": "Host bridge"}));
        assert_eq!(devs[0]["qdev_id"], "");
        assert_eq!((&devs[1]["slot"], &devs[1]["qdev_id"]), (&json!(3), &json!("balloon0")));
        assert_eq!(
            devs[1]["id"],
            json!({"vendor": 0x1af4, "device": 0x1042, "subsystem-vendor": 0x1af4, "subsystem": 0x40})
        );
        assert_eq!(devs[1]["regions"][0]["address"], 0xc000_0000u64);
        assert_eq!(devs[2]["qdev_id"], "rng0");
        assert!(devs[1].get("irq").is_none(), "no INTx pin: MSI-X only");
    }
}
