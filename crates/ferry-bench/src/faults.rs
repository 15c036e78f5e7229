//! `ferry-bench faults`: the fault matrix of `ferry_testkit::matrix` against real `ferry`
//! processes, every case `reps` times, as a table. Fails when any run fails its verdict.

use anyhow::{bail, Result};
use ferry_testkit::matrix::{cases, expect_name, run_case, Config, Verdict};

/// Runs the matrix (or the cases whose name contains `filter`) `reps` times.
pub fn run(cfg: &Config, reps: usize, filter: Option<&str>) -> Result<String> {
    let all: Vec<_> = cases()
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .collect();
    if all.is_empty() {
        bail!("no case matches {filter:?}");
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for c in &all {
        let mut verdicts: Vec<Verdict> = Vec::new();
        for rep in 1..=reps {
            let v = run_case(cfg, c);
            eprintln!(
                "{} rep {rep}/{reps}: {} ({:.1} s, source pause {:.0} ms) {}",
                c.name,
                if v.passed { "ok" } else { "FAILED" },
                v.secs,
                v.source_pause_ms,
                v.detail
            );
            if !v.passed {
                failed.push(format!("{} rep {rep}: {}", c.name, v.detail));
            }
            verdicts.push(v);
        }
        let ok = verdicts.iter().filter(|v| v.passed).count();
        let pause = verdicts
            .iter()
            .map(|v| v.source_pause_ms)
            .fold(0.0f64, f64::max);
        let result = verdicts
            .last()
            .map(|v| v.detail.clone())
            .unwrap_or_default();
        rows.push(format!(
            "| {} | {} | {} | {} | {ok}/{reps} | {pause:.0} | {} |",
            c.name,
            c.fault,
            c.moment,
            expect_name(c.expect),
            short(&result)
        ));
    }
    if !failed.is_empty() {
        bail!(
            "{} run(s) failed their verdict:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(format!(
        "| case | fault | moment | runs the guest afterwards | passed | longest source pause, ms | what happened (last run) |\n\
         |---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    ))
}

/// The verdict text without the fault log, cut to a table cell.
fn short(s: &str) -> String {
    let s = s.split(" [faults fired").next().unwrap_or(s);
    let s = s.replace("ferry: error: ", "").replace('|', "/");
    if s.chars().count() > 220 {
        format!("{}…", s.chars().take(220).collect::<String>())
    } else {
        s
    }
}
