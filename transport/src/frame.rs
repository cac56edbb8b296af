//! Framing: each message is a little-endian u32 length, then that many bytes of rkyv archive.
//! Frames longer than the configured maximum, and archives that fail validation, are errors;
//! nothing from the network is used before `bytecheck` has validated it.

use crate::message::Message;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not hold a valid message: {0}")]
    Invalid(String),
    #[error("empty frame")]
    Empty,
}

pub fn encode(m: &Message) -> Vec<u8> {
    // Serialising an owned, well-formed value into memory cannot fail.
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(m).map(|b| b.to_vec()).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes one frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<Message, rkyv::rancor::Error>(&aligned).map_err(|e| FrameError::Invalid(e.to_string()))
}

/// Incremental decoder for a byte stream of frames.
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Decoder {
    pub fn new(max: usize) -> Decoder {
        Decoder { buf: Vec::new(), max }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let m = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        m.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    pub(crate) fn every_message() -> Vec<Message> {
        vec![
            Message::Hello { version: 1, role: Role::Primary, session: 42, meta: vec![1, 2, 3] },
            Message::Hello { version: 7, role: Role::Standby, session: 0, meta: vec![] },
            Message::Heartbeat { seq: u64::MAX },
            Message::Checkpoint { epoch: 7, chunks: 8, bytes: 1 << 30 },
            Message::Ack { epoch: 12345 },
            Message::App { kind: 3, data: vec![9; 1000] },
            Message::Goodbye { code: 2, reason: "bye ✓".into() },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_split_stream() {
        let msgs = every_message();
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for chunk in bytes.chunks(7) {
            d.push(chunk);
            while let Some(m) = d.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut d = Decoder::new(16);
        d.push(&1000u32.to_le_bytes());
        assert_eq!(d.next_message(), Err(FrameError::TooLarge { len: 1000, max: 16 }));
        let mut d = Decoder::new(1024);
        d.push(&8u32.to_le_bytes());
        d.push(&[0xff; 8]);
        assert!(matches!(d.next_message(), Err(FrameError::Invalid(_))));
        let mut d = Decoder::new(1024);
        d.push(&0u32.to_le_bytes());
        assert_eq!(d.next_message(), Err(FrameError::Empty));
    }
}
