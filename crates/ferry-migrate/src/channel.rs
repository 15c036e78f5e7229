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
use std::time::{Duration, Instant};

use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{caps, page_sum, Codec, PageRun};

use crate::error::MigrateError;
use crate::policy::{compression_pays, CompressEstimate};

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
    /// zstd level 1 on each channel while it pays: per batch, compression is used when its
    /// measured cost per byte plus the compressed bytes' wire time is below the raw bytes'
    /// wire time; the other choice is re-measured every [`PROBE_EVERY`] batches.
    Auto,
}

/// Batches between two trials of the choice `auto` is not making.
pub const PROBE_EVERY: u32 = 32;

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
    /// The codec it uses, if any.
    pub fn codec(self) -> Option<Codec> {
        match self {
            Compression::Off => None,
            Compression::Zstd(_) | Compression::Auto => Some(Codec::Zstd),
            Compression::Lz4 => Some(Codec::Lz4),
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
    /// Pages may be compressed with this.
    pub(crate) compression: Compression,
}

impl Wire {
    /// The capability bits a source offers for these settings.
    pub(crate) fn offer(checksums: bool, compression: Compression) -> u64 {
        let sums = if checksums { caps::PAGE_SUMS } else { 0 };
        let codec = match compression.codec() {
            Some(Codec::Zstd) => caps::ZSTD,
            Some(Codec::Lz4) => caps::LZ4,
            None => 0,
        };
        sums | codec
    }

    /// What a source that asked for `compression` gets with the destination's `accepted`
    /// capabilities.
    pub(crate) fn agreed(accepted: u64, compression: Compression) -> Result<Wire, MigrateError> {
        let wanted = Wire::offer(false, compression);
        if accepted & wanted != wanted {
            return Err(MigrateError::CompressionRefused {
                asked: compression.to_string(),
            });
        }
        Ok(Wire {
            sums: accepted & caps::PAGE_SUMS != 0,
            compression,
        })
    }

    /// What a destination accepts from a source that offered `offered`.
    pub(crate) fn accepted(offered: u64) -> Wire {
        let compression = if offered & caps::ZSTD != 0 {
            Compression::Zstd(1)
        } else if offered & caps::LZ4 != 0 {
            Compression::Lz4
        } else {
            Compression::Off
        };
        Wire {
            sums: offered & caps::PAGE_SUMS != 0,
            compression,
        }
    }

    /// Whether a destination that agreed to this may receive frames of `codec`.
    pub(crate) fn allows(&self, codec: Codec) -> bool {
        self.compression.codec() == Some(codec)
    }
}

/// Appends the checksum of every page of `runs` in guest memory to `out` (each page is
/// copied into a small buffer first, which keeps the read volatile-safe).
pub(crate) fn sum_guest_pages(
    ram: &GuestRam,
    runs: &[PageRun],
    out: &mut Vec<u64>,
) -> Result<(), MigrateError> {
    let mut page = [0u8; PAGE_SIZE as usize];
    for r in runs {
        for i in 0..u64::from(r.pages) {
            let s = ram.slice(r.gpa + i * PAGE_SIZE, PAGE_SIZE as usize)?;
            s.copy_to(&mut page[..]);
            out.push(page_sum(&page));
        }
    }
    Ok(())
}

/// Appends the checksum of every page of `bytes` to `out`.
pub(crate) fn sum_pages(bytes: &[u8], out: &mut Vec<u64>) {
    out.extend(bytes.chunks(PAGE_SIZE as usize).map(page_sum));
}

/// Copies the pages of `runs` out of guest memory into `buf` (replacing its contents).
pub(crate) fn copy_guest_pages(
    ram: &GuestRam,
    runs: &[PageRun],
    buf: &mut Vec<u8>,
) -> Result<(), MigrateError> {
    buf.clear();
    for r in runs {
        let len = (u64::from(r.pages) * PAGE_SIZE) as usize;
        let s = ram.slice(r.gpa, len)?;
        let at = buf.len();
        buf.resize(at + len, 0);
        s.copy_to(buf.get_mut(at..).unwrap_or_default());
    }
    Ok(())
}

/// A channel's compressor, with its buffers and (for `auto`) its measurements.
pub(crate) struct Packer {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
    auto: Option<Auto>,
}

impl Packer {
    pub(crate) fn new(compression: Compression) -> Result<Option<Packer>, MigrateError> {
        let zstd = match compression.codec() {
            None => return Ok(None),
            Some(Codec::Zstd) => Some(
                zstd::bulk::Compressor::new(compression.level())
                    .map_err(MigrateError::io("starting a zstd compressor"))?,
            ),
            Some(Codec::Lz4) => None,
        };
        Ok(Some(Packer {
            compression,
            zstd,
            out: Vec::new(),
            auto: (compression == Compression::Auto).then(Auto::default),
        }))
    }

    /// Whether the next batch should be compressed.
    pub(crate) fn wants(&mut self) -> bool {
        self.auto.as_mut().is_none_or(Auto::choose)
    }

    /// Compresses `input`; `None` when the result would not be smaller.
    pub(crate) fn compress(
        &mut self,
        input: &[u8],
    ) -> Result<Option<(Codec, &[u8])>, MigrateError> {
        let t = Instant::now();
        let codec = self.compression.codec().unwrap_or(Codec::Zstd);
        let bound = match codec {
            Codec::Zstd => zstd::zstd_safe::compress_bound(input.len()),
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(input.len()),
        };
        self.out.resize(bound, 0);
        let n = match (codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(z)) => z
                .compress_to_buffer(input, &mut self.out[..])
                .map_err(MigrateError::io("compressing pages (zstd)"))?,
            _ => lz4_flex::block::compress_into(input, &mut self.out[..]).map_err(|e| {
                MigrateError::io("compressing pages (lz4)")(std::io::Error::other(e))
            })?,
        };
        if let Some(a) = &mut self.auto {
            a.compressed(t.elapsed(), input.len(), n);
        }
        Ok((n < input.len()).then(|| (codec, self.out.get(..n).unwrap_or_default())))
    }

    /// Records how long writing `bytes` to the socket took (for `auto`).
    pub(crate) fn wrote(&mut self, took: Duration, bytes: usize) {
        if let Some(a) = &mut self.auto {
            a.wrote(took, bytes);
        }
    }
}

/// `auto`'s running estimates of one channel (exponential averages).
#[derive(Debug, Default)]
struct Auto {
    est: CompressEstimate,
    measured_compress: bool,
    measured_wire: bool,
    batches: u32,
    on: bool,
}

/// Weight of a new sample in the running averages.
const ALPHA: f64 = 0.2;

fn blend(old: f64, new: f64, first: bool) -> f64 {
    if first {
        new
    } else {
        old + ALPHA * (new - old)
    }
}

impl Auto {
    /// Compress this batch? Measures both choices first, then follows the estimate, trying
    /// the other choice now and then (the link or the data may change).
    fn choose(&mut self) -> bool {
        self.batches = self.batches.wrapping_add(1);
        self.on = if !self.measured_compress {
            true
        } else if !self.measured_wire {
            false
        } else {
            let pays = compression_pays(&self.est);
            if self.batches.is_multiple_of(PROBE_EVERY) {
                !pays
            } else {
                pays
            }
        };
        self.on
    }

    fn compressed(&mut self, took: Duration, raw: usize, packed: usize) {
        let raw = raw.max(1) as f64;
        let first = !self.measured_compress;
        self.est.compress_ns_per_byte = blend(
            self.est.compress_ns_per_byte,
            took.as_nanos() as f64 / raw,
            first,
        );
        self.est.ratio = blend(self.est.ratio, packed as f64 / raw, first);
        self.measured_compress = true;
    }

    fn wrote(&mut self, took: Duration, bytes: usize) {
        let per = took.as_nanos() as f64 / bytes.max(1) as f64;
        self.est.wire_ns_per_byte = blend(self.est.wire_ns_per_byte, per, !self.measured_wire);
        self.measured_wire = true;
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
            assert!(packer.wants());
            let (codec, packed) = packer.compress(&pages).unwrap().unwrap();
            let mut u = Unpacker {
                packed: packed.to_vec(),
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
            assert!(packer.compress(&noise).unwrap().is_none(), "{c}");
        }
        assert!(Packer::new(Compression::Off).unwrap().is_none());
    }

    #[test]
    fn auto_follows_what_pays_and_probes_the_other_choice() {
        let mut a = Auto::default();
        assert!(a.choose(), "measures compression first");
        a.compressed(Duration::from_micros(100), 1 << 20, 1 << 16);
        assert!(!a.choose(), "then a raw write");
        // A slow link: 1 ns per byte on the wire, compression 0.1 ns per byte, ratio 1/16.
        a.wrote(Duration::from_micros(1 << 10), 1 << 20);
        let choices: Vec<bool> = (0..2 * PROBE_EVERY).map(|_| a.choose()).collect();
        let on = choices.iter().filter(|c| **c).count();
        assert!(
            on >= choices.len() - 2,
            "slow link: compressed {on} of {}",
            choices.len()
        );
        assert!(on < choices.len(), "but probes raw now and then");
        // The link becomes fast: writes cost 0.01 ns per byte.
        for _ in 0..20 {
            a.wrote(Duration::from_nanos(10_000), 1 << 20);
        }
        let on = (0..2 * PROBE_EVERY).filter(|_| a.choose()).count();
        assert!(on <= 2, "fast link: compressed {on} batches");
    }

    #[test]
    fn wire_agreement() {
        let offer = Wire::offer(true, Compression::Lz4);
        assert_eq!(offer, caps::PAGE_SUMS | caps::LZ4);
        let w = Wire::accepted(offer);
        assert!(w.sums && w.allows(Codec::Lz4) && !w.allows(Codec::Zstd));
        let e = Wire::agreed(caps::PAGE_SUMS, Compression::Zstd(3)).unwrap_err();
        assert!(e.to_string().contains("zstd:3"), "{e}");
        let w = Wire::agreed(caps::ZSTD, Compression::Auto).unwrap();
        assert!(!w.sums && w.compression == Compression::Auto);
    }
}
