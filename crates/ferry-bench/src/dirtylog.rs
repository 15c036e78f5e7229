//! Issue 4's dirty-log measurement: how long each KVM dirty-log call takes (enabling the
//! log, one `KVM_GET_DIRTY_LOG` per region, one `KVM_CLEAR_DIRTY_LOG` per 1 MiB chunk) on
//! 1, 4 and 8 GiB of guest RAM backed by 4 KiB pages, transparent huge pages and hugetlb,
//! with a guest running; and the longest time the guest's vCPU went without progress while
//! the log was enabled and cleared, against the same guest's worst gap just before.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_guest::GuestLine;
use ferry_memory::dirty::{DirtyTracker, DEFAULT_CHUNK_PAGES};
use ferry_memory::prepare::{self, HostRange, PrepareOptions};
use ferry_memory::ram::{Backend, MemoryConfig, HUGE_PAGE_SIZE};
use ferry_vmm::devices::SerialSink;
use ferry_vmm::vm::{Vm, VmConfig};
use serde::Serialize;

/// Guest memory backing under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// Anonymous memory, 4 KiB pages.
    Small,
    /// Anonymous memory with `MADV_HUGEPAGE`.
    Thp,
    /// A hugetlb memfd of 2 MiB pages.
    Hugetlb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Small => "4 KiB",
            Kind::Thp => "THP",
            Kind::Hugetlb => "hugetlb 2M",
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Guest RAM, GiB.
    pub gib: u64,
    /// Backing.
    pub kind: Kind,
    /// Share of guest RAM in huge pages before logging started (AnonHugePages or hugetlb).
    pub huge_share: f64,
    /// Enabling the log on every slot, ms.
    pub enable_ms: f64,
    /// First `KVM_GET_DIRTY_LOG` (everything dirty), all regions, ms.
    pub first_get_ms: f64,
    /// Clearing every chunk once (pass 0): calls, total ms, longest call µs.
    pub clear_calls: u64,
    /// Total of those clears, ms.
    pub clear_total_ms: f64,
    /// Longest clear, µs.
    pub clear_max_us: f64,
    /// A later sync (only the working set dirty): GET total ms.
    pub second_get_ms: f64,
    /// ... and its clears: calls, longest µs.
    pub second_clear_calls: u64,
    /// Longest clear of the second pass, µs.
    pub second_clear_max_us: f64,
    /// Longest guest progress gap in the seconds before logging, µs.
    pub stall_before_us: u64,
    /// Longest guest progress gap while logging was enabled and cleared, µs.
    pub stall_during_us: u64,
}

/// The guest's `FAIL` lines: its own memory checks found a wrong value.
fn guest_fails(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(GuestLine::parse)
        .filter_map(|l| match l {
            GuestLine::Fail(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn status_stalls(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(GuestLine::parse)
        .filter_map(|l| match l {
            GuestLine::Status { stall_us, .. } => stall_us,
            _ => None,
        })
        .collect()
}

/// A serial sink the bench can read: a file in `dir`.
fn serial_file(dir: &Path, name: &str) -> Result<(std::path::PathBuf, SerialSink)> {
    let p = dir.join(name);
    Ok((p.clone(), SerialSink::Fd(std::fs::File::create(&p)?)))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_lines(p: &Path, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while status_stalls(&read(p)).len() < n {
        if Instant::now() > deadline {
            bail!("guest made no progress: {}", read(p));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn anon_huge_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Reserves `pages` 2 MiB huge pages for the duration, restoring the old count on drop.
pub struct HugeReservation {
    old: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugeReservation {
    /// Reserves at least `pages` huge pages.
    pub fn new(pages: u64) -> Result<HugeReservation> {
        let old: u64 = read(Path::new(NR_HUGEPAGES)).trim().parse().unwrap_or(0);
        std::fs::write(NR_HUGEPAGES, (old + pages).to_string()).with_context(|| {
            format!("reserving {pages} huge pages in {NR_HUGEPAGES} (needs root)")
        })?;
        let got: u64 = read(Path::new(NR_HUGEPAGES)).trim().parse().unwrap_or(0);
        let r = HugeReservation { old };
        if got < old + pages {
            bail!(
                "only {} of {} huge pages could be reserved",
                got - old,
                pages
            );
        }
        Ok(r)
    }
}

impl Drop for HugeReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// Measures one size and kind.
pub fn measure(gib: u64, kind: Kind, dir: &Path) -> Result<Row> {
    let size = gib << 30;
    let _reservation = match kind {
        Kind::Hugetlb => Some(HugeReservation::new(size / HUGE_PAGE_SIZE)?),
        _ => None,
    };
    let (serial, sink) = serial_file(dir, &format!("dirtylog-{gib}-{kind:?}.log"))?;
    let vm = Arc::new(Vm::create(
        VmConfig {
            memory: MemoryConfig {
                size,
                backend: if kind == Kind::Hugetlb {
                    Backend::Hugetlb
                } else {
                    Backend::Anonymous
                },
                thp: kind == Kind::Thp,
            },
            vcpus: 1,
        },
        sink,
    )?);
    // Touch all of RAM from the host (the guest's own fill would take a minute at 8 GiB),
    // so huge pages are in place, as they would be in a long-running VM.
    let ranges: Vec<HostRange> = vm
        .ram()
        .host_regions()
        .iter()
        .map(|r| HostRange::new(r.addr, r.len))
        .collect();
    let opts = PrepareOptions {
        nice: 0,
        page_size: (kind == Kind::Hugetlb).then_some(HUGE_PAGE_SIZE as usize),
        ..PrepareOptions::default()
    };
    let huge_before = anon_huge_kib();
    prepare::start(ranges, Arc::new(prepare::Populate), opts)
        .map_err(|e| anyhow!("{e}"))?
        .wait()
        .map_err(|e| anyhow!("{e}"))?;
    let huge_share = match kind {
        Kind::Hugetlb => 1.0,
        _ => (anon_huge_kib().saturating_sub(huge_before) * 1024) as f64 / size as f64,
    };

    vm.boot(ferry_guest::WORKLOAD_ELF, "workload", "ws=64M hb=1 fill=0")?;
    let stopped = Arc::new(Mutex::new(None));
    let s2 = stopped.clone();
    vm.start(Arc::new(move |e| {
        *s2.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:?}"));
    }))?;
    vm.resume();
    wait_lines(&serial, 4, Duration::from_secs(60))?;
    let before = status_stalls(&read(&serial));
    let stall_before_us = before.iter().skip(2).copied().max().unwrap_or(0);
    let n_before = before.len();

    let tracker = DirtyTracker::new(vm.dirty_log(), vm.ram().clone());
    let stats = tracker.stats();
    tracker.start()?;
    let clear_all = |snap: &ferry_memory::dirty::DirtySnapshot| -> Result<(u64, f64, f64)> {
        let (mut calls, mut total, mut max) = (0u64, 0f64, 0f64);
        for c in snap.dirty_chunks(DEFAULT_CHUNK_PAGES) {
            let t = Instant::now();
            tracker.clear_chunk(snap, &c)?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            calls += 1;
            total += us;
            max = max.max(us);
        }
        Ok((calls, total / 1e3, max))
    };
    let t = Instant::now();
    let first = tracker.sync(false)?;
    let first_get = t.elapsed();
    let (clear_calls, clear_total_ms, clear_max_us) = clear_all(&first)?;
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let second = tracker.sync(false)?;
    let second_get = t.elapsed();
    let (second_clear_calls, _, second_clear_max_us) = clear_all(&second)?;
    // Let the guest report the second in which all that happened, then one more.
    wait_lines(&serial, n_before + 2, Duration::from_secs(30))?;
    tracker.stop()?;
    let during = status_stalls(&read(&serial));
    let stall_during_us = during
        .iter()
        .skip(n_before)
        .take(2)
        .copied()
        .max()
        .unwrap_or(0);
    let (_, enable_ns, _) = stats.enable.get();
    vm.shutdown();
    if let Some(e) = stopped.lock().unwrap_or_else(|p| p.into_inner()).take() {
        bail!("the guest stopped: {e}");
    }
    let fails = guest_fails(&read(&serial));
    if !fails.is_empty() {
        bail!("GUEST CHECK FAILED: {}", fails.join("; "));
    }
    Ok(Row {
        gib,
        kind,
        huge_share,
        enable_ms: enable_ns as f64 / 1e6,
        first_get_ms: first_get.as_secs_f64() * 1e3,
        clear_calls,
        clear_total_ms,
        clear_max_us,
        second_get_ms: second_get.as_secs_f64() * 1e3,
        second_clear_calls,
        second_clear_max_us,
        stall_before_us,
        stall_during_us,
    })
}

/// What `dirty-log` measured, and what it could not.
#[derive(Debug, Default)]
pub struct Measured {
    /// One row per size and kind measured.
    pub rows: Vec<Row>,
    /// The size and kind of each failed measurement, with why.
    pub failed: Vec<String>,
}

/// Measures every size and kind; a measurement that fails (including a kind this machine
/// cannot do, or a guest whose own checks fail) is listed in `failed`, never skipped.
pub fn run(sizes: &[u64], kinds: &[Kind]) -> Result<Measured> {
    let dir = tempfile::tempdir()?;
    let mut out = Measured::default();
    for &gib in sizes {
        for &kind in kinds {
            match measure(gib, kind, dir.path()) {
                Ok(r) => out.rows.push(r),
                Err(e) => {
                    let what = format!("{gib} GiB {}: {e:#}", kind.name());
                    eprintln!("dirty-log {what}");
                    out.failed.push(what);
                }
            }
        }
    }
    Ok(out)
}

/// Prints the rows as a table.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:>4} {:<11} {:>6} {:>9} {:>9} {:>7} {:>10} {:>9} {:>9} {:>10} {:>11} {:>11}",
        "GiB",
        "pages",
        "huge%",
        "enable ms",
        "get ms",
        "clears",
        "clear ms",
        "clear max",
        "get2 ms",
        "clear2 max",
        "stall pre",
        "stall log"
    );
    for r in rows {
        println!(
            "{:>4} {:<11} {:>5.0}% {:>9.3} {:>9.3} {:>7} {:>10.2} {:>7.0}us {:>9.3} {:>8.0}us {:>9}us {:>9}us",
            r.gib,
            r.kind.name(),
            r.huge_share * 100.0,
            r.enable_ms,
            r.first_get_ms,
            r.clear_calls,
            r.clear_total_ms,
            r.clear_max_us,
            r.second_get_ms,
            r.second_clear_max_us,
            r.stall_before_us,
            r.stall_during_us
        );
    }
}
