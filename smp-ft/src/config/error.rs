//! Why a configuration was refused: the settings at fault, said in the caller's words.

use super::names::{Names, Setting};
use std::time::Duration;

/// A refused configuration. It carries the settings at fault ([`ConfigError::settings`]) and
/// names them as the caller that gave them does ([`Names`]).
#[derive(Debug)]
pub struct ConfigError {
    settings: Vec<Setting>,
    names: Names,
    problem: Problem,
}

#[derive(Debug)]
pub(crate) enum Problem {
    /// Settings fault tolerance cannot do without.
    Missing,
    /// A value that does not parse or cannot be used.
    Invalid(String),
    /// Must be above zero.
    Zero,
    /// A number outside the range the setting takes.
    Range { value: u64, lo: u64, hi: u64 },
    /// The silence timeout against the heartbeat.
    Timeout { timeout: Duration, heartbeat: Duration },
    /// The lag policy against the checkpoint interval.
    MaxLag { max_lag: Duration, interval: Duration },
    /// A file that could not be read.
    Read { path: std::path::PathBuf, source: std::io::Error },
    /// A cause of its own (an identity that does not load, a peer that does not resolve).
    Cause(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl ConfigError {
    pub(crate) fn new(names: Names, settings: &[Setting], problem: Problem) -> ConfigError {
        ConfigError { settings: settings.to_vec(), names, problem }
    }

    pub(crate) fn cause(
        names: Names,
        setting: Setting,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> ConfigError {
        ConfigError::new(names, &[setting], Problem::Cause(Box::new(e)))
    }

    /// The settings at fault, the first one being the one to change.
    pub fn settings(&self) -> &[Setting] {
        &self.settings
    }

    /// The setting to change.
    pub fn setting(&self) -> Option<Setting> {
        self.settings.first().copied()
    }

    /// The same error in other words (for a caller that reuses another's settings).
    pub fn in_words_of(mut self, names: Names) -> ConfigError {
        self.names = names;
        self
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |i: usize| self.settings.get(i).map_or_else(String::new, |s| self.names.name(*s));
        match &self.problem {
            Problem::Missing => {
                let all: Vec<String> = self.settings.iter().map(|s| self.names.name(*s)).collect();
                write!(f, "fault tolerance needs {}", all.join(", "))
            }
            Problem::Invalid(why) => write!(f, "{}: {why}", n(0)),
            Problem::Zero => write!(f, "{} must be above zero", n(0)),
            Problem::Range { value, lo, hi } => write!(f, "{} {value} is not in {lo}..={hi}", n(0)),
            Problem::Timeout { timeout, heartbeat } => {
                write!(f, "{} ({timeout:?}) must exceed twice {} ({heartbeat:?}), which must be above zero", n(0), n(1))
            }
            Problem::MaxLag { max_lag, interval } => {
                write!(f, "{} ({max_lag:?}) must exceed {} ({interval:?}), over a {} above zero", n(0), n(1), n(2))
            }
            Problem::Read { path, .. } => write!(f, "cannot read {} ({})", path.display(), n(0)),
            Problem::Cause(_) => write!(f, "{}", n(0)),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::Read { source, .. } => Some(source),
            Problem::Cause(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}
