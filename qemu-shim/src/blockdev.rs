//! QEMU's block node graphs as `-blockdev` and `-object throttle-group` write them (libvirt's
//! chains of nodes named by `node-name` references, Proxmox's nodes nested inline, both
//! spellings), read far enough to give each guest disk the nodes and objects it needs, in the
//! order qemu-storage-daemon must open them. The values themselves are passed on verbatim.

use serde_json::{Map, Value};
use std::collections::HashMap;

/// Keys whose value is a child node: a reference by name (a string) or a node inline (an object).
const CHILD_KEYS: &[&str] = &["file", "backing", "data-file", "image", "test", "raw", "children"];

/// Drivers that filter another node: a disk's format is its first node that is not one.
const FILTERS: &[&str] = &["throttle", "copy-on-read", "preallocate", "compress", "blkdebug"];

/// One disk's graph: the nodes and objects it needs, verbatim, dependencies first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskGraph {
    /// The disk's (top) node.
    pub node: String,
    pub blockdevs: Vec<String>,
    pub objects: Vec<String>,
    /// The image format (the driver under the filters) and the file it opens, if named.
    pub format: String,
    pub filename: Option<String>,
}

/// Every `-blockdev` and `-object throttle-group`, by name, as given.
#[derive(Debug, Clone, Default)]
pub struct Blockdevs {
    nodes: HashMap<String, (String, Map<String, Value>)>,
    /// Node names in the order given.
    order: Vec<String>,
    objects: HashMap<String, String>,
}

impl Blockdevs {
    /// Adds a `-blockdev`: its text verbatim and its parsed form (`props`' output). Returns its
    /// node name.
    pub fn add(&mut self, text: &str, map: Map<String, Value>) -> Result<String, String> {
        let name = match map.get("node-name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(format!("-blockdev {text}: no node-name")),
        };
        if self.nodes.insert(name.clone(), (text.to_string(), map)).is_some() {
            return Err(format!("-blockdev {text}: node-name '{name}' is given twice"));
        }
        self.order.push(name.clone());
        Ok(name)
    }

    /// Adds an `-object throttle-group` by its id.
    pub fn add_object(&mut self, id: String, text: &str) {
        self.objects.insert(id, text.to_string());
    }

    pub fn get(&self, name: &str) -> Option<&Map<String, Value>> {
        self.nodes.get(name).map(|(_, m)| m)
    }

    /// The nodes no other node refers to, in the order given: each is one guest disk when the
    /// command line has no devices (`smpft run --blockdev`).
    pub fn roots(&self) -> Vec<String> {
        let mut referenced = Vec::new();
        for (_, m) in self.nodes.values() {
            walk(m, &mut |key, v| {
                if let (true, Value::String(s)) = (is_child(key), v) {
                    referenced.push(s.clone());
                }
            });
        }
        self.order.iter().filter(|n| !referenced.contains(n)).cloned().collect()
    }

    /// The graph under `node`, for the disk `disk` (errors name it): a node missing, a cycle and
    /// a throttle group never defined are refused.
    pub fn graph(&self, disk: &str, node: &str) -> Result<DiskGraph, String> {
        let mut out = DiskGraph { node: node.to_string(), ..DiskGraph::default() };
        let mut path = Vec::new();
        self.visit(disk, node, &mut path, &mut out)?;
        let (format, filename) = self.describe(node);
        out.format = format;
        out.filename = filename;
        Ok(out)
    }

    fn visit(&self, disk: &str, node: &str, path: &mut Vec<String>, out: &mut DiskGraph) -> Result<(), String> {
        if path.iter().any(|p| p == node) {
            path.push(node.to_string());
            return Err(format!("{disk}: the block nodes refer to each other in a cycle ({})", path.join(" -> ")));
        }
        let Some((text, map)) = self.nodes.get(node) else {
            return Err(format!("{disk}: no -blockdev '{node}'"));
        };
        if out.blockdevs.contains(text) {
            return Ok(());
        }
        let (mut children, mut groups) = (Vec::new(), Vec::new());
        walk(map, &mut |key, v| match (key, v) {
            (k, Value::String(s)) if is_child(k) => children.push(s.clone()),
            (k, Value::String(s)) if k.ends_with("throttle-group") => groups.push(s.clone()),
            _ => {}
        });
        path.push(node.to_string());
        for c in children {
            self.visit(disk, &c, path, out)?;
        }
        path.pop();
        for g in groups {
            let o = self.objects.get(&g).ok_or_else(|| format!("{disk}: no -object throttle-group with id '{g}'"))?;
            if !out.objects.contains(o) {
                out.objects.push(o.clone());
            }
        }
        out.blockdevs.push(text.clone());
        Ok(())
    }

    /// The storage node under `node` if smpft serves it itself: a file, block device or NBD
    /// export reached through whole raw format nodes (no offset or size) and throttle nodes whose
    /// group sets no limit (Proxmox's `"limits":{}`), with whether any node on the way is
    /// read-only. `None` for any other graph, which qemu-storage-daemon opens.
    pub fn own_storage(&self, node: &str) -> Option<(Map<String, Value>, bool)> {
        let mut map = nest(self.get(node)?.clone());
        let mut readonly = false;
        for _ in 0..8 {
            readonly |= matches!(map.get("read-only"), Some(Value::Bool(true)))
                || matches!(text(&map, "read-only").as_deref(), Some("on" | "true"));
            let whole = !map.contains_key("offset") && !map.contains_key("size");
            let next = match text(&map, "driver")?.as_str() {
                "raw" if whole => map.get("file")?.clone(),
                "throttle" if self.unlimited(&text(&map, "throttle-group")?) => map.get("file")?.clone(),
                "file" | "host_device" | "nbd" => return Some((map, readonly)),
                _ => return None,
            };
            map = match next {
                Value::Object(m) => m,
                Value::String(s) => nest(self.get(&s)?.clone()),
                _ => return None,
            };
        }
        None
    }

    /// Whether the throttle group `id` sets no limit.
    fn unlimited(&self, id: &str) -> bool {
        let Some(m) = self.objects.get(id).and_then(|t| crate::argv::parse_props(t, "qom-type").ok()) else {
            return false;
        };
        let zero = |v: &Value| v.as_u64() == Some(0) || v.as_str() == Some("0");
        let m = nest(m);
        let legacy = m.iter().filter(|(k, _)| k.starts_with("x-")).all(|(_, v)| zero(v));
        legacy
            && match m.get("limits") {
                None => true,
                Some(Value::Object(l)) => l.values().all(zero),
                Some(_) => false,
            }
    }

    /// The format of the image under `node` (the first driver that is not a filter) and the file
    /// its protocol node opens.
    fn describe(&self, node: &str) -> (String, Option<String>) {
        let mut map = nest(self.get(node).cloned().unwrap_or_default());
        let mut format = None;
        for _ in 0..16 {
            let driver = text(&map, "driver").unwrap_or_default();
            if format.is_none() && !FILTERS.contains(&driver.as_str()) {
                format = Some(driver.clone());
            }
            if let Some(f) = text(&map, "filename") {
                return (format.unwrap_or(driver), Some(f));
            }
            map = match map.get("file") {
                Some(Value::Object(m)) => m.clone(),
                Some(Value::String(s)) => nest(self.get(s).cloned().unwrap_or_default()),
                _ => break,
            };
        }
        (format.unwrap_or_default(), None)
    }
}

/// The key=value spelling's dotted keys (`file.driver=file`) as the nested objects JSON writes.
fn nest(m: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in m {
        let mut at = &mut out;
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        for p in parts {
            let slot = at.entry(p.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            at = slot.as_object_mut().expect("made an object above");
        }
        at.insert(last.to_string(), v);
    }
    out
}

fn text(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_string)
}

/// Whether `key` (dotted, as the key=value spelling flattens inline nodes: `file.file`) names a
/// child node.
fn is_child(key: &str) -> bool {
    let last = key.rsplit('.').find(|s| s.parse::<u32>().is_err()).unwrap_or(key);
    CHILD_KEYS.contains(&last)
}

/// Calls `f` with every key and value of `m` and of the nodes inline in it (a child's object,
/// quorum's `children` array).
fn walk(m: &Map<String, Value>, f: &mut dyn FnMut(&str, &Value)) {
    for (k, v) in m {
        match v {
            Value::Object(inner) if is_child(k) => walk(inner, f),
            Value::Array(items) if is_child(k) => {
                for item in items {
                    match item {
                        Value::Object(inner) => walk(inner, f),
                        other => f(k, other),
                    }
                }
            }
            _ => f(k, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Map<String, Value> {
        crate::argv::parse_props(s, "driver").unwrap()
    }

    fn graph(lines: &[&str], objects: &[(&str, &str)]) -> Blockdevs {
        let mut b = Blockdevs::default();
        for l in lines {
            b.add(l, parse(l)).unwrap();
        }
        for (id, o) in objects {
            b.add_object(id.to_string(), o);
        }
        b
    }

    #[test]
    fn libvirts_chain_of_references_comes_out_children_first() {
        let lines = [
            r#"{"driver":"file","filename":"/b.raw","node-name":"libvirt-2-storage","read-only":true}"#,
            r#"{"node-name":"libvirt-2-format","read-only":true,"driver":"raw","file":"libvirt-2-storage"}"#,
            r#"{"driver":"file","filename":"/o.qcow2","node-name":"libvirt-1-storage"}"#,
            r#"{"node-name":"libvirt-1-format","driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format"}"#,
        ];
        let b = graph(&lines, &[]);
        assert_eq!(b.roots(), ["libvirt-1-format"]);
        let g = b.graph("vda", "libvirt-1-format").unwrap();
        assert_eq!(g.blockdevs, lines, "each node after the nodes it names");
        assert_eq!((g.format.as_str(), g.filename.as_deref()), ("qcow2", Some("/o.qcow2")));
    }

    #[test]
    fn proxmoxs_inline_nodes_and_throttle_group() {
        let node = r#"{"driver":"throttle","file":{"driver":"qcow2","file":{"driver":"file","filename":"/v.qcow2","node-name":"e1"},"node-name":"f1"},"node-name":"drive-virtio0","throttle-group":"throttle-drive-virtio0"}"#;
        let group = r#"{"id":"throttle-drive-virtio0","limits":{},"qom-type":"throttle-group"}"#;
        let b = graph(&[node], &[("throttle-drive-virtio0", group)]);
        let g = b.graph("virtio0", "drive-virtio0").unwrap();
        assert_eq!((g.blockdevs, g.objects), (vec![node.to_string()], vec![group.to_string()]));
        assert_eq!((g.format.as_str(), g.filename.as_deref()), ("qcow2", Some("/v.qcow2")));
        let kv = "driver=throttle,node-name=t,throttle-group=g,file.driver=qcow2,file.file.driver=file,file.file.filename=/k";
        let b = graph(&[kv], &[("g", "throttle-group,id=g")]);
        let g = b.graph("d", "t").unwrap();
        assert_eq!((g.format.as_str(), g.filename.as_deref(), g.objects.len()), ("qcow2", Some("/k"), 1));
    }

    #[test]
    fn raw_storage_under_unlimited_throttles_is_smpfts_own() {
        let raw = r#"{"driver":"throttle","file":{"driver":"raw","file":{"driver":"host_device","filename":"/dev/pve/vm-1-disk-0","node-name":"e"},"node-name":"f","read-only":true},"node-name":"drive-scsi0","throttle-group":"g"}"#;
        let open = r#"{"id":"g","limits":{},"qom-type":"throttle-group"}"#;
        let (storage, readonly) = graph(&[raw], &[("g", open)]).own_storage("drive-scsi0").unwrap();
        assert_eq!((text(&storage, "filename").as_deref(), readonly), (Some("/dev/pve/vm-1-disk-0"), true));
        for limited in [
            r#"{"id":"g","limits":{"bps-total":1048576},"qom-type":"throttle-group"}"#,
            "throttle-group,id=g,x-iops-total=100",
        ] {
            assert!(
                graph(&[raw], &[("g", limited)]).own_storage("drive-scsi0").is_none(),
                "{limited}: a limit needs the daemon"
            );
        }
        let qcow =
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/v.qcow2","node-name":"e"},"node-name":"q"}"#;
        assert!(graph(&[qcow], &[]).own_storage("q").is_none());
        let sliced =
            r#"{"driver":"raw","offset":512,"file":{"driver":"file","filename":"/v","node-name":"e"},"node-name":"r"}"#;
        assert!(graph(&[sliced], &[]).own_storage("r").is_none());
    }

    #[test]
    fn cycles_missing_nodes_and_groups_are_refused_naming_the_disk() {
        let b = graph(&["driver=qcow2,node-name=a,file=b", "driver=raw,node-name=b,file=a"], &[]);
        let e = b.graph("vda", "a").unwrap_err();
        assert!(e.starts_with("vda: ") && e.contains("cycle (a -> b -> a)"), "{e}");
        let b = graph(&["driver=qcow2,node-name=a,file=nowhere"], &[]);
        assert_eq!(b.graph("vda", "a").unwrap_err(), "vda: no -blockdev 'nowhere'");
        let b = graph(
            &["driver=file,node-name=x,filename=/f", "driver=throttle,node-name=t,file=x,throttle-group=tg"],
            &[],
        );
        assert!(b.graph("vda", "t").unwrap_err().contains("'tg'"));
        let mut b = Blockdevs::default();
        assert!(b.add("driver=raw", parse("driver=raw")).is_err(), "no node-name");
    }
}
