//! The guest's CPU: QEMU's x86 CPU models and feature names (`-cpu MODEL,+feat,-feat`), and
//! the CPUID a model makes of what the host's KVM offers. Pure: no KVM here, the VMM passes the
//! host's CPUID in and sets what comes out.
//!
//! A feature asked for (`+feat`, `feat=on`) that the host cannot give is refused, naming it.
//! A model's own features the host lacks are refused too with `enforce` (libvirt's
//! `check='full'`); without it they are left out and named ([`CpuSpec::left_out`]), as QEMU's
//! default `check` does. Nothing is dropped silently. `host` (and `max`, the same under KVM) is the host's CPUID as KVM offers
//! it, with the features asked for added or removed. A named model ([`models::MODELS`]) exposes
//! exactly its features in the feature words it defines ([`features::MODEL_WORDS`]), plus or
//! minus those asked for; every other leaf stays the host's.

pub mod features;
pub mod models;

use features::{Feature, Reg, Word, FEATURES, MODEL_WORDS};
use models::Model;

/// One CPUID leaf (sub-leaf `index` of `function`) and its four output registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl Leaf {
    fn get(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }

    fn reg(&mut self, r: Reg) -> &mut u32 {
        match r {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

/// Why a CPU cannot be given to the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    #[error("CPU model '{0}' is not known to smpft (it has {list})", list = model_names().join(", "))]
    UnknownModel(String),
    #[error("CPU feature '{0}' is not known to smpft")]
    UnknownFeature(String),
    #[error("CPU property '{0}' is not supported")]
    Property(String),
    #[error("{what} needs what this host's KVM does not offer: {missing}", missing = .missing.join(", "))]
    Missing { what: String, missing: Vec<&'static str> },
}

/// Every model name smpft answers to.
pub fn model_names() -> Vec<&'static str> {
    let named = models::MODELS.iter().chain([&models::BASE_MODEL]).map(|m| m.name);
    models::HOST_MODELS.iter().copied().chain(named).collect()
}

/// A guest CPU as `-cpu` describes it: a model and the features added and removed, in order.
/// The default is the host's CPU as KVM offers it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuSpec {
    /// `None`: the host's CPU (`host`, `max`).
    pub model: Option<&'static Model>,
    /// Each feature asked for, and whether on (later entries win).
    pub changes: Vec<(&'static Feature, bool)>,
    /// `enforce`: the model's features the host lacks are refused, not left out.
    pub enforce: bool,
}

/// Properties QEMU's CPUs have that change nothing smpft shows the guest, with the values
/// smpft accepts: `migratable` (smpft's guests migrate only as FT pairs, whose CPUID is
/// compared), `check` (smpft always names what it leaves out), `kvm=on` (KVM's leaves are
/// shown). `enforce` is read apart.
const PROPERTIES: &[(&str, &[&str])] = &[
    ("migratable", &["on", "off", "true", "false", "yes", "no"]),
    ("check", &["on", "off", "true", "false", "yes", "no"]),
    ("kvm", &["on", "true", "yes"]),
];

fn switch(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

impl CpuSpec {
    /// Reads `-cpu`'s value: `MODEL[,+FEAT|,-FEAT|,FEAT=on|off|,FEAT|,PROP=VALUE]...`.
    pub fn parse(text: &str) -> Result<CpuSpec, CpuError> {
        let mut items = text.split(',');
        let name = items.next().unwrap_or_default();
        let model = match name {
            n if models::HOST_MODELS.contains(&n) => None,
            n => Some(models::find(n).ok_or_else(|| CpuError::UnknownModel(n.to_string()))?),
        };
        let mut changes = Vec::new();
        let mut enforce = false;
        for item in items.filter(|i| !i.is_empty()) {
            if let Some(v) =
                item.strip_prefix("enforce").and_then(|v| v.strip_prefix('=').or(v.is_empty().then_some("on")))
            {
                enforce = switch(v).ok_or_else(|| CpuError::Property(item.to_string()))?;
                continue;
            }
            if item == "check" {
                continue;
            }
            let (name, on) = match (item.strip_prefix('+'), item.strip_prefix('-'), item.split_once('=')) {
                (Some(f), ..) => (f, true),
                (_, Some(f), _) => (f, false),
                (.., Some((k, v))) => {
                    if let Some((_, ok)) = PROPERTIES.iter().find(|(p, _)| *p == k) {
                        if ok.contains(&v) {
                            continue;
                        }
                        return Err(CpuError::Property(item.to_string()));
                    }
                    match switch(v) {
                        Some(on) => (k, on),
                        None => return Err(CpuError::Property(item.to_string())),
                    }
                }
                _ => (item, true),
            };
            let f = features::find(name).ok_or_else(|| CpuError::UnknownFeature(name.to_string()))?;
            changes.push((f, on));
        }
        Ok(CpuSpec { model, changes, enforce })
    }

    /// The model's name (`host` for the host's CPU).
    pub fn model_name(&self) -> &'static str {
        self.model.map_or("host", |m| m.name)
    }

    /// The guest's CPUID from the `host`'s (what KVM offers, before per-vCPU details), or
    /// which model or features the host lacks.
    pub fn guest_cpuid(&self, host: &[Leaf]) -> Result<Vec<Leaf>, CpuError> {
        let mut out = self.wanted(host);
        // As QEMU, on the result: a model's feature turned off is not needed.
        let lacking = |f: &&Feature| has(&out, f) && !has(host, f);
        let asked: Vec<_> =
            self.changes.iter().filter(|(_, on)| *on).map(|(f, _)| *f).filter(lacking).map(|f| f.name).collect();
        if !asked.is_empty() {
            return Err(CpuError::Missing { what: format!("CPU '{self}'"), missing: asked });
        }
        let missing: Vec<_> = FEATURES.iter().filter(lacking).collect();
        if self.enforce && !missing.is_empty() {
            let missing = missing.iter().map(|f| f.name).collect();
            return Err(CpuError::Missing { what: format!("CPU model '{}'", self.model_name()), missing });
        }
        for f in missing {
            let v = read(&out, f.word);
            write(&mut out, f.word, v & !(1 << f.bit));
        }
        // The host's CPU as it is keeps KVM's XSAVE leaf as it is.
        if self.model.is_some() || !self.changes.is_empty() {
            trim_xsave(&mut out);
        }
        Ok(out)
    }

    /// The model's features `host` lacks, which the guest goes without (refused with
    /// `enforce`, see [`CpuSpec::guest_cpuid`]).
    pub fn left_out(&self, host: &[Leaf]) -> Vec<&'static str> {
        let out = self.wanted(host);
        FEATURES.iter().filter(|f| has(&out, f) && !has(host, f)).map(|f| f.name).collect()
    }

    /// The CPUID the model and changes ask for, whether or not `host` has it.
    fn wanted(&self, host: &[Leaf]) -> Vec<Leaf> {
        let mut out = host.to_vec();
        if let Some(m) = self.model {
            let host_e1_edx = read(host, features::E1_EDX);
            for word in MODEL_WORDS {
                let mut value = model_bits(m, word);
                if word == features::E1_EDX {
                    // AMD repeats most of leaf 1's EDX here; keep the host's copy of those
                    // the model has.
                    value |= host_e1_edx & model_bits(m, features::L1_EDX) & AMD_ALIASES;
                }
                write(&mut out, word, value);
            }
        }
        for (f, on) in &self.changes {
            let v = read(&out, f.word);
            write(&mut out, f.word, if *on { v | 1 << f.bit } else { v & !(1 << f.bit) });
        }
        out
    }
}

impl std::str::FromStr for CpuSpec {
    type Err = CpuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuSpec::parse(s)
    }
}

impl std::fmt::Display for CpuSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_name())?;
        if self.enforce {
            f.write_str(",enforce")?;
        }
        self.changes.iter().try_for_each(|(feat, on)| write!(f, ",{}{}", if *on { '+' } else { '-' }, feat.name))
    }
}

/// Leaf 1 EDX bits AMD repeats in leaf 0x8000_0001 EDX.
const AMD_ALIASES: u32 = 0x0183_f3ff;

fn model_bits(m: &Model, word: Word) -> u32 {
    m.features.iter().filter_map(|n| features::find(n)).filter(|f| f.word == word).fold(0, |v, f| v | 1 << f.bit)
}

fn read(leaves: &[Leaf], w: Word) -> u32 {
    leaves.iter().find(|l| l.function == w.function && l.index == w.index).map_or(0, |l| l.get(w.reg))
}

/// Sets `w` to `value`; a leaf the host lacks is added for a value other than 0 (and the
/// features in it are then found lacking).
fn write(leaves: &mut Vec<Leaf>, w: Word, value: u32) {
    match leaves.iter_mut().find(|l| l.function == w.function && l.index == w.index) {
        Some(l) => *l.reg(w.reg) = value,
        None if value != 0 => {
            let mut l = Leaf { function: w.function, index: w.index, ..Default::default() };
            *l.reg(w.reg) = value;
            leaves.push(l);
        }
        None => {}
    }
}

/// Whether `host` offers `f`.
pub fn has(host: &[Leaf], f: &Feature) -> bool {
    read(host, f.word) & (1 << f.bit) != 0
}

/// The features of `m` that `host` does not offer (QEMU's `unavailable-features`).
pub fn unavailable(m: &Model, host: &[Leaf]) -> Vec<&'static str> {
    m.features.iter().filter_map(|n| features::find(n)).filter(|f| !has(host, f)).map(|f| f.name).collect()
}

/// Every feature smpft knows, and whether `leaves` have it.
pub fn feature_set(leaves: &[Leaf]) -> Vec<(&'static str, bool)> {
    FEATURES.iter().map(|f| (f.name, has(leaves, f))).collect()
}

/// The XSAVE state components (leaf 0xD.0 EAX) the features left out no longer need: a kernel
/// must not enable state the CPU says it lacks.
fn trim_xsave(leaves: &mut Vec<Leaf>) {
    let comps: [(&str, u32); 5] =
        [("avx", 1 << 2), ("mpx", 0b11 << 3), ("avx512f", 0b111 << 5), ("pku", 1 << 9), ("amx-tile", 0b11 << 17)];
    let mut drop = 0;
    for (name, bits) in comps {
        if features::find(name).is_some_and(|f| !has(leaves, f)) {
            drop |= bits;
        }
    }
    let w = Word { function: 0xd, index: 0, reg: Reg::Eax };
    let v = read(leaves, w);
    write(leaves, w, v & !drop);
}

/// The leaves where `a` and `b` differ, as `0xF.I` (sub-leaf `I` of function `F`), in order.
pub fn differences(a: &[Leaf], b: &[Leaf]) -> Vec<String> {
    let mut keys: Vec<(u32, u32)> = a.iter().chain(b).map(|l| (l.function, l.index)).collect();
    keys.sort_unstable();
    keys.dedup();
    let find = |s: &[Leaf], k: (u32, u32)| s.iter().find(|l| (l.function, l.index) == k).copied();
    keys.into_iter().filter(|k| find(a, *k) != find(b, *k)).map(|(f, i)| format!("{f:#x}.{i}")).collect()
}

#[cfg(test)]
mod tests;
