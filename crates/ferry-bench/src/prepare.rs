//! Memory preparation throughput: `MADV_POPULATE_WRITE` through the multithreaded engine
//! (`ferry_memory::prepare`), by size, page kind (4 KiB pages or THP) and helper count.
//!
//! Every repetition maps fresh anonymous memory and populates it once, so the figures are
//! first-touch costs. On this machine memory the outer host has not backed yet is several
//! times slower than recently freed memory, and free-page reporting makes freed memory cold
//! again within seconds: by default each timed repetition is therefore pre-warmed (the same
//! size populated and freed just before), which measures the kernel's own cost; without
//! pre-warming the outer host's cost is included and the min..max range is wide.

use std::sync::Arc;

use ferry_memory::prepare::{self, HostRange, Populate, PrepareOptions};
use ferry_sys::mm::{self, MapOptions, Mmap};

const GIB: u64 = 1 << 30;

/// One line of results: a size, page kind and thread count over all repetitions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrepareRow {
    /// Memory populated per repetition, GiB.
    pub size_gib: u64,
    /// Transparent huge pages (`MADV_HUGEPAGE`) instead of 4 KiB pages.
    pub thp: bool,
    /// Helper threads asked for.
    pub threads: usize,
    /// Helper threads the engine actually used (its budget may be smaller).
    pub threads_used: usize,
    /// Repetitions.
    pub reps: usize,
    /// Each repetition followed a pre-warming populate of the same size.
    pub prewarmed: bool,
    /// Median seconds per repetition.
    pub median_s: f64,
    /// Fastest repetition, seconds.
    pub min_s: f64,
    /// Slowest repetition, seconds.
    pub max_s: f64,
    /// Throughput at the median, GiB/s.
    pub gib_per_s: f64,
    /// Median time with 1 thread over this row's median (same size and page kind); `None`
    /// when 1 thread was not measured.
    pub speedup: Option<f64>,
    /// Share of the mapping backed by huge pages after the last repetition (AnonHugePages).
    pub huge_fraction: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `AnonHugePages` of the mapping starting at `addr`, in bytes, from /proc/self/smaps.
fn anon_huge_bytes(addr: usize, len: usize) -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let end = addr + len;
    let mut inside = false;
    let mut kib = 0;
    for line in text.lines() {
        let head = line.split(' ').next().unwrap_or("");
        if let Some((s, e)) = head.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s < end && e > addr;
                continue;
            }
        }
        if let (true, Some(v)) = (inside, line.strip_prefix("AnonHugePages:")) {
            kib += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    kib * 1024
}

/// One repetition: map, (advise THP), populate through the engine, check residency.
/// Returns (seconds, threads used, huge page bytes).
fn one_rep(len: usize, thp: bool, threads: usize) -> Result<(f64, usize, u64), String> {
    let m = Mmap::anonymous(len, MapOptions::default()).map_err(|e| e.to_string())?;
    if thp {
        mm::huge_page(m.addr(), m.len()).map_err(|e| e.to_string())?;
    }
    // The default 32 MiB chunks are whole multiples of the 2 MiB THP size.
    let opts = PrepareOptions {
        max_threads: Some(threads),
        ..PrepareOptions::default()
    };
    let report = prepare::start(
        vec![HostRange::new(m.addr(), m.len())],
        Arc::new(Populate),
        opts,
    )
    .and_then(|h| h.wait())
    .map_err(|e| e.to_string())?;
    let resident = mm::mincore(m.addr(), m.len())
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|r| *r)
        .count();
    let pages = m.len() / mm::page_size();
    if resident != pages {
        return Err(format!(
            "only {resident} of {pages} pages resident after populate"
        ));
    }
    let huge = anon_huge_bytes(m.addr(), m.len());
    Ok((report.elapsed.as_secs_f64(), report.threads, huge))
}

/// Maps `len` bytes, populates them with every helper the engine allows and unmaps them,
/// so the outer host backs that much memory again just before a timed repetition (the
/// freed pages are what the next mapping gets).
fn prewarm(len: usize, thp: bool) -> Result<(), String> {
    let m = Mmap::anonymous(len, MapOptions::default()).map_err(|e| e.to_string())?;
    if thp {
        mm::huge_page(m.addr(), m.len()).map_err(|e| e.to_string())?;
    }
    let opts = PrepareOptions {
        nice: 0,
        ..PrepareOptions::default()
    };
    prepare::start(
        vec![HostRange::new(m.addr(), m.len())],
        Arc::new(Populate),
        opts,
    )
    .and_then(|h| h.wait())
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Measures every size × page kind × thread count, `reps` times each, on fresh mappings.
///
/// Within a size and page kind the thread counts alternate repetition by repetition
/// (1, 2, 1, 2, ...), so memory warming up or cooling down over the run biases none of
/// them. With `prewarm`, each timed repetition follows [`prewarm`] of the same size, which
/// measures the kernel's populate cost rather than the outer host backing cold memory.
pub fn run(
    sizes_gib: &[u64],
    threads: &[usize],
    huge: &[bool],
    reps: usize,
    prewarm_first: bool,
) -> Result<Vec<PrepareRow>, String> {
    if sizes_gib.is_empty() || threads.is_empty() || huge.is_empty() {
        return Err("prepare bench: sizes, threads and page kinds must not be empty".into());
    }
    if reps == 0 || sizes_gib.contains(&0) || threads.contains(&0) {
        return Err("prepare bench: sizes, thread counts and reps must be at least 1".into());
    }
    let mut rows = Vec::new();
    for &size_gib in sizes_gib {
        let len = size_gib
            .checked_mul(GIB)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| format!("prepare bench: {size_gib} GiB does not fit in memory"))?;
        for &thp in huge {
            let mut secs = vec![Vec::with_capacity(reps); threads.len()];
            let mut used = vec![0; threads.len()];
            let mut huge_bytes = vec![0; threads.len()];
            for _ in 0..reps {
                for (i, &t) in threads.iter().enumerate() {
                    let what = || format!("prepare bench, {size_gib} GiB, {t} threads");
                    if prewarm_first {
                        prewarm(len, thp).map_err(|e| format!("{}: pre-warming: {e}", what()))?;
                    }
                    let (s, u, h) = one_rep(len, thp, t).map_err(|e| format!("{}: {e}", what()))?;
                    secs[i].push(s);
                    used[i] = u;
                    huge_bytes[i] = h;
                }
            }
            let first = rows.len();
            for (i, &t) in threads.iter().enumerate() {
                let v = &mut secs[i];
                let min_s = v.iter().copied().fold(f64::INFINITY, f64::min);
                let max_s = v.iter().copied().fold(0.0, f64::max);
                let median_s = median(v);
                rows.push(PrepareRow {
                    size_gib,
                    thp,
                    threads: t,
                    threads_used: used[i],
                    reps,
                    prewarmed: prewarm_first,
                    median_s,
                    min_s,
                    max_s,
                    gib_per_s: size_gib as f64 / median_s,
                    speedup: None,
                    huge_fraction: huge_bytes[i] as f64 / len as f64,
                });
            }
            let base = rows[first..]
                .iter()
                .find(|r| r.threads == 1)
                .map(|r| r.median_s);
            if let Some(base) = base {
                for r in &mut rows[first..] {
                    r.speedup = Some(base / r.median_s);
                }
            }
        }
    }
    Ok(rows)
}

/// The rows as a table, with a short note on what was measured.
pub fn table(rows: &[PrepareRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5} {:>5} {:>8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}",
        "GiB",
        "pages",
        "threads",
        "reps",
        "median s",
        "min s",
        "max s",
        "GiB/s",
        "speedup",
        "huge%"
    );
    for r in rows {
        let threads = if r.threads_used == r.threads {
            r.threads.to_string()
        } else {
            format!("{}({})", r.threads, r.threads_used)
        };
        let speedup = r.speedup.map_or_else(|| "-".into(), |s| format!("{s:.2}x"));
        let _ = writeln!(
            out,
            "{:>5} {:>5} {:>8} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8} {:>5.0}%",
            r.size_gib,
            if r.thp { "THP" } else { "4K" },
            threads,
            r.reps,
            r.median_s,
            r.min_s,
            r.max_s,
            r.gib_per_s,
            speedup,
            r.huge_fraction * 100.0
        );
    }
    if rows.iter().any(|r| r.threads_used != r.threads) {
        out += "threads shown as asked(used): the CPU budget allowed fewer helpers\n";
    }
    out +=
        "speedup = median with 1 thread / median with N (target >= 0.8 x N up to the core count)\n";
    if rows.iter().any(|r| r.prewarmed) {
        out += "fresh anonymous mappings, helpers at nice 19; each timed run right after \
                populating and freeing the same size (pre-warmed: the kernel's populate cost)\n";
    } else {
        out += "first-touch of fresh anonymous memory, helpers at nice 19; not pre-warmed \
                (includes the outer host backing cold memory)\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_or_zero() {
        assert!(run(&[], &[1], &[false], 1, false).is_err());
        assert!(run(&[1], &[0], &[false], 1, false).is_err());
        assert!(run(&[1], &[1], &[false], 0, false).is_err());
    }

    #[test]
    fn table_shows_speedup_and_budget() {
        let row = |threads, used, median_s, speedup| PrepareRow {
            size_gib: 4,
            thp: true,
            threads,
            threads_used: used,
            reps: 3,
            prewarmed: true,
            median_s,
            min_s: median_s,
            max_s: median_s,
            gib_per_s: 4.0 / median_s,
            speedup,
            huge_fraction: 1.0,
        };
        let t = table(&[row(1, 1, 0.5, Some(1.0)), row(2, 1, 0.5, Some(1.0))]);
        assert!(t.contains("   THP        1"), "{t}");
        assert!(t.contains("2(1)"), "{t}");
        assert!(t.contains("asked(used)"), "{t}");
        assert!(t.contains("pre-warmed"), "{t}");
        assert!(t.contains("100%"), "{t}");
    }
}
