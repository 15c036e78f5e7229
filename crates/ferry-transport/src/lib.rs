//! Migration transports: `tcp:HOST:PORT` and `unix:PATH` URIs, a listener that accepts the
//! channels of a migration, and a stream type over both socket kinds.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle to the same socket (e.g. one for reading, one for writing).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts down both directions, which also unblocks any thread blocked on the socket.
    pub fn shutdown(&self) {
        // Already-closed sockets are fine.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sends small control messages without Nagle delay (no-op for unix sockets).
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Connects to `uri`.
pub fn connect(uri: &Uri) -> Result<Stream, TransportError> {
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
                match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                    Ok(s) => return Ok(Stream::Tcp(s)),
                    Err(e) => last = e,
                }
            }
            Err(err(last))
        }
        Uri::Unix(path) => UnixStream::connect(path).map(Stream::Unix).map_err(err),
    }
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
            Listener::Unix(l, _, _) => l.accept().map(|(s, _)| Stream::Unix(s)).map_err(err),
        }
    }

    /// Makes `accept` return `WouldBlock` instead of waiting (for timed accept loops).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.set_nonblocking(on),
            Listener::Unix(l, _, _) => l.set_nonblocking(on),
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
    match s {
        Stream::Tcp(t) => t.set_nonblocking(false),
        Stream::Unix(u) => u.set_nonblocking(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                let mut s = connect(&target).unwrap();
                s.write_all(b"hi").unwrap();
            });
            let mut s = l.accept().unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"hi");
            t.join().unwrap();
        }
        assert!(!dir.exists(), "unix socket removed on drop");
    }
}
