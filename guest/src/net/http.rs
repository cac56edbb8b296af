//! The HTTP service (TCP port 80): a minimal HTTP/1.1 server over the shared service state.
//!
//! | request            | response                                                    |
//! |--------------------|-------------------------------------------------------------|
//! | `GET /incr/<id>`   | 200, body `OK <id> <value>\n`: the service's idempotent INCR |
//! | `GET /stat`        | 200, body the service's `STAT 0 ...` line                    |
//! | `GET` other paths  | 404                                                          |
//! | other methods      | 405                                                          |
//! | anything malformed | 400, and the connection is closed                            |
//!
//! `HEAD` is answered like `GET` without the body. Every response has `Content-Length`.
//! Connections persist (HTTP/1.1's default; HTTP/1.0 only with `Connection: keep-alive`) unless
//! the request says `Connection: close`, after whose response the server closes its half.
//! Pipelined requests are answered in order, one whenever the socket's transmit buffer has room
//! for a whole response; until then the rest waits in the receive buffer. A request body (by
//! `Content-Length`) is read and ignored; `Transfer-Encoding` is refused (400).

use super::serve::{close_when_peer_done, Served};
use crate::params::number;
use crate::service::{self, Request};
use core::fmt::Write as _;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// The longest request head (request line and headers) accepted.
pub const REQUEST_MAX: usize = 2048;
/// Room a response needs in the transmit buffer: headers and the longest service reply.
const RESPONSE_MAX: usize = 128 + service::REPLY_MAX;

/// One connection's state: request bytes read from the socket but not answered yet.
pub struct Conn {
    pub handle: SocketHandle,
    buf: &'static mut [u8; REQUEST_MAX],
    len: usize,
    /// Body bytes of the last request still to be read and dropped.
    skip: u64,
    /// A response said `Connection: close`: the server's half is closed, input is dropped.
    closing: bool,
}

impl Conn {
    pub fn new(handle: SocketHandle, buf: &'static mut [u8; REQUEST_MAX]) -> Conn {
        Conn { handle, buf, len: 0, skip: 0, closing: false }
    }

    /// Forgets the last connection (the socket listens again).
    pub fn reset(&mut self) {
        self.len = 0;
        self.skip = 0;
        self.closing = false;
    }

    /// Answers every complete request the socket's transmit buffer has room for.
    pub fn serve(&mut self, sock: &mut tcp::Socket) -> Served {
        let mut served = Served::default();
        if self.closing {
            // Keep the window open until the peer closes too; nothing more is answered.
            served.busy = sock.recv(|d| (d.len(), !d.is_empty())).unwrap_or(false);
            return served;
        }
        let mut waiting = false;
        loop {
            served.busy |= self.skip_body(sock);
            self.trim_blank_lines();
            if let Some(end) = head_end(&self.buf[..self.len]) {
                if sock.send_capacity() - sock.send_queue() < RESPONSE_MAX {
                    waiting = true;
                    break;
                }
                self.answer(sock, end);
                served.busy = true;
                if self.closing {
                    return served;
                }
                continue;
            }
            if self.len == REQUEST_MAX {
                if sock.send_capacity() - sock.send_queue() < RESPONSE_MAX {
                    waiting = true;
                    break;
                }
                self.refuse(sock);
                return served;
            }
            match sock.recv_slice(&mut self.buf[self.len..]) {
                Ok(n) if n > 0 => {
                    self.len += n;
                    served.busy = true;
                }
                _ => break,
            }
        }
        close_when_peer_done(sock, waiting);
        served
    }

    /// Drops body bytes still owed by the last request, first from the buffer, then from the
    /// socket; true if any were dropped.
    fn skip_body(&mut self, sock: &mut tcp::Socket) -> bool {
        if self.skip == 0 {
            return false;
        }
        let from_buf = self.skip.min(self.len as u64) as usize;
        self.consume(from_buf);
        self.skip -= from_buf as u64;
        let skip = self.skip;
        let from_sock = sock.recv(|d| {
            let n = skip.min(d.len() as u64) as usize;
            (n, n)
        });
        let n = from_sock.unwrap_or(0);
        self.skip -= n as u64;
        from_buf + n > 0
    }

    /// Drops empty lines before a request line (RFC 9112 section 2.2 allows them).
    fn trim_blank_lines(&mut self) {
        let n = self.buf[..self.len].iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        self.consume(n);
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Answers the request whose head is the first `end` bytes of the buffer.
    fn answer(&mut self, sock: &mut tcp::Socket, end: usize) {
        let Some(head) = Head::parse(&self.buf[..end]) else {
            self.refuse(sock);
            return;
        };
        let keep_alive = head.keep_alive;
        let is_head = head.method == b"HEAD";
        self.skip = head.body;
        let reply = match (head.method, route(head.target)) {
            (b"GET" | b"HEAD", Some(request)) => Some(service::execute(request).0),
            _ => None,
        };
        let status = match (head.method, &reply) {
            (b"GET" | b"HEAD", Some(_)) => Status::Ok,
            (b"GET" | b"HEAD", None) => Status::NotFound,
            _ => Status::MethodNotAllowed,
        };
        self.consume(end);
        let body = reply.as_ref().map_or(status.body(), |r| r.bytes());
        self.respond(sock, status, keep_alive, body, is_head);
    }

    /// Answers a malformed request with 400 and closes the connection.
    fn refuse(&mut self, sock: &mut tcp::Socket) {
        self.respond(sock, Status::BadRequest, false, Status::BadRequest.body(), false);
    }

    /// Queues a response (the caller checked that it fits); closes the server's half, and drops
    /// the rest of the input, unless `keep_alive`.
    fn respond(&mut self, sock: &mut tcp::Socket, status: Status, keep_alive: bool, body: &[u8], is_head: bool) {
        let mut out = Out { buf: [0; RESPONSE_MAX], len: 0 };
        let _ = write!(
            out,
            "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            status.line(),
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if !is_head {
            out.push(body);
        }
        // The transmit half is open (the connection is established or the peer half-closed) and
        // has room, so all of it is queued.
        let _ = sock.send_slice(&out.buf[..out.len]);
        if !keep_alive {
            sock.close();
            self.closing = true;
            self.len = 0;
            self.skip = 0;
        }
    }
}

/// The service request a path asks for.
fn route(target: &[u8]) -> Option<Request> {
    if target == b"/stat" {
        return Some(Request::Stat(0));
    }
    target.strip_prefix(b"/incr/").and_then(number).map(Request::Incr)
}

/// Where the request head in `buf` ends (just past its blank line), if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = buf.iter().position(|&b| b == b'\n')?;
    loop {
        let rest = &buf[i + 1..];
        if rest.starts_with(b"\n") {
            return Some(i + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(i + 3);
        }
        i += 1 + rest.iter().position(|&b| b == b'\n')?;
    }
}

/// What the server needs of a request head.
struct Head<'a> {
    method: &'a [u8],
    target: &'a [u8],
    keep_alive: bool,
    body: u64,
}

impl<'a> Head<'a> {
    /// `None` for a malformed head: a request line that is not `METHOD SP TARGET SP HTTP/1.x`, a
    /// header line without a colon, a bad `Content-Length`, or any `Transfer-Encoding`.
    fn parse(head: &'a [u8]) -> Option<Head<'a>> {
        let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let mut parts = lines.next()?.split(|&b| b == b' ');
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || method.is_empty() || !target.starts_with(b"/") {
            return None;
        }
        let mut h = Head {
            method,
            target,
            keep_alive: match version {
                b"HTTP/1.1" => true,
                b"HTTP/1.0" => false,
                _ => return None,
            },
            body: 0,
        };
        for line in lines.take_while(|l| !l.is_empty()) {
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                h.body = number(value)?;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return None;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        h.keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        h.keep_alive = true;
                    }
                }
            }
        }
        Some(h)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

#[derive(Clone, Copy)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
        }
    }

    /// The body of a response that has no service reply.
    fn body(self) -> &'static [u8] {
        match self {
            Status::Ok => b"OK\n",
            Status::BadRequest => b"bad request\n",
            Status::NotFound => b"not found\n",
            Status::MethodNotAllowed => b"method not allowed\n",
        }
    }
}

/// A response being put together.
struct Out {
    buf: [u8; RESPONSE_MAX],
    len: usize,
}

impl Out {
    fn push(&mut self, b: &[u8]) {
        let n = b.len().min(RESPONSE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }
}

impl core::fmt::Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}
