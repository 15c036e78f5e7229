//! The sending side: connect, handshake, precopy passes with convergence control, then a
//! switchover that only commits once the destination has loaded everything.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ferry_memory::dirty::{DirtyChunk, DirtySnapshot, DirtyTracker};
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{
    caps, encode_pages_header, encode_zero_header, read_message, ChannelRole, Hello, Message,
    PageRun, ProtoError, MAX_BATCH_PAGES, MAX_RUNS, VERSION,
};
use ferry_sys::iov;
use ferry_transport::{connect, Stream, Uri};

use crate::error::MigrateError;
use crate::limit::RateLimiter;
use crate::progress::{CancelToken, MigrationStats, Progress, Status};
use crate::vm::MigrationSource;
use crate::CHUNK_PAGES;

/// Passes precopy may add once under the downtime limit, while they keep halving the dirty
/// set (each costs at most about the limit in total time).
const MAX_EXTRA_PASSES: u32 = 8;

/// How to migrate.
#[derive(Debug, Clone)]
pub struct SendParams {
    /// Data channels (at least 1).
    pub channels: u16,
    /// Downtime to aim for.
    pub downtime_limit: Duration,
    /// Cap on bandwidth over all channels, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Throttle vCPUs when precopy does not converge.
    pub auto_converge: bool,
    /// Write a digest of every guest page at the switchover here (for verification).
    pub digest_file: Option<PathBuf>,
    /// How long to wait for the destination's answers during the handshake and handover.
    pub timeout: Duration,
}

impl Default for SendParams {
    fn default() -> Self {
        SendParams {
            channels: 4,
            downtime_limit: Duration::from_millis(50),
            max_bandwidth: None,
            auto_converge: true,
            digest_file: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Sender states (named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshake,
    Setup,
    Precopy,
    Switchover,
    AwaitLoaded,
    Committed,
    AwaitRunning,
    Done,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Handshake => "handshake",
            State::Setup => "setup",
            State::Precopy => "precopy",
            State::Switchover => "switchover",
            State::AwaitLoaded => "awaiting-loaded",
            State::Committed => "committed",
            State::AwaitRunning => "awaiting-running",
            State::Done => "done",
        }
    }
}

struct WorkItem {
    pass: u32,
    state: &'static str,
    snap: Arc<DirtySnapshot>,
    chunks: Vec<DirtyChunk>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PassTotals {
    bytes: u64,
    data_pages: u64,
    zero_pages: u64,
}

enum Event {
    Done { pass: u32, totals: PassTotals },
    Failed(MigrateError),
    Peer(Result<Message, MigrateError>),
}

struct Worker {
    tx: Option<Sender<WorkItem>>,
    join: Option<JoinHandle<()>>,
}

/// Migrates `vm` to the destination listening at `uri`. On success the guest runs on the
/// destination and stays paused here; on any failure before the handover commits, the guest
/// runs here again as before.
pub fn migrate(
    vm: Arc<dyn MigrationSource>,
    uri: &Uri,
    params: &SendParams,
    progress: Arc<Progress>,
    cancel: CancelToken,
) -> Result<MigrationStats, MigrateError> {
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let mut s = Source {
        ram: vm.ram(),
        vm,
        params: params.clone(),
        progress: progress.clone(),
        cancel,
        state: State::Connecting,
        main: None,
        streams: Vec::new(),
        workers: Vec::new(),
        events_tx,
        events_rx,
        tracker: None,
        paused_by_us: false,
        committed: false,
        need_prepared: false,
        prepared: None,
        stats: MigrationStats::default(),
    };
    match s.run(uri) {
        Ok(stats) => {
            progress.set_status(Status::Completed);
            s.finish();
            Ok(stats)
        }
        Err(e) => {
            s.abort(&e);
            progress.set_status(if matches!(e, MigrateError::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            });
            Err(e)
        }
    }
}

struct Source {
    vm: Arc<dyn MigrationSource>,
    ram: Arc<GuestRam>,
    params: SendParams,
    progress: Arc<Progress>,
    cancel: CancelToken,
    state: State,
    main: Option<Stream>,
    // Every socket, to shut down on abort (unblocks workers and the return-path reader).
    streams: Vec<Stream>,
    workers: Vec<Worker>,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    tracker: Option<Arc<DirtyTracker>>,
    paused_by_us: bool,
    committed: bool,
    need_prepared: bool,
    prepared: Option<(u64, u32, Instant)>,
    stats: MigrationStats,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

/// Global chunk number of a chunk: pages are always assigned to the same channel.
fn chunk_channel(ram: &GuestRam, c: &DirtyChunk, channels: usize) -> usize {
    let base = ram
        .regions()
        .get(c.region)
        .map(|r| r.gpa / PAGE_SIZE)
        .unwrap_or(0);
    (((base + c.first_page) / CHUNK_PAGES) % channels as u64) as usize
}

impl Source {
    fn send_main(&mut self, msg: &Message) -> Result<(), MigrateError> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let state = self.state.name();
        let main = self
            .main
            .as_mut()
            .ok_or(MigrateError::Invalid("no main channel".into()))?;
        main.write_all(&buf).map_err(|source| MigrateError::Send {
            channel: "main".into(),
            state,
            source,
        })?;
        self.progress
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_main(&mut self) -> Result<Message, MigrateError> {
        let state = self.state.name();
        let main = self
            .main
            .as_mut()
            .ok_or(MigrateError::Invalid("no main channel".into()))?;
        let mut scratch = Vec::new();
        read_message(main, &mut scratch).map_err(|e| match e {
            ProtoError::Eof => MigrateError::Invalid(format!(
                "the destination closed the connection in state {state}"
            )),
            source => MigrateError::Proto {
                channel: "main".into(),
                state,
                source,
            },
        })
    }

    fn unexpected(&self, msg: &Message) -> MigrateError {
        match msg {
            Message::Refuse { reason } => MigrateError::Refused(reason.clone()),
            Message::Error { reason } => MigrateError::Peer {
                side: "destination",
                reason: reason.clone(),
            },
            m => MigrateError::Unexpected {
                message: m.name(),
                state: self.state.name(),
                channel: "main".into(),
            },
        }
    }

    fn run(&mut self, uri: &Uri) -> Result<MigrationStats, MigrateError> {
        let t_start = Instant::now();
        self.progress.begin(self.ram.size());
        let n = self.params.channels.max(1);
        let session = session_id();

        // Connect the main channel, then the data channels.
        let main = connect(uri)?;
        let _ = main.set_nodelay();
        self.streams.push(
            main.try_clone()
                .map_err(io_err("cloning the main socket"))?,
        );
        self.main = Some(main);
        let hello = |role| {
            Message::Hello(Hello {
                version: VERSION,
                capabilities: caps::ALL,
                session,
                role,
                data_channels: n,
            })
        };
        self.send_main(&hello(ChannelRole::Main))?;
        let mut data = Vec::new();
        for index in 0..n {
            let mut s = connect(uri)?;
            let mut buf = Vec::new();
            hello(ChannelRole::Data { index }).encode(&mut buf);
            s.write_all(&buf).map_err(|source| MigrateError::Send {
                channel: format!("data {index}"),
                state: self.state.name(),
                source,
            })?;
            self.streams
                .push(s.try_clone().map_err(io_err("cloning a data socket"))?);
            data.push(s);
        }

        // Handshake: version and capabilities.
        self.state = State::Handshake;
        if let Some(m) = &self.main {
            let _ = m.set_read_timeout(Some(self.params.timeout));
        }
        let caps = match self.read_main()? {
            Message::Welcome {
                version,
                capabilities,
            } => {
                if version != VERSION {
                    return Err(MigrateError::Version {
                        peer: version,
                        ours: VERSION,
                    });
                }
                capabilities & caps::ALL
            }
            m => return Err(self.unexpected(&m)),
        };
        self.need_prepared = caps & caps::SWITCHOVER_ACK != 0;

        // Setup: does the destination match this VM?
        self.state = State::Setup;
        let t_rtt = Instant::now();
        self.send_main(&Message::Setup(self.vm.description()))?;
        match self.read_main()? {
            Message::SetupAccepted => {}
            m => return Err(self.unexpected(&m)),
        }
        let rtt = t_rtt.elapsed();
        if let Some(m) = &self.main {
            let _ = m.set_read_timeout(None);
        }
        self.spawn_return_path()?;

        let tracker = Arc::new(DirtyTracker::new(self.vm.dirty_log(), self.ram.clone()));
        tracker.start()?;
        self.tracker = Some(tracker.clone());
        self.spawn_workers(data, &tracker);
        self.stats.setup_ms = ms(t_start.elapsed());
        self.stats.channels = n;
        self.stats.ram_bytes = self.ram.size();
        self.stats.downtime_limit_ms = ms(self.params.downtime_limit);

        // Precopy.
        self.state = State::Precopy;
        self.progress.set_status(Status::Active);
        let limit = self.params.downtime_limit;
        let state_estimate = 64 * 1024 * u64::from(self.vm.description().vcpus) + 64 * 1024;
        let mut pass: u32 = 0;
        let mut snap = Arc::new(tracker.sync(true)?);
        let mut bandwidth = 0f64;
        let mut not_shrinking = 0u32;
        let mut throttle = 0u8;
        let mut passes_at_max = 0u32;
        let mut extra_passes = 0u32;
        let mut converged_at: Option<Instant> = None;
        let mut rate_window = Duration::ZERO;
        let estimate = loop {
            self.progress.pass.store(u64::from(pass), Ordering::Relaxed);
            let t_pass = Instant::now();
            self.dispatch(pass, &snap);
            let totals = self.wait_pass(pass)?;
            let dur = t_pass.elapsed().max(Duration::from_micros(1));
            if pass == 0 {
                self.stats.first_pass_throughput = (totals.bytes as f64 / dur.as_secs_f64()) as u64;
            }
            // Small passes are latency-bound; only large ones say what the link can do.
            if totals.bytes >= 4 << 20 || bandwidth == 0.0 {
                bandwidth = (totals.bytes.max(1) as f64 / dur.as_secs_f64()).max(1.0);
            }
            pass += 1;
            let t_sync = Instant::now();
            snap = Arc::new(tracker.sync(false)?);
            let sync_time = t_sync.elapsed();
            let dirty_bytes = snap.dirty_pages() * PAGE_SIZE;
            let dirty_rate = (dirty_bytes as f64 / dur.as_secs_f64()) as u64;
            let estimate =
                Duration::from_secs_f64((dirty_bytes + state_estimate) as f64 / bandwidth)
                    + sync_time
                    + rtt;
            self.progress
                .dirty_pages
                .store(snap.dirty_pages(), Ordering::Relaxed);
            self.progress
                .dirty_rate
                .store(dirty_rate, Ordering::Relaxed);
            self.progress
                .bandwidth
                .store(bandwidth as u64, Ordering::Relaxed);
            self.progress
                .expected_downtime_us
                .store(estimate.as_micros() as u64, Ordering::Relaxed);
            // Pass 0 saturates at the working set; among later passes the longest is the
            // steadiest measure of how fast the guest dirties memory.
            if pass > 1 && dur > rate_window {
                rate_window = dur;
                self.stats.dirty_rate = dirty_rate;
            }
            tracing::info!(
                pass = pass - 1,
                sent = totals.bytes,
                ms = ms(dur),
                dirty = dirty_bytes,
                estimate_ms = ms(estimate),
                throttle,
                "precopy pass done"
            );
            if self.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            let prepared = !self.need_prepared || self.prepared.is_some();
            if estimate <= limit {
                // Under the limit. Another pass costs at most about the limit in extra total
                // time; while passes still halve the dirty set, each one halves the downtime.
                let shrinking = dirty_bytes > 0 && dirty_bytes * 2 <= totals.bytes;
                if shrinking && extra_passes < MAX_EXTRA_PASSES {
                    extra_passes += 1;
                    continue;
                }
                if prepared {
                    self.stats.converged = true;
                    break estimate;
                }
                converged_at.get_or_insert_with(Instant::now);
                // Keep the dirty set small while the destination finishes preparing, without
                // spinning on empty passes.
                self.wait_events(Duration::from_millis(20))?;
                continue;
            }
            if throttle >= 99 {
                passes_at_max += 1;
                if passes_at_max >= 5 && prepared {
                    tracing::warn!(
                        "cannot meet the {} ms downtime limit even at 99% throttle (estimate {:.1} ms); switching over",
                        ms(limit),
                        ms(estimate)
                    );
                    self.stats.converged = false;
                    break estimate;
                }
            }
            // Auto-converge, as QEMU does: two passes in a row where the guest dirtied more
            // than half of what was sent means precopy is not catching up.
            if self.params.auto_converge && pass >= 2 {
                if dirty_bytes > totals.bytes / 2 {
                    not_shrinking += 1;
                } else {
                    not_shrinking = 0;
                }
                if not_shrinking >= 2 && throttle < 99 {
                    throttle = if throttle == 0 {
                        20
                    } else {
                        (throttle + 10).min(99)
                    };
                    self.vm.set_throttle(throttle);
                    self.progress
                        .throttle
                        .store(u64::from(throttle), Ordering::Relaxed);
                    self.stats.max_throttle_percent = throttle;
                    tracing::info!(throttle, "auto-converge: throttling vCPUs");
                    not_shrinking = 0;
                }
            }
        };
        self.stats.expected_downtime_ms = ms(estimate);

        // Switchover.
        self.state = State::Switchover;
        self.progress.set_status(Status::Switchover);
        let t_pause = Instant::now();
        if !self.vm.is_paused() {
            self.vm.pause()?;
            self.paused_by_us = true;
        }
        // The last precopy sync's snapshot was never sent: the pages the VMM wrote are in it
        // and nowhere else (KVM's bits would still be in the log, the VMM's were taken).
        let mut final_snap = tracker.sync(false)?;
        final_snap.merge(&snap)?;
        let final_snap = Arc::new(final_snap);
        let t_synced = Instant::now();
        let final_pass = pass;
        self.dispatch(final_pass, &final_snap);
        let sections = self.vm.save_state()?;
        self.send_main(&Message::State { sections })?;
        let t_state = Instant::now();
        self.wait_pass(final_pass)?;
        let t_pages = Instant::now();
        self.send_main(&Message::Complete { final_pass })?;
        let t_sent = Instant::now();
        self.stats.passes = u64::from(final_pass) + 1;

        self.state = State::AwaitLoaded;
        let load_us =
            match self.wait_peer(self.params.timeout, "for the destination to load the state")? {
                Message::Loaded { load_us } => load_us,
                m => return Err(self.unexpected(&m)),
            };
        let t_loaded = Instant::now();

        // The point of no return: after this the source never resumes the guest itself.
        self.committed = true;
        self.state = State::Committed;
        self.send_main(&Message::Go).map_err(|e| {
            MigrateError::HandoverUnconfirmed(format!(
                "could not tell the destination to run the guest ({e}); the VM is paused here \
                 with its complete state"
            ))
        })?;
        self.state = State::AwaitRunning;
        let resume_us =
            match self.wait_peer(self.params.timeout, "for the destination to run the guest") {
                Ok(Message::Running { resume_us }) => resume_us,
                Ok(m) => {
                    return Err(MigrateError::HandoverUnconfirmed(format!(
                        "expected Running, got {}; the VM is paused here with its complete state",
                        m.name()
                    )))
                }
                Err(e) => {
                    return Err(MigrateError::HandoverUnconfirmed(format!(
                        "{e}; the destination has the complete state and was told to run it; the \
                     VM is paused here too"
                    )))
                }
            };
        let t_running = Instant::now();
        self.state = State::Done;

        let d = &mut self.stats.downtime;
        d.final_sync_ms = ms(t_synced - t_pause);
        d.state_ms = ms(t_state - t_synced);
        d.final_pages_ms = ms(t_pages - t_synced);
        d.wait_loaded_ms = ms(t_loaded - t_sent);
        d.dest_load_ms = load_us as f64 / 1000.0;
        d.go_to_running_ms = ms(t_running - t_loaded);
        d.dest_resume_ms = resume_us as f64 / 1000.0;
        self.stats.downtime_ms = ms(t_running - t_pause);
        if let Some((us, threads, at)) = self.prepared {
            self.stats.prepare.reported = true;
            self.stats.prepare.prepare_ms = us as f64 / 1000.0;
            self.stats.prepare.threads = threads;
            self.stats.prepare.in_downtime_ms = ms(at.saturating_duration_since(t_pause));
            self.stats.prepare.waited_ms = converged_at
                .map(|c| ms(at.saturating_duration_since(c)))
                .unwrap_or(0.0);
        }
        self.stats.total_ms = ms(t_start.elapsed());
        self.stats.bytes = self.progress.bytes.load(Ordering::Relaxed);
        self.stats.pages_data = self.progress.pages_data.load(Ordering::Relaxed);
        self.stats.pages_zero = self.progress.pages_zero.load(Ordering::Relaxed);
        self.stats.throughput = (self.stats.bytes as f64 / t_start.elapsed().as_secs_f64()) as u64;
        self.stats.status = "completed".into();

        if let Some(path) = self.params.digest_file.clone() {
            // The source is paused for good, so this costs no downtime.
            write_digests(&self.ram, &path)?;
        }
        Ok(self.stats.clone())
    }

    fn spawn_return_path(&mut self) -> Result<(), MigrateError> {
        let mut reader = self
            .main
            .as_ref()
            .ok_or(MigrateError::Invalid("no main channel".into()))?
            .try_clone()
            .map_err(io_err("cloning the main socket"))?;
        let tx = self.events_tx.clone();
        std::thread::Builder::new()
            .name("mig-return".into())
            .spawn(move || {
                let mut scratch = Vec::new();
                loop {
                    match read_message(&mut reader, &mut scratch) {
                        Ok(m) => {
                            if tx.send(Event::Peer(Ok(m))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let err = match e {
                                ProtoError::Eof => MigrateError::Invalid(
                                    "the destination closed the connection".into(),
                                ),
                                source => MigrateError::Proto {
                                    channel: "main".into(),
                                    state: "return path",
                                    source,
                                },
                            };
                            let _ = tx.send(Event::Peer(Err(err)));
                            return;
                        }
                    }
                }
            })
            .map_err(io_err("starting the return-path thread"))?;
        Ok(())
    }

    fn spawn_workers(&mut self, data: Vec<Stream>, tracker: &Arc<DirtyTracker>) {
        let limiter = self
            .params
            .max_bandwidth
            .map(|r| Arc::new(RateLimiter::new(r)));
        for (index, stream) in data.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded::<WorkItem>();
            let ctx = WorkerCtx {
                index,
                ram: self.ram.clone(),
                tracker: tracker.clone(),
                events: self.events_tx.clone(),
                limiter: limiter.clone(),
                cancel: self.cancel.clone(),
                progress: self.progress.clone(),
            };
            let join = std::thread::Builder::new()
                .name(format!("mig-send{index}"))
                .spawn(move || ctx.run(stream, rx))
                .ok();
            self.workers.push(Worker { tx: Some(tx), join });
        }
    }

    fn dispatch(&self, pass: u32, snap: &Arc<DirtySnapshot>) {
        let n = self.workers.len().max(1);
        let mut lists: Vec<Vec<DirtyChunk>> = vec![Vec::new(); n];
        for c in snap.dirty_chunks(CHUNK_PAGES) {
            lists[chunk_channel(&self.ram, &c, n)].push(c);
        }
        for (w, chunks) in self.workers.iter().zip(lists) {
            if let Some(tx) = &w.tx {
                // A worker that died has reported its error already.
                let _ = tx.send(WorkItem {
                    pass,
                    state: self.state.name(),
                    snap: snap.clone(),
                    chunks,
                });
            }
        }
    }

    fn on_peer(&mut self, m: Message) -> Result<(), MigrateError> {
        match m {
            Message::Prepared {
                prepare_us,
                threads,
            } if self.prepared.is_none() => {
                tracing::info!(prepare_us, threads, "destination memory prepared");
                self.prepared = Some((prepare_us, threads, Instant::now()));
                Ok(())
            }
            m => Err(self.unexpected(&m)),
        }
    }

    /// Waits until every worker finished `pass`, handling return-path messages meanwhile.
    fn wait_pass(&mut self, pass: u32) -> Result<PassTotals, MigrateError> {
        let mut done = 0;
        let mut totals = PassTotals::default();
        while done < self.workers.len() {
            match self.events_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Done { pass: p, totals: t }) if p == pass => {
                    done += 1;
                    totals.bytes += t.bytes;
                    totals.data_pages += t.data_pages;
                    totals.zero_pages += t.zero_pages;
                }
                Ok(Event::Done { pass: p, .. }) => {
                    return Err(MigrateError::Invalid(format!(
                        "worker finished pass {p} while pass {pass} runs"
                    )))
                }
                Ok(Event::Failed(e)) => return Err(self.prefer_peer_reason(e)),
                Ok(Event::Peer(Ok(m))) => self.on_peer(m)?,
                Ok(Event::Peer(Err(e))) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    if self.cancel.is_cancelled() {
                        return Err(MigrateError::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Invalid("all senders stopped".into()))
                }
            }
        }
        Ok(totals)
    }

    /// Handles return-path events for up to `d` (while waiting for the destination).
    fn wait_events(&mut self, d: Duration) -> Result<(), MigrateError> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events_rx.recv_timeout(left) {
                Ok(Event::Peer(Ok(m))) => {
                    self.on_peer(m)?;
                    if self.prepared.is_some() {
                        return Ok(());
                    }
                }
                Ok(Event::Peer(Err(e))) => return Err(e),
                Ok(Event::Failed(e)) => return Err(self.prefer_peer_reason(e)),
                Ok(Event::Done { .. }) => {}
                Err(_) => return Ok(()),
            }
        }
    }

    /// The next return-path message, within `timeout`.
    fn wait_peer(&mut self, timeout: Duration, what: &str) -> Result<Message, MigrateError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events_rx.recv_timeout(left) {
                Ok(Event::Peer(Ok(Message::Prepared { .. }))) if self.prepared.is_none() => {}
                Ok(Event::Peer(Ok(m))) => return Ok(m),
                Ok(Event::Peer(Err(e))) => return Err(e),
                Ok(Event::Failed(e)) => return Err(self.prefer_peer_reason(e)),
                Ok(Event::Done { .. }) => {}
                Err(_) => return Err(MigrateError::Timeout(format!("waiting {what}"))),
            }
        }
    }

    /// A data channel failing usually means the destination gave up; its own reason (sent on
    /// the main channel just before it closed) is the useful one.
    fn prefer_peer_reason(&self, e: MigrateError) -> MigrateError {
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(ev) = self
            .events_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Event::Peer(Ok(Message::Error { reason })) = ev {
                return MigrateError::Peer {
                    side: "destination",
                    reason,
                };
            }
        }
        e
    }

    fn close_workers(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
        }
    }

    fn finish(&mut self) {
        self.vm.set_throttle(0);
        if let Some(t) = &self.tracker {
            let _ = t.stop();
        }
        self.close_workers();
        for s in &self.streams {
            s.shutdown();
        }
    }

    fn abort(&mut self, e: &MigrateError) {
        tracing::warn!(state = self.state.name(), "migration failed: {e}");
        if !self.committed {
            if !matches!(e, MigrateError::Peer { .. } | MigrateError::Refused(_)) {
                let reason: String = format!("source: {e}").chars().take(4000).collect();
                let _ = self.send_main(&Message::Error { reason });
            }
            if let Some(t) = &self.tracker {
                let _ = t.stop();
            }
            self.vm.set_throttle(0);
            if self.paused_by_us {
                if let Err(err) = self.vm.resume() {
                    tracing::error!("could not resume the guest after a failed migration: {err}");
                }
            }
        }
        for s in &self.streams {
            s.shutdown();
        }
        self.close_workers();
    }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |source| MigrateError::Io {
        what: what.to_string(),
        source,
    }
}

/// Writes one little-endian u64 digest per guest page.
pub fn write_digests(ram: &GuestRam, path: &std::path::Path) -> Result<(), MigrateError> {
    let bytes: Vec<u8> = ram
        .page_digests()
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).map_err(|source| MigrateError::Io {
        what: format!("writing the memory digest to {}", path.display()),
        source,
    })
}

struct WorkerCtx {
    index: usize,
    ram: Arc<GuestRam>,
    tracker: Arc<DirtyTracker>,
    events: Sender<Event>,
    limiter: Option<Arc<RateLimiter>>,
    cancel: CancelToken,
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
    fn run(self, mut stream: Stream, rx: Receiver<WorkItem>) {
        for item in rx.iter() {
            match self.send_pass(&mut stream, &item) {
                Ok(totals) => {
                    if self
                        .events
                        .send(Event::Done {
                            pass: item.pass,
                            totals,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.events.send(Event::Failed(e));
                    return;
                }
            }
        }
    }

    fn send_err(&self, state: &'static str) -> impl Fn(std::io::Error) -> MigrateError + '_ {
        move |source| MigrateError::Send {
            channel: format!("data {}", self.index),
            state,
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
            slices.push(
                self.ram
                    .slice(r.gpa, len as usize)
                    .map_err(|e| MigrateError::Invalid(e.to_string()))?,
            );
            pages += u64::from(r.pages);
        }
        header.clear();
        encode_pages_header(item.pass, runs, header);
        let bytes = header.len() as u64 + pages * PAGE_SIZE;
        if let Some(l) = &self.limiter {
            l.take(bytes);
        }
        iov::write_all_volatile(stream.as_fd(), header, &slices)
            .map_err(self.send_err(item.state))?;
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
            .map_err(self.send_err(item.state))?;
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
            if self.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            // Re-protect just before reading: a guest write from now on is caught next pass.
            self.tracker.clear_chunk(&item.snap, chunk)?;
            let base = regions
                .get(chunk.region)
                .map(|r| r.gpa)
                .ok_or_else(|| MigrateError::Invalid(format!("no region {}", chunk.region)))?;
            for page in item.snap.chunk_pages(chunk) {
                let gpa = base + page * PAGE_SIZE;
                let slice = self
                    .ram
                    .slice(gpa, PAGE_SIZE as usize)
                    .map_err(|e| MigrateError::Invalid(e.to_string()))?;
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
            .map_err(self.send_err(item.state))?;
        totals.bytes += header.len() as u64;
        self.progress
            .bytes
            .fetch_add(header.len() as u64, Ordering::Relaxed);
        Ok(totals)
    }
}
