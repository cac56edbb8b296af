//! The PC around the devices, as libvirt writes it: the machine's names and options, the
//! timers, power management, and the devices stacks add by habit that smpft does not have.
//!
//! smpft has one machine. libvirt adds a domain's PCI root, its USB and PS/2 defaults and its
//! power-management globals only for machine types it recognises by name as a PC (i440fx or
//! q35), so the machine is also presented under i440fx names ([`MACHINES`]): a domain written
//! for `pc` (virt-install's and Nova's default) starts as written.
//!
//! What a PC has and smpft does not (a USB controller and tablet, a video card and the VNC or
//! SPICE server that shows it, PS/2 input, vmcoreinfo) is accepted: the probe lists it so
//! libvirt takes the XML, the VM leaves it out, and one warning line per device says so
//! ([`Launch::left_out`]). An option that would change what the guest runs (an S3 sleep state,
//! an HPET, a PIT that drops ticks) is refused with the reason.

use crate::argv::{ArgvError, Launch};
use crate::qmp::QmpError;
use serde_json::{json, Map, Value};

/// The machine type's canonical name: the i440fx version whose QMP dialect smpft speaks.
pub const PC_MACHINE: &str = "pc-i440fx-7.2";
/// Its alias, the name virt-install and Nova write.
pub const PC_ALIAS: &str = "pc";
/// smpft's own name for its machine (kept for domains written for it).
pub const SMPFT_MACHINE: &str = "smpft";
/// Every name of smpft's one machine.
pub const MACHINES: [&str; 3] = [PC_MACHINE, PC_ALIAS, SMPFT_MACHINE];

/// Why a VM that boots UEFI firmware from pflash is refused.
pub const UEFI: &str = "a UEFI VM (OVMF firmware in pflash) is not supported: smpft runs no firmware; it boots a Linux kernel, or what the VM's disk holds, directly (in Proxmox: bios seabios, no efidisk)";
const NO_DISPLAY: &str = "no display: use the serial console";
const NO_HPET: &str = "no HPET: the guest keeps time by its TSC and the PIT (write <timer name='hpet' present='no'/>)";

/// Device types smpft accepts on the command line and leaves out of the VM, with what the
/// guest is without.
pub const ABSENT_DEVICE_TYPES: &[(&str, &str)] = &[
    ("piix3-usb-uhci", "no USB: the USB controller is left out"),
    ("qemu-xhci", "no USB: the USB controller is left out"),
    ("usb-tablet", "no USB tablet: use the serial console"),
    ("VGA", NO_DISPLAY),
    ("cirrus-vga", NO_DISPLAY),
    ("virtio-vga", NO_DISPLAY),
    ("virtio-gpu-pci", NO_DISPLAY),
    ("qxl-vga", NO_DISPLAY),
    ("vmcoreinfo", "no vmcoreinfo: a guest kernel's crash notes are not exported"),
    ("ich9-usb-ehci1", "no USB: the USB controller is left out"),
    ("ich9-usb-uhci1", "no USB: the USB controller is left out"),
    ("ich9-usb-uhci2", "no USB: the USB controller is left out"),
    ("ich9-usb-uhci3", "no USB: the USB controller is left out"),
];

/// PCI bridges and ports stacks add to place devices behind: smpft's machine has one bus, so the
/// devices go on it and the bridge itself is left out.
pub const BRIDGES: &[&str] = &["pci-bridge", "i82801b11-bridge", "ioh3420", "pcie-root-port", "pcie-pci-bridge"];

/// Properties the probe reports for types libvirt asks about that are not devices of the VM:
/// the power-management and PIT knobs libvirt sets with `-global`.
const GLOBAL_PROPERTIES: &[(&str, &[&str])] =
    &[("PIIX4_PM", &["disable_s3", "disable_s4"]), ("kvm-pit", &["lost_tick_policy"])];

fn err<T>(msg: impl Into<String>) -> Result<T, ArgvError> {
    Err(ArgvError(msg.into()))
}

/// Whether `name` is one of smpft's machine names.
pub fn is_machine(name: &str) -> bool {
    MACHINES.contains(&name)
}

/// A PC machine type another stack names (Proxmox's `pc+pve0`, `q35`, `q35+pve1`, a versioned
/// `pc-i440fx-8.1` or `pc-q35-8.1`): smpft runs it as its one machine, and says so. `None` for
/// any other name.
pub fn foreign_pc(name: &str) -> Option<String> {
    let (base, pve) = match name.split_once('+') {
        Some((b, v)) if v.strip_prefix("pve").is_some_and(|n| n.parse::<u32>().is_ok()) => (b, true),
        Some(_) => return None,
        None => (name, false),
    };
    let versioned =
        |prefix: &str| base.strip_prefix(prefix).is_some_and(|v| v.split('.').all(|p| p.parse::<u32>().is_ok()));
    let q35 = base == "q35" || versioned("pc-q35-");
    if !(q35 || base == PC_ALIAS || base == PC_MACHINE || versioned("pc-i440fx-")) || (!pve && !q35 && is_machine(base))
    {
        return None;
    }
    let chipset =
        if q35 { "no ICH9 chipset or PCIe root ports: its devices sit on one PCI bus" } else { "the same i440fx PC" };
    Some(format!("-machine {name}: runs as smpft's one machine ({PC_MACHINE}: {chipset})"))
}

/// `query-machines`: the i440fx names first (the default, which virt-install picks), then
/// smpft's own.
pub fn machines(cpu_max: u32) -> Value {
    json!([
        {"name": PC_MACHINE, "alias": PC_ALIAS, "is-default": true, "cpu-max": cpu_max,
         "hotpluggable-cpus": false, "deprecated": false},
        {"name": SMPFT_MACHINE, "cpu-max": cpu_max, "hotpluggable-cpus": false, "deprecated": false},
    ])
}

/// `device-list-properties` for a type this module knows: `None` if it does not.
pub fn device_properties(typename: &str) -> Option<Value> {
    if ABSENT_DEVICE_TYPES.iter().any(|(t, _)| *t == typename) {
        return Some(json!([]));
    }
    let (_, props) = GLOBAL_PROPERTIES.iter().find(|(t, _)| *t == typename)?;
    let kind = |p: &str| if p == "lost_tick_policy" { "LostTickPolicy" } else { "uint8" };
    Some(Value::Array(props.iter().map(|p| json!({"name": p, "type": kind(p)})).collect()))
}

/// Commands about the display smpft does not have: `query-vnc`/`query-spice` say there is
/// none, the rest are refused with that reason. `None` for any other command.
pub fn display_answer(name: &str) -> Option<Result<Value, QmpError>> {
    Some(match name {
        "query-vnc" => Ok(json!({"enabled": false, "x-smpft-reason": NO_DISPLAY})),
        "query-spice" => Ok(json!({"enabled": false, "migrated": false, "x-smpft-reason": NO_DISPLAY})),
        n if DISPLAY_COMMANDS.contains(&n) => {
            Err(QmpError::generic(format!("{n}: smpft has no VNC or SPICE server ({NO_DISPLAY})")))
        }
        _ => return None,
    })
}

/// The display and input commands [`display_answer`] refuses.
pub const DISPLAY_COMMANDS: [&str; 6] =
    ["set_password", "expire_password", "change-vnc-password", "screendump", "send-key", "input-send-event"];

/// `-machine`: its type and options. `-machine none` is libvirt's probe.
pub fn machine(launch: &mut Launch, value: &str) -> Result<(), ArgvError> {
    let m = crate::argv::props(value, "type")?;
    let t = crate::argv::text(&m, "type").unwrap_or_default();
    if t == "none" {
        launch.probe = true;
    } else if let Some(line) = foreign_pc(&t) {
        launch.left_out.push(line);
    } else if !is_machine(&t) {
        return err(format!(
            "-machine {t}: machine type not supported (smpft's one machine is named {})",
            MACHINES.join(", ")
        ));
    }
    // libvirt gives a PC (and only a PC) PS/2 input of its own; so does every other stack.
    let mut ps2 = t == PC_MACHINE || t == PC_ALIAS || foreign_pc(&t).is_some();
    for (k, v) in &m {
        let v = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match machine_option(k, &v)? {
            Step::Nothing => {}
            Step::Accept(why) => launch.ignored.push(format!("-machine {k}={v} ({why})")),
            Step::LeftOut(line) => launch.left_out.push(line.into()),
            Step::NoPs2 => {
                ps2 = false;
                launch.ignored.push(format!("-machine {k}={v} (smpft's machine has no i8042)"));
            }
        }
    }
    if ps2 {
        launch.left_out.push("no PS/2 keyboard or mouse (no i8042 controller): use the serial console".into());
    }
    launch.machine = Some(match crate::argv::text(&m, "memory-backend") {
        Some(b) => format!("{t} (memory {b})"),
        None => t,
    });
    Ok(())
}

/// What a `-machine` option does.
enum Step {
    Nothing,
    /// Accepted with nothing to do, for this reason.
    Accept(&'static str),
    /// A device smpft leaves out: its warning line.
    LeftOut(&'static str),
    /// `i8042=off`: no PS/2 devices to warn about.
    NoPs2,
}

/// One `-machine` option: honoured, accepted with the reason, or refused.
fn machine_option(k: &str, v: &str) -> Result<Step, ArgvError> {
    let on = matches!(v, "on" | "true" | "yes");
    Ok(Step::Accept(match k {
        "type" | "memory-backend" => return Ok(Step::Nothing),
        "accel" if v.split(':').any(|a| a == "kvm") => return Ok(Step::Nothing),
        "accel" => return err(format!("-machine accel={v}: smpft runs guests only with KVM")),
        "usb" if !on => "smpft's machine has no USB bus",
        "usb" => return Ok(Step::LeftOut("no USB: -machine usb=on asks for a bus smpft's machine does not have")),
        "dump-guest-core" if !on => "guest memory is left out of smpft's core dumps",
        "dump-guest-core" => "guest memory is always left out of smpft's core dumps",
        "vmcoreinfo" if on => return Ok(Step::LeftOut("no vmcoreinfo: a guest kernel's crash notes are not exported")),
        "vmcoreinfo" => "smpft has no vmcoreinfo device",
        "mem-merge" => "smpft does not offer guest memory to KSM",
        "graphics" if !on => "smpft has no display",
        "i8042" if !on => return Ok(Step::NoPs2),
        "i8042" => return Ok(Step::Nothing),
        "acpi" => "ACPI tables are smpft's own",
        "hpet" if !on => "smpft's machine has no HPET",
        "vmport" if !on => "smpft's machine has no VMware I/O port",
        "smm" if !on => "smpft's machine has no SMM",
        "kernel_irqchip" | "kernel-irqchip" if on => "smpft always uses KVM's in-kernel irqchip",
        "hpet" => return Ok(Step::LeftOut(NO_HPET)),
        "vmport" => return err("-machine vmport=on: smpft's machine has no VMware I/O port"),
        "smm" => return err("-machine smm=on: smpft runs no firmware, so there is no System Management Mode"),
        "kernel_irqchip" | "kernel-irqchip" => {
            return err(format!("-machine {k}={v}: smpft always uses KVM's in-kernel irqchip"))
        }
        "pflash0" | "pflash1" => return err(UEFI),
        _ => return err(format!("-machine {k}={v}: option not supported")),
    }))
}

/// Once the whole command line is read: a PC has an HPET unless `-no-hpet` (or `hpet=off`)
/// says otherwise, and smpft's has none.
pub fn finish(launch: &mut Launch) {
    let machine = launch.machine.as_deref().unwrap_or_default();
    let name = machine.split(' ').next().unwrap_or_default();
    let pc = name == PC_MACHINE || name == PC_ALIAS || foreign_pc(name).is_some();
    let no_hpet = launch.ignored.iter().any(|i| i.starts_with("-no-hpet") || i.starts_with("-machine hpet="));
    if pc && !no_hpet && !launch.left_out.iter().any(|l| l == NO_HPET) {
        launch.left_out.push(NO_HPET.into());
    }
}

/// Options without a value that belong here; true if `opt` was one.
pub fn flag_option(launch: &mut Launch, opt: &str) -> bool {
    match opt {
        "-no-hpet" => launch.ignored.push("-no-hpet (smpft's machine has no HPET)".into()),
        _ => return false,
    }
    true
}

/// Options with a value that belong here; true if `opt` was one.
pub fn option(launch: &mut Launch, opt: &str, value: &str) -> Result<bool, ArgvError> {
    match opt {
        "-machine" | "-M" => machine(launch, value)?,
        "-global" => global(launch, value)?,
        "-rtc" => rtc(launch, value)?,
        "-sandbox" => sandbox(launch, value)?,
        "-vnc" | "-spice" => {
            let what = if opt == "-vnc" { "VNC" } else { "SPICE" };
            launch
                .left_out
                .push(format!("no display: the {what} server ({value}) is not started; use the serial console"))
        }
        "-k" => launch.ignored.push(format!("-k {value} (the keymap of a display smpft does not have)")),
        "-vga" if value == "none" => launch.ignored.push("-vga none".into()),
        "-vga" => {
            launch.left_out.push(format!("no display: the '{value}' video card is left out; use the serial console"))
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// `-global DRIVER.PROPERTY=VALUE` (or `driver=,property=,value=`): the PIT's lost-tick policy
/// and the power-management states libvirt sets; defaults of devices smpft leaves out.
fn global(launch: &mut Launch, value: &str) -> Result<(), ArgvError> {
    let (driver, prop, v) = match value.split_once('=') {
        Some(("driver", _)) => {
            let m = crate::argv::props(value, "")?;
            let get = |k: &str| crate::argv::text(&m, k).unwrap_or_default();
            (get("driver"), get("property"), get("value"))
        }
        Some((dp, v)) => match dp.split_once('.') {
            Some((d, p)) => (d.to_string(), p.to_string(), v.to_string()),
            None => return err(format!("-global {value}: expected DRIVER.PROPERTY=VALUE")),
        },
        None => return err(format!("-global {value}: expected DRIVER.PROPERTY=VALUE")),
    };
    let mut accept = |why: &str| launch.ignored.push(format!("-global {driver}.{prop}={v} ({why})"));
    match (driver.as_str(), prop.as_str(), v.as_str()) {
        // QEMU's kvm-pit: "delay" leaves KVM's in-kernel PIT re-injecting missed ticks, which is
        // what smpft's PIT does.
        ("kvm-pit", "lost_tick_policy", "delay") => accept("KVM's in-kernel PIT re-injects missed ticks"),
        ("kvm-pit", "lost_tick_policy", other) => {
            return err(format!(
                "-global kvm-pit.lost_tick_policy={other}: smpft's in-kernel PIT re-injects missed ticks \
                 (only 'delay'; write <timer name='pit' tickpolicy='delay'/>)"
            ))
        }
        ("PIIX4_PM" | "ICH9-LPC", "disable_s3" | "disable_s4", "1" | "on" | "true") => {
            accept("smpft's machine has no S3 or S4 sleep state")
        }
        ("PIIX4_PM" | "ICH9-LPC", "disable_s3" | "disable_s4", _) => {
            let (state, elem) = if prop == "disable_s3" { ("S3", "suspend-to-mem") } else { ("S4", "suspend-to-disk") };
            return err(format!(
                "-global {driver}.{prop}={v}: smpft's machine has no {state} sleep state (write <{elem} enabled='no'/>)"
            ));
        }
        (d, _, _) if ABSENT_DEVICE_TYPES.iter().any(|(t, _)| *t == d) => accept("a device smpft leaves out"),
        _ => return err(format!("-global {driver}.{prop}={v}: not supported")),
    }
    Ok(())
}

/// `-rtc base=utc,driftfix=slew`: smpft's machine has no CMOS clock, so there is nothing for
/// the base or the drift fix to set; the options are checked and accepted.
fn rtc(launch: &mut Launch, value: &str) -> Result<(), ArgvError> {
    let m = crate::argv::props(value, "base")?;
    for (k, v) in &m {
        let v = v.as_str().unwrap_or_default();
        let ok = match k.as_str() {
            "base" => true,
            "clock" => matches!(v, "host" | "rt" | "vm"),
            "driftfix" => matches!(v, "slew" | "none"),
            _ => false,
        };
        if !ok {
            return err(format!("-rtc {k}={v}: not supported"));
        }
    }
    launch.ignored.push(format!("-rtc {value} (smpft's machine has no CMOS clock: the guest keeps time by its TSC)"));
    Ok(())
}

/// `-sandbox on|off[,obsolete=..,elevateprivileges=..,spawn=..,resourcecontrol=..]`: on is
/// smpft's own per-thread filters with `--seccomp kill`, off is `--seccomp off`. QEMU's
/// sub-options name groups of calls of its own filter; smpft's filters are per thread instead
/// (the main thread may start the storage daemon and event hooks, and no thread may administer
/// the kernel), so they are accepted and noted.
fn sandbox(launch: &mut Launch, value: &str) -> Result<(), ArgvError> {
    let m = crate::argv::props(value, "enable")?;
    let mut mode = None;
    for (k, v) in &m {
        let v = v.as_str().unwrap_or_default();
        match (k.as_str(), v) {
            ("enable", "on") => mode = Some(confine::Mode::Kill),
            ("enable", "off") => mode = Some(confine::Mode::Off),
            ("obsolete" | "elevateprivileges" | "spawn" | "resourcecontrol", "allow" | "deny" | "children") => {}
            _ => return err(format!("-sandbox {k}={v}: not supported (on or off, with QEMU's sub-options)")),
        }
    }
    let Some(mode) = mode else { return err(format!("-sandbox {value}: say on or off")) };
    launch.seccomp = Some(mode);
    launch.ignored.push(format!("-sandbox {value} (smpft's per-thread seccomp filters, --seccomp {})", mode.name()));
    Ok(())
}

/// A `-device` of a type smpft leaves out: recorded with its warning line; false for any other
/// type.
pub fn left_out_device(launch: &mut Launch, driver: &str, id: &str) -> bool {
    let Some((_, why)) = ABSENT_DEVICE_TYPES.iter().find(|(t, _)| *t == driver) else { return false };
    let name = if id.is_empty() { driver.to_string() } else { format!("{id} ({driver})") };
    launch.left_out.push(format!("{why} [{name} left out of the VM]"));
    true
}

/// A block node a disk's device reaches, as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    pub name: String,
    /// QEMU's driver: `raw` for a format node, `file`, `host_device` or `nbd` for storage.
    pub driver: String,
    /// The storage node under a format node.
    pub child: Option<String>,
    pub readonly: bool,
}

/// The nodes from `node` down its `file` children, as `-blockdev` declared them.
pub fn block_chain(blockdevs: &std::collections::HashMap<String, Map<String, Value>>, node: &str) -> Vec<BlockNode> {
    let mut out = Vec::new();
    let mut name = Some(node.to_string());
    while let Some(n) = name.take() {
        let Some(b) = blockdevs.get(&n) else { break };
        if out.len() >= 4 {
            break;
        }
        let child = crate::argv::text(b, "file");
        out.push(BlockNode {
            name: n,
            driver: crate::argv::text(b, "driver").unwrap_or_default(),
            child: child.clone(),
            readonly: crate::argv::flag(b, "read-only"),
        });
        name = child;
    }
    out
}

#[cfg(test)]
mod tests;
