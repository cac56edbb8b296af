//! What Proxmox VE's `qm` asks a VM's monitor beyond what libvirt asks, answered for smpft.
//!
//! `qm` opens one connection per command (or per queue of commands): `qm status --verbose`
//! sends `query-status`, `query-blockstats`, `query-machines`, `query-version` and
//! `query-balloon` on one connection, then `query-proxmox-support` on another. `qm start` sets
//! the balloon's statistics interval with `qom-set` on `machine/peripheral/balloon0` (a partial
//! QOM path). See the persona (smp-ft) for the answers that need the VM.

use crate::qmp::QmpError;
use serde_json::{json, Map, Value};

/// `query-proxmox-support`: the features of Proxmox VE's own QEMU build this emulator has. smpft
/// has none of them: no Proxmox Backup Server client (so no `pbs-library-version`), no
/// persistent dirty bitmaps for incremental backups (kept across savevm or migration), no
/// backup fleecing, no backup worker count, no backup access API. `qm` and `vzdump` read these
/// flags to decide what to ask for; with them false they ask for none of it.
pub fn proxmox_support() -> Value {
    json!({
        "pbs-dirty-bitmap": false,
        "query-bitmap-info": false,
        "pbs-dirty-bitmap-savevm": false,
        "pbs-dirty-bitmap-migration": false,
        "pbs-masterkey": false,
        "backup-fleecing": false,
        "backup-max-workers": false,
        "backup-access-api": false,
    })
}

/// The answer to `name` if it is one of the questions of this module; `None` for anything else.
pub fn answer(name: &str, _args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
    match name {
        "query-proxmox-support" => Some(Ok(proxmox_support())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smpft_claims_none_of_proxmoxs_backup_features() {
        let v = answer("query-proxmox-support", &Map::new()).unwrap().unwrap();
        let flags = v.as_object().unwrap();
        for key in ["pbs-dirty-bitmap", "pbs-dirty-bitmap-savevm", "query-bitmap-info", "pbs-masterkey"] {
            assert_eq!(flags[key], false, "{key}");
        }
        assert!(flags.values().all(|f| f == false), "{v}");
        assert!(flags.get("pbs-library-version").is_none(), "no PBS library is linked");
        assert!(answer("query-pbs-bitmap-info", &Map::new()).is_none());
    }
}
