//! Who may run the guest in this process, and what the control API may do about it.
//!
//! While a migration runs, its engine decides: every command that touches the guest's run
//! state goes to the engine's event loop, which accepts or refuses it for the phase it is
//! in. Otherwise this process either owns the guest (commands run here, under the role
//! lock, so a migration cannot start halfway through one) or has handed it over (they are
//! refused).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use ferry_migrate::control::{self, Command, CommandError, Commander};
use ferry_migrate::send::{migrate, SendOutcome, SendParams};
use ferry_migrate::{Progress, Status};
use ferry_transport::Uri;
use serde_json::{json, Value};

use crate::migration::Migratable;
use crate::runner::{Event, Vmm};
use crate::vm::Vm;

/// How long the API waits for the engine to answer a command (it answers between two
/// events, so within milliseconds).
const ENGINE_ANSWER: Duration = Duration::from_secs(10);

/// A running migration engine, as the API sees it.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Sends commands into its event loop.
    pub commander: Commander,
    /// Its progress.
    pub progress: Arc<Progress>,
}

/// Who may run the guest.
#[derive(Debug, Clone)]
pub enum Role {
    /// This process: running, or paused by an operator.
    Owner,
    /// An outgoing migration decides.
    Outgoing(Engine),
    /// This process waits for or receives a migration; the guest is not here yet.
    Incoming(Engine),
    /// The guest was handed over and runs elsewhere; this process is ending.
    HandedOver,
    /// `quit` was accepted; this process is ending and touches the guest no more (after an
    /// unconfirmed hand-over the other side may run it).
    Quitting,
}

impl Role {
    /// The name `info` reports.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Outgoing(_) => "migrating-out",
            Role::Incoming(_) => "migrating-in",
            Role::HandedOver => "handed-over",
            Role::Quitting => "quitting",
        }
    }
}

/// Why a command or a migration request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// `migrate-cancel` (or `migrate-start-postcopy`) with no migration.
    #[error("no migration is running")]
    NoMigration,
    /// A second `migrate`.
    #[error(
        "a migration is already running (phase {phase}); 'info' shows its progress, \
         'migrate-cancel' stops it"
    )]
    MigrationRunning {
        /// The running migration's phase.
        phase: &'static str,
    },
    /// `migrate` on a destination.
    #[error("this VM has no guest yet: it is receiving a migration")]
    Receiving,
    /// Anything but `quit` after the hand-over.
    #[error("{command} refused: this process is exiting (the VM was migrated away and runs on the destination)")]
    HandedOver {
        /// The command.
        command: &'static str,
    },
    /// Anything but `quit` once quitting.
    #[error(
        "{command} refused: this process is exiting (it was asked to quit, or its guest stopped)"
    )]
    Quitting {
        /// The command.
        command: &'static str,
    },
    /// The engine refused it, or did not answer.
    #[error(transparent)]
    Engine(CommandError),
    /// The migration ended between the check and the engine's answer.
    #[error(
        "{command}: the migration ended while this command waited; nothing was done; send it again"
    )]
    EndedMeanwhile {
        /// The command.
        command: &'static str,
    },
    /// Bad migration parameters.
    #[error(transparent)]
    Params(#[from] ferry_migrate::MigrateError),
    /// The VM failed to carry the command out.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The migration thread could not start.
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
    /// The migration thread ended without a result (it panicked).
    #[error("the migration thread ended without a result")]
    NoResult,
}

/// A migration's end as the API client sees it: its statistics, or why it failed (the
/// engine's own error text, which already names the cause).
pub(crate) type MigrationReply = Result<Value, String>;

/// Where a migration's result arrives.
pub(crate) type MigrationResult = Receiver<MigrationReply>;

/// What a command does when this process owns the guest.
pub(crate) type OwnerAction<'a> = Box<dyn FnOnce(&Vm) -> Result<Value, OwnerError> + 'a>;

impl Vmm {
    /// Runs `cmd` as the guest's current owner allows: here (under the role lock) when this
    /// process owns it, through the engine while a migration runs, refused once handed over.
    pub(crate) fn command(
        &self,
        cmd: Command,
        as_owner: OwnerAction<'_>,
    ) -> Result<Value, OwnerError> {
        let mut role = self.role.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*role, Role::Owner) && matches!(cmd, Command::Quit { .. }) {
            // From here on nothing may resume the guest or start a migration.
            *role = Role::Quitting;
            return as_owner(&self.vm);
        }
        match &*role {
            Role::Owner => match cmd {
                Command::Cancel
                | Command::StartPostcopy
                | Command::Reconnect { .. }
                | Command::Recover { .. } => Err(OwnerError::NoMigration),
                _ => as_owner(&self.vm),
            },
            Role::Outgoing(e) | Role::Incoming(e) => {
                let c = e.commander.clone();
                drop(role);
                let command = cmd.name();
                match c.send(cmd, ENGINE_ANSWER) {
                    Ok(done) => Ok(json!({ "message": done })),
                    Err(CommandError::Ended) => Err(OwnerError::EndedMeanwhile { command }),
                    Err(e) => Err(OwnerError::Engine(e)),
                }
            }
            Role::HandedOver | Role::Quitting => match cmd {
                Command::Quit { .. } => {
                    self.send(Event::Quit);
                    Ok(json!({}))
                }
                _ if matches!(*role, Role::HandedOver) => Err(OwnerError::HandedOver {
                    command: cmd.name(),
                }),
                _ => Err(OwnerError::Quitting {
                    command: cmd.name(),
                }),
            },
        }
    }

    /// Starts migrating to `uri` on its own thread (the migration goes on whatever happens to
    /// the API client). Returns the progress and where the result will arrive.
    pub(crate) fn start_migration(
        self: &Arc<Self>,
        uri: Uri,
        params: SendParams,
    ) -> Result<(Arc<Progress>, MigrationResult), OwnerError> {
        params.validate()?;
        let mut role = self.role.lock().unwrap_or_else(|e| e.into_inner());
        match &*role {
            Role::Owner => {}
            Role::Outgoing(e) => {
                return Err(OwnerError::MigrationRunning {
                    phase: e.progress.phase(),
                })
            }
            Role::Incoming(_) => return Err(OwnerError::Receiving),
            Role::HandedOver => return Err(OwnerError::HandedOver { command: "migrate" }),
            Role::Quitting => return Err(OwnerError::Quitting { command: "migrate" }),
        }
        let (commander, commands) = control::channel();
        let progress = Progress::new();
        *role = Role::Outgoing(Engine {
            commander,
            progress: progress.clone(),
        });
        *self
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(progress.clone());
        drop(role);
        let (result_tx, result_rx) = crossbeam_channel::bounded(1);
        let vmm = self.clone();
        let p = progress.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let vm = Arc::new(Migratable::new(vmm.vm.clone()));
                let outcome = migrate(vm, &uri, &params, p, commands);
                vmm.migration_ended(outcome, &result_tx);
            })
            .map_err(OwnerError::Thread)?;
        Ok((progress, result_rx))
    }

    /// Records who owns the guest after an outgoing migration, publishes the result, and
    /// ends this process when the guest now runs elsewhere.
    fn migration_ended(
        &self,
        outcome: SendOutcome,
        result: &crossbeam_channel::Sender<MigrationReply>,
    ) {
        let (role, reply, event) = match outcome {
            SendOutcome::Completed(stats) => (
                Role::HandedOver,
                Ok(serde_json::to_value(stats).unwrap_or(Value::Null)),
                Some(Event::MigratedAway),
            ),
            SendOutcome::Failed(e) => (Role::Owner, Err(e.to_string()), None),
            SendOutcome::Quit => (
                Role::Quitting,
                Err("migration aborted: the VM was asked to quit".into()),
                Some(Event::Quit),
            ),
            SendOutcome::ForcedResume => (
                Role::Owner,
                Err("the hand-over was unconfirmed; the guest was resumed here by force".into()),
                None,
            ),
        };
        tracing::info!(role = role.name(), "outgoing migration ended");
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
        let _ = result.send(reply);
        if let Some(ev) = event {
            self.send(ev);
        }
    }

    /// Ends this process's ownership when the guest stopped by itself, so that no command
    /// runs it again while the process ends (a running migration decides for itself).
    pub(crate) fn stop_owning(&self) {
        let mut role = self.role.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*role, Role::Owner) {
            *role = Role::Quitting;
        }
    }
}

/// Whether a migration's client has an answer: the result, or an unconfirmed hand-over
/// (the engine goes on, but the client is told now).
pub(crate) fn client_answer(
    progress: &Progress,
    result: &MigrationResult,
    wait: Duration,
) -> Option<MigrationReply> {
    match result.recv_timeout(wait) {
        Ok(r) => Some(r),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            Some(Err(OwnerError::NoResult.to_string()))
        }
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            (progress.status() == Status::Unconfirmed).then(|| {
                Err(progress
                    .error()
                    .unwrap_or_else(|| "hand-over unconfirmed".into()))
            })
        }
    }
}
