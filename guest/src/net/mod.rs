//! `net`: vCPU 0 drives a virtio-net device (`nic`) and runs smoltcp's TCP/IP stack on it, with
//! the guest's own address (boot parameters `net ip=A.B.C.D/PREFIX [gw=A.B.C.D]`), serving:
//!
//! | port     | service                                                            | sockets            |
//! |----------|--------------------------------------------------------------------|--------------------|
//! | TCP 7000 | the line service of `service`, its state shared with the serial line | [`LINE_SOCKETS`] |
//! | TCP 80   | minimal HTTP/1.1: `GET /incr/<id>`, `GET /stat` (see `http`)       | [`HTTP_SOCKETS`]   |
//! | TCP 7    | echo, byte for byte                                                | [`ECHO_SOCKETS`]   |
//! | TCP 19   | source: sends a repeating pattern as fast as the client takes it (bulk throughput) | [`SOURCE_SOCKETS`] |
//! | ICMP     | echo replies (ping), answered by the stack itself                  |                    |
//!
//! ARP is answered and used by the stack too; at start the guest announces its address with a
//! gratuitous ARP. There is no allocator: the sockets and their buffers are fixed arrays in
//! statics, handed to the stack once (about 2 MiB, zero-filled, in .bss). Everything runs in
//! [`poll`], called from vCPU 0's main loop: take in the frames the device returned (at most
//! [`RX_BUDGET`] per poll, so that replies are not starved), let each service read and write its
//! sockets, send what the sockets queued, and notify the device of the new buffers.
//!
//! `EXIT` over TCP: the `BYE` reply is queued, the server closes that connection, polls until the
//! reply and the FIN are acknowledged (or [`EXIT_DRAIN_MS`] pass), and then the guest stops as it
//! does for `EXIT` on the serial line.

mod http;
mod nic;
mod serve;

use crate::params;
use crate::service::{Line, Poll};
use crate::sync::{Locked, TakeOnce};
use crate::{io, log};
use core::fmt;
use core::sync::atomic::Ordering;
use nic::{Mac, Nic};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{Device as _, TxToken as _};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol};
use smoltcp::wire::{EthernetRepr, HardwareAddress, IpAddress, IpCidr};

pub const LINE_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;
pub const SOURCE_PORT: u16 = 19;
/// Connections served at once, per port.
pub const LINE_SOCKETS: usize = 16;
pub const HTTP_SOCKETS: usize = 32;
pub const ECHO_SOCKETS: usize = 4;
pub const SOURCE_SOCKETS: usize = 2;
const SOCKETS: usize = LINE_SOCKETS + HTTP_SOCKETS + ECHO_SOCKETS + SOURCE_SOCKETS;
/// Receive and transmit buffer, each, per socket. Echo's are larger for bulk transfers.
const LINE_BUF: usize = 16 << 10;
const HTTP_BUF: usize = 16 << 10;
const ECHO_BUF: usize = 64 << 10;
/// The source port sends in bulk: its transmit buffer (the most it can have in flight) covers a
/// round trip that protection lengthens to a checkpoint cycle (tens of ms).
const SOURCE_RX_BUF: usize = 4 << 10;
const SOURCE_TX_BUF: usize = 1 << 20;
/// Received frames taken in per poll before the sockets are served and replies sent.
const RX_BUDGET: usize = 64;
/// How long `EXIT` over TCP waits for its reply to be acknowledged.
const EXIT_DRAIN_MS: u64 = 1000;

// The stack's storage, taken once by `init`.
static STORAGE: TakeOnce<[SocketStorage<'static>; SOCKETS]> = TakeOnce::new([SocketStorage::EMPTY; SOCKETS]);
static LINE_MEM: TakeOnce<[[u8; 2 * LINE_BUF]; LINE_SOCKETS]> = TakeOnce::new([[0; 2 * LINE_BUF]; LINE_SOCKETS]);
static HTTP_MEM: TakeOnce<[HttpMem; HTTP_SOCKETS]> =
    TakeOnce::new([const { HttpMem { socket: [0; 2 * HTTP_BUF], request: [0; http::REQUEST_MAX] } }; HTTP_SOCKETS]);
static ECHO_MEM: TakeOnce<[[u8; 2 * ECHO_BUF]; ECHO_SOCKETS]> = TakeOnce::new([[0; 2 * ECHO_BUF]; ECHO_SOCKETS]);
static SOURCE_MEM: TakeOnce<[[u8; SOURCE_RX_BUF + SOURCE_TX_BUF]; SOURCE_SOCKETS]> =
    TakeOnce::new([[0; SOURCE_RX_BUF + SOURCE_TX_BUF]; SOURCE_SOCKETS]);

/// An HTTP connection's memory: its socket's buffers and the request being read.
struct HttpMem {
    socket: [u8; 2 * HTTP_BUF],
    request: [u8; http::REQUEST_MAX],
}

/// A line service connection: its socket and the request line being assembled.
struct LineConn {
    handle: SocketHandle,
    line: Line,
}

struct Net {
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    lines: [LineConn; LINE_SOCKETS],
    /// Each set up by `open_sockets`.
    http: [Option<http::Conn>; HTTP_SOCKETS],
    echo: [SocketHandle; ECHO_SOCKETS],
    source: [SocketHandle; SOURCE_SOCKETS],
}

static NET: Locked<Option<Net>> = Locked::new(None);

fn take<T>(cell: &'static TakeOnce<T>) -> &'static mut T {
    match cell.take() {
        Some(v) => v,
        None => crate::fail(format_args!("net: set up twice")),
    }
}

/// Starts the device and the stack and opens the listening sockets (run once, by vCPU 0, before
/// the guest's clock starts: the stack's time begins at 0). On failure, the exit status. Not
/// inlined: its locals (the stack's state is several KiB) stay out of the caller's frame.
#[inline(never)]
pub fn init(settings: &params::Net, tsc_khz: u64) -> Result<(), u32> {
    let mut nic = nic::start(tsc_khz)?;
    log_start(&nic, settings);
    announce(&mut nic, settings.ip);
    // Built in place in the static: the state is several KiB, the stack 64 KiB.
    NET.with(|slot| {
        let net = slot.insert(Net {
            iface: interface(&mut nic, settings),
            nic,
            sockets: SocketSet::new(&mut take(&STORAGE)[..]),
            lines: core::array::from_fn(|_| LineConn { handle: SocketHandle::default(), line: Line::new() }),
            http: [const { None }; HTTP_SOCKETS],
            echo: [SocketHandle::default(); ECHO_SOCKETS],
            source: [SocketHandle::default(); SOURCE_SOCKETS],
        });
        net.open_sockets();
    });
    Ok(())
}

/// The interface: the device's MAC, the guest's address, and the default route if a gateway was
/// given.
fn interface(nic: &mut Nic, settings: &params::Net) -> Interface {
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac)));
    config.random_seed = io::rdtsc();
    let mut iface = Interface::new(config, nic, Instant::ZERO);
    iface.update_ip_addrs(|addrs| {
        // Room for two addresses; this is the only one.
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(settings.ip), settings.prefix));
    });
    if let Some(gw) = settings.gw {
        // Room for two routes; this is the only one.
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    iface
}

fn log_start(nic: &Nic, s: &params::Net) {
    let (rxq, txq) = nic.queue_sizes();
    let link = match nic.link_up {
        Some(true) => "up",
        Some(false) => "down",
        None => "not reported",
    };
    let made_up = if nic.mac_from_device { "" } else { " (made up: the device has none)" };
    log!("net: {}; queues rx={rxq} tx={txq}", nic.device());
    log!(
        "net: mac={}{made_up} ip={}/{} gw={} link={link}; tcp {LINE_PORT} (lines, {LINE_SOCKETS} sockets), {HTTP_PORT} (http, {HTTP_SOCKETS}), {ECHO_PORT} (echo, {ECHO_SOCKETS}), {SOURCE_PORT} (source, {SOURCE_SOCKETS}); icmp echo",
        Mac(nic.mac),
        s.ip,
        s.prefix,
        Gateway(s.gw),
    );
}

/// Sends a gratuitous ARP request for `ip`: neighbours learn the guest's address at once, and so
/// does smpft's device, which learns the addresses to announce after a failover from the guest's
/// own ARP packets (otherwise only from its first ARP reply, once a client has asked).
fn announce(nic: &mut Nic, ip: core::net::Ipv4Addr) {
    let mac = EthernetAddress(nic.mac);
    let eth = EthernetRepr { src_addr: mac, dst_addr: EthernetAddress::BROADCAST, ethertype: EthernetProtocol::Arp };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: ip,
    };
    if let Some(tx) = nic.transmit(Instant::ZERO) {
        tx.consume(eth.buffer_len() + arp.buffer_len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
    }
    nic.flush();
}

struct Gateway(Option<core::net::Ipv4Addr>);

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(gw) => write!(f, "{gw}"),
            None => write!(f, "none"),
        }
    }
}

/// Moves frames and serves the sockets: `Busy` if anything was received, sent or answered,
/// `Exit` once a client's `EXIT` has been answered.
pub fn poll() -> Poll {
    NET.with(|n| n.as_mut().map_or(Poll::Idle, Net::poll))
}

/// Frame counters, for progress reports and the final log line.
pub fn totals() -> Totals {
    let get = |c: &core::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Totals {
        rx: get(&nic::RX_FRAMES),
        rx_empty: get(&nic::RX_EMPTY),
        tx: get(&nic::TX_FRAMES),
        drops: get(&nic::TX_DROPS),
        deferred: get(&nic::TX_DEFERRED),
    }
}

pub struct Totals {
    rx: u64,
    rx_empty: u64,
    tx: u64,
    drops: u64,
    deferred: u64,
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx-frames={} rx-empty={} tx-frames={} tx-drops={} tx-deferred={}",
            self.rx, self.rx_empty, self.tx, self.drops, self.deferred
        )
    }
}

fn now() -> Instant {
    Instant::from_millis(crate::uptime_ms() as i64)
}

impl Net {
    /// Adds every listening socket, with its buffers, to the socket set.
    fn open_sockets(&mut self) {
        let sockets = &mut self.sockets;
        for (c, mem) in self.lines.iter_mut().zip(take(&LINE_MEM)) {
            c.handle = sockets.add(serve::socket(mem, LINE_PORT));
        }
        for (c, HttpMem { socket, request }) in self.http.iter_mut().zip(take(&HTTP_MEM)) {
            *c = Some(http::Conn::new(sockets.add(serve::socket(socket, HTTP_PORT)), request));
        }
        for (h, mem) in self.echo.iter_mut().zip(take(&ECHO_MEM)) {
            *h = sockets.add(serve::socket(mem, ECHO_PORT));
        }
        for (h, mem) in self.source.iter_mut().zip(take(&SOURCE_MEM)) {
            *h = sockets.add(serve::socket_split(mem, SOURCE_RX_BUF, SOURCE_PORT));
        }
    }

    fn poll(&mut self) -> Poll {
        let frames = |t: Totals| t.rx + t.tx;
        let before = frames(totals());
        let now = now();
        self.ingress(now);
        let (busy, exit) = self.serve();
        self.iface.poll_egress(now, &mut self.nic, &mut self.sockets);
        self.nic.flush();
        if let Some(handle) = exit {
            self.drain_exit(handle);
            return Poll::Exit;
        }
        if busy || frames(totals()) != before {
            Poll::Busy
        } else {
            Poll::Idle
        }
    }

    /// Takes in up to [`RX_BUDGET`] received frames.
    fn ingress(&mut self, now: Instant) {
        for _ in 0..RX_BUDGET {
            let r = self.iface.poll_ingress_single(now, &mut self.nic, &mut self.sockets);
            if matches!(r, PollIngressSingleResult::None) {
                break;
            }
        }
    }

    /// Lets every service read and write its sockets: whether any did, and the line service
    /// socket whose client sent `EXIT`, if one did.
    fn serve(&mut self) -> (bool, Option<SocketHandle>) {
        let (mut busy, mut exit) = (false, None);
        for c in &mut self.lines {
            let sock = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !serve::tend(sock, LINE_PORT) {
                c.line.clear();
                continue;
            }
            let served = serve::serve_lines(sock, &mut c.line);
            busy |= served.busy;
            if served.exit {
                exit = Some(c.handle);
                break;
            }
        }
        for c in self.http.iter_mut().flatten() {
            let sock = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !serve::tend(sock, HTTP_PORT) {
                c.reset();
                continue;
            }
            busy |= c.serve(sock).busy;
        }
        for &h in &self.echo {
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            if serve::tend(sock, ECHO_PORT) {
                busy |= serve::serve_echo(sock).busy;
            }
        }
        for &h in &self.source {
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            if serve::tend(sock, SOURCE_PORT) {
                busy |= serve::serve_source(sock).busy;
            }
        }
        (busy, exit)
    }

    /// After `EXIT` on `handle`: closes that connection and polls until the reply and the FIN
    /// are acknowledged, or [`EXIT_DRAIN_MS`] pass.
    fn drain_exit(&mut self, handle: SocketHandle) {
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        let peer = sock.remote_endpoint();
        sock.close();
        let start = crate::uptime_ms();
        loop {
            let now = now();
            self.ingress(now);
            self.iface.poll_egress(now, &mut self.nic, &mut self.sockets);
            self.nic.flush();
            let sock = self.sockets.get::<tcp::Socket>(handle);
            let done = sock.send_queue() == 0
                && matches!(sock.state(), tcp::State::FinWait2 | tcp::State::TimeWait | tcp::State::Closed);
            if done || crate::uptime_ms() - start >= EXIT_DRAIN_MS {
                let state = sock.state();
                match peer {
                    Some(p) => log!("net: EXIT from {p}; connection {state} after the reply"),
                    None => log!("net: EXIT; connection {state} after the reply"),
                }
                return;
            }
            io::idle(100);
        }
    }
}
