//! A test device with its own memory: a stand-in for a VFIO device such as a vGPU, so the
//! engine's device path (PRE_COPY, STOP_COPY, RESUMING, a load cost) runs without hardware.
//!
//! # Memory split
//!
//! Device `i` shows its memory to the guest at MMIO `TESTDEV_MMIO_BASE + i * TESTDEV_WINDOW`
//! (the first [`TESTDEV_WINDOW`] bytes at most; beyond the memory reads give 0xFF and
//! writes are ignored). The **lower half** of its pages belongs to the guest, which uses it
//! through that window. The **upper half** belongs to the device: while RUNNING or PRE_COPY
//! its thread rewrites one page a millisecond, in a ring, and first checks that the page
//! still holds what it wrote there one lap earlier. A page that a migration lost or left
//! stale therefore shows up in [`TestDev::fails`] on the destination, once its mutator has
//! gone round once. A guest writing the upper half (when the window shows it) causes fails.
//!
//! # Stream
//!
//! A sequence of records, each `kind: u8, len: u32 LE, payload[len], crc32: u32 LE` where the
//! crc32 covers kind, len and payload, so a flipped byte is caught where it lands and a cut
//! stream lacks its END:
//!
//! | kind | name   | payload                                          |
//! |------|--------|--------------------------------------------------|
//! | 1    | HEADER | version u8 (1), memory size u64, device index u32 |
//! | 2    | PAGE   | page number u32, 4096 bytes                      |
//! | 3    | REGS   | step counter u64, fails u64                      |
//! | 4    | END    | (empty)                                          |
//!
//! Every stream starts with HEADER; STOP_COPY ends it with REGS and END. A page may come
//! more than once: the last copy wins.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migrate::{DeviceState, MigrationDevice, PrecopyInfo, VmError};

/// Guest physical address of device 0's MMIO window.
pub const TESTDEV_MMIO_BASE: u64 = 0xD000_0000;
/// Size of each device's MMIO window (device `i` is at `BASE + i * WINDOW`).
pub const TESTDEV_WINDOW: u64 = 16 << 20;
/// How many windows there are.
pub const MAX_TESTDEVS: usize = 16;

/// The device's page size: the unit of dirtying and of PAGE records.
const PAGE: usize = 4096;
const MIN_MEM: u64 = 2 * PAGE as u64;
const MAX_MEM: u64 = 4 << 30;
const MAX_LOAD_MS: u32 = 60_000;
const STEP_PERIOD: Duration = Duration::from_millis(1);

const CONFIG_VERSION: u8 = 0xC2;
const CONFIG_LEN: usize = 14;
const STREAM_VERSION: u8 = 1;

/// Record header (kind, len) and trailer (crc32) sizes.
const REC_HEAD: usize = 5;
const REC_CRC: usize = 4;
/// Largest payload a record of an unknown kind may claim before it counts as corrupt.
const MAX_PAYLOAD: usize = 4 + PAGE;

/// The guest address of `index`'s window and the offset in it, for the VMM's MMIO dispatch.
pub fn mmio_slot(gpa: u64) -> Option<(usize, u64)> {
    let rel = gpa.checked_sub(TESTDEV_MMIO_BASE)?;
    let index = usize::try_from(rel / TESTDEV_WINDOW).ok()?;
    (index < MAX_TESTDEVS).then_some((index, rel % TESTDEV_WINDOW))
}

/// A record kind of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Header,
    Page,
    Regs,
    End,
}

impl Kind {
    fn from_u8(k: u8) -> Option<Kind> {
        match k {
            1 => Some(Kind::Header),
            2 => Some(Kind::Page),
            3 => Some(Kind::Regs),
            4 => Some(Kind::End),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Header => 1,
            Kind::Page => 2,
            Kind::Regs => 3,
            Kind::End => 4,
        }
    }

    /// Every kind has a fixed payload length, so a damaged length is caught at once.
    fn payload(self) -> usize {
        match self {
            Kind::Header => 13,
            Kind::Page => 4 + PAGE,
            Kind::Regs => 16,
            Kind::End => 0,
        }
    }

    /// Bytes of one whole record of this kind.
    fn size(self) -> u64 {
        (REC_HEAD + self.payload() + REC_CRC) as u64
    }
}

/// Appends one record made of `parts` and returns its size.
fn put_record(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> usize {
    let start = out.len();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Little-endian value of up to the first 8 bytes of `b` (missing bytes read as 0).
fn le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// What the CLI's `testdev,...` creates, and what a destination needs to create the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestDevConfig {
    /// Device memory in bytes: a multiple of 4 KiB, 8 KiB to 4 GiB.
    pub mem: u64,
    /// Milliseconds the destination's load (RESUMING -> STOP) takes, like firmware would.
    pub load_ms: u32,
    /// Whether the device streams in PRE_COPY; without it (like a VFIO device without
    /// pre-copy support) its whole memory moves in STOP_COPY, inside the downtime.
    pub precopy: bool,
}

/// A bad `testdev,...` option or config blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("testdev: `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("testdev: unknown option `{0}` (known: mem, load-ms, precopy)")]
    UnknownKey(String),
    #[error("testdev: option `{0}` given twice")]
    Duplicate(String),
    #[error("testdev: bad value `{value}` for {key}")]
    BadValue { key: String, value: String },
    #[error("testdev: mem= is required")]
    MissingMem,
    #[error("testdev: mem={0}: must be a multiple of 4 KiB, at least 8 KiB, at most 4 GiB")]
    BadMem(u64),
    #[error("testdev: load-ms={0}: at most {MAX_LOAD_MS}")]
    BadLoadMs(u64),
    #[error("testdev config: {0} bytes, expected {CONFIG_LEN}")]
    EncodedLength(usize),
    #[error("testdev config: version byte {0:#04x}, expected {CONFIG_VERSION:#04x}")]
    EncodedVersion(u8),
}

/// `value` as a number with an optional K/M/G suffix.
fn parse_size(key: &str, value: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadValue {
        key: key.into(),
        value: value.into(),
    };
    let v = value.trim();
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Stores `v` in `slot` unless the option was given already.
fn set_once(slot: &mut Option<u64>, key: &str, v: u64) -> Result<(), ConfigError> {
    match slot.replace(v) {
        Some(_) => Err(ConfigError::Duplicate(key.into())),
        None => Ok(()),
    }
}

impl TestDevConfig {
    /// Parses the CLI text after `testdev,`, e.g. `mem=64M,load-ms=20`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (mut mem, mut load_ms, mut precopy) = (None, None, None);
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(item.into()))?;
            match key.trim() {
                "mem" => set_once(&mut mem, "mem", parse_size("mem", value)?)?,
                "load-ms" => {
                    let bad = || ConfigError::BadValue {
                        key: "load-ms".into(),
                        value: value.into(),
                    };
                    set_once(
                        &mut load_ms,
                        "load-ms",
                        value.trim().parse().map_err(|_| bad())?,
                    )?
                }
                "precopy" => {
                    let v = match value.trim() {
                        "1" | "on" => 1,
                        "0" | "off" => 0,
                        _ => {
                            return Err(ConfigError::BadValue {
                                key: "precopy".into(),
                                value: value.into(),
                            })
                        }
                    };
                    set_once(&mut precopy, "precopy", v)?
                }
                other => return Err(ConfigError::UnknownKey(other.into())),
            }
        }
        let load_ms = load_ms.unwrap_or(0);
        let cfg = TestDevConfig {
            mem: mem.ok_or(ConfigError::MissingMem)?,
            load_ms: u32::try_from(load_ms).map_err(|_| ConfigError::BadLoadMs(load_ms))?,
            precopy: precopy.unwrap_or(1) == 1,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the limits (a config can also be built by hand or decoded).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mem_ok =
            self.mem.is_multiple_of(PAGE as u64) && (MIN_MEM..=MAX_MEM).contains(&self.mem);
        if !mem_ok {
            return Err(ConfigError::BadMem(self.mem));
        }
        if self.load_ms > MAX_LOAD_MS {
            return Err(ConfigError::BadLoadMs(self.load_ms.into()));
        }
        Ok(())
    }

    /// The blob a destination decodes: version byte, mem u64 LE, load_ms u32 LE, precopy.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONFIG_LEN);
        v.push(CONFIG_VERSION);
        v.extend_from_slice(&self.mem.to_le_bytes());
        v.extend_from_slice(&self.load_ms.to_le_bytes());
        v.push(u8::from(self.precopy));
        v
    }

    /// Reads what [`encode`](Self::encode) wrote, checking length, version and limits.
    pub fn decode(b: &[u8]) -> Result<Self, ConfigError> {
        if b.len() != CONFIG_LEN {
            return Err(ConfigError::EncodedLength(b.len()));
        }
        if b[0] != CONFIG_VERSION {
            return Err(ConfigError::EncodedVersion(b[0]));
        }
        let cfg = TestDevConfig {
            mem: le(&b[1..9]),
            load_ms: le(&b[9..13]) as u32,
            precopy: match b[13] {
                0 => false,
                1 => true,
                v => {
                    return Err(ConfigError::BadValue {
                        key: "precopy".into(),
                        value: v.to_string(),
                    })
                }
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The CLI text for this config (what [`TestDevConfig::parse`] reads back).
impl fmt::Display for TestDevConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem={},load-ms={}", self.mem, self.load_ms)?;
        if !self.precopy {
            write!(f, ",precopy=0")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// What went wrong with a test device; every message starts with the device's name.
#[derive(Debug, thiserror::Error)]
pub enum TestDevError {
    #[error("{dev}: index out of range (at most {MAX_TESTDEVS} devices)")]
    Index { dev: String },
    #[error("{dev}: {error}")]
    Config { dev: String, error: ConfigError },
    #[error("{dev}: cannot start its thread: {error}")]
    Spawn { dev: String, error: std::io::Error },
    #[error("{dev}: cannot go from {from} to {to}")]
    Transition {
        dev: String,
        from: &'static str,
        to: &'static str,
    },
    #[error("{dev}: {op} in state {state}")]
    WrongState {
        dev: String,
        op: &'static str,
        state: &'static str,
    },
    #[error("{dev}: corrupt record at byte offset {offset}: {what}")]
    Corrupt {
        dev: String,
        offset: u64,
        what: String,
    },
    #[error("{dev}: unknown record kind {kind} at byte offset {offset}")]
    UnknownKind { dev: String, offset: u64, kind: u8 },
    #[error("{dev}: record at byte offset {offset} before the stream's HEADER")]
    NoHeader { dev: String, offset: u64 },
    #[error("{dev}: a second HEADER at byte offset {offset}")]
    SecondHeader { dev: String, offset: u64 },
    #[error("{dev}: stream version {version}, this device reads {STREAM_VERSION}")]
    Version { dev: String, version: u8 },
    #[error(
        "{dev}: wrong device size: the stream has {theirs} bytes of memory, this device {ours}"
    )]
    WrongSize { dev: String, theirs: u64, ours: u64 },
    #[error("{dev}: the stream is of testdev{theirs}")]
    WrongIndex { dev: String, theirs: u64 },
    #[error("{dev}: page {page} at byte offset {offset} is out of range ({npages} pages)")]
    PageRange {
        dev: String,
        offset: u64,
        page: u64,
        npages: usize,
    },
    #[error("{dev}: data after the END record, at byte offset {offset}")]
    AfterEnd { dev: String, offset: u64 },
    #[error("{dev}: the stream already failed")]
    Failed { dev: String },
    #[error("{dev}: truncated stream: no END record after {bytes} bytes")]
    Truncated { dev: String, bytes: u64 },
    #[error("{dev}: the stream has no REGS record")]
    NoRegs { dev: String },
}

// ---------------------------------------------------------------------------------------
// Device state
// ---------------------------------------------------------------------------------------

/// One bit per page, with a count so sizes are O(1).
struct Bitmap {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl Bitmap {
    fn new(len: usize) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64)],
            len,
            count: 0,
        }
    }

    fn set(&mut self, i: usize) {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if self.words[w] & b == 0 {
            self.words[w] |= b;
            self.count += 1;
        }
    }

    fn set_all(&mut self) {
        self.words.fill(!0);
        if !self.len.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << (self.len % 64)) - 1;
            }
        }
        self.count = self.len;
    }

    fn test_and_clear(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = self.words[w] & b != 0;
        if was {
            self.words[w] &= !b;
            self.count -= 1;
        }
        was
    }

    /// The first set bit in `[lo, hi)`.
    fn find(&self, lo: usize, hi: usize) -> Option<usize> {
        let mut i = lo;
        while i < hi {
            let w = self.words[i / 64] >> (i % 64);
            if w != 0 {
                let bit = i + w.trailing_zeros() as usize;
                return (bit < hi).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The first set bit at or after `from`, wrapping round.
    fn next_from(&self, from: usize) -> Option<usize> {
        if self.count == 0 {
            return None;
        }
        self.find(from, self.len).or_else(|| self.find(0, from))
    }
}

/// The device's registers: what REGS carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Regs {
    steps: u64,
    fails: u64,
}

/// Source side: how far the current stream is.
#[derive(Default)]
struct Tx {
    header_sent: bool,
    regs_sent: bool,
    end_sent: bool,
    /// Next page to look at: pages go out in ring order, so the first lap is the initial pass.
    cursor: usize,
    initial_left: u64,
}

/// Destination side: the parser.
#[derive(Default)]
struct Rx {
    /// The start of a record split across `write` calls.
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    offset: u64,
    header: bool,
    end: bool,
    failed: bool,
    regs: Option<Regs>,
}

/// Everything behind the lock: memory, dirty bitmap, registers and migration state.
struct Inner {
    mem: Vec<u8>,
    dirty: Bitmap,
    regs: Regs,
    state: DeviceState,
    tx: Tx,
    rx: Rx,
    quit: bool,
    /// The device streams in PRE_COPY (else all in STOP_COPY).
    precopy: bool,
}

/// Shared with the mutator thread (which must not keep the device itself alive).
struct Shared {
    index: usize,
    name: String,
    inner: Mutex<Inner>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays usable even if a thread panicked while holding it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What step `g` writes: never 0, so a zeroed page is always noticed.
fn stamp(g: u64, index: usize) -> u64 {
    (g.wrapping_add(1) << 16) | index as u64
}

impl Inner {
    fn npages(&self) -> usize {
        self.mem.len() / PAGE
    }

    fn qword(&self, page: usize) -> u64 {
        le(&self.mem[page * PAGE..page * PAGE + 8])
    }

    /// One step of the mutator (see the module documentation).
    fn step(&mut self, index: usize, name: &str) {
        let npages = self.npages() as u64;
        let half = npages / 2;
        let span = npages - half;
        let g = self.regs.steps;
        let page = (half + g % span) as usize;
        let expected = if g < span { 0 } else { stamp(g - span, index) };
        let found = self.qword(page);
        if found != expected {
            self.regs.fails += 1;
            tracing::error!(
                "{name}: page {page} holds {found:#x}, expected {expected:#x} (step {g})"
            );
        }
        self.mem[page * PAGE..page * PAGE + 8].copy_from_slice(&stamp(g, index).to_le_bytes());
        self.dirty.set(page);
        self.regs.steps = g.wrapping_add(1);
    }

    /// A fresh source stream with every page to send.
    fn begin_stream(&mut self, precopy: bool) {
        self.tx = Tx::default();
        self.dirty.set_all();
        if precopy {
            self.tx.initial_left = Kind::Header.size() + self.npages() as u64 * Kind::Page.size();
        }
    }

    /// Bytes the current stream still has to send if it ended now.
    fn pending(&self) -> u64 {
        let unsent = |sent: bool, k: Kind| if sent { 0 } else { k.size() };
        unsent(self.tx.header_sent, Kind::Header)
            + self.dirty.count as u64 * Kind::Page.size()
            + unsent(self.tx.regs_sent, Kind::Regs)
            + unsent(self.tx.end_sent, Kind::End)
    }

    /// The kind of the record `read` would send next.
    fn next_kind(&self) -> Option<Kind> {
        let stopped = self.state == DeviceState::StopCopy;
        if self.state == DeviceState::PreCopy && !self.precopy {
            return None;
        }
        if !self.tx.header_sent {
            Some(Kind::Header)
        } else if self.dirty.count > 0 {
            Some(Kind::Page)
        } else if stopped && !self.tx.regs_sent {
            Some(Kind::Regs)
        } else if stopped && !self.tx.end_sent {
            Some(Kind::End)
        } else {
            None
        }
    }

    /// Appends a record of `kind`; returns its size (0 if there was nothing).
    fn emit(&mut self, kind: Kind, out: &mut Vec<u8>, index: usize) -> usize {
        let code = kind.code();
        let n = match kind {
            Kind::Header => {
                self.tx.header_sent = true;
                let mem = (self.mem.len() as u64).to_le_bytes();
                let idx = (index as u32).to_le_bytes();
                put_record(out, code, &[&[STREAM_VERSION], &mem, &idx])
            }
            Kind::Page => self.emit_page(out),
            Kind::Regs => {
                self.tx.regs_sent = true;
                let (s, f) = (self.regs.steps, self.regs.fails);
                put_record(out, code, &[&s.to_le_bytes(), &f.to_le_bytes()])
            }
            Kind::End => {
                self.tx.end_sent = true;
                put_record(out, code, &[])
            }
        };
        self.tx.initial_left = self.tx.initial_left.saturating_sub(n as u64);
        n
    }

    /// The next dirty page, its bit cleared first so a later write dirties it again.
    fn emit_page(&mut self, out: &mut Vec<u8>) -> usize {
        let Some(p) = self.dirty.next_from(self.tx.cursor) else {
            return 0;
        };
        self.dirty.test_and_clear(p);
        self.tx.cursor = (p + 1) % self.npages();
        let data = &self.mem[p * PAGE..(p + 1) * PAGE];
        put_record(out, Kind::Page.code(), &[&(p as u32).to_le_bytes(), data])
    }
}

/// A parsed record, borrowing the received bytes.
struct Record<'a> {
    kind: Kind,
    payload: &'a [u8],
    size: usize,
}

impl Shared {
    fn corrupt(&self, offset: u64, what: String) -> TestDevError {
        TestDevError::Corrupt {
            dev: self.name.clone(),
            offset,
            what,
        }
    }

    /// The record at the start of `b` (stream offset `offset`), or None if incomplete.
    fn split_record<'a>(
        &self,
        b: &'a [u8],
        offset: u64,
    ) -> Result<Option<Record<'a>>, TestDevError> {
        let Some((head, _)) = b.split_first_chunk::<REC_HEAD>() else {
            return Ok(None);
        };
        let (code, len) = (head[0], le(&head[1..]) as usize);
        match Kind::from_u8(code) {
            Some(k) if k.payload() != len => {
                let what = format!("a {k:?} record of {len} bytes, expected {}", k.payload());
                return Err(self.corrupt(offset, what));
            }
            None if len > MAX_PAYLOAD => {
                let what = format!("kind {code} with a length of {len} bytes");
                return Err(self.corrupt(offset, what));
            }
            _ => {}
        }
        let Some(rec) = b.get(..REC_HEAD + len + REC_CRC) else {
            return Ok(None);
        };
        let (body, crc) = rec.split_at(REC_HEAD + len);
        if crc32fast::hash(body) as u64 != le(crc) {
            return Err(self.corrupt(offset, "checksum mismatch".into()));
        }
        let kind = Kind::from_u8(code).ok_or_else(|| TestDevError::UnknownKind {
            dev: self.name.clone(),
            offset,
            kind: code,
        })?;
        let payload = &body[REC_HEAD..];
        Ok(Some(Record {
            kind,
            payload,
            size: rec.len(),
        }))
    }

    /// Takes `data` into the stream: whole records are applied, a partial one is kept.
    fn receive(&self, g: &mut Inner, data: &[u8]) -> Result<(), TestDevError> {
        if g.rx.failed {
            return Err(TestDevError::Failed {
                dev: self.name.clone(),
            });
        }
        let mut buf = std::mem::take(&mut g.rx.buf);
        buf.extend_from_slice(data);
        match self.apply_all(g, &buf) {
            Ok(used) => {
                buf.drain(..used);
                g.rx.buf = buf;
                g.rx.offset += used as u64;
                Ok(())
            }
            Err(e) => {
                g.rx.failed = true;
                Err(e)
            }
        }
    }

    /// Applies every whole record in `buf`; returns the bytes they took.
    fn apply_all(&self, g: &mut Inner, buf: &[u8]) -> Result<usize, TestDevError> {
        let mut pos = 0;
        loop {
            let offset = g.rx.offset + pos as u64;
            if g.rx.end && pos < buf.len() {
                return Err(TestDevError::AfterEnd {
                    dev: self.name.clone(),
                    offset,
                });
            }
            let Some(rec) = self.split_record(&buf[pos..], offset)? else {
                return Ok(pos);
            };
            self.apply(g, &rec, offset)?;
            pos += rec.size;
        }
    }

    fn apply(&self, g: &mut Inner, rec: &Record<'_>, offset: u64) -> Result<(), TestDevError> {
        let dev = || self.name.clone();
        if rec.kind != Kind::Header && !g.rx.header {
            return Err(TestDevError::NoHeader { dev: dev(), offset });
        }
        let p = rec.payload;
        match rec.kind {
            Kind::Header if g.rx.header => {
                return Err(TestDevError::SecondHeader { dev: dev(), offset })
            }
            Kind::Header => self.check_header(g, p)?,
            Kind::Page => {
                let (page, npages) = (le(&p[..4]), g.npages());
                if page >= npages as u64 {
                    return Err(TestDevError::PageRange {
                        dev: dev(),
                        offset,
                        page,
                        npages,
                    });
                }
                let at = page as usize * PAGE;
                g.mem[at..at + PAGE].copy_from_slice(&p[4..]);
            }
            Kind::Regs => {
                g.rx.regs = Some(Regs {
                    steps: le(&p[..8]),
                    fails: le(&p[8..]),
                });
            }
            Kind::End => g.rx.end = true,
        }
        Ok(())
    }

    /// The stream must be of a device like this one.
    fn check_header(&self, g: &mut Inner, p: &[u8]) -> Result<(), TestDevError> {
        let dev = || self.name.clone();
        if p[0] != STREAM_VERSION {
            return Err(TestDevError::Version {
                dev: dev(),
                version: p[0],
            });
        }
        let (theirs, ours) = (le(&p[1..9]), g.mem.len() as u64);
        if theirs != ours {
            return Err(TestDevError::WrongSize {
                dev: dev(),
                theirs,
                ours,
            });
        }
        let index = le(&p[9..13]);
        if index != self.index as u64 {
            return Err(TestDevError::WrongIndex {
                dev: dev(),
                theirs: index,
            });
        }
        g.rx.header = true;
        Ok(())
    }

    /// RESUMING -> STOP: the stream must be complete; its registers take effect.
    fn finish_load(&self, g: &mut Inner) -> Result<(), TestDevError> {
        if !g.rx.end {
            let bytes = g.rx.offset + g.rx.buf.len() as u64;
            return Err(TestDevError::Truncated {
                dev: self.name.clone(),
                bytes,
            });
        }
        g.regs = g.rx.regs.ok_or_else(|| TestDevError::NoRegs {
            dev: self.name.clone(),
        })?;
        g.rx = Rx::default();
        Ok(())
    }

    /// Moves to `to`; returns whether the load cost must now be paid.
    fn transition(&self, to: DeviceState) -> Result<bool, TestDevError> {
        use DeviceState::*;
        let mut g = lock(&self.inner);
        match (g.state, to) {
            (Resuming, Resuming) | (Running | Stop, Resuming) => g.rx = Rx::default(),
            (from, to) if from == to => return Ok(false),
            (Running, PreCopy) if g.precopy => g.begin_stream(true),
            // Without pre-copy support nothing moves until the stop.
            (Running, PreCopy) => {}
            (PreCopy, StopCopy) if !g.precopy => g.begin_stream(false),
            (Running | Stop, StopCopy) => g.begin_stream(false),
            (PreCopy, StopCopy) | (Running | StopCopy, Stop) => {}
            (PreCopy | StopCopy | Stop, Running) => g.tx = Tx::default(),
            (Resuming, Stop) => {
                self.finish_load(&mut g)?;
                g.state = Stop;
                return Ok(true);
            }
            (from, to) => {
                return Err(TestDevError::Transition {
                    dev: self.name.clone(),
                    from: from.name(),
                    to: to.name(),
                })
            }
        }
        g.state = to;
        Ok(false)
    }
}

/// The mutator thread: a step a millisecond while the device runs, until told to quit.
fn run(shared: Arc<Shared>) {
    let mut next = Instant::now() + STEP_PERIOD;
    let mut g = lock(&shared.inner);
    while !g.quit {
        let now = Instant::now();
        if now >= next {
            if matches!(g.state, DeviceState::Running | DeviceState::PreCopy) {
                g.step(shared.index, &shared.name);
            }
            next = now + STEP_PERIOD;
        }
        let wait = next.saturating_duration_since(now);
        g = match shared.wake.wait_timeout(g, wait) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
}

// ---------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------

/// A test device with its own memory (see the module documentation).
pub struct TestDev {
    shared: Arc<Shared>,
    config: TestDevConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for TestDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDev")
            .field("name", &self.shared.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TestDev {
    /// Device `index` with zeroed memory, RUNNING, its mutator not started yet.
    pub fn new(index: usize, config: TestDevConfig) -> Result<Arc<TestDev>, TestDevError> {
        let name = format!("testdev{index}");
        if index >= MAX_TESTDEVS {
            return Err(TestDevError::Index { dev: name });
        }
        config.validate().map_err(|error| TestDevError::Config {
            dev: name.clone(),
            error,
        })?;
        let bytes = usize::try_from(config.mem).map_err(|_| TestDevError::Config {
            dev: name.clone(),
            error: ConfigError::BadMem(config.mem),
        })?;
        let inner = Inner {
            mem: vec![0; bytes],
            dirty: Bitmap::new(bytes / PAGE),
            regs: Regs::default(),
            state: DeviceState::Running,
            tx: Tx::default(),
            rx: Rx::default(),
            quit: false,
            precopy: config.precopy,
        };
        let shared = Shared {
            index,
            name,
            inner: Mutex::new(inner),
            wake: Condvar::new(),
        };
        Ok(Arc::new(TestDev {
            shared: Arc::new(shared),
            config,
            thread: Mutex::new(None),
        }))
    }

    /// Its index (which MMIO window it answers).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The config it was created with.
    pub fn device_config(&self) -> TestDevConfig {
        self.config
    }

    /// Its current migration state.
    pub fn state(&self) -> DeviceState {
        lock(&self.shared.inner).state
    }

    /// Starts the mutator thread (`testdev{i}`); does nothing if it runs already.
    pub fn start(self: &Arc<Self>) -> Result<(), TestDevError> {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return Ok(());
        }
        lock(&self.shared.inner).quit = false;
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name(self.shared.name.clone())
            .spawn(move || run(shared))
            .map_err(|error| TestDevError::Spawn {
                dev: self.shared.name.clone(),
                error,
            })?;
        *thread = Some(handle);
        Ok(())
    }

    /// Stops the mutator thread and waits for it (it wakes at once: no long wait).
    pub fn stop_thread(&self) {
        lock(&self.shared.inner).quit = true;
        self.shared.wake.notify_all();
        if let Some(handle) = lock(&self.thread).take() {
            if handle.join().is_err() {
                tracing::error!("{}: mutator thread panicked", self.shared.name);
            }
        }
    }

    /// Steps the mutator has done (a register: it migrates).
    pub fn steps(&self) -> u64 {
        lock(&self.shared.inner).regs.steps
    }

    /// Verification failures the mutator has seen (a register: it migrates).
    pub fn fails(&self) -> u64 {
        lock(&self.shared.inner).regs.fails
    }

    /// A 64-bit hash of the whole memory, to compare source and destination.
    pub fn digest(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&lock(&self.shared.inner).mem)
    }

    /// A guest read at `offset` in the window; bytes beyond the memory read as 0xFF.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let g = lock(&self.shared.inner);
        let visible = (g.mem.len() as u64).min(TESTDEV_WINDOW);
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(a) if a < visible => g.mem[a as usize],
                _ => 0xFF,
            };
        }
    }

    /// A guest write at `offset` in the window (little-endian, as bytes); it dirties its
    /// page(s). Bytes beyond the memory are ignored.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mut g = lock(&self.shared.inner);
        let visible = (g.mem.len() as u64).min(TESTDEV_WINDOW);
        for (i, &b) in data.iter().enumerate() {
            if let Some(a) = offset.checked_add(i as u64).filter(|&a| a < visible) {
                g.mem[a as usize] = b;
                g.dirty.set(a as usize / PAGE);
            }
        }
    }
}

impl Drop for TestDev {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

impl MigrationDevice for TestDev {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn config(&self) -> Vec<u8> {
        self.config.encode()
    }

    fn set_state(&self, to: DeviceState) -> Result<(), VmError> {
        if self.shared.transition(to).map_err(VmError::new)? {
            // The firmware's load: after the lock is released, as a real device's would be.
            std::thread::sleep(Duration::from_millis(self.config.load_ms.into()));
        }
        Ok(())
    }

    fn read(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, VmError> {
        let mut n = 0;
        loop {
            // One record per lock hold, so the mutator is never held up for long.
            let mut g = lock(&self.shared.inner);
            if !matches!(g.state, DeviceState::PreCopy | DeviceState::StopCopy) {
                if n > 0 {
                    return Ok(n);
                }
                let dev = self.shared.name.clone();
                let state = g.state.name();
                return Err(VmError::new(TestDevError::WrongState {
                    dev,
                    op: "read",
                    state,
                }));
            }
            let Some(kind) = g.next_kind() else {
                return Ok(n);
            };
            if n > 0 && n as u64 + kind.size() > max as u64 {
                return Ok(n);
            }
            match g.emit(kind, out, self.shared.index) {
                0 => return Ok(n),
                k => n += k,
            }
        }
    }

    fn precopy_info(&self) -> PrecopyInfo {
        let g = lock(&self.shared.inner);
        if !matches!(g.state, DeviceState::PreCopy | DeviceState::StopCopy) || !g.precopy {
            return PrecopyInfo::default();
        }
        let initial_bytes = g.tx.initial_left;
        let dirty_bytes = match initial_bytes {
            0 => g.dirty.count as u64 * Kind::Page.size(),
            _ => 0,
        };
        PrecopyInfo {
            initial_bytes,
            dirty_bytes,
        }
    }

    fn stop_copy_size(&self) -> u64 {
        let g = lock(&self.shared.inner);
        match g.state {
            // Without pre-copy, everything moves at the stop.
            DeviceState::PreCopy if !g.precopy => {
                let pages = g.npages() as u64 * Kind::Page.size();
                Kind::Header.size() + pages + Kind::Regs.size() + Kind::End.size()
            }
            DeviceState::Running => {
                let pages = g.npages() as u64 * Kind::Page.size();
                Kind::Header.size() + pages + Kind::Regs.size() + Kind::End.size()
            }
            DeviceState::PreCopy | DeviceState::StopCopy => g.pending(),
            _ => 0,
        }
    }

    fn load_cost(&self) -> Duration {
        Duration::from_millis(self.config.load_ms.into())
    }

    fn write(&self, data: &[u8]) -> Result<(), VmError> {
        let mut g = lock(&self.shared.inner);
        if g.state != DeviceState::Resuming {
            let dev = self.shared.name.clone();
            let state = g.state.name();
            return Err(VmError::new(TestDevError::WrongState {
                dev,
                op: "write",
                state,
            }));
        }
        self.shared.receive(&mut g, data).map_err(VmError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: usize, cfg: &str) -> Arc<TestDev> {
        TestDev::new(index, TestDevConfig::parse(cfg).unwrap()).unwrap()
    }

    /// Reads until the device has nothing more (the whole rest in STOP_COPY).
    fn drain(d: &TestDev, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while d.read(&mut out, max).unwrap() > 0 {}
        out
    }

    /// A device's complete stream, taken while its mutator is idle.
    fn full_stream(d: &TestDev) -> Vec<u8> {
        d.set_state(DeviceState::StopCopy).unwrap();
        let s = drain(d, 1 << 20);
        d.set_state(DeviceState::Running).unwrap();
        s
    }

    /// `(kind, start, end)` of each record of a well-formed stream.
    fn records(s: &[u8]) -> Vec<(u8, usize, usize)> {
        let mut v = Vec::new();
        let mut pos = 0;
        while pos < s.len() {
            let end = pos + REC_HEAD + le(&s[pos + 1..pos + 5]) as usize + REC_CRC;
            v.push((s[pos], pos, end));
            pos = end;
        }
        v
    }

    fn resuming(index: usize, cfg: &str) -> Arc<TestDev> {
        let d = dev(index, cfg);
        d.set_state(DeviceState::Resuming).unwrap();
        d
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn err_of(s: &str) -> ConfigError {
        TestDevConfig::parse(s).unwrap_err()
    }

    #[test]
    fn without_precopy_everything_moves_at_the_stop() {
        let d = dev(1, "mem=64K,precopy=0");
        d.set_state(DeviceState::PreCopy).unwrap();
        let mut out = Vec::new();
        assert_eq!(d.read(&mut out, 1 << 20).unwrap(), 0, "nothing in PRE_COPY");
        assert_eq!(d.precopy_info(), PrecopyInfo::default());
        let whole = Kind::Header.size() + 16 * Kind::Page.size() + Kind::Regs.size() + 9;
        assert_eq!(d.stop_copy_size(), whole);
        d.set_state(DeviceState::StopCopy).unwrap();
        while d.read(&mut out, 1 << 20).unwrap() > 0 {}
        assert_eq!(
            out.len() as u64,
            whole,
            "header, every page, registers, end"
        );
        let t = dev(1, "mem=64K,precopy=0");
        t.set_state(DeviceState::Resuming).unwrap();
        t.write(&out).unwrap();
        t.set_state(DeviceState::Stop).unwrap();
        assert_eq!(t.digest(), d.digest());
    }

    #[test]
    fn config_parse_encode_decode() {
        let c = TestDevConfig::parse("mem=64M,load-ms=20").unwrap();
        assert_eq!(
            c,
            TestDevConfig {
                mem: 64 << 20,
                load_ms: 20,
                precopy: true,
            }
        );
        let c = TestDevConfig::parse(" load-ms=5 , mem=4g, precopy=0 ").unwrap();
        assert_eq!(
            c,
            TestDevConfig {
                mem: 4 << 30,
                load_ms: 5,
                precopy: false,
            }
        );
        assert!(matches!(
            err_of("mem=8K,precopy=2"),
            ConfigError::BadValue { .. }
        ));
        assert_eq!(TestDevConfig::parse("mem=8K").unwrap().load_ms, 0);
        assert_eq!(TestDevConfig::parse("mem=12288").unwrap().mem, 12288);
        let d = TestDevConfig::decode(&c.encode()).unwrap();
        assert_eq!(d, c);
        assert_eq!(TestDevConfig::parse(&c.to_string()).unwrap(), c);
        use ConfigError::*;
        let err = |s: &str| TestDevConfig::parse(s).unwrap_err();
        assert_eq!(err(""), MissingMem);
        assert_eq!(err("load-ms=3"), MissingMem);
        assert_eq!(err("mem=4K"), BadMem(4096));
        assert_eq!(err("mem=12289"), BadMem(12289));
        assert_eq!(err("mem=5G"), BadMem(5 << 30));
        assert_eq!(err("mem=8K,load-ms=60001"), BadLoadMs(60001));
        assert_eq!(err("mem=8K,load-ms=99999999999"), BadLoadMs(99999999999));
        assert_eq!(err("mem=8K,size=1"), UnknownKey("size".into()));
        assert_eq!(err("mem=8K,mem=8K"), Duplicate("mem".into()));
        assert_eq!(err("mem"), NotKeyValue("mem".into()));
        let bad = BadValue {
            key: "mem".into(),
            value: "8X".into(),
        };
        assert_eq!(err("mem=8X"), bad);
        assert!(matches!(err("mem=99999999999999999G"), BadValue { .. }));
        assert!(err("load-ms=-1,mem=8K").to_string().contains("load-ms"));
        let e = c.encode();
        assert_eq!(TestDevConfig::decode(&e[..12]), Err(EncodedLength(12)));
        let mut p = e.clone();
        p[13] = 2;
        assert!(matches!(TestDevConfig::decode(&p), Err(BadValue { .. })));
        let mut v = e.clone();
        v[0] = 7;
        assert_eq!(TestDevConfig::decode(&v), Err(EncodedVersion(7)));
        v = e;
        v[1] = 1; // mem no longer a multiple of 4 KiB
        assert!(matches!(TestDevConfig::decode(&v), Err(BadMem(_))));
    }

    #[test]
    fn new_checks_index_and_config() {
        let cfg = TestDevConfig {
            mem: 8192,
            load_ms: 0,
            precopy: true,
        };
        let e = TestDev::new(MAX_TESTDEVS, cfg).unwrap_err().to_string();
        assert!(e.starts_with("testdev16: "), "{e}");
        let bad = TestDevConfig {
            mem: 100,
            load_ms: 0,
            precopy: true,
        };
        let e = TestDev::new(2, bad).unwrap_err().to_string();
        assert!(e.starts_with("testdev2: "), "{e}");
        let d = TestDev::new(3, cfg).unwrap();
        assert_eq!(d.name(), "testdev3");
        assert_eq!(TestDevConfig::decode(&d.config()).unwrap(), cfg);
    }

    #[test]
    fn mmio_round_trip_and_bounds() {
        assert_eq!(
            mmio_slot(TESTDEV_MMIO_BASE + 3 * TESTDEV_WINDOW + 8),
            Some((3, 8))
        );
        assert_eq!(mmio_slot(TESTDEV_MMIO_BASE - 1), None);
        assert_eq!(mmio_slot(TESTDEV_MMIO_BASE + 16 * TESTDEV_WINDOW), None);
        let d = dev(0, "mem=8K");
        d.mmio_write(0x10, &0x1122_3344_5566_7788u64.to_le_bytes());
        let mut b8 = [0u8; 8];
        d.mmio_read(0x10, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1122_3344_5566_7788);
        let (mut b1, mut b2, mut b4) = ([0u8; 1], [0u8; 2], [0u8; 4]);
        d.mmio_read(0x10, &mut b1);
        d.mmio_read(0x10, &mut b2);
        d.mmio_read(0x14, &mut b4);
        assert_eq!((b1[0], u16::from_le_bytes(b2)), (0x88, 0x7788));
        assert_eq!(u32::from_le_bytes(b4), 0x1122_3344);
        d.mmio_write(0x11, &[0xAB]);
        d.mmio_read(0x10, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0xAB88);
        // Straddling the end: the first half lands, the rest reads 0xFF.
        d.mmio_write(8192 - 4, &u64::MAX.to_le_bytes());
        d.mmio_read(8192 - 4, &mut b8);
        assert_eq!(b8, [0xFF; 8]);
        d.mmio_write(8192 - 4, &0u64.to_le_bytes());
        d.mmio_read(8192 - 4, &mut b8);
        assert_eq!(b8, [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.mmio_read(1 << 20, &mut b4);
        assert_eq!(b4, [0xFF; 4]);
        d.mmio_read(u64::MAX - 1, &mut b4);
        assert_eq!(b4, [0xFF; 4]);
        d.mmio_write(u64::MAX - 1, &[1, 2, 3, 4]);
        let g = lock(&d.shared.inner);
        assert_eq!(g.dirty.count, 2, "pages 0 and 1 dirty");
        assert_eq!(g.mem.len(), 8192);
    }

    #[test]
    fn window_shows_only_16_mib() {
        let d = dev(0, "mem=32M");
        d.mmio_write(TESTDEV_WINDOW - 1, &[1, 2]);
        let mut b = [0u8; 2];
        d.mmio_read(TESTDEV_WINDOW - 1, &mut b);
        assert_eq!(b, [1, 0xFF]);
    }

    #[test]
    fn read_sends_whole_records() {
        let d = dev(0, "mem=16K");
        let mut out = vec![0xEE];
        assert!(d.read(&mut out, 100).is_err(), "not migrating");
        assert_eq!(d.stop_copy_size(), 22 + 4 * 4109 + 25 + 9);
        d.set_state(DeviceState::PreCopy).unwrap();
        let info = d.precopy_info();
        assert_eq!((info.initial_bytes, info.dirty_bytes), (22 + 4 * 4109, 0));
        assert_eq!(d.read(&mut out, 1).unwrap(), 22, "HEADER alone");
        assert_eq!(
            d.read(&mut out, 1).unwrap(),
            4109,
            "one page, larger than max"
        );
        assert_eq!(d.read(&mut out, 2 * 4109).unwrap(), 2 * 4109);
        assert_eq!(d.precopy_info().initial_bytes, 4109);
        assert_eq!(d.read(&mut out, 1 << 20).unwrap(), 4109);
        assert_eq!(d.precopy_info(), PrecopyInfo::default());
        assert_eq!(d.read(&mut out, 1 << 20).unwrap(), 0, "nothing pending");
        d.mmio_write(4096 + 5, &[1]);
        assert_eq!(d.precopy_info().dirty_bytes, 4109);
        assert_eq!(d.stop_copy_size(), 4109 + 25 + 9);
        d.set_state(DeviceState::StopCopy).unwrap();
        assert_eq!(d.read(&mut out, 1 << 20).unwrap(), 4109 + 25 + 9);
        assert_eq!(d.read(&mut out, 1 << 20).unwrap(), 0, "ended");
        assert_eq!(out[0], 0xEE, "appends");
        let kinds: Vec<u8> = records(&out[1..]).iter().map(|r| r.0).collect();
        assert_eq!(kinds, [1, 2, 2, 2, 2, 2, 3, 4]);
        // A failed migration: back to RUNNING, then a fresh stream.
        d.set_state(DeviceState::Running).unwrap();
        d.set_state(DeviceState::PreCopy).unwrap();
        let mut again = Vec::new();
        assert_eq!(d.read(&mut again, 1).unwrap(), 22);
        assert_eq!(again[0], 1, "HEADER again");
        assert_eq!(d.precopy_info().initial_bytes, 4 * 4109);
    }

    #[test]
    fn migrates_while_the_mutator_runs() {
        let cfg = "mem=256K"; // 64 pages: the mutator's ring is 32 pages
        let src = dev(1, cfg);
        src.mmio_write(0x100, &0x1122_3344_5566_7788u64.to_le_bytes());
        src.start().unwrap();
        wait_until("a lap", || src.steps() >= 40);
        let dst = resuming(1, cfg);
        dst.start().unwrap();
        src.set_state(DeviceState::PreCopy).unwrap();
        let lap_end = src.steps() + 40;
        let mut out = Vec::new();
        while src.precopy_info().initial_bytes > 0 || src.steps() < lap_end {
            out.clear();
            if src.read(&mut out, 16 << 10).unwrap() == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
            dst.write(&out).unwrap();
        }
        src.set_state(DeviceState::StopCopy).unwrap();
        let size = src.stop_copy_size();
        let rest = drain(&src, 10 << 10);
        assert_eq!(rest.len() as u64, size);
        for chunk in rest.chunks(1000) {
            dst.write(chunk).unwrap(); // records split across writes
        }
        assert_eq!(src.read(&mut out, 1 << 20).unwrap(), 0);
        dst.set_state(DeviceState::Stop).unwrap();
        assert_eq!(src.digest(), dst.digest());
        assert_eq!((dst.steps(), dst.fails()), (src.steps(), 0));
        let mut b = [0u8; 8];
        dst.mmio_read(0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        let at = dst.steps();
        src.set_state(DeviceState::Running).unwrap();
        dst.set_state(DeviceState::Running).unwrap();
        wait_until("destination laps", || dst.steps() >= at + 40);
        wait_until("source laps", || src.steps() >= at + 40);
        assert_eq!((src.fails(), dst.fails()), (0, 0));
        dst.stop_thread();
        let stopped = dst.steps();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(dst.steps(), stopped, "thread gone");
    }

    #[test]
    fn a_lost_page_shows_up_as_a_fail() {
        let src = dev(2, "mem=16K"); // the mutator's ring is 2 pages
        src.start().unwrap();
        wait_until("steps", || src.steps() >= 3);
        let dst = resuming(2, "mem=16K");
        src.set_state(DeviceState::PreCopy).unwrap();
        dst.write(&drain(&src, 1 << 20)).unwrap();
        wait_until("a dirtied page", || src.precopy_info().dirty_bytes > 0);
        src.set_state(DeviceState::StopCopy).unwrap();
        let rest = drain(&src, 1 << 20);
        for (kind, a, b) in records(&rest) {
            if kind != Kind::Page.code() {
                dst.write(&rest[a..b]).unwrap();
            }
        }
        dst.set_state(DeviceState::Stop).unwrap();
        dst.set_state(DeviceState::Running).unwrap();
        dst.start().unwrap();
        wait_until("a fail", || dst.fails() > 0);
    }

    #[test]
    fn a_flipped_byte_is_an_error_naming_the_device() {
        let src = dev(3, "mem=16K");
        src.mmio_write(0, &[7; 64]);
        let stream = full_stream(&src);
        let n = stream.len();
        let positions = (0..64).chain((64..n - 64).step_by(29)).chain(n - 64..n);
        for pos in positions {
            let mut s = stream.clone();
            s[pos] ^= 0x20;
            let dst = resuming(3, "mem=16K");
            let e = match dst.write(&s) {
                Err(e) => e,
                Ok(()) => dst.set_state(DeviceState::Stop).unwrap_err(),
            };
            let msg = e.to_string();
            assert!(msg.starts_with("testdev3: "), "byte {pos}: {msg}");
        }
        let mut s = stream.clone();
        s[22 + 100] ^= 1; // inside the first page's data
        let dst = resuming(3, "mem=16K");
        let msg = dst.write(&s).unwrap_err().to_string();
        assert_eq!(
            msg,
            "testdev3: corrupt record at byte offset 22: checksum mismatch"
        );
        assert!(dst.write(&stream).is_err(), "stays failed");
    }

    #[test]
    fn a_truncated_stream_fails_at_stop() {
        let src = dev(0, "mem=16K");
        let stream = full_stream(&src);
        let n = stream.len();
        for cut in [0, 10, 22, 5000, n - 9, n - 1] {
            let dst = resuming(0, "mem=16K");
            dst.write(&stream[..cut]).unwrap();
            let msg = dst.set_state(DeviceState::Stop).unwrap_err().to_string();
            assert!(
                msg.starts_with("testdev0: truncated stream"),
                "{cut}: {msg}"
            );
        }
        let dst = resuming(0, "mem=16K");
        dst.write(&stream).unwrap();
        dst.set_state(DeviceState::Stop).unwrap();
    }

    #[test]
    fn streams_that_do_not_fit_are_refused() {
        let src = dev(0, "mem=16K");
        let stream = full_stream(&src);
        let header = &stream[..22];
        let write = |d: &TestDev, s: &[u8]| d.write(s).unwrap_err().to_string();
        let msg = write(&resuming(0, "mem=32K"), &stream);
        assert!(msg.starts_with("testdev0: wrong device size"), "{msg}");
        let msg = write(&resuming(1, "mem=16K"), &stream);
        assert_eq!(msg, "testdev1: the stream is of testdev0");
        let mut s = header.to_vec();
        put_record(&mut s, 9, &[b"new"]);
        let msg = write(&resuming(0, "mem=16K"), &s);
        assert_eq!(msg, "testdev0: unknown record kind 9 at byte offset 22");
        let mut s = header.to_vec();
        put_record(
            &mut s,
            Kind::Page.code(),
            &[&4u32.to_le_bytes(), &[0; PAGE]],
        );
        let msg = write(&resuming(0, "mem=16K"), &s);
        assert!(
            msg.contains("page 4 at byte offset 22 is out of range"),
            "{msg}"
        );
        let mut s = stream.clone();
        s.extend_from_slice(&[0]);
        let msg = write(&resuming(0, "mem=16K"), &s);
        assert!(msg.contains("after the END record"), "{msg}");
        let msg = write(&resuming(0, "mem=16K"), &stream[22..]);
        assert!(msg.contains("before the stream's HEADER"), "{msg}");
        let mut s = header.to_vec();
        s.extend_from_slice(header);
        assert!(write(&resuming(0, "mem=16K"), &s).contains("second HEADER"));
        let msg = write(&dev(0, "mem=16K"), &stream);
        assert_eq!(msg, "testdev0: write in state RUNNING");
        let d = dev(0, "mem=16K");
        let e = d
            .set_state(DeviceState::Resuming)
            .and(d.set_state(DeviceState::PreCopy));
        assert_eq!(
            e.unwrap_err().to_string(),
            "testdev0: cannot go from RESUMING to PRE_COPY"
        );
    }

    #[test]
    fn stop_pays_the_load_cost() {
        let src = dev(0, "mem=8K,load-ms=30");
        let stream = full_stream(&src);
        let dst = resuming(0, "mem=8K,load-ms=30");
        assert_eq!(dst.load_cost(), Duration::from_millis(30));
        dst.write(&stream).unwrap();
        let t = Instant::now();
        dst.set_state(DeviceState::Stop).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(dst.state(), DeviceState::Stop);
    }
}
