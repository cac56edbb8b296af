pub mod channel;
pub mod detector;
pub mod frame;
pub mod identity;
pub mod message;

pub use channel::{Channel, ChannelConfig, ChannelError, CheckpointData, Event, Listener, UdpSent};
pub use identity::{Identity, PeerTrust};
pub use message::{Message, Role};
