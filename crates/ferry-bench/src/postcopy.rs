//! `postcopy`: the guest switched to the destination at once and pulling the pages it
//! lacks, QEMU 7.2 (`postcopy-ram`, and with `postcopy-preempt`) against Ferry
//! (`migrate --postcopy`), same image, same run, alternating. Measured: total time, the time
//! until the guest's first sweep of its hot set done wholly on the destination (sweep marks,
//! `mark=1`), the guest's longest heartbeat silence, and Ferry's fault latency against the
//! physical floor measured in the same run: one loopback round trip carrying a page, plus
//! one page copy.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{qemu_problems, utc_now};
use crate::dirtylog::HugeReservation;
use crate::ferry::{self, FerryConfig};
use crate::qemu::{self, QemuConfig};
use crate::stats::{median, table_row, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Repetitions per configuration.
    pub reps: usize,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Hot working set (`ws=`).
    pub ws: String,
    /// vCPU counts to run.
    pub vcpus: Vec<u32>,
    /// Ferry's data channels.
    pub channels: u32,
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The workload image.
    pub image: PathBuf,
    /// Which of [`SYSTEMS`] to run.
    pub systems: Vec<String>,
    /// Extra arguments for Ferry's `migrate`.
    pub migrate_args: Vec<String>,
}

/// The systems, in the order they run: QEMU, QEMU with postcopy-preempt, Ferry into
/// anonymous destination memory, Ferry into memfd destination memory (MINOR faults, the
/// file's prepared pages kept), Ferry into hugetlb destination memory (2 MiB pages, each
/// mapped whole; the run reserves the huge pages, which needs root).
pub const SYSTEMS: [&str; 5] = [
    "qemu",
    "qemu-preempt",
    "ferry",
    "ferry-memfd",
    "ferry-hugetlb",
];
/// Ferry's systems (the rows compared with QEMU's).
const FERRY_SYSTEMS: [&str; 3] = ["ferry", "ferry-memfd", "ferry-hugetlb"];

/// One timed run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// vCPUs.
    pub vcpus: u32,
    /// One of [`SYSTEMS`].
    pub system: &'static str,
    /// The system's own total time, ms.
    pub total_ms: f64,
    /// `migrate` to the guest's first sweep done wholly on the destination, ms.
    pub first_pass_ms: f64,
    /// That sweep's duration over the guest's median sweep on the source before the
    /// migration: how much the missing pages slowed it (1.0: not at all).
    pub first_sweep_slowdown: f64,
    /// The guest's longest heartbeat silence from `migrate` to 2 s after, ms.
    pub guest_downtime_ms: f64,
    /// The system's own downtime (paused until the destination runs), ms.
    pub downtime_ms: f64,
    /// Ferry: fault latency median / p99 / max, µs (NaN for QEMU, which does not report it).
    pub fault_p50_us: f64,
    /// Fault latency, 99th percentile, µs.
    pub fault_p99_us: f64,
    /// Fault latency, longest, µs.
    pub fault_max_us: f64,
    /// Ferry: faults; QEMU: NaN.
    pub faults: f64,
    /// QEMU: `postcopy-blocktime` (vCPUs waiting for pages), ms; Ferry: the sum of its
    /// vCPUs' blocked time.
    pub blocked_ms: f64,
    /// The raw result.
    pub raw: Value,
}

/// The floor a demand fault cannot beat here, measured in the same run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Floor {
    /// Median loopback TCP round trip of a 32-byte request answered with one 4 KiB page, µs.
    pub round_trip_us: f64,
    /// Median copy of one 4 KiB page, µs.
    pub page_copy_us: f64,
}

impl Floor {
    /// One round trip plus one page copy, µs.
    pub fn total_us(&self) -> f64 {
        self.round_trip_us + self.page_copy_us
    }
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// When it started, UTC.
    pub started: String,
    /// Timed runs, in order.
    pub runs: Vec<Run>,
    /// The floor, measured before and after the runs (the smaller kept).
    pub floor: Floor,
}

fn append(plan: &Plan, vcpus: u32) -> String {
    format!("ws={} hb=1 mark=1 cpus={vcpus}", plan.ws)
}

fn qemu_run(plan: &Plan, vcpus: u32, preempt: bool) -> Result<Run> {
    let mut c = QemuConfig::new(&plan.image);
    c.binary = plan.qemu.clone();
    c.mem_mib = plan.mem_mib;
    c.cpus = vcpus;
    c.append = append(plan, vcpus);
    c.postcopy = Some(preempt);
    let r = qemu::run_migration(&c)?;
    let p = qemu_problems(&r);
    if !p.is_empty() {
        bail!("GUEST CHECK FAILED after QEMU postcopy: {}", p.join("; "));
    }
    Ok(Run {
        vcpus,
        system: if preempt { "qemu-preempt" } else { "qemu" },
        total_ms: r.total_ms,
        first_pass_ms: r.first_pass_ms,
        first_sweep_slowdown: r.sweeps.first_dest_ms / r.sweeps.source_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        downtime_ms: r.downtime_ms,
        fault_p50_us: f64::NAN,
        fault_p99_us: f64::NAN,
        fault_max_us: f64::NAN,
        faults: f64::NAN,
        blocked_ms: r.postcopy_blocktime_ms,
        raw: serde_json::to_value(&r)?,
    })
}

fn ferry_run(plan: &Plan, vcpus: u32, backend: &'static str) -> Result<Run> {
    let mut c = FerryConfig::new(&plan.ferry, &plan.image);
    c.mem_mib = plan.mem_mib;
    c.cpus = vcpus;
    c.append = append(plan, vcpus);
    c.channels = plan.channels;
    c.migrate_args = vec!["--postcopy".into()];
    c.migrate_args.extend(plan.migrate_args.iter().cloned());
    let _reserved = match backend {
        "hugetlb" => Some(HugeReservation::new(plan.mem_mib.div_ceil(2))?),
        _ => None,
    };
    if backend != "anonymous" {
        c.dest_args = vec!["--memory-backend".into(), backend.into()];
    }
    let r = ferry::run_migration(&c)?;
    let p = r.problems();
    if !p.is_empty() {
        bail!("GUEST CHECK FAILED after Ferry postcopy: {}", p.join("; "));
    }
    let pc = &r.stats["postcopy"];
    if pc.is_null() {
        bail!("Ferry's report shows no postcopy: {}", r.stats);
    }
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let blocked: f64 = r.dest_stats["postcopy"]["threads"]
        .as_array()
        .map(|t| t.iter().map(|t| num(&t["blocked_ms"])).sum())
        .unwrap_or(f64::NAN);
    Ok(Run {
        vcpus,
        system: match backend {
            "memfd" => "ferry-memfd",
            "hugetlb" => "ferry-hugetlb",
            _ => "ferry",
        },
        total_ms: r.total_ms,
        first_pass_ms: r.first_pass_ms,
        first_sweep_slowdown: r.sweeps.first_dest_ms / r.sweeps.source_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        downtime_ms: r.downtime_ms,
        fault_p50_us: num(&pc["latency_p50_us"]),
        fault_p99_us: num(&pc["latency_p99_us"]),
        fault_max_us: num(&pc["latency_max_us"]),
        faults: num(&pc["faults"]),
        blocked_ms: blocked,
        raw: serde_json::to_value(&r)?,
    })
}

/// Measures the floor: loopback round trips carrying one page, and page copies.
pub fn measure_floor() -> Result<Floor> {
    const ROUNDS: usize = 2000;
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback socket")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let (mut req, page) = ([0u8; 32], [7u8; 4096]);
        for _ in 0..ROUNDS {
            s.read_exact(&mut req)?;
            s.write_all(&page)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let (req, mut page) = ([1u8; 32], [0u8; 4096]);
    let mut rtts = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut page)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the round-trip server panicked"))??;
    // Copies into fresh destinations, as a placed page lands in memory not touched before.
    let src = vec![3u8; 4096];
    let mut dst = vec![0u8; 4096 * 4096];
    let mut copies = Vec::with_capacity(4096);
    for chunk in dst.chunks_mut(4096) {
        let t = Instant::now();
        chunk.copy_from_slice(std::hint::black_box(&src));
        copies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    std::hint::black_box(&dst);
    Ok(Floor {
        round_trip_us: median(&mut rtts),
        page_copy_us: median(&mut copies),
    })
}

/// The plan's systems, in [`SYSTEMS`] order.
fn self_systems(plan: &Plan) -> impl Iterator<Item = &'static str> + '_ {
    SYSTEMS
        .into_iter()
        .filter(|s| plan.systems.iter().any(|p| p == s))
}

/// Runs the plan: per vCPU count, the systems alternating `reps` times.
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 || plan.vcpus.is_empty() || plan.systems.is_empty() {
        bail!("nothing to run: reps, vcpus and systems must be at least 1");
    }
    if let Some(s) = plan.systems.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
        bail!(
            "unknown system {s:?}: the systems are {}",
            SYSTEMS.join(", ")
        );
    }
    let started = utc_now();
    let before = measure_floor()?;
    let mut runs = Vec::new();
    for &vcpus in &plan.vcpus {
        for rep in 1..=plan.reps {
            for system in self_systems(plan) {
                let t = Instant::now();
                let r = match system {
                    "qemu" => qemu_run(plan, vcpus, false),
                    "qemu-preempt" => qemu_run(plan, vcpus, true),
                    "ferry-memfd" => ferry_run(plan, vcpus, "memfd"),
                    "ferry-hugetlb" => ferry_run(plan, vcpus, "hugetlb"),
                    _ => ferry_run(plan, vcpus, "anonymous"),
                }
                .with_context(|| format!("{system} {vcpus} vCPU(s) (rep {rep}) failed"))?;
                eprintln!(
                    "{vcpus} vCPU rep {rep}/{}: {system:<12} total {:>7.1} ms, first pass \
                     {:>7.1} ms, silence {:>6.1} ms, fault p50 {:>6.0} us ({:.0} s)",
                    plan.reps,
                    r.total_ms,
                    r.first_pass_ms,
                    r.guest_downtime_ms,
                    r.fault_p50_us,
                    t.elapsed().as_secs_f64()
                );
                runs.push(r);
            }
        }
    }
    let after = measure_floor()?;
    let floor = if after.total_us() < before.total_us() {
        after
    } else {
        before
    };
    Ok(Report {
        plan: plan.clone(),
        started,
        runs,
        floor,
    })
}

impl Report {
    fn column(&self, vcpus: u32, system: &str, f: fn(&Run) -> f64) -> Summary {
        Summary::over(&self.runs, |r| r.vcpus == vcpus && r.system == system, f)
    }

    /// The tables: figures by vCPUs and system, ratios, fault latency against the floor.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench postcopy ({} UTC): switching to postcopy at once, {} MiB guest, \
             ws={}, {} rep(s)\nQEMU 7.2: postcopy-ram (one channel; 7.2 refuses multifd \
             with postcopy), and with postcopy-preempt; migrate-start-postcopy right after \
             migrate. Ferry: migrate --postcopy, {} data channels plus the urgent channel.\n\
             first pass: migrate to the end of the guest's first sweep of its hot set done \
             wholly on the destination; sweep slowdown: that sweep's time over the guest's \
             sweep on the source before migrate (1.0 = postcopy did not slow it). \
             figures: median (min-max), ms unless marked",
            self.started, self.plan.mem_mib, self.plan.ws, self.plan.reps, self.plan.channels
        );
        let header = [
            "vCPUs",
            "system",
            "total",
            "first pass",
            "sweep slowdown",
            "longest silence",
            "downtime",
            "fault p50 us",
            "fault p99 us",
            "faults",
            "blocked",
        ];
        let widths = [5, 12, 20, 20, 18, 18, 14, 16, 18, 12, 16];
        let _ = writeln!(out, "{}", table_row(&header.map(String::from), &widths));
        let cols: [fn(&Run) -> f64; 9] = [
            |r| r.total_ms,
            |r| r.first_pass_ms,
            |r| r.first_sweep_slowdown,
            |r| r.guest_downtime_ms,
            |r| r.downtime_ms,
            |r| r.fault_p50_us,
            |r| r.fault_p99_us,
            |r| r.faults,
            |r| r.blocked_ms,
        ];
        for &v in &self.plan.vcpus {
            for system in self_systems(&self.plan) {
                let mut cells = vec![v.to_string(), system.to_string()];
                cells.extend(
                    cols.iter()
                        .map(|f| self.column(v, system, *f).display(1.0, 2)),
                );
                let _ = writeln!(out, "{}", table_row(&cells, &widths));
            }
        }
        let _ = writeln!(
            out,
            "\nFerry / QEMU (medians; target at most 0.5 for total and first pass):"
        );
        let ran = |s: &str| self.plan.systems.iter().any(|p| p == s);
        for &v in &self.plan.vcpus {
            for fs in FERRY_SYSTEMS.into_iter().filter(|s| ran(s)) {
                for q in ["qemu", "qemu-preempt"].into_iter().filter(|s| ran(s)) {
                    let ratio = |f: fn(&Run) -> f64| {
                        self.column(v, fs, f).median / self.column(v, q, f).median
                    };
                    let _ = writeln!(
                        out,
                        "  {v} vCPU {fs:<11} vs {q:<12}: total {:.2}x, first pass {:.2}x, \
                         longest silence {:.2}x",
                        ratio(cols[0]),
                        ratio(cols[1]),
                        ratio(cols[3])
                    );
                }
            }
        }
        let f = self.floor;
        let _ = writeln!(
            out,
            "\nfault latency floor (same run): loopback round trip carrying a page {:.1} us + \
             page copy {:.2} us = {:.1} us; target: Ferry's median within 2x ({:.1} us)",
            f.round_trip_us,
            f.page_copy_us,
            f.total_us(),
            2.0 * f.total_us()
        );
        for &v in &self.plan.vcpus {
            for fs in FERRY_SYSTEMS.into_iter().filter(|s| ran(s)) {
                let p50 = self.column(v, fs, cols[5]).median;
                let _ = writeln!(
                    out,
                    "  {v} vCPU {fs:<11}: median fault latency {p50:.0} us = {:.2}x the floor",
                    p50 / f.total_us()
                );
            }
        }
        out
    }

    /// Every run, the floor and the plan as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "benchmark": "postcopy",
            "started_utc": self.started,
            "mem_mib": self.plan.mem_mib,
            "ws": self.plan.ws,
            "vcpus": self.plan.vcpus,
            "reps": self.plan.reps,
            "floor": self.floor,
            "runs": self.runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_measured() {
        let f = measure_floor().unwrap();
        assert!(f.round_trip_us > 0.0 && f.round_trip_us < 10_000.0, "{f:?}");
        assert!(f.page_copy_us >= 0.0 && f.total_us() >= f.round_trip_us);
    }
}
