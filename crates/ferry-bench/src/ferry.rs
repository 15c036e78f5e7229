//! The Ferry side: one live migration between two local `ferry` processes.
//!
//! The mirror of [`crate::qemu`]: the same multiboot image, the same guest command line,
//! each process's guest serial on its stdout (`--serial stdout`, one unbuffered write per
//! guest byte) read by a [`Recorder`], so heartbeats are timestamped the same way for both
//! systems. The destination is `ferry run --incoming`, the source `ferry run --kernel`,
//! and the migration is `ferry remote migrate --json`, whose one line of statistics is
//! Ferry's own report.
//!
//! Every child (both VMs and every `ferry remote`) is owned by a guard that kills and
//! reaps it on drop, so an error or a panic anywhere leaves no process behind.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_guest::GuestLine;
use serde::Serialize;
use serde_json::Value;

use crate::limits::CpuSample;
use crate::pin::{self, Pinning};
use crate::qemu::{free_port, ChildGuard, WorkDir};
use ferry_testkit::serial::{beat_interval, longest_gap_at, Recorder};

/// Most of a ferry process's stderr kept for error messages; the rest is read and dropped
/// (the completion line is always kept, wherever it comes).
const STDERR_KEEP: usize = 64 * 1024;

/// What the destination prints on stderr when the incoming migration has finished.
pub const COMPLETE_PREFIX: &str = "ferry: incoming migration complete: ";

/// How one Ferry migration is run. [`FerryConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct FerryConfig {
    /// The `ferry` binary.
    pub binary: PathBuf,
    /// The multiboot image (the same file QEMU is given).
    pub image: PathBuf,
    /// Guest memory in MiB (`--memory {N}M`), default 1024.
    pub mem_mib: u64,
    /// vCPUs (`--vcpus`), default 1.
    pub cpus: u32,
    /// The guest command line (`--append`), default `ws=64M hb=1 cpus=1`.
    pub append: String,
    /// Data channels (`--channels`), default 2.
    pub channels: u32,
    /// `--downtime-limit` in ms; `None` keeps Ferry's default (50 ms).
    pub downtime_limit_ms: Option<u64>,
    /// Extra arguments for the destination (`--prepare none`, `--prepare-nice 0`, ...).
    pub dest_args: Vec<String>,
    /// Pause the source guest before migrating (measures the engine without a vCPU
    /// competing for the CPUs).
    pub pause_source: bool,
    /// How long the guest runs after its `ready` line before `migrate` (default 2 s, as
    /// for QEMU), so the working set is hot.
    pub warmup: Duration,
    /// How long the destination is watched after the migration completed (default 2 s).
    pub watch: Duration,
    /// Limit for the API sockets to come up and for the source guest's `ready` line
    /// (default 180 s: a 4 GiB guest fills its memory for several seconds first).
    pub start_timeout: Duration,
    /// Limit for the migration itself (default 300 s); it is cancelled after that.
    pub migrate_timeout: Duration,
    /// A local hand-over (`migrate --local` over a unix socket): the source's memory is a
    /// memfd, the destination prepares nothing (the source's memory replaces its own).
    pub local: bool,
    /// Extra environment of the destination process (tests: `FERRY_TEST_FLIP_BYTE`).
    pub dest_env: Vec<(String, String)>,
    /// Compare every page's digest on both sides (the hashing happens while the guest is
    /// paused, so a verified run's downtime is not a benchmark figure).
    pub verify: bool,
    /// Extra arguments for `ferry remote migrate` (`--tls-dir`, `--compress`, ...).
    pub migrate_args: Vec<String>,
    /// Extra arguments for the source's `ferry run` (`--device ...`).
    pub source_args: Vec<String>,
    /// Run the destination in this network namespace (`ip netns exec`), reached at
    /// `dest_host` ([`crate::netshape::ShapedLink`]).
    pub dest_netns: Option<String>,
    /// The destination's address, default `127.0.0.1`.
    pub dest_host: String,
    /// Thread placement (`--pin`): both processes' vCPU threads are placed as soon as both
    /// answer on their control sockets (the rest start placed, see `pin::confine_bench`).
    pub pin: Option<Pinning>,
}

impl FerryConfig {
    /// The defaults described on each field.
    pub fn new(binary: impl Into<PathBuf>, image: impl Into<PathBuf>) -> FerryConfig {
        FerryConfig {
            binary: binary.into(),
            image: image.into(),
            mem_mib: 1024,
            cpus: 1,
            append: "ws=64M hb=1 cpus=1".to_string(),
            channels: 2,
            downtime_limit_ms: None,
            dest_args: Vec::new(),
            pause_source: false,
            warmup: Duration::from_secs(2),
            watch: Duration::from_secs(2),
            start_timeout: Duration::from_secs(180),
            migrate_timeout: Duration::from_secs(300),
            local: false,
            dest_env: Vec::new(),
            verify: false,
            migrate_args: Vec::new(),
            source_args: Vec::new(),
            dest_netns: None,
            dest_host: "127.0.0.1".to_string(),
            pin: None,
        }
    }
}

/// What one Ferry migration measured. Times are in ms, sizes in bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FerryResult {
    /// Always `"ferry"`.
    pub system: &'static str,
    /// Data channels.
    pub channels: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The guest command line.
    pub append: String,
    /// The destination's extra arguments.
    pub dest_args: Vec<String>,
    /// Ferry's `total_ms`: from `migrate` to the destination running the guest.
    pub total_ms: f64,
    /// Ferry's `downtime_ms`: guest paused on the source until it runs on the destination.
    pub downtime_ms: f64,
    /// Ferry's `setup_ms`.
    pub setup_ms: f64,
    /// Longest heartbeat silence over both processes from `migrate` to the end of the watch.
    pub guest_downtime_ms: f64,
    /// When that silence began, in ms after `migrate` was started.
    pub guest_gap_start_ms: f64,
    /// Last source heartbeat to first destination heartbeat: the switchover's own silence.
    pub switchover_gap_ms: f64,
    /// From starting `ferry remote migrate` until it returned (includes its process start).
    pub observed_total_ms: f64,
    /// Median interval between the source guest's heartbeats during the warm-up: the
    /// resolution of `guest_downtime_ms`.
    pub beat_interval_ms: f64,
    /// Ferry's `bytes` (all channels).
    pub bytes: u64,
    /// Ferry's `ram_bytes`.
    pub ram_bytes: u64,
    /// Ferry's `pages_data`.
    pub pages_data: u64,
    /// Ferry's `pages_zero`.
    pub pages_zero: u64,
    /// Ferry's `passes`.
    pub passes: u64,
    /// Ferry's `throughput` (bytes / total time), bytes/s.
    pub throughput_bytes_per_s: f64,
    /// Ferry's `first_pass_throughput` (pass 0, all of RAM), bytes/s.
    pub first_pass_throughput_bytes_per_s: f64,
    /// Ferry's `dirty_rate` in the last pass, bytes/s.
    pub dirty_rate_bytes_per_s: f64,
    /// Ferry's `max_throttle_percent`.
    pub max_throttle_percent: f64,
    /// Ferry's `converged`.
    pub converged: bool,
    /// Ferry's `prepare.reported`.
    pub prepare_reported: bool,
    /// Ferry's `prepare.prepare_ms` (destination's clock).
    pub prepare_ms: f64,
    /// Ferry's `prepare.threads`.
    pub prepare_threads: u64,
    /// Ferry's `prepare.in_downtime_ms` (target: 0).
    pub prepare_in_downtime_ms: f64,
    /// Ferry's whole statistics line, as printed by `ferry remote migrate --json`.
    pub stats: Value,
    /// The destination's own statistics (its `incoming migration complete` line), or null.
    pub dest_stats: Value,
    /// How the source process ended (it exits 0 by itself after a migration).
    pub source_exit: String,
    /// When the source process was seen gone, ms after `migrate` was started (10 ms
    /// polling). Its exit frees all its guest memory, which costs CPU time on this host.
    pub source_exit_ms: f64,
    /// Whether the destination process was still running at the end of the watch.
    pub dest_running: bool,
    /// `FERRY-GUEST FAIL` lines from either process.
    pub guest_fail_lines: usize,
    /// Destination heartbeats from completion to the end of the watch.
    pub heartbeats_after: usize,
    /// Destination `FERRY-GUEST ok` lines in the same time (the memory self-check goes on).
    pub status_lines_after: usize,
    /// The average number of CPUs that processes other than the two ferry VMs and this one
    /// kept busy during the migration (0 on a quiet machine).
    pub other_cpus: f64,
    /// Verified runs: every page's digest compared across the two sides.
    pub memory: MemoryCheck,
    /// With `mark=1` in the guest's command line: from `migrate` to the end of the guest's
    /// first sweep of its hot set done wholly on the destination, ms (NaN without marks).
    pub first_pass_ms: f64,
    /// The guest's sweep times on the source (warm-up) and first on the destination.
    pub sweeps: crate::qemu::Sweeps,
}

/// What a run's page-digest comparison found.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case", tag = "check")]
pub enum MemoryCheck {
    /// The run was not verified.
    #[default]
    NotChecked,
    /// Every page identical.
    Identical {
        /// Pages compared.
        pages: usize,
        /// The destination's time hashing them, ms (inside its downtime).
        digest_ms: f64,
    },
    /// Pages differ, or the digests could not be compared: the reason, naming pages.
    Failed {
        /// Why.
        reason: String,
    },
}

impl FerryResult {
    /// Copies the figures of `ferry remote migrate --json` into the result; a figure that
    /// is missing (or not a number) is an error naming it, never a silent NaN or 0.
    pub fn fill_from_stats(&mut self, stats: &Value) -> Result<()> {
        let field = |path: &str| {
            path.split('.')
                .try_fold(stats, |v, k| v.get(k))
                .ok_or_else(|| anyhow!("Ferry's statistics have no {path}: {stats}"))
        };
        let num = |path: &str| {
            field(path)?
                .as_f64()
                .ok_or_else(|| anyhow!("Ferry's statistic {path} is not a number: {stats}"))
        };
        let int = |path: &str| {
            field(path)?
                .as_u64()
                .ok_or_else(|| anyhow!("Ferry's statistic {path} is not a count: {stats}"))
        };
        let flag = |path: &str| {
            field(path)?
                .as_bool()
                .ok_or_else(|| anyhow!("Ferry's statistic {path} is not true/false: {stats}"))
        };
        self.total_ms = num("total_ms")?;
        self.downtime_ms = num("downtime_ms")?;
        self.setup_ms = num("setup_ms")?;
        self.bytes = int("bytes")?;
        self.ram_bytes = int("ram_bytes")?;
        self.pages_data = int("pages_data")?;
        self.pages_zero = int("pages_zero")?;
        self.passes = int("passes")?;
        self.throughput_bytes_per_s = num("throughput")?;
        self.first_pass_throughput_bytes_per_s = num("first_pass_throughput")?;
        self.dirty_rate_bytes_per_s = num("dirty_rate")?;
        self.max_throttle_percent = num("max_throttle_percent")?;
        self.converged = flag("converged")?;
        self.prepare_reported = flag("prepare.reported")?;
        self.prepare_ms = num("prepare.prepare_ms")?;
        self.prepare_threads = int("prepare.threads")?;
        self.prepare_in_downtime_ms = num("prepare.in_downtime_ms")?;
        // The downtime's parts, which the details table reads from `stats`.
        for part in DOWNTIME_PARTS {
            num(&format!("downtime.{part}"))?;
        }
        self.stats = stats.clone();
        Ok(())
    }

    /// What is wrong with the guest after the migration; empty when it came through
    /// intact (no FAIL line, the source exited cleanly, the destination runs, heartbeats
    /// and keeps verifying its memory).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.guest_fail_lines > 0 {
            p.push(format!(
                "the guest printed {} FAIL line(s)",
                self.guest_fail_lines
            ));
        }
        if !self.dest_running {
            p.push("the destination process is not running".into());
        }
        if self.heartbeats_after == 0 {
            p.push("no heartbeat from the destination after the migration".into());
        }
        if self.status_lines_after == 0 {
            p.push("no status line from the destination after the migration".into());
        }
        if self.source_exit != "exit status: 0" {
            p.push(format!("the source ended with {}", self.source_exit));
        }
        if !self.switchover_gap_ms.is_finite() || !self.beat_interval_ms.is_finite() {
            p.push(format!(
                "the heartbeats did not give a switchover gap ({}) and a beat interval ({})",
                self.switchover_gap_ms, self.beat_interval_ms
            ));
        }
        if let MemoryCheck::Failed { reason } = &self.memory {
            p.push(format!("MEMORY CHECK FAILED: {reason}"));
        }
        p
    }
}

/// The parts of Ferry's `downtime` statistics (ms).
pub const DOWNTIME_PARTS: [&str; 7] = [
    "final_sync_ms",
    "final_pages_ms",
    "state_ms",
    "wait_loaded_ms",
    "dest_load_ms",
    "go_to_running_ms",
    "dest_resume_ms",
];

/// Compares the two sides' page digests.
fn memory_check(src: &Path, dst: &Path, dest_stats: &Value) -> MemoryCheck {
    match ferry_migrate::digest::compare_files(src, dst) {
        Ok(pages) => MemoryCheck::Identical {
            pages,
            digest_ms: dest_stats["digest_ms"].as_f64().unwrap_or(f64::NAN),
        },
        Err(e) => MemoryCheck::Failed {
            reason: e.to_string(),
        },
    }
}

/// The JSON of the destination's completion line in `stderr`, if there is one.
pub fn parse_complete_line(stderr: &str) -> Option<Value> {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(COMPLETE_PREFIX))
        .and_then(|j| serde_json::from_str(j.trim()).ok())
}

/// The last line of `stdout` that is a JSON object (`ferry remote migrate --json`).
pub fn parse_stats_line(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .ok_or_else(|| anyhow!("no JSON statistics in the output: {}", stdout.trim()))
}

/// Runs one Ferry migration on loopback as described by `cfg`.
pub fn run_migration(cfg: &FerryConfig) -> Result<FerryResult> {
    // Declared first so it is removed last, after both processes are dead.
    let dir = WorkDir::new()?;
    let uri = if cfg.local {
        format!("unix:{}", dir.0.join("mig.sock").display())
    } else {
        format!("tcp:{}:{}", cfg.dest_host, free_port()?)
    };
    let mem = format!("{}M", cfg.mem_mib);
    let cpus = cfg.cpus.to_string();
    let (src_api, dst_api) = (dir.0.join("src.sock"), dir.0.join("dst.sock"));
    let s = |x: &str| x.to_string();

    let mut dst_args = vec![
        s("run"),
        s("--incoming"),
        uri.clone(),
        s("--memory"),
        mem.clone(),
        s("--vcpus"),
        cpus.clone(),
        s("--serial"),
        s("stdout"),
        s("--api-socket"),
        dst_api.display().to_string(),
    ];
    if cfg.local {
        dst_args.extend([s("--prepare"), s("none")]);
    }
    dst_args.extend(cfg.dest_args.iter().cloned());
    let (src_digest, dst_digest) = (dir.0.join("src.digest"), dir.0.join("dst.digest"));
    if cfg.verify {
        dst_args.extend([s("--digest-file"), dst_digest.display().to_string()]);
    }
    let mut src_args = vec![
        s("run"),
        s("--kernel"),
        cfg.image.display().to_string(),
        s("--append"),
        cfg.append.clone(),
        s("--memory"),
        mem,
        s("--vcpus"),
        cpus,
        s("--serial"),
        s("stdout"),
        s("--api-socket"),
        src_api.display().to_string(),
    ];
    if cfg.local {
        src_args.extend([s("--memory-backend"), s("memfd")]);
    }
    src_args.extend(cfg.source_args.iter().cloned());
    // Both start at once, as for QEMU; the destination starts preparing its memory now.
    let (dst_bin, dst_args) = match &cfg.dest_netns {
        // `ip netns exec` execs ferry, so the child's pid is ferry's own.
        Some(ns) => {
            let mut a = vec![s("netns"), s("exec"), ns.clone()];
            a.push(cfg.binary.display().to_string());
            a.extend(dst_args);
            (PathBuf::from("ip"), a)
        }
        None => (cfg.binary.clone(), dst_args),
    };
    let mut dst = FerryProc::spawn(&dst_bin, "dst", &dst_args, &cfg.dest_env, dst_api)?;
    let mut src = FerryProc::spawn(&cfg.binary, "src", &src_args, &[], src_api)?;
    dst.wait_api(cfg.start_timeout)?;
    src.wait_api(cfg.start_timeout)?;
    let pids = [src.child.0.id(), dst.child.0.id()];
    pin::pin_pair(cfg.pin.as_ref(), pids, cfg.cpus, pin::ferry_vcpu)?;
    src.serial
        .wait_for(|l| matches!(l, GuestLine::Ready { .. }), cfg.start_timeout)
        .with_context(|| format!("src: waiting for the guest's ready line{}", src.stderr()))?;
    let warm_from = Instant::now();
    thread::sleep(cfg.warmup);
    src.check_alive()?;
    dst.check_alive()?;
    if cfg.pause_source {
        let out = remote(
            &cfg.binary,
            &src.api,
            &[s("pause")],
            Duration::from_secs(30),
        )?;
        if !out.succeeded() {
            bail!("src: pausing the guest failed: {}", out.status_text());
        }
    }

    let mut args = vec![
        s("migrate"),
        uri,
        s("--channels"),
        cfg.channels.to_string(),
        s("--json"),
    ];
    if let Some(ms) = cfg.downtime_limit_ms {
        args.extend([s("--downtime-limit"), ms.to_string()]);
    }
    if cfg.local {
        args.push(s("--local"));
    }
    args.extend(cfg.migrate_args.iter().cloned());
    if cfg.verify {
        // The destination hashes all of its memory inside the switchover.
        args.extend([
            s("--digest-file"),
            src_digest.display().to_string(),
            s("--switchover-timeout"),
            s("60000"),
        ]);
    }
    let cpu_before = CpuSample::take(&pids)?;
    let t_migrate = Instant::now();
    let out = remote(&cfg.binary, &src.api, &args, cfg.migrate_timeout);
    let t_complete = Instant::now();
    // Before the source is reaped: until then it is a zombie that keeps its CPU times.
    let cpu_after = CpuSample::take(&pids)?;
    let out = out?;
    if out.status.is_none() {
        let cancel = [s("migrate-cancel")];
        let _ = remote(&cfg.binary, &src.api, &cancel, Duration::from_secs(10));
        bail!(
            "Ferry migration did not complete in {:?}{}{}",
            cfg.migrate_timeout,
            src.stderr(),
            dst.stderr()
        );
    }
    if !out.succeeded() {
        // Let the VMs print their last words.
        thread::sleep(Duration::from_millis(200));
        bail!(
            "ferry remote migrate failed ({}): {}{}{}",
            out.status_text(),
            out.stderr.trim(),
            src.stderr(),
            dst.stderr()
        );
    }
    let stats = parse_stats_line(&out.stdout).context("ferry remote migrate --json")?;
    let source_exit = match src.wait_exit(Duration::from_secs(10))? {
        Some(st) => st.to_string(),
        None => "still running 10 s after the migration".to_string(),
    };
    let t_source_exit = Instant::now();

    thread::sleep(cfg.watch);
    let t_end = Instant::now();
    let dest_running = dst.child.0.try_wait()?.is_none();

    let src_beats = src.serial.beats();
    let dst_beats = dst.serial.beats();
    let gap = longest_gap_at(&[&src_beats, &dst_beats], (t_migrate, t_end));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut r = FerryResult {
        system: "ferry",
        channels: cfg.channels,
        mem_mib: cfg.mem_mib,
        cpus: cfg.cpus,
        append: cfg.append.clone(),
        dest_args: cfg.dest_args.clone(),
        guest_downtime_ms: ms(gap.len),
        guest_gap_start_ms: ms(gap.start - t_migrate),
        switchover_gap_ms: match (src_beats.last(), dst_beats.first()) {
            (Some(&last), Some(&first)) if first >= last => ms(first - last),
            _ => f64::NAN,
        },
        observed_total_ms: ms(t_complete - t_migrate),
        beat_interval_ms: beat_interval(&src_beats, warm_from, t_migrate)
            .map(ms)
            .unwrap_or(f64::NAN),
        source_exit,
        source_exit_ms: ms(t_source_exit - t_migrate),
        dest_running,
        guest_fail_lines: src.serial.fail_count() + dst.serial.fail_count(),
        heartbeats_after: dst.serial.beats_between(t_complete, t_end),
        status_lines_after: dst
            .serial
            .lines()
            .iter()
            .filter(|l| l.at >= t_complete && matches!(l.line, GuestLine::Status { .. }))
            .count(),
        other_cpus: cpu_after.others_since(&cpu_before),
        first_pass_ms: crate::qemu::first_pass_ms(&dst.serial.marks(), t_migrate),
        sweeps: crate::qemu::Sweeps::of(
            &src.serial.marks(),
            &dst.serial.marks(),
            warm_from,
            t_migrate,
        ),
        ..FerryResult::default()
    };
    r.fill_from_stats(&stats)?;
    r.dest_stats = dst.complete_line().unwrap_or(Value::Null);
    if cfg.verify {
        r.memory = memory_check(&src_digest, &dst_digest, &r.dest_stats);
    }

    if dest_running {
        let quit = [s("quit")];
        let q = remote(&cfg.binary, &dst.api, &quit, Duration::from_secs(10))?;
        if q.succeeded() {
            // The guard kills it if it does not exit by itself.
            let _ = dst.wait_exit(Duration::from_secs(10));
        }
    }
    Ok(r)
}

/// What one `update --exec` (live update in place) measured, ms.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateResult {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The new binary's own figure: from the pause in the old binary to the guest running
    /// in the new one.
    pub downtime_ms: f64,
    /// From starting `ferry remote update` until it returned.
    pub observed_total_ms: f64,
    /// The guest's longest heartbeat silence from the update until 2 s after it.
    pub guest_downtime_ms: f64,
    /// The PID before and after (the same process).
    pub pid_kept: bool,
}

/// Boots a memfd guest of `cfg.mem_mib`, lets it warm up, and hands it to a new copy of the
/// ferry binary in the same process (`remote update --exec`); the guest must carry on.
pub fn run_update(cfg: &FerryConfig) -> Result<UpdateResult> {
    let dir = WorkDir::new()?;
    let api = dir.0.join("vm.sock");
    let s = |x: &str| x.to_string();
    let args = vec![
        s("run"),
        s("--kernel"),
        cfg.image.display().to_string(),
        s("--append"),
        cfg.append.clone(),
        s("--memory"),
        format!("{}M", cfg.mem_mib),
        s("--memory-backend"),
        s("memfd"),
        s("--serial"),
        s("stdout"),
        s("--api-socket"),
        api.display().to_string(),
    ];
    let mut vm = FerryProc::spawn(&cfg.binary, "vm", &args, &[], api)?;
    vm.wait_api(cfg.start_timeout)?;
    vm.serial
        .wait_for(|l| matches!(l, GuestLine::Ready { .. }), cfg.start_timeout)
        .with_context(|| format!("vm: waiting for the guest's ready line{}", vm.stderr()))?;
    thread::sleep(cfg.warmup);
    let pid = vm.child.0.id();
    let exe = std::fs::canonicalize(&cfg.binary)?;
    let t0 = Instant::now();
    let out = remote(
        &cfg.binary,
        &vm.api,
        &[s("update"), s("--exec"), exe.display().to_string()],
        Duration::from_secs(60),
    )?;
    let t1 = Instant::now();
    if !out.succeeded() {
        bail!(
            "update --exec failed ({}): {}{}",
            out.status_text(),
            out.stderr,
            vm.stderr()
        );
    }
    let reply: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("update's reply: {}", out.stdout))?;
    let fails_before = vm.serial.fail_count();
    thread::sleep(cfg.watch);
    let t_end = Instant::now();
    vm.check_alive()?;
    let beats = vm.serial.beats();
    let gap = longest_gap_at(&[&beats], (t0, t_end));
    if vm.serial.fail_count() > 0 || fails_before > 0 || vm.serial.beats_between(t1, t_end) == 0 {
        bail!("GUEST CHECK FAILED after the update{}", vm.stderr());
    }
    let _ = remote(&cfg.binary, &vm.api, &[s("quit")], Duration::from_secs(10));
    let _ = vm.wait_exit(Duration::from_secs(10));
    Ok(UpdateResult {
        mem_mib: cfg.mem_mib,
        downtime_ms: reply["downtime_ms"]
            .as_f64()
            .ok_or_else(|| anyhow!("update's reply has no downtime_ms: {reply}"))?,
        observed_total_ms: (t1 - t0).as_secs_f64() * 1e3,
        guest_downtime_ms: gap.len.as_secs_f64() * 1e3,
        pid_kept: reply["pid"].as_u64() == Some(u64::from(pid)),
    })
}

/// What a `ferry remote` command printed, and how it ended (`None`: timed out, killed).
#[derive(Debug)]
struct RemoteOutput {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl RemoteOutput {
    fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn status_text(&self) -> String {
        self.status
            .map_or_else(|| "timed out".to_string(), |s| s.to_string())
    }
}

/// Runs `ferry remote --api-socket API ARGS...`, killing it after `timeout`.
fn remote(binary: &Path, api: &Path, args: &[String], timeout: Duration) -> Result<RemoteOutput> {
    let mut cmd = Command::new(binary);
    cmd.env("NO_COLOR", "1")
        .arg("remote")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::new(
        cmd.spawn()
            .with_context(|| format!("starting {} remote", binary.display()))?,
    );
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .0
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .0
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.0.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    // On timeout the guard kills the child, which closes the pipes.
    drop(child);
    let join = |h: thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok(RemoteOutput {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

/// A ferry process's stderr: the first [`STDERR_KEEP`] bytes, and the completion line.
#[derive(Debug, Default)]
struct StderrLog {
    kept: String,
    complete: Option<String>,
}

/// One `ferry run` child with its serial recorder; the child is killed and reaped on drop.
struct FerryProc {
    name: &'static str,
    child: ChildGuard,
    api: PathBuf,
    serial: Recorder,
    stderr: Arc<Mutex<StderrLog>>,
}

impl FerryProc {
    fn spawn(
        binary: &Path,
        name: &'static str,
        args: &[String],
        env: &[(String, String)],
        api: PathBuf,
    ) -> Result<Self> {
        let mut cmd = Command::new(binary);
        // Plain text in the stderr we quote in error messages.
        cmd.env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(
            cmd.spawn()
                .with_context(|| format!("starting {}", binary.display()))?,
        );
        // From here on the guard owns the child, so every early return kills it.
        let stdout = child
            .0
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let stderr_pipe = child
            .0
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let serial = Recorder::spawn(name, stdout)?;
        let stderr = Arc::new(Mutex::new(StderrLog::default()));
        let theirs = Arc::clone(&stderr);
        thread::Builder::new()
            .name(format!("stderr-{name}"))
            .spawn(move || {
                use std::io::BufRead;
                // Keep reading after the cap so the child never blocks on a full pipe.
                for line in std::io::BufReader::new(stderr_pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut log = theirs.lock().unwrap_or_else(|e| e.into_inner());
                    if line.starts_with(COMPLETE_PREFIX) {
                        log.complete = Some(line.clone());
                    }
                    if log.kept.len() + line.len() < STDERR_KEEP {
                        log.kept.push_str(&line);
                        log.kept.push('\n');
                    }
                }
            })?;
        Ok(FerryProc {
            name,
            child,
            api,
            serial,
            stderr,
        })
    }

    /// The stderr kept so far, formatted to append to an error message.
    fn stderr(&self) -> String {
        let log = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let text = log.kept.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!("\n{} ferry stderr:\n{text}", self.name)
        }
    }

    /// The destination's statistics line, parsed.
    fn complete_line(&self) -> Option<Value> {
        let log = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        log.complete.as_deref().and_then(parse_complete_line)
    }

    /// Fails if the child has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.0.try_wait()? {
            // Give the stderr thread a moment to collect the last words.
            thread::sleep(Duration::from_millis(50));
            bail!("{} ferry exited with {status}{}", self.name, self.stderr());
        }
        Ok(())
    }

    /// Waits until the API socket accepts connections (the destination binds its
    /// migration listener before it, so it is then listening too).
    fn wait_api(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            match UnixStream::connect(&self.api) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "{}: API socket not up after {timeout:?}{}",
                            self.name,
                            self.stderr()
                        )
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Waits up to `timeout` for the child to exit; `None` if it still runs.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.0.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_stats() -> Value {
        json!({
            "status": "completed", "total_ms": 1234.5, "setup_ms": 3.25, "downtime_ms": 12.5,
            "downtime": {"final_sync_ms": 0.5, "final_pages_ms": 1.0, "state_ms": 0.25,
                         "wait_loaded_ms": 2.0, "dest_load_ms": 1.5, "go_to_running_ms": 3.0,
                         "dest_resume_ms": 0.5},
            "bytes": 1_100_000_000u64, "pages_data": 250_000, "pages_zero": 12,
            "passes": 4, "dirty_rate": 300_000_000u64, "throughput": 900_000_000u64,
            "first_pass_throughput": 1_500_000_000u64, "channels": 2,
            "max_throttle_percent": 20, "expected_downtime_ms": 9.0, "converged": true,
            "prepare": {"reported": true, "prepare_ms": 800.0, "threads": 2,
                        "in_downtime_ms": 0.0},
            "ram_bytes": 1_073_741_824u64
        })
    }

    #[test]
    fn fills_from_stats() {
        let mut r = FerryResult::default();
        r.fill_from_stats(&sample_stats()).unwrap();
        assert_eq!(r.total_ms, 1234.5);
        assert_eq!(r.downtime_ms, 12.5);
        assert_eq!(r.bytes, 1_100_000_000);
        assert_eq!(r.passes, 4);
        assert_eq!(r.first_pass_throughput_bytes_per_s, 1.5e9);
        assert_eq!(r.max_throttle_percent, 20.0);
        assert!(r.converged && r.prepare_reported);
        assert_eq!((r.prepare_ms, r.prepare_threads), (800.0, 2));
        assert_eq!(r.prepare_in_downtime_ms, 0.0);
        assert_eq!(r.stats["downtime"]["dest_load_ms"], 1.5);
        // A missing or malformed figure fails the run, naming it.
        let mut r = FerryResult::default();
        let e = r.fill_from_stats(&json!({"bytes": 5})).unwrap_err();
        assert!(e.to_string().contains("no total_ms"), "{e}");
        let mut broken = sample_stats();
        broken["prepare"]["threads"] = json!("two");
        let e = r.fill_from_stats(&broken).unwrap_err();
        assert!(
            e.to_string().contains("prepare.threads is not a count"),
            "{e}"
        );
    }

    #[test]
    fn parses_output_lines() {
        let stdout = format!("noise\n{}\n\n", sample_stats());
        assert_eq!(parse_stats_line(&stdout).unwrap()["passes"], 4);
        assert!(parse_stats_line("no json here\n[1, 2]\n").is_err());
        let stderr = format!("WARN something\n{COMPLETE_PREFIX}{{\"load_us\": 7}}\nferry: quit\n");
        assert_eq!(parse_complete_line(&stderr).unwrap()["load_us"], 7);
        assert!(parse_complete_line("ferry: quit\n").is_none());
    }

    #[test]
    fn problems_are_listed() {
        let ok = FerryResult {
            dest_running: true,
            switchover_gap_ms: 2.0,
            beat_interval_ms: 1.0,
            heartbeats_after: 100,
            status_lines_after: 2,
            source_exit: "exit status: 0".into(),
            ..FerryResult::default()
        };
        assert!(ok.problems().is_empty());
        let bad = FerryResult {
            guest_fail_lines: 1,
            heartbeats_after: 0,
            source_exit: "signal: 9 (SIGKILL)".into(),
            ..ok.clone()
        };
        let p = bad.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("FAIL"));
        let wrong_page = FerryResult {
            memory: MemoryCheck::Failed {
                reason: "1 of 4 pages differ: page at guest address 0x3000".into(),
            },
            ..ok.clone()
        };
        let p = wrong_page.problems();
        assert!(
            p.len() == 1 && p[0].contains("MEMORY CHECK FAILED") && p[0].contains("0x3000"),
            "{p:?}"
        );
    }

    /// The `ferry` binary cargo built beside this test (`cargo test --workspace` builds it).
    pub(crate) fn built_ferry() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap();
        let ferry = dir.join("ferry");
        assert!(
            ferry.exists(),
            "{} is missing: build it first (cargo build -p ferry-cli), or run the whole \
             workspace's tests",
            ferry.display()
        );
        ferry
    }

    #[test]
    fn a_verified_run_compares_every_page_and_names_a_broken_one() {
        let _heavy = crate::qemu::tests::heavy();
        let dir = WorkDir::new().unwrap();
        let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0).unwrap();
        let mut cfg = FerryConfig::new(built_ferry(), &image);
        cfg.mem_mib = 128;
        cfg.append = "ws=8M hb=1 cpus=1".into();
        cfg.warmup = Duration::from_millis(500);
        cfg.watch = Duration::from_secs(1);
        cfg.verify = true;
        let r = run_migration(&cfg).unwrap();
        assert!(r.problems().is_empty(), "{:?}", r.problems());
        assert!(
            matches!(r.memory, MemoryCheck::Identical { pages: 32768, .. }),
            "{:?}",
            r.memory
        );
        // A byte flipped in the destination's memory after every page arrived.
        cfg.dest_env = vec![("FERRY_TEST_FLIP_BYTE".into(), "0x6000123".into())];
        let r = run_migration(&cfg).unwrap();
        let p = r.problems().join("; ");
        assert!(
            p.contains("MEMORY CHECK FAILED: 1 of 32768 pages differ")
                && p.contains("page at guest address 0x6000000"),
            "{p}"
        );
    }
}
