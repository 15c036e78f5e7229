//! The sending side: a phase machine (`send/phase.rs`) driven by one event loop.
//!
//! The loop takes one event at a time (a message from the destination, a data channel's
//! report, an API command, or a tick of the clock) and hands it to the current phase, which
//! returns the next phase. Until `Go` is written the source owns the guest: any error
//! aborts, resumes the guest here first, then tells the destination. After `Go` nothing
//! aborts any more; a hand-over that is not confirmed in time becomes the `unconfirmed`
//! phase, which keeps the guest paused and keeps listening for the destination's word.

mod devices;
mod phase;
mod postcopy;
mod urgent;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_memory::dirty::DirtyTracker;
use ferry_memory::ram::GuestRam;
use ferry_proto::{Message, ProtoError, Timeouts};
use ferry_transport::{close_gracefully, Stream, TlsConfig, Uri};

use crate::channel::{Compression, Wire};

use crate::control::Request;
use crate::error::{Channel, MigrateError};
use crate::events::{Input, Inputs};
use crate::progress::{MigrationStats, Progress, Status};
use crate::vm::MigrationSource;
use crate::wire::{send_by, ReaderGuard};

use devices::{DeviceEvent, DeviceSenders};
use phase::{Phase, Step};
use worker::{WorkerEvent, Workers};

/// Most data channels a source opens (destinations refuse more).
pub const MAX_CHANNELS: u16 = 64;
/// How long telling the destination why we abort may take.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closed control channel still delivers what was written to it.
const LINGER: Duration = Duration::from_secs(5);

/// How to migrate.
#[derive(Debug, Clone)]
pub struct SendParams {
    /// Data channels (1 to [`MAX_CHANNELS`]).
    pub channels: u16,
    /// Downtime to aim for.
    pub downtime_limit: Duration,
    /// Cap on bandwidth over all channels, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Throttle vCPUs when precopy does not converge.
    pub auto_converge: bool,
    /// Write a digest of every guest page at the switchover here (for verification).
    pub digest_file: Option<PathBuf>,
    /// Connecting, the handshake and the setup must finish within this.
    pub handshake_timeout: Duration,
    /// Precopy fails when the destination acknowledges nothing for this long.
    pub progress_timeout: Duration,
    /// The guest stays paused here at most this long before the hand-over commits; past
    /// it the migration is aborted and the guest resumed here.
    pub switchover_timeout: Duration,
    /// A local hand-over: pass the guest memory file to a destination on this host (over a
    /// unix socket) instead of copying pages; `channels` is not used.
    pub local: bool,
    /// Mutual TLS on every channel with these certificates.
    pub tls: Option<TlsConfig>,
    /// How pages are compressed.
    pub compression: Compression,
    /// A checksum on every frame and every page (without TLS, whose AEAD covers it).
    pub checksums: bool,
    /// Whether and when to switch to postcopy.
    pub postcopy: PostcopyMode,
    /// Save and load device (and vCPU) state side by side, a thread per device (small
    /// ones, like vCPUs, sharing one per CPU); else
    /// one device after another on one thread (the shape of QEMU before 10.0).
    pub parallel_devices: bool,
}

/// When a migration runs the guest on the destination before every page is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostcopyMode {
    /// Never: precopy only.
    #[default]
    Off,
    /// Only when `migrate-start-postcopy` asks for it (the urgent channel is opened, the
    /// destination's support checked, at the start).
    OnRequest,
    /// Precopy first; switch when it does not converge (instead of throttling the guest),
    /// or when asked.
    AfterPrecopy,
    /// Switch right after the setup: no precopy pass.
    Now,
}

impl PostcopyMode {
    /// Its name, for statistics.
    pub fn name(self) -> &'static str {
        match self {
            PostcopyMode::Off => "off",
            PostcopyMode::OnRequest => "on-request",
            PostcopyMode::AfterPrecopy => "after-precopy",
            PostcopyMode::Now => "now",
        }
    }
}

impl Default for SendParams {
    fn default() -> Self {
        SendParams {
            channels: 4,
            downtime_limit: Duration::from_millis(50),
            max_bandwidth: None,
            auto_converge: true,
            digest_file: None,
            handshake_timeout: Duration::from_secs(10),
            progress_timeout: Duration::from_secs(30),
            switchover_timeout: Duration::from_secs(2),
            local: false,
            tls: None,
            compression: Compression::Off,
            checksums: true,
            postcopy: PostcopyMode::Off,
            parallel_devices: true,
        }
    }
}

impl SendParams {
    /// Checks that the parameters can work together; the error names the one to change.
    pub fn validate(&self) -> Result<(), MigrateError> {
        if !self.local && (self.channels == 0 || self.channels > MAX_CHANNELS) {
            return Err(MigrateError::Channels {
                asked: self.channels,
                max: MAX_CHANNELS,
            });
        }
        if self.max_bandwidth == Some(0) {
            return Err(MigrateError::ZeroBandwidth);
        }
        for (name, value) in [
            ("handshake-timeout", self.handshake_timeout),
            ("progress-timeout", self.progress_timeout),
            ("switchover-timeout", self.switchover_timeout),
        ] {
            if value < Duration::from_millis(1) || value.as_millis() > u128::from(u32::MAX) {
                return Err(MigrateError::TimeoutRange { name, value });
            }
        }
        if self.local && self.postcopy != PostcopyMode::Off {
            return Err(MigrateError::LocalWithPostcopy);
        }
        if self.switchover_timeout <= self.downtime_limit {
            return Err(MigrateError::SwitchoverBelowLimit {
                switchover: self.switchover_timeout,
                limit: self.downtime_limit,
            });
        }
        Ok(())
    }

    fn timeouts(&self) -> Timeouts {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Timeouts {
            progress_ms: ms(self.progress_timeout),
            switchover_ms: ms(self.switchover_timeout),
        }
    }
}

/// How a migration ended for the source.
#[derive(Debug)]
pub enum SendOutcome {
    /// The destination runs the guest; it stays paused here for good.
    Completed(MigrationStats),
    /// The migration failed and the guest is this side's again: running, unless it was
    /// paused before the migration started.
    Failed(MigrateError),
    /// `quit` arrived: the migration was aborted (or, after an unconfirmed hand-over,
    /// given up with force) and the caller should end the process.
    Quit,
    /// After an unconfirmed hand-over an operator resumed the guest here with force.
    ForcedResume,
}

/// Migrates `vm` to the destination listening at `uri`, taking API commands from
/// `commands` while it runs. See [`SendOutcome`] for where the guest is afterwards.
pub fn migrate(
    vm: Arc<dyn MigrationSource>,
    uri: &Uri,
    params: &SendParams,
    progress: Arc<Progress>,
    commands: Receiver<Request>,
) -> SendOutcome {
    let _latency = crate::latency::ControlThread::enter();
    let ram = vm.ram();
    progress.begin(ram.size());
    if let Err(e) = params
        .validate()
        .and_then(|()| check_local(params, uri, &ram))
    {
        progress.set_error(&e);
        progress.set_status(Status::Failed);
        return SendOutcome::Failed(e);
    }
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let device_list = vm.devices();
    let mut src = Source {
        vm,
        ram,
        params: params.clone(),
        progress,
        events_tx,
        inputs: Inputs::new(events_rx, commands),
        main: None,
        data: Vec::new(),
        urgent: None,
        urgent_server: None,
        postcopy_ok: false,
        uri: None,
        session: 0,
        fault_hint: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        sockets: Vec::new(),
        reader: None,
        wire: Wire::default(),
        peer_sums: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        workers: Workers::default(),
        device_list,
        devices: None,
        devices_ready: false,
        initial_pending: 0,
        initial_sent_at: None,
        tracker: None,
        paused_by_us: false,
        need_prepared: false,
        prepared: None,
        rtt: Duration::ZERO,
        stats: MigrationStats::default(),
        started: Instant::now(),
    };
    src.run(uri)
}

/// A local hand-over needs a unix socket and memory another process can map.
fn check_local(params: &SendParams, uri: &Uri, ram: &GuestRam) -> Result<(), MigrateError> {
    if !params.local {
        return Ok(());
    }
    if params.tls.is_some() {
        return Err(MigrateError::LocalWithTls);
    }
    if !matches!(uri, Uri::Unix(_)) {
        return Err(MigrateError::LocalNeedsUnix {
            uri: uri.to_string(),
        });
    }
    if ram.file().is_none() {
        return Err(MigrateError::LocalNeedsSharedMemory {
            backend: ram.config().backend.name(),
        });
    }
    Ok(())
}

/// Everything that happens to the source, one at a time.
enum Event {
    /// The connecting thread finished.
    Connected(Result<Connection, MigrateError>),
    /// A message (or the end) on the main channel.
    Peer(Result<Message, ProtoError>),
    /// A data channel sender's report.
    Worker(WorkerEvent),
    /// A device thread's report.
    Device(DeviceEvent),
    /// An API command.
    Command(Request),
    /// Time passed.
    Tick,
}

/// The channels, connected and greeted.
struct Connection {
    main: Stream,
    data: Vec<Stream>,
    /// Postcopy's urgent channel, when postcopy may happen.
    urgent: Option<Stream>,
}

/// The context every phase works in.
struct Source {
    vm: Arc<dyn MigrationSource>,
    ram: Arc<GuestRam>,
    params: SendParams,
    progress: Arc<Progress>,
    events_tx: Sender<Event>,
    inputs: Inputs<Event>,
    main: Option<Stream>,
    /// Data streams until the senders take them.
    data: Vec<Stream>,
    /// The urgent channel until postcopy's server takes it.
    urgent: Option<Stream>,
    /// Postcopy's page server, once it runs.
    urgent_server: Option<urgent::Urgent>,
    /// The destination accepted postcopy.
    postcopy_ok: bool,
    /// Where the destination listens (a broken postcopy reconnects there).
    uri: Option<Uri>,
    /// This migration's session id, in every channel's Hello.
    session: u64,
    /// Postcopy: where the destination faulted last (the push follows it).
    fault_hint: Arc<std::sync::atomic::AtomicU64>,
    /// Every socket, to shut down when the migration ends.
    sockets: Vec<Stream>,
    reader: Option<ReaderGuard>,
    /// What the handshake agreed for frames and pages.
    wire: Wire,
    /// Set once checksums are agreed: the main channel's reader then requires them.
    peer_sums: Arc<std::sync::atomic::AtomicBool>,
    workers: Workers,
    /// Every device and vCPU, read once: the Setup's list and the streams follow its order.
    device_list: Vec<Arc<dyn crate::device::MigrationDevice>>,
    /// The device streams, from precopy on.
    devices: Option<DeviceSenders>,
    /// The destination has loaded every device's initial bytes (switchover-ack).
    devices_ready: bool,
    /// Devices whose initial bytes are not all handed to their channel yet, and when the
    /// last were: the destination has the progress timeout from then to say `DevicesReady`.
    initial_pending: usize,
    initial_sent_at: Option<Instant>,
    tracker: Option<Arc<DirtyTracker>>,
    paused_by_us: bool,
    need_prepared: bool,
    prepared: Option<(u64, u32, Instant)>,
    rtt: Duration,
    stats: MigrationStats,
    started: Instant,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Source {
    /// The event loop: one event at a time, the current phase decides what comes next.
    fn run(&mut self, uri: &Uri) -> SendOutcome {
        let mut phase = Phase::connect(self, uri);
        loop {
            let name = phase.name();
            self.progress.set_phase(name);
            let event = self.next_event(phase.deadline());
            match phase.on(event, self) {
                Ok(Step::Next(next)) => phase = next,
                Ok(Step::End(outcome)) => return *outcome,
                Err(e) => return self.abort(e, name),
            }
        }
    }

    /// The next event, or `Tick` at the deadline (and at least every tick interval).
    fn next_event(&mut self, deadline: Option<Instant>) -> Event {
        match self.inputs.next(deadline) {
            Input::Event(e) => e,
            Input::Command(r) => Event::Command(r),
            Input::Tick => Event::Tick,
        }
    }

    /// Writes a control message, giving up at `deadline`.
    /// The main channel, once connected.
    fn main_channel(&mut self, phase: &'static str) -> Result<&mut Stream, MigrateError> {
        self.main.as_mut().ok_or(MigrateError::Closed {
            side: "destination",
            channel: Channel::Main,
            phase,
        })
    }

    /// Sends `msg` with the guest memory file attached (a local hand-over).
    fn send_with_file(
        &mut self,
        msg: &Message,
        file: &std::fs::File,
        phase: &'static str,
    ) -> Result<(), MigrateError> {
        let timeout = self.params.handshake_timeout;
        let sum = self.wire.sums;
        let main = self.main_channel(phase)?;
        let mut buf = Vec::new();
        msg.encode_with(&mut buf, sum);
        main.set_write_timeout(Some(timeout))
            .and_then(|()| main.send_with_fds(&buf, &[std::os::fd::AsFd::as_fd(file)]))
            .map_err(|source| MigrateError::Send {
                channel: Channel::Main,
                phase,
                source,
            })
    }

    fn send(
        &mut self,
        msg: &Message,
        phase: &'static str,
        deadline: Instant,
    ) -> Result<(), MigrateError> {
        let sum = self.wire.sums;
        let main = self.main_channel(phase)?;
        let n = send_by(main, msg, sum, deadline).map_err(|source| MigrateError::Send {
            channel: Channel::Main,
            phase,
            source,
        })?;
        self.progress
            .bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A message that has no place in `phase`.
    fn unexpected(&self, msg: Message, phase: &'static str) -> MigrateError {
        MigrateError::main_unexpected("destination", msg, phase)
    }

    /// The main channel failed to read.
    fn read_error(&self, e: ProtoError, phase: &'static str) -> MigrateError {
        MigrateError::main_read("destination", e, phase)
    }

    /// A data channel failing usually means the destination gave up; its own reason (sent on
    /// the main channel just before it closed) is the useful one. Waits at most 300 ms, so
    /// a caller holding a paused guest resumes it first.
    fn prefer_peer_reason(&self, e: MigrateError) -> MigrateError {
        match self.peer_word_soon(|m| matches!(m, Message::Error { .. })) {
            Some(Message::Error { reason }) => MigrateError::Peer {
                side: "destination",
                reason,
            },
            _ => e,
        }
    }

    /// The destination's next message that `wanted` picks, if it comes within 300 ms and
    /// before its main channel ends (other events met meanwhile belong to a link that is
    /// going away, and are dropped).
    fn peer_word_soon(&self, wanted: impl Fn(&Message) -> bool) -> Option<Message> {
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(ev) = self
            .inputs
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            match ev {
                Event::Peer(Ok(m)) if wanted(&m) => return Some(m),
                // The main channel ended without it: it will not come.
                Event::Peer(Err(_)) => return None,
                _ => {}
            }
        }
        None
    }

    /// Whether the destination has acknowledged its memory preparation (or needs none)
    /// and the devices' initial bytes.
    fn destination_ready(&self) -> bool {
        (!self.need_prepared || self.prepared.is_some()) && self.devices_ready
    }

    /// The destination had every device's initial bytes a progress timeout ago and still
    /// has not said it loaded them: it is not going to.
    fn devices_ready_overdue(&self) -> Option<MigrateError> {
        let sent = self.initial_sent_at?;
        (!self.devices_ready && sent.elapsed() >= self.params.progress_timeout).then_some(
            MigrateError::Timeout {
                what: crate::error::Waited::DevicesReady,
                after: self.params.progress_timeout,
            },
        )
    }

    /// Gives the guest back to this side after a failure: stop tracking and throttling, and
    /// resume it if the migration paused it.
    fn take_back(&mut self) {
        // Devices run again before the guest does.
        if let Some(d) = self.devices.take() {
            d.abort();
        }
        if let Some(t) = self.tracker.take() {
            let _ = t.stop();
        }
        self.vm.set_throttle(0);
        if self.paused_by_us {
            self.paused_by_us = false;
            if let Err(e) = self.vm.resume() {
                tracing::error!("could not resume the guest after a failed migration: {e}");
            }
        }
    }

    /// A failure before the commit: resume the guest here first, then tell the peer, then
    /// close everything.
    fn abort(&mut self, e: MigrateError, phase: &'static str) -> SendOutcome {
        tracing::warn!(phase, "migration failed: {e}");
        self.take_back();
        if !e.came_from_peer() && self.main.is_some() {
            let deadline = Instant::now() + ERROR_SEND_TIMEOUT;
            let _ = self.send(&Message::error(format!("source: {e}")), phase, deadline);
        }
        self.close();
        self.progress.set_error(&e);
        match e {
            MigrateError::Aborted(crate::error::AbortCause::Quit) => {
                self.progress.set_status(Status::Cancelled);
                SendOutcome::Quit
            }
            MigrateError::Aborted(_) => {
                self.progress.set_status(Status::Cancelled);
                SendOutcome::Failed(e)
            }
            e => {
                self.progress.set_status(Status::Failed);
                SendOutcome::Failed(e)
            }
        }
    }

    /// Ends every channel: data sockets at once (that also unblocks senders stuck on a
    /// stalled peer), the main channel after what was written has been delivered.
    fn close(&mut self) {
        for s in &self.sockets {
            s.shutdown();
        }
        if let Some(mut u) = self.urgent_server.take() {
            u.stop();
        }
        worker::stop(&mut self.workers);
        if let Some(r) = self.reader.take() {
            r.stop();
        }
        if let Some(main) = self.main.take() {
            close_gracefully(main, LINGER);
        }
        if let Some(t) = self.tracker.take() {
            let _ = t.stop();
        }
        self.vm.set_throttle(0);
    }
}

/// Writes the digest of every guest page to `path` (see [`crate::digest`]).
pub(crate) fn write_digests(ram: &GuestRam, path: &std::path::Path) -> Result<(), MigrateError> {
    crate::digest::write(ram, path).map_err(MigrateError::Digest)
}
