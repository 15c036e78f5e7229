//! Data-channel senders: one thread per channel sends the dirty pages of its chunks for each
//! pass, straight from guest memory, and reports when the pass is done on its channel.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use ferry_memory::dirty::{DirtyChunk, DirtyError, DirtySnapshot, DirtyTracker};
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{
    encode_pages_header, encode_zero_header, Message, PageRun, MAX_BATCH_PAGES, MAX_RUNS,
};
use ferry_sys::iov;
use ferry_transport::Stream;

use crate::error::{Channel, MigrateError};
use crate::limit::RateLimiter;
use crate::progress::Progress;
use crate::CHUNK_PAGES;

/// One pass's share of one channel.
pub(crate) struct WorkItem {
    pub(crate) pass: u32,
    pub(crate) phase: &'static str,
    pub(crate) snap: Arc<DirtySnapshot>,
    pub(crate) chunks: Vec<DirtyChunk>,
}

/// What a channel sent in one pass.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassTotals {
    pub(crate) bytes: u64,
    pub(crate) data_pages: u64,
    pub(crate) zero_pages: u64,
}

impl PassTotals {
    pub(crate) fn add(&mut self, o: &PassTotals) {
        self.bytes += o.bytes;
        self.data_pages += o.data_pages;
        self.zero_pages += o.zero_pages;
    }
}

/// What a sender thread tells the event loop.
pub(crate) enum WorkerEvent {
    Done { pass: u32, totals: PassTotals },
    Failed(MigrateError),
}

/// A sender thread and the queue of its work.
pub(crate) struct Worker {
    tx: Option<Sender<WorkItem>>,
    join: Option<JoinHandle<()>>,
}

/// Every sender, and the bandwidth limit they share.
#[derive(Default)]
pub(crate) struct Workers {
    list: Vec<Worker>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Workers {
    /// How many senders there are.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }
}

/// Starts one sender per data stream; each reports through `events` wrapped by `wrap`.
pub(crate) fn spawn<E: Send + 'static>(
    data: Vec<Stream>,
    ram: &Arc<GuestRam>,
    tracker: &Arc<DirtyTracker>,
    max_bandwidth: Option<u64>,
    progress: &Arc<Progress>,
    events: &Sender<E>,
    wrap: fn(WorkerEvent) -> E,
) -> Result<Workers, MigrateError> {
    let limiter = max_bandwidth.map(|r| Arc::new(RateLimiter::new(r)));
    let mut workers = Workers {
        list: Vec::with_capacity(data.len()),
        limiter: limiter.clone(),
    };
    for (index, stream) in data.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded::<WorkItem>();
        let ctx = WorkerCtx {
            index: u16::try_from(index).unwrap_or(u16::MAX),
            ram: ram.clone(),
            tracker: tracker.clone(),
            limiter: limiter.clone(),
            progress: progress.clone(),
        };
        let events = events.clone();
        let join = std::thread::Builder::new()
            .name(format!("mig-send{index}"))
            .spawn(move || ctx.run(stream, rx, |e| events.send(wrap(e)).is_ok()))
            .map_err(MigrateError::io("starting a data channel sender thread"))?;
        workers.list.push(Worker {
            tx: Some(tx),
            join: Some(join),
        });
    }
    Ok(workers)
}

/// Hands each worker its share of `snap` for `pass`: pages are partitioned by chunk, so a
/// page always travels on the same channel and its copies arrive in order.
pub(crate) fn dispatch(
    workers: &Workers,
    ram: &GuestRam,
    pass: u32,
    phase: &'static str,
    snap: &Arc<DirtySnapshot>,
) {
    let n = workers.list.len().max(1);
    let mut lists: Vec<Vec<DirtyChunk>> = vec![Vec::new(); n];
    for c in snap.dirty_chunks(CHUNK_PAGES) {
        if let Some(list) = lists.get_mut(chunk_channel(ram, &c, n)) {
            list.push(c);
        }
    }
    for (w, chunks) in workers.list.iter().zip(lists) {
        if let Some(tx) = &w.tx {
            // A worker that died has reported its error already.
            let _ = tx.send(WorkItem {
                pass,
                phase,
                snap: snap.clone(),
                chunks,
            });
        }
    }
}

/// Stops the workers: no more work, no more waiting on the bandwidth limit, then waits for
/// them. Their sockets must be shut down first if they may be blocked on a stalled peer.
pub(crate) fn stop(workers: &mut Workers) {
    if let Some(l) = &workers.limiter {
        l.stop();
    }
    for w in workers.list.iter_mut() {
        w.tx = None;
    }
    for w in workers.list.iter_mut() {
        if let Some(j) = w.join.take() {
            let _ = j.join();
        }
    }
}

/// The channel of a chunk: its global chunk number modulo the channel count.
fn chunk_channel(ram: &GuestRam, c: &DirtyChunk, channels: usize) -> usize {
    let base = ram
        .regions()
        .get(c.region)
        .map(|r| r.gpa / PAGE_SIZE)
        .unwrap_or(0);
    (((base + c.first_page) / CHUNK_PAGES) % channels as u64) as usize
}

struct WorkerCtx {
    index: u16,
    ram: Arc<GuestRam>,
    tracker: Arc<DirtyTracker>,
    limiter: Option<Arc<RateLimiter>>,
    progress: Arc<Progress>,
}

/// Appends `gpa` to `runs`, extending the last run when contiguous. Returns false (and does
/// nothing) when a new run is needed but `runs` is full.
fn push_page(runs: &mut Vec<PageRun>, gpa: u64) -> bool {
    if let Some(last) = runs.last_mut() {
        if last.gpa + u64::from(last.pages) * PAGE_SIZE == gpa {
            last.pages += 1;
            return true;
        }
    }
    if runs.len() >= MAX_RUNS as usize {
        return false;
    }
    runs.push(PageRun { gpa, pages: 1 });
    true
}

impl WorkerCtx {
    fn run(self, mut stream: Stream, rx: Receiver<WorkItem>, report: impl Fn(WorkerEvent) -> bool) {
        for item in rx.iter() {
            match self.send_pass(&mut stream, &item) {
                Ok(totals) => {
                    if !report(WorkerEvent::Done {
                        pass: item.pass,
                        totals,
                    }) {
                        return;
                    }
                }
                Err(e) => {
                    report(WorkerEvent::Failed(e));
                    return;
                }
            }
        }
    }

    fn send_err(&self, phase: &'static str) -> impl Fn(std::io::Error) -> MigrateError + '_ {
        move |source| MigrateError::Send {
            channel: Channel::Data(self.index),
            phase,
            source,
        }
    }

    fn flush_data(
        &self,
        stream: &Stream,
        item: &WorkItem,
        runs: &mut Vec<PageRun>,
        header: &mut Vec<u8>,
        totals: &mut PassTotals,
    ) -> Result<(), MigrateError> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut slices = Vec::with_capacity(runs.len());
        let mut pages = 0u64;
        for r in runs.iter() {
            let len = u64::from(r.pages) * PAGE_SIZE;
            slices.push(self.ram.slice(r.gpa, len as usize)?);
            pages += u64::from(r.pages);
        }
        header.clear();
        encode_pages_header(item.pass, runs, header);
        let bytes = header.len() as u64 + pages * PAGE_SIZE;
        if let Some(l) = &self.limiter {
            if !l.take(bytes) {
                return Err(MigrateError::Stopping);
            }
        }
        iov::write_all_volatile(stream.as_fd(), header, &slices)
            .map_err(self.send_err(item.phase))?;
        totals.bytes += bytes;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
        runs.clear();
        Ok(())
    }

    fn flush_zero(
        &self,
        stream: &mut Stream,
        item: &WorkItem,
        runs: &mut Vec<PageRun>,
        header: &mut Vec<u8>,
        totals: &mut PassTotals,
    ) -> Result<(), MigrateError> {
        if runs.is_empty() {
            return Ok(());
        }
        header.clear();
        encode_zero_header(item.pass, runs, header);
        stream
            .write_all(header)
            .map_err(self.send_err(item.phase))?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        totals.bytes += header.len() as u64;
        self.progress
            .bytes
            .fetch_add(header.len() as u64, Ordering::Relaxed);
        self.progress.pages_zero.fetch_add(pages, Ordering::Relaxed);
        runs.clear();
        Ok(())
    }

    fn send_pass(&self, stream: &mut Stream, item: &WorkItem) -> Result<PassTotals, MigrateError> {
        let mut totals = PassTotals::default();
        let mut data: Vec<PageRun> = Vec::with_capacity(64);
        let mut zero: Vec<PageRun> = Vec::with_capacity(64);
        let mut data_pages = 0u32;
        let mut header = Vec::with_capacity(16 + 12 * MAX_RUNS as usize);
        let regions = self.ram.regions();
        for chunk in &item.chunks {
            // Re-protect just before reading: a guest write from now on is caught next pass.
            self.tracker.clear_chunk(&item.snap, chunk)?;
            let base = regions
                .get(chunk.region)
                .map(|r| r.gpa)
                .ok_or_else(|| DirtyError::Invalid(format!("no RAM region {}", chunk.region)))?;
            for page in item.snap.chunk_pages(chunk) {
                let gpa = base + page * PAGE_SIZE;
                let slice = self.ram.slice(gpa, PAGE_SIZE as usize)?;
                if iov::is_zero(&slice) {
                    if !push_page(&mut zero, gpa) {
                        self.flush_zero(stream, item, &mut zero, &mut header, &mut totals)?;
                        push_page(&mut zero, gpa);
                    }
                    totals.zero_pages += 1;
                } else {
                    if data_pages == MAX_BATCH_PAGES || !push_page(&mut data, gpa) {
                        self.flush_data(stream, item, &mut data, &mut header, &mut totals)?;
                        data_pages = 0;
                        push_page(&mut data, gpa);
                    }
                    data_pages += 1;
                    totals.data_pages += 1;
                }
            }
        }
        self.flush_data(stream, item, &mut data, &mut header, &mut totals)?;
        self.flush_zero(stream, item, &mut zero, &mut header, &mut totals)?;
        header.clear();
        Message::PassEnd {
            pass: item.pass,
            pages: totals.data_pages + totals.zero_pages,
        }
        .encode(&mut header);
        stream
            .write_all(&header)
            .map_err(self.send_err(item.phase))?;
        totals.bytes += header.len() as u64;
        self.progress
            .bytes
            .fetch_add(header.len() as u64, Ordering::Relaxed);
        Ok(totals)
    }
}
