//! Connecting a standby: [`PrimaryAction::Connect`] on a thread of the shell's, the standby's
//! Hello checked against this VM, and the disk digests a comparing standby sends first.
//!
//! [`PrimaryAction::Connect`]: crate::ft::protocol::PrimaryAction::Connect

use super::{Flow, Input, PrimaryFt};
use crate::error::error_chain;
use crate::ft::link::Link;
use crate::ft::protocol::PrimaryEvent;
use crate::ft::wire::{self, Meta};
use crate::vmm::RunningVm;
use std::net::SocketAddr;
use transport::{Channel, Message};

impl PrimaryFt {
    /// Connects to `peer` in the background; the channel comes back as [`Input::Connected`].
    pub(super) fn connect(&mut self, peer: SocketAddr) -> Flow {
        let (id, trust, cfg) = (self.opts.identity.clone(), self.opts.trust.clone(), self.opts.channel.clone());
        // A new standby must claim above every generation this copy has won since it started
        // (a standby that read an older record would lose a claim it should win).
        self.meta.generation = self.proto.generation();
        let meta = self.meta.encode();
        let tx = self.inputs.0.clone();
        let session = std::process::id() as u64;
        let spawned = self.workers.spawn("ft-connect", move || {
            confine::enter(confine::Kind::Channel);
            let _ = tx.send(Input::Connected(Channel::connect(peer, &id, &trust, cfg, session, meta)));
        });
        if let Err(e) = spawned {
            // Reported as a failed attempt: the machine tries again later.
            let _ = self.inputs.0.send(Input::Connected(Err(transport::ChannelError::Connect {
                addr: peer,
                reason: format!("cannot start a thread: {e}"),
            })));
        }
        Flow::Continue
    }

    /// A connect ended: a standby to copy the VM to, or why not.
    pub(super) fn connected(&mut self, vm: &RunningVm, r: Result<Channel, transport::ChannelError>) -> Flow {
        let tried = self.proto.spares().current().map(|a| a.to_string()).unwrap_or_default();
        let chan = match r {
            // Protection was turned off while this connect ran: the standby is not wanted.
            Ok(chan) if self.proto.link() != crate::ft::protocol::LinkState::Connecting => {
                chan.close(crate::ft::GOODBYE_REPLACED, "protection turned off by the operator");
                return Flow::Continue;
            }
            Ok(chan) => chan,
            Err(e) => {
                let flow = self.step(vm, PrimaryEvent::ConnectFailed { refused: false });
                let next = self.proto.spares().current().map(|a| a.to_string()).unwrap_or_default();
                self.error(format!(
                    "cannot reach the standby {tried}: {}; the VM runs unprotected, trying {next} next",
                    error_chain(&e)
                ));
                return flow;
            }
        };
        let mut digests = false;
        let problem = match chan.peer_hello() {
            Message::Hello { version, meta, .. } => match Meta::from_hello(*version, meta) {
                Err(e) => Some(e.to_string()),
                Ok(m) => {
                    digests = m.digests;
                    self.peer_owner = Some(m.owner.clone());
                    self.meta.mismatch(&m)
                }
            },
            _ => Some("no Hello".to_string()),
        };
        if let Some(p) = problem {
            chan.close(transport::channel::code::PROTOCOL, &p);
            self.error(format!("standby {} refused: {p}", chan.peer_addr()));
            return self.step(vm, PrimaryEvent::ConnectFailed { refused: true });
        }
        self.last_error = None;
        let link = Link::start(chan, self.inputs.0.clone(), self.stats.clone(), &self.opts);
        self.gate.set_lease(Some(link.lease(self.opts.channel.silence_timeout)));
        let peer = link.peer;
        self.link = Some(link);
        self.digests = None;
        if digests {
            tracing::info!(standby = %peer, "standby connected; it is hashing its disks to compare");
        } else {
            tracing::info!(standby = %peer, "standby connected; starting the initial copy");
        }
        self.step(vm, PrimaryEvent::Connected { digests })
    }

    /// A comparing standby's digests of its disks: the copy sends only blocks that differ.
    pub(super) fn digests_arrived(&mut self, vm: &RunningVm, data: &[u8]) -> Flow {
        let valid = match wire::decode_digests(data, self.disk_log.sizes()) {
            Ok(d) => {
                tracing::info!("standby's disk digests arrived; starting the initial copy");
                self.digests = Some(d);
                true
            }
            Err(e) => {
                self.error(format!("standby refused: bad disk digests: {e}"));
                self.drop_reason = Some((transport::channel::code::PROTOCOL, "bad disk digests".into()));
                false
            }
        };
        self.step(vm, PrimaryEvent::Digests { valid })
    }
}
