//! Migration transports: `tcp:HOST:PORT` and `unix:PATH` URIs, a listener that accepts the
//! channels of a migration, and a stream type over both socket kinds, plain or in mutual
//! TLS ([`tls`]). Page data goes through [`Stream::write_pages`] and [`Stream::read_pages`]:
//! straight between guest memory and the socket when plain, through the TLS layer
//! otherwise.
//!
//! Nothing here waits without a bound: connecting takes a deadline, [`write_all_by`] gives
//! up at its deadline, [`Listener::accept_timeout`] and [`wait_readable`] return when their
//! timeout passes, and [`close_gracefully`] drains a closing socket for a bounded time.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub mod record;
pub mod tls;
pub use tls::{TlsConfig, TlsError, TlsStream};

/// Errors of URIs and connections.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not understood.
    #[error("bad migration URI '{uri}': {why} (expected tcp:HOST:PORT or unix:PATH)")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A socket operation failed.
    #[error("{what} {uri}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        uri: String,
        /// The error.
        source: io::Error,
    },
}

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// TCP, `host:port`.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Uri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Uri, TransportError> {
        let bad = |why| TransportError::BadUri {
            uri: s.to_string(),
            why,
        };
        if let Some(addr) = s.strip_prefix("tcp:") {
            let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            port.parse::<u16>()
                .map_err(|_| bad("port is not a number 0-65535"))?;
            Ok(Uri::Tcp(addr.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Uri::Unix(PathBuf::from(path)))
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix, with the file descriptors that arrived on it (shared by its clones).
    Unix(UnixStream, FdInbox),
    /// TLS over either of the above.
    Tls(Box<TlsStream>),
}

/// Most file descriptors one read takes from a unix socket's ancillary data.
const FDS_PER_READ: usize = 4;
/// Most received descriptors a stream keeps until they are taken; more are closed (a peer
/// cannot make this process hold descriptors without bound).
const MAX_INBOX: usize = 16;

/// File descriptors received on a unix stream (`SCM_RIGHTS`), in arrival order, until
/// [`Stream::take_fds`] takes them.
#[derive(Debug, Clone, Default)]
pub struct FdInbox(std::sync::Arc<std::sync::Mutex<Vec<OwnedFd>>>);

impl FdInbox {
    fn push(&self, fds: impl Iterator<Item = OwnedFd>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for fd in fds {
            if v.len() < MAX_INBOX {
                v.push(fd);
            }
        }
    }

    fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Reads from a unix socket with `recvmsg`, keeping any descriptors sent along.
fn recv_unix(s: &UnixStream, inbox: &FdInbox, buf: &mut [u8]) -> io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_READ))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        s,
        &mut [io::IoSliceMut::new(buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            inbox.push(fds);
        }
    }
    Ok(r.bytes)
}

impl Stream {
    /// Another handle to the same socket (e.g. one for reading, one for writing).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s, inbox) => Stream::Unix(s.try_clone()?, inbox.clone()),
            Stream::Tls(t) => Stream::Tls(Box::new(t.try_clone()?)),
        })
    }

    /// The plain socket (under TLS, the one carrying it).
    fn plain(&self) -> &Stream {
        match self {
            Stream::Tls(t) => t.socket(),
            s => s,
        }
    }

    /// Reads through a shared reference (the socket types allow it).
    pub(crate) fn read_ref(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s, inbox) => recv_unix(s, inbox, buf),
            Stream::Tls(t) => t.read_ref(buf),
        }
    }

    /// Writes through a shared reference.
    pub(crate) fn write_ref(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s, _) => (&*s).write(buf),
            Stream::Tls(t) => t.write_ref(buf),
        }
    }

    /// Why the peer ended a TLS stream, if it said so: after a failed write, the alert it
    /// sent before closing (a refused certificate, say) is still there to read. Waits at
    /// most `timeout`; `None` for plain streams or when nothing explains it.
    pub fn tls_refusal(&self, timeout: Duration) -> Option<io::Error> {
        let Stream::Tls(t) = self else {
            return None;
        };
        t.socket().set_read_timeout(Some(timeout)).ok()?;
        let mut b = [0u8; 1];
        match t.read_ref(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Some(e),
            _ => None,
        }
    }

    /// Bytes written and not yet taken by the peer (see
    /// [`ferry_sys::iov::send_queue_bytes`]), or `None` if the socket cannot say.
    pub fn send_queue(&self) -> Option<usize> {
        ferry_sys::iov::send_queue_bytes(self.plain().as_fd()).ok()
    }

    /// Whether this stream is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Whether input waits in memory (decrypted TLS data), so a reader must read before it
    /// waits for the socket to become readable. Always false for plain sockets.
    pub fn has_buffered_input(&self) -> bool {
        match self {
            Stream::Tls(t) => t.has_buffered_input(),
            _ => false,
        }
    }

    /// Writes `header` and then the bytes of `slices` (guest memory), in order, completely:
    /// plain sockets in vectored writes straight from guest memory, TLS sealed into records
    /// straight from it.
    pub fn write_pages<B: BitmapSlice>(
        &mut self,
        header: &[u8],
        slices: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        let Stream::Tls(t) = self else {
            return ferry_sys::iov::write_all_volatile(self.as_fd(), header, slices);
        };
        t.write_gather(header, slices)?;
        t.flush_ref()
    }

    /// Fills `slices` (guest memory) with the next bytes of the stream, in order: plain
    /// sockets read straight into guest memory, TLS copies from the opened records.
    pub fn read_pages<B: BitmapSlice>(
        &mut self,
        slices: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        let Stream::Tls(t) = self else {
            return ferry_sys::iov::read_exact_volatile(self.as_fd(), slices);
        };
        slices.iter().try_for_each(|s| t.read_volatile(s))
    }

    /// Shuts down both directions, which also unblocks any thread blocked on the socket.
    pub fn shutdown(&self) {
        // Already-closed sockets are fine.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s, _) => s.shutdown(Shutdown::Both),
            Stream::Tls(t) => {
                t.socket().shutdown();
                Ok(())
            }
        };
    }

    /// Shuts down the sending direction only: the peer reads what was sent, then EOF.
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s, _) => s.shutdown(Shutdown::Write),
            Stream::Tls(t) => {
                // close_notify first: the peer's TLS layer then reports a clean end.
                t.close_notify();
                t.socket().shutdown_write();
                Ok(())
            }
        };
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.plain() {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s, _) => s.set_read_timeout(t),
            Stream::Tls(_) => Ok(()),
        }
    }

    /// Sets the write timeout (a blocked write returns `WouldBlock` after it).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.plain() {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s, _) => s.set_write_timeout(t),
            Stream::Tls(_) => Ok(()),
        }
    }

    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self.plain() {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s, _) => s.set_nonblocking(on),
            Stream::Tls(_) => Ok(()),
        }
    }

    /// Who is on the other end, for logs ("127.0.0.1:4242", or "a local process").
    pub fn peer(&self) -> String {
        match self.plain() {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "an unknown TCP peer".into()),
            Stream::Unix(..) | Stream::Tls(_) => "a local process (unix socket)".into(),
        }
    }

    /// Sends small control messages without Nagle delay (no-op for unix sockets).
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self.plain() {
            Stream::Tcp(s) => s.set_nodelay(true),
            _ => Ok(()),
        }
    }

    /// Writes `bytes` with `fds` attached (`SCM_RIGHTS`), so that the peer's read of the
    /// first of these bytes brings the descriptors into its [`Stream::take_fds`]. Unix
    /// sockets only: a TCP stream refuses with `Unsupported`.
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let Stream::Unix(s, _) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "file descriptors can only be passed over a unix socket",
            ));
        };
        let mut space =
            [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_READ))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if fds.len() > FDS_PER_READ || !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {FDS_PER_READ} descriptors per message"),
            ));
        }
        let sent = rustix::net::sendmsg(
            &*s,
            &[io::IoSlice::new(bytes)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        )?;
        // The descriptors went with the first byte; the rest is plain data.
        s.write_all(&bytes[sent..])
    }

    /// Takes the descriptors received so far (always none on TCP).
    pub fn take_fds(&self) -> Vec<OwnedFd> {
        match self {
            Stream::Tcp(_) | Stream::Tls(_) => Vec::new(),
            Stream::Unix(_, inbox) => inbox.take(),
        }
    }

    /// Whether the peer is on this host (a unix socket).
    pub fn is_local(&self) -> bool {
        matches!(self, Stream::Unix(..))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_ref(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_ref(buf)
    }
    /// Writes out what a TLS stream still holds (plain sockets hold nothing).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.flush_ref(),
            _ => Ok(()),
        }
    }
}

/// Reading through a shared reference, as the socket types allow.
impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_ref(buf)
    }
}

/// Writing through a shared reference, as the socket types allow.
impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_ref(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.flush_ref(),
            _ => Ok(()),
        }
    }
}

/// The socket's descriptor (under TLS, the carrying socket's: poll it for readability, but
/// read through the stream).
impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s, _) => s.as_fd(),
            Stream::Tls(t) => t.socket().as_fd(),
        }
    }
}

/// Connects to `uri`, giving up at `deadline`.
pub fn connect(uri: &Uri, deadline: Instant) -> Result<Stream, TransportError> {
    let err = |source| TransportError::Io {
        what: "connecting to",
        uri: uri.to_string(),
        source,
    };
    match uri {
        Uri::Tcp(addr) => {
            let addrs: Vec<_> = addr.to_socket_addrs().map_err(err)?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    last = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
                    break;
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => return Ok(Stream::Tcp(s)),
                    Err(e) => last = e,
                }
            }
            Err(err(last))
        }
        // A unix connect does not wait for the peer to accept (the backlog takes it).
        Uri::Unix(path) => UnixStream::connect(path)
            .map(|s| Stream::Unix(s, FdInbox::default()))
            .map_err(err),
    }
}

/// Writes all of `buf`, giving up at `deadline` with `TimedOut`. A stalled peer (its
/// receive window closed) therefore costs bounded time. Leaves a write timeout set: clear
/// it with [`Stream::set_write_timeout`] before handing the stream to blocking writers.
pub fn write_all_by(stream: &mut Stream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not take the data in time",
            ));
        }
        // A zero timeout means "forever" to the kernel: never pass one.
        stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        match stream.write(buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if retry_later(&e) => {}
            Err(e) => return Err(e),
        }
    }
    flush_by(stream, deadline)
}

/// A write that may go on once the socket has room (interrupted, or its timeout passed
/// before the deadline did).
fn retry_later(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes out what `stream` holds (TLS records whose write timed out), by `deadline`.
/// Nothing held (always so for plain sockets) is never a timeout, however late it is.
fn flush_by(stream: &mut Stream, deadline: Instant) -> io::Result<()> {
    loop {
        match stream.flush() {
            Ok(()) => return Ok(()),
            Err(e) if retry_later(&e) => {}
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not take the data in time",
            ));
        }
        stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    }
}

/// Most sockets lingering at once; beyond it a closing socket is shut down at once (a peer
/// that opens and abandons connections in a loop cannot pile up threads).
pub const MAX_LINGERING: usize = 32;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Closes `stream` so that what was written still reaches the peer: shuts down the sending
/// side (FIN after the data), then reads and drops whatever the peer still sends until it
/// closes too or `linger` passes, and finally shuts the socket down both ways (which also
/// ends any other thread still reading a clone of it). Closing a socket with unread data
/// would instead reset the connection and discard data not yet sent. Runs on its own
/// thread.
pub fn close_gracefully(stream: Stream, linger: Duration) {
    stream.shutdown_write();
    if LINGERING.fetch_add(1, Ordering::SeqCst) >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::SeqCst);
        stream.shutdown();
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("mig-linger".into())
        .spawn(move || {
            drain(&stream, linger);
            stream.shutdown();
            LINGERING.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        LINGERING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads and drops until the peer closes, an error, or `linger` passes.
fn drain(stream: &Stream, linger: Duration) {
    let deadline = Instant::now() + linger;
    // Under TLS, the socket itself: what still arrives is dropped unread, and a reader
    // stuck on the TLS stream (holding its lock) cannot hold this up.
    let Ok(mut s) = stream.plain().try_clone() else {
        return;
    };
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Waits until one of `fds` is readable (or closed), or `timeout` passes. Returns which are.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut polls, Some(&ts)) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(vec![false; fds.len()]),
        Err(e) => return Err(e.into()),
    }
    Ok(polls.iter().map(|p| !p.revents().is_empty()).collect())
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, Uri),
    /// Unix; the socket file is removed on drop.
    Unix(UnixListener, PathBuf, Uri),
}

impl Listener {
    /// Binds `uri` (a stale unix socket file is replaced).
    pub fn bind(uri: &Uri) -> Result<Listener, TransportError> {
        let err = |source| TransportError::Io {
            what: "listening on",
            uri: uri.to_string(),
            source,
        };
        match uri {
            Uri::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).map_err(err)?,
                uri.clone(),
            )),
            Uri::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .map(|m| {
                        use std::os::unix::fs::FileTypeExt;
                        m.file_type().is_socket()
                    })
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(err)?;
                Ok(Listener::Unix(l, path.clone(), uri.clone()))
            }
        }
    }

    /// The URI actually bound (with the real port when 0 was asked for).
    pub fn local_uri(&self) -> Uri {
        match self {
            Listener::Tcp(l, uri) => l
                .local_addr()
                .map(|a| Uri::Tcp(a.to_string()))
                .unwrap_or_else(|_| uri.clone()),
            Listener::Unix(_, _, uri) => uri.clone(),
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        let err = |source| TransportError::Io {
            what: "accepting on",
            uri: self.local_uri().to_string(),
            source,
        };
        match self {
            Listener::Tcp(l, _) => l.accept().map(|(s, _)| Stream::Tcp(s)).map_err(err),
            Listener::Unix(l, _, _) => l
                .accept()
                .map(|(s, _)| Stream::Unix(s, FdInbox::default()))
                .map_err(err),
        }
    }

    /// Makes `accept` return `WouldBlock` instead of waiting (for timed accept loops).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.set_nonblocking(on),
            Listener::Unix(l, _, _) => l.set_nonblocking(on),
        }
    }

    /// Waits up to `timeout` for a connection; `None` when none came. The stream returned
    /// is blocking.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Stream>, TransportError> {
        let ready =
            wait_readable(&[self.as_fd()], timeout).map_err(|source| TransportError::Io {
                what: "waiting for connections on",
                uri: self.local_uri().to_string(),
                source,
            })?;
        if !ready.first().copied().unwrap_or(false) {
            return Ok(None);
        }
        self.set_nonblocking(true)
            .map_err(|source| TransportError::Io {
                what: "configuring",
                uri: self.local_uri().to_string(),
                source,
            })?;
        match self.accept() {
            Ok(s) => {
                set_blocking(&s).map_err(|source| TransportError::Io {
                    what: "configuring a connection on",
                    uri: self.local_uri().to_string(),
                    source,
                })?;
                Ok(Some(s))
            }
            Err(TransportError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l, _) => l.as_fd(),
            Listener::Unix(l, _, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, _) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Makes an accepted stream blocking again (accepted sockets inherit non-blocking mode).
pub fn set_blocking(s: &Stream) -> io::Result<()> {
    s.set_nonblocking(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_travel_with_their_bytes_on_unix_sockets() {
        use std::io::Seek;
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (
            Stream::Unix(a, FdInbox::default()),
            Stream::Unix(b, FdInbox::default()),
        );
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"shared").unwrap();
        a.write_all(b"before").unwrap();
        a.send_with_fds(b"with-fd", &[f.as_fd()]).unwrap();
        let mut buf = [0u8; 6];
        b.read_exact(&mut buf).unwrap();
        // Bytes written before carry no descriptor.
        assert!(b.take_fds().is_empty());
        let mut buf = [0u8; 7];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"with-fd");
        let fds = b.take_fds();
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared");
        // TCP cannot carry them.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = Stream::Tcp(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let e = t.send_with_fds(b"x", &[f.as_fd()]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn parses_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:80".parse::<Uri>().unwrap(),
            Uri::Tcp("[::1]:80".into())
        );
        assert_eq!(
            "unix:/tmp/x".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/x".into())
        );
        for bad in [
            "tcp:1.2.3.4",
            "tcp::80",
            "tcp:h:99999",
            "udp:h:1",
            "unix:",
            "/tmp/x",
        ] {
            let e = bad.parse::<Uri>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn connects_over_both() {
        let dir = std::env::temp_dir().join(format!("ferry-transport-{}", std::process::id()));
        for uri in [Uri::Tcp("127.0.0.1:0".into()), Uri::Unix(dir.clone())] {
            let l = Listener::bind(&uri).unwrap();
            let target = l.local_uri();
            let t = std::thread::spawn(move || {
                let mut s = connect(&target, Instant::now() + Duration::from_secs(5)).unwrap();
                s.write_all(b"hi").unwrap();
            });
            let mut s = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"hi");
            t.join().unwrap();
        }
        assert!(!dir.exists(), "unix socket removed on drop");
    }

    #[test]
    fn accept_times_out_without_a_peer() {
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let t = Instant::now();
        assert!(l
            .accept_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(45));
    }

    #[test]
    fn a_write_to_a_peer_that_never_reads_gives_up_at_the_deadline() {
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let mut s = connect(&l.local_uri(), Instant::now() + Duration::from_secs(5)).unwrap();
        let _peer = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        let big = vec![0u8; 64 << 20];
        let t = Instant::now();
        let e =
            write_all_by(&mut s, &big, Instant::now() + Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn graceful_close_delivers_what_was_written() {
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let mut s = connect(&l.local_uri(), Instant::now() + Duration::from_secs(5)).unwrap();
        let mut peer = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        // Unread data on the closing side would turn a plain close into a reset.
        peer.write_all(b"unread").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(b"bye").unwrap();
        close_gracefully(s, Duration::from_secs(2));
        let mut got = Vec::new();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
    }
}
