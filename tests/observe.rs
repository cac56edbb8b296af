//! What operators see of an FT pair: the metrics endpoint (checked by promtool, scraped by a
//! real Prometheus through a SIGKILL failover), the event program and the SMPFT_FT_STATE QMP
//! event, `smpft status` (a stale socket included) and the alert rules.

mod common;

use common::ft::{background_client, free_port, log, spawn, wait_state, FtSetup, Side, GUEST};
use common::{require_kvm, wait_for, Proc};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn curl(url: &str) -> String {
    let o = Command::new("curl").args(["-sf", "--max-time", "5", url]).output().unwrap();
    assert!(o.status.success(), "curl {url}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// promtool accepts a scrape of `port` (saved as `name` in `dir`); returns it.
fn promtool_accepts(dir: &Path, port: u16, name: &str) -> String {
    let text = curl(&format!("http://127.0.0.1:{port}/metrics"));
    std::fs::write(dir.join(name), &text).unwrap();
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && said.trim().is_empty(), "promtool check metrics on {name}: {said}\n{text}");
    text
}

/// The event program: appends its environment as one line of `SMPFT_*` pairs to `out`; on
/// `hang_on` it sleeps (to be killed at its timeout), on `fail_on` it exits 3.
fn hook(dir: &Path, name: &str, out: &Path, hang_on: &str, fail_on: &str) -> PathBuf {
    let p = dir.join(name);
    let script = format!(
        "#!/bin/sh\necho \"$(env | grep ^SMPFT_ | sort | tr '\\n' ' ')\" >> {out}\n\
         [ \"$SMPFT_EVENT\" = {hang_on} ] && exec sleep 60\n[ \"$SMPFT_EVENT\" = {fail_on} ] && exit 3\nexit 0\n",
        out = out.display()
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p
}

/// `smpft status --json` with the runtime directory `dir`.
fn status(dir: &Path) -> Vec<Value> {
    let o = common::smpft().env("SMPFT_RUNTIME_DIR", dir).args(["status", "--json"]).output().unwrap();
    assert!(o.status.success(), "status: {}", common::stderr(&o));
    serde_json::from_slice::<Value>(&o.stdout).unwrap().as_array().unwrap().clone()
}

/// A Prometheus server scraping `targets` every 200 ms, stopped by pid when dropped.
struct Prometheus {
    _proc: Proc,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[u16]) -> Prometheus {
        let port = tcp_port();
        let targets: Vec<String> = targets.iter().map(|t| format!("'127.0.0.1:{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - job_name: smpft\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { _proc: Proc::new(child), port };
        let ready = || Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/-/ready")]).output();
        common::wait_until("Prometheus did not become ready", Duration::from_secs(30), || {
            ready().is_ok_and(|o| o.status.success())
        });
        p
    }

    /// An instant PromQL query over the HTTP API: its result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let o = Command::new("curl")
            .args(["-sf", "--max-time", "5", &format!("http://127.0.0.1:{}/api/v1/query", self.port)])
            .args(["--data-urlencode", &format!("query={q}")])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        assert_eq!(v["status"], "success", "query {q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `q` returns a series whose value is `want`.
    fn wait_value(&self, q: &str, want: &str) -> Vec<Value> {
        wait_for(format!("Prometheus never saw {q} = {want}"), Duration::from_secs(30), || {
            let r = self.query(q);
            r.iter().any(|s| s["value"][1] == want).then_some(r)
        })
    }
}

/// Events the QMP server at `qmp` sends from now on, collected in the background.
fn qmp_events(qmp: &Path) -> std::sync::mpsc::Receiver<Value> {
    let s = std::os::unix::net::UnixStream::connect(qmp).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (&s).write_all(b"{\"execute\": \"qmp_capabilities\"}\n").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _keep = s;
        line.clear();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.get("event").is_some() && tx.send(v).is_err() {
                    return;
                }
            }
            line.clear();
        }
    });
    rx
}

#[test]
fn a_pair_is_seen_through_a_failover_by_prometheus_hooks_qmp_and_status() {
    require_kvm();
    let _serial = common::one_at_a_time();
    let setup = FtSetup::new("observe-failover");
    let dir = setup.dir.to_path_buf();
    let run = dir.join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let (pm, sm) = (tcp_port(), tcp_port());
    let (p_events, s_events) = (dir.join("p-events"), dir.join("s-events"));
    let p_hook = hook(&dir, "p-hook", &p_events, "none", "protected");
    let s_hook = hook(&dir, "s-hook", &s_events, "live-after-failover", "none");
    let env = [("SMPFT_RUNTIME_DIR", run.to_str().unwrap())];
    let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &env, netns: None };
    let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &env, netns: None };
    let (sm_addr, pm_addr) = (format!("127.0.0.1:{sm}"), format!("127.0.0.1:{pm}"));
    let common_args = ["--name", "obs", "--uuid", "6f1c0c1e-0000-4000-8000-000000000032", "--on-event-timeout", "2s"];
    let s_args = ["standby", "--listen", &addr, "--vcpus", "4", "--memory", "128M", "--metrics", &sm_addr];
    let _standby =
        spawn(&sp, &s_side, &[&s_args[..], &common_args, &["--on-event", s_hook.to_str().unwrap()]].concat());
    let p_args = ["run", "--vcpus", "4", "--memory", "128M", "--guest-args", GUEST, "--ft-peer", &addr];
    let p_more = ["--metrics", &pm_addr, "--on-event", p_hook.to_str().unwrap(), "--log-format", "json"];
    let mut primary = spawn(&pp, &p_side, &[&p_args[..], &common_args, &p_more].concat());
    wait_state(&pp, "protected", Duration::from_secs(30));
    let client = background_client(vec![pp.serial.clone(), sp.serial.clone()]);
    client.wait_replies(20, Duration::from_secs(20));
    let prom = Prometheus::start(&dir, &[pm, sm]);

    // Both copies' scrapes pass promtool; the primary's says protected, with checkpoints.
    let text = promtool_accepts(&dir, pm, "primary.txt");
    assert!(
        text.contains(
            r#"smpft_ft_state{vm="obs",uuid="6f1c0c1e-0000-4000-8000-000000000032",role="primary",state="protected"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("smpft_checkpoint_pause_seconds_bucket{"), "{text}");
    // Held output and acknowledgements were measured (the client's replies went through the gate).
    let count = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(count("smpft_output_hold_seconds_count{") > 0.0, "{text}");
    assert!(count("smpft_ack_latency_seconds_count{") > 0.0, "{text}");
    let text = promtool_accepts(&dir, sm, "standby.txt");
    assert!(text.contains(r#"role="standby",state="standby"} 1"#), "{text}");

    // smpft status: both copies, one line each.
    let st = status(&run);
    assert_eq!(st.len(), 2, "{st:?}");
    let by_role = |st: &[Value], r: &str| st.iter().find(|v| v["role"] == r).cloned().unwrap_or(Value::Null);
    assert_eq!(by_role(&st, "primary")["state"], "protected", "{st:?}");
    assert_eq!(by_role(&st, "standby")["state"], "standby", "{st:?}");
    assert!(by_role(&st, "primary")["generation"].is_u64() && by_role(&st, "primary")["vm"] == "obs", "{st:?}");

    prom.wait_value(r#"smpft_ft_state{vm="obs",role="primary",state="protected"}"#, "1");
    let events = qmp_events(&sp.qmp);
    primary.sigkill();
    wait_state(&sp, "live-after-failover", Duration::from_secs(20));
    client.wait_replies(20, Duration::from_secs(20));
    let _client = client.finish_or(|| log(&sp));

    // The QMP event.
    let ev = wait_for("no SMPFT_FT_STATE event on the standby", Duration::from_secs(10), || {
        events.recv_timeout(Duration::from_secs(10)).ok().filter(|e| e["event"] == "SMPFT_FT_STATE")
    });
    assert_eq!(ev["data"]["event"], "live-after-failover", "{ev}");
    assert_eq!(ev["data"]["vm"], "obs", "{ev}");

    // Prometheus saw the failover and the state change.
    let r = prom.wait_value(r#"smpft_failovers_total{vm="obs"}"#, "1");
    assert_eq!(r[0]["metric"]["role"], "primary", "the promoted standby reports as the primary: {r:?}");
    prom.wait_value(r#"smpft_ft_state{vm="obs",role="primary",state="live-after-failover"}"#, "1");
    let was = prom.query(r#"max_over_time(smpft_ft_state{vm="obs",state="protected"}[5m])"#);
    assert!(was.iter().any(|s| s["value"][1] == "1"), "protected before: {was:?}");
    // Every dashboard expression is valid PromQL.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/monitoring/smpft-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let q = t["expr"].as_str().unwrap().replace("$vm", ".*").replace("$__rate_interval", "1m");
            prom.query(&q);
        }
    }
    promtool_accepts(&dir, sm, "failed-over.txt");

    // The hooks: the standby's ran on going live with the pair's variables, hung and was
    // killed at its timeout, and going live did not wait for it; the primary's failed, logged.
    let s_log = wait_for("the hanging hook was not killed", Duration::from_secs(20), || {
        let l = log(&sp);
        l.contains("killed at its timeout").then_some(l)
    });
    let live_at = s_log.find("VM running (live after failover)").expect("go-live logged");
    let killed_at = s_log.find("killed at its timeout").unwrap();
    assert!(live_at < killed_at, "go-live waited for the hook:\n{s_log}");
    let s_ev = std::fs::read_to_string(&s_events).unwrap();
    let live = s_ev.lines().find(|l| l.contains("SMPFT_EVENT=live-after-failover")).unwrap_or_else(|| panic!("{s_ev}"));
    for var in ["SMPFT_VM=obs", "SMPFT_ROLE=primary", "SMPFT_GENERATION=1", "SMPFT_UUID=6f1c0c1e"] {
        assert!(live.contains(var), "{var} in {live}");
    }
    assert!(live.contains("SMPFT_PEER=127.0.0.1:"), "the primary it protected: {live}");
    assert!(s_ev.contains("SMPFT_EVENT=protected"), "{s_ev}");
    let p_ev = std::fs::read_to_string(&p_events).unwrap();
    assert!(p_ev.contains("SMPFT_EVENT=protected") && p_ev.contains("SMPFT_ROLE=primary"), "{p_ev}");
    let p_log = log(&pp);
    let failed =
        p_log.lines().find(|l| l.contains("event hook") && l.contains("failed")).unwrap_or_else(|| panic!("{p_log}"));
    let json: Value = serde_json::from_str(failed).unwrap_or_else(|e| panic!("--log-format json: {e}: {failed}"));
    assert_eq!(json["level"], "WARN", "{json}");
    assert!(json["message"].as_str().unwrap().contains("exit status: 3"), "{json}");

    // status: the killed primary's socket is stale, the new primary live.
    let st = status(&run);
    assert_eq!(st.len(), 2, "{st:?}");
    assert!(st.iter().any(|v| v["state"] == "stale"), "{st:?}");
    assert_eq!(by_role(&st, "primary")["state"], "live-after-failover", "{st:?}");
    let o = common::smpft().env("SMPFT_RUNTIME_DIR", &run).arg("status").output().unwrap();
    let lines = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && lines.lines().count() == 2 && lines.contains("obs stale"), "{lines}");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let o = Command::new("promtool")
        .args(["check", "rules", concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/monitoring/smpft-alerts.yml")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_stale_socket_is_reported_as_such() {
    let dir = common::scratch("observe-stale");
    let sock = dir.join("gone.4242.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let st = status(&dir);
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!((st[0]["vm"].as_str(), st[0]["state"].as_str()), (Some("gone"), Some("stale")), "{st:?}");
}

/// The events of `file` (one hook run a line), in order.
fn hook_events(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("SMPFT_EVENT=")).map(str::to_string))
        .collect()
}

#[test]
fn a_switchover_and_the_end_of_the_vm_run_the_hooks() {
    require_kvm();
    let _serial = common::one_at_a_time();
    let setup = FtSetup::new("observe-switchover");
    let dir = setup.dir.to_path_buf();
    let (a_addr, b_addr) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (ap, bp) = (setup.paths("a"), setup.paths("b"));
    let (a_ev, b_ev) = (dir.join("a-events"), dir.join("b-events"));
    let (a_hook, b_hook) = (hook(&dir, "a-hook", &a_ev, "none", "none"), hook(&dir, "b-hook", &b_ev, "none", "none"));
    let vm = ["--vcpus", "2", "--memory", "128M", "--name", "sw"];
    let b_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let a_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: None };
    let b_args =
        [&["standby", "--listen", &b_addr][..], &vm, &["--ft-peer", &a_addr, "--on-event", b_hook.to_str().unwrap()]];
    let b = spawn(&bp, &b_side, &b_args.concat());
    wait_state(&bp, "waiting", Duration::from_secs(10));
    let a_args = [&["run", "--guest-args", GUEST][..], &vm, &["--ft-peer", &b_addr, "--then-standby", &a_addr]];
    let a = spawn(&ap, &a_side, &[&a_args.concat()[..], &["--on-event", a_hook.to_str().unwrap()]].concat());
    wait_state(&ap, "protected", Duration::from_secs(20));
    let r = common::Qmp::negotiated(&ap.qmp).execute("x-smpft-switchover", None);
    assert!(r.get("return").is_some(), "{r}\n{}", log(&ap));
    // B runs the VM and protects it with A, which waits as its standby.
    wait_state(&bp, "protected", Duration::from_secs(20));
    wait_for("A's hook saw the switchover and protection again", Duration::from_secs(10), || {
        let e = hook_events(&a_ev);
        e.ends_with(&["switched-over".to_string(), "protected".to_string()]).then_some(())
    });
    wait_for("B's hook saw the switchover", Duration::from_secs(10), || {
        hook_events(&b_ev).contains(&"switched-over".to_string()).then_some(())
    });
    let b_text = std::fs::read_to_string(&b_ev).unwrap();
    let took = b_text.lines().find(|l| l.contains("SMPFT_EVENT=switched-over")).unwrap();
    assert!(took.contains("SMPFT_ROLE=primary") && took.contains("SMPFT_VM=sw"), "{took}");
    // The VM ends on B: A's copy stands down.
    common::Qmp::negotiated(&bp.qmp).execute("quit", None);
    common::ft::wait_exit(b, Duration::from_secs(20));
    common::ft::wait_exit(a, Duration::from_secs(20));
    let a_events = hook_events(&a_ev);
    assert_eq!(a_events.last().map(String::as_str), Some("stood-down"), "{a_events:?}\n{}", log(&ap));
}
