//! `--metrics ADDR`: the observer's figures as OpenMetrics text (the `prometheus-client`
//! crate's encoder), served over HTTP by one std thread. A scrape reads atomics and histograms
//! only; labels `vm`, `uuid` and `role` (the role now: a standby that went live reports as a
//! primary from then on).

use super::{get, Observer, Role, PRIMARY_STATES, STANDBY_STATES};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Content type of the OpenMetrics text format (Prometheus asks for it first).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for clients that do not ask for OpenMetrics (curl,
/// `promtool check metrics`).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug)]
struct FtCollector;

type Labels = Vec<(&'static str, String)>;

fn labels(o: &Observer) -> (Labels, Role) {
    let (vm, uuid) = o.vm();
    let (role, _, _) = o.now();
    (vec![("vm", vm), ("uuid", uuid), ("role", role.name().to_string())], role)
}

/// Writes one metric with the copy's labels (and `extra`).
fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, &dyn EncodeMetric)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = series.first() else { return Ok(()) };
    let mut m = enc.encode_descriptor(name, help, None, first.metric_type())?;
    for (l, metric) in series {
        metric.encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn refs(v: &[(Labels, ConstCounter)]) -> Vec<(Labels, &dyn EncodeMetric)> {
    v.iter().map(|(l, c)| (l.clone(), c as &dyn EncodeMetric)).collect()
}

fn with(base: &Labels, extra: &[(&'static str, &str)]) -> Labels {
    let mut l = base.clone();
    l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    l
}

/// A metric read at scrape time.
enum Scalar {
    Gauge(f64),
    Counter(u64),
    /// A counter of seconds.
    Seconds(f64),
}

/// The single-series figures: (name, help, value).
fn scalars(o: &Observer) -> Vec<(&'static str, &'static str, Scalar)> {
    use Scalar::*;
    let f = &o.figures;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    let (p, u) = o.protection_times();
    let age = o.last_checkpoint_age().map_or(f64::NAN, |d| d.as_secs_f64());
    vec![
        ("smpft_generation", "Tie-breaker generation this copy holds or last saw", Gauge(g(&f.generation) as f64)),
        ("smpft_epoch", "Last checkpoint acknowledged (primary) or applied (standby)", Gauge(g(&f.epoch) as f64)),
        ("smpft_checkpoints", "Checkpoints taken (primary) or received (standby)", Counter(g(&f.checkpoints))),
        ("smpft_log_bytes", "Bytes of FT log sent (primary) or received (standby)", Counter(g(&f.log_bytes))),
        ("smpft_dirty_page_bytes", "Dirty page bytes captured for checkpoints", Counter(g(&f.dirty_bytes))),
        ("smpft_wire_page_bytes", "What encoding made of the dirty page bytes", Counter(g(&f.wire_bytes))),
        (
            "smpft_wire_dirty_ratio",
            "Page bytes sent per dirty page byte captured",
            Gauge(g(&f.wire_bytes) as f64 / g(&f.dirty_bytes).max(1) as f64),
        ),
        (
            "smpft_throttle_ratio",
            "Share of vCPU time the output-latency brake takes",
            Gauge(g(&f.throttle_percent) as f64 / 100.0),
        ),
        (
            "smpft_standby_lag_seconds",
            "Age of the oldest checkpoint the standby has not acknowledged",
            Gauge(o.lag().as_secs_f64()),
        ),
        ("smpft_last_checkpoint_age_seconds", "Time since the last checkpoint", Gauge(age)),
        (
            "smpft_disk_mirrored_bytes",
            "Disk write bytes mirrored to the standby (streamed as they complete, or in checkpoints)",
            Counter(g(&f.disk_mirrored)),
        ),
        ("smpft_disk_staged_bytes", "Disk write bytes the standby staged from checkpoints", Counter(g(&f.disk_staged))),
        ("smpft_failovers", "Times this copy went live after its primary failed", Counter(g(&f.failovers))),
        ("smpft_switchovers", "Planned switchovers this copy took part in", Counter(g(&f.switchovers))),
        ("smpft_standby_replacements", "Standbys replaced for lagging", Counter(g(&f.replacements))),
        ("smpft_protected_seconds", "Time the VM ran protected by a standby", Seconds(p.as_secs_f64())),
        ("smpft_unprotected_seconds", "Time the VM ran without a standby", Seconds(u.as_secs_f64())),
    ]
}

impl Collector for FtCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let o = get();
        let f = &o.figures;
        let (l, role) = labels(o);
        let (_, state, _) = o.now();
        let names = if role == Role::Primary { PRIMARY_STATES } else { STANDBY_STATES };
        let states: Vec<(Labels, ConstGauge<i64>)> =
            names.iter().map(|s| (with(&l, &[("state", s)]), ConstGauge::new(i64::from(*s == state)))).collect();
        let series: Vec<(Labels, &dyn EncodeMetric)> =
            states.iter().map(|(l, g)| (l.clone(), g as &dyn EncodeMetric)).collect();
        one(&mut enc, "smpft_ft_state", "1 for the copy's FT state now, 0 for the others", &series)?;
        for (name, help, v) in scalars(o) {
            match v {
                Scalar::Gauge(v) => one(&mut enc, name, help, &[(l.clone(), &ConstGauge::new(v))])?,
                Scalar::Counter(v) => one(&mut enc, name, help, &[(l.clone(), &ConstCounter::new(v))])?,
                Scalar::Seconds(v) => one(&mut enc, name, help, &[(l.clone(), &ConstCounter::new(v))])?,
            }
        }
        let histograms = [
            ("smpft_checkpoint_pause_seconds", "Time the vCPUs stood still for a checkpoint", &f.pause),
            ("smpft_output_hold_seconds", "Time guest output was held until its checkpoint was acknowledged", &f.hold),
            ("smpft_ack_latency_seconds", "Checkpoint taken to its acknowledgement by the standby", &f.ack),
        ];
        for (name, help, h) in histograms {
            one(&mut enc, name, help, &[(l.clone(), h)])?;
        }
        let claims: Vec<(Labels, ConstCounter)> = ["won", "lost", "unreachable"]
            .iter()
            .zip(&f.claims)
            .map(|(o, c)| (with(&l, &[("outcome", o)]), ConstCounter::new(c.load(Relaxed))))
            .collect();
        one(&mut enc, "smpft_tiebreak_claims", "Tie-breaker claims by outcome", &refs(&claims))?;
        nics(o, &l, &mut enc)
    }
}

/// Frames per NIC: sent, received, and dropped (held output discarded, the tap refused, no
/// room in the guest).
fn nics(o: &Observer, l: &Labels, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let nics: Vec<(String, [u64; 5])> = o.nics().into_iter().map(|(n, read)| (n, read())).collect();
    if nics.is_empty() {
        return Ok(());
    }
    let per = |i: usize, extra: &[(&'static str, &str)]| -> Vec<(Labels, ConstCounter)> {
        nics.iter()
            .map(|(n, v)| (with(l, &[&[("nic", n.as_str())], extra].concat()), ConstCounter::new(v[i])))
            .collect()
    };
    one(enc, "smpft_nic_tx_frames", "Frames the guest sent, per NIC", &refs(&per(0, &[])))?;
    one(enc, "smpft_nic_rx_frames", "Frames given to the guest, per NIC", &refs(&per(1, &[])))?;
    let mut dropped = per(2, &[("reason", "held")]);
    dropped.extend(per(3, &[("reason", "tap")]));
    dropped.extend(per(4, &[("reason", "rx")]));
    one(
        enc,
        "smpft_nic_frames_dropped",
        "Frames dropped per NIC: held output never released, the tap refused, no room in the guest",
        &refs(&dropped),
    )
}

/// The scrape's text.
pub fn encode() -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FtCollector));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out = "# EOF\n".into();
    }
    out
}

/// OpenMetrics text as the classic Prometheus text format: a counter family is named with its
/// `_total` (as its samples are), and there is no `# EOF`.
pub fn to_prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open.len() + 64 * counters.len());
    for line in open.lines() {
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or(line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta.and_then(|(k, rest)| rest.split_once(' ').map(|(name, tail)| (k, name, tail))) {
            Some((k, name, tail)) if counters.contains(name) => out.push_str(&format!("{k}{name}_total {tail}\n")),
            _ if line == "# EOF" => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Serves `/metrics` on `addr` from a thread of its own, for the life of the process (it holds
/// no VM resource; the process ends it).
pub fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        confine::enter(confine::Kind::Metrics);
        for conn in listener.incoming().flatten() {
            if let Err(e) = answer(conn) {
                tracing::debug!("metrics: {e}");
            }
        }
    })?;
    tracing::info!(%local, "serving metrics on http://{local}/metrics");
    Ok(local)
}

fn answer(conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    r.read_line(&mut request)?;
    // The headers, to the empty line: only Accept matters.
    let (mut line, mut openmetrics) = (String::new(), false);
    while r.read_line(&mut line)? > 2 {
        let l = line.to_ascii_lowercase();
        openmetrics |= l.starts_with("accept:") && l.contains("application/openmetrics-text");
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match (request.split_whitespace().next(), path) {
        (Some("GET"), "/metrics" | "/") if openmetrics => ("200 OK", OPENMETRICS, encode()),
        (Some("GET"), "/metrics" | "/") => ("200 OK", PROMETHEUS_TEXT, to_prometheus_text(&encode())),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_every_metric_and_ends_in_eof() {
        get().set_vm("vm1", Some("1234"));
        get().pause(Duration::from_micros(300));
        let text = encode();
        for name in
            ["smpft_ft_state{", "smpft_checkpoint_pause_seconds_bucket{", "smpft_failovers_total{", "vm=\"vm1\""]
        {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let classic = to_prometheus_text(&text);
        assert!(classic.contains("# TYPE smpft_failovers_total counter\n"), "{classic}");
        assert!(classic.contains("# TYPE smpft_checkpoint_pause_seconds histogram\n"));
        assert!(!classic.contains("# EOF"));
    }
}
