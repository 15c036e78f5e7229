//! Mutual TLS 1.3 on migration channels (rustls, ring provider).
//!
//! Both sides load the same directory layout: `ca.pem` (the CA whose certificates this side
//! trusts), `cert.pem` (this side's certificate chain) and `key.pem` (its key). The
//! destination demands a client certificate signed by its CA; the source checks the
//! destination's certificate against its CA and the expected name.
//!
//! A [`TlsStream`] is shared by a reading thread and a writing thread (its clones share one
//! connection), so socket I/O never happens under the connection's lock: ciphertext is read
//! into a buffer before it is handed to rustls, and written from a buffer after. A blocked
//! write therefore never keeps the reader from decrypting, nor the other way round.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, StreamOwned};

use crate::{Stream, Uri};

/// Errors of TLS configuration and handshakes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the TLS directory could not be read or parsed.
    #[error("TLS file {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The certificates or key were refused by rustls.
    #[error("TLS configuration from {dir}: {source}")]
    Config {
        /// The TLS directory.
        dir: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The name to check the peer's certificate against is not valid.
    #[error("'{0}' is not a valid TLS host name or IP address (--tls-hostname)")]
    BadName(String),
    /// The handshake failed: the peer's certificate was refused, the peer refused ours, or
    /// it does not speak TLS.
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// Who.
        peer: String,
        /// Why, as rustls says it.
        source: rustls::Error,
    },
    /// The socket failed or the deadline passed during the handshake.
    #[error("TLS handshake with {peer}: {source}")]
    Io {
        /// Who.
        peer: String,
        /// The error.
        source: io::Error,
    },
}

/// Certificates, key and trust of one side, loaded from a TLS directory.
#[derive(Clone)]
pub struct TlsConfig {
    dir: PathBuf,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    hostname: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("dir", &self.dir)
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// ring's provider with AES-128-GCM first: it is the cheapest AEAD per byte on AES-NI.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

impl TlsConfig {
    /// Loads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem`. `hostname` is the name the
    /// destination's certificate must carry (default: the host of the URI).
    pub fn load(dir: &Path, hostname: Option<String>) -> Result<TlsConfig, TlsError> {
        let ca_path = dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca_path)? {
            roots.add(c).map_err(|e| file_err(&ca_path, e))?;
        }
        let roots = Arc::new(roots);
        let certs = load_certs(&dir.join("cert.pem"))?;
        let key = load_key(&dir.join("key.pem"))?;
        let cfg_err = |source| TlsError::Config {
            dir: dir.to_path_buf(),
            source,
        };
        let p = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .map_err(|e| file_err(&ca_path, e))?;
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(cfg_err)?;
        // Nothing resumes a migration session: no tickets to send or to wait for.
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(cfg_err)?;
        if let Some(h) = &hostname {
            ServerName::try_from(h.as_str()).map_err(|_| TlsError::BadName(h.clone()))?;
        }
        Ok(TlsConfig {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
            hostname,
        })
    }

    /// The name the destination at `uri` must prove: `--tls-hostname`, else the URI's host
    /// (`localhost` for a unix socket).
    pub fn server_name(&self, uri: &Uri) -> Result<ServerName<'static>, TlsError> {
        let name = match (&self.hostname, uri) {
            (Some(h), _) => h.clone(),
            (None, Uri::Tcp(addr)) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }
            (None, Uri::Unix(_)) => "localhost".to_string(),
        };
        ServerName::try_from(name.clone()).map_err(|_| TlsError::BadName(name))
    }

    /// The directory the configuration came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Client side: runs the handshake on `sock` (blocking), giving up at `deadline`.
pub fn connect(
    sock: Stream,
    cfg: &TlsConfig,
    uri: &Uri,
    deadline: Instant,
) -> Result<Stream, TlsError> {
    let peer = sock.peer();
    let name = cfg.server_name(uri)?;
    let conn =
        ClientConnection::new(cfg.client.clone(), name).map_err(|source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        })?;
    let mut tls = StreamOwned::new(conn, sock);
    let io_err = |source| TlsError::Io {
        peer: peer.clone(),
        source,
    };
    while tls.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS handshake before the deadline",
            );
            return Err(io_err(e));
        }
        let t = Some(left.max(Duration::from_millis(1)));
        tls.sock.set_read_timeout(t).map_err(io_err)?;
        tls.sock.set_write_timeout(t).map_err(io_err)?;
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return Err(handshake_error(&peer, e));
        }
    }
    tls.sock.set_read_timeout(None).map_err(io_err)?;
    tls.sock.set_write_timeout(None).map_err(io_err)?;
    Ok(Stream::Tls(Box::new(TlsStream::new(
        tls.sock,
        Connection::Client(tls.conn),
    ))))
}

/// A rustls error carried in an `io::Error` becomes a handshake error, so the reason (an
/// unknown issuer, a missing certificate, an alert from the peer) reaches the operator.
fn handshake_error(peer: &str, e: io::Error) -> TlsError {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(source) => TlsError::Handshake {
            peer: peer.to_string(),
            source,
        },
        None => TlsError::Io {
            peer: peer.to_string(),
            source: e,
        },
    }
}

/// Server side of a handshake on a non-blocking socket, advanced as bytes arrive (the
/// destination's acceptor drives many at once).
pub struct ServerHandshake {
    conn: ServerConnection,
    sock: Stream,
}

impl ServerHandshake {
    /// Starts the server side on `sock` (which should be non-blocking).
    pub fn new(cfg: &TlsConfig, sock: Stream) -> Result<ServerHandshake, TlsError> {
        let conn =
            ServerConnection::new(cfg.server.clone()).map_err(|source| TlsError::Handshake {
                peer: sock.peer(),
                source,
            })?;
        Ok(ServerHandshake { conn, sock })
    }

    /// The socket (to poll it).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Takes what the socket has and answers; `Ok(true)` once the client is authenticated.
    /// On a failure the alert that says why is sent to the client first (best effort).
    pub fn advance(&mut self) -> Result<bool, TlsError> {
        let peer = self.sock.peer();
        loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed in the handshake");
                    return Err(TlsError::Io { peer, source: e });
                }
                Ok(_) => {
                    if let Err(source) = self.conn.process_new_packets() {
                        let _ = self.conn.write_tls(&mut self.sock);
                        return Err(TlsError::Handshake { peer, source });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TlsError::Io { peer, source }),
            }
            if !self.conn.is_handshaking() {
                break;
            }
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                // The handshake's flights are small; the rest goes at the next wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(source) => return Err(TlsError::Io { peer, source }),
            }
        }
        Ok(!self.conn.is_handshaking())
    }

    /// Gives up the handshake: the plain socket (to answer a peer that does not speak TLS).
    pub fn into_socket(self) -> Stream {
        self.sock
    }

    /// The finished connection as a stream.
    pub fn finish(self) -> Stream {
        Stream::Tls(Box::new(TlsStream::new(
            self.sock,
            Connection::Server(self.conn),
        )))
    }
}

/// Largest plaintext encrypted per write call (many full 16 KiB records).
const WRITE_CHUNK: usize = 256 << 10;
/// Ciphertext read from the socket per system call.
const READ_CHUNK: usize = 64 << 10;

/// Ciphertext read from the socket and not yet taken by rustls.
#[derive(Default)]
struct ReadSide {
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

/// Ciphertext produced and not yet written to the socket.
#[derive(Default)]
struct WriteSide {
    out: Vec<u8>,
    sent: usize,
}

struct Shared {
    /// Set once rustls reported an error (and queued a fatal alert): nothing more may be
    /// sent on the connection, not even `close_notify`.
    failed: std::sync::atomic::AtomicBool,
    conn: Mutex<Connection>,
    read: Mutex<ReadSide>,
    write: Mutex<WriteSide>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One TLS connection over a socket; clones share the connection (one may read while
/// another writes). Lock order: read side, then write side, then the connection; the
/// connection's lock is never held across socket I/O.
pub struct TlsStream {
    sock: Stream,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

impl TlsStream {
    fn new(sock: Stream, mut conn: Connection) -> TlsStream {
        conn.set_buffer_limit(Some(2 * WRITE_CHUNK));
        TlsStream {
            sock,
            shared: Arc::new(Shared {
                failed: std::sync::atomic::AtomicBool::new(false),
                conn: Mutex::new(conn),
                read: Mutex::new(ReadSide::default()),
                write: Mutex::new(WriteSide::default()),
            }),
        }
    }

    /// The socket under the TLS layer.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    pub(crate) fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            sock: self.sock.try_clone()?,
            shared: self.shared.clone(),
        })
    }

    /// Whether plaintext (or unprocessed ciphertext) waits in memory, so a reader must not
    /// wait for the socket to become readable first.
    pub fn has_buffered_input(&self) -> bool {
        let rs = lock(&self.shared.read);
        if rs.end > rs.start {
            return true;
        }
        drop(rs);
        let mut c = lock(&self.shared.conn);
        self.process(&mut c)
            .map(|s| s.plaintext_bytes_to_read() > 0)
            .unwrap_or(true)
    }

    /// Writes out pending ciphertext; a write timeout leaves the rest pending.
    fn drain(&self, ws: &mut WriteSide) -> io::Result<()> {
        while let Some(rest) = ws.out.get(ws.sent..).filter(|r| !r.is_empty()) {
            match self.sock.write_ref(rest) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
                Ok(n) => ws.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        ws.out.clear();
        ws.sent = 0;
        Ok(())
    }

    /// Moves whatever rustls has to send (records, alerts) into the pending output.
    fn collect_output(&self, ws: &mut WriteSide) -> io::Result<()> {
        let mut c = lock(&self.shared.conn);
        while c.wants_write() {
            c.write_tls(&mut ws.out)?;
        }
        Ok(())
    }

    /// Decrypts what rustls holds; an error marks the connection failed.
    fn process(&self, c: &mut Connection) -> io::Result<rustls::IoState> {
        c.process_new_packets().map_err(|e| {
            self.shared
                .failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tls_io(e)
        })
    }

    /// Sends a `close_notify` and what is pending (best effort; nothing after a failure,
    /// whose fatal alert already ended the connection).
    pub(crate) fn close_notify(&self) {
        if self.shared.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut ws = lock(&self.shared.write);
        lock(&self.shared.conn).send_close_notify();
        if self.collect_output(&mut ws).is_ok() {
            let _ = self.drain(&mut ws);
        }
    }

    /// Plaintext already decrypted, if any: `Ok(None)` when there is none yet.
    fn take_plaintext(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut c = lock(&self.shared.conn);
        // Records may wait undecrypted (they came with the handshake's last flight).
        self.process(&mut c)?;
        match c.reader().read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A peer that vanished without close_notify: the same clean EOF as a plain
            // socket. Ferry's framing catches a stream cut inside a frame.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }

    /// Hands buffered ciphertext to rustls until it is all taken or rustls' plaintext
    /// buffer is full; returns whether rustls has something to send (an alert).
    fn feed(&self, rs: &mut ReadSide) -> io::Result<bool> {
        let mut c = lock(&self.shared.conn);
        while rs.end > rs.start {
            let mut slice = rs.raw.get(rs.start..rs.end).unwrap_or_default();
            let n = match c.read_tls(&mut slice) {
                Ok(n) => n,
                // Plaintext buffer full: the caller reads some out first.
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(e) => return Err(e),
            };
            rs.start += n;
            self.process(&mut c)?;
            if n == 0 {
                break;
            }
        }
        Ok(c.wants_write())
    }

    fn fill(&self, rs: &mut ReadSide) -> io::Result<usize> {
        if rs.raw.len() < READ_CHUNK {
            rs.raw.resize(READ_CHUNK, 0);
        }
        rs.start = 0;
        rs.end = 0;
        let n = self.sock.read_ref(&mut rs.raw)?;
        rs.end = n;
        Ok(n)
    }
}

impl TlsStream {
    /// Reads plaintext (`Read::read`, through a shared reference).
    pub(crate) fn read_ref(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rs = lock(&self.shared.read);
        loop {
            if let Some(n) = self.take_plaintext(buf)? {
                return Ok(n);
            }
            if rs.end == rs.start && self.fill(&mut rs)? == 0 {
                // The socket ended: tell rustls, which then reports close_notify or not.
                let mut c = lock(&self.shared.conn);
                let _ = c.read_tls(&mut io::empty());
                self.process(&mut c)?;
                drop(c);
                return Ok(self.take_plaintext(buf)?.unwrap_or(0));
            }
            if self.feed(&mut rs)? {
                let mut ws = lock(&self.shared.write);
                self.collect_output(&mut ws)?;
                self.drain(&mut ws)?;
            }
        }
    }
}

impl TlsStream {
    /// Encrypts up to [`WRITE_CHUNK`] bytes of `buf` and writes them out. Pending output of
    /// an earlier call that timed out goes first; if that times out again nothing of `buf`
    /// is taken. Once `buf` is taken, a timeout leaves its records pending for the next
    /// call or [`Write::flush`].
    pub(crate) fn write_ref(&self, buf: &[u8]) -> io::Result<usize> {
        let mut ws = lock(&self.shared.write);
        self.drain(&mut ws)?;
        let take = buf.get(..buf.len().min(WRITE_CHUNK)).unwrap_or_default();
        let n = lock(&self.shared.conn).writer().write(take)?;
        self.collect_output(&mut ws)?;
        match self.drain(&mut ws) {
            Ok(()) => Ok(n),
            Err(e)
                if n > 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                Ok(n)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes out everything pending.
    pub(crate) fn flush_ref(&self) -> io::Result<()> {
        let mut ws = lock(&self.shared.write);
        self.drain(&mut ws)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Listener, Uri};
    use std::io::Read;

    /// Certificates from scripts/make-test-certs.sh (openssl is required, as in CI).
    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs.sh");
        let st = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .status()
            .expect("bash runs scripts/make-test-certs.sh");
        assert!(
            st.success(),
            "make-test-certs.sh failed (is openssl installed?)"
        );
        dir
    }

    /// A TLS pair over loopback TCP: (client, server), or the server's error.
    fn pair(
        client_dir: &Path,
        server_dir: &Path,
        hostname: Option<&str>,
    ) -> (Result<Stream, TlsError>, Result<Stream, TlsError>) {
        let server_cfg = TlsConfig::load(server_dir, None).unwrap();
        let client_cfg = TlsConfig::load(client_dir, hostname.map(String::from)).unwrap();
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let uri = l.local_uri();
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = std::thread::spawn(move || {
            let sock = crate::connect(&uri, deadline).unwrap();
            let r = connect(sock, &client_cfg, &uri, deadline);
            // TLS 1.3 clients learn of a refused certificate at their first read.
            if let Ok(mut s) = r {
                let mut b = [0u8; 1];
                return match s.read(&mut b) {
                    Ok(1) => Ok(s),
                    Ok(_) => Err(TlsError::Io {
                        peer: "server".into(),
                        source: io::Error::new(io::ErrorKind::UnexpectedEof, "closed"),
                    }),
                    Err(e) => Err(handshake_error("server", e)),
                };
            }
            r
        });
        let sock = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut hs = ServerHandshake::new(&server_cfg, sock).unwrap();
        let server = loop {
            match hs.advance() {
                Ok(true) => {
                    let mut s = hs.finish();
                    s.set_nonblocking(false).unwrap();
                    s.write_all(b"!").unwrap();
                    break Ok(s);
                }
                Ok(false) => {
                    assert!(Instant::now() < deadline, "server handshake hangs");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => break Err(e),
            }
        };
        (client.join().unwrap(), server)
    }

    #[test]
    fn mutual_tls_carries_pages_both_ways_at_once() {
        let d = certs();
        let (c, s) = pair(
            &d.path().join("source"),
            &d.path().join("destination"),
            None,
        );
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert!(c.is_tls() && s.is_tls());
        // One clone writes 32 MiB while another reads the peer's 32 MiB.
        let n = 32usize << 20;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let (d1, d2) = (data.clone(), data.clone());
        let mut c_read = c.try_clone().unwrap();
        let w = std::thread::spawn(move || {
            let mut d1 = d1;
            let mem = vm_memory::VolatileSlice::from(&mut d1[..]);
            let mut scratch = Vec::new();
            for chunk in 0..(n / (1 << 20)) {
                let sub = mem.subslice(chunk << 20, 1 << 20).unwrap();
                c.write_pages(b"hdr", &[sub], &mut scratch).unwrap();
            }
        });
        let r = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            c_read.read_exact(&mut got).unwrap();
            got
        });
        let mut s2 = s.try_clone().unwrap();
        let sw = std::thread::spawn(move || s2.write_all(&d2).unwrap());
        let mut got = vec![0u8; n];
        let mut scratch = Vec::new();
        for chunk in 0..(n / (1 << 20)) {
            let mut hdr = [0u8; 3];
            s.read_exact(&mut hdr).unwrap();
            assert_eq!(&hdr, b"hdr");
            let mem = vm_memory::VolatileSlice::from(&mut got[chunk << 20..(chunk + 1) << 20]);
            s.read_pages(&[mem], &mut scratch).unwrap();
        }
        w.join().unwrap();
        sw.join().unwrap();
        assert!(got == data, "pages arrived intact");
        assert!(r.join().unwrap() == data, "the other direction too");
    }

    #[test]
    fn a_client_of_another_ca_is_refused_by_name() {
        let d = certs();
        let (c, s) = pair(
            &d.path().join("other-ca"),
            &d.path().join("destination"),
            None,
        );
        let e = s.unwrap_err().to_string();
        assert!(e.contains("UnknownIssuer") || e.contains("issuer"), "{e}");
        assert!(c.is_err(), "the client learns it too");
    }

    #[test]
    fn a_server_of_the_wrong_name_is_refused_by_the_client() {
        let d = certs();
        let (c, _s) = pair(
            &d.path().join("source"),
            &d.path().join("destination"),
            Some("elsewhere.example"),
        );
        let e = c.unwrap_err().to_string();
        assert!(e.contains("NotValidForName") || e.contains("name"), "{e}");
    }

    #[test]
    fn plaintext_is_not_a_handshake() {
        let d = certs();
        let cfg = TlsConfig::load(&d.path().join("destination"), None).unwrap();
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let mut c =
            crate::connect(&l.local_uri(), Instant::now() + Duration::from_secs(5)).unwrap();
        c.write_all(b"FERRYMIG plaintext hello, not a ClientHello....")
            .unwrap();
        let sock = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut hs = ServerHandshake::new(&cfg, sock).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = loop {
            match hs.advance() {
                Err(e) => break e,
                Ok(done) => assert!(!done && Instant::now() < deadline),
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
    }

    #[test]
    fn missing_and_bad_files_are_named() {
        let d = certs();
        let e = TlsConfig::load(&d.path().join("nowhere"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "cert.pem"] {
            std::fs::copy(d.path().join("source").join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        let e = TlsConfig::load(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("key.pem"), "{e}");
        let e = TlsConfig::load(&d.path().join("source"), Some("bad name!".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad name!"), "{e}");
    }
}
