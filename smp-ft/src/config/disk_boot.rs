//! Booting from the VM's own disk: the `bootdisk` crate's sandboxed reader finds the default
//! boot entry, and the VM boots its kernel as it would `--kernel`. The disk is read here by the
//! copy that boots the VM (a standby receives the booted VM and never reads it), and again by
//! a reset in place, which boots what the disk says then (a kernel the guest updated), or the
//! kernel it booted before if the disk can no longer be read.

use super::error::{ConfigError, Problem};
use super::names::{Names, Setting};
use crate::vmm::linux::LinuxBoot;
use crate::vmm::{Payload, Reread};
use block::spec::DiskSpec;
use std::path::Path;
use std::sync::Arc;

/// What disk `index` boots, and the VM's name for it.
pub(crate) fn payload(
    names: Names,
    disks: &[DiskSpec],
    index: usize,
    extra: &str,
    read_now: bool,
) -> Result<(Payload, String), ConfigError> {
    let err = |why: String| ConfigError::new(names, &[Setting::BootDisk], Problem::Invalid(why));
    let spec = disks.get(index).ok_or_else(|| err(format!("the VM has no disk {index} to boot from")))?.clone();
    let exe = std::env::current_exe().map_err(|e| err(format!("cannot find the smpft binary: {e}")))?;
    let (boot, name) = match read_now {
        true => read(&exe, &spec, index, extra).map(|(b, name)| (Some(b), name)).map_err(err)?,
        false => (None, format!("disk {index} (read when this copy boots it)")),
    };
    let extra = extra.to_string();
    let reread = Reread(Arc::new(move || read(&exe, &spec, index, &extra).map(|(boot, _)| boot)));
    Ok((Payload::FromDisk { boot, reread }, name))
}

/// Reads disk `index` (`spec`, opened read-only) in the sandboxed reader of `exe`.
fn read(exe: &Path, spec: &DiskSpec, index: usize, extra: &str) -> Result<(LinuxBoot, String), String> {
    let readonly = DiskSpec { readonly: true, ..spec.clone() };
    let disk = block::open(&readonly).map_err(|e| format!("disk {index}: {}", block::error_chain(&e)))?;
    let limits = bootdisk::Limits::default();
    let b = bootdisk::sandbox::read(exe, &*disk, &limits).map_err(|e| format!("disk {index}: {e}"))?;
    if !crate::vmm::linux::is_linux_kernel(&b.kernel) {
        return Err(format!("disk {index}: partition {}:{} is not a Linux kernel", b.partition, b.kernel_path));
    }
    let cmdline = [b.cmdline.as_str(), extra].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ");
    tracing::info!(
        disk = index,
        partition = b.partition,
        config = %b.config,
        entry = %b.title,
        kernel = %b.kernel_path,
        initrd = %b.initrd_paths.join(" "),
        cmdline = %cmdline,
        "booting from the disk"
    );
    let name = format!("disk {index} partition {}:{} ({})", b.partition, b.kernel_path, b.title);
    let initrd = (!b.initrd.is_empty()).then(|| Arc::from(b.initrd));
    Ok((LinuxBoot { kernel: Arc::from(b.kernel), initrd, cmdline }, name))
}
