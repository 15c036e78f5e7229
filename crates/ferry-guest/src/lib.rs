//! Ferry's workload guests and the parser for what they print.
//!
//! The workload is a multiboot v1 image (see `asm/workload.S` for its command line) that
//! writes a hot working set on every vCPU, keeps the rest of memory non-zero, heartbeats on
//! COM1 and verifies its own memory continuously. It runs under `ferry run` and under
//! `qemu-system-x86_64 -accel kvm -kernel`.

use std::io;
use std::path::{Path, PathBuf};

/// The workload as an ELF32 multiboot image (what QEMU loads by default).
pub const WORKLOAD_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.elf"));

/// The same workload as a flat image that uses the multiboot header's load-address fields
/// (flag bit 16, the "a.out kludge").
pub const WORKLOAD_FLAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));

/// Which build of the workload image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// ELF32 image.
    Elf,
    /// Flat image with the a.out kludge.
    Flat,
}

impl ImageKind {
    /// The image bytes.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            ImageKind::Elf => WORKLOAD_ELF,
            ImageKind::Flat => WORKLOAD_FLAT,
        }
    }
}

/// Writes the workload image into `dir` and returns its path (for `ferry run` or QEMU).
pub fn write_image(kind: ImageKind, dir: &Path) -> io::Result<PathBuf> {
    let name = match kind {
        ImageKind::Elf => "ferry-workload.elf",
        ImageKind::Flat => "ferry-workload.bin",
    };
    let path = dir.join(name);
    std::fs::write(&path, kind.bytes())?;
    Ok(path)
}

/// The heartbeat byte the guest prints every `hb` milliseconds.
pub const HEARTBEAT: u8 = b'.';

/// The byte the guest prints (with `mark=1`) each time its boot vCPU completes a sweep of
/// its hot working set.
pub const SWEEP_MARK: u8 = b'+';

/// A line the workload guest printed (heartbeat dots stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `FERRY-GUEST boot mem=..MiB ws=..MiB tsc_khz=..`
    Boot { mem_mib: u64, ws_mib: u64 },
    /// `FERRY-GUEST ready cpus=N`: memory filled, every vCPU in its loop.
    Ready { cpus: u64 },
    /// `FERRY-GUEST ok sweeps=N fails=F stall_us=S`, about once a second; `stall_us` is
    /// the longest time in that second the boot vCPU made no progress.
    Status {
        /// Sweeps of the boot vCPU's working set.
        sweeps: u64,
        /// Verification failures so far.
        fails: u64,
        /// Longest progress gap in the last second, µs (absent before the first).
        stall_us: Option<u64>,
    },
    /// `FERRY-GUEST FAIL ...`: a page did not hold what the guest last wrote there.
    Fail(String),
    /// Anything else.
    Other(String),
}

fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(key)? + key.len();
    let digits: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl GuestLine {
    /// Parses one line of serial output; heartbeat dots are ignored.
    pub fn parse(raw: &str) -> Option<GuestLine> {
        let line = raw.trim_matches(|c: char| c == '.' || c.is_whitespace());
        if line.is_empty() {
            return None;
        }
        let Some(pos) = line.find("FERRY-GUEST ") else {
            return Some(GuestLine::Other(line.to_string()));
        };
        let line = &line[pos..];
        let rest = &line["FERRY-GUEST ".len()..];
        let parsed = if rest.starts_with("FAIL") {
            Some(GuestLine::Fail(line.to_string()))
        } else if rest.starts_with("boot") {
            field(line, "mem=")
                .zip(field(line, "ws="))
                .map(|(mem_mib, ws_mib)| GuestLine::Boot { mem_mib, ws_mib })
        } else if rest.starts_with("ready") {
            field(line, "cpus=").map(|cpus| GuestLine::Ready { cpus })
        } else if rest.starts_with("ok") {
            field(line, "sweeps=")
                .zip(field(line, "fails="))
                .map(|(sweeps, fails)| GuestLine::Status {
                    sweeps,
                    fails,
                    stall_us: field(line, "stall_us="),
                })
        } else {
            None
        };
        Some(parsed.unwrap_or_else(|| GuestLine::Other(line.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_multiboot() {
        for kind in [ImageKind::Elf, ImageKind::Flat] {
            let img = kind.bytes();
            let found = img[..img.len().min(8192)]
                .chunks_exact(4)
                .any(|w| w == 0x1BAD_B002u32.to_le_bytes());
            assert!(found, "{kind:?} has no multiboot header");
        }
        assert_eq!(&WORKLOAD_ELF[..4], b"\x7fELF");
        assert_eq!(WORKLOAD_ELF[4], 1, "ELF32");
    }

    #[test]
    fn parses_lines() {
        assert_eq!(
            GuestLine::parse("...FERRY-GUEST ok sweeps=12 fails=0 stall_us=340"),
            Some(GuestLine::Status {
                sweeps: 12,
                fails: 0,
                stall_us: Some(340)
            })
        );
        assert_eq!(
            GuestLine::parse("FERRY-GUEST ready cpus=2"),
            Some(GuestLine::Ready { cpus: 2 })
        );
        assert_eq!(
            GuestLine::parse("FERRY-GUEST boot mem=251MiB ws=8MiB tsc_khz=2598887"),
            Some(GuestLine::Boot {
                mem_mib: 251,
                ws_mib: 8
            })
        );
        assert!(matches!(
            GuestLine::parse("FERRY-GUEST FAIL cpu=0 addr=0x1"),
            Some(GuestLine::Fail(_))
        ));
        assert_eq!(GuestLine::parse("...."), None);
    }
}
