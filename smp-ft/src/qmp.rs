//! smpft's own QMP commands, typed. The QMP server (qemu-shim) knows QEMU's lifecycle commands
//! and hands every other one over as it came; the primary, the standby and the QEMU persona
//! all read smpft's from there with [`SmpftCommand::parse`], and answer them as their role
//! allows.

use qemu_shim::qmp::{typed, QmpError};
use serde_json::{Map, Value};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "execute", content = "arguments", deny_unknown_fields)]
pub enum SmpftCommand {
    /// The fault-tolerance role, state and figures.
    #[serde(rename = "x-smpft-query-ft")]
    QueryFt,
    /// Attach a standby at `peer` (host:port) to this unprotected VM. `settings`: fault
    /// tolerance's settings by their libvirt metadata names (`identity`, `ca`, `peer-name`,
    /// `tiebreak`, `timeout`, ...), for a VM started without them (or to replace them while
    /// it has no standby); its FT engine then starts here, the VM running on.
    #[serde(rename = "x-smpft-protect")]
    Protect {
        peer: String,
        #[serde(default)]
        settings: std::collections::BTreeMap<String, String>,
    },
    /// Turn fault tolerance off: the standby is dropped (once this copy holds the tie-breaker
    /// above it) and no spare is tried; the VM runs on unprotected.
    #[serde(rename = "x-smpft-unprotect")]
    Unprotect,
    /// Move the VM to its standby on purpose (planned switchover); this copy then waits as a
    /// standby at `then-standby` if given (or its `--then-standby`), else exits.
    #[serde(rename = "x-smpft-switchover")]
    Switchover {
        #[serde(rename = "then-standby", default)]
        then_standby: Option<String>,
    },
    /// End the point-in-time disk exports a snapshot of a protected VM (`file`) left on the
    /// standby.
    #[serde(rename = "x-smpft-release-snapshot")]
    ReleaseSnapshot { file: PathBuf },
    /// Write a snapshot to `file`, incremental on the previous one if asked.
    #[serde(rename = "x-smpft-snapshot")]
    Snapshot {
        file: PathBuf,
        #[serde(default)]
        incremental: bool,
    },
}

const NAMES: [&str; 6] = [
    "x-smpft-query-ft",
    "x-smpft-protect",
    "x-smpft-unprotect",
    "x-smpft-snapshot",
    "x-smpft-switchover",
    "x-smpft-release-snapshot",
];

impl SmpftCommand {
    /// `Some` for one of smpft's commands: typed, or why its arguments are refused. `None` for
    /// any other name.
    pub fn parse(name: &str, args: &Map<String, Value>) -> Option<Result<SmpftCommand, QmpError>> {
        if !NAMES.contains(&name) {
            return None;
        }
        Some(typed::<SmpftCommand>(name, args).and_then(|c| match &c {
            SmpftCommand::Protect { peer, .. } if peer.is_empty() => {
                Err(QmpError::generic("Parameter 'peer' must not be empty"))
            }
            SmpftCommand::Switchover { then_standby: Some(a) } if a.is_empty() => {
                Err(QmpError::generic("Parameter 'then-standby' must not be empty"))
            }
            SmpftCommand::Snapshot { file, .. } if file.as_os_str().is_empty() => {
                Err(QmpError::generic("Parameter 'file' must not be empty"))
            }
            _ => Ok(c),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, args: &str) -> Option<Result<SmpftCommand, QmpError>> {
        SmpftCommand::parse(name, &serde_json::from_str(args).unwrap())
    }

    #[test]
    fn smpfts_commands_and_their_arguments() {
        assert_eq!(parse("x-smpft-query-ft", "{}"), Some(Ok(SmpftCommand::QueryFt)));
        assert_eq!(
            parse("x-smpft-snapshot", r#"{"file":"/tmp/a","incremental":true}"#),
            Some(Ok(SmpftCommand::Snapshot { file: "/tmp/a".into(), incremental: true }))
        );
        assert_eq!(
            parse("x-smpft-protect", r#"{"peer":"10.0.0.2:7400"}"#),
            Some(Ok(SmpftCommand::Protect { peer: "10.0.0.2:7400".into(), settings: Default::default() }))
        );
        assert_eq!(
            parse("x-smpft-protect", r#"{"peer":"b:7400","settings":{"tiebreak":"/s/tb","peer-name":"b"}}"#),
            Some(Ok(SmpftCommand::Protect {
                peer: "b:7400".into(),
                settings: [("tiebreak", "/s/tb"), ("peer-name", "b")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }))
        );
        assert_eq!(parse("x-smpft-unprotect", "{}"), Some(Ok(SmpftCommand::Unprotect)));
        for (name, args, why) in [
            ("x-smpft-snapshot", "{}", "Parameter 'file' is missing"),
            ("x-smpft-snapshot", r#"{"file":""}"#, "must not be empty"),
            ("x-smpft-snapshot", r#"{"file":1}"#, "Invalid parameter type"),
            ("x-smpft-snapshot", r#"{"file":"a","incremental":"yes"}"#, "Invalid parameter type"),
            ("x-smpft-protect", "{}", "Parameter 'peer' is missing"),
            ("x-smpft-protect", r#"{"peer":"a:1","x":1}"#, "Parameter 'x' is unexpected"),
            ("x-smpft-protect", r#"{"peer":"a:1","settings":{"timeout":1}}"#, "Invalid parameter type"),
            ("x-smpft-query-ft", r#"{"now":true}"#, "takes no arguments"),
        ] {
            let e = parse(name, args).unwrap().unwrap_err();
            assert!(e.desc.contains(why), "{name} {args}: {}", e.desc);
        }
        assert_eq!(parse("x-smpft-switchover", "{}"), Some(Ok(SmpftCommand::Switchover { then_standby: None })));
        assert_eq!(
            parse("x-smpft-switchover", r#"{"then-standby":"10.0.0.1:7400"}"#),
            Some(Ok(SmpftCommand::Switchover { then_standby: Some("10.0.0.1:7400".into()) }))
        );
        assert!(parse("x-smpft-switchover", r#"{"then-standby":""}"#).unwrap().is_err());
        assert_eq!(parse("x-smpft-frobnicate", "{}"), None);
        assert_eq!(parse("query-status", "{}"), None);
    }
}
