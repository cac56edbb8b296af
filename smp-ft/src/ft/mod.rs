//! The fault-tolerance engine. `protocol` is its core: the primary and standby roles as pure
//! state machines (events in, actions out; no sockets, clocks or KVM), so every ordering of
//! crashes, acknowledgements and timeouts can be tested directly.

pub mod protocol;
pub mod tiebreak;
