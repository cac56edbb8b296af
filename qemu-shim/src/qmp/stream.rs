//! QMP input as QEMU reads it: a stream of JSON values with no framing. A client may send a
//! command without a newline, several in one write, one split across writes, or before it has
//! read the greeting (Proxmox's `qm` does all of these); each value is taken when its last
//! byte arrives.
//!
//! The scanner only finds where a value ends (it follows strings, escapes and the nesting of
//! objects and arrays); serde_json then parses the value. One value may hold at most
//! [`VALUE_MAX`] bytes. A value that is not JSON, or is too long, ends the stream: after a syntax
//! error nothing says where the next value would begin.

use serde_json::Value;

/// The most bytes one value may take.
pub const VALUE_MAX: usize = 1 << 20;

/// Why the stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Not JSON: the parser's reason.
    #[error("JSON parse error, {0}")]
    Malformed(String),
    #[error("JSON parse error, a value longer than {VALUE_MAX} bytes")]
    TooLong,
}

/// Bytes from a client, split into JSON values.
#[derive(Debug, Default)]
pub struct JsonStream {
    buf: Vec<u8>,
    /// How much of `buf` has been scanned.
    scanned: usize,
    /// Where the value being read starts in `buf` (`None`: between values).
    start: Option<usize>,
    /// Open objects and arrays.
    depth: usize,
    in_string: bool,
    escape: bool,
    /// The value is a bare word or number, which ends at the next delimiter.
    bare: bool,
    failed: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// What ends a bare word or number.
fn is_delimiter(b: u8) -> bool {
    is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

impl JsonStream {
    pub fn new() -> JsonStream {
        JsonStream::default()
    }

    /// Takes bytes as they were read.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes held for a value not complete yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete value; `None` until more bytes complete one. An error comes once, and
    /// nothing after it.
    pub fn next_value(&mut self) -> Option<Result<Value, StreamError>> {
        if self.failed {
            return None;
        }
        let r = match self.scan() {
            Ok(Some(end)) => {
                let start = self.start.take().unwrap_or(0);
                let v = serde_json::from_slice::<Value>(&self.buf[start..end])
                    .map_err(|e| StreamError::Malformed(e.to_string()));
                self.buf.drain(..end);
                self.scanned = 0;
                self.bare = false;
                v
            }
            Ok(None) => {
                self.compact();
                return None;
            }
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.failed = true;
            self.buf = Vec::new();
        }
        Some(r)
    }

    /// Scans on from where it stopped; the end (exclusive) of a complete value, if one is.
    fn scan(&mut self) -> Result<Option<usize>, StreamError> {
        while self.scanned < self.buf.len() {
            let i = self.scanned;
            let b = self.buf[i];
            let Some(start) = self.start else {
                self.scanned += 1;
                if is_space(b) {
                    continue;
                }
                self.start = Some(i);
                match b {
                    b'{' | b'[' => self.depth = 1,
                    b'"' => self.in_string = true,
                    b'}' | b']' | b',' | b':' => {
                        return Err(StreamError::Malformed(format!("unexpected '{}'", b as char)))
                    }
                    _ => self.bare = true,
                }
                continue;
            };
            if self.bare && is_delimiter(b) {
                return Ok(Some(i));
            }
            if i - start >= VALUE_MAX {
                return Err(StreamError::TooLong);
            }
            if self.bare {
                self.scanned += 1;
                continue;
            }
            self.scanned += 1;
            if self.in_string {
                match b {
                    _ if self.escape => self.escape = false,
                    b'\\' => self.escape = true,
                    b'"' => {
                        self.in_string = false;
                        if self.depth == 0 {
                            return Ok(Some(i + 1));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Ok(Some(i + 1));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Lets go of what lies before the value being read (whitespace between values).
    fn compact(&mut self) {
        let keep_from = self.start.unwrap_or(self.scanned);
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.scanned -= keep_from;
            if let Some(s) = &mut self.start {
                *s = 0;
            }
        }
    }
}

/// The complete values, as [`JsonStream::next_value`] gives them.
impl Iterator for JsonStream {
    type Item = Result<Value, StreamError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(chunks: &[&[u8]]) -> Vec<Result<Value, StreamError>> {
        let mut s = JsonStream::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            out.extend(&mut s);
        }
        out
    }

    #[test]
    fn values_need_no_newline_and_may_share_a_write() {
        let got = values(&[br#"{"execute":"qmp_capabilities","arguments":{},"id":"1:1"}{"execute":"stop"} [1,2]"#]);
        assert_eq!(
            got,
            vec![
                Ok(json!({"execute": "qmp_capabilities", "arguments": {}, "id": "1:1"})),
                Ok(json!({"execute": "stop"})),
                Ok(json!([1, 2])),
            ]
        );
    }

    #[test]
    fn a_value_split_across_writes_is_taken_when_complete() {
        let text = br#" {"execute":"query-status","arguments":{"a":"}{\"]"},"id":[1,{"b":2}]}"#;
        for cut in 0..text.len() {
            let got = values(&[&text[..cut], &text[cut..]]);
            assert_eq!(got.len(), 1, "cut at {cut}: {got:?}");
            assert_eq!(got[0].as_ref().unwrap()["arguments"]["a"], "}{\"]", "cut at {cut}");
        }
        // One byte at a time, with a pretty-printed value and strings holding braces.
        let text = b"{\n  \"execute\": \"x\",\n  \"arguments\": {\"s\": \"\\\\\"}\n}\r\n\"top\"";
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(values(&chunks), vec![Ok(json!({"execute": "x", "arguments": {"s": "\\"}})), Ok(json!("top"))]);
    }

    #[test]
    fn bare_words_end_at_a_delimiter() {
        assert_eq!(values(&[b"12"]), vec![], "a number may go on in the next write");
        assert_eq!(values(&[b"12", b"3 true{}"]), vec![Ok(json!(123)), Ok(json!(true)), Ok(json!({}))]);
    }

    #[test]
    fn malformed_input_is_an_error_and_ends_the_stream() {
        for bad in [&b"{not json}"[..], b"}", b"{\"a\" 1}", b"nope ", b"{\"a\":1]", b",", b"[\"\xff\"]"] {
            let mut s = JsonStream::new();
            s.push(bad);
            s.push(b" {\"execute\":\"stop\"}");
            let e = s.next_value().unwrap().unwrap_err();
            assert!(matches!(e, StreamError::Malformed(_)), "{:?}: {e}", String::from_utf8_lossy(bad));
            assert!(e.to_string().starts_with("JSON parse error, "), "{e}");
            assert_eq!(s.next_value(), None, "nothing after an error");
            assert_eq!(s.pending(), 0);
        }
    }

    #[test]
    fn nesting_beyond_the_parsers_limit_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let got = values(&[deep.as_bytes()]);
        assert!(matches!(&got[..], [Err(StreamError::Malformed(_))]), "{got:?}");
    }

    #[test]
    fn a_value_is_bounded_whether_or_not_it_ends() {
        let mut s = JsonStream::new();
        s.push(b"{\"pad\":\"");
        let chunk = vec![b'x'; 4096];
        let mut got = None;
        for _ in 0..(VALUE_MAX / chunk.len() + 2) {
            s.push(&chunk);
            if let Some(v) = s.next_value() {
                got = Some(v);
                break;
            }
        }
        assert_eq!(got, Some(Err(StreamError::TooLong)));
        assert_eq!(s.pending(), 0, "the buffer is let go");
        // Whitespace between values is not held.
        let mut s = JsonStream::new();
        for _ in 0..1000 {
            s.push(&[b' '; 4096]);
            assert_eq!(s.next_value(), None);
        }
        assert_eq!(s.pending(), 0);
        let long_bare = vec![b'1'; VALUE_MAX + 1];
        assert_eq!(values(&[&long_bare]), vec![Err(StreamError::TooLong)]);
    }
}
