//! A libvirt domain XML as smpft's qemu hook reads it (`config::metadata::from_domain_xml`):
//! the `<smpft:ft>` settings, none, or one error line, never a panic; then each setting's value
//! parsed as the persona parses it (durations, sizes, numbers, the standby's address). Beyond
//! that:
//! - accepted settings reach the persona unchanged: the `key=value` text the hook writes reads
//!   back as the same settings;
//! - accepted settings name a role, `primary` or `standby`, and only elements smpft knows.
//!
//! The input: a flags byte (bit 0: the text goes inside a domain's `<smpft:ft>` element, so it
//! need not spell the namespace), then the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smp_ft::config::metadata::{self, Settings};
use smp_ft::config::{FtBuilder, Names, Setting};

fn known(element: &str) -> bool {
    element == "role"
        || element == metadata::DISK_SYNC
        || element == metadata::STANDBY_URI
        || metadata::OPERATOR_KEYS.contains(&element)
        || Setting::from_libvirt(element).is_some()
}

fn values(s: &Settings) {
    for (key, value) in &s.0 {
        if let Some(setting) = Setting::from_libvirt(key) {
            let _ = FtBuilder::new(Names::Libvirt).parse(setting, value);
        }
    }
    if s.get("role") == Some("standby") {
        if let Some(l) = s.get("listen") {
            let _ = smp_ft::config::ft::listen(Names::Libvirt, l);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let xml = match flags & 1 {
        0 => text.into_owned(),
        _ => format!(
            "<domain type='kvm'><name>vm1</name><metadata><smpft:ft xmlns:smpft=\"{}\">{text}</smpft:ft></metadata></domain>",
            metadata::NAMESPACE
        ),
    };
    match metadata::from_domain_xml(&xml) {
        Ok(None) => {}
        Ok(Some(s)) => {
            assert_eq!(Settings::from_text(&s.to_text()), s, "the settings the hook hands over");
            assert!(matches!(s.get("role"), Some("primary" | "standby")), "{s:?}");
            assert!(s.0.keys().all(|k| known(k)), "{s:?}");
            values(&s);
        }
        Err(e) => assert!(!e.contains('\n'), "an error of more than one line: {e}"),
    }
});
