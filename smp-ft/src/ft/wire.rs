//! What the FT engine puts on the logging channel: the peers' Hello metadata, and checkpoint
//! payloads (rkyv archives, validated with bytecheck before anything is applied).
//!
//! Payloads are numbered by the channel's sequence numbers. Pre-copy rounds come first (memory
//! only); the synchronising checkpoint that ends them carries the whole device and vCPU state,
//! and so does every epoch checkpoint after it. A checkpoint's sequence number is its epoch.

use super::encode::{DecodeError, Decoded, EncodeStats, EncodedPages, Encoder};
pub use crate::vmm::machine::MachineState;
use crate::vmm::pages::MemoryPages;
use block::op::{self, Op, OpRef};
use block::Backend;
use bytes::Bytes;
use std::sync::Arc;
use transport::CheckpointData;

mod streamed;
pub use streamed::{OpGather, StreamOut, StreamedOp, GATHER, STREAM_HEAD};

/// A payload or peer description that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad peer metadata: {0}")]
    Meta(String),
    #[error("cannot encode checkpoint: {0}")]
    Encode(String),
    #[error("checkpoint {seq} is malformed: {why}")]
    Malformed { seq: u64, why: String },
    #[error("checkpoint {seq} says it is {says}")]
    Sequence { seq: u64, says: u64 },
    #[error("checkpoint {seq}: {source}")]
    Pages { seq: u64, source: DecodeError },
    #[error("checkpoint {seq}: disk op {index} ({what}) is outside disk {disk}")]
    DiskOp { seq: u64, index: usize, disk: u32, what: String },
    #[error("checkpoint {seq}: writing disk {disk} failed: {why}")]
    DiskWrite { seq: u64, disk: u32, why: String },
    #[error("checkpoint {seq} lacks the machine state")]
    NoState { seq: u64 },
    #[error("pre-copy round {seq} carries machine state")]
    UnexpectedState { seq: u64 },
    #[error("checkpoint {seq} has {got} vCPU states for {want} vCPUs")]
    Vcpus { seq: u64, got: usize, want: u32 },
    #[error("checkpoint state: {0}")]
    State(String),
    #[error("applying a checkpoint: {0}")]
    Apply(String),
}

/// The shape of the VM on each side, and the tie-breaker generation the sender knows.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Meta {
    pub vcpus: u32,
    pub mem_size: u64,
    pub generation: u64,
    /// Who is speaking (host and VM), for logs.
    pub owner: String,
    /// The optional devices (`DeviceConfig::summary`): both copies must have the same.
    pub devices: String,
    /// Each disk's size in bytes: both copies must have the same.
    pub disks: Vec<u64>,
    /// (A standby's) the digests of its disks follow the Hello, in an [`APP_DIGESTS`] message:
    /// the initial copy sends only the blocks that differ (`--disk-sync compare`).
    pub digests: bool,
    /// The guest's CPUID before per-vCPU details, one `[function, index, eax, ebx, ecx, edx]`
    /// a leaf: both copies must present the same CPU to the guest (wire version 3 and later).
    pub cpuid: Vec<[u32; 6]>,
}

/// CPUID leaves as [`Meta`] carries them.
pub fn cpuid_words(leaves: &[cpu_model::Leaf]) -> Vec<[u32; 6]> {
    leaves.iter().map(|l| [l.function, l.index, l.eax, l.ebx, l.ecx, l.edx]).collect()
}

fn cpuid_leaves(words: &[[u32; 6]]) -> Vec<cpu_model::Leaf> {
    words
        .iter()
        .map(|&[function, index, eax, ebx, ecx, edx]| cpu_model::Leaf { function, index, eax, ebx, ecx, edx })
        .collect()
}

/// The FT layer's own messages on the channel (`Message::App` kinds).
pub const APP_DIGESTS: u16 = 1;
/// A planned switchover ([`HandOver`]), from the primary; wire version 2 and later.
pub const APP_SWITCHOVER: u16 = 2;
/// A snapshot of the standby's committed copy, asked by the primary ([`SnapshotRequest`]).
pub const APP_SNAPSHOT: u16 = 3;
/// Its outcome, from the standby ([`SnapshotDone`]).
pub const APP_SNAPSHOT_DONE: u16 = 4;
/// A completed disk write (or flush, discard, zeroing) streamed as it completed
/// ([`StreamedOp`]), from the primary, in a data frame; wire version 4 and later.
pub const APP_DISK_OPS: u16 = 5;
/// How many streamed disk ops checkpoint `epoch` covers ([`DiskSeal`]), sent before it.
pub const APP_DISK_SEAL: u16 = 6;
/// How long the standby took over a checkpoint ([`CheckpointTimes`]), sent before its Ack.
pub const APP_CHECKPOINT_TIMES: u16 = 7;
/// The wire version that brought streamed disk ops (and [`APP_CHECKPOINT_TIMES`]).
pub const STREAM_VERSION: u32 = 4;
/// The wire version that brought [`APP_SWITCHOVER`] and the snapshot messages.
pub const SWITCHOVER_VERSION: u32 = 2;
/// The wire version that brought [`Meta::cpuid`].
pub const CPUID_VERSION: u32 = 3;

/// Encodes an FT-layer message for `Message::App`.
pub fn encode_app<T>(v: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(v).map(|v| v.to_vec()).unwrap_or_default()
}

/// Decodes an FT-layer message from `Message::App`.
pub fn decode_app<T>(b: &[u8], what: &str) -> Result<T, WireError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    crate::vmm::component::from_archive(b).map_err(|e| WireError::Meta(format!("{what}: {e}")))
}

/// The primary asks its standby for a snapshot of the committed copy, written to `file` on the
/// standby's host.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SnapshotRequest {
    pub id: u64,
    pub file: String,
    /// End the exports of the snapshot at `file` instead of taking one.
    pub release: bool,
}

/// How the snapshot `id` went: the QMP reply (JSON text) or why it failed.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SnapshotDone {
    pub id: u64,
    pub result: Result<String, String>,
}

/// The standby's time over checkpoint `epoch`: checking it, before its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CheckpointTimes {
    pub epoch: u64,
    pub validate_us: u64,
}

/// Checkpoint `epoch`, which follows, covers streamed disk ops `0..through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DiskSeal {
    pub epoch: u64,
    pub through: u64,
}

/// Checks disk ops against the sizes of the disks they name (`seq` names them in the error).
pub fn check_ops<'a>(seq: u64, ops: impl Iterator<Item = (u32, OpRef<'a>)>, disks: &[u64]) -> Result<(), WireError> {
    for (index, (disk, op)) in ops.enumerate() {
        let range = op.range();
        if !disks.get(disk as usize).is_some_and(|&size| op::fits(range, size)) {
            let what = range.map_or("flush".into(), |(o, l)| format!("{l} bytes at {o:#x}"));
            return Err(WireError::DiskOp { seq, index, disk, what });
        }
    }
    Ok(())
}

/// Writes disk ops to `disks`, in order (straight from received bytes; `seq` names them in
/// errors). Runs of writes to one disk whose ranges do not overlap go to the backend as one
/// batch (an NBD server then has them in flight together).
pub fn write_ops<'a>(
    seq: u64,
    ops: impl Iterator<Item = (u32, OpRef<'a>)>,
    disks: &[Arc<dyn Backend>],
) -> Result<(), WireError> {
    let fail = |disk: u32, why: String| WireError::DiskWrite { seq, disk, why };
    let target = |disk: u32| disks.get(disk as usize).ok_or_else(|| fail(disk, "no such disk".into()));
    let mut batch: Vec<(u64, &[u8])> = Vec::new();
    let mut batch_disk = 0u32;
    let flush_batch = |batch: &mut Vec<(u64, &[u8])>, disk: u32| -> Result<(), WireError> {
        if !batch.is_empty() {
            target(disk)?.write_batch(batch).map_err(|e| fail(disk, crate::error::error_chain(&e)))?;
            batch.clear();
        }
        Ok(())
    };
    for (disk, op) in ops {
        if let OpRef::Write { offset, data } = op {
            let end = offset + data.len() as u64;
            let overlaps = batch.iter().any(|&(o, d)| o < end && offset < o + d.len() as u64);
            if disk != batch_disk || overlaps || batch.len() >= 64 {
                flush_batch(&mut batch, batch_disk)?;
                batch_disk = disk;
            }
            batch.push((offset, data));
            continue;
        }
        flush_batch(&mut batch, batch_disk)?;
        op.apply(&**target(disk)?).map_err(|e| fail(disk, crate::error::error_chain(&e)))?;
    }
    flush_batch(&mut batch, batch_disk)
}

/// Bytes of write data in disk ops.
pub fn data_bytes<'a>(ops: impl Iterator<Item = OpRef<'a>>) -> u64 {
    ops.map(|op| op.bytes() as u64).sum()
}

/// The primary hands the VM over: it is paused after checkpoint `epoch`, which the standby has
/// acknowledged, and the tie-breaker names the standby at `generation`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HandOver {
    pub epoch: u64,
    pub generation: u64,
    /// Where the old primary waits as a standby, to be protected with first (`--then-standby`).
    pub return_to: Option<String>,
}

impl HandOver {
    pub fn encode(&self) -> Vec<u8> {
        encode_app(self)
    }

    pub fn decode(b: &[u8]) -> Result<HandOver, WireError> {
        decode_app(b, "switchover")
    }
}

/// Encodes the standby's disk digests for an [`APP_DIGESTS`] message.
pub fn encode_digests(d: &Vec<disk_mirror::digest::Digest>) -> Result<Vec<u8>, WireError> {
    rkyv::to_bytes::<rkyv::rancor::Error>(d).map(|v| v.to_vec()).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes and checks the standby's disk digests against this side's disk sizes.
pub fn decode_digests(b: &[u8], sizes: &[u64]) -> Result<Vec<disk_mirror::digest::Digest>, WireError> {
    let d: Vec<disk_mirror::digest::Digest> = decode_app(b, "disk digests")?;
    if d.len() != sizes.len() || d.iter().zip(sizes).any(|(d, &s)| !d.fits(s)) {
        return Err(WireError::Meta("disk digests do not describe this VM's disks".into()));
    }
    Ok(d)
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        encode_app(self)
    }

    pub fn decode(b: &[u8]) -> Result<Meta, WireError> {
        decode_app(b, "Hello metadata")
    }

    /// The metadata of a peer that speaks wire `version`: one older than [`CPUID_VERSION`]
    /// sends metadata without the guest's CPUID, which this build cannot read.
    pub fn from_hello(version: u32, b: &[u8]) -> Result<Meta, WireError> {
        Meta::decode(b).map_err(|e| match version < CPUID_VERSION {
            true => WireError::Meta(format!(
                "the peer speaks FT wire version {version}, whose Hello metadata lacks the guest's CPUID: upgrade the peer"
            )),
            false => e,
        })
    }

    /// Why a VM of shape `self` cannot be protected by (or protect) `other`, if it cannot.
    pub fn mismatch(&self, other: &Meta) -> Option<String> {
        let leaves = cpu_model::differences(&cpuid_leaves(&self.cpuid), &cpuid_leaves(&other.cpuid));
        if !leaves.is_empty() {
            return Some(format!(
                "the guest's CPUID differs from the peer's ({}) in leaves {}: give both copies the same CPU model on hosts that offer it",
                other.owner,
                leaves.join(", ")
            ));
        }
        if self.disks != other.disks {
            let sizes = |d: &[u64]| {
                if d.is_empty() {
                    "no disks".to_string()
                } else {
                    d.iter().map(|s| format!("{s} bytes")).collect::<Vec<_>>().join(", ")
                }
            };
            return Some(format!(
                "disks differ: this side has {}, the peer ({}) {}",
                sizes(&self.disks),
                other.owner,
                sizes(&other.disks)
            ));
        }
        if self.devices != other.devices {
            return Some(format!(
                "devices differ: this side has {}, the peer ({}) {}",
                self.devices, other.owner, other.devices
            ));
        }
        (self.vcpus != other.vcpus || self.mem_size != other.mem_size).then(|| {
            format!(
                "VM shape differs: this side has {} vCPUs and {} MiB, the peer ({}) {} vCPUs and {} MiB",
                self.vcpus,
                self.mem_size >> 20,
                other.owner,
                other.vcpus,
                other.mem_size >> 20
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PayloadKind {
    /// A pre-copy round: memory only, the VM kept running while it was copied.
    PreCopy,
    /// The end of the initial synchronisation: after it the standby holds a whole VM.
    Sync,
    /// An epoch checkpoint.
    Epoch,
}

/// A checkpoint or pre-copy round as the primary captured it, before its pages are encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub kind: PayloadKind,
    pub memory: MemoryPages,
    pub state: Option<MachineState>,
    pub disk: Vec<(u32, Op)>,
}

impl Outgoing {
    /// Encodes the pages (on the sender thread, after the vCPUs resumed).
    pub fn encode(self, encoder: &mut Encoder) -> (Payload, EncodeStats) {
        let (memory, stats) = encoder.encode(self.memory);
        (Payload { seq: self.seq, kind: self.kind, memory, state: self.state, disk: self.disk }, stats)
    }
}

/// A checkpoint or pre-copy round as it travels.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Payload {
    pub seq: u64,
    pub kind: PayloadKind,
    pub memory: EncodedPages,
    /// Present for `Sync` and `Epoch`.
    pub state: Option<MachineState>,
    /// Disk changes, in order, each with its disk's number: the initial copy's blocks in
    /// pre-copy rounds and the synchronising checkpoint, the epoch's completed requests in an
    /// epoch checkpoint.
    pub disk: Vec<(u32, Op)>,
}

pub fn encode(p: &Payload) -> Result<Bytes, WireError> {
    let v = rkyv::to_bytes::<rkyv::rancor::Error>(p).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(Bytes::from_owner(v))
}

/// A received payload, checked: an aligned copy of the bytes, accessed in place, and its pages
/// decoded.
pub struct Staged {
    buf: rkyv::util::AlignedVec<16>,
    pages: Decoded,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staged({} bytes)", self.buf.len())
    }
}

impl Staged {
    /// Validates `data` as checkpoint `seq` of a VM with `vcpus` vCPUs, `mem_size` bytes and
    /// disks of `disks` bytes.
    pub fn validate(
        data: &CheckpointData,
        seq: u64,
        vcpus: u32,
        mem_size: u64,
        disks: &[u64],
    ) -> Result<Staged, WireError> {
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
        for s in &data.segments {
            buf.extend_from_slice(s);
        }
        let p = rkyv::access::<ArchivedPayload, rkyv::rancor::Error>(&buf)
            .map_err(|e| WireError::Malformed { seq, why: e.to_string() })?;
        if p.seq.to_native() != seq {
            return Err(WireError::Sequence { seq, says: p.seq.to_native() });
        }
        let pages = p.memory.decode(mem_size).map_err(|source| WireError::Pages { seq, source })?;
        check_ops(seq, p.disk.iter().map(|e| (e.0.to_native(), e.1.view())), disks)?;
        let wants_state = !matches!(p.kind, ArchivedPayloadKind::PreCopy);
        match p.state.as_ref() {
            None if wants_state => return Err(WireError::NoState { seq }),
            Some(_) if !wants_state => return Err(WireError::UnexpectedState { seq }),
            Some(s) if s.cpus.len() != vcpus as usize => {
                return Err(WireError::Vcpus { seq, got: s.cpus.len(), want: vcpus })
            }
            _ => {}
        }
        Ok(Staged { buf, pages })
    }

    fn archived(&self) -> &ArchivedPayload {
        // SAFETY: `validate` checked this buffer with bytecheck, and it is never modified after.
        unsafe { rkyv::access_unchecked::<ArchivedPayload>(&self.buf) }
    }

    pub fn kind(&self) -> PayloadKind {
        match self.archived().kind {
            ArchivedPayloadKind::PreCopy => PayloadKind::PreCopy,
            ArchivedPayloadKind::Sync => PayloadKind::Sync,
            ArchivedPayloadKind::Epoch => PayloadKind::Epoch,
        }
    }

    pub fn pages(&self) -> usize {
        self.pages.count()
    }

    /// Bytes of disk data the payload carries.
    pub fn disk_bytes(&self) -> u64 {
        data_bytes(self.archived().disk.iter().map(|e| e.1.view()))
    }

    /// Writes the payload's disk changes to `disks`, in order (see [`write_ops`]).
    pub fn apply_disk(&self, disks: &[Arc<dyn Backend>]) -> Result<(), WireError> {
        let p = self.archived();
        write_ops(p.seq.to_native(), p.disk.iter().map(|e| (e.0.to_native(), e.1.view())), disks)
    }

    /// Writes the memory pages into `mem` and returns the machine state, if any.
    pub fn apply(&self, mem: &crate::vmm::memory::GuestMemory) -> Result<Option<MachineState>, WireError> {
        let p = self.archived();
        self.pages.apply(mem, p.memory.data.as_slice()).map_err(|e| WireError::Apply(e.to_string()))?;
        match p.state.as_ref() {
            None => Ok(None),
            Some(s) => rkyv::deserialize::<MachineState, rkyv::rancor::Error>(s)
                .map(Some)
                .map_err(|e| WireError::State(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::dirty::PAGE_SIZE;
    use crate::vmm::state::VmState;

    fn payload(seq: u64, kind: PayloadKind, pages: Vec<u64>) -> Payload {
        let data = pages.iter().flat_map(|&p| vec![p as u8 + 1; PAGE_SIZE as usize]).collect();
        let state = (kind != PayloadKind::PreCopy).then(|| MachineState {
            cpus: vec![],
            vm: VmState { pic_master: vec![], pic_slave: vec![], ioapic: vec![], pit: vec![], clock: vec![] },
            components: vec![],
        });
        let memory = EncodedPages::plain(MemoryPages { pages, data, zero_pages: vec![0] });
        Payload { seq, kind, memory, state, disk: vec![] }
    }

    fn data(p: &Payload) -> CheckpointData {
        let b = encode(p).unwrap();
        // Split it, as the channel would deliver it in chunks.
        let mid = b.len() / 3;
        CheckpointData { segments: vec![b.slice(..mid), b.slice(mid..)] }
    }

    #[test]
    fn round_trip_applies_pages() {
        let mem = crate::vmm::memory::GuestMemory::new(1 << 20).unwrap();
        mem.fill(0, 4096, 9).unwrap();
        let p = payload(7, PayloadKind::Epoch, vec![3, 5]);
        let s = Staged::validate(&data(&p), 7, 0, 1 << 20, &[]).unwrap();
        assert_eq!(s.kind(), PayloadKind::Epoch);
        assert_eq!(s.pages(), 3);
        assert!(s.apply(&mem).unwrap().is_some());
        let mut b = [0u8; 1];
        mem.read(3 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 4);
        mem.read(0, &mut b).unwrap();
        assert_eq!(b[0], 0, "zero pages are zeroed");
    }

    #[test]
    fn invalid_payloads_are_refused() {
        let p = payload(7, PayloadKind::Epoch, vec![3]);
        assert!(Staged::validate(&data(&p), 8, 0, 1 << 20, &[]).unwrap_err().to_string().contains("says it is 7"));
        assert!(Staged::validate(&data(&p), 7, 2, 1 << 20, &[]).unwrap_err().to_string().contains("vCPU states"));
        assert!(Staged::validate(&data(&p), 7, 0, 2 * PAGE_SIZE, &[]).unwrap_err().to_string().contains("beyond"));
        let mut pre = payload(1, PayloadKind::PreCopy, vec![1]);
        assert!(Staged::validate(&data(&pre), 1, 0, 1 << 20, &[]).is_ok());
        pre.state = p.state.clone();
        assert!(Staged::validate(&data(&pre), 1, 0, 1 << 20, &[]).unwrap_err().to_string().contains("carries"));
        let mut short = payload(2, PayloadKind::Sync, vec![1, 2]);
        short.memory.data.truncate(100);
        let e = Staged::validate(&data(&short), 2, 0, 1 << 20, &[]).unwrap_err().to_string();
        assert!(e.contains("page lengths add up to 8192 bytes, the data has 100"), "{e}");
        let garbage = CheckpointData { segments: vec![Bytes::from(vec![0xa5u8; 333])] };
        assert!(Staged::validate(&garbage, 1, 0, 1 << 20, &[]).unwrap_err().to_string().contains("malformed"));
    }

    #[test]
    fn disk_ops_are_checked_against_the_disks_and_applied_in_order() {
        let mut p = payload(3, PayloadKind::Epoch, vec![1]);
        p.disk =
            vec![(0, Op::Write { offset: 0, data: vec![7; 8] }), (0, Op::Zeroes { offset: 2, len: 2 }), (0, Op::Flush)];
        let s = Staged::validate(&data(&p), 3, 0, 1 << 20, &[16]).unwrap();
        assert_eq!(s.disk_bytes(), 8);
        let disk: Arc<dyn Backend> = Arc::new(block::backend::MemoryDisk::new(16, 1));
        s.apply_disk(std::slice::from_ref(&disk)).unwrap();
        let mut back = [0u8; 10];
        disk.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [7, 7, 0, 0, 7, 7, 7, 7, 1, 1]);
        let e = Staged::validate(&data(&p), 3, 0, 1 << 20, &[4]).unwrap_err().to_string();
        assert!(e.contains("disk op 0 (8 bytes at 0x0) is outside disk 0"), "{e}");
        assert!(Staged::validate(&data(&p), 3, 0, 1 << 20, &[]).is_err(), "a VM without disks takes no disk ops");
    }

    #[test]
    fn meta_round_trip_and_mismatch() {
        let a = Meta {
            vcpus: 4,
            mem_size: 256 << 20,
            generation: 3,
            owner: "a".into(),
            devices: "none".into(),
            disks: vec![1 << 30],
            digests: false,
            cpuid: vec![[1, 0, 0x806f8, 0, 0x7ffa_3223, 0x178b_fbff], [7, 0, 0, 0x219c_07a9, 0, 0]],
        };
        assert_eq!(Meta::decode(&a.encode()).unwrap(), a);
        assert!(a.mismatch(&a).is_none());
        let b = Meta { vcpus: 2, ..a.clone() };
        assert!(a.mismatch(&b).unwrap().contains("2 vCPUs"));
        let c = Meta { devices: "virtio-rng".into(), ..a.clone() };
        assert!(a.mismatch(&c).unwrap().contains("devices differ"));
        let d = Meta { disks: vec![1 << 20], ..a.clone() };
        assert!(a
            .mismatch(&d)
            .unwrap()
            .contains("disks differ: this side has 1073741824 bytes, the peer (a) 1048576 bytes"));
        assert!(Meta::decode(b"nonsense").is_err());
        assert_eq!(Meta::from_hello(1, &a.encode()).unwrap(), a, "an older version number with this build's metadata");
        assert!(Meta::from_hello(2, b"old").unwrap_err().to_string().contains("version 2, whose Hello metadata lacks"));
        let mut e = Meta { owner: "b".into(), ..a.clone() };
        e.cpuid[1][3] &= !(1 << 5); // no AVX2
        e.cpuid.push([0x8000_0008, 0, 0x3030, 0, 0, 0]);
        assert_eq!(
            a.mismatch(&e).unwrap(),
            "the guest's CPUID differs from the peer's (b) in leaves 0x7.0, 0x80000008.0: give both copies the same CPU model on hosts that offer it"
        );
        let g = vec![disk_mirror::digest::Digest { size: 1 << 20, block: 64 << 10, hashes: vec![[3; 16]; 16] }];
        let bytes = encode_digests(&g).unwrap();
        assert_eq!(decode_digests(&bytes, &[1 << 20]).unwrap(), g);
        assert!(decode_digests(&bytes, &[2 << 20]).is_err(), "another disk size");
        assert!(decode_digests(&bytes, &[]).is_err(), "another disk count");
        assert!(decode_digests(b"junk", &[1 << 20]).is_err());
    }
}
