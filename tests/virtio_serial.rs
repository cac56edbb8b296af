//! The guest agent's channel (a virtio-serial port, `--channel`) with real KVM VMs: the test
//! guest's agent answers on it; what the guest sends is output, held while the VM is protected
//! until the standby acknowledged its checkpoint; after a failover the agent answers on the
//! standby's channel; a channel that cannot be opened is refused in one line.

mod common;
use common::ft::{free_port, log, query, spawn, wait_exit, wait_query, wait_state, FtSetup, Side};
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const AGENT: &str = "org.qemu.guest_agent.0";

/// A client of the guest agent, as libvirt is.
struct AgentClient(BufReader<UnixStream>);

impl AgentClient {
    fn connect(path: &Path) -> AgentClient {
        let s = wait_for(format!("agent socket {}", path.display()), Duration::from_secs(20), || {
            UnixStream::connect(path).ok()
        });
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        AgentClient(BufReader::new(s))
    }

    fn send(&mut self, request: &str) {
        self.0.get_mut().write_all(format!("{request}\n").as_bytes()).unwrap();
    }

    fn reply(&mut self) -> String {
        String::from_utf8_lossy(&self.reply_bytes()).into_owned()
    }

    fn reply_bytes(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.0.read_until(b'\n', &mut line).unwrap();
        line
    }

    /// libvirt's handshake then a command: guest-sync with an id until the reply carries it.
    fn command(&mut self, id: u64, request: &str) -> String {
        self.send(&format!(r#"{{"execute":"guest-sync", "arguments":{{"id":{id}}}}}"#));
        assert_eq!(self.reply().trim_end(), format!(r#"{{"return": {id}}}"#));
        self.send(request);
        self.reply()
    }

    /// Whether any reply byte is waiting now.
    fn anything_waiting(&mut self) -> bool {
        let s = self.0.get_mut();
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let got = matches!(std::io::Read::read(s, &mut b), Ok(n) if n > 0);
        s.set_nonblocking(false).unwrap();
        got || !self.0.buffer().is_empty()
    }
}

fn run(args: &[&str]) -> std::process::Output {
    smpft().arg("run").args(args).output().unwrap()
}

#[test]
fn an_agent_channel_that_cannot_be_opened_is_refused_in_one_line() {
    require_kvm();
    let d = scratch("vserial-bad");
    let file = d.join("not-a-socket");
    std::fs::write(&file, b"").unwrap();
    let f = std::fs::File::open(&file).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // The descriptor is inherited by the child (std opens it with CLOEXEC, so clear it).
    // SAFETY: F_SETFD on a descriptor this process holds.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    for (spec, says) in [
        (format!("name={AGENT},fd={fd}"), format!("on descriptor {fd}: descriptor {fd} is not a listening socket")),
        (format!("name={AGENT},fd=999"), "on descriptor 999: Bad file descriptor".to_string()),
        (format!("name={AGENT},path=/nonexistent/dir/a.sock"), "at /nonexistent/dir/a.sock: No such file".into()),
        (format!("name={AGENT},path=/tmp/x.sock,nr=0"), "nr=0: port numbers are 1 to 30".into()),
        ("path=/tmp/x.sock".to_string(), "a channel needs name=NAME".into()),
        (format!("name=a,path={}/a.sock --channel name=a,path={}/b.sock", d.display(), d.display()), "clash".into()),
    ] {
        let mut args = vec!["--memory", "64M", "--serial", "null", "--guest-args", "agent duration=1s"];
        let specs: Vec<&str> = spec.split(" --channel ").collect();
        for s in &specs {
            args.extend(["--channel", s]);
        }
        let out = run(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{spec} should fail");
        assert!(err.contains(&says), "{spec}: expected {says:?} in:\n{err}");
        assert!(!err.contains("panicked"), "{spec}:\n{err}");
        assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "one line: {err}");
    }
    drop(f);
}

#[test]
fn agent_replies_are_held_until_acknowledged_and_the_agent_answers_after_a_failover() {
    require_kvm();
    let setup = FtSetup::new("vserial-ft");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let (pa, sa) = (setup.dir.join("p-agent.sock"), setup.dir.join("s-agent.sock"));
    let channel = |p: &Path| format!("name={AGENT},path={}", p.display());
    let (pc, sc) = (channel(&pa), channel(&sa));
    let side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let args = ["standby", "--listen", &addr, "--vcpus", "2", "--memory", "128M", "--channel", &sc];
    let standby = spawn(&sp, &side, &args);
    let side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let guest = "counter churn agent churn-rate=500 churn-ws=1M duration=600s";
    let args = ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--ft-peer", &addr];
    // A long silence allowance: the standby is stopped for a while below without being
    // declared failed.
    let mut primary = spawn(&pp, &side, &[&args[..], &["--channel", &pc, "--ft-timeout", "60s"]].concat());
    wait_state(&pp, "protected", Duration::from_secs(30));
    let mut agent = AgentClient::connect(&pa);
    assert_eq!(agent.command(1, r#"{"execute":"guest-ping"}"#).trim_end(), r#"{"return": {}}"#);
    let info = agent.command(2, r#"{"execute":"guest-info"}"#);
    assert!(info.contains(r#""name": "guest-ping""#), "{info}");

    // The standby stops acknowledging: the agent's reply is produced, and held.
    signal(&standby, libc::SIGSTOP);
    agent.send(r#"{"execute":"guest-sync-delimited","arguments":{"id":77}}"#);
    let q = wait_query(&pp, "the reply is never held", Duration::from_secs(20), |q| q["held-bytes"].as_u64() > Some(0));
    assert!(!agent.anything_waiting(), "a reply held for an unacknowledged checkpoint reached the client: {q}");
    assert_eq!(query(&pp)["state"], "protected");
    signal(&standby, libc::SIGCONT);
    assert_eq!(agent.reply_bytes(), b"\xff{\"return\": 77}\n", "released once acknowledged");

    // The primary dies: the standby goes live and its channel serves the agent.
    primary.sigkill();
    let mut agent = AgentClient::connect(&sa);
    let pong = agent.command(3, r#"{"execute":"guest-ping"}"#);
    assert_eq!(pong.trim_end(), r#"{"return": {}}"#, "standby log:\n{}", log(&sp));
    agent.send(r#"{"execute":"guest-shutdown"}"#);
    assert_eq!(wait_exit(standby, Duration::from_secs(30)).code(), Some(0), "{}", log(&sp));
}
