//! A lost `PostcopyDone`. The destination tells its source that every page is here and
//! ends; if the link breaks before that word arrives, the source holds on to the pages
//! and keeps reconnecting. Its destination, which now owns the guest, keeps its listener
//! and answers that source's reconnection with the same word, so the source can end too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use ferry_proto::{caps, ChannelRole, Message, VERSION};
use ferry_transport::{Listener, Stream};

use super::accept::{self, Greeted};
use super::ReceiveParams;
use crate::error::MigrateError;
use crate::wire::send_by;

/// What a finished postcopy tells a source that reconnects late.
#[derive(Debug, Clone)]
pub struct PostcopyEnded {
    /// The listener `migrate-recover` added, if any: the source may have been pointed
    /// there.
    pub(crate) extra: Arc<Mutex<Option<Listener>>>,
    pub(crate) session: u64,
    /// Capabilities agreed with that source (its `Welcome` again).
    pub(crate) agreed: u64,
    pub(crate) sums: bool,
    /// The `PostcopyDone` the source may have missed.
    pub(crate) done: Message,
}

/// Answers late reconnections until dropped.
#[derive(Debug)]
pub struct LateAnswers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for LateAnswers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How long the channels of an answered source are held open: it reads the answer only
/// once it has opened them all.
const HOLD: Duration = Duration::from_secs(30);
/// Most connections held open at once (the oldest goes first): two sources' worth.
const MAX_HELD: usize = 2 * (super::MAX_CHANNELS as usize + 2);
/// How long one answer may take to write.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps `listener` (and the one `migrate-recover` added, if any) open after a postcopy
/// that ended: the source's reconnections (same session, `RESUME`) get `Welcome` and
/// `PostcopyDone`; anything else is refused.
pub fn answer_late_resumes(
    listener: Listener,
    ended: Box<PostcopyEnded>,
    params: &ReceiveParams,
) -> Result<LateAnswers, MigrateError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded::<Greeted>(16);
    let extra = ended.extra.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut answers = LateAnswers {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    for l in std::iter::once(listener).chain(extra) {
        let (tls, timeout) = (params.tls.clone(), params.handshake_timeout);
        let (flag, tx) = (stop.clone(), tx.clone());
        let acceptor = std::thread::Builder::new()
            .name("mig-late-accept".into())
            .spawn(move || {
                let strays = AtomicU64::new(0);
                accept::run(&l, tls.as_ref(), timeout, &flag, &strays, &tx, |g| g);
            })
            .map_err(MigrateError::io("starting the late-answer acceptor"))?;
        answers.threads.push(acceptor);
    }
    drop(tx);
    let flag = stop.clone();
    let answerer = std::thread::Builder::new()
        .name("mig-late-answer".into())
        .spawn(move || answer_loop(&rx, &ended, &flag))
        .map_err(MigrateError::io("starting the late-answer thread"))?;
    answers.threads.push(answerer);
    Ok(answers)
}

fn answer_loop(
    rx: &crossbeam_channel::Receiver<Greeted>,
    ended: &PostcopyEnded,
    stop: &AtomicBool,
) {
    let mut held: Vec<(Stream, Instant)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        held.retain(|(_, since)| since.elapsed() < HOLD);
        let g = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(g) => g,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(s) = answer(g, ended) {
            // A source opens a main, an urgent and at most MAX_CHANNELS data channels.
            if held.len() >= MAX_HELD {
                held.remove(0);
            }
            held.push((s, Instant::now()));
        }
    }
}

/// Answers one greeted connection; returns it if it must stay open a while.
fn answer(g: Greeted, ended: &PostcopyEnded) -> Option<Stream> {
    let ours = g.hello.session == ended.session && g.hello.capabilities & caps::RESUME != 0;
    let mut s = g.stream;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    if !ours {
        let reason = "there is no postcopy here to resume, and this VM takes no migration: \
                      its guest runs here";
        let _ = send_by(&mut s, &Message::refuse(reason), false, deadline);
        tracing::warn!(peer = g.peer.as_str(), "refused a connection: {reason}");
        return None;
    }
    if g.hello.role != ChannelRole::Main {
        return Some(s);
    }
    let welcome = Message::Welcome {
        version: VERSION,
        capabilities: ended.agreed,
    };
    let sent = send_by(&mut s, &welcome, ended.sums, deadline)
        .and_then(|_| send_by(&mut s, &ended.done, ended.sums, deadline));
    match sent {
        Ok(_) => tracing::info!(
            peer = g.peer.as_str(),
            "the source reconnected after postcopy ended here: told it again that every \
             page arrived"
        ),
        Err(e) => tracing::warn!("answering a late reconnection: {e}"),
    }
    Some(s)
}
