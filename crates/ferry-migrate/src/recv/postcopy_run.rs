//! The receiver's postcopy phases (a child of `phase`, which it extends):
//!
//! ```text
//! receiving --Postcopy--> (discard stale pages, register faults, load) -> awaiting-go
//!     --Go--> postcopy --every pushed page placed--> (running)
//!                |
//!                +--> postcopy-paused (the guest runs here; what is missing stays missing)
//! ```
//!
//! Until `Go` a failure discards the attempt as in precopy (the source resumes the guest).
//! After `Go` the guest runs here and nothing is ever discarded: a broken link leaves the
//! vCPUs that touch a missing page waiting, and pages that still arrive are still placed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_memory::ram::PAGE_SIZE;
use ferry_proto::{Message, PageRun, ProtoError};

use super::super::accept::Greeted;
use super::super::postcopy::{Faults, Space};
use super::super::{Destination, Event, RecvOutcome};
use super::{
    attempt_reader, control_deadline, progress_timeout, read_error, spawn_receiver, Attempt,
    Attempted, AwaitGo, Phase, Receiving, Step, ERROR_SEND_TIMEOUT,
};
use crate::control::Command;
use crate::error::MigrateError;
use crate::progress::Status;
use ferry_proto::{caps, ChannelRole, MAX_PLACED_WORDS, VERSION};
use ferry_transport::Stream;

/// Longest time a postcopy without precopy waits for the destination's preparation of
/// hugetlb memory to finish (well within the source's progress timeout).
const PREPARATION_WAIT: Duration = Duration::from_secs(3);

/// Makes `runs` missing here (their pages come in postcopy). Where postcopy keeps the
/// file's pages, only the guest mapping loses them (whole huge pages on hugetlb memory):
/// the file's pages stay allocated.
fn apply_discards(
    rx: &Destination,
    att: &mut Attempt,
    runs: &[PageRun],
) -> Result<(), MigrateError> {
    let keep = rx.keeps_file_pages();
    let unit = rx.ram.file_page_size();
    for r in runs {
        let len = u64::from(r.pages) * PAGE_SIZE;
        if keep {
            let start = r.gpa / unit * unit;
            let end = (r.gpa + len).div_ceil(unit) * unit;
            rx.ram.hide(start, end - start)?;
        } else {
            rx.ram.discard(r.gpa, len)?;
        }
    }
    att.made_missing.extend_from_slice(runs);
    // A page that arrived corrupted and is discarded now comes again in postcopy.
    att.activity.forget_suspects(runs);
    Ok(())
}

impl Receiving {
    /// A postcopy without precopy: discards all memory while the guest still runs on the
    /// source, once the memory preparation is over, and says so.
    pub(super) fn discard_early(&mut self, rx: &mut Destination) -> Result<(), MigrateError> {
        if !self.discard_ack_due {
            return Ok(());
        }
        if rx.prepared.is_none() {
            // Populating what is discarded next is wasted: stop it, and discard once it has
            // stopped. Except on hugetlb memory, whose prepared pages postcopy keeps and
            // whose holes it would have to allocate and zero 2 MiB at a time in the fault
            // path: wait for it a while (it runs at nice 0 once a migration is on), and stop
            // it only if it takes longer. (Waiting for a memfd preparation was measured: the
            // wait cost about what keeping its pages saved, and the switch came later.)
            let hugetlb = rx.ram.config().backend == ferry_memory::ram::Backend::Hugetlb;
            let until = *self
                .prep_wait_until
                .get_or_insert_with(|| Instant::now() + PREPARATION_WAIT);
            let wait = hugetlb && rx.keeps_file_pages_once_prepared();
            if !wait || Instant::now() >= until {
                self.prep_wait_until = None;
                rx.stop_preparation();
            }
            return Ok(());
        }
        self.prep_wait_until = None;
        let t = Instant::now();
        let runs = std::mem::take(&mut self.discards);
        apply_discards(rx, &mut self.att, &runs)?;
        self.discard_ack_due = false;
        let discard_us = t.elapsed().as_micros() as u64;
        tracing::info!(
            ms = discard_us as f64 / 1e3,
            "postcopy: destination memory discarded before the switch"
        );
        let deadline = control_deadline(&self.att);
        self.att
            .send(&Message::Discarded { discard_us }, "receiving", deadline)
    }
}

/// The switch: every precopy page is here. Stale pages are made missing, guest memory is
/// registered for faults, the fault handlers start, the state is loaded.
pub(super) fn begin(r: Receiving, rx: &mut Destination, pass: u32) -> Attempted<AwaitGo> {
    let Receiving {
        mut att,
        devs,
        discards,
        ..
    } = r;
    rx.progress.set_status(Status::Switchover);
    rx.progress.set_phase("loading");
    let t = Instant::now();
    let prepared = att
        .activity
        .seal()
        .and_then(|()| apply_discards(rx, &mut att, &discards))
        .and_then(|()| att.activity.check_suspects())
        .and_then(|()| start_faults(rx, &mut att, pass));
    if let Err(e) = prepared {
        return Err((att, e));
    }
    let discarded = t.elapsed();
    let t = Instant::now();
    if let Err(source) = rx.target.finish_load() {
        let e = MigrateError::Vm {
            op: "loading the state",
            source,
        };
        return Err((att, e));
    }
    let load = devs.load_span() + t.elapsed();
    tracing::info!(
        pass,
        stale = discards.iter().map(|r| u64::from(r.pages)).sum::<u64>(),
        discard_ms = discarded.as_secs_f64() * 1e3,
        load_ms = load.as_secs_f64() * 1e3,
        "postcopy: memory registered for faults, state loaded"
    );
    AwaitGo::loaded(att, load, discarded + load)
}

/// Registers guest memory for faults and starts the handlers and the urgent receiver.
fn start_faults(rx: &Destination, att: &mut Attempt, pass: u32) -> Result<(), MigrateError> {
    let queues = rx
        .params
        .fault_queues
        .unwrap_or(rx.target.description().vcpus as usize);
    let space = Arc::new(Space::new(
        rx.ram.clone(),
        rx.written.clone(),
        queues,
        rx.keeps_file_pages().then_some(att.made_missing.as_slice()),
    )?);
    let urgent = att
        .urgent
        .as_ref()
        .ok_or(MigrateError::PostcopyNotEnabled)?
        .try_clone()
        .map_err(MigrateError::io("cloning the urgent channel"))?;
    let faults = Faults::start(
        space.clone(),
        urgent,
        att.wire,
        att.id,
        rx.events_tx.clone(),
    )?;
    att.faults = Some(faults);
    // Only now may postcopy frames be placed (the source pushes them after Go).
    let _ = att.postcopy.set((pass, space));
    Ok(())
}

/// The source reconnected after `Go` (it reconnects only once committed), but `Go` itself
/// never arrived: it was lost with the link. Run the guest, then take the new channels.
pub(super) fn go_lost(rx: &mut Destination, att: Box<Attempt>, load: Duration, g: Greeted) -> Step {
    tracing::warn!("postcopy: Go was lost with the link; the source's reconnection stands for it");
    match super::run_guest(rx, att, load, true) {
        Step::Next(Phase::Postcopy(mut p)) => {
            let early = std::mem::take(&mut p.att.early_rejoin);
            p.early.extend(early);
            p.greeted(rx, g);
            Step::Next(Phase::Postcopy(p))
        }
        other => other,
    }
}

/// `Go` came and the guest runs: wait for every pushed page.
pub(super) fn enter(
    rx: &mut Destination,
    mut att: Box<Attempt>,
    load: Duration,
    resume: Duration,
    late: bool,
) -> Step {
    if let Some(f) = att.faults.as_mut() {
        f.guest_runs();
    }
    rx.progress.set_status(Status::Postcopy);
    let pass = att.postcopy.get().map(|(p, _)| *p).unwrap_or(0);
    let n = usize::from(att.hello.data_channels);
    let early = std::mem::take(&mut att.early_ends);
    let mut p = PostcopyRunning {
        att,
        pass,
        ended: vec![false; n],
        load,
        resume,
        late,
        broken: None,
        rejoin: None,
        early: Vec::new(),
    };
    for channel in early {
        if p.pass_end(channel, pass) {
            return p.finish(rx);
        }
    }
    Step::Next(Phase::Postcopy(Box::new(p)))
}

/// Tells a reconnecting source which pages are here already, in `Placed` frames.
fn send_placed(
    main: &mut Stream,
    words: &[u64],
    sums: bool,
    deadline: Instant,
) -> std::io::Result<()> {
    let per = MAX_PLACED_WORDS as usize;
    let frames = words.len().div_ceil(per).max(1);
    for i in 0..frames {
        let part = words.get(i * per..((i + 1) * per).min(words.len()));
        let msg = Message::Placed {
            first_page: (i * per * 64) as u64,
            last: i + 1 == frames,
            words: part.unwrap_or_default().to_vec(),
        };
        super::send_by(main, &msg, sums, deadline)?;
    }
    Ok(())
}

/// The guest runs here; pages it lacks still arrive.
pub(crate) struct PostcopyRunning {
    att: Box<Attempt>,
    pass: u32,
    /// Which data channels ended the postcopy pass.
    ended: Vec<bool>,
    load: Duration,
    resume: Duration,
    late: bool,
    /// Why postcopy broke off, if it did.
    broken: Option<String>,
    /// A reconnecting source's channels, gathering.
    rejoin: Option<Rejoin>,
    /// Channels of this session that came before their reconnecting main channel.
    early: Vec<Greeted>,
}

/// A reconnecting source: its new main channel, and its data and urgent channels as they
/// come.
struct Rejoin {
    main: Stream,
    data: Vec<Option<Stream>>,
    urgent: Option<Stream>,
    deadline: Instant,
}

/// How long a reconnecting source's channels may take to follow its main channel.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(10);

impl PostcopyRunning {
    pub(super) fn name(&self) -> &'static str {
        if self.broken.is_some() {
            "postcopy-paused"
        } else {
            "postcopy"
        }
    }

    pub(super) fn on(mut self: Box<Self>, ev: Event, rx: &mut Destination) -> Step {
        match ev {
            Event::Data { attempt, ev } if self.att.is_current(attempt) => match ev {
                super::super::data::DataEvent::PassEnd { channel, pass } => {
                    if self.pass_end(channel, pass) {
                        return (*self).finish(rx);
                    }
                }
                super::super::data::DataEvent::Closed { channel } => {
                    if !self
                        .ended
                        .get(usize::from(channel))
                        .copied()
                        .unwrap_or(true)
                    {
                        self.broke(rx, format!("data channel {channel} closed early"));
                    }
                }
                super::super::data::DataEvent::Failed(e) => self.broke(rx, e.to_string()),
                // Every device loaded before the guest ran here.
                super::super::data::DataEvent::DeviceInitial { .. }
                | super::super::data::DataEvent::DeviceLoaded { .. } => {}
            },
            Event::Main { attempt, msg } if self.att.is_current(attempt) => match msg {
                Ok(Message::Ping { nonce }) => {
                    let deadline = control_deadline(&self.att);
                    let _ = self
                        .att
                        .send(&Message::Pong { nonce }, "postcopy", deadline);
                }
                Ok(Message::Error { reason }) => {
                    self.broke(rx, format!("the source gave up: {reason}"))
                }
                Ok(Message::Postcopy { pass }) => self.new_pass(pass),
                Ok(Message::Ack { .. } | Message::Pong { .. }) => {}
                Ok(m) => self.broke(rx, format!("the source sent {} in postcopy", m.name())),
                Err(ProtoError::Eof) if self.broken.is_some() => {}
                Err(e) => self.broke(rx, read_error(e, "postcopy").to_string()),
            },
            Event::Tick => {
                let limit = progress_timeout(&self.att);
                if self.broken.is_none() && self.att.activity.idle() >= limit {
                    let why = format!("no page arrived for {} ms", limit.as_millis());
                    self.broke(rx, why);
                }
            }
            Event::Command(req) => match req.command {
                Command::Quit { force: true } => {
                    req.answer(Ok(
                        "quitting by force during postcopy: this guest is lost".into()
                    ));
                    self.att.end();
                    return Step::End(RecvOutcome::Quit);
                }
                Command::Recover { .. } => rx.recover(req, self.name(), true),
                Command::Reconnect { .. } => req.refuse(self.name(), super::SOURCE_ONLY),
                _ => req.refuse(
                    self.name(),
                    "postcopy: the guest runs here while its last pages arrive; the migration \
                     ends when they are all here ('quit --force' abandons the guest)",
                ),
            },
            Event::Greeted(g) => self.greeted(rx, g),
            _ => {}
        }
        if self
            .rejoin
            .as_ref()
            .is_some_and(|r| Instant::now() >= r.deadline)
        {
            tracing::warn!("a reconnecting source's channels did not all come in time");
            self.rejoin = None;
        }
        Step::Next(Phase::Postcopy(self))
    }

    /// A connection during postcopy: a reconnecting source's, or a stray.
    fn greeted(&mut self, rx: &mut Destination, g: Greeted) {
        let ours = g.hello.session == self.att.hello.session;
        let resume = g.hello.capabilities & caps::RESUME != 0;
        match g.hello.role {
            ChannelRole::Main if ours && resume => self.start_rejoin(rx, g),
            ChannelRole::Data { .. } | ChannelRole::Urgent if ours => {
                // A few at most wait for their main channel.
                let most = 2 * (self.ended.len() + 1);
                if self.early.len() >= most {
                    let old = self.early.remove(0);
                    rx.stray(
                        &old.peer,
                        "a reconnecting source's channel without its main one",
                    );
                }
                self.early.push(g);
                self.gather(rx);
            }
            _ => {
                if let Some(g) = rx.busy(g, &self.att) {
                    rx.stray(&g.peer, "an extra channel during postcopy");
                }
            }
        }
    }

    /// The source reconnects: greet it with what was agreed, and gather its channels.
    fn start_rejoin(&mut self, rx: &mut Destination, g: Greeted) {
        let mut main = g.stream;
        let _ = main.set_nodelay();
        let welcome = Message::Welcome {
            version: VERSION,
            capabilities: self.att.agreed,
        };
        let deadline = Instant::now() + ERROR_SEND_TIMEOUT;
        let placed = self
            .att
            .faults
            .as_ref()
            .map(Faults::placed_words)
            .unwrap_or_default();
        let sums = self.att.wire.sums;
        // The bitmap is 32 KiB per GiB of guest memory: it gets the handshake's time.
        let bitmap_by = Instant::now() + rx.params.handshake_timeout;
        let greeted = super::send_by(&mut main, &welcome, sums, deadline)
            .and_then(|_| send_placed(&mut main, &placed, sums, bitmap_by));
        if let Err(e) = greeted {
            tracing::warn!("greeting the reconnecting source: {e}");
            return;
        }
        tracing::info!(source = g.peer.as_str(), "postcopy: the source reconnects");
        let n = usize::from(self.att.hello.data_channels);
        self.rejoin = Some(Rejoin {
            main,
            data: (0..n).map(|_| None).collect(),
            urgent: None,
            deadline: Instant::now() + REJOIN_TIMEOUT,
        });
        self.gather(rx);
    }

    /// Slots the channels that came; once all are here, switches to them.
    fn gather(&mut self, rx: &mut Destination) {
        let Some(r) = self.rejoin.as_mut() else {
            return;
        };
        for g in std::mem::take(&mut self.early) {
            match g.hello.role {
                ChannelRole::Urgent => r.urgent = Some(g.stream),
                ChannelRole::Data { index } => {
                    if let Some(slot) = r.data.get_mut(usize::from(index)) {
                        *slot = Some(g.stream);
                    }
                }
                ChannelRole::Main => {}
            }
        }
        if r.urgent.is_none() || r.data.iter().any(Option::is_none) {
            return;
        }
        if let Some(r) = self.rejoin.take() {
            if let Err(e) = self.switch_channels(rx, r) {
                self.broke(rx, format!("taking the reconnected channels failed: {e}"));
            }
        }
    }

    /// Replaces every channel of the attempt with the reconnected ones. The attempt gets a
    /// new id: whatever the old channels still report is stale.
    fn switch_channels(&mut self, rx: &mut Destination, r: Rejoin) -> Result<(), MigrateError> {
        let att = &mut self.att;
        att.reader.stop();
        att.main.shutdown();
        for d in att.data.drain(..) {
            d.shutdown();
        }
        for j in att.receivers.drain(..) {
            let _ = j.join();
        }
        att.id += 1 << 40;
        att.main = r.main;
        att.reader = attempt_reader(rx, &att.main, att.id, &att.sums)?;
        for (index, stream) in r.data.into_iter().flatten().enumerate() {
            spawn_receiver(rx, att, index, stream)?;
        }
        let urgent = r.urgent.ok_or(MigrateError::PostcopyNotEnabled)?;
        let keep = urgent
            .try_clone()
            .map_err(MigrateError::io("cloning the urgent channel"))?;
        if let Some(f) = att.faults.as_mut() {
            f.rejoin(urgent, att.id)?;
        }
        att.urgent = Some(keep);
        att.activity.touch();
        self.ended.iter_mut().for_each(|e| *e = false);
        self.broken = None;
        rx.progress.set_status(Status::Postcopy);
        tracing::info!("postcopy resumes on the reconnected channels");
        Ok(())
    }

    /// A newer push (a reconnected source pushes again, as a new pass).
    fn new_pass(&mut self, pass: u32) {
        if pass > self.pass {
            self.pass = pass;
            self.ended.iter_mut().for_each(|e| *e = false);
        }
    }

    /// A channel ended the postcopy pass; true when all have (every page is here).
    fn pass_end(&mut self, channel: u16, pass: u32) -> bool {
        self.new_pass(pass);
        if pass != self.pass {
            tracing::debug!(channel, pass, "a stale pass end after a reconnection");
            return false;
        }
        if let Some(e) = self.ended.get_mut(usize::from(channel)) {
            *e = true;
        }
        self.ended.iter().all(|e| *e)
    }

    fn broke(&mut self, rx: &Destination, why: String) {
        if self.broken.is_some() {
            return;
        }
        let msg = format!(
            "postcopy broke off: {why}. The guest keeps running here; a vCPU that touches a \
             page still on the source waits for it. The source reconnects to this address by \
             itself; postcopy then goes on"
        );
        tracing::error!("{msg}");
        rx.progress.set_error(&msg);
        rx.progress.set_status(Status::PostcopyPaused);
        self.broken = Some(why);
        // Every channel goes, so the source learns of it too and reconnects.
        self.att.main.shutdown();
        for d in self.att.data.iter().chain(&self.att.urgent) {
            d.shutdown();
        }
    }

    /// Sends `PostcopyDone`; returns it (a source that missed it gets it again).
    fn tell_done(&mut self, stats: &super::super::PostcopyStats) -> Message {
        let done = Message::PostcopyDone {
            faults: stats.faults,
            requested: stats.requested_pages,
            p50_us: stats.latency_p50_us,
            p99_us: stats.latency_p99_us,
            max_us: stats.latency_max_us,
        };
        if let Err(e) = self
            .att
            .send(&done, "postcopy", Instant::now() + ERROR_SEND_TIMEOUT)
        {
            tracing::warn!("telling the source that postcopy is complete: {e}");
        }
        done
    }

    /// Every page is here: tell the source, stop the fault machinery, and report.
    fn finish(mut self, rx: &mut Destination) -> Step {
        // Every channel ended the pass, so every page made missing should be here. One whose
        // placement failed on a channel replaced since (its claim given back, its error
        // stale) would not be: the source must not let go then. Breaking the link makes it
        // reconnect and push again every page not placed.
        let unplaced = self.att.faults.as_ref().map_or(0, Faults::unplaced);
        if unplaced > 0 {
            self.broke(
                rx,
                format!("{unplaced} pages made missing are not placed at the end of the push"),
            );
            return Step::Next(Phase::Postcopy(Box::new(self)));
        }
        // The source's word first: it may let go as soon as it has it.
        let so_far = self
            .att
            .faults
            .as_ref()
            .map(Faults::stats)
            .unwrap_or_default();
        let done = self.tell_done(&so_far);
        let stats = self.att.faults.take().map(Faults::stop).unwrap_or_default();
        tracing::info!(
            faults = stats.faults,
            requested = stats.requested_pages,
            p50_us = stats.latency_p50_us,
            p99_us = stats.latency_p99_us,
            "postcopy complete: every page is here"
        );
        let mut out = rx.stats(&self.att);
        out.load_ms = self.load.as_secs_f64() * 1e3;
        out.resume_ms = self.resume.as_secs_f64() * 1e3;
        out.confirmed_late = self.late;
        out.postcopy = Some(Box::new(stats));
        let extra = rx.recover.take().and_then(|l| l.stop());
        out.postcopy_ended = Some(Box::new(super::super::late::PostcopyEnded {
            extra: std::sync::Arc::new(std::sync::Mutex::new(extra)),
            session: self.att.hello.session,
            agreed: self.att.agreed,
            sums: self.att.wire.sums,
            done,
        }));
        self.att.end();
        rx.progress.set_status(Status::Completed);
        rx.progress.set_phase("running");
        Step::End(RecvOutcome::Running(out))
    }
}
