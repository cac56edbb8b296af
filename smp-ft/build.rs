//! Builds the freestanding test guest (`../guest`) and hands its path to the crate, which embeds
//! it as the built-in guest. The guest is a static, non-PIE ELF for the host target with no C
//! runtime: `-nostartfiles -nostdlib -static`, `relocation-model=static`, `panic = "abort"`
//! (set in its own manifest). Its dependencies are the `boot-abi` crate, by path, and smoltcp;
//! the nested build is `--locked` to the guest's Cargo.lock and fetches smoltcp only if cargo
//! does not have it yet.

use std::path::PathBuf;
use std::process::Command;

const GUEST_RUSTFLAGS: &[&str] = &[
    "-C",
    "link-arg=-nostartfiles",
    "-C",
    "link-arg=-nostdlib",
    "-C",
    "link-arg=-static",
    "-C",
    "relocation-model=static",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("../guest");
    let abi_dir = manifest_dir.join("../boot-abi");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", abi_dir.join(p).display());
    }
    let target_dir = out_dir.join("guest-target");
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "--target", "x86_64-unknown-linux-gnu", "--manifest-path"])
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy, coverage, sanitizers) are not for the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\u{1f}"))
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(status.success(), "building the test guest (guest/) failed; see the errors above");
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/smpft-guest");
    let dest = out_dir.join("smpft-guest.elf");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", elf.display()));
    println!("cargo:rustc-env=SMPFT_GUEST_ELF={}", dest.display());
}
