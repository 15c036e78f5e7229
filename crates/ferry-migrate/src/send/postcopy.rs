//! The sender's postcopy phases:
//!
//! ```text
//! precopy --(switch)--> postcopy-switch --Go--> postcopy --PostcopyDone--> (completed)
//!                            |                      |
//!                            +--> abort             +--> postcopy-paused
//!                  (guest resumed here)        (guest on the destination, its missing
//!                                               pages kept here; nothing discarded)
//! ```
//!
//! At the switch the guest pauses here; the destination learns which of its pages are stale
//! (`Discard`), gets the state and `Postcopy`, and answers `Loaded`. Until `Go` the guest is
//! this side's and any failure resumes it here. After `Go` the destination runs it and owns
//! every page it has written: this side never runs the guest again, and serves the pages the
//! destination lacks (pushed on the data channels, asked for on the urgent channel) until
//! the destination has them all.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_memory::dirty::DirtySnapshot;
use ferry_memory::ram::PAGE_SIZE;
use ferry_proto::{Message, PageRun, MAX_RUNS};

use super::phase::{Phase, Precopy, Step};
use super::urgent::{self, Serving};
use super::worker::{self, WorkerEvent};
use super::{ms, Event, SendOutcome, Source};
use crate::control::{Command, Request};
use crate::error::{MigrateError, Waited};
use crate::progress::{PostcopySendStats, Status};
use crate::CHUNK_PAGES;

/// The guest is paused here; stale pages, state and `Postcopy` went out; waiting for
/// `Loaded`.
pub(super) struct PostcopySwitch {
    deadline: Instant,
    /// Devices still streaming their stop-copy state: `Go` waits for them all (a `Loaded`
    /// read before the last device thread said it ended is kept until it does).
    devices_left: usize,
    early_loaded: Option<u64>,
    pass: u32,
    missing: Arc<DirtySnapshot>,
    stats: PostcopySendStats,
    paused: Instant,
}

impl PostcopySwitch {
    /// Pauses the guest and tells the destination what it lacks. `trigger` names why.
    pub(super) fn begin(
        src: &mut Source,
        pre: Precopy,
        trigger: &'static str,
    ) -> Result<PostcopySwitch, MigrateError> {
        src.progress.set_status(Status::Switchover);
        let paused = Instant::now();
        let deadline = paused + src.params.switchover_timeout;
        src.pause_guest()?;
        let tracker = src.tracker.clone().ok_or(MigrateError::NotTracking)?;
        // Everything written since it was sent, and everything never sent: the pages the
        // destination must not use and will get in postcopy.
        let mut missing = tracker.sync(false)?;
        missing.merge(&pre.snap)?;
        let pass = if pre.sent_any { pre.pass + 1 } else { 0 };
        // The device streams go on the data channels, ahead of the postcopy pass.
        let devices_left = src.stop_copy_devices();
        if pre.sent_any {
            // Without a pass sent, the destination discarded all its memory before the pause.
            let stale = stale_runs(src, &missing);
            src.send_discards(&stale, false, "postcopy-switch", deadline)?;
        }
        src.send(&Message::Postcopy { pass }, "postcopy-switch", deadline)?;
        src.start_urgent_server(pass)?;
        tracing::info!(
            trigger,
            pass,
            missing = missing.dirty_pages(),
            "switching to postcopy: the guest is paused; device state streaming"
        );
        let stats = PostcopySendStats {
            trigger: trigger.into(),
            precopy_passes: if pre.sent_any { u64::from(pass) } else { 0 },
            pages_missing: missing.dirty_pages(),
            ..PostcopySendStats::default()
        };
        Ok(PostcopySwitch {
            deadline,
            devices_left,
            early_loaded: None,
            pass,
            missing: Arc::new(missing),
            stats,
            paused,
        })
    }

    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(super) fn on(
        mut self: Box<Self>,
        ev: Event,
        src: &mut Source,
    ) -> Result<Step, MigrateError> {
        match ev {
            Event::Peer(Ok(Message::Loaded { load_us })) if self.devices_left == 0 => {
                self.commit(src, load_us)
            }
            Event::Peer(Ok(Message::Loaded { load_us })) if self.early_loaded.is_none() => {
                self.early_loaded = Some(load_us);
                Ok(Step::Next(Phase::PostcopySwitch(self)))
            }
            Event::Peer(Ok(
                Message::Ack { .. } | Message::Prepared { .. } | Message::Pong { .. },
            )) => Ok(Step::Next(Phase::PostcopySwitch(self))),
            Event::Worker(WorkerEvent::Failed(e)) => {
                src.take_back();
                Err(src.prefer_peer_reason(e))
            }
            Event::Device(ev) => {
                let ended = src
                    .on_device(ev, "postcopy-switch")
                    .inspect_err(|_| src.take_back())?;
                if ended.is_some() {
                    self.devices_left = self.devices_left.saturating_sub(1);
                }
                match self.early_loaded {
                    Some(load_us) if self.devices_left == 0 => self.commit(src, load_us),
                    _ => Ok(Step::Next(Phase::PostcopySwitch(self))),
                }
            }
            Event::Tick if Instant::now() >= self.deadline => Err(MigrateError::Timeout {
                what: Waited::Loaded,
                after: src.params.switchover_timeout,
            }),
            ev => {
                super::phase::early_event(ev, src, "postcopy-switch")?;
                Ok(Step::Next(Phase::PostcopySwitch(self)))
            }
        }
    }

    /// The point of no return: `Go`, then the background push of every missing page.
    fn commit(self, src: &mut Source, load_us: u64) -> Result<Step, MigrateError> {
        if Instant::now() >= self.deadline {
            return Err(MigrateError::Timeout {
                what: Waited::Loaded,
                after: src.params.switchover_timeout,
            });
        }
        src.send(&Message::Go, "postcopy-switch", self.deadline)?;
        let go_at = Instant::now();
        // The destination's own time for discarding, registering and loading the devices.
        src.stats.downtime.dest_load_ms = load_us as f64 / 1000.0;
        tracing::info!(
            load_us,
            "postcopy committed: Go sent; pushing the missing pages"
        );
        src.progress
            .pass
            .store(u64::from(self.pass), Ordering::Relaxed);
        worker::dispatch(&src.workers, &src.ram, self.pass, "postcopy", &self.missing);
        Ok(Step::Next(Phase::Postcopy(Box::new(PostcopyActive {
            go_at,
            paused: self.paused,
            running: None,
            outstanding: src.workers.len(),
            quiet_deadline: None,
            stats: self.stats,
            pass: self.pass,
            missing: self.missing,
            reconnects: 0,
            placed: None,
            last_heard: go_at,
            next_ping: go_at + PING_EVERY,
            nonce: 0,
        }))))
    }
}

/// The runs of pages the destination holds stale copies of.
fn stale_runs(src: &Source, missing: &DirtySnapshot) -> Vec<PageRun> {
    let regions = src.ram.regions();
    let mut runs: Vec<PageRun> = Vec::new();
    for c in missing.dirty_chunks(CHUNK_PAGES) {
        let Some(base) = regions.get(c.region).map(|r| r.gpa) else {
            continue;
        };
        for p in missing.chunk_pages(&c) {
            crate::wire::push_run(&mut runs, base + p * PAGE_SIZE);
        }
    }
    runs
}

impl Source {
    /// Tells the destination to make `runs` missing, in as many `Discard` frames as needed.
    pub(super) fn send_discards(
        &mut self,
        runs: &[PageRun],
        early: bool,
        phase: &'static str,
        deadline: Instant,
    ) -> Result<(), MigrateError> {
        for batch in runs.chunks(MAX_RUNS as usize) {
            let msg = Message::Discard {
                early,
                runs: batch.to_vec(),
            };
            self.send(&msg, phase, deadline)?;
        }
        Ok(())
    }

    /// Shuts every channel and its threads down (postcopy broke off).
    fn drop_channels(&mut self) {
        for s in self.sockets.drain(..) {
            s.shutdown();
        }
        if let Some(mut u) = self.urgent_server.take() {
            u.stop();
        }
        worker::stop(&mut self.workers);
        self.reader = None;
        self.main = None;
    }

    /// Takes the reconnected channels: page requests are answered on the new urgent channel
    /// at once, and the pages the destination still lacks go out as a new pass once it has
    /// said which it holds ([`Message::Placed`]). Returns the new pass.
    fn rejoin(&mut self, conn: super::Connection, a: &PostcopyActive) -> Result<u32, MigrateError> {
        self.attach(conn)?;
        let pass = a.pass + 1;
        let deadline = Instant::now() + self.params.handshake_timeout;
        self.send(&Message::Postcopy { pass }, "postcopy-paused", deadline)?;
        self.start_urgent_server(pass)?;
        let tracker = self.tracker.clone().ok_or(MigrateError::NotTracking)?;
        let how = worker::Sending {
            wire: self.wire,
            max_bandwidth: self.params.max_bandwidth,
            hint: self.fault_hint.clone(),
        };
        let data = std::mem::take(&mut self.data);
        self.workers = worker::spawn(
            data,
            how,
            &self.ram,
            &tracker,
            &self.progress,
            &self.events_tx,
            Event::Worker,
        )?;
        // The push starts once the destination has said which pages it holds.
        Ok(pass)
    }

    /// Starts answering page requests on the urgent channel, from the paused guest.
    fn start_urgent_server(&mut self, pass: u32) -> Result<(), MigrateError> {
        let Some(stream) = self.urgent.take() else {
            return Err(MigrateError::PostcopyNotEnabled);
        };
        let how = Serving {
            ram: self.ram.clone(),
            wire: self.wire,
            pass,
            progress: self.progress.clone(),
            hint: self.fault_hint.clone(),
        };
        self.urgent_server = Some(urgent::spawn(
            stream,
            how,
            self.events_tx.clone(),
            Event::Worker,
        )?);
        Ok(())
    }

    /// The destination has every page: fill in the statistics and close.
    fn complete_postcopy(&mut self, a: &PostcopyActive, done: Message) -> Step {
        let mut p = a.stats.clone();
        if let Message::PostcopyDone {
            faults,
            p50_us,
            p99_us,
            max_us,
            ..
        } = done
        {
            p.faults = faults;
            p.latency_p50_us = p50_us;
            p.latency_p99_us = p99_us;
            p.latency_max_us = max_us;
        }
        p.pages_requested = self.progress.pages_requested.load(Ordering::Relaxed);
        p.reconnects = a.reconnects;
        let running = a.running.unwrap_or(a.go_at);
        p.postcopy_ms = ms(running.elapsed());
        self.stats.downtime_ms = ms(running.saturating_duration_since(a.paused));
        self.stats.passes = p.precopy_passes + 1;
        self.stats.postcopy = Some(Box::new(p));
        self.final_counters();
        self.close();
        self.write_digest_file();
        self.progress.set_status(Status::Completed);
        tracing::info!("postcopy complete: the destination has every page");
        Step::End(Box::new(SendOutcome::Completed(self.stats.clone())))
    }
}

/// `Go` is out: the guest runs on the destination (once it says `Running`); the missing
/// pages are pushed and served until the destination has them all.
pub(super) struct PostcopyActive {
    go_at: Instant,
    paused: Instant,
    running: Option<Instant>,
    outstanding: usize,
    /// Once every page is pushed: when the destination must have said it has them all.
    quiet_deadline: Option<Instant>,
    stats: PostcopySendStats,
    /// The pass of the push in flight.
    pass: u32,
    /// Every page the destination lacked at the switch (pushed again after a reconnection).
    missing: Arc<DirtySnapshot>,
    /// Reconnections so far: after one, no `Error` can mean "the guest did not run there".
    reconnects: u32,
    /// After a reconnection: the destination's bitmap of the pages it holds, as it arrives,
    /// and by when it must be complete. The push of the new pass waits for it.
    placed: Option<(Vec<u64>, Instant)>,
    /// The destination's last word, and the next `Ping` (a silent link is a broken one).
    last_heard: Instant,
    next_ping: Instant,
    nonce: u64,
}

/// How often an active postcopy pings the destination: a link that stays silent for the
/// progress timeout counts as broken (and is reconnected).
const PING_EVERY: Duration = Duration::from_millis(500);

impl PostcopyActive {
    pub(super) fn deadline(&self) -> Option<Instant> {
        let due = [self.quiet_deadline, self.placed.as_ref().map(|p| p.1)];
        Some(due.into_iter().flatten().fold(self.next_ping, Instant::min))
    }

    /// Adds a frame of the destination's bitmap; with the last, pushes what it still lacks.
    fn take_placed(
        &mut self,
        src: &mut Source,
        first_page: u64,
        last: bool,
        words: Vec<u64>,
    ) -> Result<(), String> {
        let total = self.missing.padded_words();
        let Some((have, _)) = self.placed.as_mut() else {
            return Ok(());
        };
        if first_page != have.len() as u64 * 64 || have.len() + words.len() > total {
            return Err(format!(
                "the destination's bitmap of present pages is out of order or too long \
                 (a frame from page {first_page}, {} words, after {} of {total})",
                words.len(),
                have.len()
            ));
        }
        have.extend(words);
        if !last {
            return Ok(());
        }
        if have.len() != total {
            return Err(format!(
                "the destination's bitmap of present pages ended after {} of {total} words",
                have.len()
            ));
        }
        let before = self.missing.dirty_pages();
        let rest = self.missing.without(have);
        tracing::info!(
            missing_at_switch = before,
            still_missing = rest.dirty_pages(),
            "postcopy reconnected: pushing only what the destination still lacks"
        );
        self.stats.pages_not_resent += before - rest.dirty_pages();
        self.missing = Arc::new(rest);
        self.placed = None;
        worker::dispatch(&src.workers, &src.ram, self.pass, "postcopy", &self.missing);
        Ok(())
    }

    fn keep_alive_due(&self) -> bool {
        Instant::now() >= self.next_ping
    }

    /// Pings the destination when due; the link is broken when it stayed silent too long.
    fn keep_alive(&mut self, src: &mut Source) -> Option<String> {
        let now = Instant::now();
        if now.duration_since(self.last_heard) >= src.params.progress_timeout {
            return Some(format!(
                "the destination stayed silent for {} ms",
                src.params.progress_timeout.as_millis()
            ));
        }
        if now >= self.next_ping {
            self.next_ping = now + PING_EVERY;
            self.nonce += 1;
            let deadline = now + src.params.progress_timeout;
            if let Err(e) = src.send(&Message::Ping { nonce: self.nonce }, "postcopy", deadline) {
                return Some(e.to_string());
            }
        }
        None
    }

    pub(super) fn on(mut self: Box<Self>, ev: Event, src: &mut Source) -> Step {
        if matches!(ev, Event::Peer(Ok(_))) {
            self.last_heard = Instant::now();
        }
        match ev {
            Event::Peer(Ok(Message::Running { resume_us })) if self.running.is_none() => {
                self.running = Some(Instant::now());
                // The guest is the destination's now: the devices here stay stopped.
                src.finish_devices();
                src.progress.set_status(Status::Postcopy);
                tracing::info!(resume_us, "the guest runs on the destination (postcopy)");
            }
            Event::Peer(Ok(done @ Message::PostcopyDone { .. })) => {
                return src.complete_postcopy(&self, done);
            }
            // Before Running, and on the link Go went over, an Error is the destination's
            // promise not to run the guest. After a reconnection it proves nothing (it may
            // come from another process at that address).
            Event::Peer(Ok(Message::Error { reason }))
                if self.running.is_none() && self.reconnects == 0 =>
            {
                return src.destination_refused_go(reason);
            }
            // A reconnection's Welcome, and the usual chatter.
            Event::Peer(Ok(
                Message::Ack { .. }
                | Message::Prepared { .. }
                | Message::Pong { .. }
                | Message::Welcome { .. },
            )) => {}
            Event::Peer(Ok(Message::Placed {
                first_page,
                last,
                words,
            })) if self.placed.is_some() => {
                if let Err(why) = self.take_placed(src, first_page, last, words) {
                    return PostcopyPaused::enter(self, src, why);
                }
            }
            Event::Peer(Ok(m)) => {
                let why = format!("the destination sent {} during postcopy", m.name());
                return PostcopyPaused::enter(self, src, why);
            }
            Event::Peer(Err(e)) => {
                let why = format!("the link broke: {}", src.read_error(e, "postcopy"));
                return PostcopyPaused::enter(self, src, why);
            }
            Event::Worker(WorkerEvent::Done { pass, .. }) if pass == self.pass => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.outstanding == 0 {
                    tracing::info!("postcopy: every missing page is pushed");
                    self.quiet_deadline = Some(Instant::now() + src.params.progress_timeout);
                }
            }
            Event::Worker(WorkerEvent::Failed(e)) => {
                // The destination closes its channels once it has every page: its word on
                // the main channel may be right behind.
                if let Some(done) =
                    src.peer_word_soon(|m| matches!(m, Message::PostcopyDone { .. }))
                {
                    return src.complete_postcopy(&self, done);
                }
                return PostcopyPaused::enter(self, src, e.to_string());
            }
            Event::Tick if self.keep_alive_due() => {
                if let Some(why) = self.keep_alive(src) {
                    return PostcopyPaused::enter(self, src, why);
                }
            }
            Event::Tick if self.placed.as_ref().is_some_and(|p| Instant::now() >= p.1) => {
                let why = "after reconnecting, the destination did not say in time which \
                           pages it holds"
                    .to_string();
                return PostcopyPaused::enter(self, src, why);
            }
            Event::Tick if self.quiet_deadline.is_some_and(|d| Instant::now() >= d) => {
                let why = format!(
                    "every page was pushed but the destination did not confirm within {} ms",
                    src.params.progress_timeout.as_millis()
                );
                return PostcopyPaused::enter(self, src, why);
            }
            Event::Command(req) if req.command == Command::Quit { force: true } => {
                req.answer(Ok(
                    "quitting by force during postcopy; the pages the destination lacked are \
                     lost"
                        .into(),
                ));
                src.close();
                return Step::End(Box::new(SendOutcome::Quit));
            }
            Event::Command(req) if matches!(req.command, Command::Recover { .. }) => {
                req.refuse("postcopy", super::phase::DESTINATION_ONLY)
            }
            Event::Command(req) if matches!(req.command, Command::Reconnect { .. }) => {
                // The destination may have seen the link break before this side does.
                let to = redirect(src, &req.command);
                req.answer(Ok(format!(
                    "postcopy still runs over the old link; if it breaks, this side reconnects \
                     to {to}"
                )));
            }
            Event::Command(req) => req.refuse(
                "postcopy",
                "the guest runs on the destination and this side serves the pages it still \
                 lacks; the migration ends when it has them all ('quit --force' gives up and \
                 loses them)",
            ),
            Event::Tick
            | Event::Connected(_)
            | Event::Worker(WorkerEvent::Done { .. })
            | Event::Device(_) => {}
        }
        Step::Next(Phase::Postcopy(self))
    }
}

/// Points a postcopy's reconnections at the address of a `Reconnect` command; returns it.
fn redirect(src: &mut Source, cmd: &Command) -> String {
    let Command::Reconnect { uri } = cmd else {
        return String::new();
    };
    tracing::info!(%uri, "postcopy: reconnections go to a new address");
    src.uri = Some(uri.clone());
    uri.to_string()
}

/// Postcopy broke off after `Go`: the guest is the destination's, but pages it lacks are
/// only here. Neither side can run it alone, so nothing is discarded: the guest stays paused
/// here with its memory, and this side reconnects to the destination (same address, same
/// session) every [`RECONNECT_EVERY`] until postcopy goes on, or an operator gives up.
pub(super) struct PostcopyPaused {
    prior: Box<PostcopyActive>,
    /// When to try again (none while a try is under way).
    retry_at: Option<Instant>,
    tries: u32,
}

/// How often a broken postcopy tries to reconnect.
pub(super) const RECONNECT_EVERY: Duration = Duration::from_millis(500);

impl PostcopyPaused {
    fn enter(prior: Box<PostcopyActive>, src: &mut Source, why: String) -> Step {
        let msg = format!(
            "postcopy broke off: {why}. The guest belongs to the destination now, which still \
             lacks pages that only this side holds (the guest stays paused here with them); \
             reconnecting every {} ms. 'quit --force' gives up: it loses those pages, unless \
             the destination has logged 'incoming migration complete' (then it has them all)",
            RECONNECT_EVERY.as_millis()
        );
        tracing::error!("{msg}");
        src.progress.set_error(&msg);
        src.progress.set_status(Status::PostcopyPaused);
        // Nothing of the old channels is of use any more.
        src.drop_channels();
        Step::Next(Phase::PostcopyPaused(Box::new(PostcopyPaused {
            prior,
            retry_at: Some(Instant::now() + RECONNECT_EVERY),
            tries: 0,
        })))
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.retry_at
    }

    pub(super) fn on(mut self: Box<Self>, ev: Event, src: &mut Source) -> Step {
        match ev {
            Event::Tick if self.retry_at.is_some_and(|t| Instant::now() >= t) => {
                self.retry_at = None;
                self.tries += 1;
                src.open_channels(Instant::now() + src.params.handshake_timeout, true);
            }
            Event::Connected(Ok(conn)) => match src.rejoin(conn, &self.prior) {
                Ok(pass) => {
                    tracing::info!(
                        tries = self.tries,
                        pass,
                        "postcopy reconnected: pushing the missing pages again"
                    );
                    let mut a = self.prior;
                    a.pass = pass;
                    a.outstanding = src.workers.len();
                    a.quiet_deadline = None;
                    a.reconnects += 1;
                    a.placed = Some((Vec::new(), Instant::now() + src.params.progress_timeout));
                    a.last_heard = Instant::now();
                    a.next_ping = Instant::now() + PING_EVERY;
                    src.progress.set_status(Status::Postcopy);
                    return Step::Next(Phase::Postcopy(a));
                }
                Err(e) => {
                    tracing::warn!("postcopy: reconnecting failed: {e}");
                    src.drop_channels();
                    self.retry_at = Some(Instant::now() + RECONNECT_EVERY);
                }
            },
            Event::Connected(Err(e)) => {
                tracing::debug!("postcopy: reconnecting failed: {e}");
                self.retry_at = Some(Instant::now() + RECONNECT_EVERY);
            }
            Event::Peer(Ok(done @ Message::PostcopyDone { .. })) => {
                return src.complete_postcopy(&self.prior, done)
            }
            Event::Command(req) => return self.command(req, src),
            // The old channels' last words.
            _ => {}
        }
        Step::Next(Phase::PostcopyPaused(self))
    }

    fn command(mut self: Box<Self>, req: Request, src: &mut Source) -> Step {
        match req.command {
            Command::Quit { force: true } => {
                req.answer(Ok(
                    "quitting by force; the pages the destination lacked are lost".into(),
                ));
                src.close();
                Step::End(Box::new(SendOutcome::Quit))
            }
            Command::Reconnect { .. } => {
                let to = redirect(src, &req.command);
                let when = if self.retry_at.is_some() {
                    self.retry_at = Some(Instant::now());
                    "now".to_string()
                } else {
                    // A try is under way (bounded by the handshake timeout); the next goes
                    // to the new address.
                    "as soon as the try under way ends".to_string()
                };
                req.answer(Ok(format!("reconnecting to {to} {when}")));
                Step::Next(Phase::PostcopyPaused(self))
            }
            Command::Recover { .. } => {
                req.refuse("postcopy-paused", super::phase::DESTINATION_ONLY);
                Step::Next(Phase::PostcopyPaused(self))
            }
            _ => {
                req.refuse(
                    "postcopy-paused",
                    "postcopy broke off after the destination took the guest: this side holds \
                     pages it lacks and cannot run the guest itself; it reconnects by itself \
                     ('migrate URI --resume' points it at a new address), and only \
                     'quit --force' (losing those pages) ends it",
                );
                Step::Next(Phase::PostcopyPaused(self))
            }
        }
    }
}
