//! The control channel seen from an event loop: a reader thread that turns frames into
//! events, and writes that give up at a deadline.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ferry_proto::{read_message_checked, Message, ProtoError};
use ferry_transport::{wait_readable, write_all_by, Stream};

use crate::error::MigrateError;

/// How often an idle reader looks at its stop flag.
const READER_POLL: Duration = Duration::from_millis(100);

/// Encodes `msg` (with its checksum if `sum`) and writes it, giving up at `deadline`.
/// Returns the bytes written.
pub(crate) fn send_by(
    stream: &mut Stream,
    msg: &Message,
    sum: bool,
    deadline: Instant,
) -> std::io::Result<u64> {
    let mut buf = Vec::new();
    msg.encode_with(&mut buf, sum);
    write_all_by(stream, &buf, deadline)?;
    Ok(buf.len() as u64)
}

/// Reads frames from `stream` until it fails, ends, or `stop` is set, handing each to `tx`
/// as `wrap(Ok(message))`; the last event is `wrap(Err(..))` unless stopped. Waits for the
/// first byte of a frame with a bounded poll so a stop is noticed; once a frame has
/// started it is read whole (a peer that stalls mid-frame is ended by shutting the
/// socket down). Once `sums` is set, frames without a checksum are refused.
pub(crate) fn spawn_reader<E: Send + 'static>(
    mut stream: Stream,
    name: &str,
    stop: Arc<AtomicBool>,
    sums: Arc<AtomicBool>,
    tx: Sender<E>,
    wrap: impl Fn(Result<Message, ProtoError>) -> E + Send + 'static,
) -> Result<JoinHandle<()>, MigrateError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::latency::control_thread();
            let mut scratch = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Decrypted TLS data may already wait in memory, with nothing on the socket.
                if !stream.has_buffered_input() {
                    match wait_readable(&[stream.as_fd()], READER_POLL) {
                        Ok(r) if !r.first().copied().unwrap_or(false) => continue,
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(wrap(Err(ProtoError::Io(e))));
                            return;
                        }
                    }
                }
                let require = sums.load(Ordering::Relaxed);
                let r = read_message_checked(&mut stream, &mut scratch, require);
                let end = r.is_err();
                if tx.send(wrap(r)).is_err() || end {
                    return;
                }
            }
        })
        .map_err(MigrateError::io("starting a channel reader thread"))
}

/// A reader's stop flag and thread, stopped on drop.
pub(crate) struct ReaderGuard {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) join: Option<JoinHandle<()>>,
}

impl ReaderGuard {
    /// Asks the reader to stop at its next poll (it does not wait for it).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.stop();
        // Detached: it ends within one poll, or when its socket is shut down.
        drop(self.join.take());
    }
}

/// Appends page `gpa` to `runs`, extending the last run when it is contiguous.
pub(crate) fn push_run(runs: &mut Vec<ferry_proto::PageRun>, gpa: u64) {
    match runs.last_mut() {
        Some(l) if l.gpa + u64::from(l.pages) * ferry_proto::PAGE_SIZE == gpa => l.pages += 1,
        _ => runs.push(ferry_proto::PageRun { gpa, pages: 1 }),
    }
}
