//! Any grub.cfg, grubenv and Boot Loader Specification entries a guest writes give a default
//! entry or a one-line error, never a panic or a hang: the parsers behind `--boot disk`.
//! The first byte picks GRUB or BLS; a NUL separates the files.
#![no_main]

use bootdisk::{bls, grub};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let mut files = text.split('\0');
    let main = files.next().unwrap_or("");
    let env = bls::grubenv(files.next().unwrap_or(""));
    if which & 1 == 0 {
        let exists = |p: &str| p.len() % 2 == 0;
        let env = grub::Env { prefix: "/boot/grub".into(), grubenv: env, exists: &exists };
        if let Ok(stmts) = grub::parse::parse(main) {
            let _ = grub::default_entry(main, &stmts, &env);
        }
    } else {
        let entries = std::iter::once(main).chain(files).enumerate().map(|(i, t)| bls::parse(&i.to_string(), t)).collect();
        let _ = bls::default_entry(entries, &env);
    }
});
