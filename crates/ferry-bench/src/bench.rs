//! The migration benchmarks: rows of configurations (QEMU and Ferry variants) run in
//! turn, repetition after repetition, with the limits measured in the same run.
//!
//! Rows alternate within each repetition (QEMU, Ferry, QEMU variant, Ferry variant, ...)
//! so slow drifts of the machine (the outer host reclaiming memory, other load) hit every
//! row alike rather than one block of runs.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::ferry::{self, FerryConfig, FerryResult, MemoryCheck};
use crate::limits::{self, CpuSample};
use crate::pin::Pinning;
use crate::qemu::{self, QemuConfig, QemuResult};
use crate::stats::{table_row, Summary};

/// What a row runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Variant {
    /// A QEMU migration: configured like Ferry runs by default (`like_ferry`: destination
    /// `-mem-prealloc`, Ferry's downtime limit unless the case sets one, auto-converge), or
    /// out of the box (QEMU's defaults, apart from what the case sets).
    Qemu { like_ferry: bool },
    /// A Ferry migration with these extra destination and `migrate` arguments;
    /// `pause_source` pauses the source guest before migrating (no vCPU then competes for
    /// the CPUs: what the engine alone does against the link).
    Ferry {
        /// Extra destination arguments.
        dest_args: Vec<String>,
        /// Extra `ferry remote migrate` arguments.
        migrate_args: Vec<String>,
        /// Pause the source guest first.
        pause_source: bool,
    },
}

/// One line of a results table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Short stable name (in the JSON output).
    pub key: &'static str,
    /// What the table shows.
    pub label: String,
    /// What it runs.
    pub variant: Variant,
}

impl Row {
    fn qemu(key: &'static str, label: String, like_ferry: bool) -> Row {
        Row {
            key,
            label,
            variant: Variant::Qemu { like_ferry },
        }
    }

    fn ferry(key: &'static str, label: &str, dest_args: &[&str]) -> Row {
        Row {
            key,
            label: label.to_string(),
            variant: Variant::Ferry {
                dest_args: dest_args.iter().map(|s| s.to_string()).collect(),
                migrate_args: Vec::new(),
                pause_source: false,
            },
        }
    }

    fn is_ferry(&self) -> bool {
        matches!(self.variant, Variant::Ferry { .. })
    }
}

/// The rows of `migrate`: QEMU and Ferry alternating, QEMU configured like Ferry first
/// (the like-for-like comparison), then QEMU out of the box; the nice-0 Ferry variant when
/// `nice0` (the caller turns it on for 2 vCPUs, where busy vCPUs starve nice-19 helpers).
pub fn migrate_rows(channels: u32, with_qemu: bool, nice0: bool) -> Vec<Row> {
    let streams = if channels > 1 {
        format!("multifd x{channels}")
    } else {
        "single stream".to_string()
    };
    let mut rows = Vec::new();
    if with_qemu {
        rows.push(Row::qemu(
            "qemu-like-ferry",
            format!("QEMU like Ferry ({streams}, -mem-prealloc, Ferry's limit, auto-converge)"),
            true,
        ));
    }
    rows.push(Row::ferry(
        "ferry",
        "Ferry default (prepare populate, nice 19)",
        &[],
    ));
    if with_qemu {
        rows.push(Row::qemu(
            "qemu",
            format!("QEMU 7.2 out of the box, {streams}"),
            false,
        ));
    }
    rows.push(Row::ferry(
        "ferry-prepare-none",
        "Ferry --prepare none",
        &["--prepare", "none"],
    ));
    if nice0 {
        rows.push(Row::ferry(
            "ferry-nice0",
            "Ferry --prepare-nice 0 (variant)",
            &["--prepare-nice", "0"],
        ));
    }
    let mut paused = Row::ferry(
        "ferry-paused",
        "Ferry, source guest paused (engine vs link; downtime columns not meaningful)",
        &[],
    );
    paused.variant = Variant::Ferry {
        dest_args: Vec::new(),
        migrate_args: Vec::new(),
        pause_source: true,
    };
    rows.push(paused);
    // Page checksums are on by default and cost CPU on both ends; QEMU sends none.
    let mut unsummed = Row::ferry(
        "ferry-no-checksums",
        "Ferry migrate --no-checksums (variant: what the page checksums cost)",
        &[],
    );
    unsummed.variant = Variant::Ferry {
        dest_args: Vec::new(),
        migrate_args: vec!["--no-checksums".into()],
        pause_source: false,
    };
    rows.push(unsummed);
    rows
}

/// The rows of `migrate-prepare`: destination preparation off and on.
pub fn migrate_prepare_rows(nice0: bool) -> Vec<Row> {
    let mut rows = vec![
        Row::ferry(
            "ferry-prepare-none",
            "Ferry --prepare none",
            &["--prepare", "none"],
        ),
        Row::ferry(
            "ferry-populate",
            "Ferry --prepare populate (default threads, nice 19)",
            &["--prepare", "populate"],
        ),
    ];
    if nice0 {
        rows.push(Row::ferry(
            "ferry-populate-nice0",
            "Ferry --prepare populate --prepare-nice 0 (variant)",
            &["--prepare", "populate", "--prepare-nice", "0"],
        ));
    }
    rows
}

/// The case every row migrates, and how.
#[derive(Debug, Clone)]
pub struct Case {
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Hot working set (`ws=`), e.g. `64M`.
    pub ws: String,
    /// Channels (QEMU multifd channels, Ferry data channels).
    pub channels: u32,
    /// Downtime limit for both systems; `None` keeps each one's default.
    pub downtime_limit_ms: Option<u64>,
    /// Guest warm-up after its ready line.
    pub warmup: Duration,
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The workload image.
    pub image: PathBuf,
    /// Thread placement for both systems (`--pin`).
    pub pin: Option<Pinning>,
}

impl Case {
    /// The guest command line, the same for both systems.
    pub fn append(&self) -> String {
        format!("ws={} hb=1 cpus={}", self.ws, self.cpus)
    }

    /// QEMU for this case; `like_ferry` sets what Ferry does by default: destination memory
    /// prepared (`-mem-prealloc`), Ferry's downtime limit (unless the case sets one), and
    /// auto-converge. Both quit the source at completion, as a Ferry source exits.
    fn qemu_config(&self, like_ferry: bool) -> QemuConfig {
        let mut c = QemuConfig::new(&self.image);
        c.binary = self.qemu.clone();
        c.mem_mib = self.mem_mib;
        c.cpus = self.cpus;
        c.append = self.append();
        c.channels = self.channels;
        c.downtime_limit_ms = self.downtime_limit_ms;
        if like_ferry {
            let ferry_limit = ferry_migrate::send::SendParams::default().downtime_limit;
            c.downtime_limit_ms = c.downtime_limit_ms.or(Some(ferry_limit.as_millis() as u64));
            c.auto_converge = true;
        }
        c.dest_prealloc = like_ferry;
        c.pin = self.pin.clone();
        c.warmup = self.warmup;
        c.start_timeout = c.start_timeout.max(Duration::from_secs(180));
        c
    }

    fn ferry_config(&self, dest_args: &[String]) -> FerryConfig {
        let mut c = FerryConfig::new(&self.ferry, &self.image);
        c.mem_mib = self.mem_mib;
        c.cpus = self.cpus;
        c.append = self.append();
        c.channels = self.channels;
        c.downtime_limit_ms = self.downtime_limit_ms;
        c.dest_args = dest_args.to_vec();
        c.pin = self.pin.clone();
        c.warmup = self.warmup;
        c
    }
}

/// One run's result, either system.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// A QEMU run.
    Qemu(Box<QemuResult>),
    /// A Ferry run.
    Ferry(Box<FerryResult>),
}

impl Outcome {
    /// Total time as the system reports it, ms.
    pub fn total_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.total_ms,
            Outcome::Ferry(r) => r.total_ms,
        }
    }
    /// Downtime as the system reports it, ms.
    pub fn downtime_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.downtime_ms,
            Outcome::Ferry(r) => r.downtime_ms,
        }
    }
    /// Longest heartbeat silence across the switchover, ms.
    pub fn guest_downtime_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.guest_downtime_ms,
            Outcome::Ferry(r) => r.guest_downtime_ms,
        }
    }
    /// Last source beat to first destination beat, ms.
    pub fn switchover_gap_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.switchover_gap_ms,
            Outcome::Ferry(r) => r.switchover_gap_ms,
        }
    }
    /// When the longest silence began, ms after `migrate` was sent.
    pub fn guest_gap_start_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.guest_gap_start_ms,
            Outcome::Ferry(r) => r.guest_gap_start_ms,
        }
    }
    /// From `migrate` sent until the bench saw it complete, ms.
    pub fn observed_total_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.observed_total_ms,
            Outcome::Ferry(r) => r.observed_total_ms,
        }
    }
    /// The source guest's heartbeat period during the warm-up, ms.
    pub fn beat_interval_ms(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.beat_interval_ms,
            Outcome::Ferry(r) => r.beat_interval_ms,
        }
    }
    /// Bytes sent.
    pub fn bytes(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.bytes as f64,
            Outcome::Ferry(r) => r.bytes as f64,
        }
    }
    /// Bytes sent over the system's own total time, bytes/s.
    pub fn throughput(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.throughput_bytes_per_s,
            Outcome::Ferry(r) => r.throughput_bytes_per_s,
        }
    }
    /// Precopy passes.
    pub fn passes(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.dirty_sync_count as f64,
            Outcome::Ferry(r) => r.passes as f64,
        }
    }
    /// CPUs kept busy by other processes during the migration.
    pub fn other_cpus(&self) -> f64 {
        match self {
            Outcome::Qemu(r) => r.other_cpus,
            Outcome::Ferry(r) => r.other_cpus,
        }
    }
    /// The Ferry result, if this is one.
    pub fn as_ferry(&self) -> Option<&FerryResult> {
        match self {
            Outcome::Ferry(r) => Some(r),
            Outcome::Qemu(_) => None,
        }
    }
}

/// What is wrong with a QEMU run's guest; empty when it came through intact.
pub fn qemu_problems(r: &QemuResult) -> Vec<String> {
    let mut p = Vec::new();
    let figures = [
        ("total_ms", r.total_ms),
        ("downtime_ms", r.downtime_ms),
        ("switchover_gap_ms", r.switchover_gap_ms),
        ("beat_interval_ms", r.beat_interval_ms),
        ("throughput", r.throughput_bytes_per_s),
    ];
    for (name, v) in figures {
        if !v.is_finite() {
            p.push(format!("QEMU's {name} was not measured"));
        }
    }
    if r.guest_ok() && r.status_lines_after > 0 {
        return p;
    }
    if r.guest_fail_lines > 0 {
        p.push(format!(
            "the guest printed {} FAIL line(s)",
            r.guest_fail_lines
        ));
    }
    if r.dest_status != "running" {
        p.push(format!("destination status is '{}'", r.dest_status));
    }
    if r.heartbeats_after == 0 {
        p.push("no heartbeat from the destination after the migration".into());
    }
    if r.status_lines_after == 0 {
        p.push("no status line from the destination after the migration".into());
    }
    p
}

/// One run in the raw results.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// The row's key.
    pub row: &'static str,
    /// Repetition, from 1.
    pub rep: usize,
    /// What it measured.
    pub result: Outcome,
}

/// Limits measured once per repetition, before its runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    /// memcpy bandwidth, bytes/s, one figure per repetition.
    pub memcpy: Vec<f64>,
    /// Loopback TCP bandwidth with `connections` streams, bytes/s, one per repetition.
    pub tcp: Vec<f64>,
    /// Connections used for `tcp` (the channel count).
    pub connections: u32,
    /// Bytes copied per memcpy.
    pub memcpy_bytes: u64,
    /// Bytes sent per TCP connection.
    pub tcp_bytes_per_connection: u64,
}

/// How the runs go.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The case.
    pub case: Case,
    /// The rows, in the order they run within a repetition.
    pub rows: Vec<Row>,
    /// Repetitions.
    pub reps: usize,
    /// Measure the limits before every repetition.
    pub limits: bool,
}

/// Everything one benchmark run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan it followed.
    pub plan: Plan,
    /// Raw runs in the order they ran.
    pub runs: Vec<RunRecord>,
    /// Limits (empty when not measured).
    pub limits: Limits,
    /// CPUs other processes kept busy in the second before the first run.
    pub load_before: f64,
    /// When the run started, UTC.
    pub started: String,
    /// One verified run per Ferry row: (row key, pages found identical, the destination's
    /// hashing time in ms).
    pub verified: Vec<(&'static str, usize, f64)>,
}

/// CPUs kept busy by other processes over `over`.
pub fn other_load(over: Duration) -> Result<f64> {
    let a = CpuSample::take(&[])?;
    std::thread::sleep(over);
    let b = CpuSample::take(&[])?;
    Ok(b.others_since(&a))
}

/// Runs the plan: every row once per repetition; fails at the first run whose guest did
/// not come through intact (every process of that run is killed by then).
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 || plan.rows.is_empty() {
        bail!("nothing to run: reps and rows must be at least 1");
    }
    let started = utc_now();
    let load_before = other_load(Duration::from_secs(1))?;
    eprintln!(
        "other load before the first run: {load_before:.2} CPUs busy (of {})",
        cpu_count()
    );
    if load_before > 0.2 {
        eprintln!("WARNING: something else is using the CPUs; every figure will be skewed");
    }
    let mut limits = Limits {
        connections: plan.case.channels,
        memcpy_bytes: 256 << 20,
        tcp_bytes_per_connection: 1 << 30,
        ..Limits::default()
    };
    let mut runs = Vec::new();
    for rep in 1..=plan.reps {
        if plan.limits {
            let m = limits::memcpy_bandwidth(limits.memcpy_bytes as usize, 5);
            let t = limits::loopback_tcp_bandwidth(
                plan.case.channels as usize,
                limits.tcp_bytes_per_connection,
            )
            .context("measuring loopback TCP bandwidth")?;
            eprintln!(
                "rep {rep}/{}: limits: memcpy {:.2} GB/s, loopback TCP x{} {:.2} GB/s",
                plan.reps,
                m / 1e9,
                plan.case.channels,
                t / 1e9
            );
            limits.memcpy.push(m);
            limits.tcp.push(t);
        }
        for row in &plan.rows {
            let t0 = Instant::now();
            let result = run_one(&plan.case, row)
                .with_context(|| format!("{} (rep {rep}) failed", row.label))?;
            eprintln!(
                "rep {rep}/{}: {:<48} total {:>7.0} ms, downtime {:>6.1} ms, guest downtime \
                 {:>6.1} ms, {:.2} GB, other load {:.2} CPUs ({:.0} s)",
                plan.reps,
                row.label,
                result.total_ms(),
                result.downtime_ms(),
                result.guest_downtime_ms(),
                result.bytes() / 1e9,
                result.other_cpus(),
                t0.elapsed().as_secs_f64()
            );
            runs.push(RunRecord {
                row: row.key,
                rep,
                result,
            });
        }
    }
    let verified = verify_rows(plan)?;
    Ok(Report {
        plan: plan.clone(),
        runs,
        limits,
        load_before,
        started,
        verified,
    })
}

/// One more run of every Ferry row with every page's digest compared across the two sides;
/// an error naming the pages if any differs. Not timed: the destination hashes its memory
/// while the guest is paused, which would add to the downtime figures.
fn verify_rows(plan: &Plan) -> Result<Vec<(&'static str, usize, f64)>> {
    let mut verified = Vec::new();
    for row in plan.rows.iter().filter(|r| r.is_ferry()) {
        let outcome = run_one_with(&plan.case, row, true)
            .with_context(|| format!("{} (verified run) failed", row.label))?;
        let Some(FerryResult {
            memory: MemoryCheck::Identical { pages, digest_ms },
            ..
        }) = outcome.as_ferry()
        else {
            bail!("{}: the verified run compared no memory", row.label);
        };
        eprintln!(
            "verified: {:<48} all {pages} pages identical on both sides (hashing {digest_ms:.0} ms)",
            row.label
        );
        verified.push((row.key, *pages, *digest_ms));
    }
    Ok(verified)
}

/// One run of `row`, checked: an error if the guest did not come through intact.
fn run_one(case: &Case, row: &Row) -> Result<Outcome> {
    run_one_with(case, row, false)
}

/// [`run_one`], comparing every page's digest across the two sides when `verify`.
fn run_one_with(case: &Case, row: &Row, verify: bool) -> Result<Outcome> {
    let (outcome, problems) = match &row.variant {
        Variant::Qemu { like_ferry } => {
            let r = qemu::run_migration(&case.qemu_config(*like_ferry))?;
            let p = qemu_problems(&r);
            (Outcome::Qemu(Box::new(r)), p)
        }
        Variant::Ferry {
            dest_args,
            migrate_args,
            pause_source,
        } => {
            let mut cfg = case.ferry_config(dest_args);
            cfg.migrate_args.extend(migrate_args.iter().cloned());
            cfg.pause_source = *pause_source;
            cfg.verify = verify;
            let r = ferry::run_migration(&cfg)?;
            let p = r.problems();
            (Outcome::Ferry(Box::new(r)), p)
        }
    };
    if !problems.is_empty() {
        bail!(
            "GUEST CHECK FAILED after the migration: {}\nraw result: {}",
            problems.join("; "),
            serde_json::to_string(&outcome).unwrap_or_default()
        );
    }
    Ok(outcome)
}

impl Report {
    fn runs_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Outcome> + 'a {
        self.runs
            .iter()
            .filter(move |r| r.row == key)
            .map(|r| &r.result)
    }

    /// Summary of `f` over the runs of row `key`.
    pub fn column(&self, key: &str, f: impl Fn(&Outcome) -> f64) -> Summary {
        Summary::of(&self.runs_of(key).map(f).collect::<Vec<_>>())
    }

    fn has_row(&self, key: &str) -> bool {
        self.plan.rows.iter().any(|r| r.key == key)
    }

    fn header(&self, title: &str) -> String {
        let c = &self.plan.case;
        let mut out = String::new();
        let _ = writeln!(out, "{title} ({} UTC)", self.started);
        let _ = writeln!(
            out,
            "case: {} MiB guest, {} vCPU(s), append \"{}\", {} channel(s), downtime limit {}, \
             {} rep(s), warm-up {:.1} s",
            c.mem_mib,
            c.cpus,
            c.append(),
            c.channels,
            c.downtime_limit_ms
                .map_or_else(|| "each system's default".into(), |d| format!("{d} ms")),
            self.plan.reps,
            c.warmup.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "machine: {} CPUs; other load before the first run {:.2} CPUs",
            cpu_count(),
            self.load_before
        );
        let _ = writeln!(out, "ferry: {}", describe_binary(&c.ferry));
        if let Some(p) = &c.pin {
            let _ = writeln!(out, "pinned (both systems alike): {}", p.describe());
        }
        for (key, pages, ms) in &self.verified {
            let _ = writeln!(
                out,
                "memory verified ({key}): one extra run, every page's digest on the source at \
                 the switchover equal to the destination's: all {pages} pages identical \
                 (hashing took {ms:.0} ms inside that run's pause, so it is not timed)"
            );
        }
        out
    }

    fn limits_text(&self) -> String {
        let l = &self.limits;
        if l.tcp.is_empty() {
            return String::new();
        }
        format!(
            "limits (same run, once per rep): memcpy {} MiB: {} GB/s; loopback TCP x{} \
             ({} MiB each): {} GB/s\n",
            l.memcpy_bytes >> 20,
            Summary::of(&l.memcpy).display(1e9, 2),
            l.connections,
            l.tcp_bytes_per_connection >> 20,
            Summary::of(&l.tcp).display(1e9, 2)
        )
    }

    /// The `migrate` report: main table, ratios, throughput against the limit, details.
    pub fn migrate_text(&self) -> String {
        let mut out = self.header("ferry-bench migrate: live migration on loopback, QEMU vs Ferry");
        out += &self.limits_text();
        out += "\nmedian (min-max) over the reps; total and downtime as each system reports \
                them;\nguest downtime = longest heartbeat silence in the merged source + destination serial \
                timelines from `migrate` to 2 s after completion (both sources quit at \
                completion);\nswitchover gap = last source heartbeat to first destination \
                heartbeat\n";
        let widths = [44, 20, 17, 17, 17, 17, 17, 10];
        out += &table_row(
            &[
                "row",
                "total ms",
                "downtime ms",
                "guest downtime ms",
                "switchover gap ms",
                "GB sent",
                "throughput GB/s",
                "other CPUs",
            ],
            &widths,
        );
        out.push('\n');
        for row in &self.plan.rows {
            let k = row.key;
            out += &table_row(
                &[
                    row.label.clone(),
                    self.column(k, Outcome::total_ms).display(1.0, 0),
                    self.column(k, Outcome::downtime_ms).display(1.0, 1),
                    self.column(k, Outcome::guest_downtime_ms).display(1.0, 1),
                    self.column(k, Outcome::switchover_gap_ms).display(1.0, 1),
                    self.column(k, Outcome::bytes).display(1e9, 3),
                    self.column(k, Outcome::throughput).display(1e9, 3),
                    self.column(k, Outcome::other_cpus).display(1.0, 2),
                ],
                &widths,
            );
            out.push('\n');
        }

        let qemu_rows: Vec<&Row> = self.plan.rows.iter().filter(|r| !r.is_ferry()).collect();
        let ferry_rows: Vec<&Row> = self.plan.rows.iter().filter(|r| r.is_ferry()).collect();
        if !qemu_rows.is_empty() {
            out +=
                "\nFerry / QEMU, ratio of medians, QEMU configured like Ferry first (issue 12's \
                    targets against it: total <= 0.6x, guest downtime <= 0.25x)\n";
            for f in &ferry_rows {
                for q in &qemu_rows {
                    let ratio = |g: fn(&Outcome) -> f64| {
                        self.column(f.key, g).median / self.column(q.key, g).median
                    };
                    let _ = writeln!(
                        out,
                        "  {:<44} vs {:<32} total {:.2}x, guest downtime {:.2}x",
                        f.label,
                        q.label,
                        ratio(Outcome::total_ms),
                        ratio(Outcome::guest_downtime_ms)
                    );
                }
            }
        }

        if let Some(tcp) = (!self.limits.tcp.is_empty()).then(|| Summary::of(&self.limits.tcp)) {
            let _ = writeln!(
                out,
                "\nthroughput against loopback TCP x{} ({} GB/s median; target >= 70%, issue 3)",
                self.limits.connections,
                tcp.display(1e9, 2)
            );
            for r in &self.plan.rows {
                let t = self.column(r.key, Outcome::throughput);
                let mut line = format!(
                    "  {:<44} overall {:>5.1}%",
                    r.label,
                    t.median / tcp.median * 100.0
                );
                if r.is_ferry() {
                    let p0 = self.ferry_column(r.key, |f| f.first_pass_throughput_bytes_per_s);
                    let _ = write!(
                        line,
                        ", pass 0 {} GB/s = {:.1}%",
                        p0.display(1e9, 2),
                        p0.median / tcp.median * 100.0
                    );
                }
                out += &line;
                out.push('\n');
            }
        }
        out += &self.ferry_details();
        out
    }

    fn ferry_column(&self, key: &str, f: impl Fn(&FerryResult) -> f64) -> Summary {
        Summary::of(
            &self
                .runs_of(key)
                .filter_map(Outcome::as_ferry)
                .map(f)
                .collect::<Vec<_>>(),
        )
    }

    /// Ferry's own breakdown: passes, preparation, downtime parts (medians).
    fn ferry_details(&self) -> String {
        let mut out = String::from(
            "\nFerry details, median (min-max): passes; destination preparation (ms, threads, \
             ms inside the downtime); downtime parts (ms)\n",
        );
        for r in self.plan.rows.iter().filter(|r| r.is_ferry()) {
            let k = r.key;
            let d = |name: &'static str| {
                self.ferry_column(k, move |f| {
                    f.stats["downtime"][name].as_f64().unwrap_or(f64::NAN)
                })
                .display(1.0, 1)
            };
            let reported = self
                .runs_of(k)
                .filter_map(Outcome::as_ferry)
                .any(|f| f.prepare_reported && f.prepare_threads > 0);
            let prepare = if reported {
                format!(
                    "prepare {} ms on {} threads, {} ms in downtime",
                    self.ferry_column(k, |f| f.prepare_ms).display(1.0, 0),
                    self.ferry_column(k, |f| f.prepare_threads as f64)
                        .display(1.0, 0),
                    self.ferry_column(k, |f| f.prepare_in_downtime_ms)
                        .display(1.0, 1),
                )
            } else {
                "no destination preparation".to_string()
            };
            let _ = writeln!(
                out,
                "  {}: passes {}, max throttle {}%; {prepare}",
                r.label,
                self.ferry_column(k, |f| f.passes as f64).display(1.0, 0),
                self.ferry_column(k, |f| f.max_throttle_percent)
                    .display(1.0, 0),
            );
            let _ = writeln!(
                out,
                "    downtime: final sync {}, final pages {}, state {}, wait loaded {} (dest \
                 load {}), go to running {} (dest resume {})",
                d("final_sync_ms"),
                d("final_pages_ms"),
                d("state_ms"),
                d("wait_loaded_ms"),
                d("dest_load_ms"),
                d("go_to_running_ms"),
                d("dest_resume_ms"),
            );
        }
        if self.has_row("qemu") {
            let _ = writeln!(
                out,
                "QEMU passes (dirty-sync-count): {}",
                self.column("qemu", Outcome::passes).display(1.0, 0)
            );
        }
        out += "\nwhere the longest guest silence began, ms after `migrate` was sent (the \
                switchover is near the observed end; earlier means a stall during precopy)\n";
        for r in &self.plan.rows {
            let exit = if r.is_ferry() {
                format!(
                    ", source process gone at {}",
                    self.ferry_column(r.key, |f| f.source_exit_ms)
                        .display(1.0, 0)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {:<52} silence at {}, observed end {}{exit}; heartbeat period {} ms",
                r.label,
                self.column(r.key, Outcome::guest_gap_start_ms)
                    .display(1.0, 0),
                self.column(r.key, Outcome::observed_total_ms)
                    .display(1.0, 0),
                self.column(r.key, Outcome::beat_interval_ms)
                    .display(1.0, 2),
            );
        }
        out
    }

    /// The `migrate-prepare` report.
    pub fn migrate_prepare_text(&self) -> String {
        let mut out =
            self.header("ferry-bench migrate-prepare: destination memory preparation off and on");
        out += "\nmedian (min-max) over the reps; prepare = destination preparation (its clock); \
                in downtime = the part of it inside the downtime (target: 0)\n";
        let widths = [52, 18, 16, 17, 16, 8, 14, 16, 10];
        out += &table_row(
            &[
                "row",
                "total ms",
                "downtime ms",
                "guest downtime ms",
                "prepare ms",
                "threads",
                "in downtime ms",
                "throughput GB/s",
                "other CPUs",
            ],
            &widths,
        );
        out.push('\n');
        for row in &self.plan.rows {
            let k = row.key;
            let prep = |f: fn(&FerryResult) -> f64| {
                let reported = self
                    .runs_of(k)
                    .filter_map(Outcome::as_ferry)
                    .any(|r| r.prepare_reported && r.prepare_threads > 0);
                if reported {
                    self.ferry_column(k, f).display(1.0, 0)
                } else {
                    "-".to_string()
                }
            };
            out += &table_row(
                &[
                    row.label.clone(),
                    self.column(k, Outcome::total_ms).display(1.0, 0),
                    self.column(k, Outcome::downtime_ms).display(1.0, 1),
                    self.column(k, Outcome::guest_downtime_ms).display(1.0, 1),
                    prep(|f| f.prepare_ms),
                    prep(|f| f.prepare_threads as f64),
                    prep(|f| f.prepare_in_downtime_ms),
                    self.column(k, Outcome::throughput).display(1e9, 3),
                    self.column(k, Outcome::other_cpus).display(1.0, 2),
                ],
                &widths,
            );
            out.push('\n');
        }
        out += &self.ferry_details();
        out
    }

    /// Everything, raw runs included, as one JSON document.
    pub fn to_json(&self, benchmark: &str) -> Value {
        let c = &self.plan.case;
        let rows: Vec<Value> = self
            .plan
            .rows
            .iter()
            .map(|r| {
                let k = r.key;
                let mut v = json!({
                    "key": k,
                    "label": r.label,
                    "total_ms": self.column(k, Outcome::total_ms),
                    "downtime_ms": self.column(k, Outcome::downtime_ms),
                    "guest_downtime_ms": self.column(k, Outcome::guest_downtime_ms),
                    "switchover_gap_ms": self.column(k, Outcome::switchover_gap_ms),
                    "bytes": self.column(k, Outcome::bytes),
                    "throughput_bytes_per_s": self.column(k, Outcome::throughput),
                    "other_cpus": self.column(k, Outcome::other_cpus),
                });
                match &r.variant {
                    Variant::Qemu { like_ferry } => v["like_ferry"] = json!(like_ferry),
                    Variant::Ferry {
                        dest_args,
                        migrate_args,
                        pause_source,
                    } => {
                        v["dest_args"] = json!(dest_args);
                        v["migrate_args"] = json!(migrate_args);
                        v["pause_source"] = json!(pause_source);
                        v["first_pass_throughput_bytes_per_s"] =
                            json!(self.ferry_column(k, |f| f.first_pass_throughput_bytes_per_s));
                        v["prepare_ms"] = json!(self.ferry_column(k, |f| f.prepare_ms));
                        v["prepare_in_downtime_ms"] =
                            json!(self.ferry_column(k, |f| f.prepare_in_downtime_ms));
                    }
                }
                v
            })
            .collect();
        let verified: Vec<Value> = self
            .verified
            .iter()
            .map(|(k, pages, ms)| json!({"row": k, "pages_identical": pages, "digest_ms": ms}))
            .collect();
        json!({
            "benchmark": benchmark,
            "started_utc": self.started,
            "memory_verified": verified,
            "machine": { "cpus": cpu_count() },
            "load_before_cpus": self.load_before,
            "ferry_binary": c.ferry,
            "case": {
                "mem_mib": c.mem_mib,
                "cpus": c.cpus,
                "append": c.append(),
                "channels": c.channels,
                "downtime_limit_ms": c.downtime_limit_ms,
                "warmup_s": c.warmup.as_secs_f64(),
                "reps": self.plan.reps,
                "pin": c.pin,
            },
            "limits": self.limits,
            "rows": rows,
            "runs": self.runs,
        })
    }
}

/// CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// `path (modified N min ago)`, to spot a stale binary.
pub fn describe_binary(path: &std::path::Path) -> String {
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    match age {
        Some(a) => format!(
            "{} (built {:.0} min ago)",
            path.display(),
            a.as_secs_f64() / 60.0
        ),
        None => path.display().to_string(),
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// `YYYY-MM-DD HH:MM` for a Unix time (proleptic Gregorian, UTC).
pub fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01 00:00");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc_from_unix(1_798_761_599), "2026-12-31 23:59");
    }

    #[test]
    fn rows() {
        let r = migrate_rows(2, true, false);
        let keys: Vec<_> = r.iter().map(|r| r.key).collect();
        assert_eq!(
            keys,
            [
                "qemu-like-ferry",
                "ferry",
                "qemu",
                "ferry-prepare-none",
                "ferry-paused",
                "ferry-no-checksums"
            ]
        );
        assert!(r[0].label.contains("multifd x2"));
        assert_eq!(r[0].variant, Variant::Qemu { like_ferry: true });
        assert_eq!(r[2].variant, Variant::Qemu { like_ferry: false });
        let r = migrate_rows(1, false, true);
        let keys: Vec<_> = r.iter().map(|r| r.key).collect();
        assert_eq!(
            keys,
            [
                "ferry",
                "ferry-prepare-none",
                "ferry-nice0",
                "ferry-paused",
                "ferry-no-checksums"
            ]
        );
        assert_eq!(
            r[2].variant,
            Variant::Ferry {
                dest_args: vec!["--prepare-nice".into(), "0".into()],
                migrate_args: Vec::new(),
                pause_source: false,
            }
        );
        assert_eq!(
            r[4].variant,
            Variant::Ferry {
                dest_args: Vec::new(),
                migrate_args: vec!["--no-checksums".into()],
                pause_source: false,
            }
        );
        assert_eq!(migrate_prepare_rows(false).len(), 2);
    }

    fn ferry_run(total: f64, guest: f64) -> Outcome {
        Outcome::Ferry(Box::new(FerryResult {
            system: "ferry",
            total_ms: total,
            guest_downtime_ms: guest,
            bytes: 1_000_000_000,
            throughput_bytes_per_s: 1e9,
            first_pass_throughput_bytes_per_s: 2e9,
            prepare_reported: true,
            prepare_ms: 500.0,
            prepare_threads: 2,
            stats: json!({"downtime": {"final_sync_ms": 0.5}}),
            ..FerryResult::default()
        }))
    }

    #[test]
    fn report_tables_and_json() {
        let case = Case {
            mem_mib: 1024,
            cpus: 1,
            ws: "64M".into(),
            channels: 2,
            downtime_limit_ms: None,
            warmup: Duration::from_secs(2),
            ferry: "/nonexistent/ferry".into(),
            qemu: "qemu-system-x86_64".into(),
            image: "/nonexistent/image".into(),
            pin: None,
        };
        assert_eq!(case.append(), "ws=64M hb=1 cpus=1");
        let plan = Plan {
            case,
            rows: migrate_rows(2, false, false),
            reps: 2,
            limits: true,
        };
        let runs = vec![
            RunRecord {
                row: "ferry",
                rep: 1,
                result: ferry_run(1000.0, 20.0),
            },
            RunRecord {
                row: "ferry",
                rep: 2,
                result: ferry_run(3000.0, 40.0),
            },
            RunRecord {
                row: "ferry-prepare-none",
                rep: 1,
                result: ferry_run(5000.0, 60.0),
            },
        ];
        let report = Report {
            plan,
            runs,
            limits: Limits {
                memcpy: vec![8e9, 10e9],
                tcp: vec![4e9, 4e9],
                connections: 2,
                memcpy_bytes: 256 << 20,
                tcp_bytes_per_connection: 1 << 30,
            },
            load_before: 0.0,
            started: "2026-01-01 00:00".into(),
            verified: vec![("ferry", 262_144, 120.0)],
        };
        let s = report.column("ferry", Outcome::total_ms);
        assert_eq!((s.n, s.median, s.min, s.max), (2, 2000.0, 1000.0, 3000.0));
        let text = report.migrate_text();
        assert!(text.contains("2000 (1000-3000)"), "{text}");
        assert!(text.contains("all 262144 pages identical"), "{text}");
        assert!(text.contains("pass 0 2.00 GB/s = 50.0%"), "{text}");
        assert!(text.contains("overall  25.0%"), "{text}");
        let text = report.migrate_prepare_text();
        assert!(text.contains("500"), "{text}");
        let j = report.to_json("migrate");
        assert_eq!(j["runs"].as_array().unwrap().len(), 3);
        assert_eq!(j["rows"][0]["total_ms"]["median"], 2000.0);
        assert_eq!(j["runs"][0]["result"]["system"], "ferry");
        assert_eq!(j["limits"]["tcp"][0], 4e9);
        assert_eq!(j["memory_verified"][0]["pages_identical"], 262_144);
    }

    #[test]
    fn qemu_checks() {
        let r = qemu_result_ok();
        assert!(qemu_problems(&r).is_empty());
        let mut bad = r.clone();
        bad.dest_status = "paused".into();
        bad.guest_fail_lines = 2;
        assert_eq!(qemu_problems(&bad).len(), 2);
        let mut unmeasured = r.clone();
        unmeasured.switchover_gap_ms = f64::NAN;
        let p = qemu_problems(&unmeasured);
        assert!(p.len() == 1 && p[0].contains("switchover_gap_ms"), "{p:?}");
    }

    fn qemu_result_ok() -> QemuResult {
        QemuResult {
            system: "qemu",
            channels: 2,
            mem_mib: 1024,
            cpus: 1,
            append: String::new(),
            dest_prealloc: false,
            total_ms: 1.0,
            downtime_ms: 1.0,
            setup_ms: 1.0,
            guest_downtime_ms: 1.0,
            guest_gap_start_ms: 1.0,
            switchover_gap_ms: 1.0,
            observed_total_ms: 1.0,
            beat_interval_ms: 1.0,
            bytes: 1,
            ram_total_bytes: 1,
            multifd_bytes: 1,
            normal_pages: 1,
            duplicate_pages: 1,
            dirty_sync_count: 1,
            mbps: 1.0,
            throughput_bytes_per_s: 1.0,
            guest_fail_lines: 0,
            heartbeats_after: 10,
            status_lines_after: 1,
            dest_status: "running".into(),
            other_cpus: 0.0,
            first_pass_ms: f64::NAN,
            sweeps: crate::qemu::Sweeps::default(),
            postcopy_blocktime_ms: f64::NAN,
        }
    }
}
