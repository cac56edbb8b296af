//! `smpft status`: each VM copy on this host, from the QMP sockets copies register in the
//! runtime directory (`$SMPFT_RUNTIME_DIR`, else `/run/smpft/qmp`), or the sockets named.
//! A copy registers its `--qmp` socket as a symbolic link `NAME.PID.sock` there and removes it
//! when it ends; one that was killed leaves it behind, and status reports it as stale.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where copies register their QMP sockets.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("SMPFT_RUNTIME_DIR").map_or_else(|| PathBuf::from("/run/smpft/qmp"), PathBuf::from)
}

/// A registration, removed when dropped (or left behind by a copy that was killed).
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Registers `qmp` (this copy's socket) under the VM's name. Failure is logged, not fatal: the
/// VM runs the same without it.
pub fn register(name: &str, qmp: &Path) -> Option<Registration> {
    let dir = runtime_dir();
    let link = dir.join(format!("{}.{}.sock", name.replace('/', "_"), std::process::id()));
    let target = std::path::absolute(qmp).unwrap_or_else(|_| qmp.to_path_buf());
    let made = std::fs::create_dir_all(&dir).and_then(|()| {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
    });
    match made {
        Ok(()) => Some(Registration(link)),
        Err(e) => {
            tracing::warn!("cannot register the QMP socket in {} for smpft status: {e}", dir.display());
            None
        }
    }
}

/// The sockets registered in `dir` (entries that are sockets or links), sorted.
pub fn registered(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.file_type().is_symlink() || std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// One command on a QMP socket, with short timeouts and no retry.
fn query(path: &Path) -> Result<Value, String> {
    let s = UnixStream::connect(path).map_err(|e| e.to_string())?;
    let t = Some(Duration::from_secs(3));
    s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut w = s;
    let mut next = || -> Result<Value, String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("connection closed".into());
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad JSON: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    next()?;
    for cmd in ["qmp_capabilities", "x-smpft-query-ft"] {
        w.write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes()).map_err(|e| e.to_string())?;
        let v = next()?;
        if let Some(e) = v.get("error") {
            return Err(e["desc"].as_str().unwrap_or("error").to_string());
        }
        if cmd != "qmp_capabilities" {
            return Ok(v["return"].clone());
        }
    }
    unreachable!("the loop returns")
}

/// What status says of one socket: the copy's figures, or why there are none.
pub fn describe(path: &Path) -> Value {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let vm = name.split('.').next().unwrap_or_default().to_string();
    match query(path) {
        Ok(q) => json!({
            "socket": path,
            "vm": q.get("vm").cloned().unwrap_or(json!(vm)),
            "role": q["role"],
            "state": q["state"],
            "peer": q["peer"],
            "generation": q["generation"],
            "lag-ms": q["lag-ms"],
            "last-checkpoint-age-ms": q["last-checkpoint-age-ms"],
            "protected-for-ms": q["protected-for-ms"],
            "output-hold-p99-us": q["output-hold-p99-us"],
        }),
        Err(e) => {
            let refused = std::fs::metadata(path).is_err() || e.contains("refused") || e.contains("No such file");
            json!({"socket": path, "vm": vm, "state": if refused { "stale" } else { "unreachable" }, "error": e})
        }
    }
}

fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn ms(v: &Value, key: &str, unit_ms: f64) -> String {
    v[key].as_f64().map_or("-".into(), |x| format!("{:.1}s", x * unit_ms / 1000.0))
}

/// One line for a human.
pub fn line(v: &Value) -> String {
    if v.get("error").is_some() {
        return format!("{} {} ({}): {}", field(v, "vm"), field(v, "state"), field(v, "socket"), field(v, "error"));
    }
    format!(
        "{} {} {} peer={} generation={} lag={} last-checkpoint={} ago protected-for={} hold-p99={}",
        field(v, "vm"),
        field(v, "role"),
        field(v, "state"),
        field(v, "peer"),
        field(v, "generation"),
        ms(v, "lag-ms", 1.0),
        ms(v, "last-checkpoint-age-ms", 1.0),
        ms(v, "protected-for-ms", 1.0),
        ms(v, "output-hold-p99-us", 0.001),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_nobody_listens_on_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm1.1.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert_eq!(registered(dir.path()).unwrap(), vec![p.clone()]);
        let v = describe(&p);
        assert_eq!(v["state"], "stale", "{v}");
        assert_eq!(v["vm"], "vm1");
        assert!(line(&v).starts_with("vm1 stale"), "{}", line(&v));
    }
}
