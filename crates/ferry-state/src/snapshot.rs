//! The snapshot file: a checksummed, versioned header, the encoded machine state, then each
//! RAM region's bytes at a page-aligned offset (zero pages left as holes).
//!
//! ```text
//! offset 0   magic "FERRYSNP" | version u32 | region count u32 | state offset u64
//!            | state length u64 | state crc32 u32 | reserved u32
//!            | per region: gpa u64, size u64, file offset u64, crc32 u32, reserved u32
//!            | header crc32 u32 (over everything before it)
//! then       the state bytes, then the regions, each starting on a 4 KiB boundary
//! ```
//! All integers little-endian. Every length and offset is checked against the file size
//! before anything is read or allocated.

use std::io::Read;

/// Snapshot file format version.
pub const SNAPSHOT_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"FERRYSNP";
const FIXED_LEN: usize = 8 + 4 + 4 + 8 + 8 + 4 + 4;
const REGION_LEN: usize = 8 + 8 + 8 + 4 + 4;
/// Most RAM regions a snapshot may describe.
pub const MAX_REGIONS: u32 = 64;
const ALIGN: u64 = 4096;

/// Errors reading or writing a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O error.
    #[error("snapshot {}: {what}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a snapshot file.
    #[error("snapshot: not a Ferry snapshot file (bad magic)")]
    BadMagic,
    /// Another version.
    #[error("snapshot: file format version {found} is not supported (this build reads version {expected})")]
    Version {
        /// Found.
        found: u32,
        /// Supported.
        expected: u32,
    },
    /// The header or a section is damaged or inconsistent.
    #[error("snapshot: corrupt file: {0}")]
    Corrupt(String),
}

/// One RAM region in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where its bytes start in the file.
    pub file_offset: u64,
    /// CRC-32 of its bytes.
    pub crc: u32,
}

/// The header of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Where the state starts.
    pub state_offset: u64,
    /// State length.
    pub state_len: u64,
    /// CRC-32 of the state.
    pub state_crc: u32,
    /// RAM regions.
    pub regions: Vec<SnapshotRegion>,
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

impl SnapshotHeader {
    /// Length of the encoded header for `regions` regions.
    pub fn encoded_len(regions: usize) -> u64 {
        (FIXED_LEN + regions * REGION_LEN + 4) as u64
    }

    /// Lays out a file for a state of `state_len` bytes and regions of the given
    /// (gpa, size); CRCs are filled in later.
    pub fn layout(state_len: u64, regions: &[(u64, u64)]) -> SnapshotHeader {
        let state_offset = Self::encoded_len(regions.len());
        let mut off = align_up(state_offset + state_len);
        let regions = regions
            .iter()
            .map(|&(gpa, size)| {
                let r = SnapshotRegion {
                    gpa,
                    size,
                    file_offset: off,
                    crc: 0,
                };
                off = align_up(off + size);
                r
            })
            .collect();
        SnapshotHeader {
            state_offset,
            state_len,
            state_crc: 0,
            regions,
        }
    }

    /// Encodes the header (with its own CRC).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::encoded_len(self.regions.len()) as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.state_offset.to_le_bytes());
        out.extend_from_slice(&self.state_len.to_le_bytes());
        out.extend_from_slice(&self.state_crc.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.regions {
            out.extend_from_slice(&r.gpa.to_le_bytes());
            out.extend_from_slice(&r.size.to_le_bytes());
            out.extend_from_slice(&r.file_offset.to_le_bytes());
            out.extend_from_slice(&r.crc.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads and validates a header from a file of `file_len` bytes.
    pub fn read_from<R: Read>(r: &mut R, file_len: u64) -> Result<SnapshotHeader, SnapshotError> {
        let mut fixed = [0u8; FIXED_LEN];
        let got = read_up_to(r, &mut fixed)?;
        // The magic decides "not a snapshot" before any length does "truncated".
        if got < MAGIC.len() || fixed[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if got < FIXED_LEN {
            return Err(SnapshotError::Corrupt(
                "file ends inside the header (truncated)".into(),
            ));
        }
        let mut c = Cursor(&fixed[..]);
        let _magic: [u8; 8] = c.take();
        let version = u32::from_le_bytes(c.take());
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                expected: SNAPSHOT_VERSION,
            });
        }
        let count = u32::from_le_bytes(c.take());
        if count == 0 || count > MAX_REGIONS {
            return Err(SnapshotError::Corrupt(format!(
                "{count} memory regions (must be 1..={MAX_REGIONS})"
            )));
        }
        let state_offset = u64::from_le_bytes(c.take());
        let state_len = u64::from_le_bytes(c.take());
        let state_crc = u32::from_le_bytes(c.take());
        let mut table = vec![0u8; count as usize * REGION_LEN + 4];
        read_exact(r, &mut table, "the region table")?;
        let (table, crc_bytes) = table.split_at(count as usize * REGION_LEN);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed);
        crc.update(table);
        let mut crc_arr = [0u8; 4];
        crc_arr.copy_from_slice(crc_bytes);
        if crc.finalize() != u32::from_le_bytes(crc_arr) {
            return Err(SnapshotError::Corrupt("header checksum mismatch".into()));
        }
        let mut regions = Vec::with_capacity(count as usize);
        let mut t = Cursor(table);
        for _ in 0..count {
            let gpa = u64::from_le_bytes(t.take());
            let size = u64::from_le_bytes(t.take());
            let file_offset = u64::from_le_bytes(t.take());
            let crc = u32::from_le_bytes(t.take());
            let _reserved: [u8; 4] = t.take();
            regions.push(SnapshotRegion {
                gpa,
                size,
                file_offset,
                crc,
            });
        }
        let header = SnapshotHeader {
            state_offset,
            state_len,
            state_crc,
            regions,
        };
        header.check(file_len)?;
        Ok(header)
    }

    fn check(&self, file_len: u64) -> Result<(), SnapshotError> {
        let header_end = Self::encoded_len(self.regions.len());
        let state_end = self
            .state_offset
            .checked_add(self.state_len)
            .filter(|e| self.state_offset >= header_end && *e <= file_len)
            .ok_or_else(|| {
                SnapshotError::Corrupt(format!(
                    "state at {}+{} does not fit a file of {file_len} bytes",
                    self.state_offset, self.state_len
                ))
            })?;
        if self.state_len as usize > crate::MAX_STATE_LEN {
            return Err(SnapshotError::Corrupt(format!(
                "state of {} bytes exceeds the limit",
                self.state_len
            )));
        }
        let mut prev_end = state_end;
        for (i, r) in self.regions.iter().enumerate() {
            let end = r.file_offset.checked_add(r.size);
            let ok = r.size > 0
                && r.size % ALIGN == 0
                && r.gpa % ALIGN == 0
                && r.file_offset % ALIGN == 0
                && r.file_offset >= prev_end
                && end.is_some_and(|e| e <= file_len);
            if !ok {
                return Err(SnapshotError::Corrupt(format!(
                    "region {i} (gpa {:#x}, {} bytes at file offset {}) is misaligned, overlaps \
                     or extends past the end of the {file_len}-byte file (truncated?)",
                    r.gpa, r.size, r.file_offset
                )));
            }
            prev_end = end.unwrap_or(file_len);
        }
        Ok(())
    }
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SnapshotError::Io {
                    what: "reading the header",
                    path: std::path::PathBuf::new(),
                    source,
                })
            }
        }
    }
    Ok(n)
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Corrupt(format!("file ends inside {what} (truncated)"))
        } else {
            SnapshotError::Io {
                what: "reading the header",
                path: std::path::PathBuf::new(),
                source,
            }
        }
    })
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers size the buffers from the same constants, so this never runs short; a
        // short buffer yields zeros rather than a panic.
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_corruption() {
        let mut h = SnapshotHeader::layout(1000, &[(0, 3 << 30), (1 << 32, 1 << 30)]);
        h.state_crc = 7;
        h.regions[0].crc = 9;
        let file_len = h.regions[1].file_offset + h.regions[1].size;
        let bytes = h.encode();
        let back = SnapshotHeader::read_from(&mut &bytes[..], file_len).unwrap();
        assert_eq!(back, h);
        // Truncated file: regions no longer fit.
        let err = SnapshotHeader::read_from(&mut &bytes[..], file_len - 4096).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Truncated header.
        let err = SnapshotHeader::read_from(&mut &bytes[..20], file_len).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(matches!(
            SnapshotHeader::read_from(&mut &b"hello\n"[..], 6),
            Err(SnapshotError::BadMagic)
        ));
        // Flipped byte: checksum.
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        let err = SnapshotHeader::read_from(&mut &bad[..], file_len).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        // Other version.
        let mut v = bytes.clone();
        v[8] = 9;
        assert!(matches!(
            SnapshotHeader::read_from(&mut &v[..], file_len),
            Err(SnapshotError::Version { found: 9, .. })
        ));
        let mut m = bytes;
        m[0] = 0;
        assert!(matches!(
            SnapshotHeader::read_from(&mut &m[..], file_len),
            Err(SnapshotError::BadMagic)
        ));
    }
}
