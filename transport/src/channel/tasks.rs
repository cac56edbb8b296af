//! The tasks that run a connection: control stream writer and reader, bulk chunk receivers,
//! heartbeats and the silence watchdog.

use super::shared::{Partial, Shared};
use super::{code, Event, CHUNK_HEADER, MAX_CHUNKS};
use crate::detector::{Evidence, Verdict};
use crate::frame::{self, Decoder};
use crate::message::Message;
use bytes::Bytes;
use quinn::Connection;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub(super) async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Bytes>>,
) {
    while let Some(mut parts) = rx.recv().await {
        if send.write_all_chunks(&mut parts).await.is_err() {
            return;
        }
    }
    let _ = send.flush().await;
}

pub(super) async fn control_reader(mut recv: quinn::RecvStream, conn: Connection, shared: Arc<Shared>) {
    let mut dec = Decoder::new(shared.max_frame);
    loop {
        loop {
            match dec.next_frame() {
                Ok(None) => break,
                Ok(Some(frame::Frame::Data { kind, data })) => {
                    let _ = shared.events.send(Event::Data { kind, data });
                }
                Ok(Some(frame::Frame::Message(m))) => {
                    match &m {
                        Message::Heartbeat { .. } => continue,
                        Message::Hello { .. } => {
                            shared.violation(&conn, code::PROTOCOL, "Hello after the handshake");
                            return;
                        }
                        Message::Ack { epoch } => shared.budget.release_through(*epoch),
                        Message::Checkpoint { epoch, chunks, bytes } => {
                            let ok = {
                                let mut a = shared.assembly.lock();
                                if a.announced_max.is_some_and(|m| *epoch <= m) || *chunks == 0 || *chunks > MAX_CHUNKS
                                {
                                    false
                                } else {
                                    a.announced_max = Some(*epoch);
                                    a.announced.push_back((*epoch, *chunks, *bytes));
                                    true
                                }
                            };
                            if !ok {
                                shared.violation(
                                    &conn,
                                    code::PROTOCOL,
                                    &format!("checkpoint {epoch} announced out of order or malformed"),
                                );
                                return;
                            }
                            shared.deliver(&conn);
                            continue;
                        }
                        Message::Goodbye { code, reason } => {
                            tracing::info!(peer = %shared.peer, code, "FT peer said goodbye: {reason}");
                        }
                        Message::App { .. } => {}
                    }
                    let _ = shared.events.send(Event::Message(m));
                }
                Err(e) => {
                    shared.violation(&conn, code::PROTOCOL, &format!("bad control frame: {e}"));
                    return;
                }
            }
        }
        // QUIC's own buffers, copied once, into the decoder.
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                shared.heard();
                dec.push(&chunk.bytes);
            }
            Ok(None) | Err(_) => return,
        }
    }
}

pub(super) async fn bulk_acceptor(conn: Connection, shared: Arc<Shared>) {
    while let Ok(stream) = conn.accept_uni().await {
        tokio::spawn(bulk_chunk(stream, conn.clone(), shared.clone()));
    }
}

pub(super) async fn bulk_chunk(mut s: quinn::RecvStream, conn: Connection, shared: Arc<Shared>) {
    let mut h = [0u8; CHUNK_HEADER];
    if s.read_exact(&mut h).await.is_err() {
        return; // the connection went away mid-chunk: the checkpoint stays partial
    }
    shared.heard();
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
    let (epoch, index, count, len) = (u64_at(0), u32_at(8), u32_at(12), u64_at(16));
    if count == 0 || count > MAX_CHUNKS || index >= count || len > shared.max_checkpoint {
        shared.violation(
            &conn,
            code::PROTOCOL,
            &format!("bad checkpoint chunk header (epoch {epoch}, chunk {index}/{count}, {len} bytes)"),
        );
        return;
    }
    {
        let a = shared.assembly.lock();
        let stale = a.announced_max.is_some_and(|m| epoch <= m) && !a.announced.iter().any(|&(e, ..)| e == epoch);
        if stale {
            drop(a);
            shared.violation(
                &conn,
                code::PROTOCOL,
                &format!("chunk for checkpoint {epoch}, which was already delivered"),
            );
            return;
        }
    }
    let mut parts: Vec<Bytes> = Vec::new();
    let mut at = 0u64;
    while at < len {
        match s.read_chunk((len - at) as usize, true).await {
            Ok(Some(c)) => {
                at += c.bytes.len() as u64;
                parts.push(c.bytes);
                shared.heard();
            }
            Ok(None) => {
                shared.violation(&conn, code::PROTOCOL, "checkpoint chunk shorter than its header says");
                return;
            }
            Err(_) => return,
        }
    }
    let data = parts;
    let stored = {
        let mut a = shared.assembly.lock();
        let held = a.held;
        let p = a.partial.entry(epoch).or_insert_with(|| Partial {
            count,
            chunks: vec![None; count as usize],
            received: 0,
            bytes: 0,
        });
        // Partial checkpoints may hold at most two checkpoints' worth of memory.
        if p.count != count || p.chunks[index as usize].is_some() || held + len > 2 * shared.max_checkpoint {
            false
        } else {
            p.chunks[index as usize] = Some(data);
            p.received += 1;
            p.bytes += len;
            a.held += len;
            true
        }
    };
    if !stored {
        shared.violation(
            &conn,
            code::PROTOCOL,
            &format!("inconsistent or duplicate chunk {index} of checkpoint {epoch}"),
        );
        return;
    }
    shared.deliver(&conn);
}

pub(super) async fn heartbeats(
    ctl: tokio::sync::mpsc::UnboundedSender<Vec<Bytes>>,
    shared: Arc<Shared>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let seq = shared.heartbeat_seq.fetch_add(1, Ordering::Relaxed);
        if ctl.send(vec![Bytes::from(frame::encode(&Message::Heartbeat { seq }))]).is_err() {
            return;
        }
    }
}

pub(super) async fn watchdog(conn: Connection, bound: super::quic::Bound, shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        // Packets from the peer, read or waiting: evidence it is alive while its messages are late.
        let evidence = Evidence { datagrams: conn.stats().udp_rx.datagrams, unread: bound.unread() };
        let now = std::time::Instant::now();
        let mut detector = shared.detector.lock();
        if let Verdict::Dead { silent_for, own_stall } = detector.tick_with(now, evidence) {
            let threshold = detector.threshold();
            drop(detector);
            tracing::warn!(
                peer = %shared.peer,
                threshold_ms = threshold.as_millis() as u64,
                own_stall_ms = own_stall.as_millis() as u64,
                "FT peer silent for {silent_for:?}"
            );
            let _ = shared.events.send(Event::PeerSilent { silent_for });
            shared.violation(&conn, code::SILENT, "peer silent");
            return;
        }
    }
}

pub(super) async fn closed_watch(conn: Connection, shared: Arc<Shared>) {
    let reason = conn.closed().await;
    if !shared.closed.swap(true, Ordering::SeqCst) {
        shared.budget.close();
        tracing::info!(peer = %shared.peer, "FT channel closed: {reason}");
        let _ = shared.events.send(Event::Closed { reason: reason.to_string() });
    }
}
