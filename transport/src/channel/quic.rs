//! QUIC endpoint set-up: the runtime, transport tuning, TLS configs and the UDP socket.

use super::{ChannelConfig, ChannelError, Congestion, MAX_CHUNKS};
use crate::identity::{tls_client, tls_server, Identity, PeerTrust};
use crate::message::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn runtime() -> Result<Arc<Rt>, ChannelError> {
    tokio::runtime::Builder::new_multi_thread()
        // One worker per endpoint: on a 2-core host a second one only adds wakeups (measured).
        .worker_threads(1)
        .thread_name("ft-channel")
        .on_thread_start(|| confine::enter(confine::Kind::Channel))
        .enable_all()
        .build()
        .map(|rt| Arc::new(Rt(Some(rt))))
        .map_err(ChannelError::Runtime)
}

/// An endpoint's runtime, shared by the endpoint and its channels. The last of them to go
/// shuts it down in the background: whoever drops it (a standby going live, say) never waits
/// for the runtime's tasks to wind down.
pub(super) struct Rt(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn transport_config(cfg: &ChannelConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let window = VarInt::from_u64(cfg.window).unwrap_or(VarInt::MAX);
    t.stream_receive_window(window)
        .receive_window(VarInt::from_u64(cfg.window.saturating_mul(2)).unwrap_or(VarInt::MAX))
        .send_window(cfg.window.saturating_mul(2))
        .max_concurrent_uni_streams(VarInt::from_u32(4 * MAX_CHUNKS))
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .initial_mtu(cfg.mtu.max(1200))
        .keep_alive_interval(Some(cfg.heartbeat))
        // The channel's own watchdog decides about silence; QUIC's idle timeout is a backstop.
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.silence_ceiling.max(cfg.silence_timeout) * 4 + Duration::from_secs(1))
                .unwrap_or(quinn::IdleTimeout::from(VarInt::from_u32(10_000))),
        ));
    if let Some(n) = cfg.ack_threshold {
        let mut a = quinn::AckFrequencyConfig::default();
        a.ack_eliciting_threshold(VarInt::from_u32(n));
        t.ack_frequency_config(Some(a));
    }
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_mtu.max(cfg.mtu));
    t.mtu_discovery_config(Some(mtu));
    match cfg.congestion {
        Congestion::Cubic => {
            let mut c = quinn::congestion::CubicConfig::default();
            c.initial_window(4 << 20);
            t.congestion_controller_factory(Arc::new(c));
        }
        Congestion::NewReno => {
            let mut c = quinn::congestion::NewRenoConfig::default();
            c.initial_window(4 << 20);
            t.congestion_controller_factory(Arc::new(c));
        }
        Congestion::Bbr => {
            let mut c = quinn::congestion::BbrConfig::default();
            c.initial_window(4 << 20);
            t.congestion_controller_factory(Arc::new(c));
        }
    }
    t
}

pub(super) fn client_config(
    id: &Identity,
    trust: &PeerTrust,
    cfg: &ChannelConfig,
) -> Result<quinn::ClientConfig, ChannelError> {
    let mut c = tls_client(id, trust).map_err(|e| ChannelError::Tls(e.to_string()))?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    let q = QuicClientConfig::try_from(c).map_err(|e| ChannelError::Tls(e.to_string()))?;
    let mut qc = quinn::ClientConfig::new(Arc::new(q));
    qc.transport_config(Arc::new(transport_config(cfg)));
    Ok(qc)
}

pub(super) fn server_config(
    id: &Identity,
    trust: &PeerTrust,
    cfg: &ChannelConfig,
) -> Result<quinn::ServerConfig, ChannelError> {
    let mut c = tls_server(id, trust).map_err(|e| ChannelError::Tls(e.to_string()))?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    let q = QuicServerConfig::try_from(c).map_err(|e| ChannelError::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(q));
    sc.transport_config(Arc::new(transport_config(cfg)));
    Ok(sc)
}

/// A UDP socket with large buffers (see [`ChannelConfig::socket_buffer`]).
fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind(addr)?;
    let size = buffer.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for opt in [force, plain] {
            // SAFETY: setsockopt on a socket we own with a pointer to a c_int and its size.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
    Ok(sock)
}

/// An endpoint and its socket, which the failure detector looks into for datagrams waiting
/// unread.
#[derive(Clone)]
pub(super) struct Bound {
    pub(super) endpoint: Endpoint,
    pub(super) socket: Arc<std::net::UdpSocket>,
}

impl Bound {
    /// Something waits unread in the socket.
    pub(super) fn unread(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket this endpoint owns writes one c_int through the pointer.
        let r = unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::FIONREAD, &mut n) };
        r == 0 && n > 0
    }
}

pub(super) fn endpoint(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    cfg: &ChannelConfig,
) -> Result<Bound, ChannelError> {
    let _g = rt.enter();
    let sock = udp_socket(addr, cfg.socket_buffer).map_err(|source| ChannelError::Bind { addr, source })?;
    let socket = Arc::new(sock.try_clone().map_err(|source| ChannelError::Bind { addr, source })?);
    let mut ec = quinn::EndpointConfig::default();
    // The largest datagram this endpoint will send or accept: up to the configured MTU.
    ec.max_udp_payload_size(cfg.max_mtu.max(cfg.mtu).max(1200)).map_err(|e| ChannelError::Tls(e.to_string()))?;
    let endpoint = Endpoint::new(ec, server, sock, Arc::new(quinn::TokioRuntime))
        .map_err(|source| ChannelError::Bind { addr, source })?;
    Ok(Bound { endpoint, socket })
}
