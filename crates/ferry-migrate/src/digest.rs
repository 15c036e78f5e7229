//! Page digests: one xxh3 per guest page, written by each side of a migration (the source
//! at the switchover, the destination once every page has arrived) and compared after it,
//! so that a wrong page is found and named rather than trusted.
//!
//! File format: for every page of RAM, in region order, its guest-physical address and its
//! digest, both little-endian u64.

use std::path::{Path, PathBuf};

use ferry_memory::ram::{page_digest, GuestRam, PAGE_SIZE};

use crate::files::write_new_then_rename;

/// Bytes per page in a digest file.
const ENTRY: usize = 16;
/// Differing pages a [`DigestError::Differ`] names.
const NAMED: usize = 8;

/// Why two digest files do not show the same memory.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// A digest file could not be read or written.
    #[error("{op} the page digests {}: {source}", path.display())]
    Io {
        /// Reading or writing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's length is not a whole number of entries.
    #[error("{} is not a digest file: {len} bytes is not a multiple of {ENTRY}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The two sides list different pages (another memory size or layout).
    #[error("the two sides' memory differs in layout: {source_pages} pages on the source, {destination_pages} on the destination{}", first_difference(*.at))]
    Layout {
        /// Pages the source listed.
        source_pages: usize,
        /// Pages the destination listed.
        destination_pages: usize,
        /// The first guest address listed differently, if the counts agree.
        at: Option<u64>,
    },
    /// Pages hold different data on the two sides.
    #[error("{count} of {pages} pages differ between source and destination: {}", describe(.first))]
    Differ {
        /// Pages compared.
        pages: usize,
        /// Pages that differ.
        count: usize,
        /// The first few of them.
        first: Vec<PageDifference>,
    },
}

/// One page that differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageDifference {
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its digest on the source.
    pub source: u64,
    /// Its digest on the destination.
    pub destination: u64,
}

fn first_difference(at: Option<u64>) -> String {
    at.map(|a| format!(" (first at guest address {a:#x})"))
        .unwrap_or_default()
}

fn describe(pages: &[PageDifference]) -> String {
    let zero = page_digest(&[0u8; PAGE_SIZE as usize]);
    let name = |d: u64| {
        if d == zero {
            "all zero".to_string()
        } else {
            format!("{d:016x}")
        }
    };
    pages
        .iter()
        .map(|p| {
            format!(
                "page at guest address {:#x} (source {}, destination {})",
                p.gpa,
                name(p.source),
                name(p.destination)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the digest of every page of `ram` to `path` (a new file renamed into place).
pub fn write(ram: &GuestRam, path: &Path) -> Result<(), DigestError> {
    let mut bytes = Vec::with_capacity(ram.page_addresses().len() * ENTRY);
    for (gpa, d) in ram.page_addresses().iter().zip(ram.page_digests()) {
        bytes.extend_from_slice(&gpa.to_le_bytes());
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    write_new_then_rename(path, &bytes).map_err(|source| DigestError::Io {
        op: "writing",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a digest file: (guest address, digest) per page.
pub fn read(path: &Path) -> Result<Vec<(u64, u64)>, DigestError> {
    let bytes = std::fs::read(path).map_err(|source| DigestError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() % ENTRY != 0 {
        return Err(DigestError::Malformed {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    Ok(bytes
        .chunks_exact(ENTRY)
        .map(|e| (word(&e[..8]), word(&e[8..])))
        .collect())
}

/// Compares the source's digests with the destination's; the number of pages compared when
/// every page is identical.
pub fn compare(source: &[(u64, u64)], destination: &[(u64, u64)]) -> Result<usize, DigestError> {
    let layout = |at| DigestError::Layout {
        source_pages: source.len(),
        destination_pages: destination.len(),
        at,
    };
    if source.len() != destination.len() {
        return Err(layout(None));
    }
    if let Some((s, _)) = source.iter().zip(destination).find(|(s, d)| s.0 != d.0) {
        return Err(layout(Some(s.0)));
    }
    let differ: Vec<PageDifference> = source
        .iter()
        .zip(destination)
        .filter(|(s, d)| s.1 != d.1)
        .map(|(s, d)| PageDifference {
            gpa: s.0,
            source: s.1,
            destination: d.1,
        })
        .collect();
    if differ.is_empty() {
        return Ok(source.len());
    }
    Err(DigestError::Differ {
        pages: source.len(),
        count: differ.len(),
        first: differ.into_iter().take(NAMED).collect(),
    })
}

/// Reads both files and compares them (see [`compare`]).
pub fn compare_files(source: &Path, destination: &Path) -> Result<usize, DigestError> {
    compare(&read(source)?, &read(destination)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_pages_are_counted() {
        let a = vec![(0, 1), (4096, 2)];
        assert_eq!(compare(&a, &a).unwrap(), 2);
    }

    #[test]
    fn a_differing_page_is_named_by_address() {
        let zero = page_digest(&[0u8; PAGE_SIZE as usize]);
        let a = vec![(0, 1), (0x5000, 2), (0x6000, 3)];
        let b = vec![(0, 1), (0x5000, zero), (0x6000, 3)];
        let e = compare(&a, &b).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("1 of 3 pages differ"), "{text}");
        assert!(text.contains("guest address 0x5000"), "{text}");
        assert!(text.contains("destination all zero"), "{text}");
    }

    #[test]
    fn another_layout_is_refused() {
        let a = vec![(0, 1), (4096, 2)];
        assert!(matches!(
            compare(&a, &a[..1]),
            Err(DigestError::Layout { at: None, .. })
        ));
        let b = vec![(0, 1), (8192, 2)];
        assert!(matches!(
            compare(&a, &b),
            Err(DigestError::Layout { at: Some(4096), .. })
        ));
    }

    #[test]
    fn files_round_trip_and_bad_lengths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, [0u8; 17]).unwrap();
        assert!(matches!(
            read(&p),
            Err(DigestError::Malformed { len: 17, .. })
        ));
        let mut bytes = Vec::new();
        for (g, d) in [(0u64, 7u64), (4096, 9)] {
            bytes.extend_from_slice(&g.to_le_bytes());
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read(&p).unwrap(), vec![(0, 7), (4096, 9)]);
        assert_eq!(compare_files(&p, &p).unwrap(), 2);
    }
}
