//! Messages on the control stream.

/// The FT wire version this build speaks: the Hello and control messages, the FT layer's
/// messages and the checkpoint payloads. A change any of them makes bumps it.
/// - 1: the first.
/// - 2: the planned switchover (the FT layer's `APP_SWITCHOVER`).
/// - 3: the FT layer's Hello metadata carries the guest's CPUID (an older build cannot read
///   it, and is told so when its own metadata cannot be read).
/// - 4: the primary streams disk writes as they complete, and seals them per checkpoint (the
///   FT layer's `APP_DISK_OPS` and `APP_DISK_SEAL`); with an older peer they travel inside
///   checkpoints, as before.
pub const PROTOCOL_VERSION: u32 = 4;
/// The oldest peer version this build still talks to, in that version's terms: the two sides
/// speak the lower of their versions (see `Channel::version`), and what needs a newer one
/// (a switchover) is refused with the reason. A peer older than this is refused at its Hello.
pub const OLDEST_COMPATIBLE: u32 = 1;
/// The ALPN: the family of wire versions that share a Hello (a new family is a new ALPN).
pub const ALPN: &[u8] = b"smpft/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Role {
    Primary,
    Standby,
}

/// Everything that travels on the control stream. Checkpoint payloads travel on bulk streams
/// (see `channel/`); only their acknowledgement is a message.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Message {
    /// First message each way: who is speaking and what it runs. `meta` is for the layer above
    /// (VM shape, generation), opaque here.
    Hello { version: u32, role: Role, session: u64, meta: Vec<u8> },
    /// Liveness, sent every heartbeat interval each way.
    Heartbeat { seq: u64 },
    /// Checkpoint `epoch` was sent as `chunks` bulk streams of `bytes` in all. Announcements
    /// are in order, and the receiver delivers checkpoints in this order. (Handled by the
    /// channel; not reported to the layer above.)
    Checkpoint { epoch: u64, chunks: u32, bytes: u64 },
    /// The receiver holds all of checkpoint `epoch` (sent by the layer above once it has
    /// validated it). Releases the sender's in-flight budget for that checkpoint.
    Ack { epoch: u64 },
    /// A message of the layer above (the FT protocol), opaque here.
    App { kind: u16, data: Vec<u8> },
    /// A reasoned close.
    Goodbye { code: u32, reason: String },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Checkpoint { .. } => "Checkpoint",
            Message::Ack { .. } => "Ack",
            Message::App { .. } => "App",
            Message::Goodbye { .. } => "Goodbye",
        }
    }
}
