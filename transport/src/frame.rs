//! Framing: each message is a little-endian u32 length, then that many bytes of rkyv archive.
//! Frames longer than the configured maximum, and archives that fail validation, are errors;
//! nothing from the network is used before `bytecheck` has validated it.
//!
//! A *data* frame (wire version 4) carries bytes of the layer above as they are, with no
//! archive around them: its length word has [`DATA_FLAG`] set, and it holds a u16 kind, then
//! the data. Bulk data on the ordered control stream goes this way without being serialised.

use crate::message::Message;
use bytes::{Buf, Bytes, BytesMut};

/// The length word's flag for a data frame.
pub const DATA_FLAG: u32 = 1 << 31;

/// The largest data frame a decoder takes unless told otherwise (a guest's largest disk request
/// is far below it).
pub const MAX_DATA: usize = 256 << 20;

/// What a frame holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    /// Bytes of the layer above, of one of its `kind`s.
    Data {
        kind: u16,
        data: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not hold a valid message: {0}")]
    Invalid(String),
    #[error("empty frame")]
    Empty,
    #[error("a data frame too short for its kind")]
    ShortData,
}

pub fn encode(m: &Message) -> Vec<u8> {
    // Serialising an owned, well-formed value into memory cannot fail.
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(m).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The start of a data frame of `kind` whose data is `head` followed by `body_len` more bytes
/// (sent after it as they are).
pub fn data_header(kind: u16, head: &[u8], body_len: usize) -> Vec<u8> {
    let len = (2 + head.len() + body_len) as u32;
    let mut out = Vec::with_capacity(6 + head.len());
    out.extend_from_slice(&(len | DATA_FLAG).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(head);
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
    buf: BytesMut,
    max: usize,
    max_data: usize,
}

impl Decoder {
    /// A decoder of messages of at most `max` bytes, and data frames of at most [`MAX_DATA`].
    pub fn new(max: usize) -> Decoder {
        Decoder { buf: BytesMut::new(), max, max_data: MAX_DATA.max(max) }
    }

    /// Data frames of at most `max` bytes.
    pub fn max_data(self, max: usize) -> Decoder {
        Decoder { max_data: max, ..self }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed (a data frame is an error:
    /// where a message must come, as the Hello).
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        match self.next_frame()? {
            None => Ok(None),
            Some(Frame::Message(m)) => Ok(Some(m)),
            Some(Frame::Data { kind, .. }) => {
                Err(FrameError::Invalid(format!("data of kind {kind} where a message must be")))
            }
        }
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. A data frame's bytes are not
    /// copied.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let word = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let len = (word & !DATA_FLAG) as usize;
        let max = if word & DATA_FLAG != 0 { self.max_data } else { self.max };
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if self.buf.len() < 4 + len {
            // Room for the rest of the frame, once (up to 16 MiB at a time: a length word alone
            // does not get to claim memory).
            self.buf.reserve((4 + len - self.buf.len()).min(16 << 20));
            return Ok(None);
        }
        if word & DATA_FLAG != 0 {
            if len < 2 {
                return Err(FrameError::ShortData);
            }
            let mut frame = self.buf.split_to(4 + len);
            frame.advance(4);
            let kind = frame.get_u16_le();
            return Ok(Some(Frame::Data { kind, data: frame.freeze() }));
        }
        let m = decode_body(&self.buf[4..4 + len]);
        self.buf.advance(4 + len);
        m.map(|m| Some(Frame::Message(m)))
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
    fn data_frames_come_between_messages_as_they_were_sent() {
        let mut bytes = encode(&Message::Heartbeat { seq: 1 });
        bytes.extend(data_header(5, b"head", 3));
        bytes.extend_from_slice(b"xyz");
        bytes.extend(encode(&Message::Ack { epoch: 2 }));
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for chunk in bytes.chunks(5) {
            d.push(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        let data = Frame::Data { kind: 5, data: Bytes::from_static(b"headxyz") };
        let want = vec![Frame::Message(Message::Heartbeat { seq: 1 }), data, Frame::Message(Message::Ack { epoch: 2 })];
        assert_eq!(out, want);
        let mut d = Decoder::new(1 << 20);
        d.push(&data_header(5, b"", 0));
        assert!(d.next_message().is_err(), "no data where a message must be");
        let mut d = Decoder::new(1 << 20);
        d.push(&(1 | DATA_FLAG).to_le_bytes());
        d.push(&[0]);
        assert_eq!(d.next_frame(), Err(FrameError::ShortData));
        let mut d = Decoder::new(16).max_data(64);
        d.push(&(1000 | DATA_FLAG).to_le_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 1000, max: 64 }));
        let mut d = Decoder::new(16);
        d.push(&(1000 | DATA_FLAG).to_le_bytes());
        assert_eq!(d.next_frame(), Ok(None), "data frames are not held to the messages' limit");
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
