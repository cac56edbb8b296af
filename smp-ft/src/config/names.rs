//! The settings the builders know, and what each caller calls them: an error names a setting
//! as the operator wrote it (`--ft-timeout` on the command line, `<smpft:timeout>` in a libvirt
//! domain's metadata, `-smp` on QEMU's command line).

/// A setting of the VM or of fault tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    Vcpus,
    Memory,
    Guest,
    GuestArgs,
    Kernel,
    Initrd,
    Cmdline,
    Identity,
    PeerCert,
    Ca,
    PeerName,
    Tiebreak,
    Owner,
    Interval,
    MinGap,
    OutputQuiet,
    OutputMaxWait,
    Window,
    SyncDonePages,
    SyncMaxRounds,
    Timeout,
    TimeoutMax,
    Detector,
    Heartbeat,
    ClaimTimeout,
    Compress,
    CompressCache,
    MaxLatency,
    MaxLag,
    MaxLagFor,
    HaltOnLoss,
    Peer,
    Listen,
    Channel,
    BootDisk,
}

/// Whose words an error uses for a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// `smpft run` and `smpft standby`: the command-line flag.
    Cli,
    /// The QEMU persona's command line (libvirt's launch): the QEMU option.
    Qemu,
    /// A libvirt domain's smpft metadata: the element.
    Libvirt,
}

/// A setting's words: the builders' own key, the command-line flag, the QEMU option, the
/// libvirt metadata element (without its `smpft:` prefix). A caller without a word of its own
/// for a setting says the key.
struct Words {
    key: &'static str,
    cli: Option<&'static str>,
    qemu: Option<&'static str>,
    libvirt: Option<&'static str>,
}

const fn w(
    key: &'static str,
    cli: Option<&'static str>,
    qemu: Option<&'static str>,
    libvirt: Option<&'static str>,
) -> Words {
    Words { key, cli, qemu, libvirt }
}

impl Setting {
    pub const ALL: [Setting; 35] = [
        Setting::Vcpus,
        Setting::Memory,
        Setting::Guest,
        Setting::GuestArgs,
        Setting::Kernel,
        Setting::Initrd,
        Setting::Cmdline,
        Setting::Identity,
        Setting::PeerCert,
        Setting::Ca,
        Setting::PeerName,
        Setting::Tiebreak,
        Setting::Owner,
        Setting::Interval,
        Setting::MinGap,
        Setting::OutputQuiet,
        Setting::OutputMaxWait,
        Setting::Window,
        Setting::SyncDonePages,
        Setting::SyncMaxRounds,
        Setting::Timeout,
        Setting::TimeoutMax,
        Setting::Detector,
        Setting::Heartbeat,
        Setting::ClaimTimeout,
        Setting::Compress,
        Setting::CompressCache,
        Setting::MaxLatency,
        Setting::MaxLag,
        Setting::MaxLagFor,
        Setting::HaltOnLoss,
        Setting::Peer,
        Setting::Listen,
        Setting::Channel,
        Setting::BootDisk,
    ];

    fn words(self) -> Words {
        match self {
            Setting::Vcpus => w("vcpus", Some("--vcpus"), Some("-smp"), None),
            Setting::Channel => w("channel", Some("--channel"), Some("-device virtserialport"), None),
            Setting::BootDisk => w("boot", Some("--boot disk"), Some("bootindex"), None),
            Setting::Memory => w("memory", Some("--memory"), Some("-m"), None),
            Setting::Guest => w("guest", Some("--guest"), Some("-kernel"), None),
            Setting::GuestArgs => w("guest-args", Some("--guest-args"), Some("-append"), None),
            Setting::Kernel => w("kernel", Some("--kernel"), Some("-kernel"), None),
            Setting::Initrd => w("initrd", Some("--initrd"), Some("-initrd"), None),
            Setting::Cmdline => w("cmdline", Some("--cmdline"), Some("-append"), None),
            Setting::Identity => w("identity", Some("--identity"), None, Some("identity")),
            Setting::PeerCert => w("peer-cert", Some("--peer-cert"), None, Some("peer-cert")),
            Setting::Ca => w("ca", Some("--ca"), None, Some("ca")),
            Setting::PeerName => w("peer-name", Some("--peer-name"), None, Some("peer-name")),
            Setting::Tiebreak => w("tiebreak", Some("--tiebreak"), None, Some("tiebreak")),
            Setting::Owner => w("owner", Some("--ft-owner"), None, None),
            Setting::Interval => w("interval", Some("--ft-interval"), None, Some("interval")),
            Setting::MinGap => w("min-gap", Some("--ft-min-gap"), None, None),
            Setting::OutputQuiet => w("output-quiet", None, None, None),
            Setting::OutputMaxWait => w("output-max-wait", None, None, None),
            Setting::Window => w("window", None, None, None),
            Setting::SyncDonePages => w("sync-done-pages", None, None, None),
            Setting::SyncMaxRounds => w("sync-max-rounds", None, None, None),
            Setting::Timeout => w("timeout", Some("--ft-timeout"), None, Some("timeout")),
            Setting::TimeoutMax => w("timeout-max", Some("--ft-timeout-max"), None, Some("timeout-max")),
            Setting::Detector => w("detector", Some("--ft-detector"), None, Some("detector")),
            Setting::Heartbeat => w("heartbeat", Some("--ft-heartbeat"), None, Some("heartbeat")),
            Setting::ClaimTimeout => w("claim-timeout", None, None, None),
            Setting::Compress => w("compress", Some("--ft-compress"), None, None),
            Setting::CompressCache => w("compress-cache", Some("--ft-compress-cache"), None, None),
            Setting::MaxLatency => w("max-latency", Some("--ft-max-latency"), None, None),
            Setting::MaxLag => w("max-lag", Some("--ft-max-lag"), None, None),
            Setting::MaxLagFor => w("max-lag-for", Some("--ft-max-lag-for"), None, None),
            Setting::HaltOnLoss => w("halt-on-loss", Some("--ft-halt-on-loss"), None, Some("halt-on-loss")),
            Setting::Peer => w("peer", Some("--ft-peer"), None, Some("peer")),
            Setting::Listen => w("listen", Some("--listen"), None, Some("listen")),
        }
    }

    /// The builders' own name for the setting (also the name of last resort in messages).
    pub fn key(self) -> &'static str {
        self.words().key
    }

    /// The setting a libvirt metadata element (`peer-cert` for `<smpft:peer-cert>`) names.
    pub fn from_libvirt(element: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.words().libvirt == Some(element))
    }

    /// The libvirt metadata elements that name a setting.
    pub fn libvirt_elements() -> impl Iterator<Item = &'static str> {
        Setting::ALL.into_iter().filter_map(|s| s.words().libvirt)
    }
}

impl Names {
    /// `setting` in these words.
    pub fn name(self, setting: Setting) -> String {
        let Words { key, cli, qemu, libvirt } = setting.words();
        let libvirt = libvirt.map(|e| format!("<smpft:{e}>"));
        let name = match self {
            Names::Cli => cli.map(str::to_string),
            // The persona takes the VM from QEMU's options and fault tolerance from libvirt's
            // metadata: either caller names a setting the other has.
            Names::Qemu => qemu.map(str::to_string).or(libvirt),
            Names::Libvirt => libvirt.or(qemu.map(str::to_string)),
        };
        name.unwrap_or_else(|| key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_one_row_and_a_name_in_each_callers_words() {
        for (i, s) in Setting::ALL.iter().enumerate() {
            assert!(Setting::ALL[i + 1..].iter().all(|o| o != s && o.key() != s.key()), "{s:?} twice");
        }
        assert_eq!(Names::Cli.name(Setting::Timeout), "--ft-timeout");
        assert_eq!(Names::Libvirt.name(Setting::Timeout), "<smpft:timeout>");
        assert_eq!(Names::Qemu.name(Setting::Vcpus), "-smp");
        assert_eq!(Names::Qemu.name(Setting::Memory), "-m");
        assert_eq!(Names::Qemu.name(Setting::PeerCert), "<smpft:peer-cert>");
        assert_eq!(Names::Cli.name(Setting::Window), "window");
        assert_eq!(Setting::from_libvirt("peer-cert"), Some(Setting::PeerCert));
        assert_eq!(Setting::from_libvirt("role"), None);
    }
}
