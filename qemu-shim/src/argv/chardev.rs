//! Character devices as QEMU's command line gives them: the monitors (a socket smpft listens
//! on, one passed as a descriptor, or one it connects and reconnects to) and the serial port's
//! backends.

use super::{err, flag, props, text, ArgvError, Monitor, Serial};
use serde_json::{Map, Value};
use std::path::PathBuf;

pub(super) fn qmp_address(v: &str) -> Result<Monitor, ArgvError> {
    let m = props(v, "address")?;
    match text(&m, "address").as_deref().and_then(|a| a.strip_prefix("unix:")) {
        Some(p) if !p.is_empty() => Ok(Monitor::Path(PathBuf::from(p))),
        _ => err(format!("-qmp {v}: only unix:PATH monitors are supported")),
    }
}

pub(super) fn serial_address(v: &str) -> Result<Serial, ArgvError> {
    match v.split_once(':') {
        None if v == "pty" => Ok(Serial::Pty),
        None if v == "null" || v == "none" => Ok(Serial::Null),
        Some(("unix", p)) => Ok(Serial::Socket(PathBuf::from(p.split(',').next().unwrap_or_default()))),
        Some(("file", p)) => Ok(Serial::File(PathBuf::from(p))),
        _ => err(format!("-serial {v}: only pty, unix:PATH, file:PATH and null are supported")),
    }
}

pub(super) fn chardev_monitor(id: &str, c: &Map<String, Value>) -> Result<Monitor, ArgvError> {
    if text(c, "backend").as_deref() != Some("socket") {
        let other = text(c, "backend");
        return err(format!("-chardev {id}: a monitor on '{}' is not supported", other.as_deref().unwrap_or("?")));
    }
    // A descriptor libvirt passes is a listening socket whatever the options say.
    let listening = if let Some(fd) = text(c, "fd") {
        fd.parse().map(Monitor::Fd).map_err(|_| ArgvError(format!("-chardev {id}: fd={fd}")))?
    } else {
        let path =
            text(c, "path").ok_or_else(|| ArgvError(format!("-chardev {id}: a monitor socket needs path= or fd=")))?;
        if !flag(c, "server") {
            return Ok(Monitor::Connect { path: PathBuf::from(path), reconnect: chardev_reconnect(id, c)? });
        }
        Monitor::Path(PathBuf::from(path))
    };
    // QEMU waits for a server socket's first client unless told not to.
    let off = |k: &str| matches!(text(c, k).as_deref(), Some("off" | "false" | "no"));
    let wait = flag(c, "server") && !off("wait") && !c.contains_key("nowait");
    Ok(if wait { Monitor::Wait(Box::new(listening)) } else { listening })
}

/// How often a monitor smpft connects to is connected again: `reconnect-ms=` (QEMU 9.2 on) or
/// `reconnect=` seconds; 0 or neither: never.
pub(super) fn chardev_reconnect(id: &str, c: &Map<String, Value>) -> Result<Option<std::time::Duration>, ArgvError> {
    let num = |k: &str| -> Result<Option<u64>, ArgvError> {
        text(c, k)
            .map(|v| v.parse::<u64>().map_err(|_| ArgvError(format!("-chardev {id}: {k}={v} is not a number"))))
            .transpose()
    };
    let d = match (num("reconnect-ms")?, num("reconnect")?) {
        (Some(ms), _) => std::time::Duration::from_millis(ms),
        (None, Some(s)) => std::time::Duration::from_secs(s),
        (None, None) => return Ok(None),
    };
    Ok((!d.is_zero()).then_some(d))
}

pub(super) fn chardev_serial(id: &str, c: &Map<String, Value>) -> Result<Serial, ArgvError> {
    match text(c, "backend").as_deref() {
        Some("pty") => Ok(Serial::Pty),
        Some("null") => Ok(Serial::Null),
        Some("file") => Ok(Serial::File(PathBuf::from(text(c, "path").unwrap_or_default()))),
        Some("socket") if flag(c, "server") => match text(c, "path") {
            Some(p) => Ok(Serial::Socket(PathBuf::from(p))),
            None => err(format!("-chardev {id}: a serial socket needs path=")),
        },
        other => err(format!("-chardev {id}: a serial port on '{}' is not supported", other.unwrap_or("?"))),
    }
}
