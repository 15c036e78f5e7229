//! The sender's phases. Each holds its own data and turns one event into the next phase:
//!
//! ```text
//! connecting -> handshake -> setup -> precopy -> switchover -> awaiting-running -> (completed)
//!     |             |          |         |          |               |
//!     +-------------+----------+---------+----------+--> abort       +--> unconfirmed
//!                    (guest resumed here, destination told)             (guest paused here)
//! ```
//!
//! `switchover` pauses the guest and ends with `Go`; from `awaiting-running` on the source
//! never resumes the guest on its own, except when the destination says it will not run it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_memory::dirty::{DirtySnapshot, DirtyTracker};
use ferry_memory::ram::PAGE_SIZE;
use ferry_proto::{caps, ChannelRole, Hello, Message, Setup, VERSION};
use ferry_transport::{connect, Stream, TlsConfig, Uri};

use super::devices::{self, DeviceEvent, DeviceSenders, Route};
use super::postcopy::{PostcopyActive, PostcopyPaused, PostcopySwitch};
use super::worker::{self, PassTotals, WorkerEvent};
use super::PostcopyMode;
use super::{ms, write_digests, Connection, Event, SendOutcome, Source};
use crate::channel::Wire;
use crate::control::{self, Command, Request};
use crate::error::{AbortCause, Channel, MigrateError, Waited};
use crate::policy::{Convergence, Decision, Limits, PassSample};
use crate::progress::Status;
use crate::wire::{send_by, spawn_reader, ReaderGuard};

/// How long a converged precopy waits between passes for a destination still preparing.
const WAIT_FOR_DESTINATION: Duration = Duration::from_millis(20);

/// What a phase returns: the next phase, or the end of the migration.
pub(super) enum Step {
    Next(Phase),
    End(Box<SendOutcome>),
}

/// Where the sender is.
pub(super) enum Phase {
    Connecting(Connecting),
    Handshake(Handshake),
    Setup(SetupWait),
    Adopting(Adopting),
    Precopy(Box<Precopy>),
    Switchover(Box<Switchover>),
    AwaitRunning(Box<AwaitRunning>),
    Unconfirmed(Box<Unconfirmed>),
    PostcopySwitch(Box<PostcopySwitch>),
    Postcopy(Box<PostcopyActive>),
    PostcopyPaused(Box<PostcopyPaused>),
}

impl Phase {
    /// Starts connecting on a helper thread, so the loop stays responsive meanwhile.
    pub(super) fn connect(src: &mut Source, uri: &Uri) -> Phase {
        src.uri = Some(uri.clone());
        src.session = session_id();
        let deadline = Instant::now() + src.params.handshake_timeout;
        src.open_channels(deadline, false);
        Phase::Connecting(Connecting { deadline })
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Connecting(_) => "connecting",
            Phase::Handshake(_) => "handshake",
            Phase::Setup(_) => "setup",
            Phase::Adopting(_) => "adopting",
            Phase::Precopy(_) => "precopy",
            Phase::Switchover(_) => "switchover",
            Phase::AwaitRunning(_) => "awaiting-running",
            Phase::Unconfirmed(_) => "unconfirmed",
            Phase::PostcopySwitch(_) => "postcopy-switch",
            Phase::Postcopy(_) => "postcopy",
            Phase::PostcopyPaused(_) => "postcopy-paused",
        }
    }

    /// When the phase next needs the clock.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Connecting(p) => Some(p.deadline),
            Phase::Handshake(p) => Some(p.deadline),
            Phase::Setup(p) => Some(p.deadline),
            Phase::Adopting(p) => (!p.adopted).then_some(p.deadline),
            Phase::Precopy(p) => p.next_pass_at.or(p.discard_deadline),
            Phase::Switchover(p) => Some(p.deadline),
            Phase::AwaitRunning(p) => Some(p.deadline),
            Phase::Unconfirmed(_) => None,
            Phase::PostcopySwitch(p) => Some(p.deadline()),
            Phase::Postcopy(p) => p.deadline(),
            Phase::PostcopyPaused(p) => p.deadline(),
        }
    }

    /// Hands `ev` to the phase. Only phases before the commit can fail; later ones turn
    /// every failure into `unconfirmed`.
    pub(super) fn on(self, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match self {
            Phase::Connecting(p) => p.on(ev, src),
            Phase::Handshake(p) => p.on(ev, src),
            Phase::Setup(p) => p.on(ev, src),
            Phase::Adopting(p) => p.on(ev, src),
            Phase::Precopy(p) => p.on(ev, src),
            Phase::Switchover(p) => p.on(ev, src),
            Phase::AwaitRunning(p) => Ok(p.on(ev, src)),
            Phase::Unconfirmed(p) => Ok(p.on(ev, src)),
            Phase::PostcopySwitch(p) => p.on(ev, src),
            Phase::Postcopy(p) => Ok(p.on(ev, src)),
            Phase::PostcopyPaused(p) => Ok(p.on(ev, src)),
        }
    }
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

impl Source {
    /// Opens every channel on a helper thread, which reports with `Event::Connected`;
    /// `resume` reconnects a broken postcopy (same session).
    pub(super) fn open_channels(&mut self, deadline: Instant, resume: bool) {
        let tx = self.events_tx.clone();
        let local = self.params.local;
        // A local hand-over copies no page: no data channel.
        let n = if local { 0 } else { self.params.channels };
        let Some(uri) = self.uri.clone() else {
            return;
        };
        let tls = self.params.tls.clone();
        // TLS's AEAD already authenticates every byte: no checksums on top. A local
        // hand-over sends no page, and its first frames go before the answer that would
        // agree on checksums.
        let sums = self.params.checksums && tls.is_none() && !local;
        let how = How {
            n,
            session: self.session,
            deadline,
            local,
            wire: Wire::offer(sums, self.params.compression),
            tls,
            postcopy: self.params.postcopy != super::PostcopyMode::Off,
            resume,
        };
        let spawned = crate::latency::spawn("mig-connect".into(), move || {
            let conn = connect_all(&uri, &how);
            let _ = tx.send(Event::Connected(conn));
        });
        if let Err(e) = spawned {
            let err = MigrateError::Io {
                what: "starting the connecting thread".into(),
                source: e,
            };
            let _ = self.events_tx.send(Event::Connected(Err(err)));
        }
    }
}

/// How to open the channels.
struct How {
    n: u16,
    session: u64,
    deadline: Instant,
    local: bool,
    /// Capability bits for checksums and compression.
    wire: u64,
    tls: Option<TlsConfig>,
    /// Offer postcopy and open its urgent channel.
    postcopy: bool,
    /// Reconnect a broken postcopy.
    resume: bool,
}

/// Connects one channel, in TLS if configured.
fn open(uri: &Uri, how: &How, channel: Channel) -> Result<Stream, MigrateError> {
    let sock = connect(uri, how.deadline)?;
    match &how.tls {
        None => Ok(sock),
        Some(cfg) => ferry_transport::tls::connect(sock, cfg, uri, how.deadline)
            .map_err(|source| MigrateError::Tls { channel, source }),
    }
}

/// Sends a channel's Hello. A TLS 1.3 client learns that the destination refused its
/// certificate only after its handshake: a failed write then reports the alert instead.
fn send_hello(s: &mut Stream, hello: &Message, deadline: Instant) -> std::io::Result<u64> {
    send_by(s, hello, false, deadline)
        .map_err(|e| s.tls_refusal(Duration::from_millis(500)).unwrap_or(e))
}

/// Opens the main channel and every data channel and sends each its Hello.
fn connect_all(uri: &Uri, how: &How) -> Result<Connection, MigrateError> {
    let (n, session, deadline) = (how.n, how.session, how.deadline);
    let base = caps::ZERO_RUNS | caps::SWITCHOVER_ACK;
    let capabilities = base
        | how.wire
        | if how.local { caps::LOCAL } else { 0 }
        | if how.postcopy { caps::POSTCOPY } else { 0 }
        | if how.resume { caps::RESUME } else { 0 };
    let hello = |role| {
        Message::Hello(Hello {
            version: VERSION,
            capabilities,
            session,
            role,
            data_channels: n,
        })
    };
    let send_err = |channel| {
        move |source| MigrateError::Send {
            channel,
            phase: "connecting",
            source,
        }
    };
    let mut main = open(uri, how, Channel::Main)?;
    let _ = main.set_nodelay();
    send_hello(&mut main, &hello(ChannelRole::Main), deadline).map_err(send_err(Channel::Main))?;
    let mut data = Vec::with_capacity(usize::from(n));
    for index in 0..n {
        let mut s = open(uri, how, Channel::Data(index))?;
        send_hello(&mut s, &hello(ChannelRole::Data { index }), deadline)
            .map_err(send_err(Channel::Data(index)))?;
        // The senders write blocking; a stalled peer is the event loop's to judge.
        s.set_write_timeout(None)
            .map_err(send_err(Channel::Data(index)))?;
        data.push(s);
    }
    let urgent = if how.postcopy {
        let mut s = open(uri, how, Channel::Urgent)?;
        // Requests and answers are small and latency-bound.
        let _ = s.set_nodelay();
        send_hello(&mut s, &hello(ChannelRole::Urgent), deadline)
            .map_err(send_err(Channel::Urgent))?;
        s.set_write_timeout(None)
            .map_err(send_err(Channel::Urgent))?;
        Some(s)
    } else {
        None
    };
    Ok(Connection { main, data, urgent })
}

/// Commands before the commit: cancel and quit abort (the guest stays here); the rest is
/// refused, since the migration decides when the guest runs.
fn precommit_command(req: Request, phase: &'static str) -> Result<(), MigrateError> {
    match req.command {
        Command::Cancel => {
            req.answer(Ok(
                "migration cancelled; the guest keeps running here".into()
            ));
            Err(MigrateError::Aborted(AbortCause::Cancel))
        }
        Command::Quit { .. } => {
            req.answer(Ok(
                "migration aborted (the guest stays here); the VM quits".into()
            ));
            Err(MigrateError::Aborted(AbortCause::Quit))
        }
        Command::Resume { .. } | Command::Pause | Command::Snapshot => {
            req.refuse(
                phase,
                "a migration is running and decides when the guest runs; cancel it first \
                 with migrate-cancel",
            );
            Ok(())
        }
        Command::StartPostcopy => {
            req.refuse(
                phase,
                "postcopy can start only while precopy passes run (and with postcopy enabled \
                 when the migration started)",
            );
            Ok(())
        }
        Command::Reconnect { .. } => {
            req.refuse(phase, NO_BROKEN_POSTCOPY);
            Ok(())
        }
        Command::Recover { .. } => {
            req.refuse(phase, DESTINATION_ONLY);
            Ok(())
        }
    }
}

/// Why `migrate --resume` is refused where postcopy has not begun.
pub(super) const NO_BROKEN_POSTCOPY: &str =
    "there is no postcopy to resume: 'migrate URI --resume' points a postcopy that broke off \
     at the destination's new address";

/// Why a source refuses the destination's commands.
pub(super) const DESTINATION_ONLY: &str =
    "that is the destination's command ('migrate-recover URI' runs there)";

/// Events every phase before the commit treats alike.
pub(super) fn early_event(
    ev: Event,
    src: &mut Source,
    phase: &'static str,
) -> Result<(), MigrateError> {
    match ev {
        Event::Peer(Ok(Message::DevicesReady)) => {
            tracing::info!("the destination loaded every device's initial bytes");
            src.devices_ready = true;
            Ok(())
        }
        Event::Peer(Ok(m)) => Err(src.unexpected(m, phase)),
        Event::Device(ev) => src.on_device(ev, phase).map(|_| ()),
        Event::Peer(Err(e)) => Err(src.read_error(e, phase)),
        Event::Command(req) => precommit_command(req, phase),
        Event::Connected(Ok(c)) => {
            // Only one connecting thread runs; a second result cannot happen.
            drop(c);
            Ok(())
        }
        Event::Connected(Err(e)) => Err(e),
        Event::Worker(WorkerEvent::Failed(e)) => Err(e),
        Event::Worker(WorkerEvent::Done { .. }) | Event::Tick => Ok(()),
    }
}

pub(super) struct Connecting {
    deadline: Instant,
}

impl Connecting {
    fn on(self, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Connected(Ok(conn)) => {
                src.attach(conn)?;
                if src.params.local {
                    // On one host nothing needs negotiating first: the VM and its memory
                    // go out behind the Hello, and the answers come back in order.
                    src.send_setup(self.deadline, "connecting")?;
                    src.send_local_memory()?;
                }
                Ok(Step::Next(Phase::Handshake(Handshake {
                    deadline: self.deadline,
                })))
            }
            Event::Tick if Instant::now() >= self.deadline => Err(MigrateError::Timeout {
                what: Waited::Connect,
                after: src.params.handshake_timeout,
            }),
            ev => {
                early_event(ev, src, "connecting")?;
                Ok(Step::Next(Phase::Connecting(self)))
            }
        }
    }
}

impl Source {
    /// Takes over the connected channels and starts reading the main one.
    pub(super) fn attach(&mut self, conn: Connection) -> Result<(), MigrateError> {
        let clone = |s: &ferry_transport::Stream| {
            s.try_clone()
                .map_err(MigrateError::io("cloning a migration socket"))
        };
        for d in conn.data.iter().chain(&conn.urgent) {
            self.sockets.push(clone(d)?);
        }
        let reader = clone(&conn.main)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let join = spawn_reader(
            reader,
            "mig-return",
            stop.clone(),
            self.peer_sums.clone(),
            self.events_tx.clone(),
            Event::Peer,
        )?;
        self.reader = Some(ReaderGuard {
            stop,
            join: Some(join),
        });
        self.main = Some(conn.main);
        self.data = conn.data;
        self.urgent = conn.urgent;
        Ok(())
    }
}

pub(super) struct Handshake {
    deadline: Instant,
}

impl Handshake {
    fn on(self, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Peer(Ok(Message::Welcome {
                version,
                capabilities,
            })) => {
                if version != VERSION {
                    return Err(MigrateError::Version {
                        peer: version,
                        ours: VERSION,
                    });
                }
                if src.params.local && capabilities & caps::LOCAL == 0 {
                    return Err(MigrateError::LocalRefused);
                }
                if src.urgent.is_some() {
                    if capabilities & caps::POSTCOPY == 0 {
                        return Err(MigrateError::PostcopyRefused);
                    }
                    src.postcopy_ok = true;
                }
                src.wire = Wire::agreed(capabilities, src.params.compression)?;
                // From here on every frame both ways carries its checksum, if agreed.
                src.peer_sums
                    .store(src.wire.sums, std::sync::atomic::Ordering::Relaxed);
                src.need_prepared = capabilities & caps::SWITCHOVER_ACK != 0;
                let sent_at = Instant::now();
                if !src.params.local {
                    src.send_setup(self.deadline, "handshake")?;
                }
                Ok(Step::Next(Phase::Setup(SetupWait {
                    deadline: self.deadline,
                    sent_at,
                })))
            }
            Event::Tick if Instant::now() >= self.deadline => Err(MigrateError::Timeout {
                what: Waited::Welcome,
                after: src.params.handshake_timeout,
            }),
            ev => {
                early_event(ev, src, "handshake")?;
                Ok(Step::Next(Phase::Handshake(self)))
            }
        }
    }
}

pub(super) struct SetupWait {
    deadline: Instant,
    sent_at: Instant,
}

impl SetupWait {
    fn on(self, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Peer(Ok(Message::SetupAccepted)) => {
                src.rtt = self.sent_at.elapsed();
                if src.params.local {
                    return Ok(Step::Next(Phase::Adopting(Adopting::start(src)?)));
                }
                Ok(Step::Next(Phase::Precopy(Box::new(Precopy::start(src)?))))
            }
            Event::Tick if Instant::now() >= self.deadline => Err(MigrateError::Timeout {
                what: Waited::SetupAccepted,
                after: src.params.handshake_timeout,
            }),
            ev => {
                early_event(ev, src, "setup")?;
                Ok(Step::Next(Phase::Setup(self)))
            }
        }
    }
}

/// Local hand-over: the memory file is passed; waiting for the destination to map it while
/// the guest runs on here.
pub(super) struct Adopting {
    deadline: Instant,
    sent_at: Instant,
    /// `MemoryAdopted` came.
    adopted: bool,
}

impl Source {
    fn send_setup(&mut self, deadline: Instant, phase: &'static str) -> Result<(), MigrateError> {
        let setup = Message::Setup(Setup {
            vm: self.vm.description(),
            timeouts: self.params.timeouts(),
            devices: devices::describe(&self.device_list),
            parallel_devices: self.params.parallel_devices,
        });
        self.send(&setup, phase, deadline)
    }

    /// Sends the guest memory file (a local hand-over).
    fn send_local_memory(&mut self) -> Result<(), MigrateError> {
        let (file, offsets) = self
            .ram
            .file()
            .ok_or(MigrateError::LocalNeedsSharedMemory {
                backend: self.ram.config().backend.name(),
            })?;
        let msg = Message::LocalMemory {
            locked: ferry_sys::mm::locked_bytes().is_some_and(|b| b >= self.ram.size()),
            offsets,
        };
        self.send_with_file(&msg, &file, "connecting")
    }
}

impl Source {
    /// Moves every device to PRE_COPY and starts streaming them on `routes`.
    fn start_devices(&mut self, routes: &[Route]) -> Result<(), MigrateError> {
        let tx = self.events_tx.clone();
        let list = self.device_list.clone();
        self.initial_pending = list.len();
        if list.is_empty() {
            self.initial_sent_at = Some(Instant::now());
        }
        self.stats.devices = u32::try_from(list.len()).unwrap_or(u32::MAX);
        self.stats.parallel_devices = self.params.parallel_devices;
        let senders = DeviceSenders::start(list, routes, self.params.parallel_devices, move |e| {
            tx.send(Event::Device(e)).is_ok()
        })?;
        self.devices = Some(senders);
        Ok(())
    }

    /// A device thread's report: a chunk for the main channel goes out on it, a failure
    /// fails the migration. Returns, when a device's stop-copy stream ended, its save time.
    pub(super) fn on_device(
        &mut self,
        ev: DeviceEvent,
        phase: &'static str,
    ) -> Result<Option<std::time::Duration>, MigrateError> {
        match ev {
            DeviceEvent::Chunk(c) => {
                let n = c.data.len();
                let msg = Message::DeviceData {
                    device: c.device,
                    seq: c.seq,
                    flags: c.flags,
                    data: c.data,
                };
                let deadline = Instant::now() + self.params.switchover_timeout;
                let sent = self.send(&msg, phase, deadline);
                if let Some(d) = &self.devices {
                    d.window.give(n);
                }
                self.progress
                    .device_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                sent.map(|()| None)
            }
            DeviceEvent::InitialSent => {
                self.initial_pending = self.initial_pending.saturating_sub(1);
                if self.initial_pending == 0 {
                    self.initial_sent_at = Some(Instant::now());
                }
                Ok(None)
            }
            DeviceEvent::Ended { device, save } => {
                tracing::debug!(device, ms = ms(save), "a device's stop-copy stream is out");
                Ok(Some(save))
            }
            DeviceEvent::Failed(e) => Err(e),
        }
    }

    /// Device bytes a switchover now would send, and what loading them costs.
    fn device_estimate(&self) -> (u64, Duration) {
        self.devices
            .as_ref()
            .map(|d| (d.pending_bytes(), d.load_cost()))
            .unwrap_or_default()
    }
}

impl Adopting {
    /// The Setup was accepted; the memory file went out behind it.
    fn start(src: &mut Source) -> Result<Adopting, MigrateError> {
        src.stats.setup_ms = ms(src.started.elapsed());
        src.stats.ram_bytes = src.ram.size();
        src.stats.downtime_limit_ms = ms(src.params.downtime_limit);
        src.stats.local = true;
        src.progress.set_status(Status::Active);
        // No data channel: the device streams go on the main channel.
        src.start_devices(&[Route::Main])?;
        let sent_at = Instant::now();
        Ok(Adopting {
            deadline: sent_at + src.params.progress_timeout,
            sent_at,
            adopted: false,
        })
    }

    fn on(mut self, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Peer(Ok(Message::MemoryAdopted { adopt_us })) if !self.adopted => {
                src.stats.adopt_ms = adopt_us as f64 / 1e3;
                tracing::info!(
                    adopt_ms = src.stats.adopt_ms,
                    waited_ms = ms(self.sent_at.elapsed()),
                    "the destination mapped the guest memory"
                );
                self.adopted = true;
            }
            // Its memory preparation was stopped for the hand-over.
            Event::Peer(Ok(Message::Prepared { .. } | Message::Ack { .. })) => {}
            Event::Tick if !self.adopted && Instant::now() >= self.deadline => {
                return Err(MigrateError::Timeout {
                    what: Waited::Adopted,
                    after: src.params.progress_timeout,
                })
            }
            ev => early_event(ev, src, "adopting")?,
        }
        if let Some(e) = src.devices_ready_overdue() {
            return Err(e);
        }
        // The memory is mapped there and every device's initial bytes loaded: switch.
        if self.adopted && src.devices_ready {
            let sw = Switchover::begin_local(src)?;
            return Ok(Step::Next(Phase::Switchover(Box::new(sw))));
        }
        Ok(Step::Next(Phase::Adopting(self)))
    }
}

/// Copy passes while the guest runs.
pub(super) struct Precopy {
    pub(super) pass: u32,
    started: Instant,
    /// Pages dirty at the last sync, not sent since.
    pub(super) snap: Arc<DirtySnapshot>,
    /// Whether any pass was sent (none, in a postcopy without precopy).
    pub(super) sent_any: bool,
    /// A postcopy without precopy: waiting for the destination to discard its memory.
    discard_deadline: Option<Instant>,
    /// `migrate-start-postcopy` arrived: switch at the end of the pass in flight.
    postcopy_asked: bool,
    /// A postcopy without precopy: the destination has discarded its memory.
    discarded: bool,
    outstanding: usize,
    totals: PassTotals,
    conv: Convergence,
    limits: Limits,
    /// Converged but waiting for the destination: when to send the next pass.
    next_pass_at: Option<Instant>,
    converged_at: Option<Instant>,
    /// Last time the destination acknowledged something new, and what.
    last_progress: Instant,
    acked: (u32, u64),
    /// The longest pass after pass 0: the steadiest measure of the guest's dirty rate.
    rate_window: Duration,
    /// Round-trip samples (the most recent few) and the ping in flight.
    rtt: RoundTrips,
}

/// The round trip the downtime estimate counts: the smallest of the last few samples, so
/// one exchange delayed by a busy destination does not stall convergence, while a lasting
/// change shows within a few passes.
struct RoundTrips {
    samples: std::collections::VecDeque<Duration>,
    in_flight: Option<(u64, Instant)>,
    next_nonce: u64,
}

impl RoundTrips {
    const KEEP: usize = 4;

    fn new(first: Duration) -> Self {
        RoundTrips {
            samples: std::iter::once(first).collect(),
            in_flight: None,
            next_nonce: 1,
        }
    }

    fn current(&self) -> Duration {
        self.samples.iter().copied().min().unwrap_or_default()
    }

    /// Sends a Ping unless one is in flight.
    fn ping(&mut self, src: &mut Source) -> Result<(), MigrateError> {
        if self.in_flight.is_some() {
            return Ok(());
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let deadline = Instant::now() + src.params.progress_timeout;
        src.send(&Message::Ping { nonce }, "precopy", deadline)?;
        self.in_flight = Some((nonce, Instant::now()));
        Ok(())
    }

    /// Takes a Pong into account; returns the new estimate.
    fn pong(&mut self, nonce: u64) -> Duration {
        if let Some((n, sent)) = self.in_flight {
            if n == nonce {
                self.in_flight = None;
                if self.samples.len() == Self::KEEP {
                    self.samples.pop_front();
                }
                self.samples.push_back(sent.elapsed());
            }
        }
        self.current()
    }
}

impl Precopy {
    fn start(src: &mut Source) -> Result<Precopy, MigrateError> {
        let tracker = Arc::new(DirtyTracker::new(src.vm.dirty_log(), src.ram.clone()));
        tracker.start()?;
        src.tracker = Some(tracker.clone());
        let data = std::mem::take(&mut src.data);
        let how = worker::Sending {
            wire: src.wire,
            max_bandwidth: src.params.max_bandwidth,
            hint: src.fault_hint.clone(),
        };
        src.workers = worker::spawn(
            data,
            how,
            &src.ram,
            &tracker,
            &src.progress,
            &src.events_tx,
            Event::Worker,
        )?;
        let routes = src.workers.device_routes();
        src.start_devices(&routes)?;
        src.stats.setup_ms = ms(src.started.elapsed());
        src.stats.channels = src.params.channels;
        src.stats.tls = src.params.tls.is_some();
        src.stats.checksums = src.wire.sums;
        src.stats.compression = src.params.compression.to_string();
        src.stats.ram_bytes = src.ram.size();
        src.stats.downtime_limit_ms = ms(src.params.downtime_limit);
        src.progress.set_status(Status::Active);
        let (state_bytes, device_load) = src.device_estimate();
        let limits = Limits {
            downtime: src.params.downtime_limit,
            auto_converge: src.params.auto_converge,
            state_bytes,
            rtt: src.rtt,
            device_load,
        };
        let mut p = Precopy {
            pass: 0,
            started: Instant::now(),
            snap: Arc::new(tracker.sync(true)?),
            outstanding: 0,
            totals: PassTotals::default(),
            conv: Convergence::new(),
            limits,
            next_pass_at: None,
            converged_at: None,
            last_progress: Instant::now(),
            acked: (0, 0),
            rate_window: Duration::ZERO,
            rtt: RoundTrips::new(src.rtt),
            sent_any: false,
            discard_deadline: None,
            postcopy_asked: false,
            discarded: false,
        };
        p.rtt.ping(src)?;
        if src.params.postcopy == PostcopyMode::Now {
            p.discard_all(src)?;
        } else {
            p.send_pass(src, 0);
        }
        Ok(p)
    }

    /// A postcopy without precopy: the destination makes all its memory missing while the
    /// guest still runs here, so the pause does not include it.
    fn discard_all(&mut self, src: &mut Source) -> Result<(), MigrateError> {
        let deadline = Instant::now() + src.params.progress_timeout;
        let mut runs = Vec::new();
        for r in src.ram.regions() {
            let mut gpa = r.gpa;
            while gpa < r.end() {
                let pages = ((r.end() - gpa) / PAGE_SIZE).min(u64::from(u32::MAX));
                runs.push(ferry_proto::PageRun {
                    gpa,
                    pages: pages as u32,
                });
                gpa += pages * PAGE_SIZE;
            }
        }
        src.send_discards(&runs, true, "precopy", deadline)?;
        self.discard_deadline = Some(deadline);
        Ok(())
    }

    /// Switches to postcopy, if the destination is ready for it (its memory preparation
    /// must be over before it discards pages).
    fn switch_to_postcopy(
        self: Box<Self>,
        src: &mut Source,
        trigger: &'static str,
    ) -> Result<Step, MigrateError> {
        let s = PostcopySwitch::begin(src, *self, trigger)?;
        Ok(Step::Next(Phase::PostcopySwitch(Box::new(s))))
    }

    /// `migrate-start-postcopy`.
    fn start_postcopy(
        mut self: Box<Self>,
        req: Request,
        src: &mut Source,
    ) -> Result<Step, MigrateError> {
        if !src.postcopy_ok {
            req.refuse(
                "precopy",
                &MigrateError::PostcopyNotEnabled
                    .to_string()
                    .replace("postcopy", "postcopy (start it with --postcopy-on-request)"),
            );
            return Ok(Step::Next(Phase::Precopy(self)));
        }
        self.postcopy_asked = true;
        req.answer(Ok(
            "switching to postcopy at the end of the pass in flight".into()
        ));
        if self.outstanding == 0 && self.discard_deadline.is_none() && src.destination_ready() {
            return self.switch_to_postcopy(src, "requested");
        }
        Ok(Step::Next(Phase::Precopy(self)))
    }

    /// Hands the current snapshot's dirty pages to the senders as pass `pass`.
    fn send_pass(&mut self, src: &Source, pass: u32) {
        self.sent_any = true;
        self.pass = pass;
        self.started = Instant::now();
        self.outstanding = src.workers.len();
        self.totals = PassTotals::default();
        self.next_pass_at = None;
        src.progress.pass.store(u64::from(pass), Ordering::Relaxed);
        worker::dispatch(&src.workers, &src.ram, pass, "precopy", &self.snap);
    }

    fn on(mut self: Box<Self>, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Worker(WorkerEvent::Done { pass, totals }) => {
                if pass != self.pass {
                    return Err(MigrateError::WorkerOutOfStep {
                        expected: self.pass,
                        got: pass,
                    });
                }
                self.totals.add(&totals);
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.outstanding == 0 {
                    return self.pass_done(src);
                }
            }
            Event::Worker(WorkerEvent::Failed(e)) => return Err(src.prefer_peer_reason(e)),
            Event::Peer(Ok(Message::Ack { passes, bytes })) => {
                if (passes, bytes) > self.acked {
                    self.acked = (passes, bytes);
                    self.last_progress = Instant::now();
                }
            }
            Event::Peer(Ok(Message::Prepared {
                prepare_us,
                threads,
            })) if src.prepared.is_none() => {
                tracing::info!(prepare_us, threads, "destination memory prepared");
                src.prepared = Some((prepare_us, threads, Instant::now()));
                self.last_progress = Instant::now();
                if self.next_pass_at.is_some() {
                    self.send_pass(src, self.pass + 1);
                }
            }
            Event::Peer(Ok(Message::Pong { nonce })) => {
                self.limits.rtt = self.rtt.pong(nonce);
            }
            Event::Peer(Ok(Message::Discarded { discard_us }))
                if self.discard_deadline.is_some() && !self.discarded =>
            {
                tracing::info!(discard_us, "destination memory discarded for postcopy");
                self.discarded = true;
                // From here on only the devices may be waited for (their own deadline).
                self.discard_deadline = None;
            }
            Event::Command(req) if req.command == Command::StartPostcopy => {
                return self.start_postcopy(req, src);
            }
            Event::Tick if self.discard_deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(MigrateError::Timeout {
                    what: Waited::Discarded,
                    after: src.params.progress_timeout,
                });
            }
            Event::Tick => {
                if self.last_progress.elapsed() >= src.params.progress_timeout {
                    return Err(MigrateError::Timeout {
                        what: Waited::Progress,
                        after: src.params.progress_timeout,
                    });
                }
                if self.next_pass_at.is_some_and(|t| Instant::now() >= t) {
                    if self.postcopy_asked && src.destination_ready() {
                        return self.switch_to_postcopy(src, "requested");
                    }
                    self.send_pass(src, self.pass + 1);
                }
            }
            ev => early_event(ev, src, "precopy")?,
        }
        // A postcopy without precopy switches once the memory is discarded there and every
        // device's initial bytes are loaded (switchover-ack).
        if self.discarded && src.devices_ready {
            return self.switch_to_postcopy(src, "now");
        }
        if let Some(e) = src.devices_ready_overdue() {
            return Err(e);
        }
        Ok(Step::Next(Phase::Precopy(self)))
    }

    /// Every channel finished the pass: sync the dirty log and ask the policy.
    fn pass_done(mut self: Box<Self>, src: &mut Source) -> Result<Step, MigrateError> {
        let dur = self.started.elapsed().max(Duration::from_micros(1));
        if self.pass == 0 {
            src.stats.first_pass_throughput = (self.totals.bytes as f64 / dur.as_secs_f64()) as u64;
        }
        let tracker = src.tracker.clone().ok_or(MigrateError::NotTracking)?;
        let t_sync = Instant::now();
        self.snap = Arc::new(tracker.sync(false)?);
        (self.limits.state_bytes, self.limits.device_load) = src.device_estimate();
        let sample = PassSample {
            sent: self.totals.bytes,
            duration: dur,
            dirty: self.snap.dirty_pages() * PAGE_SIZE,
            sync_time: t_sync.elapsed(),
            destination_ready: src.destination_ready(),
        };
        self.rtt.ping(src)?;
        let decision = self.conv.after_pass(&self.limits, &sample);
        let estimate = self
            .conv
            .estimate(&self.limits, sample.dirty, sample.sync_time);
        self.record(src, &sample, estimate);
        if let Some(trigger) = self.postcopy_trigger(src, &decision) {
            if src.destination_ready() {
                return self.switch_to_postcopy(src, trigger);
            }
            // Its preparation must end before it may discard pages: wait for it.
            self.next_pass_at = Some(Instant::now() + WAIT_FOR_DESTINATION);
            return Ok(Step::Next(Phase::Precopy(self)));
        }
        match decision {
            Decision::NextPass => self.send_pass(src, self.pass + 1),
            Decision::Throttle(percent) => {
                src.vm.set_throttle(percent);
                src.progress
                    .throttle
                    .store(u64::from(percent), Ordering::Relaxed);
                src.stats.max_throttle_percent = percent;
                tracing::info!(percent, "auto-converge: throttling vCPUs");
                self.send_pass(src, self.pass + 1);
            }
            Decision::WaitForDestination => {
                self.converged_at.get_or_insert_with(Instant::now);
                self.next_pass_at = Some(Instant::now() + WAIT_FOR_DESTINATION);
            }
            Decision::Switchover { converged } => {
                if !converged {
                    tracing::warn!(
                        "cannot meet the {} ms downtime limit even at full throttle (estimate \
                         {:.1} ms); switching over",
                        ms(src.params.downtime_limit),
                        ms(estimate)
                    );
                }
                src.stats.converged = converged;
                src.stats.expected_downtime_ms = ms(estimate);
                let s = Switchover::begin(src, *self)?;
                return Ok(Step::Next(Phase::Switchover(Box::new(s))));
            }
        }
        Ok(Step::Next(Phase::Precopy(self)))
    }

    /// Whether this pass ends precopy with a switch to postcopy, and why: asked for, or
    /// precopy does not converge without throttling and postcopy after precopy is on.
    fn postcopy_trigger(&self, src: &Source, decision: &Decision) -> Option<&'static str> {
        if self.postcopy_asked {
            return Some("requested");
        }
        let stuck = matches!(
            decision,
            Decision::Throttle(_) | Decision::Switchover { converged: false }
        );
        (stuck && src.params.postcopy == PostcopyMode::AfterPrecopy).then_some("after-precopy")
    }

    /// Publishes what the pass measured.
    fn record(&mut self, src: &mut Source, s: &PassSample, estimate: Duration) {
        let dirty_rate = (s.dirty as f64 / s.duration.as_secs_f64()) as u64;
        let p = &src.progress;
        p.dirty_pages
            .store(self.snap.dirty_pages(), Ordering::Relaxed);
        p.dirty_rate.store(dirty_rate, Ordering::Relaxed);
        p.bandwidth
            .store(self.conv.bandwidth() as u64, Ordering::Relaxed);
        p.expected_downtime_us
            .store(estimate.as_micros() as u64, Ordering::Relaxed);
        if self.pass > 0 && s.duration > self.rate_window {
            self.rate_window = s.duration;
            src.stats.dirty_rate = dirty_rate;
        }
        tracing::info!(
            pass = self.pass,
            sent = s.sent,
            ms = ms(s.duration),
            dirty = s.dirty,
            estimate_ms = ms(estimate),
            throttle = self.conv.throttle(),
            "precopy pass done"
        );
    }
}

/// When each part of the switchover happened.
#[derive(Debug, Clone, Copy)]
struct Timings {
    paused: Instant,
    synced: Instant,
    /// When the last device's stop-copy stream was handed to its channel.
    state_sent: Option<Instant>,
    pages_sent: Option<Instant>,
    complete_sent: Option<Instant>,
    loaded: Option<Instant>,
    load_us: u64,
    converged_at: Option<Instant>,
}

/// The guest is paused; the last pages and the state go out; waiting for `Loaded`.
pub(super) struct Switchover {
    deadline: Instant,
    final_pass: u32,
    /// Channels still sending the final pass.
    outstanding: usize,
    /// Devices still streaming their stop-copy state.
    devices_left: usize,
    t: Timings,
}

impl Switchover {
    fn begin(src: &mut Source, pre: Precopy) -> Result<Switchover, MigrateError> {
        src.progress.set_status(Status::Switchover);
        let paused = Instant::now();
        let deadline = paused + src.params.switchover_timeout;
        src.pause_guest()?;
        let tracker = src.tracker.clone().ok_or(MigrateError::NotTracking)?;
        // The last precopy sync's snapshot was never sent: the pages the VMM wrote are in it
        // and nowhere else (KVM's bits would still be in the log, the VMM's were taken).
        let mut last = tracker.sync(false)?;
        last.merge(&pre.snap)?;
        let last = Arc::new(last);
        let synced = Instant::now();
        let final_pass = pre.pass + 1;
        src.progress
            .pass
            .store(u64::from(final_pass), Ordering::Relaxed);
        worker::dispatch(&src.workers, &src.ram, final_pass, "switchover", &last);
        let devices_left = src.stop_copy_devices();
        Ok(Switchover {
            deadline,
            final_pass,
            outstanding: src.workers.len(),
            devices_left,
            t: Timings {
                paused,
                synced,
                state_sent: None,
                pages_sent: None,
                complete_sent: None,
                loaded: None,
                load_us: 0,
                converged_at: pre.converged_at,
            },
        })
    }

    /// A local hand-over's switchover: no page to send, only the state.
    fn begin_local(src: &mut Source) -> Result<Switchover, MigrateError> {
        src.progress.set_status(Status::Switchover);
        let paused = Instant::now();
        let deadline = paused + src.params.switchover_timeout;
        src.pause_guest()?;
        let devices_left = src.stop_copy_devices();
        let mut sw = Switchover {
            deadline,
            final_pass: 0,
            outstanding: 0,
            devices_left,
            t: Timings {
                paused,
                synced: paused,
                state_sent: None,
                pages_sent: Some(paused),
                complete_sent: None,
                loaded: None,
                load_us: 0,
                converged_at: None,
            },
        };
        sw.complete_when_sent(src)?;
        Ok(sw)
    }

    /// Sends `Complete` once every channel has sent the final pass and every device its
    /// stop-copy stream.
    fn complete_when_sent(&mut self, src: &mut Source) -> Result<(), MigrateError> {
        if self.outstanding > 0 || self.devices_left > 0 || self.t.complete_sent.is_some() {
            return Ok(());
        }
        let done = Message::Complete {
            final_pass: self.final_pass,
        };
        src.send(&done, "switchover", self.deadline)
            .map_err(|e| switchover_send_error(e, src))?;
        self.t.complete_sent = Some(Instant::now());
        Ok(())
    }

    fn on(mut self: Box<Self>, ev: Event, src: &mut Source) -> Result<Step, MigrateError> {
        match ev {
            Event::Worker(WorkerEvent::Done { pass, .. }) => {
                if pass != self.final_pass {
                    return Err(MigrateError::WorkerOutOfStep {
                        expected: self.final_pass,
                        got: pass,
                    });
                }
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.outstanding == 0 {
                    self.t.pages_sent = Some(Instant::now());
                }
                self.complete_when_sent(src)?;
            }
            Event::Worker(WorkerEvent::Failed(e)) => {
                // The guest is paused: give it back before waiting for the peer's reason.
                src.take_back();
                return Err(src.prefer_peer_reason(e));
            }
            Event::Device(ev) => {
                let ended = src
                    .on_device(ev, "switchover")
                    .inspect_err(|_| src.take_back())?;
                if ended.is_some() {
                    self.devices_left = self.devices_left.saturating_sub(1);
                    if self.devices_left == 0 {
                        self.t.state_sent = Some(Instant::now());
                    }
                    self.complete_when_sent(src)?;
                }
            }
            Event::Peer(Ok(Message::Loaded { load_us })) if self.t.complete_sent.is_some() => {
                self.t.loaded = Some(Instant::now());
                self.t.load_us = load_us;
                return (*self).commit(src);
            }
            Event::Peer(Ok(
                Message::Ack { .. } | Message::Prepared { .. } | Message::Pong { .. },
            )) => {}
            Event::Tick if Instant::now() >= self.deadline => {
                return Err(MigrateError::Timeout {
                    what: Waited::Loaded,
                    after: src.params.switchover_timeout,
                })
            }
            ev => early_event(ev, src, "switchover")?,
        }
        Ok(Step::Next(Phase::Switchover(self)))
    }

    /// The point of no return. `Go` is written only within the switchover deadline; if the
    /// write fails, `Go` never reached the destination whole, so the guest can still be
    /// resumed here (the caller's abort does that).
    fn commit(self, src: &mut Source) -> Result<Step, MigrateError> {
        if Instant::now() >= self.deadline {
            return Err(MigrateError::Timeout {
                what: Waited::Loaded,
                after: src.params.switchover_timeout,
            });
        }
        if src.params.local {
            // The memory is shared: after Go the destination's guest changes it.
            src.write_digest_file();
        }
        src.send(&Message::Go, "switchover", self.deadline)?;
        tracing::info!("hand-over committed: Go sent");
        // Dirty logging and throttling end when the migration does (stopping the log costs
        // milliseconds of CPU, which would delay reading Running).
        let go_at = Instant::now();
        Ok(Step::Next(Phase::AwaitRunning(Box::new(AwaitRunning {
            deadline: go_at + src.params.switchover_timeout,
            go_at,
            final_pass: self.final_pass,
            t: self.t,
        }))))
    }
}

impl Source {
    /// Writes the digest of every page, if asked (verification).
    pub(super) fn write_digest_file(&self) {
        if let Some(path) = &self.params.digest_file {
            if let Err(e) = write_digests(&self.ram, path) {
                tracing::error!("{e}");
            }
        }
    }

    /// The guest is paused: every device enters STOP_COPY. Returns how many stream.
    pub(super) fn stop_copy_devices(&mut self) -> usize {
        match &self.devices {
            Some(d) => {
                d.stop_copy();
                d.count()
            }
            None => 0,
        }
    }

    /// The hand-over committed: the device threads end; the devices stay stopped here.
    pub(super) fn finish_devices(&mut self) {
        if let Some(d) = self.devices.take() {
            self.stats.device_bytes = self
                .progress
                .device_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            d.finish();
        }
    }

    /// Pauses the guest for the switchover (unless an operator had paused it already).
    pub(super) fn pause_guest(&mut self) -> Result<(), MigrateError> {
        if !self.vm.is_paused() {
            self.vm.pause().map_err(|source| MigrateError::Vm {
                op: "pausing the guest",
                source,
            })?;
            self.paused_by_us = true;
        }
        Ok(())
    }
}

/// A write that timed out during the switchover is the switchover timing out.
fn switchover_send_error(e: MigrateError, src: &Source) -> MigrateError {
    match e {
        MigrateError::Send { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
            MigrateError::Timeout {
                what: Waited::Loaded,
                after: src.params.switchover_timeout,
            }
        }
        e => e,
    }
}

/// Committed: `Go` is out; waiting for the destination to say it runs the guest.
pub(super) struct AwaitRunning {
    deadline: Instant,
    go_at: Instant,
    final_pass: u32,
    t: Timings,
}

impl AwaitRunning {
    fn on(self: Box<Self>, ev: Event, src: &mut Source) -> Step {
        match ev {
            Event::Peer(Ok(Message::Running { resume_us })) => {
                src.complete(&self, resume_us, false)
            }
            Event::Peer(Ok(Message::Error { reason })) => src.destination_refused_go(reason),
            Event::Peer(Ok(
                Message::Ack { .. } | Message::Prepared { .. } | Message::Pong { .. },
            ))
            | Event::Worker(_)
            | Event::Device(_) => Step::Next(Phase::AwaitRunning(self)),
            Event::Peer(Ok(m)) => {
                let why = format!("the destination answered Go with {}", m.name());
                Unconfirmed::enter(self, src, why, true)
            }
            Event::Peer(Err(e)) => {
                let why = format!(
                    "the link broke after Go: {}",
                    src.read_error(e, "awaiting-running")
                );
                Unconfirmed::enter(self, src, why, false)
            }
            Event::Tick if Instant::now() >= self.deadline => {
                let why = format!(
                    "the destination did not confirm within {} ms of Go",
                    src.params.switchover_timeout.as_millis()
                );
                Unconfirmed::enter(self, src, why, true)
            }
            Event::Command(req) => {
                let why = format!(
                    "the hand-over is committed (Go was sent {} ms ago) and awaits the \
                     destination's confirmation",
                    self.go_at.elapsed().as_millis()
                );
                req.refuse("awaiting-running", &why);
                Step::Next(Phase::AwaitRunning(self))
            }
            Event::Tick | Event::Connected(_) => Step::Next(Phase::AwaitRunning(self)),
        }
    }
}

impl Source {
    /// The destination runs the guest: fill in the statistics and close.
    fn complete(&mut self, a: &AwaitRunning, resume_us: u64, late: bool) -> Step {
        let running = Instant::now();
        self.finish_devices();
        let t = a.t;
        let d = &mut self.stats.downtime;
        d.final_sync_ms = ms(t.synced - t.paused);
        d.state_ms = t.state_sent.map(|s| ms(s - t.synced)).unwrap_or(0.0);
        d.final_pages_ms = t.pages_sent.map(|p| ms(p - t.synced)).unwrap_or(0.0);
        let sent = t.complete_sent.unwrap_or(t.synced);
        let loaded = t.loaded.unwrap_or(a.go_at);
        d.wait_loaded_ms = ms(loaded.saturating_duration_since(sent));
        d.dest_load_ms = t.load_us as f64 / 1000.0;
        d.go_to_running_ms = ms(running.saturating_duration_since(loaded));
        d.dest_resume_ms = resume_us as f64 / 1000.0;
        self.stats.downtime_ms = ms(running - t.paused);
        self.stats.passes = u64::from(a.final_pass) + 1;
        self.stats.confirmed_late = late;
        if let Some((us, threads, at)) = self.prepared {
            let p = &mut self.stats.prepare;
            p.reported = true;
            p.prepare_ms = us as f64 / 1000.0;
            p.threads = threads;
            p.in_downtime_ms = ms(at.saturating_duration_since(t.paused));
            p.waited_ms = t
                .converged_at
                .map(|c| ms(at.saturating_duration_since(c)))
                .unwrap_or(0.0);
        }
        self.final_counters();
        self.close();
        if !self.params.local {
            // The guest is paused here for good, so this costs no downtime.
            self.write_digest_file();
        }
        self.progress.set_status(Status::Completed);
        Step::End(Box::new(SendOutcome::Completed(self.stats.clone())))
    }

    /// The totals and counters of a completed migration.
    pub(super) fn final_counters(&mut self) {
        let total = self.started.elapsed();
        self.stats.total_ms = ms(total);
        self.stats.bytes = self.progress.bytes.load(Ordering::Relaxed);
        self.stats.pages_data = self.progress.pages_data.load(Ordering::Relaxed);
        self.stats.pages_zero = self.progress.pages_zero.load(Ordering::Relaxed);
        self.stats.batches_compressed = self.progress.batches_compressed.load(Ordering::Relaxed);
        self.stats.batches_raw = self.progress.batches_raw.load(Ordering::Relaxed);
        self.stats.throughput = (self.stats.bytes as f64 / total.as_secs_f64()) as u64;
        self.stats.status = "completed".into();
    }

    /// After `Go`, the destination said it will not run the guest (its `Error` is that
    /// promise): the guest is this side's again.
    pub(super) fn destination_refused_go(&mut self, reason: String) -> Step {
        let e = MigrateError::Peer {
            side: "destination",
            reason,
        };
        tracing::warn!("the destination refused to run the guest after Go: {e}; resuming here");
        self.take_back();
        self.close();
        self.progress.set_error(&e);
        self.progress.set_status(Status::Failed);
        Step::End(Box::new(SendOutcome::Failed(e)))
    }
}

/// `Go` was sent but not confirmed. The guest stays paused; the first word from the
/// destination decides (`Running`: it is there; `Error`: it is here), or an operator does
/// with force.
pub(super) struct Unconfirmed {
    prior: Box<AwaitRunning>,
    link_alive: bool,
}

impl Unconfirmed {
    fn enter(prior: Box<AwaitRunning>, src: &mut Source, why: String, link_alive: bool) -> Step {
        let msg = format!(
            "hand-over unconfirmed: {why}. The guest is paused here with its complete state; \
             the destination has it too and may be running it. Resume exactly one side: \
             'resume --force' here only if the destination is not running the guest"
        );
        tracing::error!("{msg}");
        src.progress.set_error(&msg);
        src.progress.set_status(Status::Unconfirmed);
        Step::Next(Phase::Unconfirmed(Box::new(Unconfirmed {
            prior,
            link_alive,
        })))
    }

    fn on(mut self: Box<Self>, ev: Event, src: &mut Source) -> Step {
        match ev {
            Event::Peer(Ok(Message::Running { resume_us })) => {
                tracing::info!("the destination confirmed late: it runs the guest");
                src.complete(&self.prior, resume_us, true)
            }
            Event::Peer(Ok(Message::Error { reason })) => src.destination_refused_go(reason),
            Event::Peer(Err(_)) => {
                self.link_alive = false;
                Step::Next(Phase::Unconfirmed(self))
            }
            Event::Command(req) => self.command(req, src),
            _ => Step::Next(Phase::Unconfirmed(self)),
        }
    }

    fn command(self: Box<Self>, req: Request, src: &mut Source) -> Step {
        let state = control::Unconfirmed {
            other: "destination",
            link_alive: self.link_alive,
        };
        let link = state.link();
        match req.command {
            Command::Resume { force: true } => {
                // Its devices run again first, as in any take-back.
                if let Some(d) = src.devices.take() {
                    d.abort();
                }
                if let Err(e) = src.vm.resume() {
                    // The guest stays paused: so do its devices (best effort).
                    for d in &src.device_list {
                        let _ = d.set_state(crate::device::DeviceState::StopCopy);
                    }
                    req.refuse("unconfirmed", &format!("the VM could not resume: {e}"));
                    return Step::Next(Phase::Unconfirmed(self));
                }
                req.answer(Ok(format!(
                    "resumed by force after an unconfirmed hand-over ({link}): if the \
                     destination received Go it may run this guest too; stop it there"
                )));
                src.paused_by_us = false;
                src.close();
                src.progress.set_status(Status::Failed);
                Step::End(Box::new(SendOutcome::ForcedResume))
            }
            Command::Quit { force: true } => {
                req.answer(Ok(
                    "quitting by force; the destination's copy is the only one left".into(),
                ));
                src.close();
                Step::End(Box::new(SendOutcome::Quit))
            }
            Command::Resume { force: false }
            | Command::Quit { force: false }
            | Command::Cancel
            | Command::Pause
            | Command::Snapshot
            | Command::StartPostcopy
            | Command::Reconnect { .. }
            | Command::Recover { .. } => {
                state.refuse(req);
                Step::Next(Phase::Unconfirmed(self))
            }
        }
    }
}
