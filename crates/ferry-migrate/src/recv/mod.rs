//! The receiving side: a phase machine (`recv/phase.rs`) driven by one event loop, fed by an
//! acceptor thread that only lets through connections that greet properly.
//!
//! The destination never runs the guest before the source's `Go`. An attempt that fails
//! before the state is loaded, or that the source aborts, is discarded and the destination
//! listens again for the next one. Once the state is loaded and `Go` does not come in time,
//! the guest stays paused here (`unconfirmed`): a late `Go` still runs it, a late `Error`
//! discards it, and otherwise an operator decides.

mod accept;
mod data;
mod devices;
mod late;
mod phase;
mod postcopy;
mod prepare;
mod recover;

pub use late::{answer_late_resumes, LateAnswers, PostcopyEnded};
pub use postcopy::{PostcopyStats, ThreadFaults, MAX_FAULT_QUEUES};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_memory::prepare::{NiceControl, PrepareError, PrepareHandle};
use ferry_memory::ram::GuestRam;
use ferry_proto::{Message, ProtoError};
use ferry_transport::Listener;
use serde::Serialize;

use crate::control::Request;
use crate::error::MigrateError;
use crate::events::{Input, Inputs};
use crate::progress::{Progress, Status};
use crate::vm::MigrationTarget;

pub use prepare::{start_prepare, PrepareMode};

use accept::Greeted;
use data::{DataEvent, PageBits};
use phase::{Phase, Step};
use prepare::Prepared;

/// Most data channels a destination accepts for one migration.
pub const MAX_CHANNELS: u16 = crate::send::MAX_CHANNELS;

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveParams {
    /// Memory preparation.
    pub prepare: PrepareMode,
    /// Helper threads for it (`None`: as many as affinity and cgroup quota allow).
    pub prepare_threads: Option<usize>,
    /// Nice value of the helpers while the destination waits for a source (19: they yield
    /// to whatever else runs on the host). Once a migration is accepted they are raised to
    /// nice 0: from then on unprepared memory slows every received page, and the switchover
    /// waits for the preparation.
    pub prepare_nice: i32,
    /// Write a digest of every guest page here once all memory has arrived (tests, the
    /// demo, the bench). The hashing happens while the guest is paused on both sides, so it
    /// lengthens the downtime (by [`ReceiveStats::digest_ms`]).
    pub digest_file: Option<PathBuf>,
    /// Test hook: flip one byte at this guest-physical address once all memory has arrived,
    /// before the digest, to prove that the digest comparison catches a wrong page.
    pub flip_byte_at: Option<u64>,
    /// A connection must send its Hello within this, and a migration's data channels and
    /// VM description must follow its main channel within this.
    pub handshake_timeout: Duration,
    /// Accept only mutual-TLS connections, with clients this configuration's CA signed.
    pub tls: Option<ferry_transport::TlsConfig>,
    /// Postcopy: how many ranges guest memory is split into, each with its own
    /// userfaultfd and handler thread (`None`: one per vCPU).
    pub fault_queues: Option<usize>,
}

impl Default for ReceiveParams {
    fn default() -> Self {
        ReceiveParams {
            prepare: PrepareMode::Populate,
            prepare_threads: None,
            prepare_nice: ferry_memory::prepare::DEFAULT_NICE,
            digest_file: None,
            flip_byte_at: None,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            fault_queues: None,
        }
    }
}

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveStats {
    /// From the migration's first connection to the guest running here.
    pub total_ms: f64,
    /// Bytes received.
    pub bytes: u64,
    /// Data pages received.
    pub pages_data: u64,
    /// Zero pages received.
    pub pages_zero: u64,
    /// Passes.
    pub passes: u64,
    /// Memory preparation: mode, time, threads.
    pub prepare_mode: String,
    /// Preparation time.
    pub prepare_ms: f64,
    /// Preparation helper threads.
    pub prepare_threads: usize,
    /// Loading the state.
    pub load_ms: f64,
    /// Hashing every page for `digest_file`, inside the downtime (0 without it).
    pub digest_ms: f64,
    /// Resuming the vCPUs.
    pub resume_ms: f64,
    /// Migrations that reached this destination, this one included.
    pub attempts: u64,
    /// Connections dropped because they did not complete a Ferry handshake.
    pub stray_connections: u64,
    /// Whether `Go` came only after this side had declared the hand-over unconfirmed (or an
    /// operator resumed the guest here with force).
    pub confirmed_late: bool,
    /// Postcopy, when the migration switched to it.
    pub postcopy: Option<Box<PostcopyStats>>,
    /// After a postcopy: what to tell its source if it reconnects late (it missed the end;
    /// see [`answer_late_resumes`]).
    #[serde(skip)]
    pub postcopy_ended: Option<Box<PostcopyEnded>>,
}

/// How receiving ended.
#[derive(Debug)]
pub enum RecvOutcome {
    /// The guest runs here.
    Running(ReceiveStats),
    /// `quit` arrived; any migration in progress was aborted (the source keeps the guest).
    Quit,
}

/// Waits for migrations on `listener` and receives them into `target` until one hands the
/// guest over (or `quit`), taking API commands from `commands`. `prepared` is a preparation
/// job already started with [`start_prepare`]; without one, preparation (if `params` asks
/// for it) starts now. Returns an error only for what no later attempt can fix: memory
/// preparation failed (a listener that fails to accept is logged and retried).
pub fn receive(
    target: Arc<dyn MigrationTarget>,
    listener: &Listener,
    params: &ReceiveParams,
    progress: Arc<Progress>,
    prepared: Option<PrepareHandle>,
    commands: Receiver<Request>,
) -> Result<RecvOutcome, MigrateError> {
    let _latency = crate::latency::ControlThread::enter();
    let ram = target.ram();
    let handle = match prepared {
        Some(h) => Some(h),
        None => start_prepare(
            &ram,
            params.prepare,
            params.prepare_threads,
            params.prepare_nice,
        )?,
    };
    let nice = handle.as_ref().map(|h| h.nice_control());
    let canceller = handle.as_ref().map(|h| h.canceller());
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    prepare::watch(handle, events_tx.clone(), Event::Prepared)?;
    progress.set_status(Status::Listening);
    progress.set_phase("listening");
    let mut rx = Destination {
        written: Arc::new(PageBits::new(&ram)),
        target,
        ram,
        params: params.clone(),
        progress,
        events_tx,
        inputs: Inputs::new(events_rx, commands),
        prepared: None,
        nice,
        attempts: 0,
        strays: Arc::new(AtomicU64::new(0)),
        digest_time: Duration::ZERO,
        canceller,
        stopped_early: false,
        fatal: None,
        recover: None,
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, strays) = (rx.events_tx.clone(), rx.strays.clone());
        let (timeout, stop) = (rx.params.handshake_timeout, &stop);
        let tls = rx.params.tls.clone();
        let acceptor = std::thread::Builder::new()
            .name("mig-accept".into())
            .spawn_scoped(scope, move || {
                crate::latency::control_thread();
                accept::run(
                    listener,
                    tls.as_ref(),
                    timeout,
                    stop,
                    &strays,
                    &tx,
                    Event::Greeted,
                )
            })
            .map_err(MigrateError::io("starting the acceptor thread"))?;
        let r = rx.run();
        stop.store(true, Ordering::Relaxed);
        let _ = acceptor.join();
        r
    })
}

/// Everything that happens to the destination, one at a time.
enum Event {
    /// A connection that sent a valid Hello.
    Greeted(Greeted),
    /// A message (or the end) on attempt `attempt`'s main channel.
    Main {
        attempt: u64,
        msg: Result<Message, ProtoError>,
    },
    /// A data channel's report for attempt `attempt`.
    Data { attempt: u64, ev: DataEvent },
    /// Memory preparation finished.
    Prepared(Result<Prepared, PrepareError>),
    /// An API command.
    Command(Request),
    /// Time passed.
    Tick,
}

/// The context every phase works in; lives across attempts.
struct Destination {
    target: Arc<dyn MigrationTarget>,
    ram: Arc<GuestRam>,
    params: ReceiveParams,
    progress: Arc<Progress>,
    events_tx: Sender<Event>,
    inputs: Inputs<Event>,
    /// Which pages hold data (so zero runs only clear those); valid across attempts.
    written: Arc<PageBits>,
    prepared: Option<Prepared>,
    nice: Option<NiceControl>,
    attempts: u64,
    strays: Arc<AtomicU64>,
    /// How long the last `digest_file` took.
    digest_time: Duration,
    /// Stops the memory preparation (a local hand-over brings memory of its own).
    canceller: Option<ferry_memory::prepare::Canceller>,
    /// The preparation was stopped early (a local hand-over brings memory of its own; a
    /// postcopy without precopy discards it all): its cancellation is no failure.
    stopped_early: bool,
    /// What makes receiving impossible from now on (memory that could not be given back).
    fatal: Option<MigrateError>,
    /// A second listener, for a broken postcopy's source (`migrate-recover`).
    recover: Option<recover::ExtraListener>,
}

impl Destination {
    /// The event loop: one event at a time, the current phase decides what comes next.
    fn run(&mut self) -> Result<RecvOutcome, MigrateError> {
        let mut phase = Phase::listening();
        loop {
            self.progress.set_phase(phase.name());
            let event = match self.next_event(phase.deadline()) {
                Event::Prepared(r) => match self.on_prepared(r) {
                    Ok(ev) => ev,
                    Err(e) => return Err(phase.fail(self, e)),
                },
                ev => ev,
            };
            let step = phase.on(event, self);
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            match step {
                Step::Next(next) => phase = next,
                Step::End(outcome) => return Ok(outcome),
            }
        }
    }

    fn next_event(&mut self, deadline: Option<Instant>) -> Event {
        match self.inputs.next(deadline) {
            Input::Event(e) => e,
            Input::Command(r) => Event::Command(r),
            Input::Tick => Event::Tick,
        }
    }

    /// Records the end of memory preparation; a failure ends receiving for good (no
    /// attempt can succeed without the memory).
    fn on_prepared(&mut self, r: Result<Prepared, PrepareError>) -> Result<Event, MigrateError> {
        let p = match r {
            Err(PrepareError::Cancelled { .. }) if self.stopped_early => Prepared {
                elapsed: Duration::ZERO,
                threads: 0,
            },
            r => r?,
        };
        self.prepared = Some(p);
        Ok(Event::Prepared(Ok(p)))
    }

    /// Starts attempt number `attempts + 1`: fresh progress, preparation at full speed.
    fn next_attempt(&mut self) -> u64 {
        self.attempts += 1;
        self.progress.begin(self.ram.size());
        if let Some(n) = &self.nice {
            // A migration is on: unprepared memory now slows every page received, and the
            // switchover waits for the preparation. Low priority was for the idle wait.
            let raised = n.set(0);
            tracing::info!(
                helpers = raised,
                "migration accepted: preparation raised to nice 0"
            );
        }
        self.attempts
    }

    /// Stops the memory preparation (its undo discards what it populated); the event of
    /// its end then counts as prepared.
    fn stop_preparation(&mut self) {
        if let Some(c) = &self.canceller {
            self.stopped_early = true;
            c.cancel();
        }
    }

    /// Whether postcopy keeps the memory file's pages rather than freeing the missing ones:
    /// memfd memory that the preparation filled (and did not take back when stopped
    /// early), on a kernel with MINOR faults on shmem. Pages are then written into the file
    /// and mapped, and the preparation's work is kept; otherwise the missing pages would be
    /// holes, which the file write would have to allocate, and `UFFDIO_COPY` does that
    /// cheaper. hugetlb memory is always placed through its file (its pages are 2 MiB,
    /// which `UFFDIO_COPY` of 4 KiB pages cannot fill). The answer does not change once a
    /// migration has begun.
    fn keeps_file_pages(&self) -> bool {
        let hugetlb = self.ram.config().backend == ferry_memory::ram::Backend::Hugetlb;
        (hugetlb || self.prepared.is_some()) && self.keeps_file_pages_once_prepared()
    }

    /// Whether [`Destination::keeps_file_pages`] will hold once the preparation (if one
    /// runs) has finished: worth waiting for it.
    fn keeps_file_pages_once_prepared(&self) -> bool {
        let hugetlb = self.ram.config().backend == ferry_memory::ram::Backend::Hugetlb;
        let fills = self.params.prepare != PrepareMode::None && !self.stopped_early;
        (hugetlb || fills) && !self.ram.is_adopted() && postcopy::file_placement_possible(&self.ram)
    }

    /// Whether this destination can take a postcopy migration: its memory must be pages it
    /// can make missing (not locked), and hugetlb memory must be placed through its file
    /// (MINOR faults on hugetlbfs, `MADV_DONTNEED` on hugetlb, memory of its own).
    fn postcopy_possible(&self) -> bool {
        let hugetlb = self.ram.config().backend == ferry_memory::ram::Backend::Hugetlb;
        self.params.prepare != PrepareMode::Lock && (!hugetlb || self.keeps_file_pages())
    }

    fn strays(&self) -> u64 {
        self.strays.load(Ordering::Relaxed)
    }
}
