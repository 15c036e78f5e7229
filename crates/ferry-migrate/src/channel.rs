//! How pages travel on a data channel once the handshake has agreed on it: with a checksum
//! per page (unless TLS already authenticates every byte), and compressed or not.
//!
//! Checksums are xxh3-64 per page ([`ferry_proto::page_sum`]); frames carry their own (see
//! [`ferry_proto::FLAG_SUMMED`]). `ferry-bench checksum` measures the candidates on this
//! machine: xxh3 costs a fraction of crc32 per byte, so it is the one used.
//!
//! A page sent straight from guest memory is hashed before the kernel copies it, and the
//! running guest may write it in between; then its checksum does not match on arrival.
//! Such a page is always sent again (the write was caught by the dirty log, which was
//! cleared before the page was read), so the destination only marks it suspect, and fails
//! the migration if a suspect page is still unconfirmed when the last pass has arrived. A
//! compressed batch is hashed from the copy that is compressed, so a mismatch there is
//! corruption at once.

use std::str::FromStr;
use std::time::Duration;

use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{caps, page_sum, Codec, PageRun, MAX_BATCH_PAGES};

use crate::error::MigrateError;
use crate::policy::{cheapest, Way};

/// What `--compress` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Pages go as they are.
    #[default]
    Off,
    /// zstd at this level (1-19).
    Zstd(i32),
    /// LZ4.
    Lz4,
    /// Per channel and batch, the cheapest of raw, LZ4 and zstd level 1: each one's
    /// measured cost per byte (hashing for raw pages; copy, hashing and compression for the
    /// others) plus the wire time of what it sends (`policy::cheapest`). The ways not taken are
    /// measured again now and then, less often the longer the choice stands (from every
    /// [`FIRST_PROBE_GAP`] batches to every [`MAX_PROBE_GAP`]) and the costlier they are
    /// (a way k times the best's cost waits k times longer, up to 16). Raw is not probed
    /// while the best costs less than raw's floor (hashing and the cheapest raw write in
    /// CPU time). Hashing and compression costs are the channel thread's CPU time.
    Auto,
}

/// Batches before a way `auto` is not taking is tried again, after a change of choice.
pub const FIRST_PROBE_GAP: u64 = 32;
/// Most batches between two trials of a way `auto` is not taking.
pub const MAX_PROBE_GAP: u64 = 1024;

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        let bad = || format!("'{s}': expected none, lz4, zstd, zstd:LEVEL (1-19) or auto");
        match s {
            "none" | "off" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(1)),
            "auto" => Ok(Compression::Auto),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                match level.parse::<i32>() {
                    Ok(l) if (1..=19).contains(&l) => Ok(Compression::Zstd(l)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Auto => f.write_str("auto"),
        }
    }
}

impl Compression {
    /// The codec it always uses, if it is a fixed one.
    pub fn codec(self) -> Option<Codec> {
        match self {
            Compression::Off | Compression::Auto => None,
            Compression::Zstd(_) => Some(Codec::Zstd),
            Compression::Lz4 => Some(Codec::Lz4),
        }
    }

    /// The capability bits of the codecs it may use.
    fn caps(self) -> u64 {
        match self {
            Compression::Off => 0,
            Compression::Zstd(_) => caps::ZSTD,
            Compression::Lz4 => caps::LZ4,
            Compression::Auto => caps::ZSTD | caps::LZ4,
        }
    }

    fn level(self) -> i32 {
        match self {
            Compression::Zstd(l) => l,
            _ => 1,
        }
    }
}

/// What the handshake agreed for pages and frames.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wire {
    /// Frames carry checksums, pages too.
    pub(crate) sums: bool,
    /// How the source compresses (on the destination: [`Compression::Off`]).
    pub(crate) compression: Compression,
    /// Capability bits of the codecs Compressed frames may use.
    codecs: u64,
}

impl Wire {
    /// The capability bits a source offers for these settings.
    pub(crate) fn offer(checksums: bool, compression: Compression) -> u64 {
        let sums = if checksums { caps::PAGE_SUMS } else { 0 };
        sums | compression.caps()
    }

    /// What a source that asked for `compression` gets with the destination's `accepted`
    /// capabilities.
    pub(crate) fn agreed(accepted: u64, compression: Compression) -> Result<Wire, MigrateError> {
        let wanted = compression.caps();
        if accepted & wanted != wanted {
            return Err(MigrateError::CompressionRefused {
                asked: compression.to_string(),
            });
        }
        Ok(Wire {
            sums: accepted & caps::PAGE_SUMS != 0,
            compression,
            codecs: wanted,
        })
    }

    /// What a destination accepts from a source that offered `offered`.
    pub(crate) fn accepted(offered: u64) -> Wire {
        Wire {
            sums: offered & caps::PAGE_SUMS != 0,
            compression: Compression::Off,
            codecs: offered & (caps::ZSTD | caps::LZ4),
        }
    }

    /// Whether Compressed frames of `codec` were agreed.
    pub(crate) fn allows(&self, codec: Codec) -> bool {
        let bit = match codec {
            Codec::Zstd => caps::ZSTD,
            Codec::Lz4 => caps::LZ4,
        };
        self.codecs & bit != 0
    }
}

/// Appends the checksum of every page of `runs` in guest memory to `out`, hashed in place
/// (the same value as [`page_sum`] of its bytes).
pub(crate) fn sum_guest_pages(
    ram: &GuestRam,
    runs: &[PageRun],
    out: &mut Vec<u64>,
) -> Result<(), MigrateError> {
    for r in runs {
        ram.page_sums(r.gpa, u64::from(r.pages), out)?;
    }
    Ok(())
}

/// Appends the checksum of every page of `bytes` to `out`.
pub(crate) fn sum_pages(bytes: &[u8], out: &mut Vec<u64>) {
    out.extend(bytes.chunks(PAGE_SIZE as usize).map(page_sum));
}

/// Bytes of the largest batch of data pages.
pub(crate) const MAX_BATCH_BYTES: usize = MAX_BATCH_PAGES as usize * PAGE_SIZE as usize;

/// A zeroed buffer of `len` bytes whose pages are already faulted in, so the first batch
/// through it does not pay for that (and `auto` does not charge it to its codec).
pub(crate) fn prefaulted(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // A zeroed allocation is mapped lazily; writing one byte per page faults it in (the
    // value is hidden from the optimiser, which would otherwise drop a store of zero).
    for b in v.iter_mut().step_by(PAGE_SIZE as usize) {
        *b = std::hint::black_box(0);
    }
    v
}

/// Copies the pages of `runs` out of guest memory into `buf` (replacing its contents).
pub(crate) fn copy_guest_pages(
    ram: &GuestRam,
    runs: &[PageRun],
    buf: &mut Vec<u8>,
) -> Result<(), MigrateError> {
    let lens = || {
        runs.iter()
            .map(|r| (u64::from(r.pages) * PAGE_SIZE) as usize)
    };
    // Kept at its length between batches, so only growth is zero-filled, not every batch.
    buf.resize(lens().sum(), 0);
    let mut at = 0;
    for (r, len) in runs.iter().zip(lens()) {
        let s = ram.slice(r.gpa, len)?;
        s.copy_to(buf.get_mut(at..at + len).unwrap_or_default());
        at += len;
    }
    Ok(())
}

/// CPU time this thread spent since it was started: what `auto` charges a way for its
/// work. Wall time would also count the time the thread waited for a CPU, which on a busy
/// host is often many times the work itself and would make one unlucky sample rule a way
/// out for thousands of batches.
pub(crate) struct CpuTimer(Duration);

fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl CpuTimer {
    pub(crate) fn start() -> CpuTimer {
        CpuTimer(thread_cpu_time())
    }

    pub(crate) fn elapsed(&self) -> Duration {
        thread_cpu_time().saturating_sub(self.0)
    }
}

/// A channel's compressors, their buffer and (for `auto`) its measurements.
pub(crate) struct Packer {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
    auto: Option<Auto>,
}

impl Packer {
    pub(crate) fn new(compression: Compression) -> Result<Option<Packer>, MigrateError> {
        if compression == Compression::Off {
            return Ok(None);
        }
        let zstd = match compression {
            Compression::Zstd(_) | Compression::Auto => Some(
                zstd::bulk::Compressor::new(compression.level())
                    .map_err(MigrateError::io("starting a zstd compressor"))?,
            ),
            _ => None,
        };
        Ok(Some(Packer {
            compression,
            zstd,
            out: prefaulted(
                zstd::zstd_safe::compress_bound(MAX_BATCH_BYTES)
                    .max(lz4_flex::block::get_maximum_output_size(MAX_BATCH_BYTES)),
            ),
            auto: (compression == Compression::Auto).then(Auto::default),
        }))
    }

    /// How to send the next batch: compressed with this codec, or raw (`None`).
    pub(crate) fn choose(&mut self) -> Option<Codec> {
        match &mut self.auto {
            Some(a) => a.choose(),
            None => self.compression.codec(),
        }
    }

    /// The last compression's output, `len` bytes long.
    pub(crate) fn output(&self, len: usize) -> &[u8] {
        self.out.get(..len).unwrap_or_default()
    }

    /// Compresses `input` with `codec` into [`Packer::output`]; its length, or `None` when
    /// it would not be smaller than the input.
    pub(crate) fn compress(
        &mut self,
        codec: Codec,
        input: &[u8],
    ) -> Result<Option<usize>, MigrateError> {
        let bound = match codec {
            Codec::Zstd => zstd::zstd_safe::compress_bound(input.len()),
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(input.len()),
        };
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let n = match (codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(z)) => z
                .compress_to_buffer(input, &mut self.out[..])
                .map_err(MigrateError::io("compressing pages (zstd)"))?,
            (Codec::Zstd, None) => {
                let e = std::io::Error::other("no zstd compressor on this channel");
                return Err(MigrateError::io("compressing pages")(e));
            }
            (Codec::Lz4, _) => {
                lz4_flex::block::compress_into(input, &mut self.out[..]).map_err(|e| {
                    MigrateError::io("compressing pages (lz4)")(std::io::Error::other(e))
                })?
            }
        };
        Ok((n < input.len()).then_some(n))
    }

    /// Records what copying and compressing `raw` bytes into `packed` cost (for `auto`).
    pub(crate) fn compressed(&mut self, codec: Codec, took: Duration, raw: usize, packed: usize) {
        if let Some(a) = &mut self.auto {
            a.compressed(codec, took, raw, packed);
        }
    }

    /// Records how long writing `bytes` raw bytes to the socket took (`took`, wall time)
    /// and what it cost this thread's CPU (`copied`: the copy into the kernel, and the
    /// encryption with TLS, without any wait for room), and `prepared`, what preparing them
    /// cost before (hashing them) (for `auto`).
    pub(crate) fn wrote_raw(
        &mut self,
        prepared: Duration,
        took: Duration,
        copied: Duration,
        bytes: usize,
    ) {
        if let Some(a) = &mut self.auto {
            a.wrote_raw(prepared, took, copied, bytes);
        }
    }

    /// The most pages the next batch should hold: a small batch for `auto`'s first raw
    /// measurement (it only needs the cost of hashing and copying; a whole raw batch on a
    /// slow link would hold the channel for its link time, 8 ms per MiB at 1 Gbit/s),
    /// else [`MAX_BATCH_PAGES`].
    pub(crate) fn batch_pages(&self) -> u32 {
        match &self.auto {
            Some(a) if !a.arms[RAW].warm(RAW) => FIRST_RAW_PAGES,
            _ => MAX_BATCH_PAGES,
        }
    }

    /// Whether costs and [`Packer::drained`] samples are wanted (`auto` only).
    pub(crate) fn measures_link(&self) -> bool {
        self.auto.is_some()
    }

    /// Records that the socket's send queue, never empty meanwhile, drained `bytes` in
    /// `took`: the link's (or the peer's) rate, whatever the buffer sizes (for `auto`).
    pub(crate) fn drained(&mut self, took: Duration, bytes: u64) {
        if let Some(a) = &mut self.auto {
            a.drained(took, bytes);
        }
    }
}

/// Pages in `auto`'s first raw batch on a channel (64 KiB).
const FIRST_RAW_PAGES: u32 = 16;

/// Indices of `auto`'s ways.
const RAW: usize = 0;
const LZ4: usize = 1;
const ZSTD: usize = 2;

/// One way of `auto`: its running estimate and when to try it again.
#[derive(Debug, Default, Clone, Copy)]
struct Arm {
    way: Way,
    /// Samples taken so far.
    samples: u32,
    next_probe: u64,
    gap: u64,
}

/// Samples a codec takes before its estimate stands: its first batch pays for warming up
/// (zstd's tables, caches) at several times its cost, and one such sample would keep it
/// out for hundreds of batches.
const CODEC_WARMUP: u32 = 2;

impl Arm {
    /// Whether way `i` has been measured enough to be compared.
    fn warm(&self, i: usize) -> bool {
        self.samples >= if i == RAW { 1 } else { CODEC_WARMUP }
    }
}

/// `auto`'s running estimates on one channel (exponential averages).
#[derive(Debug)]
struct Auto {
    arms: [Arm; 3],
    /// Writing raw bytes into the socket, ns per byte: the copy into the kernel, or the
    /// link once the socket's buffer is full.
    write_ns_per_byte: f64,
    /// The send queue draining while not empty, ns per byte: the link (or the peer) itself.
    /// A raw write into an empty buffer costs no time now but that much later.
    link_ns_per_byte: Option<f64>,
    /// The cheapest raw write seen in CPU time, ns per byte: the copy into the kernel (and
    /// the encryption, with TLS), which no link, however fast, takes away.
    min_write_ns_per_byte: Option<f64>,
    batches: u64,
    best: usize,
}

impl Default for Auto {
    fn default() -> Auto {
        let mut arms = [Arm {
            gap: FIRST_PROBE_GAP,
            next_probe: FIRST_PROBE_GAP,
            ..Arm::default()
        }; 3];
        arms[RAW].way = Way {
            cost_ns_per_byte: 0.0,
            ratio: 1.0,
        };
        Auto {
            arms,
            write_ns_per_byte: 0.0,
            link_ns_per_byte: None,
            min_write_ns_per_byte: None,
            batches: 0,
            best: RAW,
        }
    }
}

/// Most a probe's gap is stretched for a way far costlier than the best.
const MAX_PROBE_PENALTY: u64 = 16;

/// How many times longer to wait before probing a way that costs `cost` per byte while the
/// best costs `best`: their ratio, from 1 to [`MAX_PROBE_PENALTY`].
fn probe_penalty(cost: f64, best: f64) -> u64 {
    if !(cost.is_finite() && best.is_finite()) || best <= 0.0 {
        return 1;
    }
    (cost / best).clamp(1.0, MAX_PROBE_PENALTY as f64) as u64
}

/// Weight of a new sample in the running averages.
const ALPHA: f64 = 0.25;

fn blend(old: f64, new: f64, first: bool) -> f64 {
    if first {
        new
    } else {
        old + ALPHA * (new - old)
    }
}

fn codec_of(arm: usize) -> Option<Codec> {
    match arm {
        LZ4 => Some(Codec::Lz4),
        ZSTD => Some(Codec::Zstd),
        _ => None,
    }
}

impl Auto {
    /// What a raw byte costs to send: the slower of the write and the link.
    fn wire(&self) -> f64 {
        self.link_ns_per_byte
            .map_or(self.write_ns_per_byte, |l| l.max(self.write_ns_per_byte))
    }

    /// The least a raw byte can cost, whatever the link: hashing it and copying it into
    /// the socket. Raw is not worth a probe while the best way costs less than this.
    fn raw_floor(&self) -> f64 {
        self.arms[RAW].way.cost_ns_per_byte + self.min_write_ns_per_byte.unwrap_or(0.0)
    }

    /// Measures every way once, then takes the cheapest, trying each other way again after
    /// a gap that doubles while the choice stands (the link or the data may change).
    fn choose(&mut self) -> Option<Codec> {
        self.batches += 1;
        if let Some(i) = (0..self.arms.len()).find(|i| !self.arms[*i].warm(*i)) {
            return codec_of(i);
        }
        let ways = self.arms.map(|a| a.way);
        let wire = self.wire();
        let cost = |w: &Way| w.cost_ns_per_byte + w.ratio * wire;
        let best = cheapest(&ways, wire);
        let best_cost = cost(&ways[best]);
        if best != self.best {
            // The way just given up is tried again soon (unless it costs far more); the
            // others keep their pace.
            let old = &mut self.arms[self.best];
            old.gap = FIRST_PROBE_GAP;
            old.next_probe =
                self.batches + FIRST_PROBE_GAP * probe_penalty(cost(&old.way), best_cost);
            self.best = best;
        }
        let batches = self.batches;
        let raw_floor = self.raw_floor();
        let probe = self.arms.iter_mut().enumerate().find(|(i, a)| {
            *i != best && batches >= a.next_probe && (*i != RAW || raw_floor < best_cost)
        });
        match probe {
            Some((i, a)) => {
                // A way that costs k times the best waits k times longer (at most
                // MAX_PROBE_PENALTY): a raw batch on a slow link costs as much as dozens of
                // compressed ones, so probing it as often would cost more than it can find.
                let penalty = probe_penalty(cost(&a.way), best_cost);
                a.next_probe = batches + a.gap * penalty;
                a.gap = (a.gap * 2).clamp(FIRST_PROBE_GAP, MAX_PROBE_GAP);
                codec_of(i)
            }
            None => codec_of(best),
        }
    }

    /// After a sample of way `i`: if the sample alone makes it the cheapest while the
    /// running estimate does not yet, try it again at once (the average catches up in a
    /// few batches instead of a few gaps).
    fn follow_up(&mut self, i: usize, sample: Way, wire: f64) {
        let mut ways = self.arms.map(|a| a.way);
        ways[i] = sample;
        if i != self.best && cheapest(&ways, wire) == i {
            self.arms[i].next_probe = self.batches + 1;
        }
    }

    fn compressed(&mut self, codec: Codec, took: Duration, raw: usize, packed: usize) {
        let i = if codec == Codec::Lz4 { LZ4 } else { ZSTD };
        let raw = raw.max(1) as f64;
        let sample = Way {
            cost_ns_per_byte: took.as_nanos() as f64 / raw,
            ratio: (packed as f64 / raw).min(1.0),
        };
        let arm = &mut self.arms[i];
        // A codec's first batch pays for warming its tables up: the second replaces it.
        let first = arm.samples < CODEC_WARMUP;
        arm.way.cost_ns_per_byte = blend(arm.way.cost_ns_per_byte, sample.cost_ns_per_byte, first);
        arm.way.ratio = blend(arm.way.ratio, sample.ratio, first);
        arm.samples = arm.samples.saturating_add(1);
        self.follow_up(i, sample, self.wire());
    }

    fn wrote_raw(&mut self, prepared: Duration, took: Duration, copied: Duration, bytes: usize) {
        let bytes = bytes.max(1) as f64;
        let per = took.as_nanos() as f64 / bytes;
        let raw = &mut self.arms[RAW];
        let first = raw.samples == 0;
        self.write_ns_per_byte = blend(self.write_ns_per_byte, per, first);
        // CPU time, not wall time: a write that waited for room in the socket (a fresh
        // connection's small window, say) would put the floor at the link's speed and keep
        // raw from ever being probed again.
        let copy = copied.as_nanos() as f64 / bytes;
        self.min_write_ns_per_byte = Some(self.min_write_ns_per_byte.map_or(copy, |m| m.min(copy)));
        // Raw pages are not free either: they are hashed before they go.
        let cost = prepared.as_nanos() as f64 / bytes;
        raw.way.cost_ns_per_byte = blend(raw.way.cost_ns_per_byte, cost, first);
        raw.samples = raw.samples.saturating_add(1);
    }

    fn drained(&mut self, took: Duration, bytes: u64) {
        let per = took.as_nanos() as f64 / bytes.max(1) as f64;
        self.link_ns_per_byte = Some(match self.link_ns_per_byte {
            Some(l) => blend(l, per, false),
            None => per,
        });
        // A link that got faster: try raw again soon.
        let way = self.arms[RAW].way;
        self.follow_up(RAW, way, per.max(self.write_ns_per_byte));
    }
}

/// A channel's decompressor and buffers.
#[derive(Default)]
pub(crate) struct Unpacker {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// The compressed payload as read.
    pub(crate) packed: Vec<u8>,
    /// The pages it holds.
    pub(crate) pages: Vec<u8>,
}

impl Unpacker {
    /// Decompresses `self.packed` into `self.pages`, which must come out exactly `raw`
    /// bytes long; `Err` says why not.
    pub(crate) fn unpack(&mut self, codec: Codec, raw: usize) -> Result<(), String> {
        self.pages.resize(raw, 0);
        let n = match codec {
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let z = self.zstd.as_mut().ok_or("no zstd decompressor")?;
                z.decompress_to_buffer(&self.packed[..], &mut self.pages[..])
                    .map_err(|e| format!("zstd: {e}"))?
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(&self.packed[..], &mut self.pages[..])
                .map_err(|e| format!("lz4: {e}"))?,
        };
        if n != raw {
            return Err(format!("{n} bytes decompressed, {raw} expected"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_flags_parse_and_print() {
        for (s, c) in [
            ("none", Compression::Off),
            ("lz4", Compression::Lz4),
            ("zstd", Compression::Zstd(1)),
            ("zstd:7", Compression::Zstd(7)),
            ("auto", Compression::Auto),
        ] {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
        }
        for bad in ["zstd:0", "zstd:20", "zstd:x", "gzip", ""] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(e.contains("expected"), "{e}");
        }
        assert_eq!(Compression::Zstd(3).to_string(), "zstd:3");
    }

    #[test]
    fn both_codecs_round_trip_and_refuse_what_does_not_shrink() {
        let mut pages = vec![0u8; 64 * 4096];
        for (i, p) in pages.chunks_mut(4096).enumerate() {
            p[0] = i as u8;
            p[4095] = 0xee;
        }
        for c in [Compression::Zstd(1), Compression::Lz4] {
            let mut packer = Packer::new(c).unwrap().unwrap();
            let codec = packer.choose().unwrap();
            let n = packer.compress(codec, &pages).unwrap().unwrap();
            let packed = packer.output(n).to_vec();
            let mut u = Unpacker {
                packed,
                ..Unpacker::default()
            };
            u.unpack(codec, pages.len()).unwrap();
            assert!(u.pages == pages, "{c}");
            assert!(u.unpack(codec, pages.len() - 1).is_err());
            u.packed.truncate(u.packed.len() / 2);
            assert!(u.unpack(codec, pages.len()).is_err(), "{c}: truncated");
            // Random bytes do not shrink.
            let mut x = 0x9e3779b97f4a7c15u64;
            let noise: Vec<u8> = (0..4096 * 4)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(packer.compress(codec, &noise).unwrap().is_none(), "{c}");
        }
        assert!(Packer::new(Compression::Off).unwrap().is_none());
    }

    /// Feeds `auto` what a link and the codecs cost and returns how many of `n` batches
    /// went each way (raw, lz4, zstd).
    fn run_auto(a: &mut Auto, n: u64, wire_ns: f64) -> [u64; 3] {
        let mut counts = [0u64; 3];
        let mib = 1 << 20;
        for _ in 0..n {
            match a.choose() {
                None => {
                    counts[RAW] += 1;
                    // The write itself is quick (the socket buffer takes it); the queue
                    // then drains at the link's rate.
                    let (hash, copy) = (Duration::from_micros(20), Duration::from_micros(50));
                    a.wrote_raw(hash, copy, copy, mib);
                    a.drained(
                        Duration::from_nanos((wire_ns * mib as f64) as u64),
                        mib as u64,
                    );
                }
                Some(Codec::Lz4) => {
                    counts[LZ4] += 1;
                    a.compressed(Codec::Lz4, Duration::from_micros(200), mib, mib / 20);
                }
                Some(Codec::Zstd) => {
                    counts[ZSTD] += 1;
                    a.compressed(Codec::Zstd, Duration::from_micros(300), mib, mib / 400);
                }
            }
        }
        counts
    }

    #[test]
    fn auto_takes_the_cheapest_way_and_probes_the_others_less_and_less() {
        let mut a = Auto::default();
        // 1 Gbit/s: 8 ns per byte on the wire; zstd's ratio wins.
        let c = run_auto(&mut a, 1000, 8.0);
        assert!(c[ZSTD] >= 980, "slow link: {c:?}");
        // Raw costs far more than zstd here: after its first trial, probed at most once
        // in 1000 batches.
        assert!(c[RAW] >= 1 && c[RAW] <= 2, "raw probed rarely: {c:?}");
        // The link becomes fast (0.1 ns per byte): raw wins within a few probes.
        let c = run_auto(&mut a, 2000, 0.1);
        assert!(c[RAW] >= 1900, "fast link: {c:?}");
    }

    #[test]
    fn raw_is_not_probed_when_even_a_free_link_would_not_make_it_cheapest() {
        let mut a = Auto::default();
        let mib = 1 << 20;
        let mut raw = 0;
        for _ in 0..5000 {
            match a.choose() {
                None => {
                    raw += 1;
                    // Hashing and copying a raw MiB into the socket: 0.43 ns per byte,
                    // the link taking it as fast as it comes.
                    let (hash, copy) = (Duration::from_micros(150), Duration::from_micros(300));
                    a.wrote_raw(hash, copy, copy, mib);
                    a.drained(copy, mib as u64);
                }
                Some(c) => a.compressed(c, Duration::from_micros(200), mib, mib / 100),
            }
        }
        // LZ4 at 0.19 ns per byte beats raw's floor: raw's first trial is its only one.
        assert_eq!(raw, 1);
        assert_eq!(a.best, LZ4);
    }

    /// A fresh connection's first raw write waits for room (wall time at the link's
    /// speed) while its copy costs little CPU: the floor is the copy, so raw is tried again.
    #[test]
    fn a_first_raw_write_that_waited_for_room_does_not_shut_raw_out() {
        let mut a = Auto::default();
        let mib = 1 << 20;
        let mut raw = 0;
        for _ in 0..2000 {
            match a.choose() {
                None => {
                    raw += 1;
                    let waited = if raw == 1 { 8000 } else { 50 };
                    let copy = Duration::from_micros(50);
                    a.wrote_raw(
                        Duration::from_micros(20),
                        Duration::from_micros(waited),
                        copy,
                        mib,
                    );
                    a.drained(copy, mib as u64);
                }
                Some(c) => a.compressed(c, Duration::from_micros(200), mib, mib / 20),
            }
        }
        assert!(raw >= 2, "raw probed again after a slow first write: {raw}");
    }

    /// A codec's first batch, slowed by warming up, does not decide: the second replaces it.
    #[test]
    fn a_codecs_warm_up_batch_does_not_decide() {
        let mut a = Auto::default();
        let mib = 1 << 20;
        let mut lz4 = 0;
        let mut seen = 0;
        for _ in 0..200 {
            match a.choose() {
                None => {
                    let (hash, copy) = (Duration::from_micros(100), Duration::from_micros(300));
                    a.wrote_raw(hash, copy, copy, mib);
                }
                Some(Codec::Lz4) => {
                    lz4 += 1;
                    seen += 1;
                    // 6 ns per byte on its first batch, 0.19 after.
                    let took = if seen == 1 { 6000 } else { 200 };
                    a.compressed(Codec::Lz4, Duration::from_micros(took), mib, mib / 100);
                }
                Some(Codec::Zstd) => {
                    a.compressed(Codec::Zstd, Duration::from_micros(300), mib, mib / 400)
                }
            }
        }
        assert_eq!(a.best, LZ4);
        assert!(lz4 >= 180, "LZ4 carries the batches: {lz4}");
    }

    #[test]
    fn autos_first_raw_measurement_is_a_small_batch() {
        let mut p = Packer::new(Compression::Auto).unwrap().unwrap();
        assert_eq!(p.batch_pages(), FIRST_RAW_PAGES);
        assert_eq!(p.choose(), None, "raw is measured first");
        let us = Duration::from_micros;
        p.wrote_raw(us(5), us(10), us(10), FIRST_RAW_PAGES as usize * 4096);
        assert_eq!(p.batch_pages(), MAX_BATCH_PAGES);
        let lz4 = Packer::new(Compression::Lz4).unwrap().unwrap();
        assert_eq!(lz4.batch_pages(), MAX_BATCH_PAGES);
    }

    #[test]
    fn costlier_ways_are_probed_less_often() {
        assert_eq!(probe_penalty(1.0, 1.0), 1);
        assert_eq!(probe_penalty(0.5, 1.0), 1);
        assert_eq!(probe_penalty(3.5, 1.0), 3);
        assert_eq!(probe_penalty(100.0, 1.0), MAX_PROBE_PENALTY);
        assert_eq!(probe_penalty(1.0, 0.0), 1);
        assert_eq!(probe_penalty(f64::NAN, 1.0), 1);
    }

    #[test]
    fn wire_agreement() {
        let offer = Wire::offer(true, Compression::Lz4);
        assert_eq!(offer, caps::PAGE_SUMS | caps::LZ4);
        let w = Wire::accepted(offer);
        assert!(w.sums && w.allows(Codec::Lz4) && !w.allows(Codec::Zstd));
        let e = Wire::agreed(caps::PAGE_SUMS, Compression::Zstd(3)).unwrap_err();
        assert!(e.to_string().contains("zstd:3"), "{e}");
        let w = Wire::agreed(caps::ZSTD | caps::LZ4, Compression::Auto).unwrap();
        assert!(!w.sums && w.compression == Compression::Auto);
        assert!(w.allows(Codec::Lz4) && w.allows(Codec::Zstd));
        let dest = Wire::accepted(Wire::offer(false, Compression::Auto));
        assert!(dest.allows(Codec::Lz4) && dest.allows(Codec::Zstd));
    }
}
