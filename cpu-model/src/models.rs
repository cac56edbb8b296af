//! The named models smpft offers: a small table of QEMU's x86 models, each the list of features
//! QEMU 7.2 gives it (version 1 of each), so `-cpu NAME` exposes what it exposes under QEMU.
//!
//! A model sets feature bits only. The vendor, family, model and stepping, the brand string and
//! the cache and topology leaves stay the host's: they describe the processor the guest really
//! runs on (a kernel picks its errata workarounds from them), which QEMU would replace.

/// A named CPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub name: &'static str,
    /// The model's features, by QEMU's names (see `features::FEATURES`).
    pub features: &'static [&'static str],
}

/// The i686 and x86-64 baseline every model below has.
#[cfg(test)]
const BASE: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca", "cmov", "pat", "pse36",
    "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm",
];

macro_rules! model {
    ($name:literal, [$($extra:literal),* $(,)?]) => {
        Model { name: $name, features: &concat_features!($($extra),*) }
    };
}

macro_rules! concat_features {
    ($($extra:literal),*) => {
        [
            "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca", "cmov", "pat",
            "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm", $($extra),*
        ]
    };
}

/// The models (besides `host` and `max`, the host's CPU as KVM offers it). QEMU's `qemu64` and
/// `EPYC` also list `svm`; smpft offers no nested virtualization, so its `qemu64` leaves it out
/// (QEMU drops it silently under KVM too) and `EPYC` needs it like QEMU's `enforce` does.
pub const MODELS: &[Model] = &[
    model!("qemu64", ["pni", "cx16", "lahf-lm"]),
    model!("kvm64", ["pni", "cx16"]),
    model!(
        "Skylake-Client",
        [
            "vme",
            "pni",
            "pclmulqdq",
            "ssse3",
            "fma",
            "cx16",
            "pcid",
            "sse4.1",
            "sse4.2",
            "x2apic",
            "movbe",
            "popcnt",
            "tsc-deadline",
            "aes",
            "xsave",
            "avx",
            "f16c",
            "rdrand",
            "arat",
            "fsgsbase",
            "bmi1",
            "hle",
            "avx2",
            "smep",
            "bmi2",
            "erms",
            "invpcid",
            "rtm",
            "rdseed",
            "adx",
            "smap",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "rdtscp",
            "lahf-lm",
            "abm",
            "3dnowprefetch"
        ]
    ),
    model!(
        "Skylake-Server",
        [
            "vme",
            "pni",
            "pclmulqdq",
            "ssse3",
            "fma",
            "cx16",
            "pcid",
            "sse4.1",
            "sse4.2",
            "x2apic",
            "movbe",
            "popcnt",
            "tsc-deadline",
            "aes",
            "xsave",
            "avx",
            "f16c",
            "rdrand",
            "arat",
            "fsgsbase",
            "bmi1",
            "hle",
            "avx2",
            "smep",
            "bmi2",
            "erms",
            "invpcid",
            "rtm",
            "rdseed",
            "adx",
            "smap",
            "clflushopt",
            "clwb",
            "avx512f",
            "avx512dq",
            "avx512bw",
            "avx512cd",
            "avx512vl",
            "pku",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "rdtscp",
            "pdpe1gb",
            "lahf-lm",
            "abm",
            "3dnowprefetch"
        ]
    ),
    model!(
        "Cascadelake-Server",
        [
            "vme",
            "pni",
            "pclmulqdq",
            "ssse3",
            "fma",
            "cx16",
            "pcid",
            "sse4.1",
            "sse4.2",
            "x2apic",
            "movbe",
            "popcnt",
            "tsc-deadline",
            "aes",
            "xsave",
            "avx",
            "f16c",
            "rdrand",
            "arat",
            "fsgsbase",
            "bmi1",
            "hle",
            "avx2",
            "smep",
            "bmi2",
            "erms",
            "invpcid",
            "rtm",
            "rdseed",
            "adx",
            "smap",
            "clflushopt",
            "clwb",
            "avx512f",
            "avx512dq",
            "avx512bw",
            "avx512cd",
            "avx512vl",
            "pku",
            "avx512vnni",
            "spec-ctrl",
            "ssbd",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "rdtscp",
            "pdpe1gb",
            "lahf-lm",
            "abm",
            "3dnowprefetch"
        ]
    ),
    model!(
        "EPYC",
        [
            "vme",
            "pni",
            "pclmulqdq",
            "monitor",
            "ssse3",
            "fma",
            "cx16",
            "sse4.1",
            "sse4.2",
            "movbe",
            "popcnt",
            "aes",
            "xsave",
            "avx",
            "f16c",
            "rdrand",
            "arat",
            "fsgsbase",
            "bmi1",
            "avx2",
            "smep",
            "bmi2",
            "rdseed",
            "adx",
            "smap",
            "clflushopt",
            "sha-ni",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "mmxext",
            "fxsr-opt",
            "pdpe1gb",
            "rdtscp",
            "lahf-lm",
            "svm",
            "cr8legacy",
            "abm",
            "sse4a",
            "misalignsse",
            "3dnowprefetch",
            "osvw"
        ]
    ),
    model!(
        "EPYC-Rome",
        [
            "vme",
            "pni",
            "pclmulqdq",
            "monitor",
            "ssse3",
            "fma",
            "cx16",
            "sse4.1",
            "sse4.2",
            "movbe",
            "popcnt",
            "aes",
            "xsave",
            "avx",
            "f16c",
            "rdrand",
            "arat",
            "fsgsbase",
            "bmi1",
            "avx2",
            "smep",
            "bmi2",
            "rdseed",
            "adx",
            "smap",
            "clflushopt",
            "clwb",
            "sha-ni",
            "umip",
            "rdpid",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "xsaves",
            "mmxext",
            "fxsr-opt",
            "pdpe1gb",
            "rdtscp",
            "lahf-lm",
            "svm",
            "cr8legacy",
            "abm",
            "sse4a",
            "misalignsse",
            "3dnowprefetch",
            "osvw",
            "topoext",
            "perfctr-core",
            "clzero",
            "xsaveerptr",
            "wbnoinvd",
            "ibpb",
            "amd-stibp"
        ]
    ),
];

/// QEMU's static `base` model: no features at all (a static expansion names it, with every
/// feature given as on or off).
pub const BASE_MODEL: Model = Model { name: "base", features: &[] };

/// The models that are the host's CPU as KVM offers it (`host`, and QEMU's `max`, the same
/// under KVM).
pub const HOST_MODELS: [&str; 2] = ["host", "max"];

/// The model called `name` (QEMU compares model names exactly; so does smpft).
pub fn find(name: &str) -> Option<&'static Model> {
    MODELS.iter().chain([&BASE_MODEL]).find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_names_known_features_once_and_has_the_baseline() {
        for m in MODELS {
            for (i, f) in m.features.iter().enumerate() {
                assert!(crate::features::find(f).is_some(), "{}: unknown feature {f}", m.name);
                assert!(!m.features[i + 1..].contains(f), "{}: {f} twice", m.name);
            }
            assert!(BASE.iter().all(|b| m.features.contains(b)), "{}", m.name);
            assert_eq!(find(m.name), Some(m));
        }
        assert!(find("skylake-client").is_none() && find("Haswell").is_none());
        let sky = find("Skylake-Client").unwrap().features;
        assert!(sky.contains(&"avx2") && !sky.contains(&"avx512f") && !sky.contains(&"ss"));
        assert!(find("Skylake-Server").unwrap().features.contains(&"avx512f"));
        assert!(!find("kvm64").unwrap().features.contains(&"lahf-lm"));
    }
}
