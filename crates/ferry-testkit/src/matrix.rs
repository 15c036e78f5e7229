//! The fault matrix: real `ferry` processes, a self-checking guest, and one fault or hostile
//! operation per case at a chosen moment (before, during, or right around the switchover).
//!
//! Every case ends with the same verdict: exactly one copy of the guest runs afterwards
//! (after the operator step a case names, for the hand-overs that are unconfirmed by
//! design), its self-check never failed, the source guest was never paused longer than the
//! switchover timeout plus 1 s unless the hand-over committed, and a failed migration's
//! `migrate` exited non-zero naming the cause.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest::{GuestLine, ImageKind};
use ferry_proto::MessageKind as K;
use ferry_transport::Uri;
use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

use crate::proxy::{Action, Dir, Fault, Proxy, Trigger};
use crate::serial::{longest_gap_at, Recorder};

/// The source's switchover timeout in every case, ms.
pub const SWITCHOVER_MS: u64 = 2000;
/// The source's progress timeout in every case, ms.
pub const PROGRESS_MS: u64 = 3000;
/// The handshake timeout on both sides, ms (generous: on a loaded 2-CPU CI machine a
/// destination has been seen to take over 2 s to answer).
pub const HANDSHAKE_MS: u64 = 4000;
const MEMORY: &str = "64M";

/// Which side should run the guest once a case is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The source kept (or got back) the guest.
    Source,
    /// The destination runs it; the source process exited.
    Destination,
    /// Neither: the operator asked the source to quit, and the destination did not run
    /// the partial copy.
    Neither,
}

/// One case of the matrix.
pub struct Case {
    /// Short name.
    pub name: &'static str,
    /// The fault or operation.
    pub fault: &'static str,
    /// When it happens.
    pub moment: &'static str,
    /// Who runs the guest afterwards.
    pub expect: Expect,
    /// Whether the hand-over commits (`Go` sent), which lifts the pause bound.
    pub commits: bool,
    run: fn(&mut Scene) -> Result<String, String>,
}

/// What a case showed.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Case name.
    pub case: &'static str,
    /// Whether every check held.
    pub passed: bool,
    /// What happened, or what went wrong.
    pub detail: String,
    /// The source guest's longest heartbeat silence from `migrate` to the end, ms.
    pub source_pause_ms: f64,
    /// How long the case took.
    pub secs: f64,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
}

/// A `ferry run` process with its serial output recorded.
pub struct Ferry {
    child: Child,
    api: PathBuf,
    stderr: PathBuf,
    /// Its guest's serial output.
    pub serial: Recorder,
    exit: Option<std::process::ExitStatus>,
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = kill_process(self.pid(), Signal::CONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ferry {
    fn spawn(
        cfg: &Config,
        dir: &Path,
        name: &'static str,
        args: &[String],
    ) -> Result<Ferry, String> {
        let api = dir.join(format!("{name}.sock"));
        let stderr = dir.join(format!("{name}.stderr"));
        let err_file = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let mut child = Command::new(&cfg.ferry)
            .arg("run")
            .args(["--serial", "stdout", "--api-socket"])
            .arg(&api)
            .args(args)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let serial = Recorder::spawn(name, out).map_err(|e| e.to_string())?;
        let mut f = Ferry {
            child,
            api,
            stderr,
            serial,
            exit: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f.api.exists() {
            if Instant::now() > deadline || !f.alive() {
                return Err(format!(
                    "{name} never opened its API socket: {}",
                    f.stderr_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(f)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).unwrap_or(Pid::INIT)
    }

    /// Sends a signal (stop, continue, kill).
    pub fn signal(&self, sig: Signal) {
        let _ = kill_process(self.pid(), sig);
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exit = Some(st);
                false
            }
            _ => true,
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exit
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `ferry remote` on this process.
    pub fn remote(&self, ferry: &Path, args: &[&str]) -> Output {
        remote(ferry, &self.api, args)
    }

    /// `info`, if the process answers.
    pub fn info(&self, ferry: &Path) -> Option<Value> {
        let out = self.remote(ferry, &["info"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn beats_since(&self, t: Instant) -> usize {
        self.serial.beats_between(t, Instant::now())
    }

    /// Whether this process runs the guest: it owns it, it is not paused, and the guest's
    /// heartbeat went on over the last half second.
    fn runs_guest(&mut self, ferry: &Path) -> bool {
        if !self.alive() {
            return false;
        }
        let Some(i) = self.info(ferry) else {
            return false;
        };
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        i["role"] == "owner" && i["state"] == "running" && self.beats_since(t) > 100
    }

    fn fails(&self) -> Vec<String> {
        self.serial
            .lines()
            .into_iter()
            .filter_map(|l| match l.line {
                GuestLine::Fail(f) => Some(f),
                _ => None,
            })
            .collect()
    }
}

fn remote(ferry: &Path, api: &Path, args: &[&str]) -> Output {
    let child = Command::new(ferry)
        .arg("remote")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    match child {
        Ok(c) => wait_output(c, Duration::from_secs(60)),
        Err(e) => failed_output(format!("cannot run ferry remote: {e}")),
    }
}

fn failed_output(msg: String) -> Output {
    use std::os::unix::process::ExitStatusExt;
    Output {
        status: std::process::ExitStatus::from_raw(1 << 8),
        stdout: Vec::new(),
        stderr: msg.into_bytes(),
    }
}

/// Waits for a child's output, killing it after `timeout`.
fn wait_output(mut c: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        match c.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = c.kill();
                break;
            }
        }
    }
    c.wait_with_output()
        .unwrap_or_else(|e| failed_output(format!("waiting for ferry remote: {e}")))
}

/// One case's world: a destination, a source running the guest, and maybe a proxy.
pub struct Scene {
    cfg: Config,
    dir: PathBuf,
    /// The destination process.
    pub dst: Ferry,
    /// The source process.
    pub src: Ferry,
    dst_uri: String,
    proxy: Option<Proxy>,
    started: Option<Instant>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn s(v: &str) -> String {
    v.to_string()
}

impl Scene {
    fn new(cfg: &Config, dir: &Path) -> Result<Scene, String> {
        let image = ferry_guest::write_image(ImageKind::Elf, dir).map_err(|e| e.to_string())?;
        let dst_uri = format!("tcp:127.0.0.1:{}", free_port());
        let dst = Ferry::spawn(
            cfg,
            dir,
            "destination",
            &[
                s("--incoming"),
                dst_uri.clone(),
                s("--memory"),
                s(MEMORY),
                s("--handshake-timeout"),
                HANDSHAKE_MS.to_string(),
            ],
        )?;
        let src = Ferry::spawn(
            cfg,
            dir,
            "source",
            &[
                s("--kernel"),
                image.display().to_string(),
                s("--append"),
                s("ws=4M hb=1 dma=1"),
                s("--memory"),
                s(MEMORY),
            ],
        )?;
        let ready = src.serial.wait_for(
            |l| matches!(l, GuestLine::Ready { .. }),
            Duration::from_secs(60),
        );
        ready.map_err(|e| format!("{e}; source stderr: {}", src.stderr_text()))?;
        src.serial
            .wait_for(
                |l| matches!(l, GuestLine::Status { .. }),
                Duration::from_secs(30),
            )
            .map_err(|e| e.to_string())?;
        Ok(Scene {
            cfg: cfg.clone(),
            dir: dir.to_path_buf(),
            dst,
            src,
            dst_uri,
            proxy: None,
            started: None,
        })
    }

    fn ferry(&self) -> &Path {
        &self.cfg.ferry
    }

    /// Puts a proxy with `faults` in front of the destination; migrations go through it.
    fn through(&mut self, faults: Vec<Fault>) -> Result<(), String> {
        let upstream: Uri = self.dst_uri.parse().map_err(|e| format!("{e}"))?;
        let listen = Uri::Tcp("127.0.0.1:0".into());
        self.proxy = Some(Proxy::start(&listen, upstream, faults).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn target(&self) -> String {
        match &self.proxy {
            Some(p) => p.uri().to_string(),
            None => self.dst_uri.clone(),
        }
    }

    fn migrate_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            s("--api-socket"),
            self.src.api.display().to_string(),
            s("migrate"),
            self.target(),
            s("--channels"),
            s("2"),
            s("--json"),
            s("--switchover-timeout"),
            SWITCHOVER_MS.to_string(),
            s("--progress-timeout"),
            PROGRESS_MS.to_string(),
            s("--handshake-timeout"),
            HANDSHAKE_MS.to_string(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }

    /// Starts `ferry remote migrate` without waiting.
    fn migrate_bg(&mut self, extra: &[&str]) -> Result<Child, String> {
        self.started.get_or_insert_with(Instant::now);
        Command::new(&self.cfg.ferry)
            .arg("remote")
            .args(self.migrate_args(extra))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting migrate: {e}"))
    }

    /// Runs `ferry remote migrate` to the end.
    fn migrate(&mut self, extra: &[&str]) -> Result<Output, String> {
        let c = self.migrate_bg(extra)?;
        Ok(wait_output(c, Duration::from_secs(90)))
    }

    /// A hook that runs `ferry remote ARGS` on the destination (or source) from the proxy.
    fn hook_remote(&self, on_dst: bool, args: &'static [&'static str]) -> Action {
        let api = if on_dst {
            self.dst.api.clone()
        } else {
            self.src.api.clone()
        };
        let ferry = self.cfg.ferry.clone();
        let log = self.dir.join(if on_dst {
            "hook-dst.out"
        } else {
            "hook-src.out"
        });
        Action::Hook(Arc::new(move || {
            let out = remote(&ferry, &api, args);
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
            {
                let _ = writeln!(
                    f,
                    "{} -> {} {}{}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            false
        }))
    }

    fn hook_log(&self, on_dst: bool) -> String {
        let f = if on_dst {
            "hook-dst.out"
        } else {
            "hook-src.out"
        };
        std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
    }

    /// A hook that signals the destination, then (if `then` is set) sends `after` once
    /// `delay` has passed.
    fn hook_signal(&self, sig: Signal, then: Option<(Duration, Signal)>) -> Action {
        let pid = self.dst.pid();
        Action::Hook(Arc::new(move || {
            let _ = kill_process(pid, sig);
            if let Some((d, after)) = then {
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let _ = kill_process(pid, after);
                });
            }
            false
        }))
    }

    fn fired(&self) -> String {
        self.proxy
            .as_ref()
            .map(|p| p.fired().join("; "))
            .unwrap_or_default()
    }
}

/// `migrate` failed, and its error names `words` (one of them).
fn failed_naming(out: &Output, words: &[&str]) -> Result<String, String> {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() {
        return Err(format!(
            "migrate succeeded but should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    if !words.iter().any(|w| err.contains(w)) {
        return Err(format!(
            "migrate's error does not name the cause ({words:?}): {err}"
        ));
    }
    Ok(format!(
        "migrate exited {} with: {}",
        out.status.code().unwrap_or(-1),
        err.trim()
    ))
}

fn succeeded(out: &Output) -> Result<String, String> {
    if !out.status.success() {
        return Err(format!(
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or("no statistics line")?;
    Ok(format!(
        "migrated: total {:.0} ms, downtime {:.1} ms",
        v["total_ms"].as_f64().unwrap_or(0.0),
        v["downtime_ms"].as_f64().unwrap_or(0.0)
    ))
}

/// Each API command, expected to be refused.
fn refused(out: &Output, what: &str) -> Result<(), String> {
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("refused") {
        return Err(format!("{what} was not refused: {} {err}", out.status));
    }
    Ok(())
}

const PAGES_20: Trigger = Trigger::Frame {
    dir: Dir::ToDestination,
    kind: K::Pages,
    nth: 20,
};

/// Every case of the matrix.
pub fn cases() -> Vec<Case> {
    [frozen(), killed(), cut(), peers(), api()]
        .into_iter()
        .flatten()
        .collect()
}

/// A frozen destination (SIGSTOP), thawed at several moments.
fn frozen() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "dest-frozen-briefly",
            fault: "destination SIGSTOP, SIGCONT after 1 s",
            moment: "during precopy",
            expect: Destination,
            commits: true,
            run: |sc| {
                let a = sc.hook_signal(Signal::STOP, Some((Duration::from_secs(1), Signal::CONT)));
                sc.through(vec![Fault {
                    when: PAGES_20,
                    action: a,
                }])?;
                succeeded(&sc.migrate(&[])?)
            },
        },
        Case {
            name: "dest-frozen-long",
            fault: "destination SIGSTOP, SIGCONT after 5 s",
            moment: "during precopy",
            expect: Source,
            commits: false,
            run: |sc| {
                let a = sc.hook_signal(Signal::STOP, Some((Duration::from_secs(5), Signal::CONT)));
                sc.through(vec![Fault {
                    when: PAGES_20,
                    action: a,
                }])?;
                failed_naming(&sc.migrate(&[])?, &["progress"])
            },
        },
        Case {
            name: "dest-frozen-at-complete",
            fault: "destination SIGSTOP, SIGCONT after 4 s",
            moment: "switchover: when Complete reaches it",
            expect: Source,
            commits: false,
            run: dest_frozen_at_complete,
        },
        Case {
            name: "dest-frozen-after-loaded",
            fault: "destination SIGSTOP, SIGCONT after 4 s",
            moment: "switchover: right after it sends Loaded (before Go)",
            expect: Destination,
            commits: true,
            run: |sc| {
                let a = sc.hook_signal(Signal::STOP, Some((Duration::from_secs(4), Signal::CONT)));
                sc.through(vec![Fault {
                    when: Trigger::first(Dir::ToSource, K::Loaded),
                    action: a,
                }])?;
                let r = failed_naming(&sc.migrate(&[])?, &["unconfirmed"])?;
                Ok(format!("{r}; after the thaw the destination ran the guest and the source learned it (late confirmation)"))
            },
        },
    ]
}

/// A destination killed (SIGKILL) at several moments.
fn killed() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "dest-killed-precopy",
            fault: "destination SIGKILL",
            moment: "during precopy",
            expect: Source,
            commits: false,
            run: dest_killed_precopy,
        },
        Case {
            name: "dest-killed-at-complete",
            fault: "destination SIGKILL",
            moment: "switchover: when Complete reaches it",
            expect: Source,
            commits: false,
            run: dest_killed_at_complete,
        },
        Case {
            name: "dest-killed-after-loaded",
            fault: "destination SIGKILL",
            moment: "switchover: right after it sends Loaded (Go then goes nowhere)",
            expect: Source,
            commits: true,
            run: dest_killed_after_loaded,
        },
    ]
}

/// The link cut (every connection closed) at several moments.
fn cut() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "link-cut-handshake",
            fault: "all connections cut",
            moment: "handshake: at Welcome",
            expect: Source,
            commits: false,
            run: |sc| {
                sc.through(vec![Fault {
                    when: Trigger::first(Dir::ToSource, K::Welcome),
                    action: Action::Cut,
                }])?;
                failed_naming(&sc.migrate(&[])?, &["closed", "reset"])
            },
        },
        Case {
            name: "link-cut-precopy",
            fault: "all connections cut",
            moment: "during precopy",
            expect: Source,
            commits: false,
            run: |sc| {
                sc.through(vec![Fault {
                    when: PAGES_20,
                    action: Action::Cut,
                }])?;
                failed_naming(&sc.migrate(&[])?, &["closed", "reset", "Broken pipe"])
            },
        },
        Case {
            name: "link-cut-at-loaded",
            fault: "all connections cut, Loaded lost",
            moment: "switchover: Loaded on its way",
            expect: Source,
            commits: false,
            run: |sc| {
                sc.through(vec![Fault {
                    when: Trigger::first(Dir::ToSource, K::Loaded),
                    action: Action::Cut,
                }])?;
                let r = failed_naming(&sc.migrate(&[])?, &["closed", "reset"])?;
                expect_unconfirmed(sc, &sc.dst, "destination", "incoming")?;
                Ok(format!("{r}; the destination keeps its loaded copy paused (unconfirmed) and never runs it"))
            },
        },
        Case {
            name: "link-cut-at-go",
            fault: "all connections cut, Go lost",
            moment: "switchover: Go on its way",
            expect: Source,
            commits: true,
            run: link_cut_at_go,
        },
        Case {
            name: "link-cut-at-running",
            fault: "all connections cut, Running lost",
            moment: "switchover: Running on its way",
            expect: Destination,
            commits: true,
            run: |sc| {
                sc.through(vec![Fault {
                    when: Trigger::first(Dir::ToSource, K::Running),
                    action: Action::Cut,
                }])?;
                let r = failed_naming(&sc.migrate(&[])?, &["unconfirmed"])?;
                operator(sc, "source", "quit")?;
                Ok(format!("{r}; the destination runs the guest, the source kept it paused; the operator ran 'quit --force' on the source"))
            },
        },
    ]
}

/// Garbage, silent and stray peers, and a corrupted stream.
fn peers() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "garbage-destination",
            fault: "a peer that answers with garbage",
            moment: "handshake",
            expect: Source,
            commits: false,
            run: garbage_destination,
        },
        Case {
            name: "silent-destination",
            fault: "a peer that accepts and never answers",
            moment: "handshake",
            expect: Source,
            commits: false,
            run: silent_destination,
        },
        Case {
            name: "garbage-to-destination",
            fault: "an HTTP request to the destination's port, then a real migration",
            moment: "before",
            expect: Destination,
            commits: true,
            run: garbage_to_destination,
        },
        Case {
            name: "idle-connection-to-destination",
            fault: "a connection that never says anything, held open during a real migration",
            moment: "before and during",
            expect: Destination,
            commits: true,
            run: |sc| {
                let idle = std::net::TcpStream::connect(sc.dst_uri.trim_start_matches("tcp:"))
                    .map_err(|e| e.to_string())?;
                let r = succeeded(&sc.migrate(&[])?)?;
                drop(idle);
                Ok(r)
            },
        },
        Case {
            name: "connection-storm",
            fault: "200 connections (idle, garbage, half Hellos), then a real migration",
            moment: "before",
            expect: Destination,
            commits: true,
            run: connection_storm,
        },
        Case {
            name: "corrupt-device-state",
            fault: "one byte of the first device-state frame flipped",
            moment: "switchover",
            expect: Source,
            commits: false,
            run: |sc| {
                sc.through(vec![Fault {
                    when: Trigger::first(Dir::ToDestination, K::DeviceData),
                    action: Action::Corrupt,
                }])?;
                failed_naming(&sc.migrate(&[])?, &["destination"])
            },
        },
    ]
}

/// Operators using the API on either side during a migration.
fn api() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "quit-destination-precopy",
            fault: "'quit' on the destination",
            moment: "during precopy",
            expect: Source,
            commits: false,
            run: quit_destination_precopy,
        },
        Case {
            name: "quit-destination-switchover",
            fault: "'quit' on the destination",
            moment: "switchover: when Complete reaches it",
            expect: Source,
            commits: false,
            run: quit_destination_switchover,
        },
        Case {
            name: "api-on-destination",
            fault: "'resume', 'pause', 'snapshot' on the destination",
            moment: "during precopy and at Loaded",
            expect: Destination,
            commits: true,
            run: api_on_destination,
        },
        Case {
            name: "api-on-source",
            fault: "'resume', 'pause', 'snapshot' on the source",
            moment: "during precopy and at Complete",
            expect: Destination,
            commits: true,
            run: api_on_source,
        },
        Case {
            name: "quit-source-precopy",
            fault: "'quit' on the source",
            moment: "during precopy",
            expect: Neither,
            commits: false,
            run: quit_source_precopy,
        },
        Case {
            name: "cancel-at-switchover",
            fault: "'migrate-cancel' on the source",
            moment: "switchover: when Complete reaches the destination",
            expect: Source,
            commits: false,
            run: cancel_at_switchover,
        },
        Case {
            name: "migrate-client-killed",
            fault: "the 'ferry remote migrate' client SIGKILLed",
            moment: "during precopy",
            expect: Destination,
            commits: true,
            run: |sc| {
                let mut c = sc.migrate_bg(&["--max-bandwidth", "16M"])?;
                std::thread::sleep(Duration::from_millis(1500));
                let _ = c.kill();
                let _ = c.wait();
                exited(&mut sc.src, "source")?;
                Ok("the migration went on without its client; the source recorded the hand-over and exited by itself".into())
            },
        },
        Case {
            name: "two-migrates",
            fault: "a second 'migrate' while one runs",
            moment: "during precopy",
            expect: Destination,
            commits: true,
            run: |sc| {
                let first = sc.migrate_bg(&["--max-bandwidth", "32M"])?;
                std::thread::sleep(Duration::from_millis(700));
                let second = sc.migrate(&[])?;
                let r2 = failed_naming(&second, &["already running"])?;
                let r1 = succeeded(&wait_output(first, Duration::from_secs(90)))?;
                Ok(format!("second: {r2}; first: {r1}"))
            },
        },
    ]
}

fn dest_frozen_at_complete(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_signal(Signal::STOP, Some((Duration::from_secs(4), Signal::CONT)));
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToDestination, K::Complete),
        action: a,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["switchover timeout", "timed out"])?;
    std::thread::sleep(Duration::from_secs(3));
    Ok(r)
}

fn dest_killed_precopy(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_signal(Signal::KILL, None);
    sc.through(vec![Fault {
        when: PAGES_20,
        action: a,
    }])?;
    failed_naming(
        &sc.migrate(&[])?,
        &["closed", "reset", "Broken pipe", "aborted"],
    )
}

fn dest_killed_at_complete(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_signal(Signal::KILL, None);
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToDestination, K::Complete),
        action: a,
    }])?;
    failed_naming(
        &sc.migrate(&[])?,
        &["closed", "reset", "Broken pipe", "timed out"],
    )
}

fn dest_killed_after_loaded(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_signal(Signal::KILL, None);
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToSource, K::Loaded),
        action: a,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["unconfirmed"])?;
    operator(sc, "source", "resume")?;
    Ok(format!("{r}; both sides held the guest paused (unconfirmed); with the destination dead the operator ran 'resume --force' on the source"))
}

fn link_cut_at_go(sc: &mut Scene) -> Result<String, String> {
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToDestination, K::Go),
        action: Action::Cut,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["unconfirmed"])?;
    expect_paused(sc)?;
    operator(sc, "source", "resume")?;
    Ok(format!("{r}; both sides held the guest paused and said so; the operator ran 'resume --force' on the source and 'quit --force' on the destination"))
}

fn garbage_destination(sc: &mut Scene) -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(&[0xAB; 4096]);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    sc.dst_uri = format!("tcp:{addr}");
    failed_naming(&sc.migrate(&[])?, &["kind", "main channel"])
}

fn silent_destination(sc: &mut Scene) -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sc.dst_uri = format!("tcp:{}", l.local_addr().map_err(|e| e.to_string())?);
    let held = std::thread::spawn(move || l.incoming().take(3).flatten().collect::<Vec<_>>());
    let t = Instant::now();
    let r = failed_naming(&sc.migrate(&[])?, &["timed out"])?;
    drop(held);
    Ok(format!("{r} (after {:.1} s)", t.elapsed().as_secs_f64()))
}

fn garbage_to_destination(sc: &mut Scene) -> Result<String, String> {
    let mut c = std::net::TcpStream::connect(sc.dst_uri.trim_start_matches("tcp:"))
        .map_err(|e| e.to_string())?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let r = succeeded(&sc.migrate(&[])?)?;
    Ok(format!(
        "dropped and logged ({}); then {r}",
        count(&sc.dst.stderr_text(), "dropped a connection")
    ))
}

fn connection_storm(sc: &mut Scene) -> Result<String, String> {
    let addr = sc.dst_uri.trim_start_matches("tcp:").to_string();
    let mut held = Vec::new();
    for i in 0..200u32 {
        if let Ok(mut c) = std::net::TcpStream::connect(&addr) {
            let _ = match i % 3 {
                0 => Ok(()),
                1 => c.write_all(&[0x55; 64]),
                _ => c.write_all(b"\x01\x00\x00\x00\x21\x00\x00\x00FERRY"),
            };
            held.push(c);
        }
    }
    let r = succeeded(&sc.migrate(&[])?)?;
    drop(held);
    Ok(format!(
        "{r}; {} stray connections dropped",
        count(&sc.dst.stderr_text(), "dropped a connection")
    ))
}

fn quit_destination_precopy(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_remote(true, &["quit"]);
    sc.through(vec![Fault {
        when: PAGES_20,
        action: a,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["quit"])?;
    exited(&mut sc.dst, "destination")?;
    Ok(r)
}

fn quit_destination_switchover(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_remote(true, &["quit"]);
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToDestination, K::Complete),
        action: a,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["quit"])?;
    exited(&mut sc.dst, "destination")?;
    Ok(r)
}

fn api_on_destination(sc: &mut Scene) -> Result<String, String> {
    api_refused(sc, true, Trigger::first(Dir::ToSource, K::Loaded))
}

fn api_on_source(sc: &mut Scene) -> Result<String, String> {
    api_refused(sc, false, Trigger::first(Dir::ToDestination, K::Complete))
}

/// `resume`, `pause` and `snapshot` on one side during precopy (the 20th to 22nd `Pages`
/// frames), then `resume` again at `late`: all four refused, the migration unharmed.
fn api_refused(sc: &mut Scene, on_dst: bool, late: Trigger) -> Result<String, String> {
    let pages = |nth| Trigger::Frame {
        dir: Dir::ToDestination,
        kind: K::Pages,
        nth,
    };
    let faults = vec![
        Fault {
            when: pages(20),
            action: sc.hook_remote(on_dst, &["resume"]),
        },
        Fault {
            when: pages(21),
            action: sc.hook_remote(on_dst, &["pause"]),
        },
        Fault {
            when: pages(22),
            action: sc.hook_remote(on_dst, &["snapshot", "/tmp/ferry-matrix-never.snap"]),
        },
        Fault {
            when: late,
            action: sc.hook_remote(on_dst, &["resume"]),
        },
    ];
    sc.through(faults)?;
    let r = succeeded(&sc.migrate(&[])?)?;
    expect_refusals(&sc.hook_log(on_dst), 4)?;
    Ok(format!("all 4 refused; {r}"))
}

fn quit_source_precopy(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_remote(false, &["quit"]);
    sc.through(vec![Fault {
        when: PAGES_20,
        action: a,
    }])?;
    let r = failed_naming(&sc.migrate(&[])?, &["quit", "closed"])?;
    exited(&mut sc.src, "source")?;
    Ok(format!(
        "{r}; the source quit as asked, the destination discarded its partial copy"
    ))
}

fn cancel_at_switchover(sc: &mut Scene) -> Result<String, String> {
    let a = sc.hook_remote(false, &["migrate-cancel"]);
    sc.through(vec![Fault {
        when: Trigger::first(Dir::ToDestination, K::Complete),
        action: a,
    }])?;
    let out = sc.migrate(&[])?;
    // The proxy holds Complete while the cancel runs, so the source is still in
    // its switchover phase (no Loaded yet) and the cancel must win.
    if out.status.success() {
        return Err("the migration completed despite the cancel".into());
    }
    failed_naming(&out, &["cancelled"])
}

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

fn expect_refusals(log: &str, n: usize) -> Result<(), String> {
    let refused = log.lines().filter(|l| l.contains("refused")).count();
    if refused < n {
        return Err(format!("expected {n} refusals, got: {log}"));
    }
    Ok(())
}

fn exited(p: &mut Ferry, name: &str) -> Result<(), String> {
    match p.wait_exit(Duration::from_secs(15)) {
        Some(_) => Ok(()),
        None => {
            let log = p.stderr_text();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the {name} did not exit; its last log lines:\n{}",
                tail.join("\n")
            ))
        }
    }
}

/// Both sides hold the guest paused and say the hand-over is unconfirmed.
fn expect_paused(sc: &Scene) -> Result<(), String> {
    expect_unconfirmed(sc, &sc.src, "source", "migration")?;
    expect_unconfirmed(sc, &sc.dst, "destination", "incoming")
}

/// `p` holds the guest paused and its `info` says the hand-over is unconfirmed.
fn expect_unconfirmed(sc: &Scene, p: &Ferry, name: &str, section: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let i = p
            .info(sc.ferry())
            .ok_or(format!("{name} does not answer"))?;
        if i["state"] == "paused" && i[section]["status"] == "unconfirmed" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{name} is not paused and unconfirmed: {i}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The operator step of an unconfirmed hand-over: `resume --force` or `quit --force` on
/// one side (after checking that the plain command is refused), and the opposite on the
/// other side if it is still there.
fn operator(sc: &mut Scene, side: &str, cmd: &str) -> Result<(), String> {
    let (this, other) = if side == "source" {
        (&sc.src, &sc.dst)
    } else {
        (&sc.dst, &sc.src)
    };
    let plain = this.remote(sc.ferry(), &[cmd]);
    refused(&plain, &format!("'{cmd}' without --force"))?;
    let forced = this.remote(sc.ferry(), &[cmd, "--force"]);
    if !forced.status.success() {
        return Err(format!(
            "'{cmd} --force' failed: {}",
            String::from_utf8_lossy(&forced.stderr)
        ));
    }
    let opposite = if cmd == "resume" { "quit" } else { "resume" };
    let _ = other.remote(sc.ferry(), &[opposite, "--force"]);
    Ok(())
}

/// Runs one case and judges it.
pub fn run_case(cfg: &Config, case: &Case) -> Verdict {
    let t = Instant::now();
    let (passed, detail, pause) = match one(cfg, case) {
        Ok((d, p)) => (true, d, p),
        Err((d, p)) => (false, d, p),
    };
    Verdict {
        case: case.name,
        passed,
        detail,
        source_pause_ms: pause,
        secs: t.elapsed().as_secs_f64(),
    }
}

type Judged = Result<(String, f64), (String, f64)>;

fn one(cfg: &Config, case: &Case) -> Judged {
    let dir =
        std::env::temp_dir().join(format!("ferry-matrix-{}-{}", case.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| (e.to_string(), 0.0))?;
    let r = (|| {
        let mut sc = Scene::new(cfg, &dir).map_err(|e| (e, 0.0))?;
        let what = (case.run)(&mut sc);
        let fired = sc.fired();
        let pause = source_pause(&sc);
        let what = what.map_err(|e| (format!("{e} [faults fired: {fired}]"), pause))?;
        judge(&mut sc, case, pause)
            .map_err(|e| (format!("{e} [after: {what}; faults fired: {fired}]"), pause))?;
        Ok((format!("{what} [faults fired: {fired}]"), pause))
    })();
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

/// The source guest's longest silence from `migrate` until now, ms.
fn source_pause(sc: &Scene) -> f64 {
    let Some(start) = sc.started else { return 0.0 };
    let beats = sc.src.serial.beats();
    let end = beats.last().copied().unwrap_or(start).max(start);
    longest_gap_at(&[&beats], (start, end)).len.as_secs_f64() * 1000.0
}

/// Exactly one copy runs (as the case expects), no self-check failed, the pause bound held.
fn judge(sc: &mut Scene, case: &Case, pause_ms: f64) -> Result<(), String> {
    let ferry = sc.cfg.ferry.clone();
    if case.expect == Expect::Destination {
        exited(&mut sc.src, "source")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let src_runs = sc.src.runs_guest(&ferry);
    let dst_runs = sc.dst.runs_guest(&ferry);
    let want = (
        case.expect == Expect::Source,
        case.expect == Expect::Destination,
    );
    if (src_runs, dst_runs) != want {
        return Err(format!(
            "expected {:?} to run the guest; source runs: {src_runs}, destination runs: {dst_runs}\nsource stderr: {}\ndestination stderr: {}",
            case.expect,
            sc.src.stderr_text(),
            sc.dst.stderr_text()
        ));
    }
    for (name, p) in [("source", &sc.src), ("destination", &sc.dst)] {
        let f = p.fails();
        if !f.is_empty() {
            return Err(format!(
                "the guest's self-check failed on the {name}: {f:?}"
            ));
        }
    }
    let bound = (SWITCHOVER_MS + 1000) as f64;
    if !case.commits && case.expect == Expect::Source && pause_ms > bound {
        return Err(format!(
            "the source guest was paused {pause_ms:.0} ms, over the {bound:.0} ms bound"
        ));
    }
    if case.expect == Expect::Destination && sc.src.alive() {
        return Err("the source still runs after handing the guest over".into());
    }
    Ok(())
}

/// The name of a case's expected runner, for tables.
pub fn expect_name(e: Expect) -> &'static str {
    match e {
        Expect::Source => "source",
        Expect::Destination => "destination",
        Expect::Neither => "neither (source quit)",
    }
}
