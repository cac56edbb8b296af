//! Loopback comparison, in one run: bulk throughput and small-message round trip for the QUIC
//! channel (default, with the ACK frequency extension, on one bulk stream), for rustls over TCP
//! (the fair baseline: same TLS 1.3 and keys) and for plain TCP (the ceiling), with UDP datagrams
//! per send call and the receiver's packets per 100 sent. As root, each MTU (1500, then 9000 for
//! a jumbo-frame link) runs in a network namespace of its own whose loopback has that MTU, so QUIC
//! and both TCP baselines see the same link; otherwise only the host's loopback is measured.
//! Prints a table (run: `cargo bench -p transport --bench channel`).
//! `SMPFT_BENCH_QUICK=1` moves less data.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::identity::{tls_client, tls_server};
use transport::{Channel, ChannelConfig, Event, Identity, Listener, Message, PeerTrust};

const PING: usize = 64;

struct Row {
    name: String,
    /// QUIC only: UDP datagrams per send call, and the receiver's datagrams per 100 received.
    udp: Option<(f64, f64)>,
    gbps: f64,
    p50: f64,
    p99: f64,
    /// CPU time of the whole process during the bulk transfer ÷ its wall time.
    cores: f64,
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by getrusage.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
}

fn quic(name: &str, cfg: ChannelConfig, total: u64, pings: usize, ids: &(Identity, Identity)) -> Row {
    let (p, s) = ids;
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), s, &PeerTrust::Cert(p.cert.to_vec()), cfg.clone()).unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || listener.accept(Some(Duration::from_secs(10)), 2, vec![]).unwrap());
    let primary = Channel::connect(addr, p, &PeerTrust::Cert(s.cert.to_vec()), cfg, 1, vec![]).unwrap();
    let standby = t.join().unwrap();
    const CHECKPOINT: usize = 64 << 20;
    let count = total / CHECKPOINT as u64;
    let echo = std::thread::spawn(move || {
        let mut got = 0;
        let mut pongs = 0;
        let mut replies = transport::UdpSent::default();
        while got < count || pongs < pings {
            match standby.events().recv().unwrap() {
                Event::Checkpoint { epoch, data } => {
                    assert_eq!(data.len(), CHECKPOINT);
                    got += 1;
                    standby.send(&Message::Ack { epoch }).unwrap();
                    if got == count {
                        replies = standby.udp_sent();
                    }
                }
                Event::Message(Message::App { kind, data }) => {
                    standby.send(&Message::App { kind, data }).unwrap();
                    pongs += 1;
                }
                Event::Message(_) => {}
                other => panic!("{other:?}"),
            }
        }
        (standby, replies)
    });
    let data = bytes::Bytes::from(vec![0x5au8; CHECKPOINT]);
    let (start, cpu0, udp0) = (Instant::now(), cpu_time(), primary.udp_sent());
    for epoch in 1..=count {
        primary.send_checkpoint(epoch, data.clone()).unwrap();
    }
    // Done when the last checkpoint is acknowledged.
    loop {
        if let Event::Message(Message::Ack { epoch }) = primary.events().recv().unwrap() {
            if epoch == count {
                break;
            }
        }
    }
    let gbps = total as f64 / start.elapsed().as_secs_f64() / 1e9;
    let cores = (cpu_time() - cpu0).as_secs_f64() / start.elapsed().as_secs_f64();
    let udp1 = primary.udp_sent();
    let (datagrams, calls) = (udp1.datagrams - udp0.datagrams, (udp1.calls - udp0.calls).max(1));
    let mut rtts = Vec::new();
    for i in 0..pings {
        let t = Instant::now();
        primary.send(&Message::App { kind: 1, data: vec![i as u8; PING] }).unwrap();
        loop {
            if let Event::Message(Message::App { .. }) = primary.events().recv().unwrap() {
                break;
            }
        }
        rtts.push(t.elapsed());
    }
    let (standby, replies) = echo.join().unwrap();
    primary.close(0, "benchmark done");
    drop(standby);
    let udp = Some((datagrams as f64 / calls as f64, replies.datagrams as f64 * 100.0 / datagrams.max(1) as f64));
    Row { name: name.into(), udp, gbps, p50: pct(&mut rtts, 0.5), p99: pct(&mut rtts, 0.99), cores }
}

/// Bulk then ping-pong over any stream pair built by `connect`/`accept`.
fn stream_bench<A: Read + Write + Send + 'static, C: Read + Write>(
    name: &str,
    total: u64,
    pings: usize,
    accept: impl FnOnce(TcpStream) -> A + Send + 'static,
    connect: impl FnOnce(TcpStream) -> C,
) -> Row {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut s = accept(tcp);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n as u64;
        }
        s.write_all(&[1]).unwrap();
        s.flush().unwrap();
        let mut ping = [0u8; PING];
        for _ in 0..pings {
            s.read_exact(&mut ping).unwrap();
            s.write_all(&ping).unwrap();
            s.flush().unwrap();
        }
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut c = connect(tcp);
    let block = vec![0x5au8; 1 << 20];
    let (start, cpu0) = (Instant::now(), cpu_time());
    let mut sent = 0u64;
    while sent < total {
        c.write_all(&block).unwrap();
        sent += block.len() as u64;
    }
    c.flush().unwrap();
    let mut done = [0u8; 1];
    c.read_exact(&mut done).unwrap();
    let gbps = total as f64 / start.elapsed().as_secs_f64() / 1e9;
    let cores = (cpu_time() - cpu0).as_secs_f64() / start.elapsed().as_secs_f64();
    let mut rtts = Vec::new();
    let mut ping = [7u8; PING];
    for _ in 0..pings {
        let t = Instant::now();
        c.write_all(&ping).unwrap();
        c.flush().unwrap();
        c.read_exact(&mut ping).unwrap();
        rtts.push(t.elapsed());
    }
    server.join().unwrap();
    Row { name: name.into(), udp: None, gbps, p50: pct(&mut rtts, 0.5), p99: pct(&mut rtts, 0.99), cores }
}

/// Moves this thread (and the threads and processes it starts later) into a new network
/// namespace whose loopback has MTU `mtu`. Needs root.
fn private_loopback(mtu: u32) -> Result<(), String> {
    // SAFETY: unshare only changes this thread's namespaces; no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
    }
    let st = std::process::Command::new("ip")
        .args(["link", "set", "lo", "mtu", &mtu.to_string(), "up"])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    st.success().then_some(()).ok_or_else(|| format!("ip link set lo mtu {mtu} up: {st}"))
}

/// Every transport at one link MTU (`None`: the host's loopback as it is).
fn run_all(mtu: Option<u32>, total: u64, pings: usize, ids: &(Identity, Identity)) -> Vec<Row> {
    // QUIC's UDP payload on this link: the MTU less the IPv4 and UDP headers.
    let payload = mtu.map_or(1452, |m| (m.min(65535) - 28) as u16);
    let base = ChannelConfig { mtu: payload, max_mtu: payload, ..ChannelConfig::default() };
    let (p, s) = (ids.0.clone(), ids.1.clone());
    let mut rows = vec![
        quic(&format!("QUIC, {payload}-byte datagrams"), base.clone(), total, pings, ids),
        quic("  + ACK after 8 packets", ChannelConfig { ack_threshold: Some(8), ..base.clone() }, total, pings, ids),
        quic("  + one bulk stream", ChannelConfig { bulk_streams: 1, ..base }, total, pings, ids),
    ];
    let server_cfg = Arc::new(tls_server(&s, &PeerTrust::Cert(p.cert.to_vec())).unwrap());
    let client_cfg = Arc::new(tls_client(&p, &PeerTrust::Cert(s.cert.to_vec())).unwrap());
    rows.push(stream_bench(
        "rustls over TCP (TLS 1.3)",
        total,
        pings,
        move |tcp| rustls::StreamOwned::new(rustls::ServerConnection::new(server_cfg).unwrap(), tcp),
        move |tcp| {
            let name = rustls::pki_types::ServerName::try_from("smpft-peer").unwrap();
            rustls::StreamOwned::new(rustls::ClientConnection::new(client_cfg, name).unwrap(), tcp)
        },
    ));
    rows.push(stream_bench("plain TCP", total, pings, |t| t, |t| t));
    rows
}

fn print(mtu: Option<u32>, rows: &[Row]) {
    match mtu {
        Some(m) => println!("\nloopback MTU {m} (own network namespace)"),
        None => println!("\nthe host's loopback (not root: no namespace of its own)"),
    }
    println!(
        "{:<34} | {:>6} {:>6} | {:>9} {:>9} | {:>8} {:>8}",
        "transport", "GB/s", "cores", "RTT p50", "RTT p99", "dgram/tx", "rx/100"
    );
    println!("{:-<34}-+-{:-<13}-+-{:-<19}-+-{:-<17}", "", "", "", "");
    for r in rows {
        let (d, a) = r.udp.map_or(("-".into(), "-".into()), |(d, a)| (format!("{d:.1}"), format!("{a:.1}")));
        println!(
            "{:<34} | {:>6.2} {:>6.2} | {:>9.1} {:>9.1} | {:>8} {:>8}",
            r.name, r.gbps, r.cores, r.p50, r.p99, d, a
        );
    }
    let tls = rows[3].gbps;
    println!("QUIC ÷ TLS-over-TCP throughput: {:.2} (best QUIC row {:.2})", rows[0].gbps / tls, {
        rows[..3].iter().map(|r| r.gbps).fold(0.0, f64::max) / tls
    });
}

fn main() {
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let total: u64 = if quick { 256 << 20 } else { 2 << 30 };
    let pings = if quick { 200 } else { 2000 };
    let ids = (Identity::generate("primary", 1).unwrap().0, Identity::generate("standby", 1).unwrap().0);
    println!("\nFT logging channel: {} MiB bulk, {pings} round trips of {PING} bytes", total >> 20);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mtus: Vec<Option<u32>> = if root { vec![Some(1500), Some(9000)] } else { vec![None] };
    for mtu in mtus {
        if let Some(m) = mtu {
            if let Err(e) = private_loopback(m) {
                println!("\ncannot measure at MTU {m}: {e}");
                continue;
            }
        }
        let rows = run_all(mtu, total, pings, &ids);
        print(mtu, &rows);
    }
    println!("(cores: CPU time of both ends ÷ wall time during the bulk transfer; RTT in µs;");
    println!(" dgram/tx: UDP datagrams per send call; rx/100: the receiver's datagrams per 100 received)");
}
