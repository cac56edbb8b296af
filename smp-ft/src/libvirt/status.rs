//! `smpft libvirt unprotect` and `smpft libvirt status`.

use super::standby_xml;
use super::{msg, open, qmp, query_ft, settings, StatusArgs, UnprotectArgs, STANDBY_URI};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use virt::domain::Domain;
use virt::storage_vol::StorageVol;
use virt::sys;

/// How long the primary may take to let its standby go (a tie-breaker claim).
const TURN_OFF_WITHIN: Duration = Duration::from_secs(30);

pub(crate) fn unprotect(a: &UnprotectArgs) -> Result<(), String> {
    let src = open(&a.connect)?;
    let dom = super::domain(&src, &a.connect, &a.domain)?;
    let name = &a.domain;
    let s = settings(&dom)?;
    if s.as_ref().is_some_and(|s| s.get("role") == Some("standby")) {
        return Err(format!("{name} is a standby domain: unprotect its primary"));
    }
    let active = dom.is_active().map_err(|e| msg(&e))?;
    let live = if active { Some(query_ft(&dom)?) } else { None };
    let live_state = live.as_ref().and_then(|q| q["state"].as_str().map(str::to_string));
    if s.is_none() && live_state.as_deref().is_none_or(|st| st == "unprotected") {
        return Err(format!("{name} is not protected"));
    }
    if active {
        turn_off(&dom)?;
        println!("{name}: protection turned off; it runs on unprotected");
    }
    let standby_uri = s.as_ref().and_then(|s| s.get(STANDBY_URI)).map(str::to_string);
    let mut left = None;
    match &standby_uri {
        Some(uri) => {
            if let Err(e) = remove_standby(uri, name, a.delete_storage) {
                left = Some(e);
            }
        }
        None => println!("{name}: its metadata names no standby host; the standby domain, if any, is left as it is"),
    }
    if s.is_some() {
        let persistent = dom.is_persistent().unwrap_or(false);
        let mut flags = if persistent { sys::VIR_DOMAIN_AFFECT_CONFIG } else { 0 };
        if active {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        let ns = crate::persona::libvirt_ft::NAMESPACE;
        dom.set_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, None, None, Some(ns), flags)
            .map_err(|e| format!("clearing {name}'s FT metadata: {}", msg(&e)))?;
        println!("{name}: FT metadata cleared");
    }
    match left {
        Some(e) => Err(format!("{name} is unprotected, but its standby was not removed: {e}")),
        None => Ok(()),
    }
}

/// QMP `x-smpft-unprotect`, then waits until the primary has let its standby go.
fn turn_off(dom: &Domain) -> Result<(), String> {
    qmp(dom, "x-smpft-unprotect", None)?;
    let since = Instant::now();
    loop {
        let q = query_ft(dom)?;
        match q["state"].as_str().unwrap_or_default() {
            "unprotected" | "live-after-failover" => return Ok(()),
            "halted" => return Err("the primary lost the tie-breaker while letting its standby go".into()),
            state if since.elapsed() > TURN_OFF_WITHIN => {
                return Err(format!(
                    "the primary is still {state} after {TURN_OFF_WITHIN:?} ({})",
                    q["last-error"].as_str().unwrap_or("no error reported")
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Stops and undefines the standby domain `name` at `uri`; its volumes too if asked.
fn remove_standby(uri: &str, name: &str, delete_storage: bool) -> Result<(), String> {
    let dst = open(uri)?;
    let standby = match Domain::lookup_by_name(&dst, name) {
        Ok(d) => d,
        Err(e) => {
            println!("{name}: no standby domain at {uri} ({})", msg(&e));
            return Ok(());
        }
    };
    let xml = standby.get_xml_desc(0).map_err(|e| msg(&e))?;
    let disks = standby_xml::needs(&xml)?.disks;
    if standby.is_active().unwrap_or(false) {
        standby.destroy().map_err(|e| format!("stopping the standby domain at {uri}: {}", msg(&e)))?;
    }
    standby.undefine().map_err(|e| format!("undefining the standby domain at {uri}: {}", msg(&e)))?;
    println!("{name}: standby domain at {uri} stopped and undefined");
    for d in disks.iter().filter(|d| !d.network) {
        if !delete_storage {
            println!("{name}: kept the standby's copy of disk {} ({})", d.target, d.source);
            continue;
        }
        let vol = StorageVol::lookup_by_path(&dst, &d.source).map_err(|e| {
            format!("the standby's disk {} ({}) is no volume at {uri}: {}", d.target, d.source, msg(&e))
        })?;
        vol.delete(0).map_err(|e| format!("deleting {} at {uri}: {}", d.source, msg(&e)))?;
        println!("{name}: deleted the standby's copy of disk {} ({})", d.target, d.source);
    }
    Ok(())
}

pub(crate) fn status(a: &StatusArgs) -> Result<(), String> {
    let conn = open(&a.connect)?;
    let domains = conn.list_all_domains(0).map_err(|e| format!("listing the domains at {}: {}", a.connect, msg(&e)))?;
    let mut rows = Vec::new();
    for dom in domains {
        let Ok(Some(s)) = settings(&dom) else { continue };
        rows.push(describe(&dom, &s));
    }
    rows.sort_by(|x, y| x["vm"].as_str().cmp(&y["vm"].as_str()));
    if rows.is_empty() && !a.json {
        println!("no domain at {} has FT settings", a.connect);
    }
    for v in rows {
        match a.json {
            true => println!("{v}"),
            false => match v[STANDBY_URI].as_str() {
                Some(uri) => println!("{} standby-at={uri}", smp_ft::observe::status::line(&v)),
                None => println!("{}", smp_ft::observe::status::line(&v)),
            },
        }
    }
    Ok(())
}

/// One domain as `smpft status` shows a copy: from its FT figures if it runs, else its
/// metadata.
fn describe(dom: &Domain, s: &crate::persona::libvirt_ft::Settings) -> Value {
    let name = dom.get_name().unwrap_or_default();
    let peer = s.get("peer").or(s.get("listen")).map(str::to_string);
    let mut v = json!({"vm": name, "role": s.get("role"), "peer": peer, "state": "shut-off"});
    if dom.is_active().unwrap_or(false) {
        match query_ft(dom) {
            Ok(q) => {
                for k in [
                    "state",
                    "generation",
                    "lag-ms",
                    "last-checkpoint-age-ms",
                    "protected-for-ms",
                    "output-hold-p99-us",
                ] {
                    v[k] = q[k].clone();
                }
                if !q["peer"].is_null() {
                    v["peer"] = q["peer"].clone();
                }
            }
            Err(e) => v["state"] = json!(format!("unreachable ({e})")),
        }
    }
    if let Some(uri) = s.get(STANDBY_URI) {
        v["standby-uri"] = json!(uri);
    }
    v
}
