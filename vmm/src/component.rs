//! Components: every part of the VM outside guest memory and the vCPUs whose state must travel
//! with it — into a snapshot, into each FT checkpoint, and back out on `--restore`, on the
//! standby and at go-live.
//!
//! A device is one type implementing [`Component`] (it implements only what it has: the
//! defaults do nothing) and one line registering it where the VM's devices are built
//! (`devices::Devices::new`). The VM keeps its components in one ordered list:
//!
//! 1. At a pause the vCPUs stop first (no port or MMIO access is half done, no vCPU can reach a
//!    device), then each component's [`Component::pause`] runs in list order: it stops taking
//!    host input and raising interrupts, so what it saves is the same instant as the vCPU state
//!    read after it. [`Component::resume`] runs in reverse order before the vCPUs go again.
//! 2. [`Component::save`] runs with everything paused and returns versioned bytes, stored under
//!    the component's [`Component::name`] in [`MachineState`](super::machine::MachineState).
//! 3. [`Component::restore`] receives those bytes (and their version) on a VM built the same
//!    way; a state for a component the VM lacks, or a component with no state, is refused.

/// A component's saved state could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("{component}: state version {version} is not supported (this smpft writes version {current})")]
    Version { component: &'static str, version: u32, current: u32 },
    #[error("{component}: state is malformed: {why}")]
    Malformed { component: &'static str, why: String },
    #[error("{component}: {why}")]
    Failed { component: &'static str, why: String },
}

pub trait Component: Send + Sync {
    /// The key of this component's state: unique in the VM, stable across versions.
    fn name(&self) -> &'static str;

    /// The version of the bytes [`Component::save`] produces.
    fn version(&self) -> u32 {
        1
    }

    /// Stops taking host input and raising interrupts (the vCPUs are already stopped).
    fn pause(&self) {}

    /// Undoes [`Component::pause`].
    fn resume(&self) {}

    /// The component's state, as bytes of [`Component::version`].
    fn save(&self) -> Result<Vec<u8>, ComponentError> {
        Ok(Vec::new())
    }

    /// Takes on a state [`Component::save`] produced at `version`.
    fn restore(&self, version: u32, state: &[u8]) -> Result<(), ComponentError> {
        let _ = (version, state);
        Ok(())
    }
}

/// Encodes a component's state type with rkyv (what most components save).
pub fn encode<T>(component: &'static str, value: &T) -> Result<Vec<u8>, ComponentError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(value)
        .map(|v| v.to_vec())
        .map_err(|e| ComponentError::Failed { component, why: format!("cannot encode state: {e}") })
}

/// Decodes and validates state [`encode`] produced.
pub fn decode<T>(component: &'static str, bytes: &[u8]) -> Result<T, ComponentError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    from_archive(bytes).map_err(|e| ComponentError::Malformed { component, why: e.to_string() })
}

/// Validates and deserializes an rkyv archive from bytes that may not be aligned (a `Vec<u8>`,
/// a frame's body): they are copied to aligned memory first. The one way smpft reads the
/// records it archives (component state, snapshots, the FT layer's messages).
pub fn from_archive<T>(bytes: &[u8]) -> Result<T, rkyv::rancor::Error>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned)
}

/// Refuses a state version other than `current` (for components with one format so far).
pub fn expect_version(component: &'static str, version: u32, current: u32) -> Result<(), ComponentError> {
    if version == current {
        Ok(())
    } else {
        Err(ComponentError::Version { component, version, current })
    }
}
