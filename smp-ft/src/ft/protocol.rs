//! The SMP-FT protocol as two sans-I/O state machines, [`Primary`] and [`Standby`].
//!
//! Epoch `n` is the interval that checkpoint `n` closes: output the guest produces during it is
//! tagged `n` and held until the standby acknowledges checkpoint `n`, because only then does a
//! state that includes the output's cause survive the loss of the primary. The standby
//! acknowledges a checkpoint once it holds all of it (validated in staging), and from then on it
//! must never go live from an older state.
//!
//! A side that stops hearing from the other may act alone only after winning the tie-breaker
//! (a lock with a generation number on shared storage). The loser halts and releases nothing.
//! So exactly one copy runs live, and every output a client saw is reflected in its state.
//!
//! The machines decide everything: which standby to connect and when to try again, when to
//! checkpoint, release, claim and claim again, hand over or give up. Their timers are
//! `poll_timeout`/`handle_timeout` (in the style of quinn-proto); the shells (`ft::primary`,
//! `ft::standby`) only carry out actions and feed back what happened.

mod primary;
mod standby;

pub use primary::{LinkState, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryState};
pub use standby::{Standby, StandbyAction, StandbyEvent, StandbyState};

/// An epoch (checkpoint) number. The first is the synchronising checkpoint that ends the
/// initial copy.
pub type Epoch = u64;

#[cfg(test)]
mod pauses;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
