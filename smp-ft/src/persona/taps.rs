//! Taps by name, as Proxmox VE's qm asks for them (`-netdev type=tap,ifname=tap8006i0,
//! script=/usr/libexec/qemu-server/pve-bridge,downscript=.../pve-bridgedown`): smpft opens the
//! tap (creating it if it does not exist), runs `script NAME` before the VM starts (qm's script
//! attaches it to the VM's bridge and firewall), and `downscript NAME` once the VM has ended,
//! while the tap still exists, as QEMU does. A script that fails ends the start with its name,
//! its exit status and what it printed.

use qemu_shim::argv::TapSpec;
use smp_ft::vmm::net::tap::Tap;
use smp_ft::vmm::net::TapSource;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The taps this process opened by name; their downscripts run when it is dropped.
#[derive(Default)]
pub struct NamedTaps {
    down: Vec<(PathBuf, String)>,
}

impl NamedTaps {
    /// Where a NIC's tap comes from, opening a named one and running its script.
    pub fn source(&mut self, nic: &str, tap: &TapSpec) -> Result<TapSource, String> {
        let (ifname, script, downscript) = match tap {
            TapSpec::Fd(fd) => return Ok(TapSource::Fd(*fd)),
            TapSpec::Named { ifname, script, downscript } => (ifname, script, downscript),
        };
        let fd: OwnedFd = Tap::create(ifname).map_err(|e| format!("NIC {nic}: tap {ifname}: {e}"))?;
        if let Some(script) = script {
            run(script, ifname).map_err(|e| format!("NIC {nic}: {e}"))?;
            tracing::info!(nic, tap = %ifname, script = %script.display(), "tap set up by its script");
        }
        if let Some(d) = downscript {
            self.down.push((d.clone(), ifname.clone()));
        }
        // The VM's NIC owns the descriptor from here (and closes it, ending a tap made here).
        Ok(TapSource::Fd(fd.into_raw_fd()))
    }
}

impl Drop for NamedTaps {
    fn drop(&mut self) {
        for (script, ifname) in self.down.drain(..).rev() {
            match run(&script, &ifname) {
                Ok(()) => tracing::info!(tap = %ifname, script = %script.display(), "tap released by its downscript"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

/// Runs `script IFNAME`, as QEMU does; an error says how it failed and what it printed.
fn run(script: &Path, ifname: &str) -> Result<(), String> {
    let out = Command::new(script)
        .arg(ifname)
        .output()
        .map_err(|e| format!("tap script {} {ifname}: cannot run it: {e}", script.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim().lines().last().unwrap_or_default().to_string();
    Err(format!(
        "tap script {} {ifname} failed ({}){}",
        script.display(),
        out.status,
        if said.is_empty() { String::new() } else { format!(": {said}") }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_script_is_reported_with_its_status_and_words() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("bridge");
        std::fs::write(&script, "#!/bin/sh\necho \"no bridge vmbr9 for $1\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = run(&script, "tap9i0").unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("no bridge vmbr9 for tap9i0"), "{e}");
        let e = run(Path::new("/nonexistent/script"), "tap9i0").unwrap_err();
        assert!(e.contains("cannot run it"), "{e}");
    }
}
