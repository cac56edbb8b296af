use super::*;
use features::{E1_ECX, E1_EDX, L1_ECX, L1_EDX, L7_EBX};

/// A host with `names` and nothing else (and XSAVE components x87, SSE, AVX, AVX-512).
fn host(names: &[&str]) -> Vec<Leaf> {
    let mut leaves: Vec<Leaf> = [(1, 0), (6, 0), (7, 0), (7, 1), (0xd, 0), (0xd, 1), (0x4000_0001, 0)]
        .into_iter()
        .chain([(0x8000_0001, 0), (0x8000_0007, 0), (0x8000_0008, 0)])
        .map(|(function, index)| Leaf { function, index, ..Default::default() })
        .collect();
    write(&mut leaves, Word { function: 0xd, index: 0, reg: Reg::Eax }, 0b1110_0111);
    for n in names {
        let f = features::find(n).unwrap();
        let v = read(&leaves, f.word);
        write(&mut leaves, f.word, v | 1 << f.bit);
    }
    leaves
}

fn names(leaves: &[Leaf]) -> Vec<&'static str> {
    feature_set(leaves).into_iter().filter(|(_, on)| *on).map(|(n, _)| n).collect()
}

/// Everything the Skylake-Client and kvm64 models need, and more.
fn big_host() -> Vec<Leaf> {
    let mut n: Vec<&str> = models::find("Skylake-Client").unwrap().features.to_vec();
    n.extend(["avx512f", "ss", "hypervisor", "tsc-adjust", "kvmclock", "sse4a", "svm"]);
    host(&n)
}

#[test]
fn the_host_model_is_the_host_with_the_changes_asked_for() {
    let h = big_host();
    assert_eq!(CpuSpec::parse("host").unwrap().guest_cpuid(&h).unwrap(), h);
    assert_eq!(CpuSpec::parse("max,migratable=on").unwrap().guest_cpuid(&h).unwrap(), h);
    let g = CpuSpec::parse("host,-avx512f,-svm").unwrap().guest_cpuid(&h).unwrap();
    let got = names(&g);
    assert!(!got.contains(&"avx512f") && !got.contains(&"svm") && got.contains(&"avx2"), "{got:?}");
    assert_eq!(read(&g, Word { function: 0xd, index: 0, reg: Reg::Eax }), 0b111, "AVX-512 state is gone too");
    assert_eq!(differences(&h, &g), ["0x7.0", "0xd.0", "0x80000001.0"]);
}

#[test]
fn a_named_model_exposes_its_features_plus_and_minus_those_asked_for() {
    let h = big_host();
    let g = CpuSpec::parse("kvm64").unwrap().guest_cpuid(&h).unwrap();
    let mut want: Vec<&str> = models::find("kvm64").unwrap().features.to_vec();
    want.push("kvmclock"); // KVM's own leaf stays KVM's
    want.sort_unstable();
    let mut got = names(&g);
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(read(&g, L7_EBX), 0, "kvm64 has no leaf 7 features");
    assert_eq!(read(&g, Word { function: 0xd, index: 0, reg: Reg::Eax }), 0b11, "no AVX state without AVX");

    let spec = CpuSpec::parse("Skylake-Client,ss=on,hypervisor=on,tsc_adjust=on,avx512f=on,-hle,rtm=off").unwrap();
    assert_eq!(spec.to_string(), "Skylake-Client,+ss,+hypervisor,+tsc-adjust,+avx512f,-hle,-rtm");
    let got = names(&spec.guest_cpuid(&h).unwrap());
    for f in ["avx2", "ss", "hypervisor", "tsc-adjust", "avx512f", "pcid"] {
        assert!(got.contains(&f), "{f} missing: {got:?}");
    }
    for f in ["hle", "rtm", "sse4a", "svm", "avx512dq"] {
        assert!(!got.contains(&f), "{f} present: {got:?}");
    }
}

#[test]
fn amd_keeps_its_copy_of_leaf_one_for_the_models_features() {
    let mut h = big_host();
    let fpu_vme_pse = 0b1011;
    let v = read(&h, E1_EDX);
    write(&mut h, E1_EDX, v | fpu_vme_pse);
    let g = CpuSpec::parse("kvm64").unwrap().guest_cpuid(&h).unwrap();
    assert_eq!(read(&g, E1_EDX) & 0xf, 0b1001, "fpu and pse (kvm64 has no vme)");
}

#[test]
fn what_the_host_lacks_is_refused_naming_it() {
    let h = host(&["fpu", "sse", "sse2"]);
    let e = CpuSpec::parse("kvm64,enforce").unwrap().guest_cpuid(&h).unwrap_err();
    assert!(e.to_string().starts_with("CPU model 'kvm64' needs what this host's KVM does not offer: de, pse"), "{e}");
    // Without enforce, the model's features the host lacks are left out, and named.
    let kvm64 = CpuSpec::parse("kvm64,check=on").unwrap();
    assert!(kvm64.left_out(&h).starts_with(&["de", "pse"]));
    assert_eq!(names(&kvm64.guest_cpuid(&h).unwrap()), ["fpu", "sse", "sse2"]);
    let e = CpuSpec::parse("host,+pn,+ss,-sse").unwrap().guest_cpuid(&h).unwrap_err();
    assert_eq!(e.to_string(), "CPU 'host,+pn,+ss,-sse' needs what this host's KVM does not offer: pn, ss");
    let h = big_host();
    let e = CpuSpec::parse("Skylake-Client,+pn").unwrap().guest_cpuid(&h).unwrap_err();
    assert!(e.to_string().ends_with("does not offer: pn"), "{e}");
    assert!(CpuSpec::parse("Skylake-Client,-pn").unwrap().guest_cpuid(&h).is_ok(), "taking away is always possible");
    let h = host(&["fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca"]);
    let e = CpuSpec::parse("kvm64,pni=off,enforce").unwrap().guest_cpuid(&h).unwrap_err();
    assert!(!e.to_string().contains("pni"), "a model's feature turned off is not needed: {e}");
    let mut no_leaf_7: Vec<Leaf> = h.iter().filter(|l| l.function != 7).copied().collect();
    let e = CpuSpec::parse("host,+avx2").unwrap().guest_cpuid(&no_leaf_7).unwrap_err();
    assert!(e.to_string().ends_with("does not offer: avx2"), "a leaf the host lacks: {e}");
    no_leaf_7.clear();
    let e = CpuSpec::parse("EPYC,enforce=on").unwrap().guest_cpuid(&h).unwrap_err();
    assert!(e.to_string().contains("monitor"), "{e}");
}

#[test]
fn bad_cpu_options_name_what_is_wrong() {
    let e = CpuSpec::parse("Haswell-noTSX").unwrap_err();
    assert!(
        e.to_string().starts_with("CPU model 'Haswell-noTSX' is not known to smpft (it has host, max, qemu64"),
        "{e}"
    );
    assert_eq!(CpuSpec::parse("kvm64,+warp").unwrap_err().to_string(), "CPU feature 'warp' is not known to smpft");
    assert_eq!(CpuSpec::parse("kvm64,avx=maybe").unwrap_err().to_string(), "CPU property 'avx=maybe' is not supported");
    assert_eq!(CpuSpec::parse("host,kvm=off").unwrap_err().to_string(), "CPU property 'kvm=off' is not supported");
    assert_eq!(
        CpuSpec::parse("host,l3-cache=on").unwrap_err().to_string(),
        "CPU feature 'l3-cache' is not known to smpft"
    );
    assert!(CpuSpec::parse("kvm64,check=on,enforce=on,migratable=off,,+ss").is_ok());
    assert_eq!(
        CpuSpec::parse("kvm64,enforce=maybe").unwrap_err().to_string(),
        "CPU property 'enforce=maybe' is not supported"
    );
    let base = CpuSpec::parse("base,+fpu,sse=on,avx=off").unwrap();
    assert_eq!(
        names(&base.guest_cpuid(&big_host()).unwrap()),
        ["fpu", "sse", "kvmclock"],
        "QEMU's static base model (KVM's leaf stays)"
    );
}

#[test]
fn differing_leaves_are_named() {
    let a = big_host();
    let mut b = a.clone();
    write(&mut b, L1_ECX, read(&a, L1_ECX) ^ 1);
    write(&mut b, E1_ECX, 0);
    assert_eq!(differences(&a, &b), ["0x1.0", "0x80000001.0"]);
    b.push(Leaf { function: 0x1f, ..Default::default() });
    assert_eq!(differences(&a, &b), ["0x1.0", "0x1f.0", "0x80000001.0"]);
    assert!(differences(&a, &a).is_empty());
    let _ = L1_EDX;
}
