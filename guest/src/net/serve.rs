//! What every service socket shares (making a socket, its life from one connection to the next),
//! and the two byte-stream services: the line service (TCP port 7000) and echo (TCP port 7).
//!
//! A socket serves one connection at a time: it listens, takes a connection, and when that is over
//! (closed by both sides, or reset) listens again; several sockets per port give several
//! connections at once. When the peer closes its half, the server answers what is left of the
//! input and then closes its own (its FIN follows the data still queued).

use crate::service::{self, Line};
use smoltcp::socket::tcp;
use smoltcp::time::Duration;

/// Idle connections are probed this often, so that a peer that vanished is noticed...
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// ...and the connection given up after this long without an answer (or without an
/// acknowledgement of data sent), freeing the socket for another client.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Echo moves data through a stack buffer of this size.
const ECHO_CHUNK: usize = 2048;

/// What serving a socket did.
#[derive(Clone, Copy, Default)]
pub struct Served {
    /// Bytes were consumed or queued.
    pub busy: bool,
    /// A line service client sent `EXIT`: its reply is queued, the guest is to stop.
    pub exit: bool,
}

/// A socket with `mem` split into its receive and transmit buffers, listening on `port`.
/// Replies go out at once (no Nagle: requests and replies are small and latency matters).
pub fn socket(mem: &'static mut [u8], port: u16) -> tcp::Socket<'static> {
    let half = mem.len() / 2;
    socket_split(mem, half, port)
}

/// As [`socket`], with the first `rx_len` bytes of `mem` for receiving and the rest for sending.
pub fn socket_split(mem: &'static mut [u8], rx_len: usize, port: u16) -> tcp::Socket<'static> {
    let (rx, tx) = mem.split_at_mut(rx_len);
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    s.set_nagle_enabled(false);
    s.set_keep_alive(Some(KEEP_ALIVE));
    s.set_timeout(Some(TIMEOUT));
    // Cannot fail: the port is not zero and a new socket is closed.
    let _ = s.listen(port);
    s
}

/// Listens on `port` again once a connection is over (closed by both sides, or reset; a socket in
/// TIME-WAIT is reused at once). True while the socket has a connection to serve; false while it
/// listens, when the caller forgets any state of the connection before.
pub fn tend(sock: &mut tcp::Socket, port: u16) -> bool {
    if !sock.is_open() {
        // Cannot fail: the port is not zero and the socket is not open.
        let _ = sock.listen(port);
        return false;
    }
    !sock.is_listening()
}

/// Closes the server's half once the peer has closed its own and every byte it sent has been taken
/// from the socket, unless the service still has answers to send for some (`pending`).
pub fn close_when_peer_done(sock: &mut tcp::Socket, pending: bool) {
    if !pending && sock.state() == tcp::State::CloseWait && sock.recv_queue() == 0 {
        sock.close();
    }
}

/// The room left in the transmit buffer.
fn send_room(sock: &tcp::Socket) -> usize {
    sock.send_capacity() - sock.send_queue()
}

/// The line service: assembles request lines like the serial service and answers each, in order,
/// from the same shared state. A line is taken from the socket only while the transmit buffer has
/// room for its reply; otherwise the input waits in the receive buffer (the peer's window closes).
pub fn serve_lines(sock: &mut tcp::Socket, line: &mut Line) -> Served {
    let mut served = Served::default();
    loop {
        if send_room(sock) < service::REPLY_MAX {
            break;
        }
        // Up to and including the first newline of the contiguous input: (bytes taken, a line ended).
        let taken = sock.recv(|data| {
            let end = data.iter().position(|&b| line.push(b));
            let n = end.map_or(data.len(), |i| i + 1);
            (n, (n, end.is_some()))
        });
        match taken {
            Ok((_, true)) => {
                let (reply, exit) = service::answer(line);
                line.clear();
                // Fits: the room was checked above; the transmit half is open while input flows.
                let _ = sock.send_slice(reply.bytes());
                served.busy = true;
                if exit {
                    served.exit = true;
                    return served;
                }
            }
            Ok((n, false)) if n > 0 => served.busy = true,
            _ => break,
        }
    }
    // Input left unread keeps the connection open; a last line without a newline is not a request.
    close_when_peer_done(sock, false);
    served
}

/// Echo: sends back every byte received, in order. Bytes are taken from the receive buffer only
/// as far as the transmit buffer has room for them, so none is ever dropped.
pub fn serve_echo(sock: &mut tcp::Socket) -> Served {
    let mut served = Served::default();
    let mut chunk = [0u8; ECHO_CHUNK];
    while sock.may_send() {
        let room = send_room(sock).min(ECHO_CHUNK);
        if room == 0 {
            break;
        }
        let n = match sock.recv_slice(&mut chunk[..room]) {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        // All `n` bytes fit: `room` was free and the transmit half is open.
        let _ = sock.send_slice(&chunk[..n]);
        served.busy = true;
    }
    close_when_peer_done(sock, false);
    served
}

/// Source: fills the transmit buffer with a repeating pattern (`0123456789` ...) whenever it has
/// room; what the client sends is read and dropped.
pub fn serve_source(sock: &mut tcp::Socket) -> Served {
    let mut served = Served::default();
    let mut sink = [0u8; 256];
    while let Ok(n) = sock.recv_slice(&mut sink) {
        if n == 0 {
            break;
        }
    }
    while sock.may_send() {
        let room = send_room(sock).min(ECHO_CHUNK);
        if room == 0 {
            break;
        }
        let mut chunk = [0u8; ECHO_CHUNK];
        for (i, b) in chunk[..room].iter_mut().enumerate() {
            *b = b'0' + (i % 10) as u8;
        }
        let _ = sock.send_slice(&chunk[..room]);
        served.busy = true;
    }
    close_when_peer_done(sock, false);
    served
}
