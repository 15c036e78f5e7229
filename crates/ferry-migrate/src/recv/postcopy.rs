//! Postcopy on the destination: the guest runs while pages it lacks are still on the source.
//!
//! Guest memory is split into ranges, each registered with its own userfaultfd and served by
//! its own handler thread, so faults from different vCPUs do not queue on one wait queue or
//! one thread. A handler asks for a faulted page on the urgent channel (never behind bulk
//! traffic); the urgent channel's receiver places the answer, and the data channels place
//! the background push. Every placement is atomic (`UFFDIO_COPY`/`UFFDIO_ZEROPAGE`) and
//! never overwrites a present page, so whichever copy of a page comes first wins and a page
//! the running guest has written is never replaced. Pages several vCPUs fault on are asked
//! for once; a fault on a page placed meanwhile is only woken.
//!
//! On prepared memfd memory and on hugetlb memory the file keeps its pages: postcopy only
//! drops the guest mapping's page tables, registers for MINOR faults as well, and places a
//! page by writing it into the file and then mapping it (`UFFDIO_CONTINUE`; on hugetlb a
//! whole huge page, once all of its pieces are in). A file write would reach a page the
//! guest maps, so only pages made missing are ever written, each by the one writer that
//! claims it first; a fault on any other page maps it from the file.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ferry_memory::ram::{Backend, GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};
use ferry_proto::{
    page_sum, read_message_checked, Message, PageRun, ProtoError, MAX_BATCH_PAGES, MAX_RUNS,
};
use ferry_sys::uffd::{Fault, Placed, Uffd};
use ferry_transport::Stream;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::data::{DataEvent, PageBits};
use super::Event;
use crate::channel::Wire;
use crate::error::{Channel, MigrateError};
use crate::wire::{push_run, send_by};

/// Most fault queues (a userfaultfd and its handler thread each).
pub const MAX_FAULT_QUEUES: usize = 16;
/// How often a handler idle on its userfaultfd looks at its stop flag.
const HANDLER_POLL: Duration = Duration::from_millis(50);
/// Longest time writing one page request may take before the link counts as broken.
const REQUEST_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Range sizes are rounded to this, so a huge page never straddles two ranges.
const RANGE_ALIGN: u64 = 2 << 20;

/// One registered range of guest memory.
struct FaultRange {
    gpa: u64,
    len: u64,
    hva: usize,
    uffd: Arc<Uffd>,
}

/// How pages are placed.
enum Placement {
    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` into pages the mapping lacks.
    Copy,
    /// Written into the memory file (through a second mapping of it), then mapped with
    /// `UFFDIO_CONTINUE`.
    File {
        alias: GuestMemoryMmap,
        /// The pages made missing: only these are ever fetched and written. Any other page
        /// that faults is right in the file already (its mapping was dropped by the kernel,
        /// to swap it, or with a huge page hidden for another piece of it), and the guest
        /// may have written it since the switch.
        missing: PageBits,
        /// Pages a writer has taken: only the first to claim a page writes it. Pages that
        /// were not made missing count as taken from the start, so none is written over.
        claimed: PageBits,
        /// hugetlb memory, which is mapped a whole huge page at a time.
        huge: Option<HugeCounts>,
    },
}

/// 4 KiB pieces of a huge page.
const PIECES: u32 = (HUGE_PAGE_SIZE / PAGE_SIZE) as u32;

/// Per huge page of hugetlb memory, how many of its 4 KiB pieces the file holds right: a
/// huge page can only be mapped whole, so it is mapped once all of them are.
struct HugeCounts {
    /// Per region: its first address and a counter per huge page.
    regions: Vec<(u64, Vec<AtomicU32>)>,
}

impl HugeCounts {
    /// Every huge page complete.
    fn new(ram: &GuestRam) -> HugeCounts {
        let regions = ram
            .regions()
            .iter()
            .map(|r| {
                let n = r.size.div_ceil(HUGE_PAGE_SIZE);
                (r.gpa, (0..n).map(|_| AtomicU32::new(PIECES)).collect())
            })
            .collect();
        HugeCounts { regions }
    }

    fn counter(&self, gpa: u64) -> Option<&AtomicU32> {
        self.regions.iter().find_map(|(base, counts)| {
            let i = gpa.checked_sub(*base)? / HUGE_PAGE_SIZE;
            counts.get(usize::try_from(i).ok()?)
        })
    }

    /// One piece of the huge page at `gpa` must come from the source.
    fn lose(&self, gpa: u64) {
        if let Some(c) = self.counter(gpa) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `n` more pieces of the huge page at `gpa` are in the file; whether it is complete.
    fn add(&self, gpa: u64, n: u32) -> bool {
        self.counter(gpa)
            .is_some_and(|c| c.fetch_add(n, Ordering::AcqRel) + n == PIECES)
    }

    /// Takes back [`HugeCounts::add`] (its pieces will be written again).
    fn take_back(&self, gpa: u64, n: u32) {
        if let Some(c) = self.counter(gpa) {
            c.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// Whether postcopy can keep the pages of `ram`'s file (memfd or hugetlb memory on a kernel
/// with MINOR faults there): then a page is made missing by dropping the guest mapping's
/// page tables over it ([`GuestRam::hide`]), not by freeing it from the file, and placed by
/// [`Placement::File`]. The destination does so for memfd memory its preparation filled,
/// and always for hugetlb memory.
pub(crate) fn file_placement_possible(ram: &GuestRam) -> bool {
    let kernel = match ram.config().backend {
        Backend::Memfd => Uffd::minor_faults_supported(false),
        Backend::Hugetlb => {
            Uffd::minor_faults_supported(true) && ferry_sys::mm::hugetlb_dont_need_supported()
        }
        Backend::Anonymous => false,
    };
    kernel && ram.file().is_some()
}

/// Zeros written into the file for a zero page.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Where every guest page stands during postcopy, and how faults went.
pub(crate) struct Space {
    /// Keeps guest memory mapped while it is registered and placed into.
    _ram: Arc<GuestRam>,
    ranges: Vec<FaultRange>,
    placement: Placement,
    placed: PageBits,
    requested: PageBits,
    written: Arc<PageBits>,
    /// Faulted pages not placed yet: when the first fault on each was read, and by whom.
    waiting: Mutex<HashMap<u64, (Instant, u32)>>,
    stats: Mutex<FaultStats>,
    faults: AtomicU64,
    requested_pages: AtomicU64,
    pushed_pages: AtomicU64,
}

#[derive(Default)]
struct FaultStats {
    latencies_us: Vec<u32>,
    /// Per faulting thread (vCPU): faults resolved and time spent waiting.
    per_thread: BTreeMap<u32, (u64, Duration)>,
}

/// What postcopy did on the destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyStats {
    /// Fault queues (userfaultfds with a handler thread each).
    pub queues: usize,
    /// How pages were placed: `copy` (`UFFDIO_COPY`), `file` (written into the memory
    /// file, then mapped with `UFFDIO_CONTINUE`) or `file-2m` (the same on hugetlb memory,
    /// a whole huge page mapped at a time).
    pub placement: &'static str,
    /// Faults the guest (or the VMM on its behalf) took on missing pages.
    pub faults: u64,
    /// Pages asked for on the urgent channel.
    pub requested_pages: u64,
    /// Pages the background push carried (placed, or found placed already).
    pub pushed_pages: u64,
    /// Fault latency (fault read to page placed), median, µs.
    pub latency_p50_us: u64,
    /// Fault latency, 99th percentile, µs.
    pub latency_p99_us: u64,
    /// Fault latency, longest, µs.
    pub latency_max_us: u64,
    /// Per faulting thread (the vCPUs): faults and time blocked.
    pub threads: Vec<ThreadFaults>,
    /// From the guest running here to the last page placed, ms.
    pub postcopy_ms: f64,
}

/// One faulting thread's share.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThreadFaults {
    /// Its thread id.
    pub tid: u32,
    /// Faults it waited on.
    pub faults: u64,
    /// Time it waited, ms.
    pub blocked_ms: f64,
}

fn uffd_err(what: &'static str) -> impl FnOnce(ferry_sys::uffd::UffdError) -> MigrateError {
    move |source| MigrateError::Uffd { what, source }
}

/// Placement through the memory file, after `hidden` were made missing.
fn file_placement(ram: &GuestRam, hidden: &[PageRun]) -> Result<Placement, MigrateError> {
    let alias = ram.file_alias()?.ok_or(MigrateError::NoMemoryFile)?;
    let (missing, claimed) = (PageBits::new(ram), PageBits::full(ram));
    // On hugetlb a huge page is hidden whole: its pieces that were not made missing are
    // right in the file already.
    let huge = (ram.file_page_size() > PAGE_SIZE).then(|| HugeCounts::new(ram));
    for r in hidden {
        for p in 0..u64::from(r.pages) {
            let g = r.gpa + p * PAGE_SIZE;
            if claimed.take(g) {
                missing.set(g);
                if let Some(h) = &huge {
                    h.lose(g);
                }
            }
        }
    }
    Ok(Placement::File {
        alias,
        missing,
        claimed,
        huge,
    })
}

/// Splits guest memory into about `queues` ranges (region boundaries cut too).
fn split(ram: &GuestRam, queues: usize) -> Vec<(u64, u64, usize)> {
    let queues = queues.clamp(1, MAX_FAULT_QUEUES) as u64;
    let per = ram.size().div_ceil(queues).div_ceil(RANGE_ALIGN) * RANGE_ALIGN;
    let mut out = Vec::new();
    for (r, h) in ram.regions().iter().zip(ram.host_regions()) {
        let mut off = 0;
        while off < r.size {
            let len = per.min(r.size - off);
            out.push((r.gpa + off, len, h.addr + off as usize));
            off += len;
        }
    }
    out
}

impl Space {
    /// Registers guest memory for faults in about `queues` ranges: MISSING faults, and MINOR
    /// ones too with `hidden`, the pages made missing by hiding them rather than freeing
    /// them (see [`file_placement_possible`]).
    pub(crate) fn new(
        ram: Arc<GuestRam>,
        written: Arc<PageBits>,
        queues: usize,
        hidden: Option<&[PageRun]>,
    ) -> Result<Space, MigrateError> {
        let placement = match hidden {
            Some(runs) => file_placement(&ram, runs)?,
            None => Placement::Copy,
        };
        let minor = matches!(placement, Placement::File { .. });
        let mut ranges = Vec::new();
        for (gpa, len, hva) in split(&ram, queues) {
            ranges.push(FaultRange {
                gpa,
                len,
                hva,
                uffd: Arc::new(register(hva, len as usize, minor)?),
            });
        }
        Ok(Space {
            placed: PageBits::new(&ram),
            requested: PageBits::new(&ram),
            _ram: ram,
            ranges,
            placement,
            written,
            waiting: Mutex::new(HashMap::new()),
            stats: Mutex::new(FaultStats::default()),
            faults: AtomicU64::new(0),
            requested_pages: AtomicU64::new(0),
            pushed_pages: AtomicU64::new(0),
        })
    }

    fn range_of(&self, gpa: u64) -> Option<&FaultRange> {
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
    }

    /// Places `data` (whole pages) at `gpa`, skipping pages already present; `pushed` says
    /// whether it came from the background push (for the statistics).
    pub(crate) fn place(
        &self,
        channel: Channel,
        gpa: u64,
        data: &[u8],
        pushed: bool,
    ) -> Result<(), MigrateError> {
        let len = data.len() as u64;
        match &self.placement {
            Placement::Copy => self.each_piece(channel, gpa, len, |r, at, off, len| {
                let src = data
                    .get(off as usize..(off + len) as usize)
                    .unwrap_or_default();
                r.uffd
                    .copy(at, src)
                    .map_err(uffd_err("placing a page (UFFDIO_COPY)"))
            })?,
            Placement::File { .. } => self.place_in_file(channel, gpa, len, Some(data))?,
        }
        if pushed {
            let pages = len / PAGE_SIZE;
            self.pushed_pages.fetch_add(pages, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Places zero pages over `pages` pages at `gpa`, skipping pages already present.
    pub(crate) fn place_zero(
        &self,
        channel: Channel,
        gpa: u64,
        pages: u64,
        pushed: bool,
    ) -> Result<(), MigrateError> {
        let len = pages * PAGE_SIZE;
        match &self.placement {
            Placement::Copy => self.each_piece(channel, gpa, len, |r, at, _, len| {
                r.uffd
                    .zero(at, len as usize)
                    .map_err(uffd_err("placing a zero page (UFFDIO_ZEROPAGE)"))
            })?,
            Placement::File { .. } => self.place_in_file(channel, gpa, len, None)?,
        }
        if pushed {
            self.pushed_pages.fetch_add(pages, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Places `len` bytes at `gpa` through the memory file: `data`, or zeros if `None`.
    /// Only pages this call claims are written, and each is mapped right after; a page
    /// someone else claimed is theirs to place (and is placed, or about to be).
    fn place_in_file(
        &self,
        channel: Channel,
        gpa: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), MigrateError> {
        let Placement::File { claimed, .. } = &self.placement else {
            return Err(MigrateError::NoMemoryFile);
        };
        let outside = || MigrateError::OutsideRam {
            channel,
            gpa,
            pages: u32::try_from(len / PAGE_SIZE).unwrap_or(u32::MAX),
        };
        let mut off = 0;
        while off < len {
            let g = gpa + off;
            let r = self.range_of(g).ok_or_else(outside)?;
            let end = off + (len - off).min(r.gpa + r.len - g);
            // Runs of pages claimed here, each written and mapped as one.
            let mut run: Option<u64> = None;
            for p in (off..end).step_by(PAGE_SIZE as usize) {
                let mine = !claimed.test_and_set(gpa + p);
                match (mine, run) {
                    (true, None) => run = Some(p),
                    (false, Some(from)) => {
                        self.write_and_map(r, channel, gpa, from..p, data)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run {
                self.write_and_map(r, channel, gpa, from..end, data)?;
            }
            off = end;
        }
        Ok(())
    }

    /// Writes bytes `span` of what is placed at `gpa` (zeros if `data` is `None`) into the
    /// file through the second mapping, then maps them into the guest under range `r`
    /// (on hugetlb, each huge page once it is complete) and marks them placed. The pages
    /// are claimed by the caller; whatever fails gives back the claims of the pages not
    /// mapped, so that their next copy is written.
    fn write_and_map(
        &self,
        r: &FaultRange,
        channel: Channel,
        gpa: u64,
        span: std::ops::Range<u64>,
        data: Option<&[u8]>,
    ) -> Result<(), MigrateError> {
        let first = gpa + span.start;
        let len = span.end - span.start;
        let bytes = match data {
            Some(d) => Some(d.get(span.start as usize..span.end as usize).ok_or(
                MigrateError::OutsideRam {
                    channel,
                    gpa: first,
                    pages: (len / PAGE_SIZE) as u32,
                },
            )?),
            None => None,
        };
        // Known as written before the bytes land, as precopy does: should this attempt fail,
        // the next one's zero runs clear these pages.
        for g in (first..first + len).step_by(PAGE_SIZE as usize) {
            self.written.set(g);
        }
        if let Err(e) = self.write_file(channel, first, len, bytes) {
            self.unclaim(first, len);
            return Err(e);
        }
        let Placement::File {
            huge: Some(counts), ..
        } = &self.placement
        else {
            return self.map_or_unclaim(r, first, len);
        };
        // Each huge page the span touched is mapped once its last piece is in.
        let last = first + len;
        let mut unit = first / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE;
        while unit < last {
            let (a, b) = (first.max(unit), last.min(unit + HUGE_PAGE_SIZE));
            let pieces = ((b - a) / PAGE_SIZE) as u32;
            if counts.add(unit, pieces) {
                if let Err(e) = self.map_placed(r, unit, HUGE_PAGE_SIZE) {
                    // This huge page's pieces, and those of the span not counted yet.
                    counts.take_back(unit, pieces);
                    self.unclaim(a, last - a);
                    return Err(e);
                }
            }
            unit += HUGE_PAGE_SIZE;
        }
        Ok(())
    }

    /// Writes `len` bytes at `gpa` into the file: `bytes`, or zeros.
    fn write_file(
        &self,
        channel: Channel,
        gpa: u64,
        len: u64,
        bytes: Option<&[u8]>,
    ) -> Result<(), MigrateError> {
        let Placement::File { alias, huge, .. } = &self.placement else {
            return Err(MigrateError::NoMemoryFile);
        };
        let outside = || MigrateError::OutsideRam {
            channel,
            gpa,
            pages: (len / PAGE_SIZE) as u32,
        };
        // Mapping the run's file pages in one call is cheaper than a fault per page, and
        // a file that cannot take them (a hole where no page is left, hugetlb included:
        // a stopped preparation's undo gives its holes' huge pages back) says so here
        // instead of by SIGBUS in the copy below. hugetlb in whole huge pages.
        let (from, to) = match huge {
            None => (gpa, gpa + len),
            Some(_) => (
                gpa / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE,
                (gpa + len).div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE,
            ),
        };
        let addr = alias
            .get_host_address(GuestAddress(from))
            .map_err(|_| outside())?;
        ferry_sys::mm::populate_write(addr as usize, (to - from) as usize)
            .map_err(|e| MigrateError::io("preparing pages of the guest memory file")(e.into()))?;
        match bytes {
            Some(b) => alias
                .write_slice(b, GuestAddress(gpa))
                .map_err(|_| outside()),
            None => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZEROS.len() as u64);
                    alias
                        .write_slice(&ZEROS[..n as usize], GuestAddress(gpa + done))
                        .map_err(|_| outside())?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Maps `len` written bytes at `gpa`; if that fails, maps what it can page by page and
    /// gives back the claims of the rest.
    fn map_or_unclaim(&self, r: &FaultRange, gpa: u64, len: u64) -> Result<(), MigrateError> {
        let Err(e) = self.map_placed(r, gpa, len) else {
            return Ok(());
        };
        for g in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
            if !self.placed.get(g) && self.map_placed(r, g, PAGE_SIZE).is_err() {
                self.unclaim(g, PAGE_SIZE);
            }
        }
        Err(e)
    }

    /// Gives back the claims on `len` bytes at `gpa`.
    fn unclaim(&self, gpa: u64, len: u64) {
        if let Placement::File { claimed, .. } = &self.placement {
            for g in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
                claimed.take(g);
            }
        }
    }

    /// Maps `len` bytes at `gpa` (inside range `r`), whose file pages are written, into the
    /// guest, and marks them placed.
    fn map_placed(&self, r: &FaultRange, gpa: u64, len: u64) -> Result<(), MigrateError> {
        let unit = self.unit();
        let mut done = 0;
        while done < len {
            let at = r.hva + (gpa + done - r.gpa) as usize;
            let placed = r
                .uffd
                .continue_pages(at, (len - done) as usize)
                .map_err(uffd_err("mapping a page (UFFDIO_CONTINUE)"))?;
            match placed {
                Placed::All => {
                    self.mark(gpa + done, len - done);
                    return Ok(());
                }
                Placed::Exists { done: d } => {
                    // Never expected: only pages the guest could not map are ever claimed.
                    tracing::error!(
                        gpa = gpa + done + d,
                        "postcopy: a page claimed for placement was mapped already"
                    );
                    let step = (d + unit).min(len - done);
                    self.mark(gpa + done, step);
                    let _ = r.uffd.wake(at, step as usize);
                    done += step;
                }
            }
        }
        Ok(())
    }

    /// Runs `op(range, host address, offset, len)` over `len` bytes at `gpa`, piece by piece
    /// within ranges, going on past pages that were present already; marks what it placed.
    fn each_piece(
        &self,
        channel: Channel,
        gpa: u64,
        len: u64,
        op: impl Fn(&FaultRange, usize, u64, u64) -> Result<Placed, MigrateError>,
    ) -> Result<(), MigrateError> {
        let outside = || MigrateError::OutsideRam {
            channel,
            gpa,
            pages: u32::try_from(len / PAGE_SIZE).unwrap_or(u32::MAX),
        };
        let mut off = 0;
        while off < len {
            let g = gpa + off;
            let r = self.range_of(g).ok_or_else(outside)?;
            let n = (len - off).min(r.gpa + r.len - g);
            let mut done = 0;
            while done < n {
                let at = r.hva + (g + done - r.gpa) as usize;
                match op(r, at, off + done, n - done)? {
                    Placed::All => {
                        self.mark(g + done, n - done);
                        done = n;
                    }
                    Placed::Exists { done: d } => {
                        // The pages before the present one are placed; the present one was.
                        let step = (d + PAGE_SIZE).min(n - done);
                        self.mark(g + done, step);
                        done += step;
                    }
                }
            }
            off += n;
        }
        Ok(())
    }

    /// Records pages as placed, and the latency of the faults that waited for them.
    fn mark(&self, gpa: u64, len: u64) {
        let now = Instant::now();
        let mut resolved = Vec::new();
        for p in 0..len / PAGE_SIZE {
            let g = gpa + p * PAGE_SIZE;
            self.placed.set(g);
            self.written.set(g);
            if self.requested.get(g) {
                resolved.push(g);
            }
        }
        if resolved.is_empty() {
            return;
        }
        let mut waiting = lock(&self.waiting);
        let done: Vec<_> = resolved.iter().filter_map(|g| waiting.remove(g)).collect();
        drop(waiting);
        let mut stats = lock(&self.stats);
        for (since, tid) in done {
            let waited = now.saturating_duration_since(since);
            stats
                .latencies_us
                .push(u32::try_from(waited.as_micros()).unwrap_or(u32::MAX));
            let t = stats.per_thread.entry(tid).or_default();
            t.0 += 1;
            t.1 += waited;
        }
    }

    /// Handles faults read from range `r`'s userfaultfd: wakes those whose page is here by
    /// now, and returns the runs of pages nobody has asked for yet (on hugetlb memory, the
    /// missing pieces of the faulting huge page).
    fn triage(&self, r: &FaultRange, faults: &[Fault], runs: &mut Vec<PageRun>) {
        let now = Instant::now();
        let unit = self.unit();
        for f in faults {
            let hva = (f.addr as usize) & !(unit as usize - 1);
            let Some(off) = hva.checked_sub(r.hva).filter(|o| (*o as u64) < r.len) else {
                continue;
            };
            let gpa = r.gpa + off as u64;
            self.faults.fetch_add(1, Ordering::Relaxed);
            if self.placed.get(gpa) || !self.comes_from_source(gpa) {
                // Placed between the fault and now: only the wake-up is missing. (Or, with
                // the file's pages kept, a page the file holds right whose mapping is gone:
                // map it again.)
                self.remap_or_wake(r, hva);
                continue;
            }
            lock(&self.waiting).entry(gpa).or_insert((now, f.tid));
            self.wanted(gpa, runs);
        }
    }

    /// Whether a fault on `gpa` (a page, or a huge page on hugetlb) waits for the source:
    /// with the file's pages kept, only if it was made missing (or holds a piece that was).
    fn comes_from_source(&self, gpa: u64) -> bool {
        match &self.placement {
            Placement::Copy => true,
            Placement::File {
                missing,
                huge: None,
                ..
            } => missing.get(gpa),
            Placement::File { missing, .. } => (gpa..gpa + HUGE_PAGE_SIZE)
                .step_by(PAGE_SIZE as usize)
                .any(|g| missing.get(g)),
        }
    }

    /// The size of what one fault is resolved with: a page, or a huge page on hugetlb.
    fn unit(&self) -> u64 {
        match self.placement {
            Placement::File { huge: Some(_), .. } => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        }
    }

    /// Adds to `runs` what a fault on `gpa` (a page, or a huge page on hugetlb) needs that
    /// nobody has asked for yet, and counts it as asked for.
    fn wanted(&self, gpa: u64, runs: &mut Vec<PageRun>) {
        let Placement::File {
            claimed,
            huge: Some(_),
            ..
        } = &self.placement
        else {
            if !self.requested.test_and_set(gpa) {
                push_run(runs, gpa);
            }
            return;
        };
        for g in (gpa..gpa + HUGE_PAGE_SIZE).step_by(PAGE_SIZE as usize) {
            if !claimed.get(g) && !self.requested.test_and_set(g) {
                push_run(runs, g);
            }
        }
        // The huge page's first piece stands for it among the waiting faults.
        self.requested.set(gpa);
    }

    /// What a fault on `gpa` (see [`Space::wanted`]) still lacks, asked for or not: what a
    /// reconnected source is asked for again.
    fn lacking(&self, gpa: u64, runs: &mut Vec<PageRun>) {
        if self.placed.get(gpa) {
            return;
        }
        match &self.placement {
            Placement::File {
                claimed,
                huge: Some(_),
                ..
            } => {
                for g in (gpa..gpa + HUGE_PAGE_SIZE).step_by(PAGE_SIZE as usize) {
                    if !claimed.get(g) {
                        push_run(runs, g);
                    }
                }
            }
            _ => push_run(runs, gpa),
        }
    }

    /// Wakes the waiters on a placed page at `hva`, mapping it first where the file holds
    /// it (a MINOR fault on it would otherwise come back at once).
    fn remap_or_wake(&self, r: &FaultRange, hva: usize) {
        let len = self.unit() as usize;
        if let Placement::File { alias, .. } = &self.placement {
            let mut tries = 0;
            loop {
                match r.uffd.continue_pages(hva, len) {
                    Ok(Placed::All) => return,
                    Ok(Placed::Exists { .. }) => break,
                    // The file has no page there (a hole: memory never written, so zeros):
                    // have one allocated, never over a page that is there, and map it.
                    Err(_) if tries == 0 => {
                        tries += 1;
                        let gpa = r.gpa + (hva - r.hva) as u64;
                        if let Ok(a) = alias.get_host_address(GuestAddress(gpa)) {
                            let _ = ferry_sys::mm::populate_write(a as usize, len);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("postcopy: mapping a page the file holds: {e}");
                        break;
                    }
                }
            }
        }
        let _ = r.uffd.wake(hva, len);
    }

    /// Pages made missing that are not placed (with the file's pages kept; anonymous
    /// placement keeps no record of what was made missing, and says 0).
    pub(crate) fn unplaced(&self) -> u64 {
        let Placement::File { missing, .. } = &self.placement else {
            return 0;
        };
        missing
            .words()
            .iter()
            .zip(self.placed.words())
            .map(|(m, p)| u64::from((m & !p).count_ones()))
            .sum()
    }

    /// What postcopy did so far.
    pub(crate) fn stats(&self, since: Instant) -> PostcopyStats {
        let stats = lock(&self.stats);
        let mut lat = stats.latencies_us.clone();
        lat.sort_unstable();
        let pick = |q: f64| {
            let i = ((lat.len() as f64 - 1.0) * q).round().max(0.0) as usize;
            lat.get(i).copied().map(u64::from).unwrap_or(0)
        };
        PostcopyStats {
            queues: self.ranges.len(),
            placement: match self.placement {
                Placement::Copy => "copy",
                Placement::File { huge: None, .. } => "file",
                Placement::File { huge: Some(_), .. } => "file-2m",
            },
            faults: self.faults.load(Ordering::Relaxed),
            requested_pages: self.requested_pages.load(Ordering::Relaxed),
            pushed_pages: self.pushed_pages.load(Ordering::Relaxed),
            latency_p50_us: pick(0.5),
            latency_p99_us: pick(0.99),
            latency_max_us: lat.last().copied().map(u64::from).unwrap_or(0),
            threads: stats
                .per_thread
                .iter()
                .map(|(tid, (n, d))| ThreadFaults {
                    tid: *tid,
                    faults: *n,
                    blocked_ms: d.as_secs_f64() * 1e3,
                })
                .collect(),
            postcopy_ms: since.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// Faults are ordinary again (every page is here, or the attempt is over).
    fn unregister(&self) {
        for r in &self.ranges {
            if let Err(e) = r.uffd.unregister(r.hva, r.len as usize) {
                tracing::warn!("postcopy: unregistering guest memory: {e}");
            }
        }
    }
}

/// A userfaultfd with `[hva, hva + len)` registered: for MISSING faults, and MINOR ones too
/// if `minor`.
fn register(hva: usize, len: usize, minor: bool) -> Result<Uffd, MigrateError> {
    if minor {
        let uffd = Uffd::with_minor().map_err(uffd_err("opening a userfaultfd"))?;
        uffd.register_missing_minor(hva, len).map_err(uffd_err(
            "registering guest memory for missing and minor faults",
        ))?;
        return Ok(uffd);
    }
    let uffd = Uffd::new().map_err(uffd_err("opening a userfaultfd"))?;
    uffd.register_missing(hva, len)
        .map_err(uffd_err("registering guest memory for missing-page faults"))?;
    Ok(uffd)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running fault machinery: one handler per range, and the urgent channel's receiver.
pub(crate) struct Faults {
    ctx: Ctx,
    threads: Vec<JoinHandle<()>>,
    /// The urgent channel (a clone, to shut it down) and where requests are written.
    urgent: Stream,
    writer: Arc<Mutex<Stream>>,
    started: Instant,
    unregistered: bool,
}

/// What a fault thread needs.
#[derive(Clone)]
struct Ctx {
    space: Arc<Space>,
    stop: Arc<AtomicBool>,
    wire: Wire,
    /// The attempt's id, which a reconnection changes (events of old channels are stale).
    attempt: Arc<AtomicU64>,
    tx: Sender<Event>,
}

impl Ctx {
    /// Reports a failure to the event loop, unless postcopy is being stopped anyway.
    fn fail(&self, e: MigrateError) {
        self.fail_as(e, self.attempt.load(Ordering::Relaxed));
    }

    fn fail_as(&self, e: MigrateError, attempt: u64) {
        if !self.stop.load(Ordering::Relaxed) {
            let _ = self.tx.send(Event::Data {
                attempt,
                ev: DataEvent::Failed(e),
            });
        }
    }
}

fn clone_urgent(s: &Stream) -> Result<Stream, MigrateError> {
    s.try_clone()
        .map_err(MigrateError::io("cloning the urgent channel"))
}

/// Starts the urgent channel's receiver on `reader`; its failure is reported as the
/// attempt it was started for (a reconnection makes it stale).
fn spawn_urgent_receiver(ctx: &Ctx, reader: Stream) -> Result<JoinHandle<()>, MigrateError> {
    let rctx = ctx.clone();
    let attempt = ctx.attempt.load(Ordering::Relaxed);
    std::thread::Builder::new()
        .name("mig-urgent-rx".into())
        .spawn(move || {
            crate::latency::control_thread();
            if let Err(e) = receive_urgent(&rctx, reader) {
                rctx.fail_as(e, attempt);
            }
        })
        .map_err(MigrateError::io("starting the urgent channel receiver"))
}

impl Faults {
    /// Which pages are placed, one bit per page over the regions in order (each padded to
    /// whole words): what a reconnecting source need not push again.
    pub(crate) fn placed_words(&self) -> Vec<u64> {
        self.ctx.space.placed.words()
    }

    /// Starts a handler per range of `space` and the urgent receiver on `urgent`.
    pub(crate) fn start(
        space: Arc<Space>,
        urgent: Stream,
        wire: Wire,
        attempt: u64,
        tx: Sender<Event>,
    ) -> Result<Faults, MigrateError> {
        let ctx = Ctx {
            space: space.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            wire,
            attempt: Arc::new(AtomicU64::new(attempt)),
            tx,
        };
        let writer = Arc::new(Mutex::new(clone_urgent(&urgent)?));
        // Built first, so that a failure below drops it: what started stops again.
        let mut f = Faults {
            ctx,
            threads: Vec::new(),
            urgent,
            writer,
            started: Instant::now(),
            unregistered: false,
        };
        for i in 0..space.ranges.len() {
            let (ctx, writer) = (f.ctx.clone(), f.writer.clone());
            let t = std::thread::Builder::new()
                .name(format!("mig-fault{i}"))
                .spawn(move || {
                    crate::latency::control_thread();
                    if let Err(e) = handle_faults(&ctx, i, &writer) {
                        ctx.fail(e);
                    }
                })
                .map_err(MigrateError::io("starting a fault handler thread"))?;
            f.threads.push(t);
        }
        let reader = clone_urgent(&f.urgent)?;
        f.threads.push(spawn_urgent_receiver(&f.ctx, reader)?);
        Ok(f)
    }

    /// Restarts the clock of [`PostcopyStats::postcopy_ms`] (the guest runs from now on).
    pub(crate) fn guest_runs(&mut self) {
        self.started = Instant::now();
    }

    /// A reconnected source: requests go out on its new urgent channel, its answers are
    /// read there, and every page a vCPU still waits for is asked for again (the old
    /// request, or its answer, may have been lost with the old link). Events of the old
    /// channels carry the old attempt id from now on.
    pub(crate) fn rejoin(&mut self, urgent: Stream, attempt: u64) -> Result<(), MigrateError> {
        // The old link first: a handler blocked on it gets its error now, and reports it
        // (holding the writer) as the old attempt.
        self.urgent.shutdown();
        let writer = clone_urgent(&urgent)?;
        let reader = clone_urgent(&urgent)?;
        let runs = {
            let mut w = lock(&self.writer);
            *w = writer;
            self.ctx.attempt.store(attempt, Ordering::Relaxed);
            self.still_waiting()
        };
        self.threads.push(spawn_urgent_receiver(&self.ctx, reader)?);
        self.urgent = urgent;
        tracing::info!(
            pages = runs.iter().map(|r| u64::from(r.pages)).sum::<u64>(),
            "postcopy: the source reconnected; asking again for the pages vCPUs wait for"
        );
        send_requests(&mut lock(&self.writer), &self.ctx, &runs, &mut 0)
    }

    /// The pages a vCPU faulted on that are not placed yet, as runs.
    fn still_waiting(&self) -> Vec<PageRun> {
        let space = &self.ctx.space;
        let mut waiting: Vec<u64> = lock(&space.waiting).keys().copied().collect();
        waiting.sort_unstable();
        let mut runs = Vec::new();
        for gpa in waiting {
            space.lacking(gpa, &mut runs);
        }
        runs
    }

    /// The statistics so far.
    pub(crate) fn stats(&self) -> PostcopyStats {
        self.ctx.space.stats(self.started)
    }

    /// Pages made missing that are not placed yet (see [`Space::unplaced`]).
    pub(crate) fn unplaced(&self) -> u64 {
        self.ctx.space.unplaced()
    }

    /// Stops every thread and unregisters guest memory; returns the statistics.
    pub(crate) fn stop(mut self) -> PostcopyStats {
        self.shut_down();
        self.ctx.space.stats(self.started)
    }

    fn shut_down(&mut self) {
        self.ctx.stop.store(true, Ordering::Relaxed);
        self.urgent.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if !self.unregistered {
            self.unregistered = true;
            self.ctx.space.unregister();
        }
    }
}

/// Whatever way the machinery ends (a half-started one included), its threads stop and
/// guest memory is unregistered: a later attempt must never write into registered memory.
impl Drop for Faults {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Writes page requests for `runs` (in batches the protocol allows) on `writer`.
fn send_requests(
    writer: &mut Stream,
    ctx: &Ctx,
    runs: &[PageRun],
    seq: &mut u32,
) -> Result<(), MigrateError> {
    let mut batch: Vec<PageRun> = Vec::new();
    let mut pages = 0u64;
    let flush = |batch: &mut Vec<PageRun>, pages: &mut u64, seq: &mut u32, w: &mut Stream| {
        if batch.is_empty() {
            return Ok(());
        }
        *seq = seq.wrapping_add(1);
        let msg = Message::PageRequest {
            seq: *seq,
            runs: std::mem::take(batch),
        };
        let deadline = Instant::now() + REQUEST_SEND_TIMEOUT;
        send_by(w, &msg, ctx.wire.sums, deadline).map_err(|source| MigrateError::Send {
            channel: Channel::Urgent,
            phase: "postcopy",
            source,
        })?;
        ctx.space
            .requested_pages
            .fetch_add(*pages, Ordering::Relaxed);
        *pages = 0;
        Ok(())
    };
    for r in runs {
        // Runs of at most one batch of pages each.
        let mut rest = *r;
        while rest.pages > 0 {
            let room = MAX_BATCH_PAGES as u64 - pages;
            let take = u64::from(rest.pages).min(room) as u32;
            batch.push(PageRun {
                gpa: rest.gpa,
                pages: take,
            });
            pages += u64::from(take);
            rest.gpa += u64::from(take) * PAGE_SIZE;
            rest.pages -= take;
            if pages == MAX_BATCH_PAGES as u64 || batch.len() == MAX_RUNS as usize {
                flush(&mut batch, &mut pages, seq, writer)?;
            }
        }
    }
    flush(&mut batch, &mut pages, seq, writer)
}

/// A handler: reads faults from range `i`'s userfaultfd and asks for the missing pages.
fn handle_faults(ctx: &Ctx, i: usize, writer: &Mutex<Stream>) -> Result<(), MigrateError> {
    let r = ctx.space.ranges.get(i).ok_or(MigrateError::NotTracking)?;
    let mut faults = Vec::with_capacity(64);
    let mut runs = Vec::with_capacity(64);
    let mut seq = 0u32;
    while !ctx.stop.load(Ordering::Relaxed) {
        faults.clear();
        r.uffd
            .read_faults(&mut faults, 64, HANDLER_POLL)
            .map_err(uffd_err("reading page faults"))?;
        runs.clear();
        ctx.space.triage(r, &faults, &mut runs);
        if runs.is_empty() {
            continue;
        }
        // A broken link loses the request, not the handler: the pages stay waiting and
        // are asked for again when the source reconnects.
        if let Err(e) = send_requests(&mut lock(writer), ctx, &runs, &mut seq) {
            ctx.fail(e);
        }
    }
    Ok(())
}

/// The urgent channel's receiver: places the pages the handlers asked for.
fn receive_urgent(ctx: &Ctx, mut stream: Stream) -> Result<(), MigrateError> {
    let mut scratch = Vec::new();
    let mut buf = Vec::new();
    let read_err = |source| MigrateError::Receive {
        channel: Channel::Urgent,
        phase: "postcopy",
        source,
    };
    loop {
        let msg = match read_message_checked(&mut stream, &mut scratch, ctx.wire.sums) {
            Ok(m) => m,
            Err(ProtoError::Eof) => return Ok(()),
            Err(e) => return Err(read_err(e)),
        };
        match msg {
            Message::Pages { runs, sums, .. } => {
                let how = Arrival {
                    channel: Channel::Urgent,
                    sums_required: ctx.wire.sums,
                    pushed: false,
                };
                receive_pages(&mut stream, &mut buf, &ctx.space, how, &runs, &sums)?;
            }
            Message::ZeroPages { runs, .. } => {
                for r in &runs {
                    ctx.space
                        .place_zero(Channel::Urgent, r.gpa, u64::from(r.pages), false)?;
                }
            }
            m => {
                return Err(MigrateError::Unexpected {
                    message: m.name(),
                    phase: "postcopy",
                    channel: Channel::Urgent,
                })
            }
        }
    }
}

/// Where a Pages frame came from, and what it must carry.
pub(crate) struct Arrival {
    pub(crate) channel: Channel,
    /// Checksums were agreed: a frame without them is refused.
    pub(crate) sums_required: bool,
    /// It is the background push (for the statistics).
    pub(crate) pushed: bool,
}

/// Reads a Pages frame's payload into `buf`, then checks it and places it; returns its
/// bytes.
pub(crate) fn receive_pages(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    space: &Space,
    how: Arrival,
    runs: &[PageRun],
    sums: &[u64],
) -> Result<u64, MigrateError> {
    if how.sums_required && sums.is_empty() {
        return Err(MigrateError::MissingPageSums {
            channel: how.channel,
            kind: "Pages",
        });
    }
    let len = runs.iter().map(|r| u64::from(r.pages)).sum::<u64>() * PAGE_SIZE;
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(|e| MigrateError::Receive {
        channel: how.channel,
        phase: "postcopy",
        source: ProtoError::Io(e),
    })?;
    place_checked(space, how.channel, runs, sums, buf, how.pushed)?;
    Ok(len)
}

/// Checks `data` against `sums` (one per page, or none) and places it run by run. A page
/// that does not match is never placed: the guest would run on it.
pub(crate) fn place_checked(
    space: &Space,
    channel: Channel,
    runs: &[PageRun],
    sums: &[u64],
    data: &[u8],
    pushed: bool,
) -> Result<(), MigrateError> {
    let pages = runs
        .iter()
        .flat_map(|r| (0..u64::from(r.pages)).map(move |p| r.gpa + p * PAGE_SIZE));
    for ((gpa, sum), page) in pages.zip(sums).zip(data.chunks(PAGE_SIZE as usize)) {
        if page_sum(page) != *sum {
            return Err(MigrateError::CorruptPostcopyPage { channel, gpa });
        }
    }
    let mut rest = data;
    for r in runs {
        let len = (u64::from(r.pages) * PAGE_SIZE) as usize;
        let (this, tail) = rest.split_at_checked(len).ok_or(MigrateError::OutsideRam {
            channel,
            gpa: r.gpa,
            pages: r.pages,
        })?;
        space.place(channel, r.gpa, this, pushed)?;
        rest = tail;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_memory::ram::{Backend, MemoryConfig};

    fn ram(mib: u64, backend: Backend) -> Arc<GuestRam> {
        Arc::new(
            GuestRam::new(MemoryConfig {
                size: mib << 20,
                backend,
                thp: false,
            })
            .unwrap(),
        )
    }

    #[test]
    fn split_covers_memory_in_aligned_ranges() {
        let r = ram(64, Backend::Anonymous);
        for q in [1, 2, 3, 8, 100] {
            let parts = split(&r, q);
            let total: u64 = parts.iter().map(|p| p.1).sum();
            assert_eq!(total, r.size());
            assert!(parts.len() >= q.min(MAX_FAULT_QUEUES).min(32));
            for (gpa, len, hva) in &parts {
                assert_eq!(r.host_addr(*gpa, *len), Some(*hva));
            }
        }
    }

    /// Fills all of `r` with stale bytes (0xEE), which must never show where a page is placed.
    fn fill_stale(r: &GuestRam) {
        let stale = vec![0xEEu8; r.size() as usize];
        vm_memory::Bytes::write_slice(r.mem(), &stale, vm_memory::GuestAddress(0)).unwrap();
    }

    /// Makes all of `r` missing as postcopy does; where the file keeps its pages, they hold
    /// stale bytes (0xEE) first, which must never show.
    fn make_missing(r: &GuestRam) -> bool {
        let keep = file_placement_possible(r);
        if keep {
            fill_stale(r);
            r.hide(0, r.size()).unwrap();
        } else {
            r.discard(0, r.size()).unwrap();
        }
        keep
    }

    /// The next faults on `range` (waits up to 5 s for them).
    fn next_faults(range: &FaultRange) -> Vec<Fault> {
        let mut faults = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while faults.is_empty() && Instant::now() < deadline {
            range
                .uffd
                .read_faults(&mut faults, 8, Duration::from_millis(100))
                .unwrap();
        }
        assert!(!faults.is_empty(), "no fault within 5 s");
        faults
    }

    /// A thread reading byte `gpa` of `r` (it waits there if the page is missing).
    fn touch(r: &Arc<GuestRam>, gpa: u64) -> std::thread::JoinHandle<u8> {
        let r = r.clone();
        std::thread::spawn(move || byte(&r, gpa))
    }

    /// All of `r` as page runs (what `--postcopy` makes missing).
    fn all(r: &GuestRam) -> Vec<PageRun> {
        r.regions()
            .iter()
            .map(|g| PageRun {
                gpa: g.gpa,
                pages: g.pages() as u32,
            })
            .collect()
    }

    fn byte(r: &GuestRam, g: u64) -> u8 {
        let mut b = [0u8; 1];
        vm_memory::Bytes::read_slice(r.mem(), &mut b, vm_memory::GuestAddress(g)).unwrap();
        b[0]
    }

    /// Placement never overwrites a present page, in any backend, and marks what it placed.
    fn place_skips_present(backend: Backend) {
        let r = ram(8, backend);
        let written = Arc::new(PageBits::new(&r));
        let keep = make_missing(&r);
        let space = Space::new(r.clone(), written, 2, keep.then_some(&all(&r)[..])).unwrap();
        let one = vec![1u8; PAGE_SIZE as usize];
        space.place(Channel::Urgent, 0x3000, &one, false).unwrap();
        // A run across the present page and a range boundary (4 MiB).
        let gpa = (4 << 20) - 2 * PAGE_SIZE;
        let two = vec![2u8; 4 * PAGE_SIZE as usize];
        space.place(Channel::Data(0), gpa, &two, true).unwrap();
        let three = vec![3u8; 3 * PAGE_SIZE as usize];
        space.place(Channel::Data(0), 0x2000, &three, true).unwrap();
        let byte = |g: u64| byte(&r, g);
        assert_eq!(byte(0x2000), 3);
        assert_eq!(byte(0x3000), 1, "a present page was overwritten");
        assert_eq!(byte(0x4000), 3);
        assert_eq!(byte(gpa), 2);
        assert_eq!(byte(gpa + 3 * PAGE_SIZE), 2);
        space.place_zero(Channel::Urgent, 0x2000, 4, false).unwrap();
        assert_eq!(byte(0x5000), 0);
        assert_eq!(byte(0x3000), 1);
        for g in [0x2000, 0x3000, 0x4000, 0x5000, gpa] {
            assert!(space.placed.get(g));
        }
        assert!(!space.placed.get(0x6000));
        space.unregister();
    }

    #[test]
    fn place_skips_present_anonymous() {
        place_skips_present(Backend::Anonymous);
    }

    #[test]
    fn place_skips_present_memfd() {
        place_skips_present(Backend::Memfd);
    }

    /// memfd memory keeps its file's pages: a vCPU-like thread touching a hidden page waits
    /// and then reads what was placed, never the stale bytes the file held; a page it wrote
    /// after placement is not overwritten by a later copy; a placed page whose mapping was
    /// dropped since is mapped again on its next fault, not asked for.
    #[test]
    fn memfd_placement_keeps_the_file_and_never_shows_stale_bytes() {
        let r = ram(4, Backend::Memfd);
        if !make_missing(&r) {
            eprintln!("skipped: no MINOR faults on shmem here");
            return;
        }
        let space = Arc::new(
            Space::new(r.clone(), Arc::new(PageBits::new(&r)), 1, Some(&all(&r))).unwrap(),
        );
        assert_eq!(space.stats(Instant::now()).placement, "file");
        let toucher = touch(&r, 0x5000 + 7);
        let range = &space.ranges[0];
        let faults = next_faults(range);
        let mut runs = Vec::new();
        space.triage(range, &faults, &mut runs);
        assert_eq!(
            runs,
            vec![PageRun {
                gpa: 0x5000,
                pages: 1
            }]
        );
        space
            .place(Channel::Urgent, 0x5000, &[4u8; PAGE_SIZE as usize], false)
            .unwrap();
        assert_eq!(toucher.join().unwrap(), 4);
        // The guest writes the page; the push's copy of it comes later and is dropped.
        vm_memory::Bytes::write_slice(r.mem(), &[9u8], vm_memory::GuestAddress(0x5000)).unwrap();
        space
            .place(
                Channel::Data(0),
                0x4000,
                &[6u8; 2 * PAGE_SIZE as usize],
                true,
            )
            .unwrap();
        assert_eq!(
            (byte(&r, 0x4000), byte(&r, 0x5000), byte(&r, 0x5001)),
            (6, 9, 4)
        );
        space.place_zero(Channel::Data(0), 0x6000, 1, true).unwrap();
        assert_eq!(byte(&r, 0x6000), 0, "a zero page over stale bytes");
        assert_eq!(space.unplaced(), r.size() / PAGE_SIZE - 3);
        // The kernel drops the mapping of a placed page (as reclaim would): its next fault
        // maps it again from the file.
        r.hide(0x4000, PAGE_SIZE).unwrap();
        let toucher = touch(&r, 0x4000);
        let faults = next_faults(range);
        runs.clear();
        space.triage(range, &faults, &mut runs);
        assert!(runs.is_empty(), "a placed page is never asked for again");
        assert_eq!(toucher.join().unwrap(), 6);
        space.unregister();
    }

    /// With the file's pages kept, only pages made missing are ever fetched: a page that
    /// was not, written by the guest since the switch and then unmapped by the kernel (as
    /// reclaim does), is mapped again from the file with the guest's data, and one that is
    /// a hole in the file is mapped as zeros; neither is asked for.
    #[test]
    fn a_page_not_made_missing_is_never_fetched_or_written_over() {
        let r = ram(4, Backend::Memfd);
        if !file_placement_possible(&r) {
            eprintln!("skipped: no MINOR faults on shmem here");
            return;
        }
        fill_stale(&r);
        let missing = [PageRun {
            gpa: 0x1000,
            pages: 1,
        }];
        r.hide(0x1000, PAGE_SIZE).unwrap();
        let space = Space::new(r.clone(), Arc::new(PageBits::new(&r)), 1, Some(&missing)).unwrap();
        // The guest writes a page it has, which the kernel then unmaps; another page
        // becomes a hole.
        vm_memory::Bytes::write_slice(r.mem(), &[7u8], vm_memory::GuestAddress(0x3000)).unwrap();
        r.hide(0x3000, PAGE_SIZE).unwrap();
        r.discard(0x6000, PAGE_SIZE).unwrap();
        // Whatever comes for them (a stray push) is dropped.
        space
            .place(Channel::Data(0), 0x3000, &[9u8; PAGE_SIZE as usize], true)
            .unwrap();
        let range = &space.ranges[0];
        for (gpa, want) in [(0x3000u64, 7u8), (0x6000, 0)] {
            let toucher = touch(&r, gpa);
            let faults = next_faults(range);
            let mut runs = Vec::new();
            space.triage(range, &faults, &mut runs);
            assert!(runs.is_empty(), "{gpa:#x} was asked for");
            assert_eq!(toucher.join().unwrap(), want, "{gpa:#x}");
        }
        space.unregister();
    }

    /// hugetlb memory is mapped a whole huge page at a time: a vCPU touching a hidden huge
    /// page waits until every piece that was made missing has arrived (the others are
    /// right in the file and never written over), then sees all of it at once.
    #[test]
    fn a_huge_page_is_mapped_once_its_missing_pieces_are_in() {
        let Some(_reserved) = ferry_testkit::hugepages::HugePages::reserve(2) else {
            eprintln!("skipped: cannot reserve huge pages (needs root)");
            return;
        };
        let r = ram(4, Backend::Hugetlb);
        if !file_placement_possible(&r) {
            eprintln!("skipped: no MINOR faults on hugetlbfs here");
            return;
        }
        fill_stale(&r);
        // After a precopy: two pages of the first huge page are stale, so it is hidden.
        let missing = [PageRun {
            gpa: 0x1000,
            pages: 2,
        }];
        r.hide(0, HUGE_PAGE_SIZE).unwrap();
        let space = Space::new(r.clone(), Arc::new(PageBits::new(&r)), 1, Some(&missing)).unwrap();
        assert_eq!(space.stats(Instant::now()).placement, "file-2m");
        assert_eq!(
            byte(&r, HUGE_PAGE_SIZE + 5),
            0xEE,
            "a huge page never hidden"
        );
        let toucher = {
            let r = r.clone();
            std::thread::spawn(move || (byte(&r, 0x10_0000), byte(&r, 0x1000), byte(&r, 0x2000)))
        };
        let range = &space.ranges[0];
        let faults = next_faults(range);
        let mut runs = Vec::new();
        space.triage(range, &faults, &mut runs);
        assert_eq!(
            runs,
            missing.to_vec(),
            "only the missing pieces are asked for"
        );
        // A piece that was not missing is never written, whatever arrives for it.
        space
            .place(Channel::Data(0), 0x5000, &[9u8; PAGE_SIZE as usize], true)
            .unwrap();
        space
            .place(Channel::Urgent, 0x1000, &[1u8; PAGE_SIZE as usize], false)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !toucher.is_finished(),
            "mapped before its last piece was in"
        );
        assert!(!space.placed.get(0));
        space.place_zero(Channel::Urgent, 0x2000, 1, false).unwrap();
        assert_eq!(toucher.join().unwrap(), (0xEE, 1, 0));
        assert_eq!((byte(&r, 0x3000), byte(&r, 0x5000)), (0xEE, 0xEE));
        assert!(space.placed.get(0) && space.placed.get(HUGE_PAGE_SIZE - PAGE_SIZE));
        space.unregister();
    }

    #[test]
    fn corrupt_page_is_never_placed() {
        let r = ram(4, Backend::Anonymous);
        let keep = make_missing(&r);
        let space = Space::new(
            r.clone(),
            Arc::new(PageBits::new(&r)),
            1,
            keep.then_some(&all(&r)[..]),
        )
        .unwrap();
        let data = vec![5u8; 2 * PAGE_SIZE as usize];
        let runs = [PageRun {
            gpa: 0x1000,
            pages: 2,
        }];
        let good = page_sum(&data[..4096]);
        let e = place_checked(
            &space,
            Channel::Urgent,
            &runs,
            &[good, good ^ 1],
            &data,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(e, MigrateError::CorruptPostcopyPage { gpa: 0x2000, .. }),
            "{e}"
        );
        assert!(!space.placed.get(0x1000) && !space.placed.get(0x2000));
        space.unregister();
    }
}
