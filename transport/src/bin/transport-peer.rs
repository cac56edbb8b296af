//! One end of an FT logging channel in its own process, for tests that kill or partition a real
//! peer. Prints one line per event on stdout:
//! `READY <addr>`, `CONNECTED <peer>`, `SILENT <ms>`, `CLOSED <reason>`, `MSG <name>`,
//! `CHECKPOINT <epoch> <bytes>`.
//!
//! usage: transport-peer standby|primary ADDR IDENTITY_DIR PEER_CERT [HEARTBEAT_MS SILENCE_MS]

use std::io::Write;
use std::time::Duration;
use transport::{Channel, ChannelConfig, Event, Identity, Listener, Message, PeerTrust};

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: transport-peer standby|primary ADDR IDENTITY_DIR PEER_CERT [HEARTBEAT_MS SILENCE_MS]");
        std::process::exit(2);
    }
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("transport-peer: {e}");
        std::process::exit(1)
    };
    let addr = args[2].parse().unwrap_or_else(|e| fail(&e));
    let id = Identity::load(args[3].as_ref()).unwrap_or_else(|e| fail(&e));
    let trust = PeerTrust::parse(&args[4]).unwrap_or_else(|e| fail(&e));
    let mut cfg = ChannelConfig::default();
    if let (Some(h), Some(s)) = (args.get(5), args.get(6)) {
        cfg.heartbeat = Duration::from_millis(h.parse().unwrap_or_else(|e| fail(&e)));
        cfg.silence_timeout = Duration::from_millis(s.parse().unwrap_or_else(|e| fail(&e)));
    }
    let ch = match args[1].as_str() {
        "standby" => {
            let l = Listener::bind(addr, &id, &trust, cfg).unwrap_or_else(|e| fail(&e));
            out(&format!("READY {}", l.local_addr()));
            let ch = l.accept(None, 2, vec![]).unwrap_or_else(|e| fail(&e));
            // Keep the listener: a fresh handshake after a failure would come through it.
            std::mem::forget(l);
            ch
        }
        "primary" => Channel::connect(addr, &id, &trust, cfg, 1, vec![]).unwrap_or_else(|e| fail(&e)),
        other => fail(&format!("unknown role {other}")),
    };
    out(&format!("CONNECTED {}", ch.peer_addr()));
    let mut n = 0u64;
    loop {
        match ch.events().recv_timeout(Duration::from_millis(20)) {
            Ok(Event::PeerSilent { silent_for }) => out(&format!("SILENT {}", silent_for.as_millis())),
            Ok(Event::Closed { reason }) => {
                out(&format!("CLOSED {reason}"));
                // Stay up: the test checks that nothing arrives on this channel any more.
            }
            Ok(Event::Message(m)) => out(&format!("MSG {}", m.name())),
            Ok(Event::Data { kind, data }) => out(&format!("DATA {kind} {}", data.len())),
            Ok(Event::Checkpoint { epoch, data }) => {
                out(&format!("CHECKPOINT {epoch} {}", data.len()));
                let _ = ch.send(&Message::Ack { epoch });
            }
            Err(_) => {
                if !ch.is_closed() {
                    n += 1;
                    let _ = ch.send(&Message::App { kind: 1, data: n.to_le_bytes().to_vec() });
                }
            }
        }
    }
}
