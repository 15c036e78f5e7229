//! Records the workload guest's serial output: heartbeat timestamps and text lines.
//!
//! The guest (crate `ferry-guest`) prints a heartbeat byte on COM1 every `hb` ms: a `.`,
//! except that every 64th beat is a `\n`. Between beats it prints text lines such as
//! `FERRY-GUEST ok sweeps=N fails=F`; every such message starts with `\n`, ends with `\n`
//! and is printed under a lock, so heartbeats never land inside one.
//!
//! A [`Recorder`] owns one thread that reads a byte stream (a QEMU's `-serial stdio`
//! pipe, a socket, ...) and timestamps every heartbeat as it arrives. For QEMU we use one
//! pipe per process (the child's stdout): each QEMU gets its own stream, the pipe needs no
//! rendezvous (unlike a socket chardev), and it reports EOF when the process dies.
//!
//! The guest-observed downtime is the longest silence in the merged heartbeat timelines of
//! the source and the destination around the switchover: see [`longest_gap`].

use std::io::{ErrorKind, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ferry_guest::{GuestLine, HEARTBEAT, SWEEP_MARK};

/// Why waiting for a serial line failed.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The stream ended first (the process exited).
    #[error("serial {0}: stream closed before the line we waited for")]
    Closed(String),
    /// Nothing matched in time.
    #[error("serial {name}: timed out after {timeout:?} waiting for a line")]
    Timeout {
        /// Which stream.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The reader thread could not start.
    #[error("serial {0}: cannot start the reader thread: {1}")]
    Thread(String, std::io::Error),
}

/// Longest text line kept; a longer run without `\n` is cut here (garbage, not the guest).
const MAX_LINE: usize = 4096;

/// One complete text line the guest printed.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// When the line's final `\n` was read.
    pub at: Instant,
    /// The parsed line.
    pub line: GuestLine,
}

/// What a reader thread has seen so far.
#[derive(Debug, Default)]
struct Log {
    beats: Vec<Instant>,
    /// Sweep marks (`mark=1`).
    marks: Vec<Instant>,
    lines: Vec<LogLine>,
    closed: bool,
}

/// Splits a serial byte stream into heartbeats and text lines.
///
/// A `\n` that ends a line holding only dots (or nothing) looks like a heartbeat, but it can
/// also be the leading `\n` of a message. It is recorded as a beat at once and withdrawn
/// if the next byte turns out to be text: a beat is never delayed, and a withdrawn beat
/// is at most one byte's worth of time too early in [`Recorder::beats`] in between.
#[derive(Debug, Default)]
struct Splitter {
    /// Non-dot bytes of the current line.
    text: Vec<u8>,
    /// The last beat pushed was a `\n` that may still turn out to start a message.
    pending_newline: bool,
}

impl Splitter {
    fn feed(&mut self, bytes: &[u8], at: Instant, log: &mut Log) {
        for &b in bytes {
            match b {
                HEARTBEAT if self.text.is_empty() => {
                    log.beats.push(at);
                    self.pending_newline = false;
                }
                SWEEP_MARK if self.text.is_empty() => {
                    log.marks.push(at);
                    self.pending_newline = false;
                }
                b'\n' if self.text.is_empty() => {
                    log.beats.push(at);
                    self.pending_newline = true;
                }
                b'\n' => self.finish_line(at, log),
                b'\r' => {}
                _ => {
                    if self.text.is_empty() && self.pending_newline {
                        // That `\n` was the start of this message, not a beat.
                        log.beats.pop();
                    }
                    self.pending_newline = false;
                    self.text.push(b);
                    if self.text.len() >= MAX_LINE {
                        self.finish_line(at, log);
                    }
                }
            }
        }
    }

    fn finish_line(&mut self, at: Instant, log: &mut Log) {
        self.pending_newline = false;
        let raw = String::from_utf8_lossy(&self.text).into_owned();
        self.text.clear();
        if let Some(line) = GuestLine::parse(&raw) {
            log.lines.push(LogLine { at, line });
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    log: Mutex<Log>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // A reader thread cannot panic while holding the lock, but do not cascade if it did.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records one serial stream on its own thread; see the module documentation.
///
/// Dropping the recorder detaches the thread, which ends when its stream reaches EOF
/// (for a child's pipe: when the child exits or is killed).
#[derive(Debug)]
pub struct Recorder {
    name: String,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Starts a thread named `name` that reads `reader` until EOF or an error.
    ///
    /// Bytes are read as they come into a small buffer and timestamped per read. Every
    /// beat in one read gets the same timestamp; with a pipe written one byte per guest
    /// `OUT`, a read normally holds one beat unless this thread was late.
    pub fn spawn<R: Read + Send + 'static>(
        name: &str,
        mut reader: R,
    ) -> Result<Recorder, SerialError> {
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("serial-{name}"))
            .spawn(move || {
                let mut splitter = Splitter::default();
                let mut buf = [0u8; 256];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let at = Instant::now();
                    splitter.feed(&buf[..n], at, &mut theirs.lock());
                    theirs.changed.notify_all();
                }
                theirs.lock().closed = true;
                theirs.changed.notify_all();
            })
            .map_err(|e| SerialError::Thread(name.to_string(), e))?;
        Ok(Recorder {
            name: name.to_string(),
            shared,
        })
    }

    /// Every heartbeat timestamp so far, in order.
    pub fn beats(&self) -> Vec<Instant> {
        self.shared.lock().beats.clone()
    }

    /// Every sweep mark's timestamp so far (`mark=1`), in order.
    pub fn marks(&self) -> Vec<Instant> {
        self.shared.lock().marks.clone()
    }

    /// How many heartbeats arrived in `[from, to]`.
    pub fn beats_between(&self, from: Instant, to: Instant) -> usize {
        let log = self.shared.lock();
        log.beats.iter().filter(|&&t| t >= from && t <= to).count()
    }

    /// Whether the stream has ended (the process exited).
    pub fn closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Every complete text line so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.shared.lock().lines.clone()
    }

    /// How many `FERRY-GUEST FAIL` lines arrived so far.
    pub fn fail_count(&self) -> usize {
        let log = self.shared.lock();
        log.lines
            .iter()
            .filter(|l| matches!(l.line, GuestLine::Fail(_)))
            .count()
    }

    /// Waits until a line (already received or new) satisfies `pred`; returns the first such.
    ///
    /// Fails on timeout or when the stream closes without one.
    pub fn wait_for<F>(&self, mut pred: F, timeout: Duration) -> Result<LogLine, SerialError>
    where
        F: FnMut(&GuestLine) -> bool,
    {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        let mut log = self.shared.lock();
        loop {
            if let Some(found) = log.lines[checked..].iter().find(|l| pred(&l.line)) {
                return Ok(found.clone());
            }
            checked = log.lines.len();
            if log.closed {
                return Err(SerialError::Closed(self.name.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SerialError::Timeout {
                    name: self.name.clone(),
                    timeout,
                });
            }
            log = self
                .shared
                .changed
                .wait_timeout(log, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The longest silence in a window: where it starts and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The last beat before the silence (or the window start).
    pub start: Instant,
    /// The silence's length.
    pub len: Duration,
}

/// The longest silence in the merged timelines `sources`, within `window` (inclusive).
///
/// The window's ends count as beats, so a guest that stops for good shows a silence up to
/// the window's end rather than none; choose the window to start just before the
/// switchover (e.g. when `migrate` is sent) and end well after the destination resumed.
pub fn longest_gap_at(sources: &[&[Instant]], window: (Instant, Instant)) -> Gap {
    let (from, to) = window;
    let mut all: Vec<Instant> = sources
        .iter()
        .flat_map(|s| s.iter().copied())
        .filter(|&t| t >= from && t <= to)
        .collect();
    all.push(from);
    all.push(to.max(from));
    all.sort_unstable();
    all.windows(2)
        .map(|w| Gap {
            start: w[0],
            len: w[1] - w[0],
        })
        // Ties go to the earliest gap so the answer does not depend on the merge order.
        .fold(
            Gap {
                start: from,
                len: Duration::ZERO,
            },
            |best, g| if g.len > best.len { g } else { best },
        )
}

/// The guest-observed downtime: [`longest_gap_at`]'s length.
pub fn longest_gap(sources: &[&[Instant]], window: (Instant, Instant)) -> Duration {
    longest_gap_at(sources, window).len
}

/// The median interval between consecutive beats in `[from, to]` (the heartbeat's real
/// period, which bounds how finely a downtime can be observed), if there are two beats.
pub fn beat_interval(beats: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    let inside: Vec<Instant> = beats
        .iter()
        .copied()
        .filter(|&t| t >= from && t <= to)
        .collect();
    let mut gaps: Vec<f64> = inside
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let mid = gaps.len() / 2;
    let median = if gaps.len() % 2 == 1 {
        gaps[mid]
    } else {
        (gaps[mid - 1] + gaps[mid]) / 2.0
    };
    Some(Duration::from_secs_f64(median))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, v: &[u64]) -> Vec<Instant> {
        v.iter().map(|&m| base + Duration::from_millis(m)).collect()
    }

    #[test]
    fn gap_merges_source_and_destination() {
        let t = Instant::now();
        let src = ms(t, &[0, 10, 20, 30, 40]);
        let dst = ms(t, &[115, 125, 135]);
        let w = (t + Duration::from_millis(5), t + Duration::from_millis(140));
        let g = longest_gap_at(&[&src, &dst], w);
        assert_eq!(g.len, Duration::from_millis(75));
        assert_eq!(g.start, t + Duration::from_millis(40));
        // Order of the sources does not matter.
        assert_eq!(longest_gap(&[&dst, &src], w), Duration::from_millis(75));
    }

    #[test]
    fn gap_ignores_beats_outside_the_window() {
        let t = Instant::now();
        // A 500 ms silence before the window must not count.
        let src = ms(t, &[0, 500, 510, 520]);
        let w = (
            t + Duration::from_millis(505),
            t + Duration::from_millis(522),
        );
        assert_eq!(longest_gap(&[&src], w), Duration::from_millis(10));
    }

    #[test]
    fn gap_counts_window_edges() {
        let t = Instant::now();
        let src = ms(t, &[0, 10, 20]);
        // The guest never comes back: silence from the last beat to the window end.
        let w = (t, t + Duration::from_millis(1000));
        let g = longest_gap_at(&[&src, &[]], w);
        assert_eq!(g.len, Duration::from_millis(980));
        // No beats at all: the whole window.
        assert_eq!(longest_gap(&[], w), Duration::from_millis(1000));
        // Overlapping timelines (both processes beating) give the smaller gaps.
        let a = ms(t, &[0, 20, 40]);
        let b = ms(t, &[10, 30, 40]);
        let w = (t, t + Duration::from_millis(40));
        assert_eq!(longest_gap(&[&a, &b], w), Duration::from_millis(10));
    }

    fn split(chunks: &[&[u8]]) -> Log {
        let mut log = Log::default();
        let mut s = Splitter::default();
        let t = Instant::now();
        for c in chunks {
            s.feed(c, t, &mut log);
        }
        log
    }

    #[test]
    fn splits_beats_from_lines() {
        // 63 dots then the newline beat, then more dots.
        let mut stream = b"\nFERRY-GUEST boot mem=1019MiB ws=64MiB tsc_khz=2597434\n".to_vec();
        stream.extend([b'.'; 63]);
        stream.push(b'\n');
        stream.extend(b"...");
        let log = split(&[&stream]);
        assert_eq!(log.beats.len(), 67);
        assert_eq!(log.lines.len(), 1);
        assert!(matches!(
            log.lines[0].line,
            GuestLine::Boot {
                mem_mib: 1019,
                ws_mib: 64
            }
        ));
    }

    #[test]
    fn sweep_marks_are_neither_beats_nor_text() {
        let log = split(&[b"..+..+", b"\nFERRY-GUEST ok sweeps=3 fails=0\n+."]);
        assert_eq!(log.marks.len(), 3);
        assert_eq!(log.beats.len(), 5);
        assert_eq!(log.lines.len(), 1);
    }

    #[test]
    fn message_newlines_are_not_beats() {
        // "..": 2 beats; the "\n" before FERRY is the message's; then a newline beat right
        // after the message (the 64th beat), then a message right after a newline beat.
        let log = split(&[
            b"..\nFERRY-GUEST ok sweeps=1 fails=0\n",
            b"\n..",
            b"\n",
            b"\nFERRY-GUEST ready cpus=2\n.",
        ]);
        assert_eq!(log.beats.len(), 2 + 1 + 2 + 1 + 1);
        let lines: Vec<_> = log.lines.iter().map(|l| l.line.clone()).collect();
        assert_eq!(
            lines,
            vec![
                GuestLine::Status {
                    sweeps: 1,
                    fails: 0,
                    stall_us: None
                },
                GuestLine::Ready { cpus: 2 }
            ]
        );
    }

    #[test]
    fn message_split_across_reads() {
        let log = split(&[b".\n", b"FERRY-GUEST FA", b"IL cpu=0 addr=0x1000\n", b"."]);
        assert_eq!(log.beats.len(), 2);
        assert_eq!(log.lines.len(), 1);
        assert!(matches!(log.lines[0].line, GuestLine::Fail(_)));
    }

    #[test]
    fn recorder_reads_a_stream() {
        let data = b"\nFERRY-GUEST ready cpus=1\n....\nFERRY-GUEST FAIL cpu=0\n".to_vec();
        let r = Recorder::spawn("test", std::io::Cursor::new(data)).unwrap();
        let ready = r
            .wait_for(
                |l| matches!(l, GuestLine::Ready { .. }),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(ready.line, GuestLine::Ready { cpus: 1 });
        // The FAIL line is the last thing in the stream, so every beat is in by then.
        r.wait_for(|l| matches!(l, GuestLine::Fail(_)), Duration::from_secs(5))
            .unwrap();
        assert_eq!(r.beats().len(), 4);
        assert_eq!(r.fail_count(), 1);
        // Closed without the line: an error, not a hang.
        let err = r.wait_for(
            |l| matches!(l, GuestLine::Boot { .. }),
            Duration::from_secs(5),
        );
        assert!(err.is_err());
    }

    #[test]
    fn beat_interval_is_the_median() {
        let t = Instant::now();
        let b = ms(t, &[0, 10, 20, 60, 70]);
        let i = beat_interval(&b, t, t + Duration::from_millis(70)).unwrap();
        assert_eq!(i, Duration::from_millis(10));
        assert!(beat_interval(&b[..1], t, t + Duration::from_secs(1)).is_none());
    }
}
