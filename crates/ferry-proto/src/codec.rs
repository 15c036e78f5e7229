//! Frame headers, body encoding and the bounds-checked decoder.

use std::io::{ErrorKind, Read};

use crate::message::{
    check_batch_pages, compressed_body_len, pages_body_len, runs_body_len, total_pages,
    DEVICE_INFO_MIN_LEN, FEATURE_LEN, REGION_LEN, RUN_LEN,
};
use crate::{
    ChannelRole, Codec, CpuFeature, DeviceInfo, Hello, MemRegion, Message, MessageKind, PageRun,
    ProtoError, Setup, Timeouts, VmDescription, FLAG_SUMMED, FRAME_HEADER_LEN, MAGIC,
    MAX_BATCH_PAGES, MAX_CPU_FEATURES, MAX_DEVICES, MAX_DEVICE_CHUNK, MAX_PLACED_WORDS,
    MAX_REGIONS, MAX_RUNS, MAX_STRING,
};

/// A decoded and checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Kind of the frame.
    pub kind: MessageKind,
    /// Length of the body that follows, already checked against
    /// [`MessageKind::max_body_len`].
    pub body_len: u32,
    /// The body is followed by the frame's checksum ([`FLAG_SUMMED`]).
    pub summed: bool,
}

/// Decodes a frame header: known kind, no flags but [`FLAG_SUMMED`], body
/// length within the kind's limit. Checking the length here, before the body is read, is what
/// keeps a lying header from costing memory.
pub fn decode_header(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, ProtoError> {
    let [k0, k1, f0, f1, l0, l1, l2, l3] = *bytes;
    let raw_kind = u16::from_le_bytes([k0, k1]);
    let flags = u16::from_le_bytes([f0, f1]);
    let body_len = u32::from_le_bytes([l0, l1, l2, l3]);
    let kind = MessageKind::from_u16(raw_kind).ok_or(ProtoError::UnknownKind(raw_kind))?;
    if flags & !FLAG_SUMMED != 0 {
        return Err(ProtoError::BadFlags(flags));
    }
    check_body_len(kind, u64::from(body_len))?;
    Ok(FrameHeader {
        kind,
        body_len,
        summed: flags & FLAG_SUMMED != 0,
    })
}

/// Decodes and validates the body of a frame of kind `kind`.
///
/// `body` must be exactly the body: bytes left after the last field are
/// [`ProtoError::TrailingBytes`]. A message returned here passes
/// [`Message::validate`].
pub fn decode_body(kind: MessageKind, body: &[u8]) -> Result<Message, ProtoError> {
    check_body_len(kind, len64(body.len()))?;
    let mut r = Reader { rest: body };
    let msg = match kind {
        MessageKind::Hello => Message::Hello(read_hello(&mut r)?),
        MessageKind::Welcome => Message::Welcome {
            version: r.u32("Welcome version")?,
            capabilities: r.u64("Welcome capabilities")?,
        },
        MessageKind::Setup => Message::Setup(read_setup(&mut r)?),
        MessageKind::Ack => Message::Ack {
            passes: r.u32("Ack passes")?,
            bytes: r.u64("Ack bytes")?,
        },
        MessageKind::Ping => Message::Ping {
            nonce: r.u64("Ping nonce")?,
        },
        MessageKind::Pong => Message::Pong {
            nonce: r.u64("Pong nonce")?,
        },
        MessageKind::SetupAccepted => Message::SetupAccepted,
        MessageKind::Refuse => Message::Refuse {
            reason: r.string("Refuse reason")?,
        },
        MessageKind::Pages => {
            let pass = r.u32("Pages pass")?;
            let runs = read_runs(&mut r, "Pages run count", "Pages run")?;
            // Checked before validate() so the limit error is the one reported.
            check_batch_pages(total_pages(&runs))?;
            let sums = read_sums(&mut r, "Pages sum count")?;
            Message::Pages { pass, runs, sums }
        }
        MessageKind::Compressed => read_compressed(&mut r)?,
        MessageKind::ZeroPages => Message::ZeroPages {
            pass: r.u32("ZeroPages pass")?,
            runs: read_runs(&mut r, "ZeroPages run count", "ZeroPages run")?,
        },
        MessageKind::PassEnd => Message::PassEnd {
            pass: r.u32("PassEnd pass")?,
            pages: r.u64("PassEnd pages")?,
        },
        MessageKind::DeviceData => Message::DeviceData {
            device: r.u16("DeviceData device")?,
            seq: r.u32("DeviceData seq")?,
            flags: r.u8("DeviceData flags")?,
            data: r.blob("DeviceData length", MAX_DEVICE_CHUNK, "DeviceData data")?,
        },
        MessageKind::DevicesReady => Message::DevicesReady,
        MessageKind::Complete => Message::Complete {
            final_pass: r.u32("Complete final_pass")?,
        },
        MessageKind::Prepared => Message::Prepared {
            prepare_us: r.u64("Prepared prepare_us")?,
            threads: r.u32("Prepared threads")?,
        },
        MessageKind::Loaded => Message::Loaded {
            load_us: r.u64("Loaded load_us")?,
        },
        MessageKind::Go => Message::Go,
        MessageKind::Running => Message::Running {
            resume_us: r.u64("Running resume_us")?,
        },
        MessageKind::Error => Message::Error {
            reason: r.string("Error reason")?,
        },
        MessageKind::LocalMemory => read_local_memory(&mut r)?,
        MessageKind::MemoryAdopted => Message::MemoryAdopted {
            adopt_us: r.u64("MemoryAdopted adopt_us")?,
        },
        MessageKind::Discard => Message::Discard {
            early: r.flag("Discard early")?,
            runs: read_runs(&mut r, "Discard run count", "Discard run")?,
        },
        MessageKind::Discarded => Message::Discarded {
            discard_us: r.u64("Discarded discard_us")?,
        },
        MessageKind::Postcopy => Message::Postcopy {
            pass: r.u32("Postcopy pass")?,
        },
        MessageKind::PageRequest => Message::PageRequest {
            seq: r.u32("PageRequest seq")?,
            runs: read_runs(&mut r, "PageRequest run count", "PageRequest run")?,
        },
        MessageKind::Placed => read_placed(&mut r)?,
        MessageKind::PostcopyDone => Message::PostcopyDone {
            faults: r.u64("PostcopyDone faults")?,
            requested: r.u64("PostcopyDone requested")?,
            p50_us: r.u64("PostcopyDone p50_us")?,
            p99_us: r.u64("PostcopyDone p99_us")?,
            max_us: r.u64("PostcopyDone max_us")?,
        },
    };
    if !r.rest.is_empty() {
        return Err(ProtoError::TrailingBytes {
            kind,
            extra: r.rest.len(),
        });
    }
    msg.validate()?;
    Ok(msg)
}

/// Reads one frame (header + body, not the Pages payload) from `r`, reusing
/// `scratch` for the body.
///
/// Never allocates more than the kind's limit, and grows `scratch` only as
/// body bytes actually arrive, so a header claiming a large body followed
/// by nothing costs little. A clean EOF before the first header byte is
/// [`ProtoError::Eof`]; EOF anywhere later is [`ProtoError::Truncated`].
pub fn read_message<R: Read>(r: &mut R, scratch: &mut Vec<u8>) -> Result<Message, ProtoError> {
    read_message_checked(r, scratch, false)
}

/// Like [`read_message`]; a frame's checksum, when it has one, is always verified, and
/// with `require_sum` a frame without one is refused ([`ProtoError::MissingSum`]): once
/// checksums are agreed, a cleared flag bit must not switch them off.
pub fn read_message_checked<R: Read>(
    r: &mut R,
    scratch: &mut Vec<u8>,
    require_sum: bool,
) -> Result<Message, ProtoError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(ProtoError::Eof);
    }
    if got < FRAME_HEADER_LEN {
        return Err(ProtoError::Truncated {
            what: "frame header",
            needed: len64(FRAME_HEADER_LEN),
            available: len64(got),
        });
    }
    let h = decode_header(&header)?;
    read_body(r, h, scratch)?;
    if h.summed {
        let mut sum = [0u8; 8];
        if read_full(r, &mut sum)? < sum.len() {
            return Err(ProtoError::Truncated {
                what: "frame checksum",
                needed: 8,
                available: 0,
            });
        }
        if u64::from_le_bytes(sum) != frame_sum(&header, scratch) {
            return Err(ProtoError::BadSum { kind: h.kind });
        }
    } else if require_sum {
        return Err(ProtoError::MissingSum { kind: h.kind });
    }
    decode_body(h.kind, scratch)
}

/// The checksum of a frame: xxh3-64 of its header (flags included) and body.
fn frame_sum(header: &[u8], body: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(header);
    h.update(body);
    h.digest()
}

/// Marks the frame that starts at `out[start]` as summed and appends its checksum.
pub(crate) fn seal(out: &mut Vec<u8>, start: usize) {
    if let Some([_, _, f0, f1, ..]) = out.get_mut(start..) {
        [*f0, *f1] = FLAG_SUMMED.to_le_bytes();
    }
    let (header, body) = out
        .get(start..)
        .unwrap_or_default()
        .split_at_checked(FRAME_HEADER_LEN)
        .unwrap_or_default();
    let sum = frame_sum(header, body);
    put_u64(out, sum);
}

/// Encodes a Pages header for `runs` straight into `out` without building a
/// [`Message`] (hot path of the sender). The caller then writes the pages'
/// bytes, `sum(run.pages) * PAGE_SIZE` of them.
///
/// Like [`Message::encode`], more than [`MAX_RUNS`] runs or
/// [`crate::MAX_BATCH_PAGES`] pages is a programming error: debug builds
/// panic, release builds send a frame the peer rejects.
///
/// `sums` are the pages' checksums (or none); with `sum` the frame carries its own.
pub fn encode_pages_header(
    pass: u32,
    runs: &[PageRun],
    sums: &[u64],
    sum: bool,
    out: &mut Vec<u8>,
) {
    debug_assert!(
        len64(runs.len()) <= u64::from(MAX_RUNS) && check_batch_pages(total_pages(runs)).is_ok(),
        "encoding an oversized Pages frame: {} runs, {} pages",
        runs.len(),
        total_pages(runs)
    );
    let start = out.len();
    put_header(out, MessageKind::Pages, pages_body_len(runs, sums.len()));
    put_runs(out, pass, runs);
    put_sums(out, sums);
    if sum {
        seal(out, start);
    }
}

/// Encodes a ZeroPages frame for `runs` straight into `out` without building
/// a [`Message`]. More than [`MAX_RUNS`] runs is a programming error, as for
/// [`encode_pages_header`].
pub fn encode_zero_header(pass: u32, runs: &[PageRun], sum: bool, out: &mut Vec<u8>) {
    debug_assert!(
        len64(runs.len()) <= u64::from(MAX_RUNS),
        "encoding an oversized ZeroPages frame: {} runs",
        runs.len()
    );
    let start = out.len();
    put_header(out, MessageKind::ZeroPages, runs_body_len(runs));
    put_runs(out, pass, runs);
    if sum {
        seal(out, start);
    }
}

/// Encodes a Compressed frame straight into `out`; `len` compressed bytes follow it. The
/// limits are those of [`encode_pages_header`].
pub fn encode_compressed_header(
    pass: u32,
    runs: &[PageRun],
    codec: Codec,
    sums: &[u64],
    len: u32,
    sum: bool,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    put_header(
        out,
        MessageKind::Compressed,
        compressed_body_len(runs, sums.len()),
    );
    put_compressed(out, pass, runs, codec, sums, len);
    if sum {
        seal(out, start);
    }
}

/// `usize` to `u64` without a cast that could truncate on exotic targets.
pub(crate) fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn check_body_len(kind: MessageKind, len: u64) -> Result<(), ProtoError> {
    let max = u64::from(kind.max_body_len());
    if len > max {
        return Err(ProtoError::TooLong { kind, len, max });
    }
    Ok(())
}

/// First allocation for a body; later growth doubles with the bytes read.
const BODY_CHUNK: usize = 64 << 10;

/// Reads exactly `h.body_len` bytes into `scratch` (cleared first).
fn read_body<R: Read>(r: &mut R, h: FrameHeader, scratch: &mut Vec<u8>) -> Result<(), ProtoError> {
    let len = usize::try_from(h.body_len).unwrap_or(usize::MAX);
    scratch.clear();
    while scratch.len() < len {
        // Grow with what has arrived, never past `len` (itself within the
        // kind's limit): a lying header costs at most one chunk.
        let target = len.min(scratch.len().saturating_mul(2).max(BODY_CHUNK));
        let want = target.saturating_sub(scratch.len());
        // Exact reservation, then read_to_end bounded by take(): it fills
        // the spare capacity without zeroing it first and, as the buffer
        // fits exactly, never grows it.
        scratch.reserve_exact(want);
        let got = r.by_ref().take(len64(want)).read_to_end(scratch)?;
        if got < want {
            return Err(ProtoError::Truncated {
                what: body_what(h.kind),
                needed: u64::from(h.body_len),
                available: len64(scratch.len()),
            });
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtoError> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            // min() guards against a reader that over-reports.
            Ok(n) => filled = filled.saturating_add(n.min(rest.len())),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    Ok(filled)
}

/// A `LocalMemory` body: flags (bit 0: locked; others must be 0), count, offsets.
fn read_local_memory(r: &mut Reader<'_>) -> Result<Message, ProtoError> {
    let flags = r.u32("LocalMemory flags")?;
    if flags > 1 {
        return Err(ProtoError::Invalid {
            what: "LocalMemory flags",
            detail: format!("{flags:#x} has unknown bits (only bit 0, locked, is defined)"),
        });
    }
    let count = r.u32("LocalMemory offset count")?;
    if count > MAX_REGIONS {
        return Err(ProtoError::TooMany {
            what: "LocalMemory offset count",
            count: u64::from(count),
            max: u64::from(MAX_REGIONS),
        });
    }
    let offsets = (0..count)
        .map(|_| r.u64("LocalMemory offset"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Message::LocalMemory {
        locked: flags == 1,
        offsets,
    })
}

fn read_placed(r: &mut Reader<'_>) -> Result<Message, ProtoError> {
    let first_page = r.u64("Placed first_page")?;
    let last = r.flag("Placed last")?;
    let count = r.count("Placed word count", MAX_PLACED_WORDS, 8)?;
    let words = (0..count)
        .map(|_| r.u64("Placed word"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Message::Placed {
        first_page,
        last,
        words,
    })
}

/// Name of a kind's body, for truncation errors (must be `'static`).
fn body_what(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Hello => "Hello frame body",
        MessageKind::Welcome => "Welcome frame body",
        MessageKind::Setup => "Setup frame body",
        MessageKind::SetupAccepted => "SetupAccepted frame body",
        MessageKind::Refuse => "Refuse frame body",
        MessageKind::Pages => "Pages frame body",
        MessageKind::ZeroPages => "ZeroPages frame body",
        MessageKind::PassEnd => "PassEnd frame body",
        MessageKind::DeviceData => "DeviceData frame body",
        MessageKind::DevicesReady => "DevicesReady frame body",
        MessageKind::Complete => "Complete frame body",
        MessageKind::Prepared => "Prepared frame body",
        MessageKind::Loaded => "Loaded frame body",
        MessageKind::Go => "Go frame body",
        MessageKind::Running => "Running frame body",
        MessageKind::Error => "Error frame body",
        MessageKind::Ack => "Ack frame body",
        MessageKind::Ping => "Ping frame body",
        MessageKind::Pong => "Pong frame body",
        MessageKind::LocalMemory => "LocalMemory frame body",
        MessageKind::MemoryAdopted => "MemoryAdopted frame body",
        MessageKind::Compressed => "Compressed frame body",
        MessageKind::Discard => "Discard frame body",
        MessageKind::Discarded => "Discarded frame body",
        MessageKind::Postcopy => "Postcopy frame body",
        MessageKind::PageRequest => "PageRequest frame body",
        MessageKind::PostcopyDone => "PostcopyDone frame body",
        MessageKind::Placed => "Placed frame body",
    }
}

/// Cursor over a body; every read is bounds checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or_else(|| self.truncated(what, len64(n)))?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated(what, len64(N)))?;
        self.rest = tail;
        Ok(*head)
    }

    fn truncated(&self, what: &'static str, needed: u64) -> ProtoError {
        ProtoError::Truncated {
            what,
            needed,
            available: len64(self.rest.len()),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        self.array::<1>(what).map(u8::from_le_bytes)
    }

    /// A byte that must be 0 or 1 (so every message has one encoding).
    fn flag(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::Invalid {
                what,
                detail: format!("{v} is neither 0 nor 1"),
            }),
        }
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a vector count and checks it against `max` and against the
    /// bytes left (each item takes at least `min_item` bytes), so the
    /// caller may allocate `count` items.
    fn count(&mut self, what: &'static str, max: u32, min_item: u64) -> Result<usize, ProtoError> {
        let count = self.u32(what)?;
        if count > max {
            return Err(ProtoError::TooMany {
                what,
                count: u64::from(count),
                max: u64::from(max),
            });
        }
        let needed = u64::from(count).saturating_mul(min_item);
        if needed > len64(self.rest.len()) {
            return Err(self.truncated(what, needed));
        }
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// `u32` length + UTF-8, at most [`MAX_STRING`] bytes.
    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u32(what)?;
        if len > MAX_STRING {
            return Err(ProtoError::StringTooLong {
                what,
                len: u64::from(len),
                max: u64::from(MAX_STRING),
            });
        }
        let raw = self.bytes(usize::try_from(len).unwrap_or(usize::MAX), what)?;
        let s = std::str::from_utf8(raw).map_err(|_| ProtoError::BadUtf8 { what })?;
        Ok(s.to_owned())
    }
    /// `u32` length + bytes, at most `max`; the length is checked against `max` and what
    /// is left before the copy.
    fn blob(
        &mut self,
        len_what: &'static str,
        max: u32,
        what: &'static str,
    ) -> Result<Vec<u8>, ProtoError> {
        let len = self.u32(len_what)?;
        if len > max {
            return Err(ProtoError::TooMany {
                what: len_what,
                count: u64::from(len),
                max: u64::from(max),
            });
        }
        Ok(self
            .bytes(usize::try_from(len).unwrap_or(usize::MAX), what)?
            .to_vec())
    }
}

fn read_hello(r: &mut Reader<'_>) -> Result<Hello, ProtoError> {
    if r.array::<8>("Hello magic")? != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    // No version check: the layout is frozen so the engine can refuse a
    // peer of another version with a clear message.
    let version = r.u32("Hello version")?;
    let capabilities = r.u64("Hello capabilities")?;
    let session = r.u64("Hello session")?;
    let role = r.u8("Hello role")?;
    let index = r.u16("Hello channel index")?;
    let data_channels = r.u16("Hello data_channels")?;
    let role = match role {
        0 if index == 0 => ChannelRole::Main,
        // One encoding per message: the main channel's index is always 0.
        0 => {
            return Err(ProtoError::Invalid {
                what: "Hello channel index",
                detail: format!("{index} for the main channel (must be 0)"),
            })
        }
        1 => ChannelRole::Data { index },
        2 if index == 0 => ChannelRole::Urgent,
        2 => {
            return Err(ProtoError::Invalid {
                what: "Hello channel index",
                detail: format!("{index} for the urgent channel (must be 0)"),
            })
        }
        other => {
            return Err(ProtoError::Invalid {
                what: "Hello role",
                detail: format!("{other} is not a channel role (0 main, 1 data, 2 urgent)"),
            })
        }
    };
    Ok(Hello {
        version,
        capabilities,
        session,
        role,
        data_channels,
    })
}

fn read_setup(r: &mut Reader<'_>) -> Result<Setup, ProtoError> {
    let vcpus = r.u32("Setup vcpus")?;
    let page_size = r.u32("Setup page_size")?;
    let n = r.count("Setup region count", MAX_REGIONS, REGION_LEN)?;
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(MemRegion {
            gpa: r.u64("Setup region gpa")?,
            size: r.u64("Setup region size")?,
        });
    }
    let n = r.count("Setup cpu feature count", MAX_CPU_FEATURES, FEATURE_LEN)?;
    let mut cpu_features = Vec::with_capacity(n);
    for _ in 0..n {
        cpu_features.push(CpuFeature {
            leaf: r.u32("Setup cpu feature leaf")?,
            subleaf: r.u32("Setup cpu feature subleaf")?,
            regs: [
                r.u32("Setup cpu feature eax")?,
                r.u32("Setup cpu feature ebx")?,
                r.u32("Setup cpu feature ecx")?,
                r.u32("Setup cpu feature edx")?,
            ],
        });
    }
    let timeouts = Timeouts {
        progress_ms: r.u32("Setup progress timeout")?,
        switchover_ms: r.u32("Setup switchover timeout")?,
    };
    let devices = read_devices(r)?;
    let parallel_devices = r.flag("Setup parallel_devices")?;
    Ok(Setup {
        vm: VmDescription {
            vcpus,
            page_size,
            regions,
            cpu_features,
        },
        timeouts,
        devices,
        parallel_devices,
    })
}

fn read_runs(
    r: &mut Reader<'_>,
    count_what: &'static str,
    what: &'static str,
) -> Result<Vec<PageRun>, ProtoError> {
    let n = r.count(count_what, MAX_RUNS, RUN_LEN)?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        runs.push(PageRun {
            gpa: r.u64(what)?,
            pages: r.u32(what)?,
        });
    }
    Ok(runs)
}

fn read_sums(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u64>, ProtoError> {
    let n = r.count(what, MAX_BATCH_PAGES, 8)?;
    (0..n).map(|_| r.u64("page checksum")).collect()
}

fn read_compressed(r: &mut Reader<'_>) -> Result<Message, ProtoError> {
    let pass = r.u32("Compressed pass")?;
    let runs = read_runs(r, "Compressed run count", "Compressed run")?;
    check_batch_pages(total_pages(&runs))?;
    let raw = r.u8("Compressed codec")?;
    let codec = Codec::from_u8(raw).ok_or_else(|| ProtoError::Invalid {
        what: "Compressed codec",
        detail: format!("unknown codec {raw} (known: 1 zstd, 2 lz4)"),
    })?;
    let sums = read_sums(r, "Compressed sum count")?;
    let len = r.u32("Compressed len")?;
    Ok(Message::Compressed {
        pass,
        runs,
        codec,
        sums,
        len,
    })
}

fn read_devices(r: &mut Reader<'_>) -> Result<Vec<DeviceInfo>, ProtoError> {
    let n = r.count("Setup device count", MAX_DEVICES, DEVICE_INFO_MIN_LEN)?;
    let mut devices = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.string("Setup device name")?;
        let config = r.blob(
            "Setup device config length",
            MAX_STRING,
            "Setup device config",
        )?;
        devices.push(DeviceInfo { name, config });
    }
    Ok(devices)
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a `u32` length or count; past `u32::MAX` it saturates, which the
/// peer rejects (oversized input is documented as a sender bug).
fn put_len(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}

pub(crate) fn put_header(out: &mut Vec<u8>, kind: MessageKind, body_len: u64) {
    put_u16(out, kind as u16);
    put_u16(out, 0);
    put_u32(out, u32::try_from(body_len).unwrap_or(u32::MAX));
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_hello(out: &mut Vec<u8>, h: &Hello) {
    out.extend_from_slice(&MAGIC);
    put_u32(out, h.version);
    put_u64(out, h.capabilities);
    put_u64(out, h.session);
    let (role, index) = match h.role {
        ChannelRole::Main => (0, 0),
        ChannelRole::Data { index } => (1, index),
        ChannelRole::Urgent => (2, 0),
    };
    put_u8(out, role);
    put_u16(out, index);
    put_u16(out, h.data_channels);
}

pub(crate) fn put_setup(out: &mut Vec<u8>, s: &Setup) {
    let d = &s.vm;
    put_u32(out, d.vcpus);
    put_u32(out, d.page_size);
    put_len(out, d.regions.len());
    for r in &d.regions {
        put_u64(out, r.gpa);
        put_u64(out, r.size);
    }
    put_len(out, d.cpu_features.len());
    for f in &d.cpu_features {
        put_u32(out, f.leaf);
        put_u32(out, f.subleaf);
        for reg in f.regs {
            put_u32(out, reg);
        }
    }
    put_u32(out, s.timeouts.progress_ms);
    put_u32(out, s.timeouts.switchover_ms);
    put_len(out, s.devices.len());
    for d in &s.devices {
        put_str(out, &d.name);
        put_len(out, d.config.len());
        out.extend_from_slice(&d.config);
    }
    put_u8(out, u8::from(s.parallel_devices));
}

pub(crate) fn put_runs(out: &mut Vec<u8>, pass: u32, runs: &[PageRun]) {
    put_u32(out, pass);
    put_run_list(out, runs);
}

/// A run count, then the runs.
pub(crate) fn put_run_list(out: &mut Vec<u8>, runs: &[PageRun]) {
    put_len(out, runs.len());
    for r in runs {
        put_u64(out, r.gpa);
        put_u32(out, r.pages);
    }
}

pub(crate) fn put_sums(out: &mut Vec<u8>, sums: &[u64]) {
    put_len(out, sums.len());
    for s in sums {
        put_u64(out, *s);
    }
}

pub(crate) fn put_compressed(
    out: &mut Vec<u8>,
    pass: u32,
    runs: &[PageRun],
    codec: Codec,
    sums: &[u64],
    len: u32,
) {
    put_runs(out, pass, runs);
    put_u8(out, codec as u8);
    put_sums(out, sums);
    put_u32(out, len);
}

pub(crate) fn put_device_data(out: &mut Vec<u8>, device: u16, seq: u32, flags: u8, data: &[u8]) {
    put_u16(out, device);
    put_u32(out, seq);
    put_u8(out, flags);
    put_len(out, data.len());
    out.extend_from_slice(data);
}
