//! CPUID feature bits under the names QEMU gives them (`-cpu MODEL,+NAME` / `NAME=on`), with
//! the other spellings QEMU and libvirt write.

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One register of one CPUID leaf (`function`, sub-leaf `index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Word {
    pub function: u32,
    pub index: u32,
    pub reg: Reg,
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPUID.{:#x}.{}:{:?}", self.function, self.index, self.reg)
    }
}

/// A feature: one bit of one [`Word`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub word: Word,
    pub bit: u8,
}

const fn w(function: u32, index: u32, reg: Reg) -> Word {
    Word { function, index, reg }
}

pub const L1_EDX: Word = w(1, 0, Reg::Edx);
pub const L1_ECX: Word = w(1, 0, Reg::Ecx);
pub const L6_EAX: Word = w(6, 0, Reg::Eax);
pub const L7_EBX: Word = w(7, 0, Reg::Ebx);
pub const L7_ECX: Word = w(7, 0, Reg::Ecx);
pub const L7_EDX: Word = w(7, 0, Reg::Edx);
pub const L7_1_EAX: Word = w(7, 1, Reg::Eax);
pub const LD_1_EAX: Word = w(0xd, 1, Reg::Eax);
pub const KVM_EAX: Word = w(0x4000_0001, 0, Reg::Eax);
pub const E1_EDX: Word = w(0x8000_0001, 0, Reg::Edx);
pub const E1_ECX: Word = w(0x8000_0001, 0, Reg::Ecx);
pub const E7_EDX: Word = w(0x8000_0007, 0, Reg::Edx);
pub const E8_EBX: Word = w(0x8000_0008, 0, Reg::Ebx);

/// The words a named model defines completely: a named model exposes exactly its features in
/// them. (KVM's paravirtual leaf stays KVM's, as in QEMU's models.)
pub const MODEL_WORDS: [Word; 12] =
    [L1_EDX, L1_ECX, L6_EAX, L7_EBX, L7_ECX, L7_EDX, L7_1_EAX, LD_1_EAX, E1_EDX, E1_ECX, E7_EDX, E8_EBX];

macro_rules! features {
    ($($word:ident { $($bit:literal $name:literal)* })*) => {
        /// Every feature smpft knows, by QEMU's name.
        pub const FEATURES: &[Feature] = &[$($(Feature { name: $name, word: $word, bit: $bit },)*)*];
    };
}

features! {
    L1_EDX { 0 "fpu" 1 "vme" 2 "de" 3 "pse" 4 "tsc" 5 "msr" 6 "pae" 7 "mce" 8 "cx8" 9 "apic" 11 "sep"
             12 "mtrr" 13 "pge" 14 "mca" 15 "cmov" 16 "pat" 17 "pse36" 18 "pn" 19 "clflush" 21 "ds"
             22 "acpi" 23 "mmx" 24 "fxsr" 25 "sse" 26 "sse2" 27 "ss" 28 "ht" 29 "tm" 30 "ia64" 31 "pbe" }
    L1_ECX { 0 "pni" 1 "pclmulqdq" 2 "dtes64" 3 "monitor" 4 "ds-cpl" 5 "vmx" 6 "smx" 7 "est" 8 "tm2"
             9 "ssse3" 10 "cid" 12 "fma" 13 "cx16" 14 "xtpr" 15 "pdcm" 17 "pcid" 18 "dca" 19 "sse4.1"
             20 "sse4.2" 21 "x2apic" 22 "movbe" 23 "popcnt" 24 "tsc-deadline" 25 "aes" 26 "xsave"
             27 "osxsave" 28 "avx" 29 "f16c" 30 "rdrand" 31 "hypervisor" }
    L6_EAX { 2 "arat" }
    L7_EBX { 0 "fsgsbase" 1 "tsc-adjust" 2 "sgx" 3 "bmi1" 4 "hle" 5 "avx2" 7 "smep" 8 "bmi2" 9 "erms"
             10 "invpcid" 11 "rtm" 14 "mpx" 16 "avx512f" 17 "avx512dq" 18 "rdseed" 19 "adx" 20 "smap"
             21 "avx512ifma" 22 "pcommit" 23 "clflushopt" 24 "clwb" 25 "intel-pt" 26 "avx512pf"
             27 "avx512er" 28 "avx512cd" 29 "sha-ni" 30 "avx512bw" 31 "avx512vl" }
    L7_ECX { 1 "avx512vbmi" 2 "umip" 3 "pku" 4 "ospke" 5 "waitpkg" 6 "avx512vbmi2" 8 "gfni" 9 "vaes"
             10 "vpclmulqdq" 11 "avx512vnni" 12 "avx512bitalg" 14 "avx512-vpopcntdq" 16 "la57"
             22 "rdpid" 24 "bus-lock-detect" 25 "cldemote" 27 "movdiri" 28 "movdir64b" 30 "sgxlc"
             31 "pks" }
    L7_EDX { 2 "avx512-4vnniw" 3 "avx512-4fmaps" 4 "fsrm" 8 "avx512-vp2intersect" 10 "md-clear"
             14 "serialize" 16 "tsx-ldtrk" 18 "pconfig" 19 "arch-lbr" 22 "amx-bf16" 23 "avx512-fp16"
             24 "amx-tile" 25 "amx-int8" 26 "spec-ctrl" 27 "stibp" 28 "flush-l1d" 29 "arch-capabilities"
             30 "core-capability" 31 "ssbd" }
    L7_1_EAX { 4 "avx-vnni" 5 "avx512-bf16" }
    LD_1_EAX { 0 "xsaveopt" 1 "xsavec" 2 "xgetbv1" 3 "xsaves" }
    KVM_EAX { 0 "kvmclock" 1 "kvm-nopiodelay" 2 "kvm-mmu" 3 "kvmclock2" 4 "kvm-asyncpf" 5 "kvm-steal-time"
              6 "kvm-pv-eoi" 7 "kvm-pv-unhalt" 9 "kvm-pv-tlb-flush" 10 "kvm-asyncpf-vmexit"
              11 "kvm-pv-ipi" 12 "kvm-poll-control" 13 "kvm-pv-sched-yield" 14 "kvm-asyncpf-int"
              15 "kvm-msi-ext-dest-id" 24 "kvmclock-stable-bit" }
    E1_EDX { 11 "syscall" 20 "nx" 22 "mmxext" 25 "fxsr-opt" 26 "pdpe1gb" 27 "rdtscp" 29 "lm"
             30 "3dnowext" 31 "3dnow" }
    E1_ECX { 0 "lahf-lm" 1 "cmp-legacy" 2 "svm" 3 "extapic" 4 "cr8legacy" 5 "abm" 6 "sse4a"
             7 "misalignsse" 8 "3dnowprefetch" 9 "osvw" 10 "ibs" 11 "xop" 12 "skinit" 13 "wdt"
             15 "lwp" 16 "fma4" 17 "tce" 19 "nodeid-msr" 21 "tbm" 22 "topoext" 23 "perfctr-core"
             24 "perfctr-nb" }
    E7_EDX { 8 "invtsc" }
    E8_EBX { 0 "clzero" 2 "xsaveerptr" 9 "wbnoinvd" 12 "ibpb" 14 "ibrs" 15 "amd-stibp" 24 "amd-ssbd"
             25 "virt-ssbd" 26 "amd-no-ssb" }
}

/// Other spellings QEMU accepts (and libvirt writes), after [`normalize`].
const ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("sse4-1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("i64", "lm"),
    ("xd", "nx"),
    ("ffxsr", "fxsr-opt"),
    ("sha", "sha-ni"),
    ("avx512vpopcntdq", "avx512-vpopcntdq"),
    ("avx512-vnni", "avx512vnni"),
    ("avx512-bitalg", "avx512bitalg"),
    ("avx512-vbmi", "avx512vbmi"),
    ("avx512-vbmi2", "avx512vbmi2"),
    ("kvm-pv-send-ipi", "kvm-pv-ipi"),
    ("tsc-adj", "tsc-adjust"),
];

/// A feature name as QEMU compares them: lower case, `_` and `.` read as `-`.
fn normalize(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace(['_', '.'], "-")
}

/// The feature called `name` (any of its spellings).
pub fn find(name: &str) -> Option<&'static Feature> {
    let n = normalize(name);
    let n = ALIASES.iter().find(|(a, _)| *a == n).map_or(n.as_str(), |(_, to)| to);
    FEATURES.iter().find(|f| normalize(f.name) == normalize(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_has_one_bit_and_every_spelling_finds_it() {
        for (i, a) in FEATURES.iter().enumerate() {
            for b in &FEATURES[i + 1..] {
                assert!(a.name != b.name && (a.word, a.bit) != (b.word, b.bit), "{a:?} and {b:?}");
            }
            assert_eq!(find(a.name), Some(a));
        }
        assert_eq!(find("tsc_adjust").unwrap().name, "tsc-adjust");
        assert_eq!(find("sse4_2").unwrap().name, "sse4.2");
        assert_eq!(find("SSE3").unwrap().name, "pni");
        assert_eq!(find("lahf_lm").unwrap().name, "lahf-lm");
        assert!(find("no-such-feature").is_none());
    }
}
