//! `local`: handing a running VM to a new process on the same host, without copying its
//! memory, by size. QEMU 7.2 does it with guest RAM in a shared file (`memory-backend-file,
//! share=on`) and the `x-ignore-shared` capability over a unix socket; Ferry with
//! `migrate --local`, passing its memfd over the unix socket. Both run in the same run, on
//! the same guest image, alternating, and every Ferry size is verified once more with page
//! digests (untimed: hashing happens inside the pause).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{qemu_problems, utc_now};
use crate::ferry::{self, FerryConfig, FerryResult, MemoryCheck};
use crate::pin::Pinning;
use crate::qemu::{self, QemuConfig, QemuResult};
use crate::stats::{table_row, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Guest sizes, GiB.
    pub sizes_gib: Vec<u64>,
    /// Repetitions per size and system.
    pub reps: usize,
    /// The guest command line.
    pub append: String,
    /// Seconds the guest runs after its ready line before the hand-over.
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

/// One timed run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Guest size, GiB.
    pub gib: u64,
    /// "qemu" or "ferry".
    pub system: &'static str,
    /// The system's own total time, ms.
    pub total_ms: f64,
    /// The system's own downtime, ms.
    pub downtime_ms: f64,
    /// The guest's longest heartbeat silence, ms.
    pub guest_downtime_ms: f64,
    /// Last source heartbeat to first destination heartbeat, ms.
    pub switchover_gap_ms: f64,
    /// Bytes the migration stream carried.
    pub bytes: u64,
    /// The raw result.
    pub raw: Value,
}

/// Everything a run of the benchmark produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// When it started, UTC.
    pub started: String,
    /// Timed runs in order.
    pub runs: Vec<Run>,
    /// Per size: pages found identical by the verified Ferry run.
    pub verified: Vec<(u64, usize)>,
    /// `update --exec` runs (the exec form: a new binary in the same process).
    pub updates: Vec<ferry::UpdateResult>,
}

fn qemu_run(plan: &Plan, gib: u64) -> Result<Run> {
    let mut c = QemuConfig::new(&plan.image);
    c.binary = plan.qemu.clone();
    c.mem_mib = gib << 10;
    c.append = plan.append.clone();
    c.ignore_shared = true;
    c.pin = plan.pin.clone();
    c.warmup = plan.warmup;
    c.start_timeout = Duration::from_secs(600);
    let r: QemuResult = qemu::run_migration(&c)?;
    let p = qemu_problems(&r);
    if !p.is_empty() {
        bail!(
            "GUEST CHECK FAILED after the QEMU hand-over: {}",
            p.join("; ")
        );
    }
    Ok(Run {
        gib,
        system: "qemu",
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        switchover_gap_ms: r.switchover_gap_ms,
        bytes: r.bytes,
        raw: serde_json::to_value(&r)?,
    })
}

fn ferry_config(plan: &Plan, gib: u64) -> FerryConfig {
    let mut c = FerryConfig::new(&plan.ferry, &plan.image);
    c.mem_mib = gib << 10;
    c.append = plan.append.clone();
    c.local = true;
    c.pin = plan.pin.clone();
    c.warmup = plan.warmup;
    c.start_timeout = Duration::from_secs(600);
    c
}

fn ferry_run(plan: &Plan, gib: u64, verify: bool) -> Result<FerryResult> {
    let mut c = ferry_config(plan, gib);
    c.verify = verify;
    let r = ferry::run_migration(&c)?;
    let p = r.problems();
    if !p.is_empty() {
        bail!(
            "GUEST CHECK FAILED after the Ferry hand-over: {}",
            p.join("; ")
        );
    }
    if r.stats["local"] != Value::Bool(true) || r.pages_data != 0 {
        bail!(
            "Ferry's report does not show a local hand-over: {}",
            r.stats
        );
    }
    Ok(r)
}

fn ferry_timed(plan: &Plan, gib: u64) -> Result<Run> {
    let r = ferry_run(plan, gib, false)?;
    Ok(Run {
        gib,
        system: "ferry",
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        switchover_gap_ms: r.switchover_gap_ms,
        bytes: r.bytes,
        raw: serde_json::to_value(&r)?,
    })
}

/// Runs the plan: per size, QEMU and Ferry alternating `reps` times, then one verified
/// Ferry run. Fails at the first run that goes wrong.
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 || plan.sizes_gib.is_empty() {
        bail!("nothing to run: reps and sizes must be at least 1");
    }
    let started = utc_now();
    let mut runs = Vec::new();
    let mut verified = Vec::new();
    let mut updates = Vec::new();
    for &gib in &plan.sizes_gib {
        for rep in 1..=plan.reps {
            for system in ["qemu", "ferry"] {
                let t = Instant::now();
                let r = match system {
                    "qemu" => qemu_run(plan, gib),
                    _ => ferry_timed(plan, gib),
                }
                .with_context(|| format!("{system} {gib} GiB (rep {rep}) failed"))?;
                eprintln!(
                    "{gib} GiB rep {rep}/{}: {system:<5} total {:>7.1} ms, downtime {:>6.2} ms, \
                     guest downtime {:>6.1} ms, gap {:>6.1} ms ({:.0} s)",
                    plan.reps,
                    r.total_ms,
                    r.downtime_ms,
                    r.guest_downtime_ms,
                    r.switchover_gap_ms,
                    t.elapsed().as_secs_f64()
                );
                runs.push(r);
            }
        }
        for rep in 1..=plan.reps {
            let u = ferry::run_update(&ferry_config(plan, gib))
                .with_context(|| format!("update --exec {gib} GiB (rep {rep}) failed"))?;
            if !u.pid_kept {
                bail!("update --exec {gib} GiB: the VM ended up in another process");
            }
            eprintln!(
                "{gib} GiB rep {rep}/{}: update --exec downtime {:.1} ms, guest downtime {:.1} ms",
                plan.reps, u.downtime_ms, u.guest_downtime_ms
            );
            updates.push(u);
        }
        let r = ferry_run(plan, gib, true)
            .with_context(|| format!("ferry {gib} GiB (verified run) failed"))?;
        let MemoryCheck::Identical { pages, .. } = r.memory else {
            bail!("ferry {gib} GiB: the verified run compared no memory");
        };
        eprintln!("{gib} GiB: verified, all {pages} pages identical on both sides");
        verified.push((gib, pages));
    }
    Ok(Report {
        plan: plan.clone(),
        started,
        runs,
        verified,
        updates,
    })
}

impl Report {
    fn column(&self, gib: u64, system: &str, f: fn(&Run) -> f64) -> Summary {
        Summary::over(&self.runs, |r| r.gib == gib && r.system == system, f)
    }

    /// The tables: figures by size and system, Ferry/QEMU ratios, and size scaling.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench local ({} UTC): a running guest handed to a new process on this host, \
             no page copied\ncase: append \"{}\", {} rep(s), warm-up {:.1} s; QEMU 7.2 \
             x-ignore-shared (memory-backend-file share=on in /dev/shm, unix socket); Ferry \
             migrate --local (memfd over a unix socket, destination --prepare none)\n\
             figures: median (min-max) of the reps, ms",
            self.started,
            self.plan.append,
            self.plan.reps,
            self.plan.warmup.as_secs_f64()
        );
        if let Some(p) = &self.plan.pin {
            let _ = writeln!(out, "pinned (both systems alike): {}", p.describe());
        }
        let header = [
            "GiB",
            "system",
            "total",
            "downtime",
            "guest downtime",
            "gap",
        ];
        let widths = [4, 6, 20, 20, 20, 20];
        let _ = writeln!(out, "{}", table_row(&header.map(String::from), &widths));
        let cols: [fn(&Run) -> f64; 4] = [
            |r| r.total_ms,
            |r| r.downtime_ms,
            |r| r.guest_downtime_ms,
            |r| r.switchover_gap_ms,
        ];
        for &gib in &self.plan.sizes_gib {
            for system in ["qemu", "ferry"] {
                let mut cells = vec![gib.to_string(), system.to_string()];
                cells.extend(
                    cols.iter()
                        .map(|f| self.column(gib, system, *f).display(1.0, 2)),
                );
                let _ = writeln!(out, "{}", table_row(&cells, &widths));
            }
        }
        let _ = writeln!(
            out,
            "\nFerry / QEMU (medians): total, downtime, guest downtime"
        );
        for &gib in &self.plan.sizes_gib {
            let ratio = |f: fn(&Run) -> f64| {
                self.column(gib, "ferry", f).median / self.column(gib, "qemu", f).median
            };
            let _ = writeln!(
                out,
                "  {gib} GiB: {:.2}x, {:.2}x, {:.2}x",
                ratio(cols[0]),
                ratio(cols[1]),
                ratio(cols[2])
            );
        }
        if let (Some(&small), Some(&big)) =
            (self.plan.sizes_gib.first(), self.plan.sizes_gib.last())
        {
            for system in ["qemu", "ferry"] {
                let scale = |f: fn(&Run) -> f64| {
                    self.column(big, system, f).median / self.column(small, system, f).median
                };
                let _ = writeln!(
                    out,
                    "{system} {big} GiB / {small} GiB (medians): total {:.2}x, guest downtime {:.2}x",
                    scale(cols[0]),
                    scale(cols[2])
                );
            }
        }
        let _ = writeln!(
            out,
            "\nFerry update --exec (a new binary in the same process; the VM is rebuilt \
             inside the pause{}): downtime, guest downtime, ms",
            if self.plan.pin.is_some() {
                "; its threads are not pinned"
            } else {
                ""
            }
        );
        for &gib in &self.plan.sizes_gib {
            let of = |f: fn(&ferry::UpdateResult) -> f64| {
                let v: Vec<f64> = self
                    .updates
                    .iter()
                    .filter(|u| u.mem_mib == gib << 10)
                    .map(f)
                    .collect();
                Summary::of(&v).display(1.0, 1)
            };
            let _ = writeln!(
                out,
                "  {gib} GiB: {}, {}",
                of(|u| u.downtime_ms),
                of(|u| u.guest_downtime_ms)
            );
        }
        for (gib, pages) in &self.verified {
            let _ = writeln!(
                out,
                "memory verified ({gib} GiB): one extra Ferry run, all {pages} pages identical \
                 on both sides (digests taken inside that run's pause, so it is not timed)"
            );
        }
        out
    }

    /// Every run and the plan as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "benchmark": "local",
            "started_utc": self.started,
            "sizes_gib": self.plan.sizes_gib,
            "reps": self.plan.reps,
            "append": self.plan.append,
            "pin": self.plan.pin,
            "runs": self.runs,
            "verified": self.verified,
            "updates": self.updates,
        })
    }
}
