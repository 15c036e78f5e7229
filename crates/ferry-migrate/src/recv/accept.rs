//! The destination's front door. Every connection gets a short deadline to send one
//! complete Ferry `Hello`; only connections that do reach the event loop. Anything else (a
//! port scan, a health check, garbage, a peer that says nothing) is dropped and logged, and
//! the destination keeps listening. A peer of another protocol version is told why.
//!
//! With TLS, every connection first completes a mutual TLS handshake here (driven without
//! blocking, like the greeting): a connection becomes a candidate only once its client
//! certificate is verified and it has greeted. A plaintext Ferry source is told that TLS
//! is required; anything else that fails the handshake is dropped with the reason logged.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ferry_proto::{
    decode_body, decode_header, Hello, Message, MessageKind, FRAME_HEADER_LEN, HELLO_FRAME_LEN,
    VERSION,
};
use ferry_transport::tls::ServerHandshake;
use ferry_transport::{set_blocking, wait_readable, Listener, Stream, TlsConfig};

use crate::wire::send_by;

/// Connections waiting for their Hello at once; the oldest is dropped beyond this.
pub(crate) const MAX_PENDING: usize = 64;
/// How often the acceptor looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// A connection that sent a valid Hello of this protocol version.
pub(crate) struct Greeted {
    pub(crate) hello: Hello,
    pub(crate) stream: Stream,
    pub(crate) peer: String,
}

/// A pending connection's socket: still in its TLS handshake, or carrying Ferry frames.
enum Conn {
    Handshaking(Box<ServerHandshake>),
    Ready(Stream),
}

impl Conn {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Handshaking(h) => h.socket().as_fd(),
            Conn::Ready(s) => s.as_fd(),
        }
    }
}

/// A connection whose Hello is still arriving.
struct Pending {
    conn: Conn,
    peer: String,
    buf: [u8; HELLO_FRAME_LEN],
    filled: usize,
    deadline: Instant,
}

/// What a pending connection's bytes amount to so far.
enum Greeting {
    Incomplete,
    Greeted(Hello),
    /// Drop it; the text says why (for the log).
    Drop(String),
    /// A Ferry peer of another version: refuse with this reason, then drop.
    Refuse(String),
}

/// Accepts and greets connections on `listener` until `stop` is set. Each good one goes to
/// `tx` as `wrap(Greeted)`; each dropped one counts in `strays`.
pub(crate) fn run<E>(
    listener: &Listener,
    tls: Option<&TlsConfig>,
    timeout: Duration,
    stop: &AtomicBool,
    strays: &AtomicU64,
    tx: &Sender<E>,
    wrap: fn(Greeted) -> E,
) {
    let mut pending: Vec<Pending> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let wait = pending
            .iter()
            .map(|p| p.deadline.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(POLL)
            .min(POLL);
        let ready = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![listener.as_fd()];
            fds.extend(pending.iter().map(|p| p.conn.fd()));
            match wait_readable(&fds, wait) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("incoming migration listener: {e}");
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        };
        let mut survivors = Vec::with_capacity(pending.len());
        for (p, readable) in pending.into_iter().zip(ready.iter().skip(1)) {
            if let Some(p) = step(p, *readable, strays, tx, wrap) {
                survivors.push(p);
            }
        }
        pending = survivors;
        if ready.first().copied().unwrap_or(false) {
            accept_all(listener, tls, timeout, &mut pending, strays);
        }
    }
}

/// Takes every connection waiting in the backlog.
fn accept_all(
    listener: &Listener,
    tls: Option<&TlsConfig>,
    timeout: Duration,
    pending: &mut Vec<Pending>,
    strays: &AtomicU64,
) {
    while let Ok(Some(stream)) = listener.accept_timeout(Duration::ZERO) {
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if pending.len() >= MAX_PENDING {
            let old = pending.remove(0);
            drop_conn(
                old.peer,
                "too many connections waiting for their handshake",
                strays,
            );
        }
        let peer = stream.peer();
        let conn = match tls {
            None => Conn::Ready(stream),
            Some(cfg) => match ServerHandshake::new(cfg, stream) {
                Ok(h) => Conn::Handshaking(Box::new(h)),
                Err(e) => {
                    drop_conn(peer, &e.to_string(), strays);
                    continue;
                }
            },
        };
        pending.push(Pending {
            peer,
            conn,
            buf: [0; HELLO_FRAME_LEN],
            filled: 0,
            deadline: Instant::now() + timeout,
        });
    }
}

/// Advances one pending connection; returns it if it is still pending.
fn step<E>(
    p: Pending,
    readable: bool,
    strays: &AtomicU64,
    tx: &Sender<E>,
    wrap: fn(Greeted) -> E,
) -> Option<Pending> {
    let (mut p, early) = if readable { shake(p) } else { (p, None) };
    let progress = if let Some(g) = early {
        g
    } else if readable {
        read_some(&mut p)
    } else if Instant::now() >= p.deadline {
        Greeting::Drop("no Ferry handshake before the deadline".into())
    } else {
        Greeting::Incomplete
    };
    match progress {
        Greeting::Incomplete if Instant::now() >= p.deadline => {
            drop_conn(
                p.peer,
                "no complete Ferry handshake before the deadline",
                strays,
            );
            None
        }
        Greeting::Incomplete => Some(p),
        Greeting::Drop(why) => {
            drop_conn(p.peer, &why, strays);
            None
        }
        Greeting::Refuse(reason) => {
            let deadline = Instant::now() + Duration::from_secs(1);
            // A peer refused during the TLS handshake spoke plaintext: answer in plaintext.
            let mut stream = match p.conn {
                Conn::Ready(s) => s,
                Conn::Handshaking(h) => h.into_socket(),
            };
            let _ = stream.set_nonblocking(false);
            let _ = send_by(
                &mut stream,
                &Message::refuse(reason.clone()),
                false,
                deadline,
            );
            // Unread bytes (a plaintext Hello is only peeked at) would turn a plain close
            // into a reset that loses the reason.
            ferry_transport::close_gracefully(stream, Duration::from_secs(1));
            drop_conn(p.peer, &reason, strays);
            None
        }
        Greeting::Greeted(hello) => {
            let Conn::Ready(stream) = p.conn else {
                drop_conn(p.peer, "internal: greeted during the TLS handshake", strays);
                return None;
            };
            if set_blocking(&stream).is_err() {
                drop_conn(p.peer, "could not configure the socket", strays);
                return None;
            }
            let g = Greeted {
                hello,
                stream,
                peer: p.peer,
            };
            let _ = tx.send(wrap(g));
            None
        }
    }
}

fn drop_conn(peer: String, why: &str, strays: &AtomicU64) {
    strays.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("dropped a connection from {peer}: {why}; still waiting for a migration");
}

/// Advances a TLS handshake: the connection (`Ready` once the handshake is done), and
/// what to do with it if that is already decided.
fn shake(mut p: Pending) -> (Pending, Option<Greeting>) {
    let Conn::Handshaking(h) = &mut p.conn else {
        return (p, None);
    };
    // Only the connection's first bytes can be a plaintext Hello: later ones are records.
    if !h.started() && plaintext_hello(h.socket()) {
        let why = "this destination accepts only mutual-TLS migrations: start the source with \
                   --tls-dir";
        return (p, Some(Greeting::Refuse(why.into())));
    }
    match h.advance() {
        Ok(false) => (p, Some(Greeting::Incomplete)),
        Ok(true) => match p.conn {
            Conn::Handshaking(h) => match h.finish() {
                Ok(stream) => (
                    Pending {
                        conn: Conn::Ready(stream),
                        ..p
                    },
                    None,
                ),
                Err((e, sock)) => {
                    let why = Greeting::Drop(format!("refused: {e}"));
                    let p = Pending {
                        conn: Conn::Ready(sock),
                        ..p
                    };
                    (p, Some(why))
                }
            },
            c => (Pending { conn: c, ..p }, None),
        },
        Err(e) => (p, Some(Greeting::Drop(format!("refused: {e}")))),
    }
}

/// Whether a connection that should start a TLS handshake starts with a plaintext Ferry
/// frame instead (looked at without consuming it).
fn plaintext_hello(sock: &Stream) -> bool {
    let mut first = [0u8; 2];
    let peeked = rustix::net::recv(sock, &mut first, rustix::net::RecvFlags::PEEK);
    matches!(peeked, Ok((2, _))) && u16::from_le_bytes(first) == MessageKind::Hello as u16
}

/// Reads what has arrived (never past the Hello frame) and judges it.
fn read_some(p: &mut Pending) -> Greeting {
    use std::io::Read;
    let Conn::Ready(stream) = &mut p.conn else {
        return Greeting::Incomplete;
    };
    let Some(room) = p.buf.get_mut(p.filled..) else {
        return Greeting::Drop("internal: Hello buffer overrun".into());
    };
    match stream.read(room) {
        Ok(0) => return Greeting::Drop("closed before completing the Ferry handshake".into()),
        Ok(n) => p.filled += n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => return Greeting::Drop(format!("read error before the handshake: {e}")),
    }
    judge(&p.buf[..p.filled.min(HELLO_FRAME_LEN)])
}

/// Whether `bytes` (the start of a connection) are, or can still become, a Hello.
fn judge(bytes: &[u8]) -> Greeting {
    // A TLS handshake record: content type 22, version 3.x.
    if let [0x16, 0x03, ..] = bytes {
        return Greeting::Drop(
            "a TLS handshake, but this destination was started without --tls-dir".into(),
        );
    }
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Greeting::Incomplete;
    };
    let h = match decode_header(header) {
        Ok(h) if h.kind == MessageKind::Hello => h,
        Ok(h) => return Greeting::Drop(format!("first frame is {}, not a Ferry Hello", h.kind)),
        Err(e) => return Greeting::Drop(format!("not a Ferry migration connection: {e}")),
    };
    let Some(body) = bytes.get(FRAME_HEADER_LEN..) else {
        return Greeting::Incomplete;
    };
    if usize::try_from(h.body_len).ok() != Some(HELLO_FRAME_LEN - FRAME_HEADER_LEN) {
        return Greeting::Drop(format!("a Hello of {} bytes is malformed", h.body_len));
    }
    if bytes.len() < HELLO_FRAME_LEN {
        return Greeting::Incomplete;
    }
    match decode_body(MessageKind::Hello, body) {
        Ok(Message::Hello(hello)) if hello.version == VERSION => Greeting::Greeted(hello),
        Ok(Message::Hello(hello)) => Greeting::Refuse(format!(
            "protocol version {} is not supported; this destination speaks version {VERSION}",
            hello.version
        )),
        Ok(m) => Greeting::Drop(format!("first frame is {}, not a Hello", m.name())),
        Err(e) => Greeting::Drop(format!("bad Hello: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::{caps, ChannelRole};

    fn hello(version: u32) -> Vec<u8> {
        let mut b = Vec::new();
        Message::Hello(Hello {
            version,
            capabilities: caps::ALL,
            session: 7,
            role: ChannelRole::Main,
            data_channels: 2,
        })
        .encode(&mut b);
        b
    }

    #[test]
    fn judges_partial_good_garbage_and_other_versions() {
        let h = hello(VERSION);
        assert_eq!(h.len(), HELLO_FRAME_LEN);
        assert!(matches!(judge(&h[..3]), Greeting::Incomplete));
        assert!(matches!(judge(&h[..20]), Greeting::Incomplete));
        assert!(matches!(judge(&h), Greeting::Greeted(g) if g.session == 7));
        assert!(matches!(judge(b"GET / HTTP/1.1\r\n"), Greeting::Drop(_)));
        assert!(matches!(judge(&hello(VERSION + 1)), Greeting::Refuse(r) if r.contains("version")));
        let mut go = Vec::new();
        Message::Go.encode(&mut go);
        assert!(matches!(judge(&go), Greeting::Drop(r) if r.contains("Go")));
    }
}
