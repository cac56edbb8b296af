//! smpft's settings in a libvirt domain's `<metadata>` (`<smpft:ft xmlns:smpft="urn:smpft:libvirt:1">`,
//! see the persona's `libvirt_ft` for the elements), read from the domain XML libvirt hands its
//! qemu hook. Anyone allowed to change the domain's XML writes them: they are checked here,
//! and a malformed document or element is one error line.

use super::Setting;
use crate::ft::disk::DiskSync;
use quick_xml::events::Event;
use std::collections::BTreeMap;

/// smpft's XML namespace in domain metadata.
pub const NAMESPACE: &str = "urn:smpft:libvirt:1";
/// A standby's initial copy of its disks: `full` (every block) or `compare` (it hashes its own
/// disks and only blocks that differ are sent: a copy already close, or a new sparse volume).
pub const DISK_SYNC: &str = "disk-sync";
/// The element that names the standby's libvirt URI (on the primary), which `smpft libvirt
/// protect` writes.
pub const STANDBY_URI: &str = "standby-uri";
/// Elements `smpft libvirt protect` writes beside the FT settings.
const PAIR_KEYS: [&str; 2] = [STANDBY_URI, DISK_SYNC];
/// The operators' elements (beside the FT settings): the metrics endpoint and the event hook.
pub const OPERATOR_KEYS: &[&str] = &["metrics", "on-event", "on-event-timeout"];

/// A domain's FT settings, as `key → value`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings(pub BTreeMap<String, String>);

impl Settings {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn check(&self) -> Result<(), String> {
        let need = |keys: &[&str]| -> Result<(), String> {
            let missing: Vec<&str> = keys.iter().copied().filter(|k| self.get(k).is_none()).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("smpft FT metadata lacks <{}>", missing.join(">, <")))
            }
        };
        need(&["role", "tiebreak", "identity"])?;
        if let Some(v) = self.get(DISK_SYNC) {
            disk_sync(v)?;
        }
        if self.get("peer-cert").is_none() {
            // Trusted through the site CA instead: its certificate and the peer's name.
            need(&["ca", "peer-name"]).map_err(|e| format!("{e} (or <peer-cert>)"))?;
        }
        match self.get("role") {
            Some("primary") => need(&["peer"]),
            Some("standby") => need(&["listen"]),
            Some(r) => Err(format!("smpft FT metadata: role '{r}' is neither 'primary' nor 'standby'")),
            None => unreachable!("checked above"),
        }
    }

    /// As the hook hands the settings to the persona: `key=value` lines.
    pub fn to_text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    /// The settings [`Settings::to_text`] wrote.
    pub fn from_text(t: &str) -> Settings {
        Settings(t.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }
}

/// The FT settings in a domain XML: `None` if it has none; an error for malformed ones.
pub fn from_domain_xml(xml: &str) -> Result<Option<Settings>, String> {
    let mut reader = quick_xml::NsReader::from_str(xml);
    let mut in_ft = false;
    let mut key: Option<String> = None;
    let mut found = false;
    let mut s = Settings::default();
    loop {
        let ev =
            reader.read_resolved_event().map_err(|e| format!("the domain XML does not parse: {}", one_line(&e)))?;
        match ev {
            (ns, Event::Start(e)) => {
                let ours = matches!(ns, quick_xml::name::ResolveResult::Bound(n) if n.as_ref() == NAMESPACE.as_bytes());
                let local = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if ours && local == "ft" {
                    in_ft = true;
                    found = true;
                } else if ours && in_ft {
                    let operators = OPERATOR_KEYS.contains(&local.as_str()) || PAIR_KEYS.contains(&local.as_str());
                    if local != "role" && !operators && Setting::from_libvirt(&local).is_none() {
                        return Err(format!("smpft FT metadata: unknown element <{local}>"));
                    }
                    key = Some(local);
                }
            }
            (_, Event::Text(t)) => {
                if let Some(k) = &key {
                    let v =
                        t.unescape().map_err(|e| format!("smpft FT metadata: {}", one_line(&e)))?.trim().to_string();
                    if v.contains('\n') {
                        return Err(format!("smpft FT metadata: <{k}> spans lines"));
                    }
                    s.0.insert(k.clone(), v);
                }
            }
            (_, Event::End(e)) => {
                let local = e.local_name();
                if key.is_some() {
                    key = None;
                } else if in_ft && local.as_ref() == b"ft" {
                    in_ft = false;
                }
            }
            (_, Event::Eof) => break,
            _ => {}
        }
    }
    if !found {
        return Ok(None);
    }
    s.check()?;
    Ok(Some(s))
}

/// An error that quotes the document, on one line: the line breaks and other control
/// characters it quotes are escaped (libvirt shows the hook's message as one line).
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// `<smpft:disk-sync>`'s value.
pub fn disk_sync(v: &str) -> Result<DiskSync, String> {
    <DiskSync as clap::ValueEnum>::from_str(v, true)
        .map_err(|_| format!("smpft FT metadata: <{DISK_SYNC}> '{v}' is neither 'full' nor 'compare'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `libvirt_metadata` fuzz target: a parse error quoted the document's line
    /// breaks, and so spanned lines.
    #[test]
    fn an_error_that_quotes_the_document_is_one_line() {
        let xml = "<domain><metadata>\n<a></b\nc></metadata></domain>";
        let e = from_domain_xml(xml).unwrap_err();
        assert!(e.starts_with("the domain XML does not parse: ") && !e.contains('\n'), "{e}");
        assert!(e.contains("\\n"), "the line breaks are shown escaped: {e}");
    }
}
