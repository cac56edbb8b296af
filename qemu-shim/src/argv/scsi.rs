//! `-device virtio-scsi-pci` (Proxmox's default disk controller, libvirt's
//! `<controller type='scsi' model='virtio-scsi'>`) and its `-device scsi-hd` disks, as qm and
//! libvirt write them:
//!
//! ```text
//! -device virtio-scsi-pci,id=scsihw0,bus=pci.0,addr=0x5
//! -device scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,bootindex=100,write-cache=on
//! ```
//!
//! smpft's controller has one target (`scsi-id=0`) whose LUNs are the disks (qm gives each disk
//! `lun=` its number); the drive comes from `-blockdev` or `-drive if=none`, as virtio-blk-pci's.

use super::{err, text, ArgvError, Parser};
use serde_json::{Map, Value};

/// The virtio-scsi controller: its id, its PCI slot if one was given, its disks in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiController {
    pub id: String,
    pub slot: Option<u8>,
    pub units: Vec<ScsiHd>,
}

/// A `scsi-hd` on the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiHd {
    /// The disk (its index in [`super::Launch::disks`]).
    pub disk: usize,
    /// `lun=` (`None`: the lowest free one).
    pub lun: Option<u16>,
    /// `write-cache=` (QEMU's default, `auto`, is on).
    pub write_cache: bool,
    /// `device_id=` (else `serial=`): what INQUIRY's identification pages say.
    pub device_id: Option<String>,
}

impl Parser {
    pub(super) fn virtio_scsi(&mut self, id: &str, d: &Map<String, Value>) -> Result<(), ArgvError> {
        if let Some(c) = &self.launch.scsi {
            return err(format!(
                "{id}: smpft has one virtio-scsi controller ('{}' is it): give each disk its own lun= on it",
                c.id
            ));
        }
        let slot = self.pci_slot(id, d)?;
        self.launch.scsi = Some(ScsiController { id: id.to_string(), slot, units: Vec::new() });
        Ok(())
    }

    pub(super) fn scsi_hd(&mut self, id: &str, d: &Map<String, Value>) -> Result<(), ArgvError> {
        let Some(controller) = self.launch.scsi.as_ref().map(|c| c.id.clone()) else {
            return err(format!("{id}: a scsi-hd needs a -device virtio-scsi-pci before it"));
        };
        if let Some(bus) = text(d, "bus").filter(|b| *b != format!("{controller}.0")) {
            return err(format!("{id}: bus={bus}: the virtio-scsi controller's bus is {controller}.0"));
        }
        let number = |k: &str, max: u16| -> Result<Option<u16>, ArgvError> {
            match text(d, k) {
                None => Ok(None),
                Some(v) => match v.parse::<u16>().ok().filter(|&n| n <= max) {
                    Some(n) => Ok(Some(n)),
                    None => err(format!("{id}: {k}={v} is not a number from 0 to {max}")),
                },
            }
        };
        if number("channel", u16::MAX)?.unwrap_or(0) != 0 || number("scsi-id", u16::MAX)?.unwrap_or(0) != 0 {
            return err(format!(
                "{id}: smpft's virtio-scsi has one channel and one target (channel=0, scsi-id=0); its disks are LUNs (lun=)"
            ));
        }
        let lun = number("lun", 255)?;
        let write_cache = match text(d, "write-cache").as_deref() {
            None | Some("on" | "auto" | "true") => true,
            Some("off" | "false") => false,
            Some(v) => return err(format!("{id}: write-cache={v}: expected on, off or auto")),
        };
        let drive = text(d, "drive").unwrap_or_default();
        let disk = self.disk(id, &drive)?;
        self.boot_index(d);
        let unit = ScsiHd {
            disk: self.launch.disks.len(),
            lun,
            write_cache,
            device_id: text(d, "device_id").or_else(|| text(d, "serial")),
        };
        self.launch.disks.push(disk);
        if let Some(c) = &mut self.launch.scsi {
            c.units.push(unit);
        }
        Ok(())
    }
}

impl Parser {
    /// A controller no `scsi-hd` is on is left out of the VM (smpft makes the controller for
    /// its first disk), with one warning line.
    pub(super) fn scsi_without_disks(&mut self) {
        if let Some(c) = self.launch.scsi.take_if(|c| c.units.is_empty()) {
            self.launch.left_out.push(format!(
                "{}: a virtio-scsi-pci controller without disks is left out (smpft's controller comes with its first scsi-hd)",
                c.id
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::argv::{parse, ScsiController, ScsiHd};

    fn args(extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["-kernel", "/k", "-blockdev", "driver=file,filename=/d0.raw,node-name=f0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["-blockdev", "driver=raw,file=f0,node-name=drive-scsi0"].map(String::from));
        a.extend(["-blockdev", "driver=file,filename=/d1.raw,node-name=drive-scsi1"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    const CONTROLLER: &str = "virtio-scsi-pci,id=scsihw0,bus=pci.0,addr=0x5";

    #[test]
    fn proxmox_and_libvirt_scsi_disks() {
        let l = parse(&args(&[
            "-device",
            CONTROLLER,
            "-device",
            "scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,device_id=drive-scsi0,bootindex=100,write-cache=on",
            "-device",
            r#"{"driver":"scsi-hd","bus":"scsihw0.0","channel":0,"scsi-id":0,"lun":3,"drive":"drive-scsi1","id":"scsi1","write-cache":"off"}"#,
        ]))
        .unwrap();
        let hd = |disk, lun, write_cache, device_id: Option<&str>| ScsiHd {
            disk,
            lun: Some(lun),
            write_cache,
            device_id: device_id.map(String::from),
        };
        assert_eq!(
            l.scsi,
            Some(ScsiController {
                id: "scsihw0".into(),
                slot: Some(5),
                units: vec![hd(0, 0, true, Some("drive-scsi0")), hd(1, 3, false, None)]
            })
        );
        assert_eq!(l.disks.iter().map(|d| d.source.as_str()).collect::<Vec<_>>(), ["/d0.raw", "/d1.raw"]);
        assert_eq!(l.disks[0].slot, None, "the controller has the slot");
        assert_eq!(l.boot_disk, Some(0));
        assert!(l.left_out.is_empty(), "{:?}", l.left_out);
        let empty = parse(&args(&["-device", CONTROLLER])).unwrap();
        assert_eq!(empty.scsi, None, "a controller without disks is left out");
        assert!(empty.left_out.iter().any(|w| w.starts_with("scsihw0: a virtio-scsi-pci controller without disks")));
    }

    #[test]
    fn what_the_controller_cannot_be_is_refused_with_the_reason() {
        let scsi_hd = "scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0";
        for (extra, want) in [
            (vec![scsi_hd], "needs a -device virtio-scsi-pci before it"),
            (vec![CONTROLLER, "virtio-scsi-pci,id=scsihw1"], "one virtio-scsi controller ('scsihw0' is it)"),
            (vec![CONTROLLER, "scsi-hd,bus=scsihw1.0,drive=drive-scsi0,id=scsi0"], "bus is scsihw0.0"),
            (vec![CONTROLLER, "scsi-hd,bus=scsihw0.0,scsi-id=1,drive=drive-scsi0,id=scsi0"], "one target"),
            (vec![CONTROLLER, "scsi-hd,bus=scsihw0.0,lun=300,drive=drive-scsi0,id=scsi0"], "lun=300"),
            (vec![CONTROLLER, "scsi-hd,bus=scsihw0.0,write-cache=x,drive=drive-scsi0,id=scsi0"], "write-cache=x"),
            (vec![CONTROLLER, "scsi-hd,bus=scsihw0.0,drive=nothing,id=scsi0"], "no -blockdev 'nothing'"),
            (vec![CONTROLLER, "scsi-cd,bus=scsihw0.0,id=scsi1"], "device 'scsi-cd' is not supported"),
        ] {
            let devices: Vec<&str> = extra.iter().flat_map(|d| ["-device", d]).collect();
            let e = parse(&args(&devices)).unwrap_err().0;
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }
}
