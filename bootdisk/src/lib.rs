//! smpft's boot loader: what a VM's own disk says to boot.
//!
//! A cloud image carries its kernel and initrd in `/boot` and its command line in GRUB's
//! configuration or in Boot Loader Specification entries. This crate finds them as a boot
//! loader would: the partition table (`parts`: GPT, MBR), the ext2/3/4 file systems on it
//! (`fs`, through the `ext4-view` crate), BLS entries (`bls`) or else `grub.cfg` (`grub`), and
//! the default entry's kernel, initrds and arguments. The disk's contents are the guest's, so
//! [`sandbox`] runs all of that in a child process without privileges under seccomp, with the
//! [`Limits`] below; the parent only serves it the disk's blocks and takes the result.

pub mod bls;
pub mod fs;
pub mod grub;
pub mod parts;
pub mod sandbox;

use std::time::Duration;

/// The partition a file is on, as a boot entry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// The partition the configuration was found on.
    Here,
    /// The partition with this number.
    Part(u32),
    /// The file system with this UUID (`search --fs-uuid`).
    Uuid(String),
    /// The file system with this label (`search --label`).
    Label(String),
    /// The first file system holding this file (`search --file`).
    File(String),
}

/// A file a boot entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub device: Device,
    pub path: String,
}

/// The default boot entry, as its configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    pub kernel: FileRef,
    pub initrds: Vec<FileRef>,
    /// The kernel's arguments.
    pub args: String,
}

/// What the disk boots: the files read, and what to say about them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Booted {
    /// The partition the kernel is on (0: a disk without a partition table).
    pub partition: u32,
    /// Where the entry came from: `/boot/grub/grub.cfg` or a BLS entry's path.
    pub config: String,
    pub title: String,
    pub kernel_path: String,
    pub initrd_paths: Vec<String>,
    pub cmdline: String,
    pub kernel: Vec<u8>,
    /// The initrds, concatenated (each padded to 4 bytes, as GRUB does).
    pub initrd: Vec<u8>,
}

/// How much the reader may read and how long it may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest kernel.
    pub kernel: u64,
    /// Largest initrds, together.
    pub initrd: u64,
    /// Largest configuration file (`grub.cfg`, `grubenv`, a BLS entry).
    pub config: u64,
    /// Most BLS entries looked at.
    pub entries: usize,
    /// Most components in a path (directory depth).
    pub path_depth: usize,
    /// Most bytes read from the disk, metadata included.
    pub total: u64,
    /// Longest the reader may take.
    pub time: Duration,
    /// Most memory the reader's process may map.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            kernel: 128 << 20,
            initrd: 1 << 30,
            config: 1 << 20,
            entries: 256,
            path_depth: 32,
            total: 3 << 30,
            time: Duration::from_secs(120),
            memory: 1 << 30,
        }
    }
}

/// Why the disk cannot be booted from: one line, naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the disk: {0}")]
    Disk(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Limit(String),
    #[error("the disk reader failed: {0}")]
    Reader(String),
}

/// A disk the reader reads: its size and its bytes.
pub trait Disk {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

impl Disk for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len() as u64);
        let Some(end) = end else { return Err(format!("read past the end of the disk at {offset}")) };
        buf.copy_from_slice(&self[offset as usize..end as usize]);
        Ok(())
    }
}

/// Reads what `disk` boots, in this process: for tests and fuzzing, and for the sandboxed
/// child ([`sandbox`] is the way to call it on a real disk).
pub fn read_boot(disk: std::rc::Rc<dyn Disk>, limits: &Limits) -> Result<Booted, BootError> {
    let mut booted = Booted::default();
    fs::find(disk, limits, &mut |chunk: fs::Chunk| {
        match chunk {
            fs::Chunk::Kernel(b) => booted.kernel.extend_from_slice(b),
            fs::Chunk::Initrd(b) => booted.initrd.extend_from_slice(b),
        }
        Ok(())
    })
    .map(|meta| Booted { kernel: booted.kernel, initrd: booted.initrd, ..meta })
}
