//! Data-channel senders: one thread per channel sends the dirty pages of its chunks for each
//! pass, straight from guest memory, and reports when the pass is done on its channel.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::devices::{DeviceChunk, Route};
use ferry_memory::dirty::{DirtyChunk, DirtyError, DirtySnapshot, DirtyTracker};
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{
    encode_compressed_header, encode_pages_header, encode_zero_header, Codec, Message, PageRun,
    MAX_BATCH_PAGES, MAX_RUNS,
};
use ferry_sys::iov;
use ferry_transport::Stream;

use crate::channel::{
    copy_guest_pages, prefaulted, sum_guest_pages, sum_pages, CpuTimer, Packer, Wire,
    MAX_BATCH_BYTES,
};
use crate::error::{Channel, MigrateError};
use crate::limit::RateLimiter;
use crate::progress::Progress;
use crate::CHUNK_PAGES;

/// Starts timing a batch's CPU cost if `auto` wants it (a thread's CPU time is a system
/// call, not a vDSO read).
fn cost_timer(bufs: &Bufs) -> Option<CpuTimer> {
    bufs.packer
        .as_ref()
        .is_some_and(Packer::measures_link)
        .then(CpuTimer::start)
}

/// The most data pages the next batch holds.
fn batch_limit(bufs: &Bufs) -> u32 {
    bufs.packer
        .as_ref()
        .map_or(MAX_BATCH_PAGES, Packer::batch_pages)
}

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
    /// Device chunks for this channel; sent between page batches.
    dev_tx: Sender<DeviceChunk>,
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

    /// One route per channel for device streams.
    pub(crate) fn device_routes(&self) -> Vec<Route> {
        self.list
            .iter()
            .map(|w| Route::Channel(w.dev_tx.clone()))
            .collect()
    }
}

/// Device chunks a channel's queue holds before their device thread waits.
const DEVICE_QUEUE: usize = 8;

/// How the senders send: what the handshake agreed, and the bandwidth cap they share.
pub(crate) struct Sending {
    pub(crate) wire: Wire,
    pub(crate) max_bandwidth: Option<u64>,
    /// Postcopy: the guest address the destination faulted on last (0: none yet); a
    /// postcopy pass sends that page's chunk next, so the push follows the guest.
    pub(crate) hint: Arc<std::sync::atomic::AtomicU64>,
}

/// Starts one sender per data stream; each reports through `events` wrapped by `wrap`.
pub(crate) fn spawn<E: Send + 'static>(
    data: Vec<Stream>,
    how: Sending,
    ram: &Arc<GuestRam>,
    tracker: &Arc<DirtyTracker>,
    progress: &Arc<Progress>,
    events: &Sender<E>,
    wrap: fn(WorkerEvent) -> E,
) -> Result<Workers, MigrateError> {
    let Sending {
        wire,
        max_bandwidth,
        hint,
    } = how;
    let limiter = max_bandwidth.map(|r| Arc::new(RateLimiter::new(r)));
    let mut workers = Workers {
        list: Vec::with_capacity(data.len()),
        limiter: limiter.clone(),
    };
    for (index, stream) in data.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded::<WorkItem>();
        let (dev_tx, dev_rx) = crossbeam_channel::bounded::<DeviceChunk>(DEVICE_QUEUE);
        let ctx = WorkerCtx {
            dev_rx,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            wire,
            ram: ram.clone(),
            tracker: tracker.clone(),
            limiter: limiter.clone(),
            progress: progress.clone(),
            hint: hint.clone(),
        };
        let events = events.clone();
        let join = std::thread::Builder::new()
            .name(format!("mig-send{index}"))
            .spawn(move || ctx.start(stream, rx, |e| events.send(wrap(e)).is_ok()))
            .map_err(MigrateError::io("starting a data channel sender thread"))?;
        workers.list.push(Worker {
            tx: Some(tx),
            dev_tx,
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
    dev_rx: Receiver<DeviceChunk>,
    index: u16,
    wire: Wire,
    ram: Arc<GuestRam>,
    tracker: Arc<DirtyTracker>,
    limiter: Option<Arc<RateLimiter>>,
    progress: Arc<Progress>,
    hint: Arc<std::sync::atomic::AtomicU64>,
}

/// The order a pass sends its chunks in: as dispatched, except that in postcopy the chunk
/// of the page the destination faulted on last goes next (the guest works around there).
struct ChunkOrder<'a> {
    left: std::collections::VecDeque<&'a DirtyChunk>,
    follow: Option<(&'a std::sync::atomic::AtomicU64, u64)>,
}

impl<'a> ChunkOrder<'a> {
    fn next(&mut self, ram: &GuestRam) -> Option<&'a DirtyChunk> {
        if let Some((hint, seen)) = self.follow.as_mut() {
            let h = hint.load(Ordering::Relaxed);
            if h != *seen {
                *seen = h;
                let holds = |c: &&DirtyChunk| {
                    ram.regions().get(c.region).is_some_and(|r| {
                        let first = r.gpa + c.first_page * PAGE_SIZE;
                        h >= first && h < first + c.pages * PAGE_SIZE
                    })
                };
                if let Some(i) = self.left.iter().position(holds) {
                    return self.left.remove(i);
                }
            }
        }
        self.left.pop_front()
    }
}

/// A sender thread's reusable buffers: nothing is allocated per page or per batch.
struct Bufs {
    header: Vec<u8>,
    sums: Vec<u64>,
    /// A batch copied out of guest memory (to compress it).
    batch: Vec<u8>,
    packer: Option<Packer>,
    /// Bytes written on this channel, and the last look at its send queue: when, how full,
    /// and the bytes written by then (for `auto`'s link rate).
    written: u64,
    queue: Option<(std::time::Instant, usize, u64)>,
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
    fn start(self, stream: Stream, rx: Receiver<WorkItem>, report: impl Fn(WorkerEvent) -> bool) {
        let packer = match Packer::new(self.wire.compression) {
            Ok(p) => p,
            Err(e) => {
                report(WorkerEvent::Failed(e));
                return;
            }
        };
        let mut bufs = Bufs {
            header: Vec::with_capacity(16 + 20 * MAX_RUNS as usize),
            sums: Vec::with_capacity(MAX_BATCH_PAGES as usize),
            batch: match packer {
                Some(_) => prefaulted(MAX_BATCH_BYTES),
                None => Vec::new(),
            },
            packer,
            written: 0,
            queue: None,
        };
        self.run(stream, &mut bufs, rx, report);
    }

    fn run(
        &self,
        mut stream: Stream,
        bufs: &mut Bufs,
        rx: Receiver<WorkItem>,
        report: impl Fn(WorkerEvent) -> bool,
    ) {
        let mut devices_open = true;
        loop {
            let never = crossbeam_channel::never();
            let dev_rx = if devices_open { &self.dev_rx } else { &never };
            let r = crossbeam_channel::select! {
                recv(rx) -> item => match item {
                    Ok(item) => self.send_pass(&mut stream, bufs, &item).map(|t| Some((item.pass, t))),
                    Err(_) => return,
                },
                recv(dev_rx) -> chunk => match chunk {
                    Ok(c) => self.send_device_chunk(&mut stream, bufs, c, "device-state").map(|()| None),
                    Err(_) => {
                        devices_open = false;
                        Ok(None)
                    }
                },
            };
            match r {
                Ok(Some((pass, totals))) => {
                    if !report(WorkerEvent::Done { pass, totals }) {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    report(WorkerEvent::Failed(e));
                    return;
                }
            }
        }
    }

    /// Writes one device chunk.
    fn send_device_chunk(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        c: DeviceChunk,
        phase: &'static str,
    ) -> Result<(), MigrateError> {
        bufs.header.clear();
        Message::DeviceData {
            device: c.device,
            seq: c.seq,
            flags: c.flags,
            data: c.data,
        }
        .encode_with(&mut bufs.header, self.wire.sums);
        let bytes = bufs.header.len() as u64;
        self.take_bandwidth(bytes)?;
        stream
            .write_all(&bufs.header)
            .and_then(|()| stream.flush())
            .map_err(self.send_err(phase))?;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress
            .device_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the device chunks waiting for this channel (between page batches, so a
    /// device's stream is not held behind a whole pass).
    fn drain_devices(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        phase: &'static str,
    ) -> Result<(), MigrateError> {
        while let Ok(c) = self.dev_rx.try_recv() {
            self.send_device_chunk(stream, bufs, c, phase)?;
        }
        Ok(())
    }

    fn send_err(&self, phase: &'static str) -> impl Fn(std::io::Error) -> MigrateError + '_ {
        move |source| MigrateError::Send {
            channel: Channel::Data(self.index),
            phase,
            source,
        }
    }

    /// Waits for the bandwidth limit to allow `bytes` more.
    fn take_bandwidth(&self, bytes: u64) -> Result<(), MigrateError> {
        match &self.limiter {
            Some(l) if !l.take(bytes) => Err(MigrateError::Stopping),
            _ => Ok(()),
        }
    }

    /// Sends one batch of data pages: compressed from a copy when the packer chooses a
    /// codec and the batch shrinks, else straight from guest memory. Returns the bytes
    /// written.
    fn send_batch(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
        runs: &[PageRun],
    ) -> Result<u64, MigrateError> {
        if let Some(codec) = bufs.packer.as_mut().and_then(Packer::choose) {
            if let Some(n) = self.send_compressed(stream, bufs, item, runs, codec)? {
                self.progress
                    .batches_compressed
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(n);
            }
        }
        self.progress.batches_raw.fetch_add(1, Ordering::Relaxed);
        let sum = self.wire.sums;
        let timer = cost_timer(bufs);
        bufs.sums.clear();
        if sum {
            sum_guest_pages(&self.ram, runs, &mut bufs.sums)?;
        }
        let prepared = timer.map(|t| t.elapsed()).unwrap_or_default();
        let mut slices = Vec::with_capacity(runs.len());
        let mut pages = 0u64;
        for r in runs {
            slices.push(
                self.ram
                    .slice(r.gpa, (u64::from(r.pages) * PAGE_SIZE) as usize)?,
            );
            pages += u64::from(r.pages);
        }
        bufs.header.clear();
        encode_pages_header(item.pass, runs, &bufs.sums, sum, &mut bufs.header);
        let bytes = bufs.header.len() as u64 + pages * PAGE_SIZE;
        self.take_bandwidth(bytes)?;
        let t = std::time::Instant::now();
        let cpu = cost_timer(bufs);
        stream
            .write_pages(&bufs.header, &slices)
            .map_err(self.send_err(item.phase))?;
        if let (Some(p), Some(cpu)) = (&mut bufs.packer, cpu) {
            p.wrote_raw(prepared, t.elapsed(), cpu.elapsed(), bytes as usize);
        }
        Ok(bytes)
    }

    /// Copies the batch, hashes and compresses the copy, and sends it if it shrank.
    fn send_compressed(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
        runs: &[PageRun],
        codec: Codec,
    ) -> Result<Option<u64>, MigrateError> {
        let timer = cost_timer(bufs);
        copy_guest_pages(&self.ram, runs, &mut bufs.batch)?;
        bufs.sums.clear();
        if self.wire.sums {
            sum_pages(&bufs.batch, &mut bufs.sums);
        }
        let Some(packer) = bufs.packer.as_mut() else {
            return Ok(None);
        };
        let raw = bufs.batch.len();
        let shrunk = packer.compress(codec, &bufs.batch)?;
        // What the copy and the compression cost, whether or not the batch shrank.
        let took = timer.map(|t| t.elapsed()).unwrap_or_default();
        packer.compressed(codec, took, raw, shrunk.unwrap_or(raw));
        let Some(len) = shrunk else {
            return Ok(None);
        };
        let packed = packer.output(len);
        bufs.header.clear();
        encode_compressed_header(
            item.pass,
            runs,
            codec,
            &bufs.sums,
            u32::try_from(len).unwrap_or(u32::MAX),
            self.wire.sums,
            &mut bufs.header,
        );
        let bytes = (bufs.header.len() + len) as u64;
        self.take_bandwidth(bytes)?;
        stream
            .write_all(&bufs.header)
            .and_then(|()| stream.write_all(packed))
            .and_then(|()| stream.flush())
            .map_err(self.send_err(item.phase))?;
        Ok(Some(bytes))
    }

    /// After `bytes` more were written: how much the send queue drained since the last
    /// look, if it never ran empty in between (then that is the link's rate).
    fn watch_queue(stream: &Stream, bufs: &mut Bufs, bytes: u64) {
        bufs.written += bytes;
        let Some(packer) = bufs.packer.as_mut().filter(|p| p.measures_link()) else {
            return;
        };
        let Some(q) = stream.send_queue() else {
            return;
        };
        let now = std::time::Instant::now();
        if let Some((t0, q0, w0)) = bufs.queue {
            let drained = (q0 as u64 + (bufs.written - w0)).saturating_sub(q as u64);
            // Small samples are timer noise.
            if q0 > 0 && q > 0 && drained >= 256 << 10 {
                packer.drained(now - t0, drained);
            }
        }
        bufs.queue = Some((now, q, bufs.written));
    }

    fn flush_data(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
        runs: &mut Vec<PageRun>,
        totals: &mut PassTotals,
    ) -> Result<(), MigrateError> {
        if runs.is_empty() {
            return Ok(());
        }
        let bytes = self.send_batch(stream, bufs, item, runs)?;
        Self::watch_queue(stream, bufs, bytes);
        self.drain_devices(stream, bufs, item.phase)?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        totals.bytes += bytes;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
        runs.clear();
        Ok(())
    }

    fn flush_zero(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
        runs: &mut Vec<PageRun>,
        totals: &mut PassTotals,
    ) -> Result<(), MigrateError> {
        if runs.is_empty() {
            return Ok(());
        }
        bufs.header.clear();
        encode_zero_header(item.pass, runs, self.wire.sums, &mut bufs.header);
        stream
            .write_all(&bufs.header)
            .and_then(|()| stream.flush())
            .map_err(self.send_err(item.phase))?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        let bytes = bufs.header.len() as u64;
        totals.bytes += bytes;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.pages_zero.fetch_add(pages, Ordering::Relaxed);
        runs.clear();
        Ok(())
    }

    fn send_pass(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
    ) -> Result<PassTotals, MigrateError> {
        let mut totals = PassTotals::default();
        // The queue empties between passes: a drain measured across that wait is no link.
        bufs.queue = None;
        let mut data: Vec<PageRun> = Vec::with_capacity(64);
        let mut zero: Vec<PageRun> = Vec::with_capacity(64);
        let mut data_pages = 0u32;
        // Only a flush changes it (`auto`'s first raw batch is smaller).
        let mut limit = batch_limit(bufs);
        let regions = self.ram.regions();
        let mut order = ChunkOrder {
            left: item.chunks.iter().collect(),
            follow: (item.phase == "postcopy").then(|| (&*self.hint, 0)),
        };
        while let Some(chunk) = order.next(&self.ram) {
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
                        self.flush_zero(stream, bufs, item, &mut zero, &mut totals)?;
                        push_page(&mut zero, gpa);
                    }
                    totals.zero_pages += 1;
                } else {
                    if data_pages >= limit || !push_page(&mut data, gpa) {
                        self.flush_data(stream, bufs, item, &mut data, &mut totals)?;
                        limit = batch_limit(bufs);
                        data_pages = 0;
                        push_page(&mut data, gpa);
                    }
                    data_pages += 1;
                    totals.data_pages += 1;
                }
            }
        }
        self.flush_data(stream, bufs, item, &mut data, &mut totals)?;
        self.flush_zero(stream, bufs, item, &mut zero, &mut totals)?;
        self.send_pass_end(stream, bufs, item, &mut totals)?;
        Ok(totals)
    }

    fn send_pass_end(
        &self,
        stream: &mut Stream,
        bufs: &mut Bufs,
        item: &WorkItem,
        totals: &mut PassTotals,
    ) -> Result<(), MigrateError> {
        bufs.header.clear();
        Message::PassEnd {
            pass: item.pass,
            pages: totals.data_pages + totals.zero_pages,
        }
        .encode_with(&mut bufs.header, self.wire.sums);
        stream
            .write_all(&bufs.header)
            .and_then(|()| stream.flush())
            .map_err(self.send_err(item.phase))?;
        let bytes = bufs.header.len() as u64;
        totals.bytes += bytes;
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }
}
