//! Commands from the control API into a running migration's event loop. Whether a command
//! is legal follows from the phase the loop is in, so the answer is always consistent with
//! what the engine does next: a command is handled between two events, never queued to act
//! after a hand-over.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ferry_transport::Uri;

/// What an operator asks of a VM while a migration owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `migrate-cancel`: abort the migration; the source keeps the guest.
    Cancel,
    /// `quit`: abort the migration, then end the process. `force` is needed when this side
    /// may hold the only copy of the guest (an unconfirmed hand-over).
    Quit {
        /// Accept the risk of losing the guest.
        force: bool,
    },
    /// `resume`: only allowed with `force` after an unconfirmed hand-over.
    Resume {
        /// Accept the risk of running the guest twice.
        force: bool,
    },
    /// `pause`.
    Pause,
    /// `snapshot`.
    Snapshot,
    /// `migrate-start-postcopy`: switch a running precopy to postcopy now (at the end of the
    /// pass in flight).
    StartPostcopy,
    /// `migrate URI --resume` (source): a postcopy that broke off reconnects to `uri` from
    /// now on, at once (QEMU's `migrate -r`).
    Reconnect {
        /// Where the destination listens now (see [`Command::Recover`]).
        uri: Uri,
    },
    /// `migrate-recover URI` (destination): listen on `uri` as well, for the source of a
    /// postcopy that broke off (QEMU's `migrate-recover`).
    Recover {
        /// The new address.
        uri: Uri,
    },
}

impl Command {
    /// The API's name for the command.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Cancel => "migrate-cancel",
            Command::Quit { .. } => "quit",
            Command::Resume { .. } => "resume",
            Command::Pause => "pause",
            Command::Snapshot => "snapshot",
            Command::StartPostcopy => "migrate-start-postcopy",
            Command::Reconnect { .. } => "migrate --resume",
            Command::Recover { .. } => "migrate-recover",
        }
    }
}

/// Why the engine refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command} refused in migration phase {phase}: {why}")]
pub struct Refusal {
    /// The command's API name.
    pub command: &'static str,
    /// The phase that refused it.
    pub phase: &'static str,
    /// Why, and what to do instead.
    pub why: String,
}

/// The engine's answer: what it did (`Ok`), or why it refused (`Err`).
pub(crate) type Reply = Result<String, Refusal>;

/// A command with the channel its answer goes back on.
#[derive(Debug)]
pub struct Request {
    /// The command.
    pub command: Command,
    reply: Sender<Reply>,
    /// The requester stops waiting then; an engine that sees the request later drops it
    /// rather than act on a command whose requester was told there was no answer.
    expires: Instant,
}

impl Request {
    /// Whether the requester has given up waiting.
    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.expires
    }

    /// Answers the request (a requester that gave up is fine).
    pub(crate) fn answer(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }

    /// Refuses the command in `phase`, saying why.
    pub(crate) fn refuse(self, phase: &'static str, why: &str) {
        let refusal = Refusal {
            command: self.command.name(),
            phase,
            why: why.to_string(),
        };
        self.answer(Err(refusal));
    }
}

/// How a side in the unconfirmed phase words its state, for refusals and answers.
pub(crate) struct Unconfirmed {
    /// The other side: "source" or "destination".
    pub(crate) other: &'static str,
    /// Whether its control channel still works.
    pub(crate) link_alive: bool,
}

impl Unconfirmed {
    /// "the link to the destination is still up" (or "... is lost").
    pub(crate) fn link(&self) -> String {
        let state = if self.link_alive {
            "is still up"
        } else {
            "is lost"
        };
        format!("the link to the {} {state}", self.other)
    }

    /// Refuses every command but a forced `resume` or `quit`: a plain one with the risk
    /// `--force` would take, the others because only those two decide here.
    pub(crate) fn refuse(&self, req: Request) {
        let why = match req.command {
            Command::Resume { .. } | Command::Quit { .. } => {
                let risk = if matches!(req.command, Command::Resume { .. }) {
                    "two running copies".to_string()
                } else {
                    format!("losing the guest if the {} does not run it", self.other)
                };
                format!(
                    "the hand-over is unconfirmed ({}) and the {} may be running the guest; \
                     add --force to {} anyway and accept the risk of {risk}",
                    self.link(),
                    self.other,
                    req.command.name()
                )
            }
            _ => format!(
                "the guest is paused here awaiting the {}'s word; only 'resume --force' or \
                 'quit --force' decide here",
                self.other
            ),
        };
        req.refuse("unconfirmed", &why);
    }
}

/// Why a command got no answer from the engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// The engine refused it.
    #[error(transparent)]
    Refused(Refusal),
    /// The migration ended before it saw the command; ask again (the VM's new state
    /// decides).
    #[error("the migration ended while this command waited; nothing was done, send it again")]
    Ended,
    /// The engine did not answer in time.
    #[error("the migration engine did not answer within {0:?}")]
    NoAnswer(Duration),
}

/// The API's end: sends commands to a running engine.
#[derive(Debug, Clone)]
pub struct Commander {
    tx: Sender<Request>,
}

impl Commander {
    /// Sends `command` and waits up to `timeout` for the engine's answer.
    pub fn send(&self, command: Command, timeout: Duration) -> Result<String, CommandError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let expires = Instant::now() + timeout;
        self.tx
            .send(Request {
                command,
                reply,
                expires,
            })
            .map_err(|_| CommandError::Ended)?;
        match answer.recv_timeout(timeout) {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(refusal)) => Err(CommandError::Refused(refusal)),
            Err(RecvTimeoutError::Disconnected) => Err(CommandError::Ended),
            Err(RecvTimeoutError::Timeout) => Err(CommandError::NoAnswer(timeout)),
        }
    }
}

/// A command channel: the [`Commander`] for the API, the receiver for the engine.
pub fn channel() -> (Commander, Receiver<Request>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (Commander { tx }, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_refusals_and_an_ended_engine() {
        let (c, rx) = channel();
        let engine = std::thread::spawn(move || {
            let r = rx.recv().unwrap();
            r.refuse("precopy", "cancel the migration first");
            let r = rx.recv().unwrap();
            r.answer(Ok("cancelled".into()));
            // Dropping the receiver ends the engine.
        });
        let e = c
            .send(Command::Resume { force: false }, Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "resume refused in migration phase precopy: cancel the migration first"
        );
        assert_eq!(
            c.send(Command::Cancel, Duration::from_secs(5)).unwrap(),
            "cancelled"
        );
        engine.join().unwrap();
        assert_eq!(
            c.send(Command::Pause, Duration::from_secs(5)),
            Err(CommandError::Ended)
        );
    }
}
