//! `-readconfig FILE`: QEMU's configuration file, as Proxmox VE passes it for q35 VMs
//! (`/usr/share/qemu-server/pve-q35-4.0.cfg`: the USB controllers, the DMI-to-PCI bridge, the
//! PCI bridges and PCIe root ports its devices are placed behind).
//!
//! ```text
//! [device "pci.1"]
//!   driver = "pci-bridge"
//!   bus = "pcidmi"
//!   addr = "2.0"
//! ```
//!
//! Each `[device]`, `[drive]`, `[chardev]`, `[object]`, `[netdev]`, `[machine]` and `[global]`
//! section becomes the option it stands for and is read as if it had been on the command line
//! (so a device smpft leaves out is left out with its line, and one it cannot run is refused);
//! any other section is named in one line as not applied.

use crate::argv::ArgvError;
use std::path::Path;

/// Sections that are command-line options, with the option and the key a section's name is.
const GROUPS: &[(&str, &str, &str)] = &[
    ("device", "-device", "id"),
    ("drive", "-drive", "id"),
    ("chardev", "-chardev", "id"),
    ("object", "-object", "id"),
    ("netdev", "-netdev", "id"),
    ("machine", "-machine", ""),
    ("global", "-global", ""),
];

/// The options `path` holds, in order; sections that do not apply add a line to `not_applied`.
pub fn read(path: &Path, not_applied: &mut Vec<String>) -> Result<Options, ArgvError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ArgvError(format!("-readconfig {}: cannot read it: {e}", path.display())))?;
    parse(&text)
        .map(|(options, skipped)| {
            not_applied
                .extend(skipped.into_iter().map(|g| format!("-readconfig {}: [{g}] is not applied", path.display())));
            options
        })
        .map_err(|e| ArgvError(format!("-readconfig {}: {e}", path.display())))
}

/// A section being read: its option, and its `key=value` pairs as QEMU's option syntax.
struct Section {
    option: Option<&'static str>,
    group: String,
    pairs: Vec<String>,
}

impl Section {
    fn finish(self, options: &mut Options, skipped: &mut Vec<String>) {
        match self.option {
            Some(opt) => options.push((opt.to_string(), self.pairs.join(","))),
            None => skipped.push(self.group),
        }
    }
}

/// Options as `(option, value)` pairs.
type Options = Vec<(String, String)>;

/// The options in a configuration file's text and the sections that are none.
fn parse(text: &str) -> Result<(Options, Vec<String>), String> {
    let (mut options, mut skipped) = (Vec::new(), Vec::new());
    let mut section: Option<Section> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |what: &str| format!("line {}: {what}", n + 1);
        if let Some(head) = line.strip_prefix('[') {
            let head = head.strip_suffix(']').ok_or_else(|| at("a section header ends with ']'"))?;
            if let Some(s) = section.take() {
                s.finish(&mut options, &mut skipped);
            }
            let (group, name) = match head.split_once(' ') {
                Some((g, name)) => {
                    (g.trim(), Some(unquote(name.trim()).ok_or_else(|| at("a section name is quoted"))?))
                }
                None => (head.trim(), None),
            };
            let known = GROUPS.iter().find(|(g, _, _)| *g == group);
            let mut pairs = Vec::new();
            if let (Some((_, _, key)), Some(name)) = (known, name) {
                if !key.is_empty() {
                    pairs.push(format!("{key}={}", escape(&name)));
                }
            }
            section = Some(Section { option: known.map(|(_, o, _)| *o), group: group.to_string(), pairs });
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| at("expected KEY = \"VALUE\""))?;
        let v = unquote(v.trim()).ok_or_else(|| at("a value is quoted"))?;
        let s = section.as_mut().ok_or_else(|| at("a setting outside any section"))?;
        s.pairs.push(format!("{}={}", k.trim(), escape(&v)));
    }
    if let Some(s) = section {
        s.finish(&mut options, &mut skipped);
    }
    Ok((options, skipped))
}

fn unquote(v: &str) -> Option<String> {
    v.strip_prefix('"')?.strip_suffix('"').map(str::to_string)
}

/// A value in QEMU's `key=value,...` syntax (a literal comma doubled).
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout Proxmox VE's q35 configuration gives (abridged).
    const PVE_Q35: &str = r#"
[device "ehci"]
  driver = "ich9-usb-ehci1"
  multifunction = "on"
  bus = "pcie.0"
  addr = "1d.7"

[device "pcidmi"]
  driver = "i82801b11-bridge"
  bus = "pcie.0"
  addr = "1e.0"

[device "pci.1"]
  driver = "pci-bridge"
  bus = "pcidmi"
  addr = "2.0"
  chassis_nr = "2"

[device "ich9-pcie-port-1"]
  driver = "ioh3420"
  multifunction = "on"
  bus = "pcie.0"
  addr = "1c.0"
  port = "1"
  chassis = "1"

[rtc]
  base = "utc"
"#;

    #[test]
    fn sections_become_the_options_they_stand_for() {
        let (options, skipped) = parse(PVE_Q35).unwrap();
        assert_eq!(options.len(), 4);
        assert_eq!(
            options[0],
            ("-device".into(), "id=ehci,driver=ich9-usb-ehci1,multifunction=on,bus=pcie.0,addr=1d.7".into())
        );
        assert_eq!(options[2].1, "id=pci.1,driver=pci-bridge,bus=pcidmi,addr=2.0,chassis_nr=2");
        assert_eq!(skipped, vec!["rtc".to_string()]);
        let (o, _) = parse("[drive \"d\"]\n file = \"/a,b\"\n").unwrap();
        assert_eq!(o[0].1, "id=d,file=/a,,b", "a comma in a value stays one value");
    }

    #[test]
    fn a_malformed_file_is_refused_with_the_line() {
        for (text, why) in [
            ("[device \"x\"\n", "line 1: a section header"),
            ("driver = \"x\"\n", "line 1: a setting outside any section"),
            ("[device \"x\"]\ndriver x\n", "line 2: expected KEY"),
            ("[device \"x\"]\ndriver = x\n", "line 2: a value is quoted"),
        ] {
            let e = parse(text).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        let e = read(Path::new("/nonexistent.cfg"), &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("cannot read it"), "{e}");
    }
}
