//! A fault-injecting proxy between a migration source and its destination.
//!
//! It understands the frames it forwards (header, body, and a `Pages` frame's payload), so a
//! fault can fire at an exact point of the protocol: "freeze everything just after the
//! destination sends `Loaded`", "cut the link when the source writes `Go`", "corrupt the
//! third `Pages` frame". Every connection of a migration (main and data channels) goes
//! through one proxy; a freeze or a cut applies to all of them, as a stalled host or a
//! partition would.

use std::io::{Read as _, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::{
    decode_body, decode_header, ChannelRole, Message, MessageKind, FRAME_HEADER_LEN,
};
use ferry_transport::{connect, Listener, Stream, Uri};

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination.
    ToDestination,
    /// Destination to source.
    ToSource,
}

/// When a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// As soon as the first connection arrives.
    FirstConnection,
    /// When the `nth` (from 1) frame of `kind` travels in `dir`, on any channel.
    Frame {
        /// Direction.
        dir: Dir,
        /// Frame kind.
        kind: MessageKind,
        /// Which occurrence.
        nth: u32,
    },
}

impl Trigger {
    /// The first `kind` frame going in `dir`.
    pub fn first(dir: Dir, kind: MessageKind) -> Trigger {
        Trigger::Frame { dir, kind, nth: 1 }
    }
}

/// What happens when it fires.
#[derive(Clone)]
pub enum Action {
    /// Stop forwarding in both directions on every connection, sockets left open: a frozen
    /// peer or a partition without resets. The triggering frame is held back.
    Freeze,
    /// Like [`Action::Freeze`], then forward again after this long (a peer thawed).
    FreezeFor(Duration),
    /// Close every connection (both sides see the link die). The triggering frame is
    /// dropped.
    Cut,
    /// Drop the triggering frame and go on (a frame lost by a broken middlebox).
    Drop,
    /// Forward the triggering frame with the first byte of its body flipped (of its header,
    /// for a frame without a body).
    Corrupt,
    /// Forward the triggering frame with its last byte flipped: for a Pages frame, a byte
    /// of the last page's data (damage only a checksum can see).
    CorruptLast,
    /// Hold the triggering frame back this long, then forward it.
    Delay(Duration),
    /// Run a hook (kill or stop a process, say) before forwarding the triggering frame;
    /// `true` from the hook means "then drop the frame".
    Hook(Arc<dyn Fn() -> bool + Send + Sync>),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Freeze => f.write_str("Freeze"),
            Action::FreezeFor(d) => write!(f, "FreezeFor({d:?})"),
            Action::Cut => f.write_str("Cut"),
            Action::Drop => f.write_str("Drop"),
            Action::Corrupt => f.write_str("Corrupt"),
            Action::CorruptLast => f.write_str("CorruptLast"),
            Action::Delay(d) => write!(f, "Delay({d:?})"),
            Action::Hook(_) => f.write_str("Hook"),
        }
    }
}

/// A fault: a trigger and what to do then.
#[derive(Debug, Clone)]
pub struct Fault {
    /// When.
    pub when: Trigger,
    /// What.
    pub action: Action,
}

/// Shared state of every connection through one proxy.
struct Shared {
    upstream: Uri,
    faults: Vec<Fault>,
    counts: Mutex<Vec<(Dir, MessageKind, u32)>>,
    fired: Mutex<Vec<String>>,
    frozen_until: Mutex<Option<Option<Instant>>>,
    cut: AtomicBool,
    sockets: Mutex<Vec<Stream>>,
    connections: AtomicU32,
    /// Raw mode (for streams it cannot parse, such as TLS): forward bytes as they are, but
    /// flip the byte at this offset of this connection (0 = the first) towards the
    /// destination.
    raw: Option<RawFlip>,
}

/// Where a raw-mode proxy flips a byte.
#[derive(Debug, Clone, Copy)]
pub struct RawFlip {
    /// Which connection, in arrival order (0 = the first).
    pub connection: u32,
    /// Offset of the byte in that connection's source-to-destination stream.
    pub offset: u64,
}

/// A running proxy; stops (and cuts everything) when dropped.
pub struct Proxy {
    uri: Uri,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on `listen` (use port 0 or a fresh unix path) and forwards to `upstream`,
    /// applying `faults`.
    pub fn start(listen: &Uri, upstream: Uri, faults: Vec<Fault>) -> std::io::Result<Proxy> {
        Proxy::start_with(listen, upstream, faults, None)
    }

    /// A proxy that does not parse what it forwards (a TLS stream), flipping one byte.
    pub fn start_raw(listen: &Uri, upstream: Uri, flip: RawFlip) -> std::io::Result<Proxy> {
        Proxy::start_with(listen, upstream, Vec::new(), Some(flip))
    }

    fn start_with(
        listen: &Uri,
        upstream: Uri,
        faults: Vec<Fault>,
        raw: Option<RawFlip>,
    ) -> std::io::Result<Proxy> {
        let listener = Listener::bind(listen).map_err(std::io::Error::other)?;
        let uri = listener.local_uri();
        let shared = Arc::new(Shared {
            upstream,
            faults,
            counts: Mutex::new(Vec::new()),
            fired: Mutex::new(Vec::new()),
            frozen_until: Mutex::new(None),
            cut: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            connections: AtomicU32::new(0),
            raw,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, s, st))?;
        Ok(Proxy { uri, shared, stop })
    }

    /// Where sources should connect.
    pub fn uri(&self) -> Uri {
        self.uri.clone()
    }

    /// The faults that fired so far, as text.
    pub fn fired(&self) -> Vec<String> {
        lock(&self.shared.fired).clone()
    }

    /// Waits until at least one fault fired, up to `timeout`.
    pub fn wait_fired(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while lock(&self.shared.fired).is_empty() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u32 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Ends a freeze now.
    pub fn thaw(&self) {
        *lock(&self.shared.frozen_until) = None;
    }

    /// Cuts every connection now.
    pub fn cut(&self) {
        self.shared.cut_all();
    }

    /// After a cut: new connections are forwarded again (the link is back; the cut ones
    /// stay dead).
    pub fn heal(&self) {
        lock(&self.shared.sockets).clear();
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Whether a cut is in force.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.cut_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn cut_all(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in lock(&self.sockets).iter() {
            s.shutdown();
        }
    }

    fn note(&self, what: String) {
        tracing::info!("proxy: {what}");
        lock(&self.fired).push(what);
    }

    /// Blocks while frozen; false once cut.
    fn wait_thawed(&self) -> bool {
        loop {
            if self.cut.load(Ordering::SeqCst) {
                return false;
            }
            let frozen = *lock(&self.frozen_until);
            match frozen {
                None => return true,
                Some(Some(t)) if Instant::now() >= t => {
                    *lock(&self.frozen_until) = None;
                    return true;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Counts a frame and returns the fault it triggers, if any.
    fn trigger(&self, dir: Dir, kind: MessageKind) -> Option<Action> {
        let n = {
            let mut c = lock(&self.counts);
            match c.iter_mut().find(|(d, k, _)| *d == dir && *k == kind) {
                Some(e) => {
                    e.2 += 1;
                    e.2
                }
                None => {
                    c.push((dir, kind, 1));
                    1
                }
            }
        };
        self.faults.iter().find_map(|f| match f.when {
            Trigger::Frame {
                dir: d,
                kind: k,
                nth,
            } if d == dir && k == kind && nth == n => Some(f.action.clone()),
            _ => None,
        })
    }

    fn on_first_connection(&self) {
        if self.connections.fetch_add(1, Ordering::SeqCst) > 0 {
            return;
        }
        for f in &self.faults {
            if f.when == Trigger::FirstConnection {
                self.note(format!("{:?} at the first connection", f.action));
                self.apply_global(&f.action);
            }
        }
    }

    /// Freeze and cut apply to every connection.
    fn apply_global(&self, a: &Action) {
        match a {
            Action::Freeze => *lock(&self.frozen_until) = Some(None),
            Action::FreezeFor(d) => *lock(&self.frozen_until) = Some(Some(Instant::now() + *d)),
            Action::Cut => self.cut_all(),
            _ => {}
        }
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(client)) = listener.accept_timeout(Duration::from_millis(50)) else {
            continue;
        };
        let index = shared.connections.load(Ordering::SeqCst);
        shared.on_first_connection();
        if shared.cut.load(Ordering::SeqCst) {
            client.shutdown();
            continue;
        }
        let server = match connect(&shared.upstream, Instant::now() + Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => {
                client.shutdown();
                continue;
            }
        };
        let _ = server.set_nodelay();
        let _ = client.set_nodelay();
        let pair = (|| Some((client.try_clone().ok()?, server.try_clone().ok()?)))();
        let Some((c2, s2)) = pair else { continue };
        {
            let mut socks = lock(&shared.sockets);
            for s in [&client, &server] {
                if let Ok(c) = s.try_clone() {
                    socks.push(c);
                }
            }
        }
        let (a, b) = (shared.clone(), shared.clone());
        if let Some(flip) = shared.raw {
            let at = (flip.connection == index).then_some(flip.offset);
            let _ = std::thread::Builder::new()
                .name("proxy-raw-up".into())
                .spawn(move || pump_raw(client, server, at, &a));
            let _ = std::thread::Builder::new()
                .name("proxy-raw-down".into())
                .spawn(move || pump_raw(s2, c2, None, &b));
            continue;
        }
        let name = Arc::new(Mutex::new(String::from("?")));
        let n2 = name.clone();
        let _ = std::thread::Builder::new()
            .name("proxy-up".into())
            .spawn(move || pump(client, server, Dir::ToDestination, &a, &name));
        let _ = std::thread::Builder::new()
            .name("proxy-down".into())
            .spawn(move || pump(s2, c2, Dir::ToSource, &b, &n2));
    }
}

/// Reads exactly `buf.len()` bytes; false at the end of the stream or on error.
fn fill(r: &mut Stream, buf: &mut [u8]) -> bool {
    r.read_exact(buf).is_ok()
}

/// A frame as read: its kind and bytes, or raw bytes that are not a frame.
type Read = Result<(MessageKind, Vec<u8>), Vec<u8>>;

/// Reads one whole frame (header, body, Pages payload); `None` at the end or on garbage
/// (which is then forwarded raw by the caller).
fn read_frame(r: &mut Stream) -> Option<Read> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !fill(r, &mut header) {
        return None;
    }
    let Ok(h) = decode_header(&header) else {
        return Some(Err(header.to_vec()));
    };
    let mut frame = header.to_vec();
    let body_len = h.body_len as usize;
    let sum_len = if h.summed { 8 } else { 0 };
    frame.resize(FRAME_HEADER_LEN + body_len + sum_len, 0);
    if !fill(r, &mut frame[FRAME_HEADER_LEN..]) {
        return None;
    }
    if matches!(h.kind, MessageKind::Pages | MessageKind::Compressed) {
        let body = &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
        let payload = decode_body(h.kind, body)
            .map(|m| m.payload_len())
            .unwrap_or(0) as usize;
        let start = frame.len();
        frame.resize(start + payload, 0);
        if !fill(r, &mut frame[start..]) {
            return None;
        }
    }
    Some(Ok((h.kind, frame)))
}

/// Whether `frame` is a Hello of a data channel (to name the channel in logs).
fn role_of(frame: &[u8]) -> Option<ChannelRole> {
    // A Hello is never summed: its body is the rest of the frame.
    match decode_body(MessageKind::Hello, frame.get(FRAME_HEADER_LEN..)?) {
        Ok(Message::Hello(h)) => Some(h.role),
        _ => None,
    }
}

fn pump(mut from: Stream, mut to: Stream, dir: Dir, shared: &Shared, channel: &Mutex<String>) {
    loop {
        let frame = match read_frame(&mut from) {
            None => break,
            Some(Err(raw)) => raw,
            Some(Ok((kind, mut frame))) => {
                if kind == MessageKind::Hello {
                    *lock(channel) = match role_of(&frame) {
                        Some(ChannelRole::Main) => "main".into(),
                        Some(ChannelRole::Data { index }) => format!("data {index}"),
                        Some(ChannelRole::Urgent) => "urgent".into(),
                        None => "?".into(),
                    };
                }
                if let Some(action) = shared.trigger(dir, kind) {
                    let ch = lock(channel).clone();
                    shared.note(format!("{action:?} at {kind} {dir:?} on the {ch} channel"));
                    if !apply(&action, &mut frame, shared) {
                        continue;
                    }
                }
                frame
            }
        };
        if !shared.wait_thawed() || to.write_all(&frame).is_err() {
            break;
        }
    }
    // A frozen link delivers nothing, not even the end of a stream.
    if shared.wait_thawed() {
        // Pass the end of stream on, keeping the other direction open.
        if let Stream::Tcp(t) = &to {
            let _ = t.shutdown(Shutdown::Write);
        } else {
            to.shutdown_write();
        }
    }
}

/// Forwards bytes as they come, flipping the one at offset `flip`.
fn pump_raw(mut from: Stream, mut to: Stream, flip: Option<u64>, shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = flip.filter(|f| (at..at + n as u64).contains(f)) {
            if let Some(b) = buf.get_mut((f - at) as usize) {
                *b ^= 0x01;
            }
            shared.note(format!("flipped the byte at offset {f}"));
        }
        at += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    to.shutdown_write();
}

/// Applies a frame's fault; false means "do not forward this frame".
fn apply(action: &Action, frame: &mut [u8], shared: &Shared) -> bool {
    match action {
        Action::Freeze | Action::FreezeFor(_) => {
            shared.apply_global(action);
            true
        }
        Action::Cut => {
            shared.apply_global(action);
            false
        }
        Action::Drop => false,
        Action::Corrupt => {
            // Flip the body's first byte (a count or length, so the damage is detectable
            // without checksums); a bare header has nothing but its kind.
            let i = if frame.len() > FRAME_HEADER_LEN {
                FRAME_HEADER_LEN
            } else {
                0
            };
            if let Some(b) = frame.get_mut(i) {
                *b ^= 0xA5;
            }
            true
        }
        Action::CorruptLast => {
            if let Some(b) = frame.last_mut() {
                *b ^= 0x01;
            }
            true
        }
        Action::Delay(d) => {
            std::thread::sleep(*d);
            true
        }
        Action::Hook(h) => !h(),
    }
}
