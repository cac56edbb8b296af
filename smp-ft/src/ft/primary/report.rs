//! What the primary says of itself: QMP `x-smpft-query-ft` and its state names.

use super::PrimaryFt;
use crate::ft::protocol::PrimaryState;
use crate::observe::Role;
use crate::vmm::RunningVm;
use serde_json::{json, Value};

impl PrimaryFt {
    pub(super) fn state_name(&self) -> &'static str {
        match self.proto.state() {
            PrimaryState::Unprotected if self.took_over => "live-after-failover",
            PrimaryState::Unprotected => "unprotected",
            PrimaryState::Syncing => "syncing",
            PrimaryState::Protected if self.proto.syncing() || self.sync.is_some() => "syncing",
            PrimaryState::Protected => "protected",
            PrimaryState::HandingOver => "switching-over",
            PrimaryState::Replacing => "replacing-standby",
            PrimaryState::Arbitrating => "arbitrating",
            PrimaryState::SwitchedOver => "switched-over",
            PrimaryState::Halted => "halted",
        }
    }

    /// Tells the observer (metrics, event hooks) the state now.
    pub(super) fn publish(&self) {
        let peer = self.link.as_ref().map(|l| l.peer).or(self.proto.spares().current()).map(|p| p.to_string());
        crate::observe::get().state(Role::Primary, self.state_name(), self.proto.generation(), peer);
    }

    /// QMP `x-smpft-query-ft`.
    pub fn query(&self, vm: &RunningVm) -> Value {
        let mut v = self.stats.to_json();
        let gate = &vm.devices().gate;
        let hold = gate.hold_latency();
        v["role"] = json!("primary");
        v["state"] = json!(self.state_name());
        v["epoch"] = json!(self.proto.acked().unwrap_or(0));
        v["generation"] = json!(self.proto.generation());
        let spares = self.proto.spares();
        v["peer"] = json!(self.link.as_ref().map(|l| l.peer).or(spares.current()).map(|p| p.to_string()));
        v["spares"] = json!(spares.all().iter().map(|a| a.to_string()).collect::<Vec<_>>());
        v["held-bytes"] = json!(gate.held_bytes());
        v["disk-write-bytes-streamed"] = json!(self.disk_log.streamed_bytes());
        v["disk-write-bytes-in-flight"] = json!(self.disk_log.in_flight());
        let (budget, peak) = self.disk_log.peak();
        v["disk-log-budget-bytes"] = json!(budget);
        v["disk-log-peak-bytes"] = json!(peak);
        v["output-hold-p50-us"] = json!(hold.map(|h| h.0.as_micros() as u64));
        v["output-hold-p99-us"] = json!(hold.map(|h| h.1.as_micros() as u64));
        v["last-error"] = json!(self.last_error);
        v["standbys-replaced"] = json!(self.replaced);
        v["nics"] = crate::ft::stats::nics(vm);
        v["detector"] = json!(self.link.as_ref().map(|l| crate::ft::link::detector_json(&l.chan)));
        v["tiebreak"] = self.tiebreak.status().to_json();
        crate::observe::get().query(&mut v);
        if let Some(s) = &self.sync {
            v["sync-round"] = json!(s.round);
            v["sync-bytes"] = json!(s.bytes);
        }
        v
    }
}
