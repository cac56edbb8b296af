//! Loopback comparison, in one run: bulk throughput and small-message round trip for the QUIC
//! channel, for rustls over TCP (the fair baseline: same TLS 1.3 and keys) and for plain TCP (the
//! ceiling). Prints a table (run: `cargo bench -p transport --bench channel`).
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
        while got < count || pongs < pings {
            match standby.events().recv().unwrap() {
                Event::Checkpoint { epoch, data } => {
                    assert_eq!(data.len(), CHECKPOINT);
                    got += 1;
                    standby.send(&Message::Ack { epoch }).unwrap();
                }
                Event::Message(Message::App { kind, data }) => {
                    standby.send(&Message::App { kind, data }).unwrap();
                    pongs += 1;
                }
                Event::Message(_) => {}
                other => panic!("{other:?}"),
            }
        }
        standby
    });
    let data = bytes::Bytes::from(vec![0x5au8; CHECKPOINT]);
    let (start, cpu0) = (Instant::now(), cpu_time());
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
    let standby = echo.join().unwrap();
    primary.close(0, "benchmark done");
    drop(standby);
    Row { name: name.into(), gbps, p50: pct(&mut rtts, 0.5), p99: pct(&mut rtts, 0.99), cores }
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
    Row { name: name.into(), gbps, p50: pct(&mut rtts, 0.5), p99: pct(&mut rtts, 0.99), cores }
}

fn main() {
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let total: u64 = if quick { 256 << 20 } else { 2 << 30 };
    let pings = if quick { 200 } else { 2000 };
    let ids = (Identity::generate("primary", 1).unwrap().0, Identity::generate("standby", 1).unwrap().0);
    let (p, s) = (ids.0.clone(), ids.1.clone());
    let mut rows = Vec::new();
    rows.push(quic("QUIC channel (default, 1452-byte packets)", ChannelConfig::default(), total, pings, &ids));
    rows.push(quic(
        "QUIC channel (jumbo, 8952-byte packets)",
        ChannelConfig { mtu: 8952, max_mtu: 8952, ..ChannelConfig::default() },
        total,
        pings,
        &ids,
    ));
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
    println!("\nFT logging channel on loopback: {} MiB bulk, {pings} round trips of {PING} bytes", total >> 20);
    println!("{:<42} | {:>6} {:>6} | {:>9} {:>9}", "transport", "GB/s", "cores", "RTT p50", "RTT p99");
    println!("{:-<42}-+-{:-<13}-+-{:-<19}", "", "", "");
    for r in &rows {
        println!("{:<42} | {:>6.2} {:>6.2} | {:>9.1} {:>9.1}", r.name, r.gbps, r.cores, r.p50, r.p99);
    }
    let tls = rows[2].gbps;
    println!("(cores: CPU time of both ends ÷ wall time during the bulk transfer; RTT in µs)");
    println!("QUIC ÷ TLS-over-TCP throughput: default {:.2}, jumbo {:.2}", rows[0].gbps / tls, rows[1].gbps / tls);
}
