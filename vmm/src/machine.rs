//! The state of a whole machine at one instant, outside guest memory: every vCPU, the in-kernel
//! devices and clock, and every component. One type for snapshot files and FT checkpoints, and
//! one way back ([`crate::Vm::from_state`]) for `--restore`, the standby and go-live.

use super::state::{VcpuState, VmState};

/// One component's saved state (see [`super::component::Component`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ComponentState {
    pub name: String,
    pub version: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MachineState {
    pub cpus: Vec<VcpuState>,
    pub vm: VmState,
    /// In the VM's component order.
    pub components: Vec<ComponentState>,
}

impl MachineState {
    pub fn component(&self, name: &str) -> Option<&ComponentState> {
        self.components.iter().find(|c| c.name == name)
    }
}
