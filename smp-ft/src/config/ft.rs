//! Fault tolerance's configuration ([`FtOptions`]), built and checked the same way for `smpft
//! run`, `smpft standby` and a libvirt domain's metadata: every protocol setting of
//! [`PrimaryConfig`] can be set, and one set of defaults holds for every caller.

use super::error::{ConfigError, Problem};
use super::hooks::TestHooks;
use super::names::{Names, Setting};
use crate::ft::encode::Compression;
use crate::ft::protocol::PrimaryConfig;
use crate::units::{parse_duration, parse_size};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use transport::detector::Mode as DetectorMode;
use transport::{ChannelConfig, Identity, PeerTrust};

/// Settings shared by both roles.
#[derive(Clone)]
pub struct FtOptions {
    pub identity: Identity,
    pub trust: PeerTrust,
    /// The tie-breaker record: a file on shared storage, or a key in etcd.
    pub tiebreak: crate::ft::tiebreak::Spec,
    /// This side's name in the tie-breaker record and in the peer's logs.
    pub owner: String,
    /// The primary's protocol: checkpoint interval and pacing, window, initial copy.
    pub protocol: PrimaryConfig,
    /// How long a tie-breaker claim may wait for the lock.
    pub claim_timeout: Duration,
    /// How checkpoint pages are encoded (`--ft-compress`).
    pub compression: Compression,
    /// Bytes of pages last sent that the primary keeps for deltas (`--ft-compress-cache`).
    pub compression_cache: u64,
    /// Output latency bound: vCPUs are slowed while acknowledgements lag more (zero: never).
    pub max_latency: Duration,
    /// The lag policy: a standby whose acknowledgements lag more than this for at least half
    /// of `max_lag_for` is replaced (zero: never).
    pub max_lag: Duration,
    pub max_lag_for: Duration,
    /// The FT channel (heartbeat, silence timeout, the wire version announced).
    pub channel: ChannelConfig,
    /// The test hook `verify`: the primary checks each checkpoint against a shadow copy.
    pub verify: bool,
    /// A standby that loses the tie-breaker halts (exit 75) instead of waiting for a primary
    /// again (`--ft-halt-on-loss`).
    pub halt_on_loss: bool,
}

/// The default owner name: host name and process id.
pub fn default_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}:{}", if host.is_empty() { "host" } else { host }, std::process::id())
}

/// Defaults of the settings [`PrimaryConfig`] does not hold.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(150);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(20);
/// The failure detector's ceiling is this many times its floor unless set.
pub const TIMEOUT_MAX_FACTOR: u32 = 4;
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_COMPRESS_CACHE: u64 = 64 << 20;
pub const DEFAULT_MAX_LATENCY: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_LAG_FOR: Duration = Duration::from_secs(2);

/// The defaults as a command line shows them in its help (the unit tests check that they are
/// the builder's).
pub mod shown {
    pub const INTERVAL: &str = "20ms";
    pub const MIN_GAP: &str = "1ms";
    pub const TIMEOUT: &str = "150ms";
    pub const HEARTBEAT: &str = "20ms";
    pub const COMPRESS_CACHE: &str = "64M";
    pub const MAX_LATENCY: &str = "100ms";
    pub const MAX_LAG: &str = "0s";
    pub const MAX_LAG_FOR: &str = "2s";
}

/// Builds [`FtOptions`]: set what the caller was given, then [`FtBuilder::build`].
#[derive(Debug, Clone)]
pub struct FtBuilder {
    names: Names,
    identity: Option<PathBuf>,
    peer_cert: Option<String>,
    /// The site CA's certificate, instead of the peer's own (`peer_cert`).
    ca: Option<PathBuf>,
    /// The host name the peer's certificate must carry (with `ca`).
    peer_name: Option<String>,
    tiebreak: Option<PathBuf>,
    owner: Option<String>,
    protocol: PrimaryConfig,
    /// How long a final checkpoint may wait for its acknowledgement (default: twice the
    /// silence timeout).
    ack_timeout: Option<Duration>,
    timeout: Duration,
    /// The failure detector's ceiling (default: [`TIMEOUT_MAX_FACTOR`] times `timeout`).
    timeout_max: Option<Duration>,
    detector: DetectorMode,
    heartbeat: Duration,
    claim_timeout: Duration,
    compression: Compression,
    compression_cache: u64,
    max_latency: Duration,
    max_lag: Duration,
    max_lag_for: Duration,
    halt_on_loss: bool,
    hooks: TestHooks,
}

/// `adaptive` or `fixed` (see [`transport::detector::Mode`]).
pub fn parse_detector(value: &str) -> Result<DetectorMode, String> {
    match value.trim() {
        "adaptive" => Ok(DetectorMode::Adaptive),
        "fixed" => Ok(DetectorMode::Fixed),
        other => Err(format!("'{other}' is not adaptive or fixed")),
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+;)*) => {
        $($(#[$doc])* pub fn $name(mut self, v: $ty) -> Self {
            self.$($field).+ = v;
            self
        })*
    };
}

impl FtBuilder {
    /// The defaults, errors naming settings in `names`' words, with this process's test hooks.
    pub fn new(names: Names) -> FtBuilder {
        FtBuilder {
            names,
            identity: None,
            peer_cert: None,
            ca: None,
            peer_name: None,
            tiebreak: None,
            owner: None,
            protocol: PrimaryConfig::default(),
            ack_timeout: None,
            timeout: DEFAULT_TIMEOUT,
            timeout_max: None,
            detector: DetectorMode::Adaptive,
            heartbeat: DEFAULT_HEARTBEAT,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
            compression: Compression::default(),
            compression_cache: DEFAULT_COMPRESS_CACHE,
            max_latency: DEFAULT_MAX_LATENCY,
            max_lag: Duration::ZERO,
            max_lag_for: DEFAULT_MAX_LAG_FOR,
            halt_on_loss: false,
            hooks: super::hooks::current().clone(),
        }
    }

    setters! {
        /// A directory with key.pem and cert.pem.
        identity: Option<PathBuf> => identity;
        /// The peer's certificate (a PEM file) or its fingerprint (sha256:HEX).
        peer_cert: Option<String> => peer_cert;
        /// The site CA's certificate (a PEM file): a peer is accepted when its certificate
        /// chains to it and names [`FtBuilder::peer_name`].
        ca: Option<PathBuf> => ca;
        /// The host name the peer's certificate must carry (with a CA).
        peer_name: Option<String> => peer_name;
        /// A path, or etcd://HOST:PORT[,HOST:PORT...]/KEY-PREFIX/VM[?cacert=&cert=&key=].
        tiebreak: Option<PathBuf> => tiebreak;
        /// This copy's name in the tie-breaker record (default: host name and process id).
        owner: Option<String> => owner;
        interval: Duration => protocol.interval;
        min_gap: Duration => protocol.min_gap;
        output_quiet: Duration => protocol.output_quiet;
        output_max_wait: Duration => protocol.output_max_wait;
        window: u64 => protocol.window;
        sync_done_pages: u64 => protocol.sync_done_pages;
        sync_max_rounds: u32 => protocol.sync_max_rounds;
        /// After a standby is lost or dropped, the next spare is tried this much later.
        reconnect_after: Duration => protocol.reconnect_after;
        /// A standby that was refused is tried again no sooner than this.
        refused_retry: Duration => protocol.refused_retry;
        /// A claim that could not reach the tie-breaker is made again this much later.
        arbitrate_retry: Duration => protocol.arbitrate_retry;
        /// How long a switchover's or an ending VM's final checkpoint may wait for its
        /// acknowledgement (default: twice the silence timeout).
        ack_timeout: Option<Duration> => ack_timeout;
        /// Silence after which the peer may be declared failed: the failure detector's floor.
        timeout: Duration => timeout;
        /// The most silence the failure detector allows a peer whose messages came in bursts.
        timeout_max: Option<Duration> => timeout_max;
        /// How silence is judged: `adaptive` (the default), or `fixed`, the plain timeout.
        detector: DetectorMode => detector;
        heartbeat: Duration => heartbeat;
        claim_timeout: Duration => claim_timeout;
        compression: Compression => compression;
        compression_cache: u64 => compression_cache;
        max_latency: Duration => max_latency;
        max_lag: Duration => max_lag;
        max_lag_for: Duration => max_lag_for;
        /// A standby that loses the tie-breaker halts instead of waiting for a primary again.
        halt_on_loss: bool => halt_on_loss;
        /// Test hooks other than this process's.
        test_hooks: TestHooks => hooks;
    }

    /// Sets `setting` from its text (`20ms`, `64M`, `delta`, a path), as a caller that has
    /// only text gives it (a libvirt domain's metadata).
    pub fn parse(self, setting: Setting, value: &str) -> Result<Self, ConfigError> {
        let names = self.names;
        let invalid = |why: String| ConfigError::new(names, &[setting], Problem::Invalid(why));
        let duration = || parse_duration(value).map_err(invalid);
        let number = || value.trim().parse::<u64>().map_err(|_| invalid(format!("'{value}' is not a number")));
        Ok(match setting {
            Setting::Identity => self.identity(Some(value.into())),
            Setting::PeerCert => self.peer_cert(Some(value.into())),
            Setting::Ca => self.ca(Some(value.into())),
            Setting::PeerName => self.peer_name(Some(value.trim().into())),
            Setting::Tiebreak => self.tiebreak(Some(value.into())),
            Setting::Owner => self.owner(Some(value.into())),
            Setting::Interval => self.interval(duration()?),
            Setting::MinGap => self.min_gap(duration()?),
            Setting::OutputQuiet => self.output_quiet(duration()?),
            Setting::OutputMaxWait => self.output_max_wait(duration()?),
            Setting::Window => self.window(number()?),
            Setting::SyncDonePages => self.sync_done_pages(number()?),
            Setting::SyncMaxRounds => {
                self.sync_max_rounds(number()?.try_into().map_err(|_| invalid(format!("'{value}' is too large")))?)
            }
            Setting::Timeout => self.timeout(duration()?),
            Setting::TimeoutMax => self.timeout_max(Some(duration()?)),
            Setting::Detector => self.detector(parse_detector(value).map_err(invalid)?),
            Setting::Heartbeat => self.heartbeat(duration()?),
            Setting::ClaimTimeout => self.claim_timeout(duration()?),
            Setting::Compress => self.compression(
                <Compression as clap::ValueEnum>::from_str(value, true)
                    .map_err(|_| invalid(format!("'{value}' is not delta, lz4 or none")))?,
            ),
            Setting::CompressCache => self.compression_cache(parse_size(value).map_err(invalid)?),
            Setting::MaxLatency => self.max_latency(duration()?),
            Setting::MaxLag => self.max_lag(duration()?),
            Setting::MaxLagFor => self.max_lag_for(duration()?),
            Setting::HaltOnLoss => self.halt_on_loss(match value.trim() {
                "yes" | "true" | "on" | "1" => true,
                "no" | "false" | "off" | "0" => false,
                other => return Err(invalid(format!("'{other}' is not yes or no"))),
            }),
            _ => return Err(invalid("not a fault tolerance setting".into())),
        })
    }

    /// Whether the caller named any of the settings fault tolerance needs.
    pub fn given(&self) -> bool {
        self.identity.is_some() || self.peer_cert.is_some() || self.ca.is_some() || self.tiebreak.is_some()
    }

    /// Checks the settings against each other, loads the identity and the peer's trust.
    pub fn build(self) -> Result<FtOptions, ConfigError> {
        self.check()?;
        let names = self.names;
        let identity = Identity::load(self.identity.as_deref().unwrap_or_else(|| std::path::Path::new("")))
            .map_err(|e| ConfigError::cause(names, Setting::Identity, e))?;
        let trust = match (&self.peer_cert, &self.ca, &self.peer_name) {
            (Some(cert), _, _) => {
                PeerTrust::parse(cert).map_err(|e| ConfigError::cause(names, Setting::PeerCert, e))?
            }
            (None, Some(ca), Some(name)) => {
                PeerTrust::ca(ca, name).map_err(|e| ConfigError::cause(names, Setting::Ca, e))?
            }
            _ => unreachable!("checked: a peer certificate, or a CA with the peer's name"),
        };
        let tiebreak = self.tiebreak.as_deref().unwrap_or_else(|| std::path::Path::new(""));
        let tiebreak = crate::ft::tiebreak::Spec::parse(&tiebreak.to_string_lossy())
            .map_err(|e| ConfigError::cause(names, Setting::Tiebreak, e))?;
        let channel = ChannelConfig {
            heartbeat: self.heartbeat,
            silence_timeout: self.timeout,
            silence_ceiling: self.timeout_max.unwrap_or(self.timeout * TIMEOUT_MAX_FACTOR),
            detector: self.detector,
            wire_version: self.hooks.wire_version.unwrap_or(transport::message::PROTOCOL_VERSION),
            ..ChannelConfig::default()
        };
        Ok(FtOptions {
            identity,
            trust,
            tiebreak,
            owner: self.owner.unwrap_or_else(default_owner),
            protocol: PrimaryConfig { ack_timeout: self.ack_timeout.unwrap_or(self.timeout * 2), ..self.protocol },
            claim_timeout: self.claim_timeout,
            compression: self.compression,
            compression_cache: self.compression_cache,
            max_latency: self.max_latency,
            max_lag: self.max_lag,
            max_lag_for: self.max_lag_for,
            channel,
            verify: self.hooks.verify,
            halt_on_loss: self.halt_on_loss,
        })
    }

    /// The checks that need no file: what is missing, and settings that contradict each other.
    fn check(&self) -> Result<(), ConfigError> {
        let names = self.names;
        if self.peer_cert.is_some() && (self.ca.is_some() || self.peer_name.is_some()) {
            let why = "the peer is trusted either by its own certificate or by the site CA's, not both".to_string();
            let at = if self.ca.is_some() { Setting::Ca } else { Setting::PeerName };
            return Err(ConfigError::new(names, &[Setting::PeerCert, at], Problem::Invalid(why)));
        }
        let by_ca = self.ca.is_some() || self.peer_name.is_some();
        let missing: Vec<Setting> = [
            (self.identity.is_none(), Setting::Identity),
            (self.peer_cert.is_none() && !by_ca, Setting::PeerCert),
            (by_ca && self.ca.is_none(), Setting::Ca),
            (by_ca && self.peer_name.is_none(), Setting::PeerName),
            (self.tiebreak.is_none(), Setting::Tiebreak),
        ]
        .iter()
        .filter_map(|(m, s)| m.then_some(*s))
        .collect();
        if !missing.is_empty() {
            return Err(ConfigError::new(names, &missing, Problem::Missing));
        }
        if self.heartbeat.is_zero() || self.timeout <= self.heartbeat * 2 {
            let p = Problem::Timeout { timeout: self.timeout, heartbeat: self.heartbeat };
            return Err(ConfigError::new(names, &[Setting::Timeout, Setting::Heartbeat], p));
        }
        if let Some(max) = self.timeout_max.filter(|m| *m < self.timeout) {
            let why = format!("{max:?} is below the timeout ({:?}), the failure detector's floor", self.timeout);
            return Err(ConfigError::new(names, &[Setting::TimeoutMax], Problem::Invalid(why)));
        }
        let p = &self.protocol;
        for (zero, setting) in [(p.interval.is_zero(), Setting::Interval), (p.window == 0, Setting::Window)] {
            if zero {
                return Err(ConfigError::new(names, &[setting], Problem::Zero));
            }
        }
        if !self.max_lag.is_zero() && (self.max_lag_for.is_zero() || self.max_lag <= p.interval) {
            let problem = Problem::MaxLag { max_lag: self.max_lag, interval: p.interval };
            return Err(ConfigError::new(names, &[Setting::MaxLag, Setting::Interval, Setting::MaxLagFor], problem));
        }
        Ok(())
    }
}

/// The peers a list names (`host:port`, comma-separated, in order), resolved.
pub fn peers(names: Names, list: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    crate::ft::error::resolve_all(list).map_err(|e| ConfigError::cause(names, Setting::Peer, e))
}

/// The address a standby listens on (`ADDRESS:PORT`).
pub fn listen(names: Names, addr: &str) -> Result<SocketAddr, ConfigError> {
    parse_listen(addr).map_err(|why| ConfigError::new(names, &[Setting::Listen], Problem::Invalid(why)))
}

/// [`listen`]'s parser, for a command line's own (which reports the flag itself).
pub fn parse_listen(addr: &str) -> Result<SocketAddr, String> {
    addr.trim().parse().map_err(|_| format!("'{addr}' is not ADDRESS:PORT (e.g. 0.0.0.0:7400)"))
}

#[cfg(test)]
mod tests;
