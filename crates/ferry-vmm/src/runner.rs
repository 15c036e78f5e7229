//! `ferry run`: build the VM (boot an image, restore a snapshot or receive a migration),
//! serve the control API, and run until the guest stops, `quit`, or a migration hands the
//! guest to another process.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_memory::ram::MemoryConfig;
use ferry_migrate::recv::{
    answer_late_resumes, receive, start_prepare, ReceiveParams, ReceiveStats, RecvOutcome,
};
use ferry_migrate::{control, MigrateError, Progress};
use ferry_transport::{Listener, Uri};

use crate::api::{self, ApiState};
use crate::devices::SerialSink;
use crate::migration::Migratable;
use crate::owner::{Engine, Role};
use crate::vcpu::VcpuEvent;
use crate::vm::{Vm, VmConfig, VmError};

/// How the VM starts.
#[derive(Debug)]
pub enum Boot {
    /// Boot a multiboot image.
    Kernel {
        /// Image file.
        path: PathBuf,
        /// Command line (`--append`).
        append: String,
    },
    /// Resume a snapshot file.
    Restore {
        /// Snapshot file.
        path: PathBuf,
    },
    /// Wait for an incoming migration.
    Incoming {
        /// Where to listen.
        uri: Uri,
        /// Receiver options.
        params: ReceiveParams,
    },
    /// Take the VM over from the binary that exec'd this one (`update --exec`).
    Takeover(Box<crate::update::Inherited>),
}

/// Where serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// This process's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// A file, appended to (a binary taking a VM over continues its output).
    Append(PathBuf),
    /// Nowhere.
    Null,
}

impl std::str::FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "null" => Ok(SerialConfig::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                _ => Err(format!(
                    "bad --serial '{s}' (expected stdout, file:PATH or null)"
                )),
            },
        }
    }
}

/// Everything `ferry run` needs.
#[derive(Debug)]
pub struct RunConfig {
    /// How to start.
    pub boot: Boot,
    /// RAM (size ignored for `Restore`, which takes it from the file).
    pub memory: MemoryConfig,
    /// vCPUs (ignored for `Restore`).
    pub vcpus: u32,
    /// Serial output.
    pub serial: SerialConfig,
    /// Control API socket.
    pub api_socket: Option<PathBuf>,
    /// Test devices (`--device testdev,...`), numbered in order.
    pub testdevs: Vec<crate::testdev::TestDevConfig>,
}

/// Errors of `ferry run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Creating, booting or restoring the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The incoming migration failed.
    #[error("incoming migration failed: {0}")]
    Incoming(MigrateError),
    /// Setup problems (files, sockets, options).
    #[error("{0}")]
    Setup(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest stopped (shutdown, halt, triple fault, KVM error).
    GuestStopped {
        /// Why.
        reason: String,
        /// Whether it is an error.
        error: bool,
    },
    /// `quit` through the API.
    Quit,
    /// The guest was migrated to another process, which runs it now.
    MigratedAway,
}

/// Events the run loop waits for.
pub(crate) enum Event {
    Vcpu(VcpuEvent),
    Quit,
    MigratedAway,
}

/// How long the process waits, before exiting, for API clients to get their replies.
const API_DRAIN: Duration = Duration::from_secs(2);

/// What the API server, the migration thread and the run loop share.
pub struct Vmm {
    pub(crate) vm: Arc<Vm>,
    pub(crate) events: Mutex<Sender<Event>>,
    /// Who may run the guest; every run-state command is checked against it.
    pub(crate) role: Mutex<Role>,
    /// The last outgoing migration's progress (for `info` after it ended).
    pub(crate) last_migration: Mutex<Option<Arc<Progress>>>,
    /// The incoming migration's progress, kept after it completed.
    pub(crate) incoming: Mutex<Option<Arc<Progress>>>,
    /// The control API's threads, as the process's exit sees them.
    pub(crate) api: ApiState,
    /// Where serial output goes (a live update hands it on).
    pub(crate) serial: SerialConfig,
    /// The API socket (a live update serves it on).
    pub(crate) api_socket: Option<PathBuf>,
}

impl Vmm {
    pub(crate) fn send(&self, e: Event) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(e);
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Who may run the guest right now.
    pub fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_role(&self, r: Role) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }
}

fn serial_sink(cfg: &SerialConfig) -> Result<SerialSink, RunError> {
    match cfg {
        SerialConfig::Stdout => {
            SerialSink::stdout().map_err(|e| RunError::Setup(format!("serial to stdout: {e}")))
        }
        SerialConfig::Null => Ok(SerialSink::Null),
        SerialConfig::File(p) => std::fs::File::create(p)
            .map(SerialSink::Fd)
            .map_err(|e| RunError::Setup(format!("serial file {}: {e}", p.display()))),
        SerialConfig::Append(p) => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .map(SerialSink::Fd)
            .map_err(|e| RunError::Setup(format!("serial file {}: {e}", p.display()))),
    }
}

/// A VM built as `cfg.boot` says, with the listener and preparation of an incoming one.
struct Built {
    vm: Vm,
    listener: Option<Listener>,
    prepared: Option<ferry_memory::prepare::PrepareHandle>,
}

fn build(cfg: &RunConfig, serial: SerialSink) -> Result<Built, RunError> {
    let built = build_vm(cfg, serial)?;
    if !cfg.testdevs.is_empty() && matches!(cfg.boot, Boot::Restore { .. } | Boot::Takeover(_)) {
        return Err(RunError::Setup(
            "--device testdev cannot be combined with --restore or a takeover (a snapshot \
             and an exec update do not carry test device memory)"
                .into(),
        ));
    }
    for (i, c) in cfg.testdevs.iter().enumerate() {
        built
            .vm
            .add_testdev(i, *c)
            .map_err(|e| RunError::Setup(e.to_string()))?;
    }
    Ok(built)
}

fn build_vm(cfg: &RunConfig, serial: SerialSink) -> Result<Built, RunError> {
    let vm_config = VmConfig {
        memory: cfg.memory,
        vcpus: cfg.vcpus,
    };
    match &cfg.boot {
        Boot::Kernel { path, append } => {
            let image = std::fs::read(path).map_err(|e| {
                RunError::Setup(format!("cannot read image {}: {e}", path.display()))
            })?;
            let vm = Vm::create(vm_config, serial)?;
            vm.boot(&image, &path.display().to_string(), append)?;
            Ok(Built {
                vm,
                listener: None,
                prepared: None,
            })
        }
        Boot::Restore { path } => {
            let vm = Vm::from_snapshot(path, cfg.memory.backend, cfg.memory.thp, serial)?;
            Ok(Built {
                vm,
                listener: None,
                prepared: None,
            })
        }
        Boot::Takeover(_) => Ok(Built {
            vm: Vm::create(vm_config, serial)?,
            listener: None,
            prepared: None,
        }),
        Boot::Incoming { uri, params } => {
            // Refuse a preparation this machine cannot do before anything is received.
            if let Some(kind) = params.prepare.kind() {
                ferry_memory::prepare::check_feasible(kind, cfg.memory.size)
                    .map_err(|e| RunError::Setup(format!("--prepare: {e}")))?;
            }
            let vm = Vm::create(vm_config, serial)?;
            let listener = Listener::bind(uri).map_err(|e| RunError::Setup(e.to_string()))?;
            // The layout is known now, so preparation starts now: everything it does before
            // the source connects is off the migration's critical path entirely.
            let prepared = start_prepare(
                vm.ram(),
                params.prepare,
                params.prepare_threads,
                params.prepare_nice,
            )
            .map_err(|e| RunError::Setup(e.to_string()))?;
            Ok(Built {
                vm,
                listener: Some(listener),
                prepared,
            })
        }
    }
}

/// How receiving the guest ended.
enum Received {
    /// The guest runs here; after a postcopy, the listener answers its source's late
    /// reconnections while this lives.
    Running(Option<ferry_migrate::recv::LateAnswers>),
    /// The run is over.
    Ended(Result<Outcome, RunError>),
}

/// Receives the guest.
fn receive_guest(
    vmm: &Vmm,
    listener: Listener,
    params: &ReceiveParams,
    prepared: Option<ferry_memory::prepare::PrepareHandle>,
    commands: crossbeam_channel::Receiver<control::Request>,
    on_incoming: impl FnOnce(&ReceiveStats),
) -> Received {
    let progress = match vmm.role() {
        Role::Incoming(e) => e.progress,
        _ => Progress::new(),
    };
    let target = Arc::new(Migratable::new(vmm.vm.clone()));
    let r = receive(target, &listener, params, progress, prepared, commands);
    match r {
        Ok(RecvOutcome::Running(mut stats)) => {
            vmm.set_role(Role::Owner);
            let late = stats.postcopy_ended.take().and_then(|ended| {
                answer_late_resumes(listener, ended, params)
                    .map_err(|e| tracing::warn!("after postcopy: {e}"))
                    .ok()
            });
            on_incoming(&stats);
            Received::Running(late)
        }
        Ok(RecvOutcome::Quit) => {
            drop(listener);
            vmm.set_role(Role::Quitting);
            vmm.close_api(API_DRAIN);
            vmm.vm.shutdown();
            Received::Ended(Ok(Outcome::Quit))
        }
        Err(e) => {
            drop(listener);
            vmm.vm.shutdown();
            Received::Ended(Err(RunError::Incoming(e)))
        }
    }
}

/// Maps the inherited guest memory, loads the handed-over state and runs the guest; on
/// failure, hands the VM back to the previous binary (which returns only if that fails).
fn take_over(vmm: &Vmm, mut inh: crate::update::Inherited) -> Result<(), RunError> {
    use crate::update::{answer, downtime_ms, fall_back, FAIL_ENV};
    let attempt = |inh: &crate::update::Inherited| -> Result<(), String> {
        if std::env::var_os(FAIL_ENV).is_some() && inh.fallback.is_some() {
            return Err(format!("test hook {FAIL_ENV}"));
        }
        let h = &inh.state.header;
        let memory = inh.memory.try_clone().map_err(|e| e.to_string())?;
        vmm.vm
            .ram()
            .adopt(memory, &h.offsets, h.locked)
            .map_err(|e| e.to_string())?;
        let state =
            ferry_state::MachineState::decode(&inh.state.state).map_err(|e| e.to_string())?;
        vmm.vm.restore_state(&state).map_err(|e| e.to_string())
    };
    if let Err(why) = attempt(&inh) {
        inh.settled = true;
        let e = fall_back(&inh, &why);
        answer(
            inh.reply.take(),
            Err(format!("update failed and so did the way back: {e}")),
        );
        return Err(RunError::Setup(e.to_string()));
    }
    inh.settled = true;
    if !inh.state.header.paused {
        vmm.vm.resume();
    }
    let downtime = downtime_ms(&inh.state.header);
    vmm.vm.ram().free_own_memory();
    tracing::info!(
        downtime_ms = downtime,
        "update: this binary runs the VM now"
    );
    let result = match &inh.fell_back {
        // The update failed; this is the previous binary, running the VM again.
        Some(why) => Err(format!(
            "update failed: the new binary could not take the VM over ({why}); the previous \
             binary took it back and runs it (downtime {downtime:.1} ms)"
        )),
        None => Ok(serde_json::json!({
            "pid": std::process::id(),
            "downtime_ms": downtime,
            "binary": std::env::current_exe().ok(),
        })),
    };
    answer(inh.reply.take(), result);
    Ok(())
}

/// Runs a VM until it ends. `on_incoming` is told when the incoming migration finished.
pub fn run(cfg: RunConfig, on_incoming: impl FnOnce(&ReceiveStats)) -> Result<Outcome, RunError> {
    let serial = serial_sink(&cfg.serial)?;
    let Built {
        vm,
        listener,
        prepared,
    } = build(&cfg, serial)?;
    let vm = Arc::new(vm);
    let (tx, rx): (Sender<Event>, Receiver<Event>) = channel();
    let (commander, commands) = control::channel();
    let in_progress = Progress::new();
    let role = match cfg.boot {
        Boot::Incoming { .. } => Role::Incoming(Engine {
            commander,
            progress: in_progress.clone(),
        }),
        _ => Role::Owner,
    };
    let vmm = Arc::new(Vmm {
        vm: vm.clone(),
        events: Mutex::new(tx.clone()),
        incoming: Mutex::new(matches!(role, Role::Incoming(_)).then_some(in_progress)),
        role: Mutex::new(role),
        last_migration: Mutex::new(None),
        api: ApiState::default(),
        serial: cfg.serial.clone(),
        api_socket: cfg.api_socket.clone(),
    });
    let vcpu_tx = Mutex::new(tx);
    vm.start(Arc::new(move |e| {
        let _ = vcpu_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Event::Vcpu(e));
    }))?;
    let serve = |vmm: &Arc<Vmm>| match &cfg.api_socket {
        Some(path) => api::serve(path, vmm.clone())
            .map(Some)
            .map_err(|e| RunError::Setup(e.to_string())),
        None => Ok(None),
    };
    let _api;
    let mut _late = None;
    match cfg.boot {
        Boot::Incoming { ref params, .. } => {
            _api = serve(&vmm)?;
            let Some(listener) = listener else {
                return Err(RunError::Setup("no listener for --incoming".into()));
            };
            match receive_guest(&vmm, listener, params, prepared, commands, on_incoming) {
                Received::Running(late) => _late = late,
                Received::Ended(end) => return end,
            }
        }
        Boot::Takeover(inh) => {
            // The API opens only once the guest runs here: nothing may act in between.
            take_over(&vmm, *inh)?;
            _api = serve(&vmm)?;
        }
        _ => {
            _api = serve(&vmm)?;
            vm.resume();
        }
    }
    let outcome = match rx.recv() {
        Ok(Event::Vcpu(VcpuEvent::Stopped { reason, error, .. })) => {
            Outcome::GuestStopped { reason, error }
        }
        Ok(Event::Quit) | Err(_) => Outcome::Quit,
        Ok(Event::MigratedAway) => Outcome::MigratedAway,
    };
    if matches!(outcome, Outcome::GuestStopped { .. }) {
        // Nothing may resume or migrate a guest that stopped by itself.
        vmm.stop_owning();
    }
    // Let the client that asked (quit, migrate) read its answer before the process ends.
    vmm.close_api(API_DRAIN);
    vm.shutdown();
    if matches!(outcome, Outcome::MigratedAway) {
        let_go_of_memory(&vm);
    }
    Ok(outcome)
}

/// Guest memory taken apart per step once the guest has left: about 0.4 ms of kernel work
/// for a filled piece here, so a vCPU it preempts loses no more than that.
const LET_GO_CHUNK: usize = 8 << 20;

/// Pause between pieces: the CPU goes back to whoever wants it (on a host with no idle
/// CPU, the guest's vCPUs) before the next piece.
const LET_GO_PAUSE: Duration = Duration::from_micros(500);

/// Longest the process spends taking guest memory apart piece by piece (about 7 GiB of
/// filled memory here); the exit takes what is left, at once.
const LET_GO_BUDGET: Duration = Duration::from_secs(1);

/// The guest runs elsewhere now, maybe on this host (a local hand-over, or a destination
/// next door): take its memory apart in small paced pieces instead of leaving it all to
/// the exit, which tears down every page table (and frees private memory) in one go, taking
/// a CPU from that guest for tens of ms per GiB.
fn let_go_of_memory(vm: &Vm) {
    let t = Instant::now();
    let keep_going = || {
        std::thread::sleep(LET_GO_PAUSE);
        t.elapsed() < LET_GO_BUDGET
    };
    match vm.ram().let_go_gradually(LET_GO_CHUNK, keep_going) {
        Ok(()) => tracing::debug!(
            "guest memory taken apart for {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ),
        // Locked memory, for one, is refused; nothing is lost, the exit does it all.
        Err(e) => tracing::debug!("{e}; the exit takes the rest"),
    }
}
