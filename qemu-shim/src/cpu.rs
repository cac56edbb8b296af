//! libvirt's questions about guest CPUs, answered from smpft's models (`cpu_model`) and what the
//! host's KVM offers: `query-cpu-definitions` (each model, with the features this host lacks
//! for it) and `query-cpu-model-expansion` (a model, `host` included, as the features it gives
//! a guest here). libvirt builds `host-model` from the expansion of `host` and picks the named
//! model nearest to it from the definitions; both must be there, or libvirt 9.0 crashes when a
//! domain asks for `host-model`.

use crate::qmp::QmpError;
use cpu_model::{models, CpuSpec, Leaf};
use serde_json::{json, Map, Value};

/// The commands answered here.
pub const COMMANDS: [&str; 2] = ["query-cpu-definitions", "query-cpu-model-expansion"];

/// The answer to `name` if it is one of [`COMMANDS`]; `host` is what the host's KVM offers
/// (or why it could not be read).
pub fn answer(name: &str, args: &Map<String, Value>, host: Result<&[Leaf], &str>) -> Option<Result<Value, QmpError>> {
    match name {
        "query-cpu-definitions" => Some(host.map(definitions).map_err(no_host)),
        "query-cpu-model-expansion" => Some(host.map_err(no_host).and_then(|h| expansion(args, h))),
        _ => None,
    }
}

fn no_host(why: &str) -> QmpError {
    QmpError::generic(format!("the host's CPU cannot be read: {why}"))
}

fn definitions(host: &[Leaf]) -> Value {
    let host_models = models::HOST_MODELS.iter().map(|n| {
        json!({"name": n, "typename": format!("{n}-x86_64-cpu"), "static": false, "migration-safe": false,
               "deprecated": false, "unavailable-features": []})
    });
    let named = models::MODELS.iter().chain([&models::BASE_MODEL]).map(|m| {
        json!({"name": m.name, "typename": format!("{}-x86_64-cpu", m.name), "static": m.name == "base",
               "migration-safe": true, "deprecated": false,
               "unavailable-features": cpu_model::unavailable(m, host)})
    });
    Value::Array(host_models.chain(named).collect())
}

/// `{"type": "static"|"full", "model": {"name": ..., "props": {...}}}`: the model with the
/// features asked for in `props`, as every feature smpft knows on or off (a static expansion
/// names QEMU's static `base` model, a full one the model asked for), with the processor's
/// identity. Properties that are not features (`migratable`, `hv-passthrough`) change nothing
/// smpft shows and are left out.
fn expansion(args: &Map<String, Value>, host: &[Leaf]) -> Result<Value, QmpError> {
    let kind = args.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind != "static" && kind != "full" {
        return Err(QmpError::generic(format!(
            "expansion type '{kind}' is not supported: smpft expands static or full"
        )));
    }
    let model = args.get("model").and_then(Value::as_object);
    let name = model.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
    let mut text = name.to_string();
    for (k, v) in model.and_then(|m| m.get("props")).and_then(Value::as_object).into_iter().flatten() {
        if let (Some(on), Some(_)) = (v.as_bool(), cpu_model::features::find(k)) {
            text.push_str(&format!(",{}{k}", if on { '+' } else { '-' }));
        }
    }
    // As QEMU's: a model the host cannot give in full does not expand.
    text.push_str(",enforce");
    let guest = CpuSpec::parse(&text)
        .and_then(|s| s.guest_cpuid(host))
        .map_err(|e| QmpError::generic(format!("CPU model '{name}': {e}")))?;
    let mut props: Map<String, Value> =
        cpu_model::feature_set(&guest).into_iter().map(|(n, on)| (n.to_string(), Value::Bool(on))).collect();
    props.extend(identity(&guest));
    let out = if kind == "static" { "base" } else { name };
    Ok(json!({"model": {"name": out, "props": props}}))
}

/// The vendor, family, model and stepping CPUID reports (a model keeps the host's).
fn identity(leaves: &[Leaf]) -> Map<String, Value> {
    let mut m = Map::new();
    let leaf = |f| leaves.iter().find(|l| l.function == f && l.index == 0);
    if let Some(l) = leaf(0) {
        let bytes: Vec<u8> = [l.ebx, l.edx, l.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        m.insert("vendor".into(), json!(String::from_utf8_lossy(&bytes).trim_end_matches('\0')));
    }
    if let Some(l) = leaf(1) {
        let base = (l.eax >> 8) & 0xf;
        let family = if base == 0xf { base + ((l.eax >> 20) & 0xff) } else { base };
        let model = ((l.eax >> 4) & 0xf) | if base >= 6 { ((l.eax >> 16) & 0xf) << 4 } else { 0 };
        m.insert("family".into(), json!(family));
        m.insert("model".into(), json!(model));
        m.insert("stepping".into(), json!(l.eax & 0xf));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Skylake-like host: everything Skylake-Client has but TSX, and AVX-512.
    fn host() -> Vec<Leaf> {
        let mut leaves: Vec<Leaf> = [(0, 0), (1, 0), (6, 0), (7, 0), (0xd, 0), (0xd, 1), (0x8000_0001, 0)]
            .into_iter()
            .map(|(function, index)| Leaf { function, index, ..Default::default() })
            .collect();
        leaves[0] = Leaf { eax: 0xd, ebx: 0x756e_6547, edx: 0x4965_6e69, ecx: 0x6c65_746e, ..leaves[0] }; // GenuineIntel
        leaves[1].eax = 0x0005_06e3; // family 6, model 0x5e, stepping 3
        let sky = models::find("Skylake-Client").unwrap().features.iter();
        for name in sky.chain(&["avx512f"]).filter(|f| !["hle", "rtm"].contains(f)) {
            let f = cpu_model::features::find(name).unwrap();
            let l = leaves.iter_mut().find(|l| (l.function, l.index) == (f.word.function, f.word.index)).unwrap();
            let r = match f.word.reg {
                cpu_model::features::Reg::Eax => &mut l.eax,
                cpu_model::features::Reg::Ebx => &mut l.ebx,
                cpu_model::features::Reg::Ecx => &mut l.ecx,
                cpu_model::features::Reg::Edx => &mut l.edx,
            };
            *r |= 1 << f.bit;
        }
        leaves
    }

    fn ask(name: &str, args: Value) -> Result<Value, QmpError> {
        let h = host();
        answer(name, args.as_object().unwrap(), Ok(&h)).unwrap()
    }

    #[test]
    fn definitions_list_every_model_with_what_this_host_lacks() {
        let defs = ask("query-cpu-definitions", json!({})).unwrap();
        let find = |n: &str| defs.as_array().unwrap().iter().find(|d| d["name"] == n).cloned().unwrap();
        assert_eq!(find("host")["unavailable-features"], json!([]));
        assert_eq!(find("kvm64")["unavailable-features"], json!([]));
        assert_eq!(find("Skylake-Client")["unavailable-features"], json!(["hle", "rtm"]));
        assert_eq!(find("Skylake-Client")["typename"], "Skylake-Client-x86_64-cpu");
        assert!(defs.as_array().unwrap().iter().all(|d| d["name"].is_string() && d["deprecated"] == false));
    }

    #[test]
    fn expansions_give_the_features_a_guest_gets_here() {
        let s = ask("query-cpu-model-expansion", json!({"type": "static", "model": {"name": "host"}})).unwrap();
        assert_eq!(s["model"]["name"], "base");
        let p = &s["model"]["props"];
        assert_eq!((&p["avx512f"], &p["hle"], &p["hypervisor"]), (&json!(true), &json!(false), &json!(false)));
        assert_eq!((&p["vendor"], &p["family"], &p["model"]), (&json!("GenuineIntel"), &json!(6), &json!(0x5e)));
        let args =
            json!({"type": "full", "model": {"name": "host", "props": {"migratable": false, "hv-passthrough": true}}});
        let f = ask("query-cpu-model-expansion", args).unwrap();
        assert_eq!((&f["model"]["name"], &f["model"]["props"]["avx2"]), (&json!("host"), &json!(true)));
        let args = json!({"type": "full", "model": {"name": "kvm64", "props": {"sse4.1": true}}});
        let k = ask("query-cpu-model-expansion", args).unwrap();
        assert_eq!((&k["model"]["props"]["sse4.1"], &k["model"]["props"]["avx2"]), (&json!(true), &json!(false)));
        // libvirt expands the static result again, in full: QEMU's `base` with every feature.
        let args = json!({"type": "full", "model": {"name": "base", "props": s["model"]["props"].clone()}});
        let b = ask("query-cpu-model-expansion", args).unwrap();
        assert_eq!(b["model"]["props"], s["model"]["props"]);
    }

    #[test]
    fn what_cannot_be_expanded_is_an_error_naming_it() {
        let e = ask("query-cpu-model-expansion", json!({"type": "static", "model": {"name": "Skylake-Client"}}));
        assert!(e.unwrap_err().desc.contains("does not offer: hle, rtm"));
        let e = ask("query-cpu-model-expansion", json!({"type": "static", "model": {"name": "Pentium"}}));
        assert!(e.unwrap_err().desc.contains("CPU model 'Pentium' is not known to smpft"));
        let e = ask("query-cpu-model-expansion", json!({"type": "rough", "model": {"name": "host"}}));
        assert!(e.unwrap_err().desc.contains("'rough' is not supported"));
        let e = answer("query-cpu-definitions", &Map::new(), Err("no /dev/kvm")).unwrap().unwrap_err();
        assert_eq!(e.desc, "the host's CPU cannot be read: no /dev/kvm");
        assert!(answer("query-version", &Map::new(), Ok(&[])).is_none());
    }

    #[test]
    fn the_command_line_takes_a_cpu_or_names_what_is_wrong() {
        let line = |cpu: &str| -> Vec<String> {
            ["-machine", "smpft", "-accel", "kvm", "-cpu", cpu, "-m", "128"].iter().map(|s| s.to_string()).collect()
        };
        let l = crate::argv::parse(&line("Skylake-Client,ss=on,tsc_adjust=on,hle=off")).unwrap();
        assert_eq!(l.cpu.unwrap().to_string(), "Skylake-Client,+ss,+tsc-adjust,-hle");
        assert_eq!(crate::argv::parse(&line("host,migratable=on")).unwrap().cpu.unwrap().to_string(), "host");
        let e = crate::argv::parse(&line("Haswell-noTSX")).unwrap_err().to_string();
        assert!(
            e.contains("-cpu Haswell-noTSX: CPU model 'Haswell-noTSX' is not known to smpft (it has host, max"),
            "{e}"
        );
        let e = crate::argv::parse(&line("kvm64,+warp")).unwrap_err().to_string();
        assert!(e.ends_with("-cpu kvm64,+warp: CPU feature 'warp' is not known to smpft"), "{e}");
    }
}
