//! The FT logging channel between real endpoints: in one process over loopback, against a peer
//! process that is SIGKILLed, and across two network namespaces partitioned with iptables.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use transport::{Channel, ChannelConfig, Event, Identity, Listener, Message, PeerTrust, Role};

/// Identities for a primary, a standby and a stranger, in a directory removed with the guard.
fn ids(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new().prefix(&format!("smpft-transport-{name}-")).tempdir().unwrap();
    let (a, b, c) = (dir.path().join("primary"), dir.path().join("standby"), dir.path().join("stranger"));
    for d in [&a, &b, &c] {
        Identity::generate_into(d, "smpft-peer", 30).unwrap();
    }
    (dir, a, b, c)
}

fn trust(dir: &Path) -> PeerTrust {
    PeerTrust::parse(dir.join("cert.pem").to_str().unwrap()).unwrap()
}

fn pair(name: &str, cfg: ChannelConfig) -> (Channel, Channel) {
    let (_dir, p, s, _) = ids(name);
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), &Identity::load(&s).unwrap(), &trust(&p), cfg.clone()).unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || {
        listener.accept(Some(Duration::from_secs(10)), 2, b"standby-meta".to_vec()).unwrap()
    });
    let primary =
        Channel::connect(addr, &Identity::load(&p).unwrap(), &trust(&s), cfg, 1, b"vm: 4 vcpus".to_vec()).unwrap();
    (primary, t.join().unwrap())
}

/// The next event that is not a heartbeat-driven App message from a peer process.
fn next(ch: &Channel) -> Event {
    ch.events().recv_timeout(Duration::from_secs(30)).expect("event from the channel")
}

#[test]
fn hello_and_every_message_type_round_trip_both_ways() {
    let (p, s) = pair("roundtrip", ChannelConfig::default());
    assert_eq!(
        p.peer_hello(),
        &Message::Hello {
            version: transport::message::PROTOCOL_VERSION,
            role: Role::Standby,
            session: 2,
            meta: b"standby-meta".to_vec()
        }
    );
    assert_eq!(
        s.peer_hello(),
        &Message::Hello {
            version: transport::message::PROTOCOL_VERSION,
            role: Role::Primary,
            session: 1,
            meta: b"vm: 4 vcpus".to_vec()
        }
    );
    let msgs = [
        Message::App { kind: 7, data: vec![1, 2, 3] },
        Message::App { kind: 0, data: vec![] },
        Message::Ack { epoch: 99 },
        Message::Goodbye { code: 0, reason: "just testing".into() },
    ];
    for (from, to) in [(&p, &s), (&s, &p)] {
        for m in &msgs {
            from.send(m).unwrap();
            assert_eq!(next(to), Event::Message(m.clone()));
        }
    }
    p.send_checkpoint(1, &b"small checkpoint"[..]).unwrap();
    match next(&s) {
        Event::Checkpoint { epoch: 1, data } => assert_eq!(data.to_vec(), b"small checkpoint"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_gib_of_checkpoints_over_eight_streams_arrives_intact() {
    let cfg = ChannelConfig { max_in_flight: 192 << 20, bulk_streams: 8, ..ChannelConfig::default() };
    let (p, s) = pair("gib", cfg);
    const CHUNK: usize = 64 << 20;
    const COUNT: u64 = 16; // 1 GiB in all
    let receiver = std::thread::spawn(move || {
        let mut crcs = Vec::new();
        while crcs.len() < COUNT as usize {
            match next(&s) {
                Event::Checkpoint { epoch, data } => {
                    assert_eq!(epoch, crcs.len() as u64 + 1, "checkpoints are delivered in order");
                    assert_eq!(data.len(), CHUNK);
                    crcs.push(data.crc32());
                    s.send(&Message::Ack { epoch }).unwrap();
                }
                Event::Message(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        crcs
    });
    let mut sent = Vec::new();
    let mut max_in_flight = 0;
    for epoch in 1..=COUNT {
        let data: Vec<u8> = (0..CHUNK).map(|i| (i as u64 * 31 + epoch * 7919) as u8).collect();
        sent.push(crc32fast::hash(&data));
        p.send_checkpoint(epoch, data).unwrap();
        max_in_flight = max_in_flight.max(p.in_flight());
    }
    assert_eq!(receiver.join().unwrap(), sent);
    assert!(max_in_flight <= 192 << 20, "backpressure bounds what is in flight: {max_in_flight}");
}

fn refused(name: &str, primary_trusts_stranger: bool) {
    let (_dir, p, s, stranger) = ids(name);
    let cfg = ChannelConfig { handshake_timeout: Duration::from_secs(2), ..ChannelConfig::default() };
    // The standby trusts the primary unless the test makes the primary an unknown client.
    let standby_trusts = if primary_trusts_stranger { trust(&p) } else { trust(&stranger) };
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), &Identity::load(&s).unwrap(), &standby_trusts, cfg.clone())
            .unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || listener.accept(Some(Duration::from_secs(3)), 2, vec![]).is_err());
    let primary_trusts = if primary_trusts_stranger { trust(&stranger) } else { trust(&s) };
    let r = Channel::connect(addr, &Identity::load(&p).unwrap(), &primary_trusts, cfg, 1, vec![]);
    assert!(r.is_err(), "an unknown peer must be refused");
    assert!(t.join().unwrap(), "the standby must not accept it either");
}

#[test]
fn unknown_standby_is_refused_by_the_primary() {
    refused("unknown-standby", true);
}

#[test]
fn unknown_primary_is_refused_by_the_standby() {
    refused("unknown-primary", false);
}

/// Hosts with certificates from a site CA pair with no exchange between them; a host whose
/// certificate comes from another CA, or names another host, is refused by either side.
#[test]
fn hosts_signed_by_the_site_ca_pair_and_others_are_refused() {
    use transport::identity::{Issuer, CA_FILE};
    let dir = tempfile::Builder::new().prefix("smpft-transport-ca-").tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    Identity::generate_into_as(&d("ca"), "site CA", 30, &Issuer::NewCa).unwrap();
    Identity::generate_into_as(&d("rogue-ca"), "rogue CA", 30, &Issuer::NewCa).unwrap();
    let site = Issuer::ca_dir(&d("ca")).unwrap();
    for (out, host, by) in [("a", "host-a", &site), ("b", "host-b", &site), ("c", "host-c", &site)] {
        Identity::generate_into_as(&d(out), host, 30, by).unwrap();
    }
    Identity::generate_into_as(&d("rogue-b"), "host-b", 30, &Issuer::ca_dir(&d("rogue-ca")).unwrap()).unwrap();
    let ca = |name: &str| PeerTrust::ca(&d("a").join(CA_FILE), name).unwrap();
    let cfg = ChannelConfig { handshake_timeout: Duration::from_secs(2), ..ChannelConfig::default() };
    // (standby's identity, whom the standby expects, whom the primary expects, pairs)
    for (standby, standby_expects, primary_expects, pairs) in [
        ("b", "host-a", "host-b", true),
        ("rogue-b", "host-a", "host-b", false),
        ("c", "host-a", "host-b", false),
        ("b", "host-c", "host-b", false),
    ] {
        let listener = Listener::bind(
            "127.0.0.1:0".parse().unwrap(),
            &Identity::load(&d(standby)).unwrap(),
            &ca(standby_expects),
            cfg.clone(),
        )
        .unwrap();
        let addr = listener.local_addr();
        let t = std::thread::spawn(move || listener.accept(Some(Duration::from_secs(3)), 2, vec![]).is_ok());
        let r = Channel::connect(addr, &Identity::load(&d("a")).unwrap(), &ca(primary_expects), cfg.clone(), 1, vec![]);
        let what = format!("standby {standby} expecting {standby_expects}, primary expecting {primary_expects}");
        assert_eq!(r.is_ok(), pairs, "{what}: {:?}", r.as_ref().err().map(ToString::to_string));
        assert_eq!(t.join().unwrap(), pairs, "{what}");
    }
}

#[test]
fn expired_certificate_is_refused() {
    let (_dir, p, s, _) = ids("expired");
    let past =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 - 30 * 86_400;
    let (old, _, _) = Identity::generate_valid("old", past - 86_400, past).unwrap();
    let cfg = ChannelConfig { handshake_timeout: Duration::from_secs(2), ..ChannelConfig::default() };
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &old, &trust(&p), cfg.clone()).unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || listener.accept(Some(Duration::from_secs(3)), 2, vec![]).is_err());
    let r = Channel::connect(addr, &Identity::load(&p).unwrap(), &PeerTrust::Cert(old.cert.to_vec()), cfg, 1, vec![]);
    let err = r.err().expect("expired certificate must be refused").to_string();
    assert!(err.contains("expired") || err.contains("Expired"), "{err}");
    assert!(t.join().unwrap());
    drop(s);
}

#[test]
fn a_peer_that_connects_and_says_nothing_is_dropped() {
    let (_dir, p, s, _) = ids("silent-hello");
    let cfg = ChannelConfig { handshake_timeout: Duration::from_millis(500), ..ChannelConfig::default() };
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), &Identity::load(&s).unwrap(), &trust(&p), cfg.clone()).unwrap();
    let addr = listener.local_addr();
    // A UDP socket that sends junk and nothing else: no handshake, no Hello.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.send_to(&[0u8; 1200], addr).unwrap();
    let r = listener.accept(Some(Duration::from_secs(2)), 2, vec![]);
    assert!(r.is_err(), "nothing must be accepted from a peer that never says Hello");
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_transport-peer")
}

struct Peer {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl Peer {
    fn spawn(mut cmd: Command) -> Peer {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), l)).is_err() {
                    return;
                }
            }
        });
        Peer { child, lines: rx }
    }

    /// Waits for a line starting with `prefix`; returns it and when it was read.
    fn wait_for(&self, prefix: &str, within: Duration) -> (Instant, String) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.starts_with(prefix) => return (t, l),
                Ok(_) => {}
                Err(_) => panic!("no '{prefix}' line within {within:?}"),
            }
        }
    }

    /// Lines seen during `d`.
    fn drain_for(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut v = Vec::new();
        while let Ok((_, l)) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            v.push(l);
        }
        v
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigkilled_peer_is_reported_silent_within_timeout_plus_one_heartbeat() {
    let (_dir, p, s, _) = ids("sigkill");
    let (heartbeat, silence) = (Duration::from_millis(50), Duration::from_millis(300));
    let mut cmd = Command::new(bin());
    cmd.args(["standby", "127.0.0.1:0"]).arg(&s).arg(p.join("cert.pem"));
    let standby = Peer::spawn(cmd);
    let (_, ready) = standby.wait_for("READY ", Duration::from_secs(10));
    let addr: SocketAddr = ready["READY ".len()..].parse().unwrap();
    let cfg = ChannelConfig { heartbeat, silence_timeout: silence, ..ChannelConfig::default() };
    let ch = Channel::connect(addr, &Identity::load(&p).unwrap(), &trust(&s), cfg, 1, vec![]).unwrap();
    // Traffic flows, then the standby process dies at once.
    assert!(matches!(next(&ch), Event::Message(Message::App { .. })));
    let mut standby = standby;
    let killed = Instant::now();
    standby.child.kill().unwrap();
    loop {
        match next(&ch) {
            Event::PeerSilent { .. } => break,
            Event::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let detected = killed.elapsed();
    println!("SIGKILL detected after {detected:?} (timeout {silence:?}, heartbeat {heartbeat:?})");
    // The bound is timeout + one heartbeat; scheduling on a loaded 2-core host adds a little.
    assert!(
        detected <= silence + heartbeat + Duration::from_millis(150),
        "peer silence noticed only after {detected:?}"
    );
    assert!(matches!(next(&ch), Event::Closed { .. }), "a silent peer's channel is closed");
    assert!(ch.send(&Message::Ack { epoch: 1 }).is_err(), "nothing is sent on a closed channel");
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed");
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("smpft-a{id}"), format!("smpft-b{id}"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let (va, vb) = (format!("sa{id}"), format!("sb{id}"));
        ip(&["link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, "10.213.0.1/24"), (&b, &vb, "10.213.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Netns { a, b }
    }

    fn exec(&self, ns: &str, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, prog]);
        c
    }

    fn iptables(&self, ns: &str, args: &[&str]) {
        let st = Command::new("ip").args(["netns", "exec", ns, "iptables"]).args(args).status().unwrap();
        assert!(st.success(), "iptables {args:?} in {ns} failed");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn partition_between_network_namespaces_is_detected_and_the_channel_stays_dead() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test creates network namespaces and needs root");
    let (_dir, p, s, _) = ids("partition");
    let net = Netns::new();
    let (hb, silence) = ("50", "300");
    let mut cmd = net.exec(&net.a, bin());
    cmd.args(["standby", "10.213.0.1:7780"]).arg(&s).arg(p.join("cert.pem")).args([hb, silence]);
    let standby = Peer::spawn(cmd);
    standby.wait_for("READY ", Duration::from_secs(10));
    let mut cmd = net.exec(&net.b, bin());
    cmd.args(["primary", "10.213.0.1:7780"]).arg(&p).arg(s.join("cert.pem")).args([hb, silence]);
    let primary = Peer::spawn(cmd);
    primary.wait_for("CONNECTED", Duration::from_secs(10));
    standby.wait_for("CONNECTED", Duration::from_secs(10));
    standby.wait_for("MSG App", Duration::from_secs(5));

    // Partition: drop everything in A, both ways.
    net.iptables(&net.a, &["-A", "INPUT", "-j", "DROP"]);
    net.iptables(&net.a, &["-A", "OUTPUT", "-j", "DROP"]);
    let cut = Instant::now();
    let (t1, _) = primary.wait_for("SILENT", Duration::from_secs(5));
    let (t2, _) = standby.wait_for("SILENT", Duration::from_secs(5));
    let bound = Duration::from_millis(300 + 50 + 250);
    assert!(t1 - cut <= bound && t2 - cut <= bound, "partition noticed after {:?} / {:?}", t1 - cut, t2 - cut);

    // Heal: the old channel delivers nothing more; a fresh handshake would be needed.
    net.iptables(&net.a, &["-F"]);
    let after_p = primary.drain_for(Duration::from_secs(1));
    let after_s = standby.drain_for(Duration::from_millis(100));
    for l in after_p.iter().chain(&after_s) {
        assert!(!l.starts_with("MSG") && !l.starts_with("CHECKPOINT"), "delivered after the partition: {l}");
    }
}

fn closed_for_violation(bad: Message) {
    let (p, s) = pair("violation", ChannelConfig::default());
    p.send(&bad).unwrap();
    // The standby closes the connection with a protocol error; both ends see it closed.
    match next(&s) {
        Event::Closed { reason } => assert!(!reason.is_empty()),
        other => panic!("{other:?} instead of a close after {bad:?}"),
    }
    loop {
        match next(&p) {
            Event::Closed { .. } => break,
            Event::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(p.send(&Message::Ack { epoch: 1 }).is_err());
}

#[test]
fn a_second_hello_closes_the_channel() {
    closed_for_violation(Message::Hello {
        version: transport::message::PROTOCOL_VERSION,
        role: Role::Primary,
        session: 9,
        meta: vec![],
    });
}

#[test]
fn a_checkpoint_announced_out_of_order_closes_the_channel() {
    let (p, s) = pair("order", ChannelConfig::default());
    p.send_checkpoint(5, &b"five"[..]).unwrap();
    assert!(matches!(next(&s), Event::Checkpoint { epoch: 5, .. }));
    // Epoch 3 after 5: the standby must refuse it rather than apply an older state. It may
    // close before the sender has even announced it, so the send itself may fail.
    let _ = p.send_checkpoint(3, &b"three"[..]);
    loop {
        match next(&s) {
            Event::Closed { .. } => break,
            Event::Checkpoint { epoch, .. } => panic!("checkpoint {epoch} delivered out of order"),
            _ => {}
        }
    }
}
