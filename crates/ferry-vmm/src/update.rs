//! Live update in place (QEMU's cpr-exec): this process execs a new `ferry` binary, which
//! takes the VM over from what it inherits: the guest memory file (mapped again, not
//! copied) and a memfd holding the machine state. The PID, the API socket path and the
//! serial output stay; only the VMM's code changes.
//!
//! Before the guest is paused the new binary is asked whether it speaks this hand-over
//! ([`CHECK_REPLY`]), and the memory must be a shared file (memfd or hugetlb). If `exec`
//! itself fails the guest resumes here. If the new binary fails before resuming the guest,
//! it execs the old binary (kept open as a descriptor) with the same state, which takes the
//! VM back; if that fails too the VM is lost, which is why the check comes first.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_migrate::MigrationSource;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::migration::Migratable;
use crate::owner::Role;
use crate::runner::{SerialConfig, Vmm};

/// What `ferry takeover --check` prints: the hand-over format this binary reads.
pub const CHECK_REPLY: &str = "ferry-takeover 2";
/// The hand-over format this binary writes and reads (2: the machine state follows the
/// header as encoded bytes, no longer as a protocol frame).
const FORMAT: u32 = 2;
/// How long the new binary has to answer the check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Test hook: a new process with this set in its environment fails its first takeover.
pub const FAIL_ENV: &str = "FERRY_TEST_TAKEOVER_FAIL";

/// Why an update could not be done (the guest runs on here in every case).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The guest memory is private to this process.
    #[error(
        "update --exec: this VM's memory is {backend}, private to this process, so a new \
         binary could not map it; start the VM with --memory-backend memfd (or hugetlb)"
    )]
    PrivateMemory {
        /// The backend.
        backend: &'static str,
    },
    /// Test device memory lives in this process and is not passed on.
    #[error(
        "update --exec does not carry test device memory ({devices}); hand the VM over \
         with migrate --local to a new process instead, which streams device state"
    )]
    TestDevices {
        /// The devices.
        devices: String,
    },
    /// The role forbids it (a migration runs, or the VM left).
    #[error("update --exec refused: this process is {role}; it must own a running guest")]
    NotOwner {
        /// The role's name.
        role: &'static str,
    },
    /// The new binary did not answer the check as a compatible ferry would.
    #[error("update --exec: {} is not a ferry that can take this VM over: {why}", exe.display())]
    Incompatible {
        /// The binary.
        exe: PathBuf,
        /// What it did.
        why: String,
    },
    /// A step of the hand-over failed here.
    #[error("update --exec: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Pausing or saving the VM failed.
    #[error("update --exec: {what}: {source}")]
    Vm {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: ferry_migrate::VmError,
    },
    /// The hand-over file is not one this binary reads.
    #[error("takeover: the state handed over is unreadable: {0}")]
    BadState(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> UpdateError {
    move |source| UpdateError::Io { what, source }
}

/// Everything the new process needs besides the machine state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// Format version ([`CHECK_REPLY`]'s number).
    pub format: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Where each memory region starts in the memory file.
    pub offsets: Vec<u64>,
    /// Whether the memory was locked (`mlock`).
    pub locked: bool,
    /// Serial output: `stdout`, `null` or a file path (opened for appending).
    pub serial: String,
    /// The API socket.
    pub api_socket: Option<PathBuf>,
    /// When the guest was paused, µs since the epoch.
    pub paused_at_us: u64,
    /// An operator had paused the guest: it stays paused in the new binary.
    pub paused: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the new process reads: the header, then the machine state.
#[derive(Debug)]
pub struct Handover {
    /// The header.
    pub header: Header,
    /// The machine state ([`ferry_state::MachineState::encode`]).
    pub state: Vec<u8>,
}

impl Handover {
    /// Writes it into a new memfd (one JSON line, then the encoded machine state).
    fn to_memfd(&self) -> Result<File, UpdateError> {
        let fd = ferry_sys::mm::memfd_create(
            "ferry-takeover",
            ferry_sys::mm::MemfdOptions { hugetlb: None },
        )
        .map_err(|e| UpdateError::Io {
            what: "creating the state file",
            source: e.into(),
        })?;
        let mut f = File::from(fd);
        let mut bytes =
            serde_json::to_vec(&self.header).map_err(|e| UpdateError::BadState(e.to_string()))?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&self.state);
        f.write_all(&bytes).map_err(io("writing the state file"))?;
        f.rewind().map_err(io("writing the state file"))?;
        Ok(f)
    }

    /// Reads what the previous binary wrote (one JSON line, then the machine state).
    pub fn read(f: &File) -> Result<Handover, UpdateError> {
        let mut r = BufReader::new(f);
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| UpdateError::BadState(e.to_string()))?;
        let header: Header =
            serde_json::from_str(&line).map_err(|e| UpdateError::BadState(e.to_string()))?;
        if header.format != FORMAT {
            return Err(UpdateError::BadState(format!(
                "format {} (this binary reads {FORMAT})",
                header.format
            )));
        }
        let mut state = Vec::new();
        // The state decoder refuses more than this anyway; reading stops there.
        r.take(ferry_state::MAX_STATE_LEN as u64 + 1)
            .read_to_end(&mut state)
            .map_err(|e| UpdateError::BadState(e.to_string()))?;
        Ok(Handover { header, state })
    }
}

fn serial_name(s: &SerialConfig) -> String {
    match s {
        SerialConfig::Stdout => "stdout".into(),
        SerialConfig::Null => "null".into(),
        SerialConfig::File(p) | SerialConfig::Append(p) => format!("file:{}", p.display()),
    }
}

/// Asks `exe` whether it can take this VM over, without touching the VM.
fn check_binary(exe: &Path) -> Result<(), UpdateError> {
    let incompatible = |why: String| UpdateError::Incompatible {
        exe: exe.to_path_buf(),
        why,
    };
    let mut child = Command::new(exe)
        .args(["takeover", "--check"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| incompatible(format!("cannot run it ({e})")))?;
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| incompatible(e.to_string()))? {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(incompatible("`takeover --check` did not answer".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if !status.success() || out.trim() != CHECK_REPLY {
        return Err(incompatible(format!(
            "`takeover --check` answered {:?} ({status}), expected {CHECK_REPLY:?}",
            out.trim()
        )));
    }
    Ok(())
}

/// Lets `fd` survive `exec` (or not).
fn inherit(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    let flags = if on {
        rustix::io::FdFlags::empty()
    } else {
        rustix::io::FdFlags::CLOEXEC
    };
    rustix::io::fcntl_setfd(fd, flags).map_err(std::io::Error::from)
}

/// Lets every descriptor in `fds` survive `exec`, or none of them.
fn inherit_all(fds: &[BorrowedFd<'_>]) -> Result<(), UpdateError> {
    if let Some(e) = fds.iter().find_map(|fd| inherit(*fd, true).err()) {
        for fd in fds {
            let _ = inherit(*fd, false);
        }
        return Err(io("keeping descriptors across exec")(e));
    }
    Ok(())
}

impl Vmm {
    /// Replaces this process's binary with `exe`, which takes the running VM over; `reply`
    /// is the API connection that asked (the new process answers on it). Returns only if
    /// the update did not happen, with the guest running here as before.
    pub(crate) fn update_exec(&self, exe: &Path, reply: Option<OwnedFd>) -> UpdateError {
        let role = self.role.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*role, Role::Owner) {
            return UpdateError::NotOwner { role: role.name() };
        }
        let ram = self.vm.ram().clone();
        let backend = ram.config().backend;
        let Some((memory, offsets)) = ram.file() else {
            return UpdateError::PrivateMemory {
                backend: backend.name(),
            };
        };
        let devs = self.vm.devices().testdevs();
        if !devs.is_empty() {
            use ferry_migrate::MigrationDevice;
            let names: Vec<&str> = devs.iter().map(|d| d.name()).collect();
            return UpdateError::TestDevices {
                devices: names.join(", "),
            };
        }
        if let Err(e) = check_binary(exe) {
            return e;
        }
        // Exec tears this process's page tables down inside the pause, at a cost that grows
        // with what is mapped (about 45 ms per GiB of a filled guest here): drop them now,
        // while the guest runs; it maps again only what it touches until the pause.
        if let Err(e) = ram.drop_page_tables() {
            tracing::warn!("update: {e}");
        }
        let was_paused = self.vm.is_paused();
        let e = self.pause_and_exec(exe, &memory, offsets, was_paused, reply.as_ref());
        if !was_paused {
            self.vm.resume();
        }
        tracing::warn!("update --exec did not happen; the guest runs on here: {e}");
        drop(role);
        e
    }

    fn pause_and_exec(
        &self,
        exe: &Path,
        memory: &File,
        offsets: Vec<u64>,
        paused: bool,
        reply: Option<&OwnedFd>,
    ) -> UpdateError {
        let paused_at_us = now_us();
        let vm = Migratable::new(self.vm.clone());
        if let Err(source) = vm.pause() {
            return UpdateError::Vm {
                what: "pausing the guest",
                source,
            };
        }
        let state = match self.vm.save_state().and_then(|s| Ok(s.encode()?)) {
            Ok(s) => s,
            Err(e) => {
                return UpdateError::Vm {
                    what: "saving the state",
                    source: ferry_migrate::VmError::new(e),
                }
            }
        };
        let header = Header {
            format: FORMAT,
            memory_bytes: self.vm.ram().size(),
            vcpus: self.vm.config().vcpus,
            offsets,
            locked: ferry_sys::mm::locked_bytes().is_some_and(|b| b >= self.vm.ram().size()),
            serial: serial_name(&self.serial),
            api_socket: self.api_socket.clone(),
            paused_at_us,
            paused,
        };
        let state = match (Handover { header, state }).to_memfd() {
            Ok(f) => f,
            Err(e) => return e,
        };
        let me = match File::open("/proc/self/exe") {
            Ok(f) => f,
            Err(e) => return io("opening this binary for the way back")(e),
        };
        exec_new(exe, memory, &state, &me, reply)
    }
}

/// Execs `exe takeover ...` with the descriptors inherited; returns only on failure.
fn exec_new(
    exe: &Path,
    memory: &File,
    state: &File,
    me: &File,
    reply: Option<&OwnedFd>,
) -> UpdateError {
    let mut fds: Vec<BorrowedFd<'_>> = vec![memory.as_fd(), state.as_fd(), me.as_fd()];
    fds.extend(reply.map(|r| r.as_fd()));
    if let Err(e) = inherit_all(&fds) {
        return e;
    }
    let mut cmd = Command::new(exe);
    cmd.arg("takeover")
        .arg("--memory-fd")
        .arg(memory.as_raw_fd().to_string())
        .arg("--state-fd")
        .arg(state.as_raw_fd().to_string())
        .arg("--fallback-fd")
        .arg(me.as_raw_fd().to_string());
    if let Some(r) = reply {
        cmd.arg("--reply-fd").arg(r.as_raw_fd().to_string());
    }
    tracing::info!(exe = %exe.display(), "update: handing the VM to a new binary");
    let e = cmd.exec();
    for fd in fds {
        let _ = inherit(fd, false);
    }
    io("exec")(e)
}

/// Descriptors a taking-over process inherited.
#[derive(Debug)]
pub struct Inherited {
    /// The guest memory file.
    pub memory: File,
    /// The state file, kept to hand on if this binary falls back.
    pub state_file: File,
    /// The handed-over state.
    pub state: Handover,
    /// The binary to fall back to if this one cannot take over (none on the way back).
    pub fallback: Option<OwnedFd>,
    /// The API connection that asked for the update.
    pub reply: Option<File>,
    /// Set when this is the previous binary taking the VM back: why the new one failed.
    pub fell_back: Option<String>,
    /// The guest runs in this binary now (or the way back was tried): nothing to undo.
    pub settled: bool,
}

impl Drop for Inherited {
    /// Whatever ends this binary's takeover early (an error anywhere, a panic) hands the VM
    /// back to the previous binary rather than lose it.
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            let e = fall_back(self, "the new binary failed before running the guest");
            tracing::error!("{e}");
        }
    }
}

fn claim_err(what: &'static str, fd: RawFd) -> impl FnOnce(std::io::Error) -> UpdateError {
    move |e| UpdateError::BadState(format!("{what} (from {fd}): {e}"))
}

impl Inherited {
    /// Takes the descriptors named on the command line.
    pub fn claim(
        memory: RawFd,
        state: RawFd,
        fallback: Option<RawFd>,
        reply: Option<RawFd>,
        fell_back: Option<String>,
    ) -> Result<Inherited, UpdateError> {
        let mut numbers = vec![memory, state];
        numbers.extend(fallback);
        numbers.extend(reply);
        let mut owned = ferry_sys::fd::claim_inherited_at_startup(&numbers)
            .map_err(claim_err("inherited descriptors", memory))?
            .into_iter();
        let mut next = || {
            owned
                .next()
                .ok_or_else(|| UpdateError::BadState("a descriptor is missing".into()))
        };
        let memory = File::from(next()?);
        let mut state_file = File::from(next()?);
        let fallback = fallback.map(|_| next()).transpose()?;
        let reply = reply.map(|_| next().map(File::from)).transpose()?;
        let state = Handover::read(&state_file)?;
        state_file
            .rewind()
            .map_err(io("rewinding the state file"))?;
        Ok(Inherited {
            memory,
            state_file,
            state,
            fallback,
            reply,
            fell_back,
            settled: false,
        })
    }
}

/// Tells the client that asked for the update how it went, on the inherited connection.
pub fn answer(reply: Option<File>, result: Result<Value, String>) {
    let Some(mut r) = reply else { return };
    let v = match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    let _ = writeln!(r, "{v}");
}

/// The downtime of an update that just resumed the guest, ms.
pub fn downtime_ms(h: &Header) -> f64 {
    now_us().saturating_sub(h.paused_at_us) as f64 / 1e3
}

/// Execs the binary behind `fallback` to take the VM back, with the same state; returns
/// only if that fails.
pub fn fall_back(inh: &Inherited, why: &str) -> UpdateError {
    let Some(fb) = &inh.fallback else {
        return UpdateError::BadState(format!("{why}; no binary to fall back to"));
    };
    tracing::error!("takeover failed ({why}); handing the VM back to the previous binary");
    let mut fds = vec![inh.memory.as_fd(), inh.state_file.as_fd()];
    fds.extend(inh.reply.as_ref().map(|r| r.as_fd()));
    if let Err(e) = inherit_all(&fds) {
        return e;
    }
    let mut cmd = Command::new(format!("/proc/self/fd/{}", fb.as_raw_fd()));
    cmd.arg("takeover")
        .arg("--memory-fd")
        .arg(inh.memory.as_raw_fd().to_string())
        .arg("--state-fd")
        .arg(inh.state_file.as_raw_fd().to_string())
        .arg("--fell-back")
        .arg(why);
    if let Some(r) = &inh.reply {
        cmd.arg("--reply-fd").arg(r.as_raw_fd().to_string());
    }
    io("exec of the previous binary")(cmd.exec())
}
