//! `demand-paging`: the fault path alone, in the spirit of KVM's `demand_paging_test`: N
//! "vCPU" threads each read every page of their own slice of missing memory once, and
//! the faults are resolved by placing a local page (no network), so what is measured is
//! how faults reach whoever resolves them. Modes:
//!
//! - `shared-1`: one userfaultfd over all memory, one handler thread (the classic layout);
//! - `shared-n`: one userfaultfd, N handler threads reading it (the seed thread's "several
//!   readers on one wait queue");
//! - `per-range`: one userfaultfd and one handler per vCPU's range (Ferry's default, one
//!   fault queue per vCPU);
//! - `per-range-file`: the same over memfd memory that was prepared (populated) and then
//!   hidden from the mapping, as a prepared memfd destination is in postcopy: MINOR faults,
//!   each resolved by writing the page into the file through a second mapping and mapping
//!   it with `UFFDIO_CONTINUE`, so no page is allocated in the fault path;
//! - `vcpu-local`: no handler: the touching thread places its page itself before reading it
//!   (a model of vCPU-local resolution: what a SIGBUS-mode miss, reported to the vCPU
//!   thread as a KVM exit, costs besides that exit).
//!
//! The vCPUs are host threads, not KVM vCPUs: on this machine every guest instruction is
//! emulated, which would hide the fault path behind the emulator. A KVM exit costs about
//! 14.5 µs here (`../shared/ENVIRONMENT.md`), to be added to a vCPU-local fault.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_memory::ram::{Backend, GuestRam, MemoryConfig, PAGE_SIZE};
use ferry_sys::uffd::{Placed, Uffd};
use serde::Serialize;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::bench::utc_now;
use crate::stats::{median, table_row, Summary};

/// The fault-resolution layouts.
pub const MODES: [&str; 5] = [
    "shared-1",
    "shared-n",
    "per-range",
    "per-range-file",
    "vcpu-local",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// vCPU thread counts.
    pub vcpus: Vec<usize>,
    /// Memory each vCPU touches, MiB.
    pub mib_per_vcpu: u64,
    /// Repetitions.
    pub reps: usize,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// One of [`MODES`].
    pub mode: &'static str,
    /// vCPU threads.
    pub vcpus: usize,
    /// Pages resolved per second, all vCPUs together.
    pub pages_per_s: f64,
    /// Fault latency seen by the touching thread: median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

fn ram(bytes: u64, backend: Backend) -> Result<Arc<GuestRam>> {
    Ok(Arc::new(GuestRam::new(MemoryConfig {
        size: bytes,
        backend,
        thp: false,
    })?))
}

/// How a handler resolves a fault.
enum Resolve {
    /// `UFFDIO_COPY` of the page (allocating it).
    Copy,
    /// Written into the (prepared) file through `alias`, then `UFFDIO_CONTINUE`; `base` is
    /// the host address of guest address 0.
    File {
        alias: Arc<vm_memory::GuestMemoryMmap>,
        base: usize,
    },
}

/// The page every fault is resolved with.
static PAGE: [u8; PAGE_SIZE as usize] = [0x5a; PAGE_SIZE as usize];

/// A handler: reads faults from `uffd` and places the page, until `stop`.
fn handler(uffd: &Uffd, how: &Resolve, stop: &AtomicBool) -> Result<()> {
    let mut faults = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) {
        faults.clear();
        uffd.read_faults(&mut faults, 64, Duration::from_millis(20))?;
        for f in &faults {
            let page = (f.addr as usize) & !(PAGE_SIZE as usize - 1);
            let placed = match how {
                Resolve::Copy => uffd.copy(page, &PAGE)?,
                Resolve::File { alias, base } => {
                    let gpa = (page - base) as u64;
                    alias.write_slice(&PAGE, GuestAddress(gpa))?;
                    uffd.continue_pages(page, PAGE_SIZE as usize)?
                }
            };
            match placed {
                Placed::All => {}
                // Another handler of the same uffd was first: only the wake-up is missing.
                Placed::Exists { .. } => uffd.wake(page, PAGE_SIZE as usize)?,
            }
        }
    }
    Ok(())
}

/// Reads every page of `[gpa, gpa + len)`; with `local`, places each page itself first.
/// Returns each read's latency, µs.
fn toucher(ram: &GuestRam, gpa: u64, len: u64, local: Option<&Uffd>) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity((len / PAGE_SIZE) as usize);
    for p in 0..len / PAGE_SIZE {
        let g = gpa + p * PAGE_SIZE;
        let t = Instant::now();
        if let Some(u) = local {
            let hva = ram
                .host_addr(g, PAGE_SIZE)
                .ok_or_else(|| anyhow!("no host address for {g:#x}"))?;
            u.copy(hva, &PAGE)?;
        }
        let v: u8 = ram.mem().read_obj(GuestAddress(g))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if v != PAGE[0] {
            bail!("page {g:#x} reads {v:#x}, not the placed {:#x}", PAGE[0]);
        }
    }
    Ok(lat)
}

/// One run of `mode` with `n` vCPU threads.
fn run_one(mode: &'static str, n: usize, mib: u64) -> Result<Run> {
    let per = mib << 20;
    let file = mode == "per-range-file";
    let backend = if file {
        Backend::Memfd
    } else {
        Backend::Anonymous
    };
    let ram = ram(per * n as u64, backend)?;
    let host = ram
        .host_regions()
        .first()
        .copied()
        .ok_or_else(|| anyhow!("no memory"))?;
    let how = Arc::new(if file {
        // Prepared as a memfd destination is: every page in the file, none mapped.
        ferry_sys::mm::populate_write(host.addr, host.len)?;
        ram.hide(0, ram.size())?;
        let alias = ram
            .file_alias()?
            .ok_or_else(|| anyhow!("memfd memory without a file"))?;
        Resolve::File {
            alias: Arc::new(alias),
            base: host.addr,
        }
    } else {
        Resolve::Copy
    });
    // One uffd over everything, or one per vCPU slice.
    let uffds: Vec<Arc<Uffd>> = match mode {
        "per-range" | "per-range-file" | "vcpu-local" => (0..n)
            .map(|i| {
                let (addr, len) = (host.addr + i * per as usize, per as usize);
                let u = if file {
                    let u = Uffd::with_minor()?;
                    u.register_missing_minor(addr, len)?;
                    u
                } else {
                    let u = Uffd::new()?;
                    u.register_missing(addr, len)?;
                    u
                };
                Ok(Arc::new(u))
            })
            .collect::<Result<_>>()?,
        _ => {
            let u = Uffd::new()?;
            u.register_missing(host.addr, host.len)?;
            vec![Arc::new(u)]
        }
    };
    let handlers = match mode {
        "shared-1" => 1,
        "shared-n" | "per-range" | "per-range-file" => n,
        _ => 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for i in 0..handlers {
        let (u, stop, how) = (uffds[i % uffds.len()].clone(), stop.clone(), how.clone());
        hs.push(std::thread::spawn(move || handler(&u, &how, &stop)));
    }
    let t = Instant::now();
    let lats: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let ts: Vec<_> = (0..n)
            .map(|i| {
                let (ram, local) = (&ram, (mode == "vcpu-local").then(|| uffds[i].clone()));
                s.spawn(move || toucher(ram, i as u64 * per, per, local.as_deref()))
            })
            .collect();
        ts.into_iter()
            .map(|t| t.join().map_err(|_| anyhow!("a vCPU thread panicked"))?)
            .collect()
    });
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().map_err(|_| anyhow!("a handler panicked"))??;
    }
    let mut all = Vec::new();
    for l in lats {
        all.extend(l?);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let p99 = all
        .get(((all.len() as f64 - 1.0) * 0.99) as usize)
        .copied()
        .unwrap_or(f64::NAN);
    Ok(Run {
        mode,
        vcpus: n,
        pages_per_s: all.len() as f64 / took.as_secs_f64(),
        p50_us: median(&mut all),
        p99_us: p99,
    })
}

/// Every mode at every vCPU count, `reps` times.
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 || plan.vcpus.is_empty() {
        bail!("nothing to run: reps and vcpus must be at least 1");
    }
    let started = utc_now();
    let mut runs = Vec::new();
    for &n in &plan.vcpus {
        for rep in 1..=plan.reps {
            for mode in MODES {
                let r = run_one(mode, n, plan.mib_per_vcpu)
                    .with_context(|| format!("{mode} with {n} vCPUs (rep {rep})"))?;
                eprintln!(
                    "{n} vCPU rep {rep}/{}: {mode:<14} {:>9.0} pages/s, p50 {:>6.1} us, p99 {:>7.1} us",
                    plan.reps, r.pages_per_s, r.p50_us, r.p99_us
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

/// What a run of the benchmark produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// When it started, UTC.
    pub started: String,
    /// Every run.
    pub runs: Vec<Run>,
}

impl Report {
    fn column(&self, n: usize, mode: &str, f: fn(&Run) -> f64) -> Summary {
        Summary::over(&self.runs, |r| r.vcpus == n && r.mode == mode, f)
    }

    /// The table: pages/s and fault latency by mode and vCPU count.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench demand-paging ({} UTC): N host threads each read {} MiB of missing \
             memory once; faults resolved by placing a local page (UFFDIO_COPY; per-range-file: \
             written into the prepared memfd and mapped with UFFDIO_CONTINUE), {} rep(s); \
             median (min-max)",
            self.started, self.plan.mib_per_vcpu, self.plan.reps
        );
        let header = ["vCPUs", "mode", "pages/s", "fault p50 us", "fault p99 us"];
        let widths = [5, 14, 26, 18, 20];
        let _ = writeln!(out, "{}", table_row(&header.map(String::from), &widths));
        for &n in &self.plan.vcpus {
            for mode in MODES {
                let cells = vec![
                    n.to_string(),
                    mode.to_string(),
                    self.column(n, mode, |r| r.pages_per_s).display(1.0, 0),
                    self.column(n, mode, |r| r.p50_us).display(1.0, 1),
                    self.column(n, mode, |r| r.p99_us).display(1.0, 1),
                ];
                let _ = writeln!(out, "{}", table_row(&cells, &widths));
            }
        }
        out
    }

    /// Every run as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "benchmark": "demand-paging",
            "started_utc": self.started,
            "mib_per_vcpu": self.plan.mib_per_vcpu,
            "reps": self.plan.reps,
            "runs": self.runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_resolves_every_page() {
        for mode in MODES {
            let r = run_one(mode, 2, 1).unwrap();
            assert!(r.pages_per_s > 0.0 && r.p50_us > 0.0, "{mode}: {r:?}");
        }
    }
}
