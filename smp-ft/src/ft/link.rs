//! The primary's connection to its standby: the channel, and the thread that encodes each
//! checkpoint's pages and sends it (so the VM owner only pauses, captures and resumes).

use super::error::FtError;
use super::primary::Input;
use super::stats::Stats;
use super::wire::{self, Outgoing, PayloadKind};
use super::FtOptions;
use crate::error::error_chain;
use block::op::Op;
use crossbeam_channel::Sender;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use transport::{Channel, Message};

/// A connected standby and the thread that sends it checkpoints.
pub struct Link {
    pub chan: Arc<Channel>,
    out: Option<Sender<Outgoing>>,
    sender: Option<JoinHandle<()>>,
    pub peer: SocketAddr,
}

impl Link {
    /// The channel to a new standby, and its sender thread, which encodes the pages (with a
    /// page cache of its own: it mirrors this standby's memory) and sends.
    pub fn start(chan: Channel, inputs: Sender<Input>, stats: Arc<Stats>, opts: &FtOptions) -> Link {
        let chan = Arc::new(chan);
        let peer = chan.peer_addr();
        let (tx, rx) = crossbeam_channel::unbounded::<Outgoing>();
        let c = chan.clone();
        let mut encoder = super::encode::Encoder::new(opts.compression, opts.compression_cache);
        let sender = std::thread::Builder::new()
            .name("ft-send".into())
            .spawn(move || {
                confine::enter(confine::Kind::Channel);
                for p in rx {
                    let (p, encoded) = p.encode(&mut encoder);
                    stats.encoded(p.seq, encoded);
                    let (seq, p_kind) = (p.seq, p.kind);
                    let r = wire::encode(&p).map_err(FtError::from).and_then(|b| {
                        let n = b.len() as u64;
                        c.send_checkpoint(seq, b).map_err(FtError::from).map(|()| n)
                    });
                    match r {
                        Ok(n) => {
                            stats.sent(seq, n, c.udp_sent());
                            if p_kind == PayloadKind::Epoch {
                                super::fault::hit(super::fault::Point::AfterSend);
                            }
                        }
                        Err(e) => {
                            let _ = inputs.send(Input::SendFailed(format!("checkpoint {seq}: {}", error_chain(&e))));
                            return;
                        }
                    }
                }
            })
            .expect("spawn ft-send thread");
        Link { chan, out: Some(tx), sender: Some(sender), peer }
    }

    /// While this standby has been heard from within half its silence timeout it cannot have
    /// taken over: released output may leave (see `OutputGate::set_lease`).
    pub fn lease(&self, silence_timeout: std::time::Duration) -> crate::vmm::devices::gate::Lease {
        let chan = self.chan.clone();
        Arc::new(move || chan.silent_for() < silence_timeout / 2)
    }

    /// Where the disks' write log streams each op as it completes (`None`: the standby speaks
    /// a wire version without streaming, and ops travel inside checkpoints).
    pub fn disk_stream(&self) -> Option<Arc<dyn disk_mirror::log::Stream>> {
        (self.chan.version() >= wire::STREAM_VERSION).then(|| {
            Arc::new(DiskStream { chan: self.chan.clone(), gather: Default::default() })
                as Arc<dyn disk_mirror::log::Stream>
        })
    }

    /// Tells the standby that checkpoint `epoch`, about to be sent, covers streamed disk ops
    /// `0..through`. Goes on the control stream, behind every op it covers.
    pub fn disk_seal(&self, epoch: u64, through: u64) {
        let data = wire::encode_app(&wire::DiskSeal { epoch, through });
        // A closed channel is reported as an event of its own; no checkpoint reaches the
        // standby after this either.
        let _ = self.chan.send(&Message::App { kind: wire::APP_DISK_SEAL, data });
    }

    pub fn send(&self, p: Outgoing) {
        if let Some(out) = &self.out {
            let _ = out.send(p);
        }
    }

    pub fn close(mut self, code: u32, reason: &str) {
        self.out = None;
        self.chan.close(code, reason);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
    }
}

/// The write log's stream: each op leaves on the channel's ordered control stream as it
/// completes (on the thread that completed it), or with the small ops gathered around it (see
/// [`wire::OpGather`]), ahead of the seal and checkpoint that cover it.
struct DiskStream {
    chan: Arc<Channel>,
    gather: parking_lot::Mutex<wire::OpGather>,
}

impl DiskStream {
    fn out(&self, out: wire::StreamOut) {
        let r = match out {
            wire::StreamOut::Gathered(frame) => self.chan.send_data(wire::APP_DISK_OPS, &[], frame),
            wire::StreamOut::Alone(head, data) => self.chan.send_data(wire::APP_DISK_OPS, &head, data),
        };
        // As for seals, a closed channel takes no checkpoint covering these ops either. An op
        // too large to send leaves the standby without it: it refuses the next checkpoint and
        // stands down, and this copy goes on unprotected rather than wrongly protected.
        if let Err(e @ transport::ChannelError::TooLarge { .. }) = r {
            tracing::error!("FT: a disk write cannot be streamed to the standby: {e}");
        }
    }
}

impl disk_mirror::log::Stream for DiskStream {
    fn send(&self, index: u64, disk: u32, op: Op) {
        let out = self.gather.lock().push(index, disk, op);
        out.into_iter().for_each(|o| self.out(o));
        super::fault::hit(super::fault::Point::AfterStream);
    }

    fn flush(&self) {
        let out = self.gather.lock().take();
        out.into_iter().for_each(|o| self.out(o));
    }
}

/// The failure detector's view of the peer, for `x-smpft-query-ft`.
pub fn detector_json(chan: &Channel) -> serde_json::Value {
    let r = chan.detector();
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    serde_json::json!({
        "threshold-ms": ms(r.threshold),
        "silent-ms": ms(r.silent_for),
        "own-stall-ms": ms(r.own_stall),
        "suspicion": (r.suspicion * 100.0).round() / 100.0,
        "mean-gap-ms": ms(r.mean_gap),
        "gap-deviation-ms": ms(r.gap_deviation),
        "longest-gap-ms": ms(r.longest_gap),
        "packet-age-ms": ms(r.packet_age),
        "withheld": r.withheld,
    })
}
