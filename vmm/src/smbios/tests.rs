use super::*;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// The structures of a table: (type, formatted area, strings).
fn walk(t: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < t.len() {
        let (kind, len) = (t[at], t[at + 1] as usize);
        let formatted = t[at..at + len].to_vec();
        let mut s = at + len;
        let mut strings = Vec::new();
        loop {
            let end = s + t[s..].iter().position(|&b| b == 0).unwrap();
            if end == s {
                s += 1;
                if strings.is_empty() && t[s] == 0 {
                    s += 1;
                }
                break;
            }
            strings.push(String::from_utf8(t[s..end].to_vec()).unwrap());
            s = end + 1;
        }
        out.push((kind, formatted, strings));
        at = s;
        if kind == 127 {
            break;
        }
    }
    out
}

#[test]
fn the_entry_point_finds_a_table_of_well_formed_structures() {
    let (ep, at, t) = Smbios::default().tables().unwrap();
    assert_eq!(&ep[..5], b"_SM3_");
    assert_eq!((ep.len(), ep[6], ep[7]), (24, 24, 3), "length, SMBIOS 3");
    assert_eq!(sum(&ep), 0, "the entry point sums to zero");
    assert_eq!(u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize, t.len());
    assert_eq!(u64::from_le_bytes(ep[16..24].try_into().unwrap()), at);
    assert!(at >= ADDR + ep.len() as u64 && at + t.len() as u64 <= 0x10_0000, "in the BIOS area");
    let s = walk(&t);
    let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
    assert_eq!(kinds, vec![0, 1, 3, 127]);
    assert_eq!(s[1].2, vec!["smpft", "smpft VM"], "smpft's defaults");
    assert_eq!((s[0].1.len(), s[1].1.len(), s[2].1.len()), (0x18, 0x1b, 0x16), "the formatted lengths");
}

#[test]
fn what_the_stack_sets_is_what_the_guest_reads() {
    let mut m = Smbios::default();
    m.apply("type=1,manufacturer=Red Hat,product=OpenStack Compute,version=16.0.2,serial=4c4c,,x,uuid=30ad89ac-5906-49ca-8d52-3c6343c598f6,family=Virtual Machine").unwrap();
    m.apply("type=11,value=cloud:a,value=b").unwrap();
    m.apply("type=2,manufacturer=M,location=slot 1").unwrap();
    let (_, _, t) = m.tables().unwrap();
    let s = walk(&t);
    let system = s.iter().find(|x| x.0 == 1).unwrap();
    assert_eq!(system.2, vec!["Red Hat", "OpenStack Compute", "16.0.2", "4c4c,x", "Virtual Machine"]);
    // manufacturer, product, version, serial: strings 1-4; SKU none; family 5.
    assert_eq!(&system.1[4..8], &[1, 2, 3, 4]);
    assert_eq!((system.1[0x19], system.1[0x1a]), (0, 5));
    assert_eq!(&system.1[8..12], &[0xac, 0x89, 0xad, 0x30], "the UUID's first field little-endian");
    assert_eq!(&system.1[20..24], &[0x43, 0xc5, 0x98, 0xf6], "the rest as written");
    let oem = s.iter().find(|x| x.0 == 11).unwrap();
    assert_eq!((oem.1[4], oem.2.clone()), (2, vec!["cloud:a".to_string(), "b".to_string()]));
    let board = s.iter().find(|x| x.0 == 2).unwrap();
    assert_eq!(board.2, vec!["M", "slot 1"]);
}

#[test]
fn bad_specs_are_refused_by_name() {
    let mut m = Smbios::default();
    for (spec, says) in [
        ("manufacturer=x", "no type=N"),
        ("type=4,socket=x", "type=4 is not one smpft writes"),
        ("type=1,colour=red", "unknown field 'colour'"),
        ("type=1,uuid=nope", "is not a UUID"),
        ("type=1,uuid=30ad89ac59064", "is not a UUID"),
        ("type=1,product", "is not key=value"),
        ("type=11,path=/x", "unknown field 'path'"),
        // The `qemu_argv` fuzz target checks the tables a guest reads: an empty OEM string (or
        // a NUL in any) ended a string set early, and the structures after it were misread.
        ("type=11,value=a,value=", "type=11: value= is empty or holds a NUL byte"),
        ("type=1,serial=\0", "type=1: serial= is empty or holds a NUL byte"),
    ] {
        let e = m.apply(spec).unwrap_err().to_string();
        assert!(e.contains(says), "{spec}: {e}");
    }
    // More OEM strings than a structure can number are refused too.
    let many = vec!["value=x"; 256].join(",");
    assert_eq!(Smbios::default().apply(&format!("type=11,{many}")), Err(SmbiosError::OemStrings));
    assert_eq!(parse_uuid("30AD89AC-5906-49CA-8D52-3C6343C598F6").unwrap()[0], 0x30);
}
