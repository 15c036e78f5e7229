//! The receiver's phases:
//!
//! ```text
//! listening -> handshake -> receiving -> (loading) -> awaiting-go -> (running)
//!     ^            |            |                       |    \
//!     +------------+------------+-----------------------+     +-> unconfirmed -> (running)
//!        attempt failed or aborted by the source: discard, listen again
//! ```
//!
//! The guest runs here only after `Go`. Before that, any failure discards the attempt and
//! tells the source (an `Error` from here is the promise never to run it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_proto::{caps, ChannelRole, Hello, Message, ProtoError, Setup, Timeouts, VERSION};
use ferry_transport::{close_gracefully, Stream};

use super::accept::{Greeted, MAX_PENDING};
use super::data::{Activity, DataEvent, DataRx};
use super::devices::{DeviceLoad, DeviceProgress};
use super::postcopy::{Faults, Space};
use super::{Destination, Event, ReceiveStats, RecvOutcome, MAX_CHANNELS};
use crate::channel::Wire;
use crate::control::{self, Command, Request};
use crate::error::{Channel, MigrateError, Waited};
use crate::progress::Status;
use crate::wire::{send_by, spawn_reader, ReaderGuard};

/// How long telling the source why an attempt ends may take.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closed control channel still delivers what was written to it.
const LINGER: Duration = Duration::from_secs(5);
/// Acknowledgements go out at most this often (and at every completed pass).
const ACK_EVERY: Duration = Duration::from_millis(250);

/// What a phase returns.
pub(super) enum Step {
    Next(Phase),
    End(RecvOutcome),
}

/// Where the receiver is.
pub(super) enum Phase {
    Listening(Listening),
    Handshake(Box<Handshake>),
    Receiving(Box<Receiving>),
    AwaitGo(Box<AwaitGo>),
    Unconfirmed(Box<Unconfirmed>),
    Postcopy(Box<postcopy_run::PostcopyRunning>),
}

/// An attempt's failure: it is discarded and the receiver listens again.
type Attempted<T> = Result<T, (Box<Attempt>, MigrateError)>;

impl Phase {
    pub(super) fn listening() -> Phase {
        Phase::Listening(Listening {
            pending: Vec::new(),
        })
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Listening(_) => "listening",
            Phase::Handshake(_) => "handshake",
            Phase::Receiving(r) if r.final_pass.is_some() => "receiving-final-pass",
            Phase::Receiving(_) => "receiving",
            Phase::AwaitGo(_) => "awaiting-go",
            Phase::Unconfirmed(_) => "unconfirmed",
            Phase::Postcopy(p) => p.name(),
        }
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Handshake(h) => Some(h.deadline),
            Phase::AwaitGo(a) => Some(a.deadline),
            Phase::Receiving(r) => r.prep_wait_until,
            _ => None,
        }
    }

    pub(super) fn on(self, ev: Event, rx: &mut Destination) -> Step {
        let name = self.name();
        let r = match self {
            Phase::Listening(p) => return p.on(ev, rx),
            Phase::Handshake(p) => p.on(ev, rx),
            Phase::Receiving(p) => p.on(ev, rx),
            Phase::AwaitGo(p) => p.on(ev, rx),
            Phase::Unconfirmed(p) => return p.on(ev, rx),
            Phase::Postcopy(p) => return p.on(ev, rx),
        };
        match r {
            Ok(step) => step,
            Err((att, e)) => {
                let quit = matches!(e, MigrateError::Aborted(crate::error::AbortCause::Quit));
                let step = rx.discard(*att, e, name);
                if quit {
                    Step::End(RecvOutcome::Quit)
                } else {
                    step
                }
            }
        }
    }

    /// A failure no attempt can recover from: tell the source, if one is connected.
    pub(super) fn fail(self, rx: &mut Destination, e: MigrateError) -> MigrateError {
        let name = self.name();
        let att = match self {
            Phase::Listening(_) => None,
            Phase::Handshake(p) => Some(p.att),
            Phase::Receiving(p) => Some(p.att),
            Phase::AwaitGo(p) => Some(p.att),
            Phase::Unconfirmed(p) => Some(p.att),
            // The guest runs here: no promise not to run it can be made.
            Phase::Postcopy(_) => None,
        };
        if let Some(mut att) = att {
            att.tell_error(&e, name);
            att.end();
        }
        rx.progress.set_error(&e);
        rx.progress.set_status(Status::Failed);
        e
    }
}

/// One source's migration: its channels and what it has told us.
pub(super) struct Attempt {
    id: u64,
    hello: Hello,
    peer: String,
    main: Stream,
    reader: ReaderGuard,
    data: Vec<Stream>,
    receivers: Vec<JoinHandle<()>>,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    started: Instant,
    /// What the Welcome agreed for frames and pages.
    wire: Wire,
    /// Set with `wire.sums` once the Welcome is out: the main reader then requires them.
    sums: Arc<AtomicBool>,
    /// Postcopy's urgent channel, until its fault machinery takes it.
    urgent: Option<Stream>,
    /// Postcopy's pass and memory, shared with the data receivers from the switch on.
    postcopy: Arc<OnceLock<(u32, Arc<Space>)>>,
    /// Postcopy's fault handlers, from the switch on.
    faults: Option<Faults>,
    /// The Welcome accepted postcopy.
    postcopy_ok: bool,
    /// Postcopy: data channels that ended the postcopy pass before `Go` was handled.
    early_ends: Vec<u16>,
    /// The capabilities the Welcome accepted (a reconnecting source gets them again).
    agreed: u64,
    /// Postcopy: a reconnecting source's channels that came before `Go` was settled.
    early_rejoin: Vec<Greeted>,
    /// The devices and their loaders, from the Setup on.
    devices: Option<DeviceLoad>,
    /// The same devices, in the Setup's order (run once the guest runs here).
    device_list: Vec<Arc<dyn crate::device::MigrationDevice>>,
    /// Postcopy: the pages made missing here so far (their contents come from the source).
    made_missing: Vec<ferry_proto::PageRun>,
}

/// Refuses a migration announcing a channel count this destination does not take.
fn refuse_count(rx: &Destination, g: Greeted) {
    let Greeted {
        hello,
        mut stream,
        peer,
    } = g;
    let e = MigrateError::ChannelCount {
        asked: hello.data_channels,
        max: MAX_CHANNELS,
    };
    let deadline = Instant::now() + ERROR_SEND_TIMEOUT;
    let _ = send_by(
        &mut stream,
        &Message::refuse(e.to_string()),
        false,
        deadline,
    );
    rx.stray(&peer, &e.to_string());
}

impl Attempt {
    /// A new attempt on `g`'s main channel: numbered, progress reset, its reader started.
    fn new(rx: &mut Destination, g: Greeted) -> Result<Attempt, MigrateError> {
        let Greeted {
            hello,
            stream,
            peer,
        } = g;
        // Control messages are small and latency-bound (Loaded, Running): no Nagle delay.
        let _ = stream.set_nodelay();
        let id = rx.next_attempt();
        rx.progress.set_status(Status::Setup);
        tracing::info!(
            source = peer.as_str(),
            channels = hello.data_channels,
            "incoming migration"
        );
        let sums = Arc::new(AtomicBool::new(false));
        let reader = attempt_reader(rx, &stream, id, &sums)?;
        Ok(Attempt {
            wire: Wire::default(),
            sums,
            id,
            hello,
            peer,
            main: stream,
            reader,
            data: Vec::new(),
            receivers: Vec::new(),
            activity: Arc::new(Activity::new()),
            urgent: None,
            postcopy: Arc::new(OnceLock::new()),
            faults: None,
            postcopy_ok: false,
            early_ends: Vec::new(),
            agreed: 0,
            early_rejoin: Vec::new(),
            devices: None,
            device_list: Vec::new(),
            made_missing: Vec::new(),
            // Until the source's Setup says otherwise.
            timeouts: Timeouts {
                progress_ms: 30_000,
                switchover_ms: 2_000,
            },
            started: Instant::now(),
        })
    }

    fn send(
        &mut self,
        msg: &Message,
        phase: &'static str,
        deadline: Instant,
    ) -> Result<(), MigrateError> {
        send_by(&mut self.main, msg, self.wire.sums, deadline)
            .map(|_| ())
            .map_err(|source| MigrateError::Send {
                channel: Channel::Main,
                phase,
                source,
            })
    }

    /// Tells the source why this side gives up (a promise not to run the guest).
    fn tell_error(&mut self, e: &MigrateError, phase: &'static str) {
        if !e.came_from_peer() {
            let _ = self.send(
                &Message::error(format!("destination: {e}")),
                phase,
                Instant::now() + ERROR_SEND_TIMEOUT,
            );
        }
    }

    /// Closes the data channels and waits for their receivers, so none writes into guest
    /// memory after this; stops postcopy's fault handlers.
    fn stop_data(&mut self) {
        // Loaders drop what is queued from now on (a receiver blocked on a full queue is
        // let go), so nothing of this attempt reaches a device any more.
        if let Some(d) = &self.devices {
            d.cancel();
        }
        if let Some(f) = self.faults.take() {
            f.stop();
        }
        for d in self.data.iter().chain(&self.urgent) {
            d.shutdown();
        }
        for r in self.receivers.drain(..) {
            let _ = r.join();
        }
        // The receivers are gone: nothing can hand the loaders a chunk any more.
        if let Some(d) = self.devices.take() {
            d.stop();
        }
    }

    /// Stops the data channels, then closes the main channel gracefully.
    fn end(mut self) {
        self.stop_data();
        self.reader.stop();
        close_gracefully(self.main, LINGER);
    }

    /// A connection while the state is loaded and `Go` awaited. A postcopy source that
    /// reconnects (after `Go`) may open its data and urgent channels before its main one
    /// arrives: those are kept for it (a few at most); anything else is a stray.
    fn greeted_before_go(&mut self, rx: &Destination, g: Greeted) {
        let reconnecting = self.faults.is_some()
            && g.hello.session == self.hello.session
            && matches!(g.hello.role, ChannelRole::Data { .. } | ChannelRole::Urgent);
        if !reconnecting {
            if let Some(g) = rx.busy(g, self) {
                rx.stray(&g.peer, "an extra data channel after the handshake");
            }
            return;
        }
        let most = 2 * (usize::from(self.hello.data_channels) + 1);
        if self.early_rejoin.len() >= most {
            let old = self.early_rejoin.remove(0);
            rx.stray(
                &old.peer,
                "a reconnecting source's channel that its main one never followed",
            );
        }
        self.early_rejoin.push(g);
    }

    /// A postcopy source reconnecting with `RESUME`: it does so only after it has sent `Go`,
    /// so `Go` was lost on the way.
    fn reconnects_after_go(&self, g: &Greeted) -> bool {
        self.faults.is_some()
            && g.hello.role == ChannelRole::Main
            && g.hello.session == self.hello.session
            && g.hello.capabilities & caps::RESUME != 0
    }

    /// Postcopy: a channel may end the postcopy pass before the loop has handled `Go` (its
    /// reader raced the main channel's); kept for the postcopy phase.
    /// Other data events before `Go`: a channel that fails or closes then (a broken link, a
    /// push frame that did not verify, a dead urgent receiver or fault handler) is
    /// returned.
    fn early_end(&mut self, ev: DataEvent) -> Option<MigrateError> {
        match ev {
            DataEvent::PassEnd { channel, .. } if self.faults.is_some() => {
                self.early_ends.push(channel);
                None
            }
            DataEvent::PassEnd { .. }
            | DataEvent::DeviceInitial { .. }
            | DataEvent::DeviceLoaded { .. } => None,
            DataEvent::Failed(e) => Some(e),
            DataEvent::Closed { channel } => Some(MigrateError::DataClosed {
                channel,
                phase: "awaiting-go",
            }),
        }
    }

    fn is_current(&self, id: u64) -> bool {
        self.id == id
    }
}

impl Destination {
    /// Drops a failed attempt and listens again.
    fn discard(&mut self, mut att: Attempt, e: MigrateError, phase: &'static str) -> Step {
        tracing::warn!(
            phase,
            source = att.peer.as_str(),
            "incoming migration failed: {e}; the guest was not run here; waiting for another migration"
        );
        // A failed local hand-over: the source's guest runs on in its memory, which this
        // process must not touch again (given back before the source hears of the failure).
        if let Err(d) = self.ram.disown() {
            self.fatal = Some(MigrateError::Disown(d));
        }
        // A listener added for this attempt's postcopy serves no other.
        self.recover = None;
        att.tell_error(&e, phase);
        att.end();
        self.progress.set_error(&e);
        self.progress.set_status(Status::Listening);
        Step::Next(Phase::listening())
    }

    /// A command while an attempt is on and the guest has not run here: cancel and quit
    /// abort the attempt, the rest is refused.
    fn attempt_command(
        &mut self,
        req: Request,
        att: Box<Attempt>,
        phase: &'static str,
    ) -> Attempted<Box<Attempt>> {
        match req.command {
            Command::Cancel => {
                req.answer(Ok(
                    "incoming migration cancelled; the source keeps the guest".into(),
                ));
                Err((att, MigrateError::Aborted(crate::error::AbortCause::Cancel)))
            }
            Command::Quit { .. } => {
                // Handled by the caller, which must end, not listen again.
                req.answer(Ok(
                    "incoming migration aborted (the source keeps the guest); quitting".into(),
                ));
                Err((att, MigrateError::Aborted(crate::error::AbortCause::Quit)))
            }
            Command::StartPostcopy | Command::Reconnect { .. } => {
                req.refuse(phase, SOURCE_ONLY);
                Ok(att)
            }
            Command::Recover { .. } => {
                // A postcopy source that sent `Go` reconnects if the link breaks.
                let postcopy = att.faults.is_some();
                self.recover(req, phase, postcopy);
                Ok(att)
            }
            Command::Resume { .. } | Command::Pause | Command::Snapshot => {
                req.refuse(
                    phase,
                    "an incoming migration is running; the guest runs here only when the source \
                     hands it over (migrate-cancel aborts it)",
                );
                Ok(att)
            }
        }
    }

    /// A connection that greeted while an attempt is on.
    fn busy(&self, g: Greeted, att: &Attempt) -> Option<Greeted> {
        match g.hello.role {
            ChannelRole::Data { .. } | ChannelRole::Urgent
                if g.hello.session == att.hello.session =>
            {
                Some(g)
            }
            ChannelRole::Urgent => {
                self.stray(&g.peer, "the urgent channel of an unknown migration");
                None
            }
            ChannelRole::Main => {
                let mut s = g.stream;
                let reason = "this destination is already receiving a migration".to_string();
                let _ = send_by(
                    &mut s,
                    &Message::refuse(reason),
                    false,
                    Instant::now() + ERROR_SEND_TIMEOUT,
                );
                self.stray(
                    &g.peer,
                    "a second migration while one is in progress (refused)",
                );
                None
            }
            ChannelRole::Data { index } => {
                self.stray(
                    &g.peer,
                    &format!("data channel {index} of an unknown migration"),
                );
                None
            }
        }
    }

    /// A data channel failing usually means the source gave up; its own reason (sent on the
    /// main channel just before it closed the channels) is the useful one. Other events met
    /// while looking go back in the queue.
    fn prefer_source_reason(&self, attempt: u64, e: MigrateError) -> MigrateError {
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut others = Vec::new();
        let mut found = None;
        while let Ok(ev) = self
            .inputs
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            match ev {
                Event::Main {
                    attempt: a,
                    msg: Ok(Message::Error { reason }),
                } if a == attempt => {
                    found = Some(MigrateError::Peer {
                        side: "source",
                        reason,
                    });
                    break;
                }
                Event::Main { attempt: a, .. } | Event::Data { attempt: a, .. } if a == attempt => {
                }
                ev => others.push(ev),
            }
        }
        for ev in others {
            let _ = self.events_tx.send(ev);
        }
        found.unwrap_or(e)
    }

    fn stray(&self, peer: &str, why: &str) {
        self.strays.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("dropped a connection from {peer}: {why}");
    }

    fn stats(&self, att: &Attempt) -> ReceiveStats {
        let p = &self.progress;
        ReceiveStats {
            total_ms: att.started.elapsed().as_secs_f64() * 1000.0,
            bytes: p.bytes.load(Ordering::Relaxed),
            pages_data: p.pages_data.load(Ordering::Relaxed),
            pages_zero: p.pages_zero.load(Ordering::Relaxed),
            passes: p.pass.load(Ordering::Relaxed) + 1,
            prepare_mode: format!("{:?}", self.params.prepare).to_lowercase(),
            prepare_ms: self
                .prepared
                .map(|p| p.elapsed.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
            prepare_threads: self.prepared.map(|p| p.threads).unwrap_or(0),
            load_ms: 0.0,
            digest_ms: self.digest_time.as_secs_f64() * 1000.0,
            resume_ms: 0.0,
            postcopy: None,
            postcopy_ended: None,
            attempts: self.attempts,
            stray_connections: self.strays(),
            confirmed_late: false,
        }
    }
}

/// No migration: waiting for a main channel. Data channels that arrive first wait here.
pub(super) struct Listening {
    pending: Vec<(Greeted, Instant)>,
}

impl Listening {
    fn on(mut self, ev: Event, rx: &mut Destination) -> Step {
        match ev {
            Event::Greeted(g) if g.hello.role == ChannelRole::Main => {
                if let Some(h) = Handshake::begin(rx, g, &mut self.pending) {
                    return Step::Next(Phase::Handshake(Box::new(h)));
                }
            }
            Event::Greeted(g) => {
                if self.pending.len() >= MAX_PENDING {
                    let (old, _) = self.pending.remove(0);
                    rx.stray(
                        &old.peer,
                        "too many data channels waiting for their main channel",
                    );
                }
                self.pending.push((g, Instant::now()));
            }
            Event::Command(req) => match req.command {
                Command::Quit { .. } => {
                    req.answer(Ok("quitting (no migration was in progress)".into()));
                    return Step::End(RecvOutcome::Quit);
                }
                Command::Cancel => req.refuse("listening", "no incoming migration is running"),
                Command::Recover { .. } => rx.recover(req, "listening", false),
                Command::Reconnect { .. } | Command::StartPostcopy => {
                    req.refuse("listening", SOURCE_ONLY)
                }
                _ => req.refuse(
                    "listening",
                    "there is no guest here yet: this VM waits for an incoming migration",
                ),
            },
            // Leftovers of discarded attempts, and preparation finishing.
            Event::Main { .. } | Event::Data { .. } | Event::Prepared(_) | Event::Tick => {}
        }
        let timeout = rx.params.handshake_timeout;
        let (keep, expired): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, since)| since.elapsed() < timeout);
        for (g, _) in expired {
            rx.stray(&g.peer, "a data channel whose main channel never came");
        }
        self.pending = keep;
        Step::Next(Phase::Listening(self))
    }
}

/// Why a destination refuses the source's commands.
pub(super) const SOURCE_ONLY: &str =
    "that is the source's command ('migrate-start-postcopy', 'migrate URI --resume')";

/// A main channel greeted; waiting for its data channels and its Setup.
pub(super) struct Handshake {
    att: Box<Attempt>,
    data: Vec<Option<Stream>>,
    setup: Option<Setup>,
    deadline: Instant,
}

impl Handshake {
    /// Accepts `g` as a new migration, or refuses it (and returns `None`).
    fn begin(
        rx: &mut Destination,
        g: Greeted,
        pending: &mut Vec<(Greeted, Instant)>,
    ) -> Option<Handshake> {
        if g.hello.capabilities & caps::RESUME != 0 {
            // A source resuming a postcopy this destination does not hold (it ended, or
            // this is another process at that address): never a new migration.
            let reason = "there is no postcopy here to resume".to_string();
            let mut s = g.stream;
            let _ = send_by(
                &mut s,
                &Message::refuse(reason.clone()),
                false,
                Instant::now() + ERROR_SEND_TIMEOUT,
            );
            rx.stray(&g.peer, &reason);
            return None;
        }
        let n = g.hello.data_channels;
        // A local hand-over has no data channel; only a unix socket can carry one.
        let local = g.hello.capabilities & caps::LOCAL != 0 && g.stream.is_local() && n == 0;
        if (n == 0 && !local) || n > MAX_CHANNELS {
            refuse_count(rx, g);
            return None;
        }
        let att = match Attempt::new(rx, g) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                return None;
            }
        };
        let mut h = Handshake {
            att: Box::new(att),
            data: (0..n).map(|_| None).collect(),
            setup: None,
            deadline: Instant::now() + rx.params.handshake_timeout,
        };
        // A local hand-over sends no page, and its source sends its first frames before
        // this answer: nothing to checksum, and no agreement in time for it.
        let offered = if local {
            caps::ALL & !caps::PAGE_SUMS & !caps::POSTCOPY
        } else if !rx.postcopy_possible() {
            caps::ALL & !caps::LOCAL & !caps::POSTCOPY
        } else {
            caps::ALL & !caps::LOCAL
        };
        let welcome = Message::Welcome {
            version: VERSION,
            capabilities: h.att.hello.capabilities & offered,
        };
        // Everything after the Welcome, both ways, goes as agreed: the reader requires it
        // before the source can have heard the Welcome; this side's frames after sending it.
        let wire = Wire::accepted(h.att.hello.capabilities & offered);
        h.att.sums.store(wire.sums, Ordering::Relaxed);
        if let Err(e) = h.att.send(&welcome, "handshake", h.deadline) {
            rx.discard(*h.att, e, "handshake");
            return None;
        }
        h.att.wire = wire;
        h.att.postcopy_ok = h.att.hello.capabilities & offered & caps::POSTCOPY != 0;
        h.att.agreed = h.att.hello.capabilities & offered;
        for (g, _) in std::mem::take(pending) {
            if let Some(g) = rx.busy(g, &h.att) {
                if let Err(e) = h.attach(g) {
                    rx.discard(*h.att, e, "handshake");
                    return None;
                }
            }
        }
        Some(h)
    }

    /// Takes a data channel (or the urgent channel) of this migration.
    fn attach(&mut self, g: Greeted) -> Result<(), MigrateError> {
        if g.hello.role == ChannelRole::Urgent {
            if !self.att.postcopy_ok {
                // Opened before the source heard that postcopy is refused: it fails with
                // that reason, not this channel's.
                tracing::debug!("an urgent channel of a migration without postcopy: closed");
                return Ok(());
            }
            if self.att.urgent.is_some() {
                return Err(MigrateError::Unexpected {
                    message: "a second urgent channel",
                    phase: "handshake",
                    channel: Channel::Urgent,
                });
            }
            let _ = g.stream.set_nodelay();
            self.att.urgent = Some(g.stream);
            return Ok(());
        }
        let ChannelRole::Data { index } = g.hello.role else {
            return Ok(());
        };
        let count = self.att.hello.data_channels;
        let slot = self
            .data
            .get_mut(usize::from(index))
            .ok_or(MigrateError::BadChannel {
                index,
                problem: "out of range",
                count,
            })?;
        if slot.is_some() {
            return Err(MigrateError::BadChannel {
                index,
                problem: "a duplicate",
                count,
            });
        }
        *slot = Some(g.stream);
        Ok(())
    }

    fn on(mut self: Box<Self>, ev: Event, rx: &mut Destination) -> Attempted<Step> {
        match ev {
            Event::Greeted(g) => {
                if let Some(g) = rx.busy(g, &self.att) {
                    if let Err(e) = self.attach(g) {
                        return Err((self.att, e));
                    }
                }
            }
            Event::Main { attempt, msg } if self.att.is_current(attempt) => {
                self.att.activity.touch();
                match msg {
                    Ok(Message::Setup(s)) if self.setup.is_none() => self.setup = Some(s),
                    Ok(m) => return Err((self.att, unexpected(m, "handshake"))),
                    Err(e) => return Err((self.att, read_error(e, "handshake"))),
                }
            }
            Event::Command(req) => {
                self.att = rx.attempt_command(req, self.att, "handshake")?;
            }
            Event::Tick if Instant::now() >= self.deadline => {
                let e = MigrateError::Timeout {
                    what: Waited::Handshake,
                    after: rx.params.handshake_timeout,
                };
                return Err((self.att, e));
            }
            _ => {}
        }
        // A preparation stopped for an earlier local hand-over may still be undoing its
        // work (discarding pages): nothing may be received until it has ended.
        let undoing = rx.stopped_early && rx.prepared.is_none();
        let urgent_here = self.att.urgent.is_some() || !self.att.postcopy_ok;
        if self.data.iter().all(Option::is_some) && urgent_here && !undoing {
            if let Some(setup) = self.setup.take() {
                return Receiving::begin(*self, setup, rx)
                    .map(|r| Step::Next(Phase::Receiving(Box::new(r))));
            }
        }
        Ok(Step::Next(Phase::Handshake(self)))
    }
}

/// Starts reading attempt `id`'s main channel into the event loop.
fn attempt_reader(
    rx: &Destination,
    main: &Stream,
    id: u64,
    sums: &Arc<AtomicBool>,
) -> Result<ReaderGuard, MigrateError> {
    let reader = main
        .try_clone()
        .map_err(MigrateError::io("cloning the main socket"))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let join = spawn_reader(
        reader,
        "mig-main-rx",
        stop.clone(),
        sums.clone(),
        rx.events_tx.clone(),
        move |msg| Event::Main { attempt: id, msg },
    )?;
    Ok(ReaderGuard {
        stop,
        join: Some(join),
    })
}

fn unexpected(m: Message, phase: &'static str) -> MigrateError {
    MigrateError::main_unexpected("source", m, phase)
}

fn read_error(e: ProtoError, phase: &'static str) -> MigrateError {
    MigrateError::main_read("source", e, phase)
}

/// Pages stream into guest memory; waiting for the state, `Complete`, every channel's last
/// pass and the memory preparation.
pub(super) struct Receiving {
    att: Box<Attempt>,
    local: Local,
    /// Postcopy: pages to make missing (stale here, or never sent).
    discards: Vec<ferry_proto::PageRun>,
    /// Discards that came before the switch (a postcopy without precopy): applied once
    /// the memory preparation is over, then acknowledged with `Discarded`.
    discard_ack_due: bool,
    /// Until when those discards wait for a preparation whose pages postcopy keeps.
    prep_wait_until: Option<Instant>,
    /// Postcopy: the switch came, and its pages come as this pass.
    postcopy_pass: Option<u32>,
    /// How far the devices have loaded.
    devs: DeviceProgress,
    final_pass: Option<u32>,
    last: Vec<Option<u32>>,
    acked: (u32, u64),
    acked_at: Instant,
    ack_prepared: bool,
    prepared_sent: bool,
}

impl Receiving {
    /// Checks the VM description, starts the data receivers, accepts.
    fn begin(h: Handshake, setup: Setup, rx: &mut Destination) -> Attempted<Receiving> {
        let Handshake { mut att, data, .. } = h;
        if let Err(reason) = crate::compat::check(&setup.vm, &rx.target.description()) {
            let deadline = Instant::now() + ERROR_SEND_TIMEOUT;
            let _ = att.send(&Message::refuse(reason.clone()), "handshake", deadline);
            return Err((att, MigrateError::Incompatible(reason)));
        }
        att.timeouts = clamp(setup.timeouts);
        let devices = match resolve_devices(rx, &setup) {
            Ok(d) => d,
            Err(e) => {
                let deadline = Instant::now() + ERROR_SEND_TIMEOUT;
                let _ = att.send(&Message::refuse(e.to_string()), "handshake", deadline);
                return Err((att, e));
            }
        };
        let count = devices.len();
        att.device_list = devices.clone();
        // Answer first: the source takes this exchange as its round-trip time, so it must
        // not include starting threads (whose stacks wait for the memory preparation's
        // hold on the address space); only the devices are had before it, since a refusal
        // must name them (a test device created here is part of that). Pages wait in the
        // socket buffers meanwhile.
        let deadline = control_deadline(&att);
        if let Err(e) = att.send(&Message::SetupAccepted, "handshake", deadline) {
            return Err((att, e));
        }
        match DeviceLoad::start(devices, setup.parallel_devices, att.id, &rx.events_tx) {
            Ok(load) => att.devices = Some(load),
            Err(e) => return Err((att, e)),
        }
        for (index, stream) in data.into_iter().flatten().enumerate() {
            if let Err(e) = spawn_receiver(rx, &mut att, index, stream) {
                return Err((att, e));
            }
        }
        rx.progress.set_status(Status::Active);
        let n = usize::from(att.hello.data_channels);
        let local = if att.hello.capabilities & caps::LOCAL != 0
            && att.main.is_local()
            && att.hello.data_channels == 0
        {
            Local::Awaiting
        } else {
            Local::No
        };
        let mut r = Receiving {
            local,
            discards: Vec::new(),
            discard_ack_due: false,
            prep_wait_until: None,
            postcopy_pass: None,
            ack_prepared: att.hello.capabilities & caps::SWITCHOVER_ACK != 0,
            att,
            devs: DeviceProgress::new(count),
            final_pass: None,
            last: vec![None; n],
            acked: (0, 0),
            acked_at: Instant::now(),
            prepared_sent: false,
        };
        // Without any device, nothing is pending: ready at once.
        match r.send_prepared(rx).and_then(|()| r.send_devices_ready()) {
            Ok(()) => Ok(r),
            Err(e) => Err((r.att, e)),
        }
    }
}

/// Where a local hand-over stands.
#[derive(Debug)]
enum Local {
    /// Not one: pages arrive on data channels.
    No,
    /// The source will pass its memory file.
    Awaiting,
    /// The file is here; it is mapped once this destination's preparation has stopped.
    Pending {
        file: std::fs::File,
        offsets: Vec<u64>,
        locked: bool,
    },
    /// The source's memory is mapped here.
    Adopted,
}

/// The longest deadlines a source may impose on this destination: a source asking for
/// more (a hostile one, to hold the destination for weeks) gets these.
const MAX_PROGRESS_MS: u32 = 10 * 60 * 1000;
const MAX_SWITCHOVER_MS: u32 = 60 * 1000;
/// Longest wait for the source to take a small control message off the wire.
const CONTROL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Has the source's devices, in its order, each in RESUMING.
fn resolve_devices(
    rx: &Destination,
    setup: &Setup,
) -> Result<Vec<Arc<dyn crate::device::MigrationDevice>>, MigrateError> {
    let devices = rx
        .target
        .devices(&setup.devices)
        .map_err(MigrateError::Devices)?;
    let names = devices.iter().map(|d| d.name());
    if !names.eq(setup.devices.iter().map(|w| w.name.as_str())) {
        return Err(MigrateError::DeviceList {
            asked: setup.devices.len(),
            got: devices.len(),
        });
    }
    for d in &devices {
        d.set_state(crate::device::DeviceState::Resuming)
            .map_err(|source| MigrateError::Device {
                device: d.name().to_owned(),
                op: "entering RESUMING",
                source,
            })?;
    }
    Ok(devices)
}

fn clamp(t: Timeouts) -> Timeouts {
    Timeouts {
        progress_ms: t.progress_ms.min(MAX_PROGRESS_MS),
        switchover_ms: t.switchover_ms.min(MAX_SWITCHOVER_MS),
    }
}

/// Deadline of a small control message (it only waits for the source's reader).
fn control_deadline(att: &Attempt) -> Instant {
    Instant::now() + progress_timeout(att).min(CONTROL_SEND_TIMEOUT)
}

fn progress_timeout(att: &Attempt) -> Duration {
    Duration::from_millis(u64::from(att.timeouts.progress_ms))
}

fn spawn_receiver(
    rx: &Destination,
    att: &mut Attempt,
    index: usize,
    stream: Stream,
) -> Result<(), MigrateError> {
    att.data.push(
        stream
            .try_clone()
            .map_err(MigrateError::io("cloning a data socket"))?,
    );
    let devices = att
        .devices
        .as_ref()
        .map(|d| d.hub.clone())
        .ok_or(MigrateError::Unexpected {
            message: "a data channel",
            phase: "handshake",
            channel: Channel::Data(u16::try_from(index).unwrap_or(u16::MAX)),
        })?;
    let ctx = DataRx {
        devices,
        postcopy: att.postcopy.clone(),
        attempt: att.id,
        wire: att.wire,
        channel: u16::try_from(index).unwrap_or(u16::MAX),
        ram: rx.ram.clone(),
        written: rx.written.clone(),
        activity: att.activity.clone(),
        progress: rx.progress.clone(),
        tx: rx.events_tx.clone(),
    };
    let join = std::thread::Builder::new()
        .name(format!("mig-recv{index}"))
        .spawn(move || ctx.run(stream))
        .map_err(MigrateError::io("starting a data channel receiver thread"))?;
    att.receivers.push(join);
    Ok(())
}

impl Receiving {
    /// Tells the source the memory is prepared, once, when it asked to know.
    fn send_prepared(&mut self, rx: &Destination) -> Result<(), MigrateError> {
        let Some(p) = rx.prepared else { return Ok(()) };
        if self.prepared_sent || !self.ack_prepared {
            return Ok(());
        }
        self.prepared_sent = true;
        let msg = Message::Prepared {
            prepare_us: p.elapsed.as_micros() as u64,
            threads: u32::try_from(p.threads).unwrap_or(u32::MAX),
        };
        let deadline = control_deadline(&self.att);
        self.att.send(&msg, "receiving", deadline)
    }

    fn on(mut self: Box<Self>, ev: Event, rx: &mut Destination) -> Attempted<Step> {
        let r = match ev {
            Event::Main { attempt, msg } if self.att.is_current(attempt) => {
                self.att.activity.touch();
                self.on_main(msg)
            }
            Event::Data { attempt, ev } if self.att.is_current(attempt) => self
                .on_data(ev, rx)
                .map_err(|e| rx.prefer_source_reason(attempt, e)),
            Event::Prepared(_) => self.send_prepared(rx),
            Event::Greeted(g) => {
                if let Some(g) = rx.busy(g, &self.att) {
                    rx.stray(&g.peer, "an extra data channel after the handshake");
                }
                Ok(())
            }
            Event::Command(req) => {
                self.att = rx.attempt_command(req, self.att, "receiving")?;
                Ok(())
            }
            Event::Tick => self.on_tick(),
            Event::Main { .. } | Event::Data { .. } => Ok(()),
        };
        if let Err(e) = r
            .and_then(|()| self.adopt_when_prepared(rx))
            .and_then(|()| self.discard_early(rx))
        {
            return Err((self.att, e));
        }
        if let Some(pass) = self
            .postcopy_pass
            .filter(|p| self.ready_for_postcopy(rx, *p))
        {
            return postcopy_run::begin(*self, rx, pass)
                .map(|a| Step::Next(Phase::AwaitGo(Box::new(a))));
        }
        if self.ready(rx) {
            return AwaitGo::begin(*self, rx).map(|a| Step::Next(Phase::AwaitGo(Box::new(a))));
        }
        Ok(Step::Next(Phase::Receiving(self)))
    }

    fn on_main(&mut self, msg: Result<Message, ProtoError>) -> Result<(), MigrateError> {
        match msg {
            Ok(Message::Ping { nonce }) => {
                let deadline = control_deadline(&self.att);
                self.att
                    .send(&Message::Pong { nonce }, "receiving", deadline)
            }
            Ok(Message::LocalMemory { locked, offsets })
                if matches!(self.local, Local::Awaiting) =>
            {
                let fds = self.att.main.take_fds();
                let got = fds.len();
                let Some(fd) = fds.into_iter().next().filter(|_| got == 1) else {
                    return Err(MigrateError::LocalNoMemoryFile { got });
                };
                self.local = Local::Pending {
                    file: std::fs::File::from(fd),
                    offsets,
                    locked,
                };
                Ok(())
            }
            // A local hand-over's device streams (no data channel).
            Ok(Message::DeviceData {
                device,
                seq,
                flags,
                data,
            }) if !matches!(self.local, Local::No) => match &self.att.devices {
                Some(d) => {
                    self.att
                        .activity
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    d.hub.deliver(Channel::Main, device, seq, flags, data)
                }
                None => Err(MigrateError::UnknownDevice {
                    channel: Channel::Main,
                    index: device,
                    count: 0,
                }),
            },
            Ok(Message::Complete { final_pass }) if self.switch_pending() => {
                self.final_pass = Some(final_pass);
                Ok(())
            }
            Ok(Message::Discard { early, runs })
                if self.switch_pending() && self.att.postcopy_ok =>
            {
                // Before the switch: the guest still runs on the source (no precopy pass).
                if early {
                    self.discard_ack_due = true;
                }
                self.discards.extend(runs);
                Ok(())
            }
            Ok(Message::Postcopy { pass }) if self.switch_pending() && self.att.postcopy_ok => {
                self.postcopy_pass = Some(pass);
                Ok(())
            }
            Ok(m) => Err(unexpected(m, "receiving")),
            Err(e) => Err(read_error(e, "receiving")),
        }
    }

    /// Neither `Complete` nor `Postcopy` came yet.
    fn switch_pending(&self) -> bool {
        self.final_pass.is_none() && self.postcopy_pass.is_none()
    }

    /// Maps the source's memory file once this destination's own preparation has stopped
    /// (its undo must never reach the adopted memory), and tells the source.
    fn adopt_when_prepared(&mut self, rx: &mut Destination) -> Result<(), MigrateError> {
        if !matches!(self.local, Local::Pending { .. }) {
            return Ok(());
        }
        if rx.prepared.is_none() {
            rx.stop_preparation();
            return Ok(());
        }
        let Local::Pending {
            file,
            offsets,
            locked,
        } = std::mem::replace(&mut self.local, Local::Adopted)
        else {
            return Ok(());
        };
        let t = Instant::now();
        let lock = locked || rx.params.prepare == super::PrepareMode::Lock;
        rx.ram.adopt(file, &offsets, lock)?;
        let adopt_us = t.elapsed().as_micros() as u64;
        tracing::info!(
            ms = adopt_us as f64 / 1e3,
            lock,
            "local hand-over: the source's guest memory is mapped here"
        );
        let deadline = control_deadline(&self.att);
        self.att
            .send(&Message::MemoryAdopted { adopt_us }, "receiving", deadline)
    }

    fn on_data(&mut self, ev: DataEvent, rx: &Destination) -> Result<(), MigrateError> {
        match ev {
            DataEvent::PassEnd { channel, pass } => {
                let slot =
                    self.last
                        .get_mut(usize::from(channel))
                        .ok_or(MigrateError::BadChannel {
                            index: channel,
                            problem: "out of range",
                            count: self.att.hello.data_channels,
                        })?;
                if let Some(after) = slot.filter(|p| pass <= *p) {
                    return Err(MigrateError::PassOrder {
                        channel,
                        pass,
                        after,
                    });
                }
                *slot = Some(pass);
                rx.progress
                    .pass
                    .fetch_max(u64::from(pass), Ordering::Relaxed);
                if self.passes_complete() > self.acked.0 {
                    self.ack()?;
                }
                Ok(())
            }
            DataEvent::Closed { channel } => {
                let done = self.final_pass.is_some()
                    && self.last.get(usize::from(channel)).copied().flatten() == self.final_pass;
                if done {
                    Ok(())
                } else {
                    Err(MigrateError::DataClosed {
                        channel,
                        phase: "receiving",
                    })
                }
            }
            DataEvent::Failed(e) => Err(e),
            DataEvent::DeviceInitial { device } => {
                self.devs.initial(device);
                self.send_devices_ready()
            }
            DataEvent::DeviceLoaded {
                device,
                began,
                took,
            } => {
                self.devs.loaded(device, began, took);
                Ok(())
            }
        }
    }

    /// Says `DevicesReady` once every device's initial bytes are loaded (switchover-ack).
    fn send_devices_ready(&mut self) -> Result<(), MigrateError> {
        if self.devs.initial_left > 0 || self.devs.ready_sent {
            return Ok(());
        }
        self.devs.ready_sent = true;
        let deadline = control_deadline(&self.att);
        self.att.send(&Message::DevicesReady, "receiving", deadline)
    }

    /// Passes complete on every channel.
    fn passes_complete(&self) -> u32 {
        self.last
            .iter()
            .map(|l| l.map(|p| p.saturating_add(1)).unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Tells the source what has arrived.
    fn ack(&mut self) -> Result<(), MigrateError> {
        let now = (
            self.passes_complete(),
            self.att.activity.bytes.load(Ordering::Relaxed),
        );
        self.acked = now;
        self.acked_at = Instant::now();
        let deadline = control_deadline(&self.att);
        self.att.send(
            &Message::Ack {
                passes: now.0,
                bytes: now.1,
            },
            "receiving",
            deadline,
        )
    }

    fn on_tick(&mut self) -> Result<(), MigrateError> {
        let limit = progress_timeout(&self.att);
        if self.att.activity.idle() >= limit {
            return Err(MigrateError::Timeout {
                what: Waited::Source,
                after: limit,
            });
        }
        let bytes = self.att.activity.bytes.load(Ordering::Relaxed);
        if self.acked_at.elapsed() >= ACK_EVERY && bytes != self.acked.1 {
            self.ack()?;
        }
        Ok(())
    }

    /// Postcopy: the state, and every precopy page (every channel ended the pass before
    /// `pass`), with the memory preparation over (it must not refill discarded pages).
    fn ready_for_postcopy(&self, rx: &Destination, pass: u32) -> bool {
        let last = pass.checked_sub(1);
        self.devs.loaded_left == 0
            && rx.prepared.is_some()
            && !self.discard_ack_due
            && self.last.iter().all(|l| *l == last)
    }

    /// Everything is here: state, `Complete`, every channel's final pass, prepared memory
    /// (or, in a local hand-over, the source's memory mapped).
    fn ready(&self, rx: &Destination) -> bool {
        self.devs.loaded_left == 0
            && rx.prepared.is_some()
            && matches!(self.local, Local::No | Local::Adopted)
            && self
                .final_pass
                .is_some_and(|fp| self.last.iter().all(|l| *l == Some(fp)))
    }
}

/// The state is loaded and `Loaded` sent; only `Go` lets the guest run here.
pub(super) struct AwaitGo {
    att: Box<Attempt>,
    deadline: Instant,
    load: Duration,
}

#[path = "postcopy_run.rs"]
mod postcopy_run;

impl AwaitGo {
    fn begin(r: Receiving, rx: &mut Destination) -> Attempted<AwaitGo> {
        let Receiving { att, devs, .. } = r;
        rx.progress.set_status(Status::Switchover);
        rx.progress.set_phase("loading");
        // Every page is here: nothing may touch guest memory any more (the guest may run).
        // Sealing is one lock; the receivers themselves are stopped once the guest runs.
        if let Err(e) = att.activity.seal() {
            return Err((att, e));
        }
        // A page whose checksum failed and that never came again intact is corrupt.
        if let Err(e) = att.activity.check_suspects() {
            return Err((att, e));
        }
        if let Err(e) = rx.after_last_page() {
            return Err((att, e));
        }
        let t = Instant::now();
        if let Err(source) = rx.target.finish_load() {
            return Err((
                att,
                MigrateError::Vm {
                    op: "loading the state",
                    source,
                },
            ));
        }
        // The devices loaded side by side while the last pages came; this is their span.
        let load = devs.load_span() + t.elapsed();
        AwaitGo::loaded(att, load, load)
    }

    /// Says `Loaded` (reporting `took`) and waits for `Go` within the switchover timeout.
    fn loaded(mut att: Box<Attempt>, load: Duration, took: Duration) -> Attempted<AwaitGo> {
        let switchover = Duration::from_millis(u64::from(att.timeouts.switchover_ms));
        let deadline = Instant::now() + switchover;
        let loaded = Message::Loaded {
            load_us: took.as_micros() as u64,
        };
        if let Err(e) = att.send(&loaded, "loading", deadline) {
            return Err((att, e));
        }
        Ok(AwaitGo {
            att,
            deadline,
            load,
        })
    }

    fn on(self: Box<Self>, ev: Event, rx: &mut Destination) -> Attempted<Step> {
        match ev {
            Event::Greeted(g) if self.att.reconnects_after_go(&g) => {
                Ok(postcopy_run::go_lost(rx, self.att, self.load, g))
            }
            Event::Main { attempt, msg } if self.att.is_current(attempt) => match msg {
                Ok(Message::Go) => Ok(run_guest(rx, self.att, self.load, false)),
                Ok(Message::Ping { nonce }) => {
                    let mut a = self;
                    let deadline = control_deadline(&a.att);
                    match a
                        .att
                        .send(&Message::Pong { nonce }, "awaiting-go", deadline)
                    {
                        Ok(()) => Ok(Step::Next(Phase::AwaitGo(a))),
                        Err(e) => Err((a.att, e)),
                    }
                }
                Ok(m) => Err((self.att, unexpected(m, "awaiting-go"))),
                Err(e) => {
                    let why = format!(
                        "the link to the source broke: {}",
                        read_error(e, "awaiting-go")
                    );
                    Ok(Unconfirmed::enter(rx, *self, why, false))
                }
            },
            Event::Tick if Instant::now() >= self.deadline => {
                let why = format!(
                    "no Go within {} ms of Loaded",
                    self.att.timeouts.switchover_ms
                );
                Ok(Unconfirmed::enter(rx, *self, why, true))
            }
            Event::Command(req) => {
                let AwaitGo {
                    att,
                    deadline,
                    load,
                } = *self;
                let att = rx.attempt_command(req, att, "awaiting-go")?;
                Ok(Step::Next(Phase::AwaitGo(Box::new(AwaitGo {
                    att,
                    deadline,
                    load,
                }))))
            }
            Event::Greeted(g) => {
                let mut a = self;
                a.att.greeted_before_go(rx, g);
                Ok(Step::Next(Phase::AwaitGo(a)))
            }
            Event::Data { attempt, ev } if self.att.is_current(attempt) => {
                let mut a = self;
                match a.att.early_end(ev) {
                    // A postcopy channel failing now may be the link failing with Go on
                    // it: the source may have committed. Not a discard: unconfirmed, until
                    // the source's word (or its reconnection) says which.
                    Some(e) if a.att.faults.is_some() => {
                        let why = format!("a postcopy channel failed before Go: {e}");
                        Ok(Unconfirmed::enter(rx, *a, why, false))
                    }
                    _ => Ok(Step::Next(Phase::AwaitGo(a))),
                }
            }
            _ => Ok(Step::Next(Phase::AwaitGo(self))),
        }
    }
}

impl Destination {
    /// Every page is here and nothing writes guest memory any more: the test hook's flip,
    /// then the digest of every page, if asked for.
    fn after_last_page(&mut self) -> Result<(), MigrateError> {
        if let Some(gpa) = self.params.flip_byte_at.filter(|_| !self.ram.is_adopted()) {
            tracing::warn!("test hook: flipping the byte at guest address {gpa:#x}");
            self.ram.flip_byte(gpa).map_err(MigrateError::Memory)?;
        }
        if let Some(path) = self.params.digest_file.clone() {
            let t = Instant::now();
            crate::send::write_digests(&self.ram, &path)?;
            self.digest_time = t.elapsed();
            tracing::info!(
                "digest of every page written to {} in {:.1} ms",
                path.display(),
                self.digest_time.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}

/// `Go` arrived (or an operator forced it): run the guest and say so.
fn run_guest(rx: &mut Destination, mut att: Box<Attempt>, load: Duration, late: bool) -> Step {
    let t = Instant::now();
    if let Err(e) = run_devices(&att) {
        stop_devices(&att);
        return rx.discard(*att, e, "awaiting-go");
    }
    if let Err(source) = rx.target.resume() {
        stop_devices(&att);
        let e = MigrateError::Vm {
            op: "running the guest",
            source,
        };
        // The Error tells the committed source that the guest is not running here.
        return rx.discard(*att, e, "awaiting-go");
    }
    let resume = t.elapsed();
    let running = Message::Running {
        resume_us: resume.as_micros() as u64,
    };
    // The guest runs here now; a lost Running only leaves the source unconfirmed.
    let _ = att.send(&running, "running", Instant::now() + ERROR_SEND_TIMEOUT);
    if att.faults.is_some() {
        return postcopy_run::enter(rx, att, load, resume, late);
    }
    // After a local hand-over this process's own memory is unused from now on.
    rx.ram.free_own_memory();
    let mut stats = rx.stats(&att);
    stats.load_ms = load.as_secs_f64() * 1000.0;
    stats.resume_ms = resume.as_secs_f64() * 1000.0;
    stats.confirmed_late = late;
    att.end();
    rx.progress.set_status(Status::Completed);
    rx.progress.set_phase("running");
    Step::End(RecvOutcome::Running(stats))
}

/// Every device runs (from STOP), before the guest does.
fn run_devices(att: &Attempt) -> Result<(), MigrateError> {
    for d in &att.device_list {
        d.set_state(crate::device::DeviceState::Running)
            .map_err(|source| MigrateError::Device {
                device: d.name().to_owned(),
                op: "running",
                source,
            })?;
    }
    Ok(())
}

/// The guest will not run here after all: its devices stop again (best effort; the
/// source, told so, runs its own).
fn stop_devices(att: &Attempt) {
    for d in &att.device_list {
        if let Err(e) = d.set_state(crate::device::DeviceState::Stop) {
            tracing::debug!("device '{}' could not stop again: {e}", d.name());
        }
    }
}

/// Loaded, but no `Go` in time: the guest stays paused here with its complete state.
pub(super) struct Unconfirmed {
    att: Box<Attempt>,
    load: Duration,
    link_alive: bool,
}

impl Unconfirmed {
    fn enter(rx: &mut Destination, a: AwaitGo, why: String, link_alive: bool) -> Step {
        let msg = format!(
            "hand-over unconfirmed: {why}. The guest is loaded here and paused; the source \
             may still run it. A late Go from the source runs it here; otherwise resume it \
             here with 'resume --force' only if the source is not running it"
        );
        tracing::error!("{msg}");
        rx.progress.set_error(&msg);
        rx.progress.set_status(Status::Unconfirmed);
        let AwaitGo { att, load, .. } = a;
        Step::Next(Phase::Unconfirmed(Box::new(Unconfirmed {
            att,
            load,
            link_alive,
        })))
    }

    fn on(mut self: Box<Self>, ev: Event, rx: &mut Destination) -> Step {
        match ev {
            Event::Greeted(g) if self.att.reconnects_after_go(&g) => {
                postcopy_run::go_lost(rx, self.att, self.load, g)
            }
            Event::Main { attempt, msg } if self.att.is_current(attempt) => match msg {
                Ok(Message::Go) => run_guest(rx, self.att, self.load, true),
                Ok(Message::Error { reason }) => {
                    let e = MigrateError::Peer {
                        side: "source",
                        reason,
                    };
                    rx.discard(*self.att, e, "unconfirmed")
                }
                Ok(_) => Step::Next(Phase::Unconfirmed(self)),
                Err(_) => {
                    self.link_alive = false;
                    Step::Next(Phase::Unconfirmed(self))
                }
            },
            Event::Command(req) => self.command(req, rx),
            Event::Greeted(g) => {
                self.att.greeted_before_go(rx, g);
                Step::Next(Phase::Unconfirmed(self))
            }
            Event::Data { attempt, ev } if self.att.is_current(attempt) => {
                // The link is in doubt here anyway; only the word on Go decides.
                let _ = self.att.early_end(ev);
                Step::Next(Phase::Unconfirmed(self))
            }
            _ => Step::Next(Phase::Unconfirmed(self)),
        }
    }

    fn command(mut self: Box<Self>, req: Request, rx: &mut Destination) -> Step {
        let state = control::Unconfirmed {
            other: "source",
            link_alive: self.link_alive,
        };
        let link = state.link();
        match req.command {
            Command::Resume { force: true } if self.att.faults.is_some() => {
                req.refuse(
                    "unconfirmed",
                    "this is a postcopy hand-over: pages of the guest are still only on the \
                     source, so it cannot run here without the source's Go",
                );
                Step::Next(Phase::Unconfirmed(self))
            }
            Command::Resume { force: true } => {
                req.answer(Ok(format!(
                    "resumed by force after an unconfirmed hand-over ({link}): if the source \
                     still runs this guest, stop it there"
                )));
                run_guest(rx, self.att, self.load, true)
            }
            Command::Quit { force: true } => {
                let e = MigrateError::Aborted(crate::error::AbortCause::Quit);
                self.att.tell_error(&e, "unconfirmed");
                self.att.end();
                req.answer(Ok(
                    "quitting by force; this copy of the guest is discarded".into()
                ));
                Step::End(RecvOutcome::Quit)
            }
            Command::Recover { .. } => {
                // `Go` lost with the link: the source reconnects as after any break.
                let postcopy = self.att.faults.is_some();
                rx.recover(req, "unconfirmed", postcopy);
                Step::Next(Phase::Unconfirmed(self))
            }
            Command::Resume { force: false }
            | Command::Quit { force: false }
            | Command::Cancel
            | Command::Pause
            | Command::Snapshot
            | Command::StartPostcopy
            | Command::Reconnect { .. } => {
                state.refuse(req);
                Step::Next(Phase::Unconfirmed(self))
            }
        }
    }
}
