//! The file systems on the disk (ext2/3/4, through `ext4-view`), where the boot
//! configuration is, and reading the files the default entry names within the [`Limits`].

use crate::parts::{self, Partition};
use crate::{bls, grub, BootError, Booted, Device, Disk, Entry, FileRef, Limits};
use ext4_view::{Ext4, Ext4Error, Ext4Read};
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// A piece of a file being read, handed to the caller as it comes.
pub enum Chunk<'a> {
    Kernel(&'a [u8]),
    Initrd(&'a [u8]),
}

/// Where BLS entries live, relative to the directory their paths are relative to.
const BLS_BASES: &[&str] = &["/boot", ""];
const GRUB_CFGS: &[&str] = &["/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub2/grub.cfg"];
const GRUBENVS: &[&str] = &["/boot/grub/grubenv", "/grub/grubenv", "/boot/grub2/grubenv", "/grub2/grubenv"];

/// The disk with a budget of bytes.
struct Counted {
    disk: Rc<dyn Disk>,
    left: Cell<u64>,
}

impl Disk for Counted {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let left = self.left.get().checked_sub(buf.len() as u64);
        let Some(left) = left else { return Err("read more of the disk than the reader may".into()) };
        self.left.set(left);
        self.disk.read_at(offset, buf)
    }
}

/// One partition's bytes, for `ext4-view`.
struct PartReader {
    disk: Rc<dyn Disk>,
    part: Partition,
}

impl Ext4Read for PartReader {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start.checked_add(dst.len() as u64).filter(|&e| e <= self.part.len);
        if end.is_none() {
            return Err(format!("read past the end of partition {} at {start}", self.part.number).into());
        }
        Ok(self.disk.read_at(self.part.start + start, dst)?)
    }
}

struct Fs {
    number: u32,
    fs: Ext4,
}

fn is_ext(disk: &dyn Disk, p: &Partition) -> bool {
    let mut magic = [0; 2];
    p.len > 2048 && disk.read_at(p.start + 1024 + 56, &mut magic).is_ok() && magic == [0x53, 0xef]
}

/// Finds the default entry on `disk`, hands its files to `sink` and says what it booted (the
/// returned value's `kernel` and `initrd` are empty: they went to `sink`).
pub fn find(
    disk: Rc<dyn Disk>,
    limits: &Limits,
    sink: &mut dyn FnMut(Chunk) -> Result<(), BootError>,
) -> Result<Booted, BootError> {
    let disk: Rc<dyn Disk> = Rc::new(Counted { disk, left: Cell::new(limits.total) });
    let mut filesystems = Vec::new();
    let mut errors = Vec::new();
    for part in parts::partitions(&*disk)? {
        if !is_ext(&*disk, &part) {
            continue;
        }
        match Ext4::load(Box::new(PartReader { disk: disk.clone(), part })) {
            Ok(fs) => filesystems.push(Fs { number: part.number, fs }),
            Err(e) => errors.push(format!("partition {}: the ext2/3/4 file system is unreadable: {e}", part.number)),
        }
    }
    for (i, fs) in filesystems.iter().enumerate() {
        if let Some((entry, config)) = boot_config(fs, limits)? {
            return load(&filesystems, i, entry, config, limits, sink);
        }
    }
    Err(match errors.into_iter().next() {
        Some(e) => BootError::Invalid(e),
        None if filesystems.is_empty() => BootError::NotFound("the disk has no ext2/3/4 file system".into()),
        None => BootError::NotFound(
            "no file system on the disk has Boot Loader Specification entries (loader/entries) or a grub.cfg".into(),
        ),
    })
}

fn fs_err(fs: &Fs, path: &str, e: Ext4Error) -> BootError {
    match e {
        Ext4Error::NotFound => BootError::NotFound(format!("partition {}: {path} does not exist", fs.number)),
        e => BootError::Invalid(format!("partition {}: {path}: {e}", fs.number)),
    }
}

/// A file's bytes, if it is a regular file of at most `max` bytes.
fn read_file(fs: &Fs, path: &str, max: u64, limits: &Limits) -> Result<Vec<u8>, BootError> {
    let mut file = open(fs, path, max, limits)?;
    let mut out = Vec::new();
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = file.read_bytes(&mut buf).map_err(|e| fs_err(fs, path, e))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn open(fs: &Fs, path: &str, max: u64, limits: &Limits) -> Result<ext4_view::File, BootError> {
    if path.split('/').filter(|c| !c.is_empty()).count() > limits.path_depth {
        let why = format!("partition {}: {path} is deeper than {} directories", fs.number, limits.path_depth);
        return Err(BootError::Limit(why));
    }
    let file = fs.fs.open(path).map_err(|e| fs_err(fs, path, e))?;
    let len = file.metadata().len();
    if len > max {
        let why = format!("partition {}: {path} is {len} bytes, more than the {max} smpft reads", fs.number);
        return Err(BootError::Limit(why));
    }
    Ok(file)
}

fn exists(fs: &Fs, path: &str) -> bool {
    fs.fs.exists(path).unwrap_or(false)
}

fn text(fs: &Fs, path: &str, limits: &Limits) -> Result<String, BootError> {
    Ok(String::from_utf8_lossy(&read_file(fs, path, limits.config, limits)?).into_owned())
}

fn grubenv(fs: &Fs, limits: &Limits) -> Result<HashMap<String, String>, BootError> {
    match GRUBENVS.iter().find(|p| exists(fs, p)) {
        Some(p) => Ok(bls::grubenv(&text(fs, p, limits)?)),
        None => Ok(HashMap::new()),
    }
}

/// The default entry on `fs` and the configuration it comes from, if `fs` has one.
fn boot_config(fs: &Fs, limits: &Limits) -> Result<Option<(Entry, String)>, BootError> {
    if let Some(found) = bls_entries(fs, limits)? {
        return Ok(Some(found));
    }
    let Some(cfg) = GRUB_CFGS.iter().find(|p| exists(fs, p)) else { return Ok(None) };
    let source = text(fs, cfg, limits)?;
    let stmts = grub::parse::parse(&source)?;
    let exists = |p: &str| exists(fs, p);
    let prefix = cfg.trim_end_matches("/grub.cfg").to_string();
    let env = grub::Env { prefix, grubenv: grubenv(fs, limits)?, exists: &exists };
    match grub::default_entry(&source, &stmts, &env)? {
        Some(entry) => Ok(Some((entry, format!("partition {}:{cfg}", fs.number)))),
        None => Err(BootError::NotFound(format!(
            "partition {}:{cfg} makes its menu with blscfg, and there are no Boot Loader Specification entries",
            fs.number
        ))),
    }
}

fn bls_entries(fs: &Fs, limits: &Limits) -> Result<Option<(Entry, String)>, BootError> {
    for base in BLS_BASES {
        let dir = format!("{base}/loader/entries");
        if !fs.fs.metadata(dir.as_str()).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let mut names = Vec::new();
        for e in fs.fs.read_dir(dir.as_str()).map_err(|e| fs_err(fs, &dir, e))? {
            let e = e.map_err(|e| fs_err(fs, &dir, e))?;
            let name = e.file_name().as_str().unwrap_or("").to_string();
            if let Some(id) = name.strip_suffix(".conf") {
                names.push(id.to_string());
            }
            if names.len() > limits.entries {
                let why = format!("partition {}: {dir} has more than {} entries", fs.number, limits.entries);
                return Err(BootError::Limit(why));
            }
        }
        if names.is_empty() {
            continue;
        }
        let mut entries = Vec::new();
        for id in &names {
            entries.push(bls::parse(id, &text(fs, &format!("{dir}/{id}.conf"), limits)?));
        }
        let mut entry = bls::default_entry(entries, &grubenv(fs, limits)?)?;
        for f in std::iter::once(&mut entry.kernel).chain(entry.initrds.iter_mut()) {
            f.path = format!("{base}{}", f.path);
        }
        return Ok(Some((entry, format!("partition {}:{dir}", fs.number))));
    }
    Ok(None)
}

/// The file system `device` names (`here` is the configuration's).
fn resolve<'f>(filesystems: &'f [Fs], here: usize, device: &Device, title: &str) -> Result<&'f Fs, BootError> {
    let found = match device {
        Device::Here => filesystems.get(here),
        Device::Part(n) => filesystems.iter().find(|f| f.number == *n),
        Device::Uuid(u) => filesystems.iter().find(|f| f.fs.uuid().to_string().eq_ignore_ascii_case(u)),
        Device::Label(l) => filesystems.iter().find(|f| f.fs.label().to_str().is_ok_and(|x| x == l)),
        Device::File(p) => filesystems.iter().find(|f| exists(f, p)),
    };
    let what = match device {
        Device::Here => "the configuration's partition".to_string(),
        Device::Part(n) => format!("partition {n}"),
        Device::Uuid(u) => format!("a file system with UUID {u}"),
        Device::Label(l) => format!("a file system labelled {l}"),
        Device::File(p) => format!("a file system holding {p}"),
    };
    found.ok_or_else(|| BootError::NotFound(format!("the entry '{title}' needs {what}, which the disk does not have")))
}

fn load(
    filesystems: &[Fs],
    here: usize,
    entry: Entry,
    config: String,
    limits: &Limits,
    sink: &mut dyn FnMut(Chunk) -> Result<(), BootError>,
) -> Result<Booted, BootError> {
    let kfs = resolve(filesystems, here, &entry.kernel.device, &entry.title)?;
    stream(kfs, &entry.kernel, limits.kernel, limits, &mut |b| sink(Chunk::Kernel(b)))?;
    let mut left = limits.initrd;
    for initrd in &entry.initrds {
        let fs = resolve(filesystems, here, &initrd.device, &entry.title)?;
        let n = stream(fs, initrd, left, limits, &mut |b| sink(Chunk::Initrd(b)))?;
        let pad = n.next_multiple_of(4) - n;
        sink(Chunk::Initrd(&[0; 4][..pad as usize]))?;
        left = left.saturating_sub(n + pad);
    }
    Ok(Booted {
        partition: kfs.number,
        config,
        title: entry.title,
        kernel_path: entry.kernel.path,
        initrd_paths: entry.initrds.into_iter().map(|f| f.path).collect(),
        cmdline: entry.args,
        ..Booted::default()
    })
}

fn stream(
    fs: &Fs,
    file: &FileRef,
    max: u64,
    limits: &Limits,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), BootError>,
) -> Result<u64, BootError> {
    let mut f = open(fs, &file.path, max, limits)?;
    let mut buf = vec![0; 256 << 10];
    let mut total = 0;
    loop {
        let n = f.read_bytes(&mut buf).map_err(|e| fs_err(fs, &file.path, e))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        sink(&buf[..n])?;
    }
}
