//! The receiving side: accept the channels, check the VM matches, prepare memory while
//! pages stream straight into guest RAM, load the state, and run the guest only once the
//! source has committed.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_memory::prepare::{self, HostRange, PrepareOptions, PrepareStep};
use ferry_memory::ram::{Backend, GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};
use ferry_proto::{caps, read_message, ChannelRole, Hello, Message, PageRun, ProtoError, VERSION};
use ferry_sys::iov;
use ferry_transport::{set_blocking, Listener, Stream};
use serde::Serialize;
use vm_memory::Bytes;

use crate::error::MigrateError;
use crate::progress::{Progress, Status};
use crate::vm::MigrationTarget;

/// What to do to destination memory while precopy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareMode {
    /// Nothing: pages are faulted in as they arrive.
    None,
    /// Fault every page in (`MADV_POPULATE_WRITE`).
    Populate,
    /// Lock every page in RAM (`mlock`).
    Lock,
}

impl std::str::FromStr for PrepareMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(PrepareMode::None),
            "populate" => Ok(PrepareMode::Populate),
            "lock" => Ok(PrepareMode::Lock),
            o => Err(format!(
                "unknown preparation mode '{o}' (expected populate, lock or none)"
            )),
        }
    }
}

impl PrepareMode {
    /// The step kind, for feasibility checks.
    pub fn kind(self) -> Option<prepare::StepKind> {
        match self {
            PrepareMode::None => None,
            PrepareMode::Populate => Some(prepare::StepKind::Populate),
            PrepareMode::Lock => Some(prepare::StepKind::Lock),
        }
    }
}

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
    /// Write a digest of every guest page here once all memory has arrived (tests).
    pub digest_file: Option<PathBuf>,
    /// How long the data channels may take to arrive once the main one has.
    pub timeout: Duration,
}

impl Default for ReceiveParams {
    fn default() -> Self {
        ReceiveParams {
            prepare: PrepareMode::Populate,
            prepare_threads: None,
            prepare_nice: prepare::DEFAULT_NICE,
            digest_file: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveStats {
    /// From the first connection to the guest running here.
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
    /// Resuming the vCPUs.
    pub resume_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitSetup,
    Receiving,
    AwaitChannels,
    Loading,
    AwaitGo,
    Running,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting-hello",
            State::AwaitSetup => "awaiting-setup",
            State::Receiving => "receiving",
            State::AwaitChannels => "awaiting-channels",
            State::Loading => "loading",
            State::AwaitGo => "awaiting-go",
            State::Running => "running",
        }
    }
}

enum Event {
    Main(Result<Message, MigrateError>),
    PassEnd { channel: usize, pass: u32 },
    Closed { channel: usize },
    Failed(MigrateError),
    Prepared(Result<(Duration, usize), MigrateError>),
}

/// Which destination pages hold data (so a zero run only has to clear those).
struct Written {
    regions: Vec<(u64, Vec<AtomicU64>)>,
}

impl Written {
    fn new(ram: &GuestRam) -> Self {
        Written {
            regions: ram
                .regions()
                .iter()
                .map(|r| {
                    (
                        r.gpa,
                        (0..r.pages().div_ceil(64))
                            .map(|_| AtomicU64::new(0))
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    fn locate(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.regions.iter().find_map(|(base, words)| {
            let page = gpa.checked_sub(*base)? / PAGE_SIZE;
            words
                .get((page / 64) as usize)
                .map(|w| (w, 1u64 << (page % 64)))
        })
    }

    fn set(&self, gpa: u64) {
        if let Some((w, bit)) = self.locate(gpa) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    fn take(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }
}

/// Starts preparing `ram` as `mode` says, on helper threads, and returns the running job
/// (`None` for [`PrepareMode::None`]). A destination that knows its layout from its own
/// configuration calls this at startup, so the work is done before the source even
/// connects; [`receive`] otherwise starts it once the handshake has checked the layout.
pub fn start_prepare(
    ram: &GuestRam,
    mode: PrepareMode,
    threads: Option<usize>,
    nice: i32,
) -> Result<Option<prepare::PrepareHandle>, MigrateError> {
    let step: Arc<dyn PrepareStep> = match mode {
        PrepareMode::None => return Ok(None),
        PrepareMode::Populate => Arc::new(prepare::Populate),
        PrepareMode::Lock => Arc::new(prepare::Lock),
    };
    let ranges: Vec<HostRange> = ram
        .host_regions()
        .iter()
        .map(|r| HostRange::new(r.addr, r.len))
        .collect();
    let opts = PrepareOptions {
        max_threads: threads,
        nice,
        page_size: (ram.config().backend == Backend::Hugetlb).then_some(HUGE_PAGE_SIZE as usize),
        ..PrepareOptions::default()
    };
    prepare::start(ranges, step, opts)
        .map(Some)
        .map_err(|e| MigrateError::Prepare(e.to_string()))
}

/// Receives a migration on `listener` into `target`. Returns once the guest runs here.
/// On error nothing runs; the caller discards the VM. `prepared` is a preparation job
/// already started with [`start_prepare`]; without one, preparation (if `params` asks for
/// it) starts after the handshake.
pub fn receive(
    target: Arc<dyn MigrationTarget>,
    listener: &Listener,
    params: &ReceiveParams,
    progress: Arc<Progress>,
    prepared: Option<prepare::PrepareHandle>,
) -> Result<ReceiveStats, MigrateError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut r = Receiver_ {
        ram: target.ram(),
        target,
        params: params.clone(),
        progress,
        state: State::AwaitHello,
        main: None,
        streams: Vec::new(),
        tx,
        rx,
        stats: ReceiveStats::default(),
    };
    let result = r.run(listener, prepared);
    if let Err(e) = &result {
        tracing::warn!(state = r.state.name(), "incoming migration failed: {e}");
        if !matches!(e, MigrateError::Peer { .. }) {
            let reason: String = format!("destination: {e}").chars().take(4000).collect();
            let _ = r.send_main(&Message::Error { reason });
        }
        r.progress.set_status(Status::Failed);
    } else {
        r.progress.set_status(Status::Completed);
    }
    for s in &r.streams {
        s.shutdown();
    }
    result
}

struct Receiver_ {
    target: Arc<dyn MigrationTarget>,
    ram: Arc<GuestRam>,
    params: ReceiveParams,
    progress: Arc<Progress>,
    state: State,
    main: Option<Arc<Mutex<Stream>>>,
    streams: Vec<Stream>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    stats: ReceiveStats,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |source| MigrateError::Io {
        what: what.to_string(),
        source,
    }
}

impl Receiver_ {
    fn send_main(&self, msg: &Message) -> Result<(), MigrateError> {
        send_on(self.main.as_ref(), msg, self.state.name())
    }

    fn proto_err(&self, channel: &str, e: ProtoError) -> MigrateError {
        match e {
            ProtoError::Eof => MigrateError::Invalid(format!(
                "the source closed the {channel} channel in state {}",
                self.state.name()
            )),
            source => MigrateError::Proto {
                channel: channel.into(),
                state: self.state.name(),
                source,
            },
        }
    }

    fn unexpected(&self, channel: &str, m: &Message) -> MigrateError {
        match m {
            Message::Error { reason } => MigrateError::Peer {
                side: "source",
                reason: reason.clone(),
            },
            m => MigrateError::Unexpected {
                message: m.name(),
                state: self.state.name(),
                channel: channel.into(),
            },
        }
    }

    /// Accepts connections until the main channel and all its data channels are there.
    fn accept_channels(
        &mut self,
        listener: &Listener,
    ) -> Result<(Stream, Hello, Vec<Stream>), MigrateError> {
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the listener"))?;
        let mut main: Option<(Stream, Hello)> = None;
        let mut data: Vec<(u16, u64, Stream)> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            if let Some((_, h)) = &main {
                if data.len() == usize::from(h.data_channels) {
                    break;
                }
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(MigrateError::Timeout(format!(
                    "waiting for data channels: {} of {} arrived",
                    data.len(),
                    main.as_ref().map(|m| m.1.data_channels).unwrap_or(0)
                )));
            }
            let mut s = match listener.accept() {
                Ok(s) => s,
                Err(ferry_transport::TransportError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            set_blocking(&s).map_err(io_err("configuring a socket"))?;
            s.set_read_timeout(Some(self.params.timeout))
                .map_err(io_err("configuring a socket"))?;
            let mut scratch = Vec::new();
            let hello = match read_message(&mut s, &mut scratch) {
                Ok(Message::Hello(h)) => h,
                Ok(m) => {
                    return Err(MigrateError::Unexpected {
                        message: m.name(),
                        state: self.state.name(),
                        channel: "new connection".into(),
                    })
                }
                Err(e) => return Err(self.proto_err("new connection", e)),
            };
            if hello.version != VERSION {
                let mut buf = Vec::new();
                Message::Refuse {
                    reason: format!(
                        "protocol version {} is not supported; this destination speaks version {VERSION}",
                        hello.version
                    ),
                }
                .encode(&mut buf);
                let _ = s.write_all(&buf);
                return Err(MigrateError::Version {
                    peer: hello.version,
                    ours: VERSION,
                });
            }
            let _ = s.set_read_timeout(None);
            match hello.role {
                ChannelRole::Main => {
                    if main.is_some() {
                        return Err(MigrateError::Invalid(
                            "a second main channel arrived".into(),
                        ));
                    }
                    if hello.data_channels == 0 {
                        return Err(MigrateError::Invalid(
                            "the source opened no data channel".into(),
                        ));
                    }
                    let _ = s.set_nodelay();
                    deadline = Some(Instant::now() + self.params.timeout);
                    main = Some((s, hello));
                }
                ChannelRole::Data { index } => data.push((index, hello.session, s)),
            }
            if let Some((_, h)) = &main {
                for (index, session, _) in &data {
                    if *session != h.session {
                        return Err(MigrateError::Invalid(format!(
                            "data channel {index} belongs to another migration (session {session:#x}, expected {:#x})",
                            h.session
                        )));
                    }
                    if *index >= h.data_channels {
                        return Err(MigrateError::Invalid(format!(
                            "data channel index {index} out of range (the source announced {} channels)",
                            h.data_channels
                        )));
                    }
                }
                let mut seen: Vec<u16> = data.iter().map(|d| d.0).collect();
                seen.sort_unstable();
                if seen.windows(2).any(|w| w[0] == w[1]) {
                    return Err(MigrateError::Invalid("duplicate data channel index".into()));
                }
            }
        }
        let (main_stream, hello) = main.ok_or(MigrateError::Invalid("no main channel".into()))?;
        data.sort_by_key(|d| d.0);
        Ok((main_stream, hello, data.into_iter().map(|d| d.2).collect()))
    }

    fn run(
        &mut self,
        listener: &Listener,
        prepared: Option<prepare::PrepareHandle>,
    ) -> Result<ReceiveStats, MigrateError> {
        let (mut main, hello, data) = self.accept_channels(listener)?;
        let t_start = Instant::now();
        self.progress.begin(self.ram.size());
        self.streams
            .push(main.try_clone().map_err(io_err("cloning a socket"))?);
        for d in &data {
            self.streams
                .push(d.try_clone().map_err(io_err("cloning a socket"))?);
        }
        let writer = Arc::new(Mutex::new(
            main.try_clone().map_err(io_err("cloning a socket"))?,
        ));
        self.main = Some(writer.clone());
        let caps = hello.capabilities & caps::ALL;
        self.send_main(&Message::Welcome {
            version: VERSION,
            capabilities: caps,
        })?;

        self.state = State::AwaitSetup;
        let _ = main.set_read_timeout(Some(self.params.timeout));
        let mut scratch = Vec::new();
        let desc = match read_message(&mut main, &mut scratch) {
            Ok(Message::Setup(d)) => d,
            Ok(m) => return Err(self.unexpected("main", &m)),
            Err(e) => return Err(self.proto_err("main", e)),
        };
        let _ = main.set_read_timeout(None);
        if let Err(reason) = crate::compat::check(&desc, &self.target.description()) {
            self.send_main(&Message::Refuse {
                reason: reason.clone(),
            })?;
            return Err(MigrateError::Incompatible(reason));
        }
        self.send_main(&Message::SetupAccepted)?;
        self.state = State::Receiving;
        self.progress.set_status(Status::Active);

        // Memory preparation runs beside the incoming pages; the source waits for its
        // acknowledgement (switchover-ack) before pausing the guest.
        self.track_prepare(prepared, caps & caps::SWITCHOVER_ACK != 0, writer.clone())?;

        // Main channel reader and one receiver per data channel.
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("mig-main-rx".into())
            .spawn(move || {
                let mut scratch = Vec::new();
                loop {
                    let r = read_message(&mut main, &mut scratch);
                    let end = r.is_err();
                    let ev = r.map_err(|e| match e {
                        ProtoError::Eof => {
                            MigrateError::Invalid("the source closed the main channel".into())
                        }
                        source => MigrateError::Proto {
                            channel: "main".into(),
                            state: "receiving",
                            source,
                        },
                    });
                    if tx.send(Event::Main(ev)).is_err() || end {
                        return;
                    }
                }
            })
            .map_err(io_err("starting a thread"))?;
        let written = Arc::new(Written::new(&self.ram));
        let n = data.len();
        for (channel, stream) in data.into_iter().enumerate() {
            let ctx = DataRx {
                channel,
                ram: self.ram.clone(),
                written: written.clone(),
                tx: self.tx.clone(),
                progress: self.progress.clone(),
            };
            std::thread::Builder::new()
                .name(format!("mig-recv{channel}"))
                .spawn(move || ctx.run(stream))
                .map_err(io_err("starting a thread"))?;
        }

        // Receive until the source says it is complete and every channel has delivered the
        // final pass.
        let mut sections = None;
        let mut final_pass: Option<u32> = None;
        let mut last: Vec<Option<u32>> = vec![None; n];
        let mut prepared = false;
        loop {
            if let Some(fp) = final_pass {
                if prepared && last.iter().all(|l| *l == Some(fp)) {
                    break;
                }
            }
            let ev = self
                .rx
                .recv()
                .map_err(|_| MigrateError::Invalid("all receivers stopped".into()))?;
            match ev {
                Event::Main(Ok(Message::State { sections: s }))
                    if self.state == State::Receiving && sections.is_none() =>
                {
                    sections = Some(s);
                }
                Event::Main(Ok(Message::Complete { final_pass: fp }))
                    if self.state == State::Receiving =>
                {
                    if sections.is_none() {
                        return Err(MigrateError::Invalid(
                            "Complete arrived before the VM state".into(),
                        ));
                    }
                    final_pass = Some(fp);
                    self.state = State::AwaitChannels;
                }
                Event::Main(Ok(m)) => return Err(self.unexpected("main", &m)),
                Event::Main(Err(e)) => return Err(e),
                Event::PassEnd { channel, pass } => {
                    let slot = last
                        .get_mut(channel)
                        .ok_or_else(|| MigrateError::Invalid(format!("channel {channel}")))?;
                    if slot.is_some_and(|p| pass <= p) {
                        return Err(MigrateError::Invalid(format!(
                            "data channel {channel}: pass {pass} ended after pass {}",
                            slot.unwrap_or(0)
                        )));
                    }
                    *slot = Some(pass);
                    self.progress
                        .pass
                        .fetch_max(u64::from(pass), Ordering::Relaxed);
                }
                Event::Closed { channel } => {
                    let done = final_pass.is_some_and(|fp| last.get(channel) == Some(&Some(fp)));
                    if !done {
                        return Err(MigrateError::Invalid(format!(
                            "data channel {channel} closed in state {} before the migration completed",
                            self.state.name()
                        )));
                    }
                }
                Event::Failed(e) => return Err(e),
                Event::Prepared(Ok((elapsed, threads))) => {
                    prepared = true;
                    self.stats.prepare_ms = ms(elapsed);
                    self.stats.prepare_threads = threads;
                }
                Event::Prepared(Err(e)) => return Err(e),
            }
        }

        self.state = State::Loading;
        self.progress.set_status(Status::Switchover);
        if let Some(path) = self.params.digest_file.clone() {
            crate::send::write_digests(&self.ram, &path)?;
        }
        let t_load = Instant::now();
        let sections = sections.unwrap_or_default();
        self.target.load_state(&sections)?;
        let load = t_load.elapsed();
        self.send_main(&Message::Loaded {
            load_us: load.as_micros() as u64,
        })?;

        // Only the source's commit lets the guest run here.
        self.state = State::AwaitGo;
        loop {
            match self.rx.recv() {
                Ok(Event::Main(Ok(Message::Go))) => break,
                Ok(Event::Main(Ok(m))) => return Err(self.unexpected("main", &m)),
                Ok(Event::Main(Err(e))) => {
                    return Err(MigrateError::HandoverUnconfirmed(format!(
                        "{e} after the state was loaded, before the source committed; not running the guest"
                    )))
                }
                Ok(Event::Failed(_)) | Ok(Event::Closed { .. }) | Ok(Event::PassEnd { .. }) | Ok(Event::Prepared(_)) => {}
                Err(_) => return Err(MigrateError::Invalid("all receivers stopped".into())),
            }
        }
        let t_resume = Instant::now();
        self.target.resume()?;
        let resume = t_resume.elapsed();
        self.state = State::Running;
        // The guest runs here now; a lost Running message only leaves the source waiting.
        let _ = self.send_main(&Message::Running {
            resume_us: resume.as_micros() as u64,
        });
        self.stats.total_ms = ms(t_start.elapsed());
        self.stats.bytes = self.progress.bytes.load(Ordering::Relaxed);
        self.stats.pages_data = self.progress.pages_data.load(Ordering::Relaxed);
        self.stats.pages_zero = self.progress.pages_zero.load(Ordering::Relaxed);
        self.stats.passes = final_pass.map(|p| u64::from(p) + 1).unwrap_or(0);
        self.stats.load_ms = ms(load);
        self.stats.resume_ms = ms(resume);
        Ok(self.stats.clone())
    }

    fn track_prepare(
        &mut self,
        prepared: Option<prepare::PrepareHandle>,
        ack: bool,
        writer: Arc<Mutex<Stream>>,
    ) -> Result<(), MigrateError> {
        self.stats.prepare_mode = format!("{:?}", self.params.prepare).to_lowercase();
        let handle = match prepared {
            Some(h) => Some(h),
            None => start_prepare(
                &self.ram,
                self.params.prepare,
                self.params.prepare_threads,
                self.params.prepare_nice,
            )?,
        };
        if let Some(h) = &handle {
            // A migration is on: unprepared memory now slows every page received, and the
            // switchover waits for the preparation. Low priority was for the idle wait.
            let n = h.nice_control().set(0);
            tracing::info!(
                helpers = n,
                "migration accepted: preparation raised to nice 0"
            );
        }
        let Some(handle) = handle else {
            if ack {
                send_on(
                    Some(&writer),
                    &Message::Prepared {
                        prepare_us: 0,
                        threads: 0,
                    },
                    "receiving",
                )?;
            }
            let _ = self.tx.send(Event::Prepared(Ok((Duration::ZERO, 0))));
            return Ok(());
        };
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("mig-prepare".into())
            .spawn(move || {
                let r = handle
                    .wait()
                    .map_err(|e| MigrateError::Prepare(e.to_string()));
                if let Ok(rep) = &r {
                    tracing::info!(
                        ms = ms(rep.elapsed),
                        threads = rep.threads,
                        "destination memory prepared"
                    );
                    if ack {
                        let msg = Message::Prepared {
                            prepare_us: rep.elapsed.as_micros() as u64,
                            threads: rep.threads as u32,
                        };
                        if let Err(e) = send_on(Some(&writer), &msg, "receiving") {
                            let _ = tx.send(Event::Prepared(Err(e)));
                            return;
                        }
                    }
                }
                let _ = tx.send(Event::Prepared(r.map(|rep| (rep.elapsed, rep.threads))));
            })
            .map_err(io_err("starting a thread"))?;
        Ok(())
    }
}

fn send_on(
    main: Option<&Arc<Mutex<Stream>>>,
    msg: &Message,
    state: &'static str,
) -> Result<(), MigrateError> {
    let main = main.ok_or(MigrateError::Invalid("no main channel".into()))?;
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    let mut s = main.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(&buf).map_err(|source| MigrateError::Send {
        channel: "main".into(),
        state,
        source,
    })
}

struct DataRx {
    channel: usize,
    ram: Arc<GuestRam>,
    written: Arc<Written>,
    tx: Sender<Event>,
    progress: Arc<Progress>,
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl DataRx {
    fn run(self, mut stream: Stream) {
        let ev = match self.receive(&mut stream) {
            Ok(()) => Event::Closed {
                channel: self.channel,
            },
            Err(e) => Event::Failed(e),
        };
        let _ = self.tx.send(ev);
    }

    fn name(&self) -> String {
        format!("data {}", self.channel)
    }

    fn slice_of(&self, r: &PageRun) -> Result<ferry_memory::ram::GuestSlice<'_>, MigrateError> {
        let bad = || {
            MigrateError::Invalid(format!(
                "data channel {}: {} pages at {:#x} are not inside guest RAM",
                self.channel, r.pages, r.gpa
            ))
        };
        self.ram
            .region_of(r.gpa, u64::from(r.pages))
            .ok_or_else(bad)?;
        self.ram
            .slice(r.gpa, (u64::from(r.pages) * PAGE_SIZE) as usize)
            .map_err(|_| bad())
    }

    fn receive(&self, stream: &mut Stream) -> Result<(), MigrateError> {
        let mut scratch = Vec::new();
        loop {
            let msg = match read_message(stream, &mut scratch) {
                Ok(m) => m,
                Err(ProtoError::Eof) => return Ok(()),
                Err(source) => {
                    return Err(MigrateError::Proto {
                        channel: self.name(),
                        state: "receiving",
                        source,
                    })
                }
            };
            match msg {
                Message::Pages { runs, .. } => {
                    let slices = runs
                        .iter()
                        .map(|r| self.slice_of(r))
                        .collect::<Result<Vec<_>, _>>()?;
                    iov::read_exact_volatile(stream.as_fd(), &slices).map_err(|e| {
                        MigrateError::Proto {
                            channel: self.name(),
                            state: "receiving",
                            source: ProtoError::Io(e),
                        }
                    })?;
                    let mut pages = 0u64;
                    for r in &runs {
                        for p in 0..u64::from(r.pages) {
                            self.written.set(r.gpa + p * PAGE_SIZE);
                        }
                        pages += u64::from(r.pages);
                    }
                    self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
                    self.progress
                        .bytes
                        .fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
                }
                Message::ZeroPages { runs, .. } => {
                    for r in &runs {
                        let slice = self.slice_of(r)?;
                        for p in 0..u64::from(r.pages) {
                            // Fresh destination memory is zero; only pages written earlier
                            // in this migration need clearing.
                            if self.written.take(r.gpa + p * PAGE_SIZE) {
                                slice
                                    .write_slice(&ZERO_PAGE, (p * PAGE_SIZE) as usize)
                                    .map_err(|e| MigrateError::Invalid(e.to_string()))?;
                            }
                        }
                        self.progress
                            .pages_zero
                            .fetch_add(u64::from(r.pages), Ordering::Relaxed);
                    }
                }
                Message::PassEnd { pass, .. } => {
                    if self
                        .tx
                        .send(Event::PassEnd {
                            channel: self.channel,
                            pass,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                m => {
                    return Err(MigrateError::Unexpected {
                        message: m.name(),
                        state: "receiving",
                        channel: self.name(),
                    })
                }
            }
        }
    }
}
