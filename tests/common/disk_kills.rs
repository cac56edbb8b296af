//! The SIGKILL trials of the disk tests (virtio-blk's and virtio-scsi's alike): a protected
//! guest writes its disk flat out, the primary is killed at a chosen moment, the standby goes
//! live, the failover client finds nothing acknowledged lost, and the guest, told to exit,
//! reads its whole disk back on the promoted copy.

use super::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side};
use super::VmPaths;
use smpft_client::FailoverClient;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// When the primary dies.
pub struct Kill {
    pub what: String,
    /// The fault the primary's test hooks arm (none: SIGKILL `after_ms` after protection).
    pub primary: Option<String>,
    /// The fault the standby's test hooks arm.
    pub standby: Option<String>,
    pub after_ms: u64,
}

impl Kill {
    /// Trial `n`'s kill, in turn: right after a send, right after a disk write left on the
    /// stream (its epoch not yet sealed), right after an acknowledgement, while the standby
    /// writes a committed epoch to its storage, and at random; `r` draws the moments.
    pub fn nth(n: u64, r: &mut impl FnMut(u64) -> u64) -> Kill {
        let k = 3 + r(30);
        let (what, primary, standby) = match n % 6 {
            0 => (format!("kill after send #{k}"), Some(format!("kill-after-send:{k}")), None),
            1 => (format!("kill after streamed write #{k}"), Some(format!("kill-after-stream:{k}")), None),
            2 | 3 => (format!("kill right after ack #{k}"), Some(format!("kill-after-ack:{k}")), None),
            4 => (
                format!("kill while the standby writes epoch #{k}"),
                Some(format!("kill-after-ack:{k}")),
                Some(format!("stall-apply:{k}:200")),
            ),
            _ => (String::new(), None, None),
        };
        let after_ms = if primary.is_none() { r(500) } else { 0 };
        let what = if primary.is_none() { format!("SIGKILL {after_ms} ms after protection") } else { what };
        Kill { what: format!("trial {n} ({what})"), primary, standby, after_ms }
    }
}

/// The environment that arms `fault` in a copy's test hooks.
pub fn hooks(fault: &Option<String>) -> Vec<(&'static str, String)> {
    fault.iter().map(|f| ("SMPFT_TEST_HOOKS", format!("fault={f}"))).collect()
}

/// The guest's last words, for failure messages.
pub fn console_tail(p: &VmPaths) -> String {
    let c = p.console();
    let lines: Vec<&str> = c.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// One trial: `smpft standby STANDBY...` and `smpft run PRIMARY...` (each with its FT options),
/// killed as `kill` says. Returns the promoted copy's console once its guest has exited cleanly.
pub fn run(setup: &FtSetup, name: &str, kill: &Kill, standby: &[&str], primary: &[&str]) -> String {
    let what = &kill.what;
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths(&format!("p{name}")), setup.paths(&format!("s{name}")));
    let (p_hooks, s_hooks) = (hooks(&kill.primary), hooks(&kill.standby));
    let p_env: Vec<(&str, &str)> = p_hooks.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s_env: Vec<(&str, &str)> = s_hooks.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let side = |primary: bool, env| {
        let (me, peer) = if primary { (&setup.a, &setup.b) } else { (&setup.b, &setup.a) };
        Side { me, peer, tiebreak: &setup.tiebreak, env, netns: None }
    };
    let sb = spawn(&sp, &side(false, &s_env), &[&["standby", "--listen", &addr][..], standby].concat());
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let mut pr = spawn(&pp, &side(true, &p_env), &[&["run", "--ft-peer", &addr][..], primary].concat());
    let mut client = FailoverClient::new(vec![pp.serial.clone(), sp.serial.clone()], 1);
    if kill.primary.is_none() {
        // (With a fault armed the primary may be gone before anyone asks it.)
        wait_state(&pp, "protected", Duration::from_secs(30));
        let until = Instant::now() + Duration::from_millis(kill.after_ms);
        while Instant::now() < until {
            client.incr(Duration::from_secs(20)).unwrap();
        }
        pr.sigkill();
    }
    let status = wait_exit(pr, Duration::from_secs(60));
    assert_eq!(status.signal(), Some(9), "{what}: primary ended otherwise\n{}", log(&pp));
    wait_state(&sp, "live-after-failover", Duration::from_secs(15));
    for _ in 0..20 {
        client
            .incr(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what}: {e}\nguest:\n{}\n{}", console_tail(&sp), log(&sp)));
    }
    assert_eq!(client.connected_to, Some(1), "{what}: the client talks to the promoted copy");
    let bye = client.exit().unwrap_or_else(|e| panic!("{what}: EXIT: {e}"));
    assert_eq!(Some(bye), client.last, "{what}: nothing acknowledged was lost or rolled back");
    let status = wait_exit(sb, Duration::from_secs(60));
    let (tail, log) = (console_tail(&sp), log(&sp));
    assert_eq!(status.code(), Some(0), "{what}: the guest's disk check on the promoted copy\n{tail}\n{log}");
    sp.console()
}

/// The units each vCPU of the guest said it verified at the end.
pub fn verified(console: &str) -> u64 {
    console.lines().filter_map(|l| l.split(" verified ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum()
}
