//! What the FT engine puts on the logging channel: the peers' Hello metadata, and checkpoint
//! payloads (rkyv archives, validated with bytecheck before anything is applied).
//!
//! Payloads are numbered by the channel's sequence numbers. Pre-copy rounds come first (memory
//! only); the synchronising checkpoint that ends them carries the whole device and vCPU state,
//! and so does every epoch checkpoint after it. A checkpoint's sequence number is its epoch.

pub use crate::vmm::machine::MachineState;
use crate::vmm::pages::{MemoryPages, PagesError};
use bytes::Bytes;
use transport::CheckpointData;

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
    Pages { seq: u64, source: PagesError },
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
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|v| v.to_vec()).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Meta, WireError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(b.len());
        aligned.extend_from_slice(b);
        rkyv::from_bytes::<Meta, rkyv::rancor::Error>(&aligned).map_err(|e| WireError::Meta(e.to_string()))
    }

    /// Why a VM of shape `self` cannot be protected by (or protect) `other`, if it cannot.
    pub fn mismatch(&self, other: &Meta) -> Option<String> {
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

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Payload {
    pub seq: u64,
    pub kind: PayloadKind,
    pub memory: MemoryPages,
    /// Present for `Sync` and `Epoch`.
    pub state: Option<MachineState>,
}

pub fn encode(p: &Payload) -> Result<Bytes, WireError> {
    let v = rkyv::to_bytes::<rkyv::rancor::Error>(p).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(Bytes::from_owner(v))
}

/// A received payload, checked: an aligned copy of the bytes, accessed in place.
pub struct Staged {
    buf: rkyv::util::AlignedVec<16>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staged({} bytes)", self.buf.len())
    }
}

impl Staged {
    /// Validates `data` as checkpoint `seq` of a VM with `vcpus` vCPUs and `mem_size` bytes.
    pub fn validate(data: &CheckpointData, seq: u64, vcpus: u32, mem_size: u64) -> Result<Staged, WireError> {
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
        for s in &data.segments {
            buf.extend_from_slice(s);
        }
        let staged = Staged { buf };
        let p = rkyv::access::<ArchivedPayload, rkyv::rancor::Error>(&staged.buf)
            .map_err(|e| WireError::Malformed { seq, why: e.to_string() })?;
        if p.seq.to_native() != seq {
            return Err(WireError::Sequence { seq, says: p.seq.to_native() });
        }
        p.memory.validate(mem_size).map_err(|source| WireError::Pages { seq, source })?;
        let wants_state = !matches!(p.kind, ArchivedPayloadKind::PreCopy);
        match p.state.as_ref() {
            None if wants_state => return Err(WireError::NoState { seq }),
            Some(_) if !wants_state => return Err(WireError::UnexpectedState { seq }),
            Some(s) if s.cpus.len() != vcpus as usize => {
                return Err(WireError::Vcpus { seq, got: s.cpus.len(), want: vcpus })
            }
            _ => {}
        }
        Ok(staged)
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
        self.archived().memory.count()
    }

    /// Writes the memory pages into `mem` and returns the machine state, if any.
    pub fn apply(&self, mem: &crate::vmm::memory::GuestMemory) -> Result<Option<MachineState>, WireError> {
        let p = self.archived();
        p.memory.apply(mem).map_err(|e| WireError::Apply(e.to_string()))?;
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
        Payload { seq, kind, memory: MemoryPages { pages, data, zero_pages: vec![0] }, state }
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
        let s = Staged::validate(&data(&p), 7, 0, 1 << 20).unwrap();
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
        assert!(Staged::validate(&data(&p), 8, 0, 1 << 20).unwrap_err().to_string().contains("says it is 7"));
        assert!(Staged::validate(&data(&p), 7, 2, 1 << 20).unwrap_err().to_string().contains("vCPU states"));
        assert!(Staged::validate(&data(&p), 7, 0, 2 * PAGE_SIZE).unwrap_err().to_string().contains("beyond"));
        let mut pre = payload(1, PayloadKind::PreCopy, vec![1]);
        assert!(Staged::validate(&data(&pre), 1, 0, 1 << 20).is_ok());
        pre.state = p.state.clone();
        assert!(Staged::validate(&data(&pre), 1, 0, 1 << 20).unwrap_err().to_string().contains("carries"));
        let mut short = payload(2, PayloadKind::Sync, vec![1, 2]);
        short.memory.data.truncate(100);
        assert!(Staged::validate(&data(&short), 2, 0, 1 << 20).unwrap_err().to_string().contains("bytes of data"));
        let garbage = CheckpointData { segments: vec![Bytes::from(vec![0xa5u8; 333])] };
        assert!(Staged::validate(&garbage, 1, 0, 1 << 20).unwrap_err().to_string().contains("malformed"));
    }

    #[test]
    fn meta_round_trip_and_mismatch() {
        let a = Meta { vcpus: 4, mem_size: 256 << 20, generation: 3, owner: "a".into(), devices: "none".into() };
        assert_eq!(Meta::decode(&a.encode()).unwrap(), a);
        assert!(a.mismatch(&a).is_none());
        let b = Meta { vcpus: 2, ..a.clone() };
        assert!(a.mismatch(&b).unwrap().contains("2 vCPUs"));
        let c = Meta { devices: "virtio-rng".into(), ..a.clone() };
        assert!(a.mismatch(&c).unwrap().contains("devices differ"));
        assert!(Meta::decode(b"nonsense").is_err());
    }
}
