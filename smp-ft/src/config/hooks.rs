//! Test hooks: one test-only option, the environment variable `SMPFT_TEST_HOOKS`, read once
//! when smpft starts. It is a comma-separated list:
//!
//! | hook                 | what                                                                |
//! |----------------------|---------------------------------------------------------------------|
//! | `fault=POINT[:K[:MS]]` | stop this process (SIGKILL) or stall it at a protocol point (see `ft::fault`) |
//! | `verify`             | primary: check every checkpoint against a shadow of what the standby holds (slow) |
//! | `wire-version=N`     | announce FT wire version N instead of this build's (stands in for an older or newer build) |
//! | `disk-log-budget=N`  | primary: the disk write log holds N bytes instead of 32 MiB (to reach its bound in a test) |
//!
//! An unknown or malformed hook is an error: smpft refuses to start rather than run a test
//! without the hook it asked for.

use crate::ft::fault::FaultSpec;
use std::sync::OnceLock;

/// The environment variable that holds the hooks.
pub const ENV: &str = "SMPFT_TEST_HOOKS";

/// The hooks this process runs with (none, normally).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Where to stop or stall this process.
    pub fault: Option<FaultSpec>,
    /// Check each checkpoint against a shadow copy (primary).
    pub verify: bool,
    /// The FT wire version to announce instead of this build's.
    pub wire_version: Option<u32>,
    /// The disk write log's budget instead of `ft::disk::DISK_LOG_BUDGET`.
    pub disk_log_budget: Option<usize>,
    /// `drop-goodbye`: the primary ends without telling its standby (as if the message were
    /// lost), so the standby must learn of the stop from the tie-breaker.
    pub drop_goodbye: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "{ENV}: unknown test hook '{0}' (known: fault=POINT[:K[:MS]], verify, wire-version=N, disk-log-budget=N, drop-goodbye)"
    )]
    Unknown(String),
    #[error(
        "{ENV}: '{0}' is not a fault point (kill-in-precopy, kill-after-send:K, kill-after-ack:K, kill-after-stream:K, stall-apply:K:MS)"
    )]
    Fault(String),
    #[error("{ENV}: wire-version '{0}' is not a number")]
    WireVersion(String),
    #[error("{ENV}: disk-log-budget '{0}' is not a number of bytes")]
    DiskLogBudget(String),
}

impl TestHooks {
    /// Parses `fault=kill-after-ack:3,verify,wire-version=1` (empty: no hooks).
    pub fn parse(s: &str) -> Result<TestHooks, HookError> {
        let mut hooks = TestHooks::default();
        for hook in s.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            match hook.split_once('=') {
                Some(("fault", f)) => {
                    hooks.fault = Some(FaultSpec::parse(f).ok_or_else(|| HookError::Fault(f.into()))?)
                }
                Some(("wire-version", v)) => {
                    hooks.wire_version = Some(v.parse().map_err(|_| HookError::WireVersion(v.into()))?)
                }
                Some(("disk-log-budget", v)) => {
                    hooks.disk_log_budget = Some(v.parse().map_err(|_| HookError::DiskLogBudget(v.into()))?)
                }
                None if hook == "verify" => hooks.verify = true,
                None if hook == "drop-goodbye" => hooks.drop_goodbye = true,
                _ => return Err(HookError::Unknown(hook.into())),
            }
        }
        Ok(hooks)
    }

    /// The hooks in the environment ([`ENV`]).
    pub fn from_env() -> Result<TestHooks, HookError> {
        std::env::var(ENV).map_or(Ok(TestHooks::default()), |s| TestHooks::parse(&s))
    }

    fn any(&self) -> bool {
        *self != TestHooks::default()
    }
}

static HOOKS: OnceLock<TestHooks> = OnceLock::new();

/// Reads the hooks from the environment, once, at start: an error for a hook smpft does not
/// know. Later calls change nothing.
pub fn init() -> Result<&'static TestHooks, HookError> {
    if let Some(h) = HOOKS.get() {
        return Ok(h);
    }
    let hooks = TestHooks::from_env()?;
    if hooks.any() {
        tracing::warn!("test hooks armed: {hooks:?}");
    }
    Ok(HOOKS.get_or_init(|| hooks))
}

/// The hooks of this process: those [`init`] read (none if it was not called).
pub fn current() -> &'static TestHooks {
    HOOKS.get_or_init(TestHooks::default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ft::fault::Point;

    #[test]
    fn hooks_parse() {
        assert_eq!(TestHooks::parse("").unwrap(), TestHooks::default());
        let h = TestHooks::parse("fault=kill-after-ack:7, verify,wire-version=1").unwrap();
        assert!(h.verify);
        assert_eq!(h.wire_version, Some(1));
        let f = h.fault.unwrap();
        assert_eq!((f.point, f.count), (Point::AfterAck, 7));
        assert_eq!(TestHooks::parse("wire-version=0").unwrap().wire_version, Some(0));
        assert_eq!(TestHooks::parse("disk-log-budget=4096").unwrap().disk_log_budget, Some(4096));
        for (bad, why) in [
            ("explode", "unknown test hook 'explode'"),
            ("verify=1", "unknown test hook"),
            ("fault=kill-after-ack:x", "not a fault point"),
            ("wire-version=new", "is not a number"),
            ("disk-log-budget=1M", "not a number of bytes"),
        ] {
            let e = TestHooks::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(why) && e.contains(ENV), "{e}");
        }
    }
}
