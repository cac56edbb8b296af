//! libvirt's questions about a domain's disks as block devices: `query-block` (each device and
//! what is inserted in it) and `query-named-block-nodes` (each block node with its image's
//! size). `virsh domblkinfo` reads the capacity from the node the disk's device uses; libvirt
//! names those nodes on the command line and looks them up by the same names here.

use block::spec::{DiskSpec, Graph, Location};
use qemu_shim::argv::Disk;
use qemu_shim::blockdev::DiskGraph;
use qemu_shim::platform::BlockNode;
use serde_json::{json, Value};

/// One disk as libvirt declared it: its device, its block nodes (device's first).
pub struct BlockDisk {
    pub disk: Disk,
    pub nodes: Vec<BlockNode>,
}

/// A disk's size as the guest sees it and the bytes its storage occupies on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub virtual_size: u64,
    pub actual_size: u64,
}

impl Size {
    /// `virtual_size` of the disk, and the bytes allocated to its file if it is a local one
    /// (an NBD export's allocation is the server's: reported as the whole size).
    pub fn of(source: &str, virtual_size: Option<u64>) -> Size {
        use std::os::unix::fs::MetadataExt;
        let meta = (!source.contains("://")).then(|| std::fs::metadata(source).ok()).flatten();
        let virtual_size = virtual_size.or_else(|| meta.as_ref().filter(|m| m.is_file()).map(|m| m.len()));
        let virtual_size = virtual_size.unwrap_or(0);
        let actual_size = meta.filter(|m| m.is_file()).map(|m| m.blocks() * 512).unwrap_or(virtual_size);
        Size { virtual_size, actual_size }
    }
}

/// A disk whose graph qemu-storage-daemon opens, named by its device's id.
pub fn daemon_disk(d: &Disk, g: &DiskGraph) -> DiskSpec {
    DiskSpec {
        location: Location::Path(d.source.clone().into()),
        readonly: d.readonly,
        graph: Some(Graph {
            name: d.id.clone(),
            node: g.node.clone(),
            blockdevs: g.blockdevs.clone(),
            objects: g.objects.clone(),
        }),
        bus: Default::default(),
    }
}

/// The image a node shows: smpft serves raw data itself; a disk qemu-storage-daemon opens shows
/// its image as QEMU's block layer reads it (format, sizes, backing chain).
fn image(d: &BlockDisk, size: Size) -> Value {
    if d.disk.graph.is_some() {
        if let Some(info) = chain_info(&d.disk.source) {
            return info;
        }
    }
    json!({
        "filename": d.disk.source, "format": "raw",
        "virtual-size": size.virtual_size, "actual-size": size.actual_size, "dirty-flag": false,
    })
}

/// `qemu-img info --backing-chain` of an image (shared, so the daemon's lock allows it) as
/// QEMU's `ImageInfo`: each backing file nested as `backing-image` in the one above it.
fn chain_info(file: &str) -> Option<Value> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json", file])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let chain: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
    let keep = [
        "filename",
        "format",
        "virtual-size",
        "actual-size",
        "dirty-flag",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ];
    chain.into_iter().rev().fold(None, |below: Option<Value>, image| {
        let mut m: serde_json::Map<String, Value> = image
            .as_object()?
            .iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        m.entry("dirty-flag").or_insert(json!(false));
        if let Some(b) = below {
            m.insert("backing-image".into(), b);
        }
        Some(Value::Object(m))
    })
}

/// How many backing files are under an image.
fn backing_depth(image: &Value) -> u64 {
    image.get("backing-image").map_or(0, |b| 1 + backing_depth(b))
}

fn node(d: &BlockDisk, n: &BlockNode, size: Size) -> Value {
    let image = image(d, size);
    let mut node = json!({
        "node-name": n.name, "drv": n.driver, "ro": n.readonly || d.disk.readonly, "file": d.disk.source,
        "encrypted": false, "detect_zeroes": "off", "write_threshold": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
    });
    if let Some(b) = image.get("backing-filename") {
        node["backing_file"] = b.clone();
        node["backing_file_depth"] = json!(backing_depth(&image));
    }
    node["image"] = image;
    node
}

/// `query-named-block-nodes`: every node of every disk.
pub fn named_nodes(disks: &[BlockDisk], sizes: &[Size]) -> Value {
    Value::Array(disks.iter().zip(sizes).flat_map(|(d, &s)| d.nodes.iter().map(move |n| node(d, n, s))).collect())
}

/// `query-block`: each disk's device (by its QOM path, as libvirt looks it up) with the node
/// it uses inserted.
pub fn query_block(disks: &[BlockDisk], sizes: &[Size]) -> Value {
    Value::Array(
        disks
            .iter()
            .zip(sizes)
            .map(|(d, &s)| {
                let inserted = match d.nodes.first() {
                    Some(n) => node(d, n, s),
                    None => json!({"node-name": d.disk.node, "drv": "raw", "ro": d.disk.readonly,
                                   "file": d.disk.source, "encrypted": false, "image": image(d, s)}),
                };
                json!({
                    "device": "", "qdev": format!("/machine/peripheral/{}/virtio-backend", d.disk.id),
                    "type": "unknown", "removable": false, "locked": false, "io-status": "ok",
                    "inserted": inserted,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> BlockDisk {
        let node = |name: &str, driver: &str, child: Option<&str>| BlockNode {
            name: name.into(),
            driver: driver.into(),
            child: child.map(Into::into),
            readonly: false,
        };
        BlockDisk {
            disk: Disk {
                id: "virtio-disk0".into(),
                node: "libvirt-1-format".into(),
                source: "/img/a.raw".into(),
                readonly: true,
                slot: None,
                graph: None,
            },
            nodes: vec![
                node("libvirt-1-format", "raw", Some("libvirt-1-storage")),
                node("libvirt-1-storage", "file", None),
            ],
        }
    }

    #[test]
    fn each_node_carries_the_disks_capacity_under_libvirts_names() {
        let size = Size { virtual_size: 32 << 20, actual_size: 4096 };
        let v = named_nodes(&[disk()], &[size]);
        let names: Vec<_> = v.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap()).collect();
        assert_eq!(names, ["libvirt-1-format", "libvirt-1-storage"]);
        for n in v.as_array().unwrap() {
            assert_eq!(n["image"]["virtual-size"], 32 << 20);
            assert_eq!(n["image"]["actual-size"], 4096);
            assert_eq!(n["image"]["format"], "raw");
            assert_eq!(n["ro"], true, "the disk is read-only: {n}");
        }
        let b = query_block(&[disk()], &[size]);
        assert_eq!(b[0]["qdev"], "/machine/peripheral/virtio-disk0/virtio-backend");
        assert_eq!(b[0]["inserted"]["node-name"], "libvirt-1-format");
        assert_eq!(b[0]["inserted"]["image"]["virtual-size"], 32 << 20);
    }

    #[test]
    fn a_local_files_size_and_allocation_come_from_the_file() {
        let dir = std::env::temp_dir().join(format!("smpft-blockinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.raw");
        std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
        let s = Size::of(f.to_str().unwrap(), None);
        assert_eq!(s.virtual_size, 8 << 20);
        assert!(s.actual_size < 8 << 20, "a sparse file occupies less than its size: {s:?}");
        assert_eq!(Size::of("nbd://127.0.0.1:10809/e", Some(1 << 30)).actual_size, 1 << 30);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
