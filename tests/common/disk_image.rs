//! Disk images the boot-from-disk tests build without mounting anything: ext4 file systems made
//! from a directory (`mkfs.ext4 -d`), touched up with `debugfs` where a test needs what no
//! directory can hold (a directory loop, a file claiming 4 GiB), laid into a GPT or MBR disk
//! partitioned with `sfdisk`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub enum Content {
    Bytes(Vec<u8>),
    Copy(PathBuf),
    Symlink(String),
}

/// One ext4 file system: its files, UUID, and debugfs commands run on it after mkfs.
#[derive(Default)]
pub struct Fs {
    pub files: Vec<(String, Content)>,
    pub uuid: Option<String>,
    pub debugfs: Vec<String>,
    /// Bytes to write into the file system image after it is made (a corruption).
    pub patch: Option<(u64, Vec<u8>)>,
}

impl Fs {
    pub fn file(mut self, path: &str, content: Content) -> Fs {
        self.files.push((path.to_string(), content));
        self
    }
    pub fn text(self, path: &str, text: &str) -> Fs {
        self.file(path, Content::Bytes(text.as_bytes().to_vec()))
    }
    pub fn uuid(mut self, uuid: &str) -> Fs {
        self.uuid = Some(uuid.to_string());
        self
    }
    pub fn debugfs(mut self, cmd: &str) -> Fs {
        self.debugfs.push(cmd.to_string());
        self
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Table {
    Gpt,
    Mbr,
}

fn run(cmd: &mut Command) {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/setup: it installs fdisk and e2fsprogs)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn make_fs(dir: &Path, n: usize, fs: &Fs) -> (PathBuf, u64) {
    let root = dir.join(format!("fs{n}"));
    std::fs::create_dir_all(&root).unwrap();
    let mut bytes = 0;
    for (path, content) in &fs.files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match content {
            Content::Bytes(b) => {
                bytes += b.len() as u64;
                std::fs::write(&p, b).unwrap();
            }
            Content::Copy(from) => bytes += std::fs::copy(from, &p).unwrap(),
            Content::Symlink(to) => std::os::unix::fs::symlink(to, &p).unwrap(),
        }
    }
    let mib = (bytes >> 20) + (bytes >> 23) + 16;
    let image = dir.join(format!("fs{n}.img"));
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-d"]).arg(&root);
    if let Some(u) = &fs.uuid {
        mkfs.args(["-U", u]);
    }
    run(mkfs.arg(&image).arg(format!("{mib}M")));
    for cmd in &fs.debugfs {
        run(Command::new("debugfs").args(["-w", "-R", cmd]).arg(&image));
    }
    if let Some((at, bytes)) = &fs.patch {
        let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, *at).unwrap();
    }
    (image, mib)
}

/// A disk image in `dir` with `table` and one partition per file system, in order.
pub fn build(dir: &Path, table: Table, parts: &[Fs]) -> PathBuf {
    let images: Vec<(PathBuf, u64)> = parts.iter().enumerate().map(|(i, fs)| make_fs(dir, i, fs)).collect();
    let disk = dir.join("disk.img");
    let total: u64 = images.iter().map(|i| i.1).sum::<u64>() + 2;
    std::fs::File::create(&disk).unwrap().set_len(total << 20).unwrap();
    let mut script = format!("label: {}\n", if table == Table::Gpt { "gpt" } else { "dos" });
    let mut start = 1;
    for (_, mib) in &images {
        script.push_str(&format!("start={}, size={}, type=L\n", start << 11, mib << 11));
        start += mib;
    }
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (run scripts/setup: it installs fdisk)");
    std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(sfdisk.stdin.take());
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed on {script}");
    let mut start = 1;
    for (image, mib) in &images {
        run(Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={start}")));
        start += mib;
        std::fs::remove_file(image).unwrap();
    }
    disk
}
