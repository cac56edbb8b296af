use super::*;
use crate::units::parse_size;

/// A builder with an identity, a peer certificate and a tie-breaker that exist.
fn complete(names: Names, dir: &std::path::Path) -> FtBuilder {
    let (a, b) = (dir.join("a"), dir.join("b"));
    if !a.exists() {
        transport::Identity::generate_into(&a, "a", 1).unwrap();
        transport::Identity::generate_into(&b, "b", 1).unwrap();
    }
    FtBuilder::new(names)
        .identity(Some(a))
        .peer_cert(Some(b.join("cert.pem").display().to_string()))
        .tiebreak(Some(dir.join("tb")))
        .owner(Some("me".into()))
}

const ALL_NAMES: [Names; 3] = [Names::Cli, Names::Qemu, Names::Libvirt];

#[test]
fn defaults_are_the_same_for_every_caller_and_as_shown() {
    let dir = tempfile::tempdir().unwrap();
    let shape = |o: &FtOptions| {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {}",
            o.protocol,
            o.claim_timeout,
            o.compression,
            o.compression_cache,
            o.max_latency,
            o.max_lag,
            o.max_lag_for,
            o.channel.heartbeat,
            o.channel.silence_timeout,
            o.channel.wire_version,
            o.owner,
            o.verify
        )
    };
    let all: Vec<String> = ALL_NAMES.iter().map(|n| shape(&complete(*n, dir.path()).build().unwrap())).collect();
    assert!(all.iter().all(|s| *s == all[0]), "{all:#?}");
    let o = complete(Names::Cli, dir.path()).build().unwrap();
    assert_eq!(o.protocol, PrimaryConfig::default());
    let d = |s: &str| parse_duration(s).unwrap();
    assert_eq!(o.protocol.interval, d(shown::INTERVAL));
    assert_eq!(o.protocol.min_gap, d(shown::MIN_GAP));
    assert_eq!(o.channel.silence_timeout, d(shown::TIMEOUT));
    assert_eq!(o.channel.heartbeat, d(shown::HEARTBEAT));
    assert_eq!(o.compression_cache, parse_size(shown::COMPRESS_CACHE).unwrap());
    assert_eq!(o.max_latency, d(shown::MAX_LATENCY));
    assert_eq!(o.max_lag, d(shown::MAX_LAG));
    assert_eq!(o.max_lag_for, d(shown::MAX_LAG_FOR));
    assert_eq!(o.channel.wire_version, transport::message::PROTOCOL_VERSION);
    assert!(!o.verify);
}

#[test]
fn every_protocol_setting_is_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let ms = Duration::from_millis;
    let o = complete(Names::Cli, dir.path())
        .interval(ms(30))
        .min_gap(ms(2))
        .output_quiet(ms(3))
        .output_max_wait(ms(4))
        .window(7)
        .sync_done_pages(99)
        .sync_max_rounds(5)
        .reconnect_after(ms(700))
        .refused_retry(ms(800))
        .arbitrate_retry(ms(90))
        .claim_timeout(ms(500))
        .build()
        .unwrap();
    let want = PrimaryConfig {
        interval: ms(30),
        min_gap: ms(2),
        output_quiet: ms(3),
        output_max_wait: ms(4),
        window: 7,
        sync_done_pages: 99,
        sync_max_rounds: 5,
        reconnect_after: ms(700),
        refused_retry: ms(800),
        arbitrate_retry: ms(90),
        // Twice the silence timeout unless set.
        ack_timeout: ms(300),
    };
    assert_eq!(o.protocol, want);
    assert_eq!(o.claim_timeout, ms(500));
    let mut b = complete(Names::Libvirt, dir.path());
    for (s, v) in [
        (Setting::Interval, "30ms"),
        (Setting::MinGap, "2ms"),
        (Setting::OutputQuiet, "3ms"),
        (Setting::OutputMaxWait, "4ms"),
        (Setting::Window, "7"),
        (Setting::SyncDonePages, "99"),
        (Setting::SyncMaxRounds, "5"),
        (Setting::ClaimTimeout, "500ms"),
        (Setting::Compress, "lz4"),
        (Setting::CompressCache, "1M"),
    ] {
        b = b.parse(s, v).unwrap();
    }
    let o = b.build().unwrap();
    // The retry pauses have no metadata element: their defaults stand.
    let d = PrimaryConfig::default();
    let want = PrimaryConfig {
        reconnect_after: d.reconnect_after,
        refused_retry: d.refused_retry,
        arbitrate_retry: d.arbitrate_retry,
        ..want
    };
    assert_eq!((o.protocol, o.claim_timeout), (want, ms(500)));
    assert_eq!((o.compression, o.compression_cache), (Compression::Lz4, 1 << 20));
}

/// The error `f` makes of a complete builder, in each caller's words.
fn errors(dir: &std::path::Path, f: impl Fn(FtBuilder) -> FtBuilder) -> Vec<ConfigError> {
    ALL_NAMES.iter().map(|n| f(complete(*n, dir)).build().err().expect("refused")).collect()
}

#[test]
fn each_check_names_its_settings_in_the_callers_words() {
    let dir = tempfile::tempdir().unwrap();
    let ms = Duration::from_millis;
    let missing: Vec<String> =
        ALL_NAMES.iter().map(|n| FtBuilder::new(*n).build().err().unwrap().to_string()).collect();
    assert_eq!(missing[0], "fault tolerance needs --identity, --peer-cert, --tiebreak");
    assert_eq!(missing[2], "fault tolerance needs <smpft:identity>, <smpft:peer-cert>, <smpft:tiebreak>");
    let cases: Vec<(Vec<ConfigError>, Setting, [&str; 2])> = vec![
        (
            errors(dir.path(), |b| b.timeout(ms(30)).heartbeat(ms(20))),
            Setting::Timeout,
            [
                "--ft-timeout (30ms) must exceed twice --ft-heartbeat (20ms)",
                "<smpft:timeout> (30ms) must exceed twice <smpft:heartbeat>",
            ],
        ),
        (
            errors(dir.path(), |b| b.heartbeat(Duration::ZERO)),
            Setting::Timeout,
            ["--ft-heartbeat (0ns)", "<smpft:heartbeat> (0ns)"],
        ),
        (
            errors(dir.path(), |b| b.interval(Duration::ZERO)),
            Setting::Interval,
            ["--ft-interval must be above zero", "<smpft:interval> must be above zero"],
        ),
        (
            errors(dir.path(), |b| b.window(0)),
            Setting::Window,
            ["window must be above zero", "window must be above zero"],
        ),
        (
            errors(dir.path(), |b| b.max_lag(ms(10))),
            Setting::MaxLag,
            [
                "--ft-max-lag (10ms) must exceed --ft-interval (20ms), over a --ft-max-lag-for above zero",
                "<smpft:interval> (20ms)",
            ],
        ),
        (
            errors(dir.path(), |b| b.identity(Some("/nonexistent".into()))),
            Setting::Identity,
            ["--identity: ", "<smpft:identity>: "],
        ),
        (
            errors(dir.path(), |b| b.peer_cert(Some("/nonexistent.pem".into()))),
            Setting::PeerCert,
            ["--peer-cert: ", "<smpft:peer-cert>: "],
        ),
    ];
    for (errs, setting, [cli, libvirt]) in cases {
        for e in &errs {
            assert_eq!(e.setting(), Some(setting), "{e}");
        }
        let chain = |e: &ConfigError| crate::error::error_chain(e);
        assert!(chain(&errs[0]).contains(cli), "{}", chain(&errs[0]));
        assert!(chain(&errs[2]).contains(libvirt), "{}", chain(&errs[2]));
    }
    let bad = |n| FtBuilder::new(n).parse(Setting::Interval, "soon").err().unwrap().to_string();
    assert!(bad(Names::Cli).starts_with("--ft-interval: 'soon' is not a duration"), "{}", bad(Names::Cli));
    assert!(bad(Names::Libvirt).starts_with("<smpft:interval>: 'soon'"), "{}", bad(Names::Libvirt));
    let e = FtBuilder::new(Names::Libvirt).parse(Setting::Listen, "x").err().unwrap();
    assert!(e.to_string().contains("not a fault tolerance setting"), "{e}");
}

#[test]
fn peers_and_listen_addresses_are_checked_here() {
    assert_eq!(peers(Names::Cli, "127.0.0.1:1, 127.0.0.1:2").unwrap().len(), 2);
    let e = crate::error::error_chain(&peers(Names::Cli, "nowhere").unwrap_err());
    assert!(e.starts_with("--ft-peer: ") && e.contains("not a host:port"), "{e}");
    let e = peers(Names::Libvirt, "nowhere").unwrap_err();
    assert_eq!((e.setting(), e.to_string().as_str()), (Some(Setting::Peer), "<smpft:peer>"));
    assert_eq!(listen(Names::Libvirt, "0.0.0.0:7400").unwrap().port(), 7400);
    let e = listen(Names::Libvirt, "here").unwrap_err().to_string();
    assert_eq!(e, "<smpft:listen>: 'here' is not ADDRESS:PORT (e.g. 0.0.0.0:7400)");
}

#[test]
fn test_hooks_reach_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = TestHooks::parse("verify,wire-version=1").unwrap();
    let o = complete(Names::Cli, dir.path()).test_hooks(hooks).build().unwrap();
    assert!(o.verify);
    assert_eq!(o.channel.wire_version, 1);
}

#[test]
fn the_peer_is_trusted_by_its_certificate_or_by_the_site_ca_with_its_name() {
    use transport::identity::{Issuer, CA_FILE};
    let dir = tempfile::tempdir().unwrap();
    let (ca, a) = (dir.path().join("ca"), dir.path().join("host-a"));
    transport::Identity::generate_into_as(&ca, "site CA", 1, &Issuer::NewCa).unwrap();
    transport::Identity::generate_into_as(&a, "host-a", 1, &Issuer::ca_dir(&ca).unwrap()).unwrap();
    let by_ca = |n| FtBuilder::new(n).identity(Some(a.clone())).tiebreak(Some(dir.path().join("tb")));
    let o = by_ca(Names::Libvirt).ca(Some(a.join(CA_FILE))).peer_name(Some("host-b".into())).build().unwrap();
    assert!(matches!(&o.trust, PeerTrust::Ca { name, .. } if name == "host-b"));
    for (b, why) in [
        (by_ca(Names::Libvirt), "fault tolerance needs <smpft:peer-cert>"),
        (by_ca(Names::Libvirt).ca(Some(a.join(CA_FILE))), "fault tolerance needs <smpft:peer-name>"),
        (by_ca(Names::Cli).peer_name(Some("host-b".into())), "fault tolerance needs --ca"),
        (
            complete(Names::Cli, dir.path()).ca(Some(a.join(CA_FILE))).peer_name(Some("b".into())),
            "--peer-cert: the peer is trusted either by its own certificate or by the site CA's",
        ),
        (by_ca(Names::Cli).ca(Some(a.join(CA_FILE))).peer_name(Some("two words".into())), "--ca"),
        (by_ca(Names::Cli).ca(Some(dir.path().join("none.pem"))).peer_name(Some("b".into())), "--ca"),
    ] {
        let e = b.build().err().map(|e| crate::error::error_chain(&e)).unwrap_or_default();
        assert!(e.starts_with(why), "{why}: {e}");
    }
}

#[test]
fn the_tiebreak_is_a_path_or_an_etcd_url() {
    use crate::ft::tiebreak::Spec;
    let dir = tempfile::tempdir().unwrap();
    let url = "etcd://10.0.0.1:2379,10.0.0.2:2379/smpft/vm1";
    let o = complete(Names::Libvirt, dir.path()).parse(Setting::Tiebreak, url).unwrap().build().unwrap();
    assert!(
        matches!(&o.tiebreak, Spec::Etcd(e) if e.endpoints.len() == 2 && e.key == "/smpft/vm1"),
        "{:?}",
        o.tiebreak
    );
    assert_eq!(o.tiebreak.to_string(), url);
    assert!(matches!(complete(Names::Cli, dir.path()).build().unwrap().tiebreak, Spec::File(_)));
    for (names, named) in [(Names::Cli, "--tiebreak"), (Names::Libvirt, "<smpft:tiebreak>")] {
        let e = complete(names, dir.path()).tiebreak(Some("etcd://h/smpft/vm1".into())).build().err().unwrap();
        let want = format!("{named}: 'etcd://h/smpft/vm1': member 'h': no port (HOST:PORT)");
        assert_eq!(crate::error::error_chain(&e), want);
    }
}
