//! Whether a record's holder still answers, for `smpft tiebreak clear`: clearing the record of
//! a copy that runs the VM would let a stale copy win its next claim.
//!
//! A holder is named `HOST:PID` unless `--ft-owner` named it otherwise. What the name allows to
//! be checked is:
//! - `…/stopped`: the copy ended the VM on purpose; nobody holds it.
//! - `HOST:PID` for this host: it answers if process PID runs smpft here.
//! - another host (`HOST:PID`, or any name whose part before the last `:` is a host): it answers
//!   if the host does: it resolves, and a TCP connection to its SSH port is accepted or refused
//!   (a refusal is an answer) within a second. A host that is up is taken to keep the copy
//!   alive, since whether the process runs cannot be seen from here.
//! - a name for this host without a process id: it cannot be told, and counts as answering.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The port a remote holder's host is asked on: a refusal proves the host up as well.
const PROBE_PORT: u16 = 22;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The VM was ended on purpose by the holder.
    Stopped,
    /// The holder (or its host) answers; why we think so.
    Answers(String),
    /// Nothing answers; what was tried.
    Silent(String),
}

/// This host's name, as the default owner name has it.
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// Whether `holder` still answers (see the module documentation).
pub fn answers(holder: &str) -> Liveness {
    if holder.ends_with(super::STOPPED) {
        return Liveness::Stopped;
    }
    let (host, pid) = match holder.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u32>().ok()),
        None => (holder, None),
    };
    let me = this_host();
    if host == me || host == "host" && me.is_empty() {
        return match pid {
            Some(pid) if runs_smpft(pid) => Liveness::Answers(format!("process {pid} on this host runs smpft")),
            Some(pid) => Liveness::Silent(format!("no smpft process {pid} runs on this host")),
            None => Liveness::Answers(format!("'{holder}' names this host without a process id; cannot tell")),
        };
    }
    host_answers(host)
}

fn runs_smpft(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "smpft")
}

fn host_answers(host: &str) -> Liveness {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = match (bare, PROBE_PORT).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Liveness::Silent(format!("host '{host}' does not resolve ({e})")),
    };
    let mut tried = Vec::new();
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, PROBE_TIMEOUT) {
            Ok(_) => return Liveness::Answers(format!("host {host} answers ({addr} accepted a connection)")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Liveness::Answers(format!("host {host} answers ({addr} refused a connection)"))
            }
            Err(e) => tried.push(format!("{addr}: {e}")),
        }
    }
    Liveness::Silent(format!("host {host} does not answer ({})", tried.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_that_answer_and_holders_that_do_not() {
        assert_eq!(answers("host-a:12/stopped"), Liveness::Stopped);
        let me = this_host();
        let this = format!("{me}:{}", std::process::id());
        // The unit test binary is not smpft: a live process of another program is no holder.
        assert!(matches!(answers(&this), Liveness::Silent(_)), "{:?}", answers(&this));
        assert!(matches!(answers(&format!("{me}:4294967295")), Liveness::Silent(_)));
        assert!(matches!(answers(&me), Liveness::Answers(_)), "cannot tell: counts as answering");
        // Loopback answers (accepting or refusing port 22); a name that does not resolve does not.
        assert!(matches!(answers("127.0.0.1:1"), Liveness::Answers(_)), "{:?}", answers("127.0.0.1:1"));
        let gone = answers("no-such-host.invalid:5");
        assert!(matches!(&gone, Liveness::Silent(w) if w.contains("does not resolve")), "{gone:?}");
    }
}
