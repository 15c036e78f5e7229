//! Mutual TLS 1.3 on migration channels (rustls, ring provider).
//!
//! Both sides load the same directory layout: `ca.pem` (the CA whose certificates this side
//! trusts), `cert.pem` (this side's certificate chain) and `key.pem` (its key). The
//! destination demands a client certificate signed by its CA; the source checks the
//! destination's certificate against its CA and the expected name.
//!
//! rustls does the handshake; then its traffic keys go to Ferry's record layer
//! ([`crate::record`], as they would go to kernel TLS), so a [`TlsStream`]'s two directions
//! are independent: one thread reads while another writes, neither waits for the other,
//! and page data is sealed straight from guest memory and opened in the buffer it was read
//! into.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::{record, Stream, Uri};

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
        // The record layer (`record`) takes the keys over after the handshake.
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(cfg_err)?;
        client.enable_secret_extraction = true;
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
    let hs_err = |source| TlsError::Handshake {
        peer: peer.clone(),
        source,
    };
    let mut conn = ClientConnection::new(cfg.client.clone(), name).map_err(hs_err)?;
    let io_err = |source: io::Error| TlsError::Io {
        peer: peer.clone(),
        source: explain_close(source),
    };
    let mut reader = OneRecord::new(&sock);
    loop {
        while conn.wants_write() {
            set_timeouts(&sock, deadline).map_err(io_err)?;
            conn.write_tls(&mut &sock).map_err(io_err)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        set_timeouts(&sock, deadline).map_err(io_err)?;
        match conn.read_tls(&mut reader) {
            Ok(0) => return Err(io_err(closed_in_handshake())),
            Ok(_) => {
                if let Err(source) = conn.process_new_packets() {
                    let _ = conn.write_tls(&mut &sock);
                    return Err(hs_err(source));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    sock.set_read_timeout(None).map_err(io_err)?;
    sock.set_write_timeout(None).map_err(io_err)?;
    let secrets = conn.dangerous_extract_secrets().map_err(hs_err)?;
    TlsStream::wrap(sock, secrets).map_err(|(e, _)| io_err(e))
}

/// A connection closed or reset in the handshake, most likely by a peer without TLS.
fn explain_close(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => io::Error::new(
            e.kind(),
            format!(
                "{e}: the peer closed the connection in the TLS handshake (does it expect TLS?)"
            ),
        ),
        _ => e,
    }
}

fn closed_in_handshake() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection in the TLS handshake (does it expect TLS?)",
    )
}

/// Socket timeouts for what is left until `deadline` (never 0, which means "forever").
fn set_timeouts(sock: &Stream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no TLS handshake before the deadline",
        ));
    }
    let t = Some(left.max(Duration::from_millis(1)));
    sock.set_read_timeout(t)?;
    sock.set_write_timeout(t)
}

/// Reads a socket without ever going past the end of the TLS record it is in, so that
/// rustls, fed from it, holds nothing beyond the handshake's last record when the keys
/// are taken over.
struct OneRecord<'a> {
    sock: &'a Stream,
    header: [u8; record::HEADER_LEN],
    have: usize,
    left: usize,
}

impl<'a> OneRecord<'a> {
    fn new(sock: &'a Stream) -> OneRecord<'a> {
        OneRecord {
            sock,
            header: [0; record::HEADER_LEN],
            have: 0,
            left: 0,
        }
    }
}

impl Read for OneRecord<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.have < record::HEADER_LEN {
            let want = (record::HEADER_LEN - self.have).min(buf.len());
            let n = self.sock.read_ref(&mut buf[..want])?;
            self.header[self.have..self.have + n].copy_from_slice(&buf[..n]);
            self.have += n;
            if self.have == record::HEADER_LEN {
                let [_, _, _, hi, lo] = self.header;
                self.left = usize::from(u16::from_be_bytes([hi, lo]));
                if self.left == 0 {
                    self.have = 0;
                }
            }
            return Ok(n);
        }
        let want = self.left.min(buf.len());
        let n = self.sock.read_ref(&mut buf[..want])?;
        self.left -= n;
        if self.left == 0 {
            self.have = 0;
        }
        Ok(n)
    }
}

/// Server side of a handshake on a non-blocking socket, advanced as bytes arrive (the
/// destination's acceptor drives many at once).
pub struct ServerHandshake {
    conn: ServerConnection,
    sock: Stream,
    header: [u8; record::HEADER_LEN],
    have: usize,
    left: usize,
    started: bool,
}

impl ServerHandshake {
    /// Starts the server side on `sock` (which should be non-blocking).
    pub fn new(cfg: &TlsConfig, sock: Stream) -> Result<ServerHandshake, TlsError> {
        let conn =
            ServerConnection::new(cfg.server.clone()).map_err(|source| TlsError::Handshake {
                peer: sock.peer(),
                source,
            })?;
        Ok(ServerHandshake {
            conn,
            sock,
            header: [0; record::HEADER_LEN],
            have: 0,
            left: 0,
            started: false,
        })
    }

    /// The socket (to poll it).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Whether any byte of the client's has been read yet.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Takes what the socket has and answers; `Ok(true)` once the client is authenticated.
    /// On a failure the alert that says why is sent to the client first (best effort).
    pub fn advance(&mut self) -> Result<bool, TlsError> {
        let peer = self.sock.peer();
        while self.conn.is_handshaking() {
            let mut r = OneRecord {
                sock: &self.sock,
                header: self.header,
                have: self.have,
                left: self.left,
            };
            let got = self.conn.read_tls(&mut r);
            (self.header, self.have, self.left) = (r.header, r.have, r.left);
            self.started |= matches!(got, Ok(n) if n > 0);
            match got {
                Ok(0) => {
                    let source = closed_in_handshake();
                    return Err(TlsError::Io { peer, source });
                }
                Ok(_) => {
                    if let Err(source) = self.conn.process_new_packets() {
                        let _ = self.conn.write_tls(&mut &self.sock);
                        return Err(TlsError::Handshake { peer, source });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TlsError::Io { peer, source }),
            }
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut &self.sock) {
                Ok(_) => {}
                // The handshake's flights are small; the rest goes at the next wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(source) => return Err(TlsError::Io { peer, source }),
            }
        }
        Ok(!self.conn.is_handshaking())
    }

    /// Gives up the handshake: the plain socket (to answer a peer that does not speak TLS).
    pub fn into_socket(self) -> Stream {
        self.sock
    }

    /// The finished connection as a stream (the record layer takes over its keys); on an
    /// error, the error and the plain socket (to close it).
    pub fn finish(self) -> Result<Stream, (TlsError, Stream)> {
        let peer = self.sock.peer();
        let secrets = match self.conn.dangerous_extract_secrets() {
            Ok(s) => s,
            Err(source) => return Err((TlsError::Handshake { peer, source }, self.sock)),
        };
        TlsStream::wrap(self.sock, secrets)
            .map_err(|(source, sock)| (TlsError::Io { peer, source }, sock))
    }
}

/// Plaintext bytes per record the sender fills (full records keep the per-byte cost low).
const RECORD_PLAINTEXT: usize = record::MAX_PLAINTEXT;
/// Records sealed into one buffer before it is written out.
const RECORDS_PER_WRITE: usize = 16;
/// Ciphertext read from the socket per system call.
const READ_CHUNK: usize = 256 << 10;

/// The sending direction: its keys and the records not yet written, `out[sent..filled]`
/// (`out` keeps its size between writes, so it is never zeroed again).
struct TxSide {
    sealer: record::Sealer,
    out: Vec<u8>,
    filled: usize,
    sent: usize,
}

/// The receiving direction: its keys and what was read. `buf[plain]` is decrypted data
/// not yet taken; `buf[start..end]` is ciphertext not yet opened.
struct RxSide {
    opener: record::Opener,
    buf: Vec<u8>,
    plain: std::ops::Range<usize>,
    start: usize,
    end: usize,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One TLS connection over a socket, after the handshake: each direction has its own keys
/// and lock, so one thread can read while another writes. Clones share both directions.
pub struct TlsStream {
    sock: Stream,
    tx: Arc<Mutex<TxSide>>,
    rx: Arc<Mutex<RxSide>>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

impl TlsStream {
    /// The stream over `sock` with the handshake's keys; on an error, `sock` back.
    fn wrap(
        sock: Stream,
        secrets: rustls::ExtractedSecrets,
    ) -> Result<Stream, (io::Error, Stream)> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let keys =
            record::Sealer::new(tx_seq, tx).and_then(|s| Ok((s, record::Opener::new(rx_seq, rx)?)));
        let (sealer, opener) = match keys {
            Ok(k) => k,
            Err(e) => return Err((e, sock)),
        };
        Ok(Stream::Tls(Box::new(TlsStream {
            sock,
            tx: Arc::new(Mutex::new(TxSide {
                sealer,
                out: Vec::new(),
                filled: 0,
                sent: 0,
            })),
            rx: Arc::new(Mutex::new(RxSide {
                opener,
                buf: Vec::new(),
                plain: 0..0,
                start: 0,
                end: 0,
                closed: false,
            })),
        })))
    }

    /// The socket under the TLS layer.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    pub(crate) fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            sock: self.sock.try_clone()?,
            tx: self.tx.clone(),
            rx: self.rx.clone(),
        })
    }

    /// Whether decrypted data, or a whole record, waits in memory (so a reader must not
    /// wait for the socket to become readable first).
    pub fn has_buffered_input(&self) -> bool {
        let rx = lock(&self.rx);
        !rx.plain.is_empty() || whole_record(&rx).is_some()
    }

    /// Writes out pending records; a write timeout leaves the rest pending.
    fn drain(&self, tx: &mut TxSide) -> io::Result<()> {
        while let Some(rest) = tx.out.get(tx.sent..tx.filled).filter(|r| !r.is_empty()) {
            match self.sock.write_ref(rest) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
                Ok(n) => tx.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        tx.filled = 0;
        tx.sent = 0;
        Ok(())
    }

    /// Seals one record of `len` bytes (filled by `fill`) after what is pending.
    fn seal(
        tx: &mut TxSide,
        content: u8,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        let need = tx.filled + record::record_len(len);
        if tx.out.len() < need {
            tx.out.resize(need, 0);
        }
        let dst = &mut tx.out[tx.filled..];
        tx.filled += tx.sealer.seal_into(dst, content, len, fill)?;
        Ok(())
    }

    /// Sends a `close_notify` and what is pending (best effort).
    pub(crate) fn close_notify(&self) {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        let alert = record::CLOSE_NOTIFY;
        if Self::seal(tx, record::ALERT_TYPE, alert.len(), |b| {
            b.copy_from_slice(&alert)
        })
        .is_ok()
        {
            let _ = self.drain(tx);
        }
    }

    /// Seals `len` bytes, filled by `fill(offset, dst)` record by record, and writes them
    /// out. Pending records of an earlier call that timed out go first; if that times out
    /// again nothing is taken. Once sealed, a timeout leaves the records pending for the
    /// next call or a flush: the bytes count as written.
    fn write_with(&self, len: usize, mut fill: impl FnMut(usize, &mut [u8])) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        self.drain(tx)?;
        let take = len.min(RECORD_PLAINTEXT * RECORDS_PER_WRITE);
        let mut at = 0;
        while at < take {
            let n = (take - at).min(RECORD_PLAINTEXT);
            Self::seal(tx, record::DATA, n, |dst| fill(at, dst))?;
            at += n;
        }
        match self.drain(tx) {
            Ok(()) => Ok(take),
            Err(e)
                if take > 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                Ok(take)
            }
            Err(e) => Err(e),
        }
    }

    /// Encrypts and writes (part of) `buf` (`Write::write` through a shared reference).
    pub(crate) fn write_ref(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(buf.len(), |at, dst| {
            dst.copy_from_slice(&buf[at..at + dst.len()]);
        })
    }

    /// Encrypts and writes `header` followed by every slice of `slices` (guest memory),
    /// packed into full records across the pieces, copied straight from them.
    pub(crate) fn write_gather<B: BitmapSlice>(
        &self,
        header: &[u8],
        slices: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        let total = header.len() + slices.iter().map(|s| s.len()).sum::<usize>();
        let mut done = 0;
        while done < total {
            let n = self.write_with(total - done, |at, dst| {
                gather(header, slices, done + at, dst);
            })?;
            done += n;
        }
        Ok(())
    }

    /// Writes out everything pending.
    pub(crate) fn flush_ref(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        self.drain(&mut tx)
    }

    /// Decrypts the next record into `rx.plain`; `false` at the peer's `close_notify` or
    /// at a clean end of the socket between records.
    fn next_record(&self, rx: &mut RxSide) -> io::Result<bool> {
        loop {
            if let Some(len) = whole_record(rx) {
                let rec = rx.start..rx.start + len;
                rx.start += len;
                let opened = rx.opener.open(&mut rx.buf[rec.clone()])?;
                return match opened {
                    // An empty record (allowed, never sent by Ferry) is not the end.
                    record::Opened::Data(r) if r.is_empty() => continue,
                    record::Opened::Data(r) => {
                        rx.plain = rec.start + r.start..rec.start + r.end;
                        Ok(true)
                    }
                    record::Opened::Closed => {
                        rx.closed = true;
                        Ok(false)
                    }
                };
            }
            if !self.fill(rx)? {
                return if rx.start == rx.end {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the TLS stream ended inside a record",
                    ))
                };
            }
        }
    }

    /// Reads more ciphertext from the socket; `false` at its end.
    fn fill(&self, rx: &mut RxSide) -> io::Result<bool> {
        if rx.start > 0 {
            // Keep the unopened tail at the front.
            rx.buf.copy_within(rx.start..rx.end, 0);
            rx.end -= rx.start;
            rx.start = 0;
            rx.plain = 0..0;
        }
        if rx.buf.len() < rx.end + READ_CHUNK {
            rx.buf.resize(rx.end + READ_CHUNK, 0);
        }
        let n = self.sock.read_ref(&mut rx.buf[rx.end..])?;
        rx.end += n;
        Ok(n > 0)
    }

    /// Reads decrypted data into `buf` (`Read::read` through a shared reference); 0 at the
    /// end of the stream.
    pub(crate) fn read_ref(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(buf.len(), |src, at| {
            buf[at..at + src.len()].copy_from_slice(src)
        })
    }

    /// Fills `dst` (guest memory) with the next decrypted bytes, straight from the records.
    pub(crate) fn read_volatile<B: BitmapSlice>(
        &self,
        dst: &VolatileSlice<'_, B>,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            let n = self.read_with(dst.len() - done, |src, at| {
                if let Ok(d) = dst.subslice(done + at, src.len()) {
                    d.copy_from(src);
                }
            })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended inside page data",
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Hands up to `len` decrypted bytes to `take(bytes, offset)`, in order; returns how many.
    fn read_with(&self, len: usize, mut take: impl FnMut(&[u8], usize)) -> io::Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        if rx.plain.is_empty() && (rx.closed || !self.next_record(rx)?) {
            return Ok(0);
        }
        let mut done = 0;
        // Whatever is already decrypted or whole in memory, without waiting for the socket.
        loop {
            let n = rx.plain.len().min(len - done);
            take(&rx.buf[rx.plain.start..rx.plain.start + n], done);
            rx.plain.start += n;
            done += n;
            if done == len || whole_record(rx).is_none() || !self.next_record(rx)? {
                return Ok(done);
            }
        }
    }
}

/// Copies `dst.len()` bytes from offset `at` of `header` followed by `slices` into `dst`.
fn gather<B: BitmapSlice>(
    header: &[u8],
    slices: &[VolatileSlice<'_, B>],
    at: usize,
    dst: &mut [u8],
) {
    let mut at = at;
    let mut dst = dst;
    if let Some(h) = header.get(at..) {
        let n = h.len().min(dst.len());
        dst[..n].copy_from_slice(&h[..n]);
        dst = &mut dst[n..];
        at = 0;
    } else {
        at -= header.len();
    }
    for s in slices {
        if dst.is_empty() {
            return;
        }
        if at >= s.len() {
            at -= s.len();
            continue;
        }
        let n = (s.len() - at).min(dst.len());
        if let Ok(part) = s.subslice(at, n) {
            part.copy_to(&mut dst[..n]);
        }
        dst = &mut dst[n..];
        at = 0;
    }
}

/// The length of the whole record at `rx.start`, if all of it has been read.
fn whole_record(rx: &RxSide) -> Option<usize> {
    let header: &[u8; record::HEADER_LEN] = rx.buf.get(rx.start..rx.end)?.first_chunk()?;
    // A bad header is reported by `open` on the next read, not here.
    let body = record::Opener::body_len(header).unwrap_or(0);
    let len = record::HEADER_LEN + body;
    (rx.end - rx.start >= len).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Listener, Uri};
    use std::io::{Read, Write};

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
                    Err(source) => Err(TlsError::Io {
                        peer: "server".into(),
                        source,
                    }),
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
                    let mut s = hs.finish().map_err(|(e, _)| e).unwrap();
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
            for chunk in 0..(n / (1 << 20)) {
                let sub = mem.subslice(chunk << 20, 1 << 20).unwrap();
                c.write_pages(b"hdr", &[sub]).unwrap();
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
        for chunk in 0..(n / (1 << 20)) {
            let mut hdr = [0u8; 3];
            s.read_exact(&mut hdr).unwrap();
            assert_eq!(&hdr, b"hdr");
            let mem = vm_memory::VolatileSlice::from(&mut got[chunk << 20..(chunk + 1) << 20]);
            s.read_pages(&[mem]).unwrap();
        }
        w.join().unwrap();
        sw.join().unwrap();
        assert!(got == data, "pages arrived intact");
        assert!(r.join().unwrap() == data, "the other direction too");
    }

    #[test]
    fn gather_reads_across_the_header_and_the_slices() {
        let (mut a, mut b) = (*b"cde", *b"fg");
        let slices = [
            vm_memory::VolatileSlice::from(&mut a[..]),
            vm_memory::VolatileSlice::from(&mut b[..]),
        ];
        let whole = b"abcdefg";
        for at in 0..whole.len() {
            for len in 0..=whole.len() - at {
                let mut dst = vec![0u8; len];
                gather(b"ab", &slices, at, &mut dst);
                assert_eq!(dst, &whole[at..at + len], "at {at} len {len}");
            }
        }
    }

    /// Ferry's record layer against rustls' own: both directions and close_notify.
    #[test]
    fn the_record_layer_speaks_standard_tls() {
        let d = certs();
        let server_cfg = TlsConfig::load(&d.path().join("destination"), None).unwrap();
        let client_cfg = TlsConfig::load(&d.path().join("source"), None).unwrap();
        let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into())).unwrap();
        let uri = l.local_uri();
        let server = std::thread::spawn(move || {
            let Stream::Tcp(sock) = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap()
            else {
                unreachable!()
            };
            let conn = ServerConnection::new(server_cfg.server.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut got = vec![0u8; 100_000];
            tls.read_exact(&mut got).unwrap();
            tls.write_all(&got[..50_000]).unwrap();
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            got
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let sock = crate::connect(&uri, deadline).unwrap();
        let mut c = connect(sock, &client_cfg, &uri, deadline).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        c.write_all(&data).unwrap();
        c.flush().unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(
            server.join().unwrap(),
            data,
            "rustls read what Ferry sealed"
        );
        assert_eq!(
            back,
            data[..50_000],
            "Ferry opened what rustls sealed, then its close"
        );
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
