//! The FT logging channel between one primary and one standby, over QUIC with mutual TLS.
//!
//! - **Control stream**: one bidirectional stream opened by the primary, carrying framed
//!   [`Message`]s in order. Both sides start with `Hello` (protocol version, role).
//! - **Bulk**: a checkpoint is split over up to `bulk_streams` unidirectional streams, each with a
//!   header (epoch, chunk index and count, length; QUIC's AEAD already authenticates every
//!   byte, so there is no extra checksum). The sender then announces it on the control stream,
//!   and the receiver reports
//!   [`Event::Checkpoint`]s in announcement order, each once all its chunks are in; a
//!   checkpoint that arrives only in part is never reported.
//! - **Heartbeats** every `heartbeat` each way. Any traffic from the peer counts as life; after
//!   `silence_timeout` without any, the channel reports [`Event::PeerSilent`] and closes the
//!   connection. A channel never comes back after that: when a partition heals, the peers need a
//!   fresh handshake (the layer above decides whether they should have one).
//! - **Backpressure**: at most `max_in_flight` bytes of checkpoints may be sent and not yet
//!   acknowledged (`Message::Ack`); `send_checkpoint` blocks until the budget allows.
//!
//! Every protocol violation (bad frame, oversized frame, bad chunk, wrong version, wrong role,
//! silence during the handshake) is logged once with the peer's address and closes the
//! connection with an error code.

mod quic;
mod shared;
mod tasks;

use quic::{client_config, endpoint, runtime, server_config};
use shared::{Assembly, Budget, Shared};
use tasks::{bulk_acceptor, closed_watch, control_reader, control_writer, heartbeats, watchdog};

use crate::frame::{self, Decoder};
use crate::identity::{Identity, PeerTrust};
use crate::message::{Message, Role, OLDEST_COMPATIBLE, PROTOCOL_VERSION};
use bytes::Bytes;
use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use quinn::{Connection, VarInt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the failure detector looks at the peer's silence.
pub(crate) fn watchdog_period(heartbeat: Duration) -> Duration {
    (heartbeat / 4).max(Duration::from_millis(1))
}

/// Close codes.
pub mod code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const VERSION: u32 = 2;
    pub const SILENT: u32 = 3;
    pub const NO_HELLO: u32 = 4;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

/// Knobs of the channel. The defaults suit a dedicated LAN link: failure noticed within
/// 300 ms, windows large enough for tens of MiB per checkpoint.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which the peer may be declared gone: the failure detector's floor (see
    /// [`crate::detector`]); a peer whose messages have come in bursts is given more, up to
    /// `silence_ceiling`.
    pub silence_timeout: Duration,
    /// The most silence the failure detector ever allows.
    pub silence_ceiling: Duration,
    /// How the failure detector judges silence (the plain timeout is kept to measure against).
    pub detector: crate::detector::Mode,
    /// Time allowed for the TLS handshake and the Hello exchange.
    pub handshake_timeout: Duration,
    /// Checkpoint bytes sent but not yet acknowledged, at most.
    pub max_in_flight: u64,
    /// Streams one checkpoint is spread over.
    pub bulk_streams: usize,
    /// Largest control frame accepted.
    pub max_frame: usize,
    /// Largest checkpoint accepted.
    pub max_checkpoint: u64,
    /// Initial UDP payload size; MTU discovery may raise it up to `max_mtu`. On the hosts this
    /// was measured on, bigger datagrams made quinn slower (larger receive buffers), so the
    /// default keeps Ethernet-sized packets; raise both for a jumbo-frame link if it measures
    /// better there (`cargo bench -p transport`).
    pub mtu: u16,
    pub max_mtu: u16,
    /// QUIC ACK frequency extension: ask the peer to acknowledge only after this many more
    /// ack-eliciting packets (or its max ACK delay). `None` keeps QUIC's default of an ACK for
    /// every other packet. Fewer ACKs mean fewer packets for the receiver to send and the
    /// sender to process; measured with `cargo bench -p transport`.
    pub ack_threshold: Option<u32>,
    /// Stream and connection receive windows (bytes).
    pub window: u64,
    pub congestion: Congestion,
    /// UDP socket send and receive buffers (bytes). Too small a receive buffer drops packets
    /// at line rate and makes congestion control back off. As root smpft sets this regardless
    /// of `net.core.rmem_max`; otherwise the kernel caps it there.
    pub socket_buffer: usize,
    /// The wire version this end announces in its Hello: [`PROTOCOL_VERSION`] normally; a
    /// compatibility test sets another to stand in for an older or newer build.
    pub wire_version: u32,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            heartbeat: Duration::from_millis(50),
            silence_timeout: Duration::from_millis(300),
            silence_ceiling: Duration::from_millis(1200),
            detector: crate::detector::Mode::Adaptive,
            handshake_timeout: Duration::from_secs(5),
            max_in_flight: 256 << 20,
            bulk_streams: 8,
            max_frame: 16 << 20,
            max_checkpoint: 4 << 30,
            mtu: 1452,
            max_mtu: 1452,
            ack_threshold: None,
            window: 64 << 20,
            congestion: Congestion::Cubic,
            socket_buffer: 32 << 20,
            wire_version: PROTOCOL_VERSION,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer {addr} did not complete the handshake within {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("peer {addr} broke the protocol: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
    #[error("the channel is closed: {0}")]
    Closed(String),
    #[error("checkpoint of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("cannot start the channel runtime")]
    Runtime(#[source] std::io::Error),
}

/// UDP traffic sent by one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpSent {
    pub datagrams: u64,
    pub bytes: u64,
    /// Send system calls that carried them.
    pub calls: u64,
}

/// A received checkpoint: the payload as the segments it arrived in (no copy was made to join
/// them; [`CheckpointData::to_vec`] does that when a contiguous buffer is needed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointData {
    pub segments: Vec<Bytes>,
}

impl CheckpointData {
    pub fn len(&self) -> usize {
        self.segments.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for s in &self.segments {
            v.extend_from_slice(s);
        }
        v
    }

    pub fn crc32(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for s in &self.segments {
            h.update(s);
        }
        h.finalize()
    }
}

/// What the channel reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    /// Bytes of the layer above sent with [`Channel::send_data`], in order with the messages.
    Data {
        kind: u16,
        data: Bytes,
    },
    /// Every chunk of checkpoint `epoch` arrived intact.
    Checkpoint {
        epoch: u64,
        data: CheckpointData,
    },
    /// Nothing heard from the peer for `silent_for`; the connection is being closed.
    PeerSilent {
        silent_for: Duration,
    },
    Closed {
        reason: String,
    },
}

const CHUNK_HEADER: usize = 24;
const MAX_CHUNKS: u32 = 1024;

/// One end of an established channel.
pub struct Channel {
    rt: Arc<quic::Rt>,
    bound: quic::Bound,
    conn: Connection,
    shared: Arc<Shared>,
    /// Frames for the control stream, each as the parts it is sent in.
    control: tokio::sync::mpsc::UnboundedSender<Vec<Bytes>>,
    events: Receiver<Event>,
    peer_hello: Message,
    /// The wire version this end announced.
    wire_version: u32,
    bulk_streams: usize,
}

/// A standby's listening endpoint.
pub struct Listener {
    rt: Arc<quic::Rt>,
    bound: quic::Bound,
    cfg: ChannelConfig,
}

async fn read_hello(recv: &mut quinn::RecvStream, max: usize) -> Result<Message, String> {
    let mut dec = Decoder::new(max);
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(m) = dec.next_message().map_err(|e| e.to_string())? {
            return Ok(m);
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => dec.push(&buf[..n]),
            Ok(None) => return Err("control stream ended before Hello".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn check_hello(m: &Message, want: Role) -> Result<(), (u32, String)> {
    match m {
        Message::Hello { version, role, .. } => {
            if *version < OLDEST_COMPATIBLE {
                return Err((
                    code::VERSION,
                    format!(
                        "peer speaks FT wire version {version}; this smpft speaks {PROTOCOL_VERSION} and talks to \
                         peers from version {OLDEST_COMPATIBLE}: upgrade the peer"
                    ),
                ));
            }
            if *role != want {
                return Err((code::PROTOCOL, format!("peer is a {role:?}, expected a {want:?}")));
            }
            Ok(())
        }
        other => Err((code::PROTOCOL, format!("expected Hello, got {}", other.name()))),
    }
}

impl Listener {
    pub fn bind(
        addr: SocketAddr,
        id: &Identity,
        trust: &PeerTrust,
        cfg: ChannelConfig,
    ) -> Result<Listener, ChannelError> {
        let rt = runtime()?;
        let sc = server_config(id, trust, &cfg)?;
        let bound = endpoint(&rt, addr, Some(sc), &cfg)?;
        Ok(Listener { rt, bound, cfg })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.bound.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Stops accepting: an [`Listener::accept`] under way returns an error, and the address is
    /// free again once the channels accepted on it are gone.
    pub fn close(&self) {
        self.bound.endpoint.close(VarInt::from_u32(0), b"listener closed");
    }

    /// Waits (up to `timeout`, forever if `None`) for a primary that completes the TLS
    /// handshake and says Hello. Peers that fail either are logged and skipped.
    pub fn accept(&self, timeout: Option<Duration>, session: u64, meta: Vec<u8>) -> Result<Channel, ChannelError> {
        let cfg = self.cfg.clone();
        let endpoint = self.bound.endpoint.clone();
        let fut = async move {
            loop {
                let incoming = endpoint.accept().await.ok_or_else(|| ChannelError::Closed("listener closed".into()))?;
                let addr = incoming.remote_address();
                let setup = async {
                    let conn = incoming.await.map_err(|e| e.to_string())?;
                    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                    let hello = read_hello(&mut recv, cfg.max_frame).await?;
                    Ok::<_, String>((
                        conn,
                        send_hello(&mut send, cfg.wire_version, Role::Standby, session, meta.clone())
                            .await
                            .map(|()| (send, recv, hello))?,
                    ))
                };
                match tokio::time::timeout(cfg.handshake_timeout, setup).await {
                    Err(_) => {
                        tracing::warn!(peer = %addr, "FT peer did not complete the handshake and Hello in {:?}; dropped", cfg.handshake_timeout)
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %addr, "FT peer refused: {e}"),
                    Ok(Ok((conn, (send, recv, hello)))) => {
                        if let Err((c, reason)) = check_hello(&hello, Role::Primary) {
                            tracing::warn!(peer = %addr, "FT peer refused: {reason}");
                            conn.close(VarInt::from_u32(c), reason.as_bytes());
                            continue;
                        }
                        return Ok((conn, send, recv, hello));
                    }
                }
            }
        };
        let result = self.rt.block_on(async {
            match timeout {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .unwrap_or_else(|_| Err(ChannelError::Closed("no primary connected in time".into()))),
                None => fut.await,
            }
        });
        let (conn, send, recv, hello) = result?;
        Ok(Channel::start(self.rt.clone(), self.bound.clone(), conn, send, recv, hello, &self.cfg))
    }
}

async fn send_hello(
    send: &mut quinn::SendStream,
    version: u32,
    role: Role,
    session: u64,
    meta: Vec<u8>,
) -> Result<(), String> {
    let hello = Message::Hello { version, role, session, meta };
    send.write_all(&frame::encode(&hello)).await.map_err(|e| e.to_string())
}

impl Channel {
    /// Connects to a standby at `addr` as the primary.
    pub fn connect(
        addr: SocketAddr,
        id: &Identity,
        trust: &PeerTrust,
        cfg: ChannelConfig,
        session: u64,
        meta: Vec<u8>,
    ) -> Result<Channel, ChannelError> {
        let rt = runtime()?;
        let cc = client_config(id, trust, &cfg)?;
        let bind: SocketAddr =
            if addr.is_ipv6() { "[::]:0".parse().unwrap_or(addr) } else { SocketAddr::from(([0, 0, 0, 0], 0)) };
        let mut bound = endpoint(&rt, bind, None, &cfg)?;
        bound.endpoint.set_default_client_config(cc);
        let timeout = cfg.handshake_timeout;
        let max_frame = cfg.max_frame;
        let wire_version = cfg.wire_version;
        let ep = bound.endpoint.clone();
        let connected = rt.block_on(async move {
            let setup = async {
                let conn = ep
                    .connect(addr, "smpft-peer")
                    .map_err(|e| ChannelError::Connect { addr, reason: e.to_string() })?
                    .await
                    .map_err(|e| ChannelError::Connect { addr, reason: e.to_string() })?;
                let (mut send, mut recv) =
                    conn.open_bi().await.map_err(|e| ChannelError::Connect { addr, reason: e.to_string() })?;
                send_hello(&mut send, wire_version, Role::Primary, session, meta)
                    .await
                    .map_err(|reason| ChannelError::Connect { addr, reason })?;
                let hello =
                    read_hello(&mut recv, max_frame).await.map_err(|reason| ChannelError::Connect { addr, reason })?;
                if let Err((c, reason)) = check_hello(&hello, Role::Standby) {
                    conn.close(VarInt::from_u32(c), reason.as_bytes());
                    return Err(ChannelError::Protocol { addr, reason });
                }
                Ok((conn, send, recv, hello))
            };
            tokio::time::timeout(timeout, setup).await.unwrap_or(Err(ChannelError::HandshakeTimeout { addr, timeout }))
        });
        let (conn, send, recv, hello) = connected?;
        Ok(Channel::start(rt, bound, conn, send, recv, hello, &cfg))
    }

    fn start(
        rt: Arc<quic::Rt>,
        bound: quic::Bound,
        conn: Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer_hello: Message,
        cfg: &ChannelConfig,
    ) -> Channel {
        let (etx, erx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            peer: conn.remote_address(),
            events: etx,
            detector: Mutex::new(
                crate::detector::Detector::new(
                    cfg.silence_timeout,
                    cfg.silence_ceiling,
                    cfg.heartbeat,
                    watchdog_period(cfg.heartbeat),
                    Instant::now(),
                )
                .with_mode(cfg.detector),
            ),
            closed: AtomicBool::new(false),
            budget: Budget::new(cfg.max_in_flight),
            assembly: Mutex::new(Assembly::default()),
            heartbeat_seq: AtomicU64::new(0),
            max_checkpoint: cfg.max_checkpoint,
            max_frame: cfg.max_frame,
        });
        let (ctx, crx) = tokio::sync::mpsc::unbounded_channel::<Vec<Bytes>>();
        rt.spawn(control_writer(send, crx));
        rt.spawn(control_reader(recv, conn.clone(), shared.clone()));
        rt.spawn(bulk_acceptor(conn.clone(), shared.clone()));
        rt.spawn(heartbeats(ctx.clone(), shared.clone(), cfg.heartbeat));
        rt.spawn(watchdog(conn.clone(), bound.clone(), shared.clone(), watchdog_period(cfg.heartbeat)));
        rt.spawn(closed_watch(conn.clone(), shared.clone()));
        Channel {
            rt,
            bound,
            conn,
            shared,
            control: ctx,
            events: erx,
            peer_hello,
            wire_version: cfg.wire_version,
            bulk_streams: cfg.bulk_streams.max(1),
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The wire version both sides speak: the lower of theirs.
    pub fn version(&self) -> u32 {
        match &self.peer_hello {
            Message::Hello { version, .. } => (*version).min(self.wire_version),
            _ => OLDEST_COMPATIBLE,
        }
    }

    /// The peer's Hello (its session id and the layer above's metadata).
    pub fn peer_hello(&self) -> &Message {
        &self.peer_hello
    }

    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Queues a control message (in order with all others).
    pub fn send(&self, m: &Message) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Closed("send on a closed channel".into()));
        }
        self.queue(vec![Bytes::from(frame::encode(m))])
    }

    /// Queues bytes of the layer above on the control stream, in order with every message
    /// (wire version 4 and later): `head`, then `body` as it is (not copied). The peer gets
    /// [`Event::Data`] with `kind` and the two joined.
    pub fn send_data(&self, kind: u16, head: &[u8], body: Bytes) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Closed("send on a closed channel".into()));
        }
        let len = 2 + head.len() + body.len();
        if len > frame::MAX_DATA {
            return Err(ChannelError::TooLarge { len: len as u64, max: frame::MAX_DATA as u64 });
        }
        self.queue(vec![Bytes::from(frame::data_header(kind, head, body.len())), body])
    }

    fn queue(&self, parts: Vec<Bytes>) -> Result<(), ChannelError> {
        self.control.send(parts).map_err(|_| ChannelError::Closed("control stream gone".into()))
    }

    /// What the connection has sent so far, in UDP datagrams and in send calls (several
    /// datagrams leave in one call with GSO).
    pub fn udp_sent(&self) -> UdpSent {
        let s = self.conn.stats().udp_tx;
        UdpSent { datagrams: s.datagrams, bytes: s.bytes, calls: s.ios }
    }

    /// How long since anything was heard from the peer.
    pub fn silent_for(&self) -> Duration {
        self.shared.detector.lock().silent_for(Instant::now())
    }

    /// The failure detector's view of the peer now (threshold, silence, suspicion).
    pub fn detector(&self) -> crate::detector::Report {
        self.shared.detector.lock().report(Instant::now())
    }

    /// Bytes of checkpoints sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.shared.budget.in_flight()
    }

    /// Sends checkpoint `epoch` over the bulk streams; blocks while the in-flight budget is
    /// spent, and until every chunk has been handed to QUIC. `data` is not copied: chunks are
    /// slices of it.
    pub fn send_checkpoint(&self, epoch: u64, data: impl Into<Bytes>) -> Result<(), ChannelError> {
        let data: Bytes = data.into();
        let len = data.len() as u64;
        if len > self.shared.max_checkpoint {
            return Err(ChannelError::TooLarge { len, max: self.shared.max_checkpoint });
        }
        self.shared.budget.acquire(epoch, len)?;
        // Small checkpoints go on one stream; big ones spread out, at least 256 KiB a chunk.
        let count = (data.len() / (256 << 10)).clamp(1, self.bulk_streams) as u32;
        let per = data.len().div_ceil(count as usize).max(1);
        let conn = self.conn.clone();
        let r = self.rt.block_on(async move {
            let mut tasks = Vec::new();
            for index in 0..count {
                let start = (index as usize * per).min(data.len());
                let end = ((index as usize + 1) * per).min(data.len());
                let chunk = data.slice(start..end);
                let conn = conn.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
                    let mut h = Vec::with_capacity(CHUNK_HEADER);
                    h.extend_from_slice(&epoch.to_le_bytes());
                    h.extend_from_slice(&index.to_le_bytes());
                    h.extend_from_slice(&count.to_le_bytes());
                    h.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
                    s.write_all_chunks(&mut [Bytes::from(h), chunk]).await.map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())?;
                    Ok::<(), String>(())
                }));
            }
            for t in tasks {
                t.await.map_err(|e| e.to_string())??;
            }
            Ok::<(), String>(())
        });
        r.map_err(ChannelError::Closed)?;
        self.send(&Message::Checkpoint { epoch, chunks: count, bytes: len })
    }

    /// Closes with a reason: a Goodbye on the control stream, then the QUIC close.
    pub fn close(&self, code: u32, reason: &str) {
        let _ = self.send(&Message::Goodbye { code, reason: reason.to_string() });
        if !self.shared.closed.swap(true, Ordering::SeqCst) {
            let conn = self.conn.clone();
            let reason = reason.to_string();
            self.rt.block_on(async move {
                // Give the Goodbye a moment to leave before the close frame.
                tokio::time::sleep(Duration::from_millis(5)).await;
                conn.close(VarInt::from_u32(code), reason.as_bytes());
            });
            self.shared.budget.close();
        }
        let ep = self.bound.endpoint.clone();
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(200), ep.wait_idle()).await;
        });
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if !self.is_closed() {
            self.close(code::NORMAL, "channel dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_checks_version_role_and_kind() {
        let hello = |version, role| Message::Hello { version, role, session: 1, meta: vec![] };
        assert!(check_hello(&hello(PROTOCOL_VERSION, Role::Primary), Role::Primary).is_ok());
        assert!(
            check_hello(&hello(PROTOCOL_VERSION + 1, Role::Primary), Role::Primary).is_ok(),
            "a newer peer decides"
        );
        assert!(check_hello(&hello(OLDEST_COMPATIBLE, Role::Primary), Role::Primary).is_ok());
        let (c, why) = check_hello(&hello(OLDEST_COMPATIBLE - 1, Role::Primary), Role::Primary).unwrap_err();
        assert_eq!(c, code::VERSION);
        assert!(why.contains("upgrade the peer"), "{why}");
        assert_eq!(check_hello(&hello(PROTOCOL_VERSION, Role::Standby), Role::Primary).unwrap_err().0, code::PROTOCOL);
        assert_eq!(check_hello(&Message::Heartbeat { seq: 0 }, Role::Primary).unwrap_err().0, code::PROTOCOL);
    }
}
