//! GRUB's `grub.cfg`: the menu it builds and the default entry's `linux` and `initrd`.
//!
//! What is understood: `set`/`NAME=VALUE`/`unset`/`export`, `load_env` (the `grubenv` beside
//! `grub.cfg`), `if` with `[ ... ]`/`test` conditions, `function` definitions (their calls are
//! accepted and not run), `menuentry` and `submenu` with `--id`, and in the default entry
//! `search --fs-uuid|--label|--file [--set=VAR]`, `set root=`, `linux`/`linuxefi`/`linux16`,
//! `initrd`/`initrdefi`/`initrd16`, and commands that only affect the screen or load GRUB
//! modules (`insmod`, `echo`, `load_video`...). Anything else the default entry runs is refused,
//! quoting its line; so is a `configfile`/`source` the menu is built from.

mod entry;
mod eval;
pub mod parse;

pub use eval::{default_entry, Env};

#[cfg(test)]
mod tests;
