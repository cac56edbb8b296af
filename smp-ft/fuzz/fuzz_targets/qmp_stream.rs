//! QMP input as a stream of JSON values, however a client cuts it into writes: the same values
//! (and the same error) as when it arrives whole, never a panic, and never more than one
//! value's bound held.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_shim::qmp::{JsonStream, StreamError, VALUE_MAX};
use serde_json::Value;

fn values<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Result<Value, StreamError>> {
    let mut s = JsonStream::new();
    let mut out = Vec::new();
    for c in chunks {
        s.push(c);
        out.extend(&mut s);
        assert!(s.pending() <= VALUE_MAX, "{} bytes held", s.pending());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else { return };
    let whole = values(std::iter::once(input));
    let pieces = values(input.chunks(usize::from(cut).max(1)));
    assert_eq!(whole, pieces);
    // Nothing follows an error.
    if let Some(i) = whole.iter().position(Result::is_err) {
        assert_eq!(i, whole.len() - 1);
    }
});
