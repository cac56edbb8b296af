//! Boot Loader Specification entries (`/loader/entries/*.conf`, as Fedora and RHEL write
//! them): `title`, `version`, `linux`, `initrd` (repeatable), `options` (repeatable). The
//! default is the entry `saved_entry` in `grubenv` names, else the newest version.

use crate::{BootError, Device, Entry, FileRef};
use std::cmp::Ordering;
use std::collections::HashMap;

/// One entry file: its id (file name without `.conf`) and keys.
#[derive(Debug, Clone, Default)]
pub struct BlsEntry {
    pub id: String,
    pub title: String,
    pub version: String,
    pub linux: Option<String>,
    pub initrds: Vec<String>,
    pub options: Vec<String>,
}

/// Parses an entry file.
pub fn parse(id: &str, text: &str) -> BlsEntry {
    let mut e = BlsEntry { id: id.to_string(), ..Default::default() };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim().to_string();
        match key {
            "title" => e.title = value,
            "version" => e.version = value,
            "linux" => e.linux = Some(value),
            "initrd" => e.initrds.extend(value.split_whitespace().map(String::from)),
            "options" => e.options.push(value),
            _ => {}
        }
    }
    e
}

/// The default entry among `entries`, with `$var` in its options expanded from `grubenv`.
pub fn default_entry(mut entries: Vec<BlsEntry>, grubenv: &HashMap<String, String>) -> Result<Entry, BootError> {
    entries.retain(|e| e.linux.is_some());
    let saved = grubenv.get("saved_entry").filter(|s| !s.is_empty());
    let chosen = match saved.and_then(|s| entries.iter().position(|e| &e.id == s)) {
        Some(i) => entries.swap_remove(i),
        None => {
            entries.sort_by(|a, b| version_cmp(&b.version, &a.version).then_with(|| version_cmp(&b.id, &a.id)));
            let mut it = entries.into_iter();
            it.next()
                .ok_or_else(|| BootError::NotFound("the Boot Loader Specification entries name no linux".into()))?
        }
    };
    let options = chosen.options.join(" ");
    let args: Vec<String> = options
        .split_whitespace()
        .map(|w| match w.strip_prefix('$') {
            Some(var) => grubenv.get(var.trim_matches(|c| c == '{' || c == '}')).cloned().unwrap_or_default(),
            None => w.to_string(),
        })
        .filter(|w| !w.is_empty())
        .collect();
    let file = |path: &str| FileRef { device: Device::Here, path: path.to_string() };
    let title = if chosen.title.is_empty() { chosen.id.clone() } else { chosen.title.clone() };
    Ok(Entry {
        title,
        kernel: file(chosen.linux.as_deref().expect("kept only entries with linux")),
        initrds: chosen.initrds.iter().map(|p| file(p)).collect(),
        args: args.join(" "),
    })
}

/// Compares versions as `rpmvercmp` and `strverscmp` roughly do: runs of digits by value,
/// other runs as text.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let runs = |s: &str| -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, run)) if *d == digit => run.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    };
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let o = match (x.0, y.0) {
            (true, true) => {
                let (p, q) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                p.len().cmp(&q.len()).then_with(|| p.cmp(q))
            }
            _ => x.1.cmp(&y.1),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ra.len().cmp(&rb.len())
}

/// Parses `grubenv`: `# GRUB Environment Block` then `NAME=VALUE` lines, padded with `#`.
pub fn grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .take(1024)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_or_saved_entry() {
        let e = |id: &str, ver: &str| {
            parse(id, &format!("title T {ver}\nversion {ver}\nlinux /vmlinuz-{ver}\ninitrd /i-{ver}\noptions $kernelopts x\noptions y\n"))
        };
        let entries = vec![e("m-6.1.9", "6.1.9"), e("m-6.1.10", "6.1.10"), e("m-5.19", "5.19.0")];
        let env: HashMap<String, String> = [("kernelopts".to_string(), "root=/dev/vda ro".to_string())].into();
        let d = default_entry(entries.clone(), &env).unwrap();
        assert_eq!((d.title.as_str(), d.kernel.path.as_str()), ("T 6.1.10", "/vmlinuz-6.1.10"));
        assert_eq!(d.args, "root=/dev/vda ro x y");
        let saved: HashMap<String, String> = [("saved_entry".to_string(), "m-5.19".to_string())].into();
        assert_eq!(default_entry(entries, &saved).unwrap().kernel.path, "/vmlinuz-5.19.0");
        assert!(default_entry(vec![parse("x", "title no linux\n")], &HashMap::new()).is_err());
    }

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(version_cmp("6.1.10", "6.1.9"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-13", "6.1.0-13"), Ordering::Equal);
        assert_eq!(version_cmp("5.19", "6.0"), Ordering::Less);
        assert_eq!(grubenv("# GRUB Environment Block\nsaved_entry=a>b\n####")["saved_entry"], "a>b");
    }
}
