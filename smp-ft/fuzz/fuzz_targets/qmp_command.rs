//! A QMP command, however malformed, gets a command or an error, never a panic: the parser
//! behind every line a QMP client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_shim::qmp::parse_command;

fuzz_target!(|data: &[u8]| {
    let Some((&first, line)) = data.split_first() else { return };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
        let _ = parse_command(&v, first & 1 == 1);
    }
});
