//! Helpers for the `ferry` end-to-end tests: starting guests through the real binary (and
//! QEMU), reading what the workload guest prints, and the control API.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_guest::GuestLine;
use serde_json::Value;

/// The binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// How long a guest may take to boot, fill its memory or print status lines. Generous:
/// other test binaries run guests at the same time and guest code is slow here.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a command that should end quickly (an error, `ferry remote`) may take.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Every vCPU burns a host CPU: tests that run guests take turns.
static HEAVY: Mutex<()> = Mutex::new(());

/// Held while a test runs guests (a panicking test must not stop the others).
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a `String` argument list.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// What the workload guest printed so far (a serial log file).
pub struct Serial {
    /// Everything, including a possibly incomplete last line.
    pub raw: String,
}

impl Serial {
    /// Reads the log (empty if it does not exist yet).
    pub fn read(path: &Path) -> Serial {
        Serial {
            raw: String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned(),
        }
    }

    /// The complete lines (the last one may still be being written).
    fn complete(&self) -> &str {
        match self.raw.rfind('\n') {
            Some(i) => &self.raw[..i],
            None => "",
        }
    }

    /// The parsed complete lines.
    pub fn lines(&self) -> Vec<GuestLine> {
        self.complete()
            .lines()
            .filter_map(GuestLine::parse)
            .collect()
    }

    /// `sweeps=` of every status line, in order.
    pub fn sweeps(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| match l {
                GuestLine::Status { sweeps, .. } => Some(*sweeps),
                _ => None,
            })
            .collect()
    }

    /// `sweeps=` of the status lines printed after the Ready line.
    pub fn sweeps_after_ready(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .skip_while(|l| !matches!(l, GuestLine::Ready { .. }))
            .filter_map(|l| match l {
                GuestLine::Status { sweeps, .. } => Some(*sweeps),
                _ => None,
            })
            .collect()
    }

    /// The CPU count of the Ready line, if printed.
    pub fn ready(&self) -> Option<u64> {
        self.lines().iter().find_map(|l| match l {
            GuestLine::Ready { cpus } => Some(*cpus),
            _ => None,
        })
    }

    /// Number of `FERRY-GUEST boot` lines.
    pub fn boots(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| matches!(l, GuestLine::Boot { .. }))
            .count()
    }

    /// Every FAIL line, including one still being written.
    pub fn fails(&self) -> Vec<String> {
        self.raw
            .lines()
            .filter(|l| l.contains("FERRY-GUEST FAIL"))
            .map(|l| l.trim_matches('.').to_string())
            .collect()
    }

    /// Total status lines whose `fails=` is not 0.
    pub fn failed_statuses(&self) -> Vec<GuestLine> {
        self.lines()
            .into_iter()
            .filter(|l| matches!(l, GuestLine::Status { fails, .. } if *fails != 0))
            .collect()
    }

    /// Heartbeat dots in total.
    pub fn dots(&self) -> usize {
        self.raw.matches(ferry_guest::HEARTBEAT as char).count()
    }

    /// Heartbeat dots between consecutive status lines printed after the Ready line (one
    /// entry per interval; the partial interval from Ready to the first status line is left
    /// out).
    pub fn dots_per_status_interval(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut ready = false;
        let mut since_status: Option<usize> = None;
        for raw in self.complete().lines() {
            match GuestLine::parse(raw) {
                Some(GuestLine::Ready { .. }) => ready = true,
                Some(GuestLine::Status { .. }) if ready => {
                    if let Some(n) = since_status {
                        out.push(n);
                    }
                    since_status = Some(0);
                }
                _ => {
                    if let Some(n) = since_status.as_mut() {
                        *n += raw.matches(ferry_guest::HEARTBEAT as char).count();
                    }
                }
            }
        }
        out
    }

    /// The log with runs of dots shortened, for failure messages.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for l in self.raw.lines() {
            let t = l.trim_matches('.');
            if t.is_empty() {
                continue;
            }
            out.push_str("    ");
            out.push_str(t);
            out.push('\n');
        }
        let tail: String = self.raw.chars().rev().take(80).collect();
        let tail: String = tail.chars().rev().collect();
        format!(
            "{out}    ({} bytes, {} heartbeat dots; ends with {tail:?})",
            self.raw.len(),
            self.dots()
        )
    }
}

/// A guest process (`ferry run` or QEMU), killed (SIGKILL) when dropped, even on panic.
pub struct Guest {
    pub name: String,
    pub child: Child,
    pub serial: PathBuf,
    pub stderr: PathBuf,
    pub api: Option<PathBuf>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Starts `program args`; stdout goes nowhere, stderr to `<dir>/<name>.err`.
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[String],
        dir: &Path,
        serial: PathBuf,
        api: Option<PathBuf>,
    ) -> Guest {
        let stderr = dir.join(format!("{name}.err"));
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("creating the stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {program}: {e}"));
        Guest {
            name: name.to_string(),
            child,
            serial,
            stderr,
            api,
        }
    }

    /// `ferry run ARGS --serial file:<dir>/<name>.serial [--api-socket <dir>/<name>.sock]`.
    pub fn ferry(name: &str, dir: &Path, run_args: &[String], with_api: bool) -> Guest {
        let serial = dir.join(format!("{name}.serial"));
        let api = with_api.then(|| dir.join(format!("{name}.sock")));
        let mut a = args(&["run"]);
        a.extend(run_args.iter().cloned());
        a.push("--serial".into());
        a.push(format!("file:{}", serial.display()));
        if let Some(api) = &api {
            a.push("--api-socket".into());
            a.push(api.display().to_string());
        }
        Guest::spawn(name, FERRY, &a, dir, serial, api)
    }

    pub fn serial(&self) -> Serial {
        Serial::read(&self.serial)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The API socket (the guest must have been started with one).
    pub fn api(&self) -> &Path {
        self.api.as_deref().expect("started without --api-socket")
    }

    /// Serial output and stderr, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{}: serial output:\n{}\n{} stderr:\n{}",
            self.name,
            self.serial().summary(),
            self.name,
            self.stderr()
        )
    }

    /// Polls until `pred` holds on the serial output; panics on timeout or if the process
    /// ends meanwhile.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Serial) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.serial()) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{}: exited ({st}) while waiting for {what}\n{}",
                    self.name,
                    self.describe()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}\n{}",
                    self.name,
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for the Ready line.
    pub fn wait_ready(&mut self) {
        self.wait_for("the Ready line", GUEST_TIMEOUT, |s| s.ready().is_some());
    }

    /// Waits for `n` more status lines than there are now.
    pub fn wait_status_lines(&mut self, n: usize) {
        let start = self.serial().sweeps().len();
        self.wait_for(&format!("{n} more status lines"), GUEST_TIMEOUT, move |s| {
            s.sweeps().len() >= start + n
        });
    }

    /// Waits for the API socket to accept connections.
    pub fn wait_api(&mut self) {
        let api = self.api().to_path_buf();
        self.wait_for("the API socket", GUEST_TIMEOUT, move |_| {
            UnixStream::connect(&api).is_ok()
        });
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child, timeout) {
            Some(st) => st,
            None => panic!(
                "{}: still running {timeout:?} after it should have exited\n{}",
                self.name,
                self.describe()
            ),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asserts the guest never reported a memory verification failure.
    pub fn assert_no_fails(&self) {
        let s = self.serial();
        assert!(
            s.fails().is_empty() && s.failed_statuses().is_empty(),
            "{}: the guest reported verification failures: {:?}\n{}",
            self.name,
            s.fails(),
            self.describe()
        );
    }

    /// `ferry remote --api-socket <this guest's socket> ARGS`.
    pub fn remote(&self, a: &[&str]) -> Output {
        remote(self.api(), a)
    }

    /// `ferry remote ... ARGS`, which must succeed; its stdout as JSON (Null if empty).
    pub fn remote_ok(&self, a: &[&str]) -> Value {
        let out = self.remote(a);
        assert!(
            out.status.success(),
            "{}: ferry remote {a:?} failed ({}): {}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.describe()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("ferry remote {a:?} printed something that is not JSON ({e}): {text}")
            })
        }
    }

    /// `info` through `ferry remote`.
    pub fn info(&self) -> Value {
        self.remote_ok(&["info"])
    }
}

/// `--kernel IMAGE --append APPEND --memory MEM --vcpus N`.
pub fn kernel_args(image: &Path, append: &str, memory: &str, vcpus: u32) -> Vec<String> {
    vec![
        "--kernel".to_string(),
        image.display().to_string(),
        "--append".into(),
        append.into(),
        "--memory".into(),
        memory.into(),
        "--vcpus".into(),
        vcpus.to_string(),
    ]
}

/// Waits up to `timeout` for a child; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command that should end by itself within [`CMD_TIMEOUT`]; kills it and panics if
/// it does not.
pub fn run_cmd(mut cmd: Command) -> Output {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let status = match wait_timeout(&mut child, CMD_TIMEOUT) {
        Some(st) => st,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not exit within {CMD_TIMEOUT:?}");
        }
    };
    let read = |f: &mut File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut v).expect("read");
        v
    };
    Output {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// `ferry ARGS`, which must end by itself.
pub fn ferry(a: &[&str]) -> Output {
    let mut cmd = Command::new(FERRY);
    cmd.args(a);
    run_cmd(cmd)
}

/// `ferry remote --api-socket SOCK ARGS`.
pub fn remote(sock: &Path, a: &[&str]) -> Output {
    let mut cmd = Command::new(FERRY);
    cmd.arg("remote").arg("--api-socket").arg(sock).args(a);
    run_cmd(cmd)
}

/// Sends one raw line to the API socket and returns the reply line as JSON.
pub fn raw_request(sock: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    s.set_read_timeout(Some(CMD_TIMEOUT)).expect("timeout");
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {reply:?}"))
}

/// Asserts a command failed cleanly: non-zero exit code (not a signal), no panic, and
/// stderr containing every phrase. Returns stderr.
pub fn assert_clean_failure(what: &str, out: &Output, phrases: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| c != 0),
        "{what}: expected a non-zero exit code, got {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{what}: ferry panicked:\n{stderr}"
    );
    for p in phrases {
        assert!(
            stderr.contains(p),
            "{what}: stderr does not say {p:?}:\n{stderr}"
        );
    }
    stderr
}
