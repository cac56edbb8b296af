//! `-device virtio-serial-pci` and its `-device virtserialport`s on `-chardev socket` (libvirt's
//! `<channel type='unix'>`, the guest agent's `org.qemu.guest_agent.0`).

use super::{err, flag, text, ArgvError, Parser};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// A virtio-serial device: its id, its PCI slot if libvirt gave one, its ports in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtioSerial {
    pub id: String,
    pub slot: Option<u8>,
    pub ports: Vec<Channel>,
}

/// A `virtserialport`: its id, chardev (what `query-chardev` reports), number (`nr=`, else
/// the next), the name the guest sees, and where its host side listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub chardev: String,
    pub nr: Option<u32>,
    pub name: String,
    pub socket: ChannelSocket,
}

/// A listening unix socket: a path smpft binds, or the descriptor libvirt passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSocket {
    Path(PathBuf),
    Fd(i32),
}

impl Parser {
    pub(super) fn virtio_serial(&mut self, id: &str, d: &Map<String, Value>) -> Result<(), ArgvError> {
        if self.launch.virtio_serial.is_some() {
            return err("only one virtio-serial device is supported");
        }
        let slot = self.pci_slot(id, d)?;
        self.launch.virtio_serial = Some(VirtioSerial { id: id.to_string(), slot, ports: Vec::new() });
        Ok(())
    }

    pub(super) fn virtserialport(&mut self, id: &str, d: &Map<String, Value>) -> Result<(), ArgvError> {
        let Some(dev) = &self.launch.virtio_serial else {
            return err(format!("{id}: a virtserialport needs a -device virtio-serial-pci before it"));
        };
        if let Some(bus) = text(d, "bus").filter(|b| *b != format!("{}.0", dev.id)) {
            return err(format!("{id}: bus={bus}: the virtio-serial device's bus is {}.0", dev.id));
        }
        let c = text(d, "chardev").unwrap_or_default();
        let chardev = self.chardevs.get(&c).ok_or_else(|| ArgvError(format!("{id}: no -chardev '{c}'")))?;
        let socket = channel_socket(&c, chardev)?;
        let nr = match text(d, "nr") {
            Some(n) => Some(n.parse().map_err(|_| ArgvError(format!("{id}: nr={n} is not a port number")))?),
            None => None,
        };
        let name = text(d, "name").unwrap_or_default();
        let port = Channel { id: id.to_string(), chardev: c, nr, name, socket };
        if let Some(dev) = &mut self.launch.virtio_serial {
            dev.ports.push(port);
        }
        Ok(())
    }
}

fn channel_socket(id: &str, c: &Map<String, Value>) -> Result<ChannelSocket, ArgvError> {
    match text(c, "backend").as_deref() {
        Some("socket") if flag(c, "server") => {
            if let Some(fd) = text(c, "fd") {
                return fd.parse().map(ChannelSocket::Fd).map_err(|_| ArgvError(format!("-chardev {id}: fd={fd}")));
            }
            match text(c, "path") {
                Some(p) => Ok(ChannelSocket::Path(PathBuf::from(p))),
                None => err(format!("-chardev {id}: a channel socket needs path= or fd=")),
            }
        }
        other => err(format!(
            "-chardev {id}: a virtio-serial port on '{}' is not supported (smpft listens on a unix socket: socket,server=on)",
            other.unwrap_or("?")
        )),
    }
}
