//! `devices`: downtime against the number of devices and their state size, devices saved
//! and loaded side by side (Ferry's default) against one after another on one thread (the
//! shape of QEMU before 10.0), in the same run, alternating; and a 64-vCPU VM's vCPU state
//! saved and loaded the same two ways.
//!
//! The devices are Ferry's test devices (`--device testdev,mem=SIZE,load-ms=N,precopy=0`):
//! stand-ins for VFIO devices without pre-copy support, whose whole state moves inside the
//! downtime and whose load on the destination costs `load-ms` (firmware). The guest writes
//! and checks their memory through MMIO (`tdev=`); each device checks the half it writes
//! itself; a run whose guest or device reports a failure fails the benchmark.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::utc_now;
use crate::ferry::{self, FerryConfig};
use crate::stats::{table_row, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Device counts.
    pub counts: Vec<usize>,
    /// Device memory (its stop-copy state), MiB.
    pub sizes_mib: Vec<u64>,
    /// Each device's load on the destination, ms.
    pub load_ms: u32,
    /// vCPUs of the big-VM rows (0: none).
    pub big_vcpus: u32,
    /// Repetitions of every configuration and mode.
    pub reps: usize,
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The workload image.
    pub image: PathBuf,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Test devices (0 for the big-VM rows).
    pub devices: usize,
    /// Their memory, MiB.
    pub mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Saved and loaded side by side.
    pub parallel: bool,
    /// Ferry's reported downtime, ms.
    pub downtime_ms: f64,
    /// Source: pause (after the final sync) to the last device stream handed to its
    /// channel (device saves and their transfer into the socket buffers), ms.
    pub save_ms: f64,
    /// Destination: first device load to last device loaded (its own clock), ms.
    pub load_ms: f64,
    /// The guest's longest heartbeat silence, ms.
    pub guest_downtime_ms: f64,
    /// Bytes of device streams.
    pub device_bytes: u64,
    /// The raw result.
    pub raw: Value,
}

/// Everything the benchmark produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// When it started, UTC.
    pub started: String,
    /// Runs in order.
    pub runs: Vec<Run>,
}

const MEM_MIB: u64 = 256;

/// A Ferry migration of a 256 MiB guest with `count` test devices of `mib` each (or, when
/// `count` is 0, a VM with `vcpus` vCPUs of which 2 run).
fn one(plan: &Plan, count: usize, mib: u64, vcpus: u32, parallel: bool) -> Result<Run> {
    let mut c = FerryConfig::new(&plan.ferry, &plan.image);
    c.mem_mib = MEM_MIB;
    c.cpus = vcpus;
    let active = if vcpus > 2 { " active=2" } else { "" };
    c.append = format!("ws=8M hb=1 cpus={vcpus}{active} tdev={}", count.min(16));
    c.warmup = Duration::from_secs(1);
    c.watch = Duration::from_secs(1);
    // The device state is the point: a limit that does not make the engine throttle the
    // guest to fit it, and a pause long enough for serial loading of the largest case.
    c.downtime_limit_ms = Some(5000);
    c.migrate_args = vec!["--switchover-timeout".into(), "20000".into()];
    if !parallel {
        c.migrate_args.push("--serial-devices".into());
    }
    for _ in 0..count {
        c.source_args.push("--device".into());
        c.source_args.push(format!(
            "testdev,mem={mib}M,load-ms={},precopy=0",
            plan.load_ms
        ));
    }
    let r = ferry::run_migration(&c)?;
    let p = r.problems();
    if !p.is_empty() {
        bail!("GUEST CHECK FAILED after the migration: {}", p.join("; "));
    }
    let d = &r.stats["downtime"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        devices: count,
        mib,
        vcpus,
        parallel,
        downtime_ms: r.downtime_ms,
        save_ms: f(&d["state_ms"]),
        load_ms: f(&d["dest_load_ms"]),
        guest_downtime_ms: r.guest_downtime_ms,
        device_bytes: r.stats["device_bytes"].as_u64().unwrap_or(0),
        raw: serde_json::to_value(&r)?,
    })
}

/// The configurations: (devices, MiB each, vCPUs).
fn configs(plan: &Plan) -> Vec<(usize, u64, u32)> {
    let mut out = Vec::new();
    for &mib in &plan.sizes_mib {
        for &n in &plan.counts {
            out.push((n, mib, 1));
        }
    }
    if plan.big_vcpus > 0 {
        out.push((0, 0, plan.big_vcpus));
    }
    out
}

/// Runs the plan: every configuration parallel and serial alternating, `reps` times.
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 || (plan.counts.is_empty() && plan.big_vcpus == 0) {
        bail!("nothing to run: reps and counts (or --big-vcpus) must be at least 1");
    }
    if plan.counts.iter().any(|&n| n == 0 || n > 16) {
        bail!("device counts must be 1 to 16");
    }
    let started = utc_now();
    let mut runs = Vec::new();
    for (n, mib, vcpus) in configs(plan) {
        for rep in 1..=plan.reps {
            for parallel in [true, false] {
                let t = Instant::now();
                let mode = if parallel { "parallel" } else { "serial" };
                let r = one(plan, n, mib, vcpus, parallel).with_context(|| {
                    format!("{n} device(s) of {mib} MiB, {vcpus} vCPU(s), {mode} (rep {rep})")
                })?;
                eprintln!(
                    "{n} x {mib} MiB, {vcpus} vCPU(s), {mode:<8} rep {rep}/{}: downtime \
                     {:>7.1} ms (save {:>6.1}, load {:>6.1}), guest {:>7.1} ms ({:.0} s)",
                    plan.reps,
                    r.downtime_ms,
                    r.save_ms,
                    r.load_ms,
                    r.guest_downtime_ms,
                    t.elapsed().as_secs_f64()
                );
                runs.push(r);
            }
        }
    }
    Ok(Report {
        plan: plan.clone(),
        started,
        runs,
    })
}

impl Report {
    fn column(&self, key: (usize, u64, u32, bool), f: fn(&Run) -> f64) -> Summary {
        Summary::over(
            &self.runs,
            |r| (r.devices, r.mib, r.vcpus, r.parallel) == key,
            f,
        )
    }

    /// The table: per configuration and mode, downtime and its device parts.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench devices ({} UTC): {MEM_MIB} MiB guest, test devices without pre-copy \
             (their whole memory moves in the pause), load-ms={} each; parallel = one thread \
             per device on both sides, serial = one after another on one thread\nfigures: \
             median (min-max) of {} rep(s), ms",
            self.started, self.plan.load_ms, self.plan.reps
        );
        let header = [
            "devices", "MiB", "vCPUs", "mode", "downtime", "save", "load", "guest",
        ];
        let widths = [7, 4, 5, 8, 20, 20, 20, 20];
        let _ = writeln!(out, "{}", table_row(&header.map(String::from), &widths));
        let cols: [fn(&Run) -> f64; 4] = [
            |r| r.downtime_ms,
            |r| r.save_ms,
            |r| r.load_ms,
            |r| r.guest_downtime_ms,
        ];
        for (n, mib, vcpus) in configs(&self.plan) {
            for parallel in [true, false] {
                let key = (n, mib, vcpus, parallel);
                let mut cells = vec![
                    n.to_string(),
                    mib.to_string(),
                    vcpus.to_string(),
                    (if parallel { "parallel" } else { "serial" }).to_string(),
                ];
                cells.extend(cols.iter().map(|f| self.column(key, *f).display(1.0, 1)));
                let _ = writeln!(out, "{}", table_row(&cells, &widths));
            }
        }
        let _ = writeln!(out, "\nserial / parallel (medians): downtime, load");
        for (n, mib, vcpus) in configs(&self.plan) {
            let ratio = |f: fn(&Run) -> f64| {
                self.column((n, mib, vcpus, false), f).median
                    / self.column((n, mib, vcpus, true), f).median
            };
            let _ = writeln!(
                out,
                "  {n} x {mib} MiB, {vcpus} vCPU(s): {:.2}x, {:.2}x",
                ratio(cols[0]),
                ratio(cols[2])
            );
        }
        out
    }

    /// Every run and the plan as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "benchmark": "devices",
            "started_utc": self.started,
            "counts": self.plan.counts,
            "sizes_mib": self.plan.sizes_mib,
            "load_ms": self.plan.load_ms,
            "big_vcpus": self.plan.big_vcpus,
            "reps": self.plan.reps,
            "runs": self.runs,
        })
    }
}
