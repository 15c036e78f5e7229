//! Dirty page tracking for precopy: KVM's dirty log in manual-protect mode merged with the
//! pages the VMM wrote itself.
//!
//! One pass works like this: [`DirtyTracker::sync`] copies every region's KVM bitmap (in
//! manual-protect mode that changes no page protection, so it is cheap and never stalls a
//! vCPU) and ORs in the VMM's own bitmap. The resulting [`DirtySnapshot`] is immutable and
//! shared by the sender threads; just before a thread reads a chunk of pages it calls
//! [`DirtyTracker::clear_chunk`], which re-protects only that chunk's pages
//! (`KVM_CLEAR_DIRTY_LOG`). A guest write after the clear lands in the next pass. With
//! KVM's initially-set mode, enabling the log write-protects nothing: huge pages are split
//! one chunk at a time, when the chunk is first cleared, not all at logging start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::ram::{GuestRam, PAGE_SIZE};

/// Default pages per clear chunk: 256 pages (1 MiB) keeps each `KVM_CLEAR_DIRTY_LOG` short
/// while amortising its fixed cost (≥ 512-page chunks cost about half per GiB of 64-page ones).
pub const DEFAULT_CHUNK_PAGES: u64 = 256;

/// Errors of the dirty-log backend.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The backend (KVM) failed.
    #[error("dirty log: {0}")]
    Backend(String),
    /// A chunk or region outside what the snapshot covers.
    #[error("dirty log: {0}")]
    Invalid(String),
}

/// Where guest-write dirty bits come from: KVM's dirty log, per RAM region.
/// Implementations must be in manual-protect mode (`fetch` must not re-protect).
pub trait DirtyLogBackend: Send + Sync {
    /// Starts logging on every region.
    fn start(&self) -> Result<(), DirtyError>;
    /// Stops logging.
    fn stop(&self) -> Result<(), DirtyError>;
    /// Whether a fresh log reports every page dirty (KVM's initially-set mode).
    fn initially_set(&self) -> bool;
    /// Copies region `region`'s dirty bitmap (bit per page) into `bitmap`.
    fn fetch(&self, region: usize, bitmap: &mut [u64]) -> Result<(), DirtyError>;
    /// Re-protects the pages of `region` set in `bitmap`, bit i = page `first_page + i`.
    fn clear(
        &self,
        region: usize,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<(), DirtyError>;
}

/// Count, total and worst duration of one kind of dirty-log call.
#[derive(Debug, Default)]
pub struct CallTiming {
    count: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl CallTiming {
    fn record(&self, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// (calls, total ns, max ns).
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.total_ns.load(Ordering::Relaxed),
            self.max_ns.load(Ordering::Relaxed),
        )
    }
}

/// Timings of every dirty-log call made through a tracker.
#[derive(Debug, Default)]
pub struct DirtyStats {
    /// Starting the log (all regions).
    pub enable: CallTiming,
    /// One region's fetch.
    pub fetch: CallTiming,
    /// One chunk's clear.
    pub clear: CallTiming,
}

/// One region's dirty bits for a pass.
#[derive(Debug, Clone)]
pub struct RegionDirty {
    /// Region index.
    pub index: usize,
    /// Guest address of the region.
    pub gpa: u64,
    /// Pages in the region.
    pub pages: u64,
    /// Bits KVM reported (what a clear must re-protect).
    pub kvm: Vec<u64>,
    /// KVM's bits or the VMM's: what must be sent.
    pub all: Vec<u64>,
}

/// A chunk of a region with at least one dirty page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyChunk {
    /// Region index.
    pub region: usize,
    /// First page of the chunk (a multiple of 64).
    pub first_page: u64,
    /// Pages in the chunk.
    pub pages: u64,
}

/// The dirty pages of every region at one sync.
#[derive(Debug, Clone)]
pub struct DirtySnapshot {
    /// Per region.
    pub regions: Vec<RegionDirty>,
}

fn bit(words: &[u64], page: u64) -> bool {
    let w = (page / 64) as usize;
    words.get(w).is_some_and(|v| v & (1 << (page % 64)) != 0)
}

impl DirtySnapshot {
    /// Total dirty pages.
    pub fn dirty_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.all.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }

    /// Adds `other`'s dirty pages to this snapshot. A snapshot holds the only record of the
    /// pages the VMM wrote before it was taken, so one that will not be sent on its own must
    /// be merged into the next.
    pub fn merge(&mut self, other: &DirtySnapshot) -> Result<(), DirtyError> {
        if self.regions.len() != other.regions.len() {
            return Err(DirtyError::Invalid(
                "merging snapshots of different layouts".into(),
            ));
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            if a.index != b.index || a.pages != b.pages {
                return Err(DirtyError::Invalid(
                    "merging snapshots of different layouts".into(),
                ));
            }
            for (x, y) in a.all.iter_mut().zip(&b.all) {
                *x |= y;
            }
            for (x, y) in a.kvm.iter_mut().zip(&b.kvm) {
                *x |= y;
            }
        }
        Ok(())
    }

    /// Whether page `page` of region `region` is dirty.
    pub fn is_dirty(&self, region: usize, page: u64) -> bool {
        self.regions
            .get(region)
            .is_some_and(|r| page < r.pages && bit(&r.all, page))
    }

    /// The chunks of `chunk_pages` pages (a multiple of 64) holding at least one dirty page.
    pub fn dirty_chunks(&self, chunk_pages: u64) -> Vec<DirtyChunk> {
        let words_per_chunk = (chunk_pages / 64).max(1) as usize;
        let chunk_pages = words_per_chunk as u64 * 64;
        let mut out = Vec::new();
        for r in &self.regions {
            for (c, words) in r.all.chunks(words_per_chunk).enumerate() {
                if words.iter().any(|w| *w != 0) {
                    let first_page = c as u64 * chunk_pages;
                    out.push(DirtyChunk {
                        region: r.index,
                        first_page,
                        pages: chunk_pages.min(r.pages - first_page),
                    });
                }
            }
        }
        out
    }

    /// Bitmap words over every region in order, each region padded to whole words: the
    /// length of a bitmap that [`DirtySnapshot::without`] takes.
    pub fn padded_words(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.pages.div_ceil(64) as usize)
            .sum()
    }

    /// This snapshot without the pages set in `present`, a bitmap over every region in
    /// order, each padded to whole words ([`DirtySnapshot::padded_words`] long; missing
    /// words count as zero).
    pub fn without(&self, present: &[u64]) -> DirtySnapshot {
        let mut at = 0usize;
        let regions = self
            .regions
            .iter()
            .map(|r| {
                let n = r.pages.div_ceil(64) as usize;
                let mask = |words: &[u64]| -> Vec<u64> {
                    words
                        .iter()
                        .enumerate()
                        .map(|(i, w)| w & !present.get(at + i).copied().unwrap_or(0))
                        .collect()
                };
                let out = RegionDirty {
                    all: mask(&r.all),
                    kvm: mask(&r.kvm),
                    ..r.clone()
                };
                at += n;
                out
            })
            .collect();
        DirtySnapshot { regions }
    }

    /// The dirty pages of a chunk, as page numbers within its region.
    pub fn chunk_pages(&self, chunk: &DirtyChunk) -> impl Iterator<Item = u64> + '_ {
        let r = self.regions.get(chunk.region);
        (chunk.first_page..chunk.first_page + chunk.pages)
            .filter(move |p| r.is_some_and(|r| bit(&r.all, *p)))
    }
}

/// Tracks dirty pages of a VM's RAM across precopy passes.
pub struct DirtyTracker {
    backend: Arc<dyn DirtyLogBackend>,
    ram: Arc<GuestRam>,
    stats: Arc<DirtyStats>,
    started: std::sync::atomic::AtomicBool,
}

impl DirtyTracker {
    /// A tracker over `ram` using `backend` (not started).
    pub fn new(backend: Arc<dyn DirtyLogBackend>, ram: Arc<GuestRam>) -> Self {
        DirtyTracker {
            backend,
            ram,
            stats: Arc::new(DirtyStats::default()),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Call timings so far.
    pub fn stats(&self) -> Arc<DirtyStats> {
        self.stats.clone()
    }

    /// Starts logging. The VMM's own bitmap is reset too: pass 0 sends everything anyway.
    pub fn start(&self) -> Result<(), DirtyError> {
        let t = Instant::now();
        self.backend.start()?;
        self.stats.enable.record(t);
        for r in self.ram.regions() {
            self.ram.take_vmm_dirty(r.index);
        }
        self.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops logging (after a failed or cancelled migration, or at the end).
    pub fn stop(&self) -> Result<(), DirtyError> {
        if self.started.swap(false, Ordering::SeqCst) {
            self.backend.stop()?;
        }
        Ok(())
    }

    /// Syncs the dirty log. For the first pass (`first`) every page is dirty whatever the
    /// backend says, since nothing has been sent yet.
    pub fn sync(&self, first: bool) -> Result<DirtySnapshot, DirtyError> {
        let mut regions = Vec::with_capacity(self.ram.regions().len());
        for r in self.ram.regions() {
            let words = r.pages().div_ceil(64) as usize;
            let mut kvm = vec![0u64; words];
            let t = Instant::now();
            self.backend.fetch(r.index, &mut kvm)?;
            self.stats.fetch.record(t);
            let vmm = self.ram.take_vmm_dirty(r.index);
            let mut all: Vec<u64> = kvm
                .iter()
                .enumerate()
                .map(|(i, w)| w | vmm.get(i).copied().unwrap_or(0))
                .collect();
            if first {
                all.fill(u64::MAX);
            }
            // Bits past the region's end are not pages.
            let tail = r.pages() % 64;
            if tail != 0 {
                if let Some(last) = all.last_mut() {
                    *last &= (1u64 << tail) - 1;
                }
            }
            regions.push(RegionDirty {
                index: r.index,
                gpa: r.gpa,
                pages: r.pages(),
                kvm,
                all,
            });
        }
        Ok(DirtySnapshot { regions })
    }

    /// Re-protects the KVM-dirty pages of `chunk`, just before they are read for sending.
    pub fn clear_chunk(&self, snap: &DirtySnapshot, chunk: &DirtyChunk) -> Result<(), DirtyError> {
        let r = snap
            .regions
            .get(chunk.region)
            .ok_or_else(|| DirtyError::Invalid(format!("no region {}", chunk.region)))?;
        let first_word = (chunk.first_page / 64) as usize;
        let words = chunk.pages.div_ceil(64) as usize;
        let bits = r.kvm.get(first_word..first_word + words).ok_or_else(|| {
            DirtyError::Invalid(format!(
                "chunk {}+{} outside region {}",
                chunk.first_page, chunk.pages, chunk.region
            ))
        })?;
        if bits.iter().all(|w| *w == 0) {
            return Ok(()); // only the VMM wrote here: nothing to re-protect
        }
        let num = u32::try_from(chunk.pages)
            .map_err(|_| DirtyError::Invalid(format!("chunk of {} pages", chunk.pages)))?;
        let t = Instant::now();
        self.backend
            .clear(chunk.region, chunk.first_page, num, bits)?;
        self.stats.clear.record(t);
        Ok(())
    }

    /// Bytes of a page.
    pub const fn page_size() -> u64 {
        PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::{Backend, MemoryConfig};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn without_removes_present_pages_over_padded_regions() {
        // Two regions of 100 and 64 pages: the first is padded to 128 bits.
        let region = |index, gpa, pages: u64, all: Vec<u64>| RegionDirty {
            index,
            gpa,
            pages,
            kvm: all.clone(),
            all,
        };
        let snap = DirtySnapshot {
            regions: vec![
                region(0, 0, 100, vec![u64::MAX, (1 << 36) - 1]),
                region(1, 1 << 30, 64, vec![0b1111]),
            ],
        };
        assert_eq!(snap.padded_words(), 3);
        assert_eq!(snap.dirty_pages(), 104);
        // Present: pages 0-63 of region 0, page 99 of it, and pages 1 and 2 of region 1.
        let present = [u64::MAX, 1 << 35, 0b0110];
        let rest = snap.without(&present);
        assert_eq!(rest.regions[0].all, vec![0, (1 << 35) - 1]);
        assert_eq!(rest.regions[0].kvm, rest.regions[0].all);
        assert_eq!(rest.regions[1].all, vec![0b1001]);
        assert_eq!(rest.dirty_pages(), 35 + 2);
        assert_eq!(rest.regions[1].gpa, 1 << 30);
        // A short bitmap removes nothing past its end.
        assert_eq!(snap.without(&[u64::MAX]).dirty_pages(), 40);
    }

    /// A fake KVM log: tests set bits; clears are recorded.
    struct FakeLog {
        bits: Mutex<Vec<Vec<u64>>>,
        clears: Mutex<Vec<(usize, u64, u32)>>,
    }

    impl DirtyLogBackend for FakeLog {
        fn start(&self) -> Result<(), DirtyError> {
            Ok(())
        }
        fn stop(&self) -> Result<(), DirtyError> {
            Ok(())
        }
        fn initially_set(&self) -> bool {
            true
        }
        fn fetch(&self, region: usize, bitmap: &mut [u64]) -> Result<(), DirtyError> {
            let bits = self.bits.lock().unwrap();
            bitmap.copy_from_slice(&bits[region]);
            Ok(())
        }
        fn clear(&self, region: usize, first: u64, n: u32, bm: &[u64]) -> Result<(), DirtyError> {
            let mut bits = self.bits.lock().unwrap();
            for i in 0..u64::from(n) {
                if bm[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                    let p = first + i;
                    bits[region][(p / 64) as usize] &= !(1 << (p % 64));
                }
            }
            self.clears.lock().unwrap().push((region, first, n));
            Ok(())
        }
    }

    #[test]
    fn merges_vmm_writes_and_clears_per_chunk() {
        let ram = Arc::new(
            GuestRam::new(MemoryConfig {
                size: 4 << 20, // 1024 pages
                backend: Backend::Anonymous,
                thp: false,
            })
            .unwrap(),
        );
        let log = Arc::new(FakeLog {
            bits: Mutex::new(vec![vec![0u64; 16]]),
            clears: Mutex::new(Vec::new()),
        });
        let tracker = DirtyTracker::new(log.clone(), ram.clone());
        tracker.start().unwrap();

        let first = tracker.sync(true).unwrap();
        assert_eq!(first.dirty_pages(), 1024);
        assert_eq!(first.dirty_chunks(256).len(), 4);

        // Guest dirties page 3 and 700; the VMM writes page 900.
        log.bits.lock().unwrap()[0][0] |= 1 << 3;
        log.bits.lock().unwrap()[0][700 / 64] |= 1 << (700 % 64);
        ram.mem().write_obj(7u32, GuestAddress(900 * 4096)).unwrap();
        let snap = tracker.sync(false).unwrap();
        assert_eq!(snap.dirty_pages(), 3);
        let chunks = snap.dirty_chunks(256);
        assert_eq!(
            chunks.iter().map(|c| c.first_page).collect::<Vec<_>>(),
            vec![0, 512, 768]
        );
        assert_eq!(snap.chunk_pages(&chunks[2]).collect::<Vec<_>>(), vec![900]);
        for c in &chunks {
            tracker.clear_chunk(&snap, c).unwrap();
        }
        // The VMM-only chunk needs no KVM clear.
        assert_eq!(
            *log.clears.lock().unwrap(),
            vec![(0, 0, 256), (0, 512, 256)]
        );
        assert_eq!(tracker.sync(false).unwrap().dirty_pages(), 0);
        assert_eq!(tracker.stats().clear.get().0, 2);
    }

    #[test]
    fn a_skipped_snapshot_keeps_vmm_pages_through_merge() {
        let ram = Arc::new(
            GuestRam::new(MemoryConfig {
                size: 1 << 20,
                backend: Backend::Anonymous,
                thp: false,
            })
            .unwrap(),
        );
        let log = Arc::new(FakeLog {
            bits: Mutex::new(vec![vec![0u64; 4]]),
            clears: Mutex::new(Vec::new()),
        });
        let tracker = DirtyTracker::new(log, ram.clone());
        tracker.start().unwrap();
        tracker.sync(true).unwrap();
        ram.mem().write_obj(1u64, GuestAddress(7 * 4096)).unwrap();
        // A precopy sync sees the VMM write, then the engine decides to switch over.
        let skipped = tracker.sync(false).unwrap();
        assert!(skipped.is_dirty(0, 7));
        let mut last = tracker.sync(false).unwrap();
        assert!(
            !last.is_dirty(0, 7),
            "the VMM bit was consumed by the skipped sync"
        );
        last.merge(&skipped).unwrap();
        assert!(last.is_dirty(0, 7));
        assert_eq!(last.dirty_pages(), 1);
    }
}
