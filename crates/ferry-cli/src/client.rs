//! Client side of the control API (`ferry remote`, and `ferry demo`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// Sends one request and returns its result; `on_event` sees progress events meanwhile.
pub fn request(socket: &Path, req: &Value, mut on_event: impl FnMut(&Value)) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the API socket {}", socket.display()))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .context("sending the request")?;
    let reader = BufReader::new(s.try_clone().context("socket")?);
    for line in reader.lines() {
        let line = line.context("reading the reply")?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("bad reply: {line}"))?;
        if v.get("event").is_some() {
            on_event(&v);
            continue;
        }
        if v["ok"] == Value::Bool(true) {
            return Ok(v["result"].clone());
        }
        bail!("{}", v["error"].as_str().unwrap_or("unknown error"));
    }
    Err(anyhow!(
        "the VMM closed the API connection without replying"
    ))
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

/// Runs `migrate` with a progress bar on a terminal; returns the final statistics.
pub fn migrate(socket: &Path, req: &Value, show_progress: bool) -> Result<Value> {
    let bar = if show_progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let result = request(socket, req, |ev| {
        let p = &ev["progress"];
        let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
        bar.set_length(f("ram_bytes") as u64);
        bar.set_position((f("bytes") as u64).min(f("ram_bytes") as u64));
        bar.set_message(
            format!(
                "{} pass {} dirty {}/s tput {}/s exp. downtime {:.1} ms{}",
                p["status"].as_str().unwrap_or(""),
                f("pass"),
                human_bytes(f("dirty_rate")),
                human_bytes(f("throughput")),
                f("expected_downtime_ms"),
                if f("throttle_percent") > 0.0 {
                    format!(" throttle {}%", f("throttle_percent"))
                } else {
                    String::new()
                },
            ) + &if f("pages_requested") > 0.0 {
                format!(" faulted pages sent {}", f("pages_requested"))
            } else {
                String::new()
            },
        );
    });
    bar.finish_and_clear();
    result
}

/// The statistics in a few readable lines.
pub fn describe_stats(s: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let d = &s["downtime"];
    let mut out = format!(
        "migration completed in {:.0} ms (setup {:.1} ms), downtime {:.1} ms\n",
        f(&s["total_ms"]),
        f(&s["setup_ms"]),
        f(&s["downtime_ms"])
    );
    out += &format!(
        "  downtime: final sync {:.2} ms, final pages {:.2} ms, state {:.2} ms, wait for load {:.2} ms (destination load {:.2} ms), go to running {:.2} ms (resume {:.2} ms)\n",
        f(&d["final_sync_ms"]),
        f(&d["final_pages_ms"]),
        f(&d["state_ms"]),
        f(&d["wait_loaded_ms"]),
        f(&d["dest_load_ms"]),
        f(&d["go_to_running_ms"]),
        f(&d["dest_resume_ms"])
    );
    out += &format!(
        "  moved {} in {} passes over {} channels: {} data pages, {} zero pages; throughput {}/s (pass 0: {}/s)\n",
        human_bytes(f(&s["bytes"])),
        f(&s["passes"]),
        f(&s["channels"]),
        f(&s["pages_data"]),
        f(&s["pages_zero"]),
        human_bytes(f(&s["throughput"])),
        human_bytes(f(&s["first_pass_throughput"]))
    );
    out += &format!(
        "  dirty rate {}/s, max throttle {}%, expected downtime {:.1} ms (limit {:.0} ms){}\n",
        human_bytes(f(&s["dirty_rate"])),
        f(&s["max_throttle_percent"]),
        f(&s["expected_downtime_ms"]),
        f(&s["downtime_limit_ms"]),
        if s["converged"] == Value::Bool(false) {
            " - did not converge, switched over anyway"
        } else {
            ""
        }
    );
    let pc = &s["postcopy"];
    if pc.is_object() {
        out += &format!(
            "  postcopy ({}, after {} precopy passes): {} pages missing at the switch, {} sent because the guest faulted on them; {} faults, latency median {} us, p99 {} us, max {} us; every page there {:.0} ms after the guest ran\n",
            pc["trigger"].as_str().unwrap_or(""),
            f(&pc["precopy_passes"]),
            f(&pc["pages_missing"]),
            f(&pc["pages_requested"]),
            f(&pc["faults"]),
            f(&pc["latency_p50_us"]),
            f(&pc["latency_p99_us"]),
            f(&pc["latency_max_us"]),
            f(&pc["postcopy_ms"])
        );
        if f(&pc["reconnects"]) > 0.0 {
            out += &format!(
                "  the link broke and was reconnected {} time(s); {} pages the destination held already were not sent again\n",
                f(&pc["reconnects"]),
                f(&pc["pages_not_resent"])
            );
        }
    }
    let p = &s["prepare"];
    if p["reported"] == Value::Bool(true) {
        out += &if f(&p["threads"]) == 0.0 {
            "  destination memory not prepared in advance (--prepare none)\n".to_string()
        } else {
            format!(
                "  destination memory prepared in {:.0} ms on {} threads ({:.1} ms inside the downtime; the switchover waited {:.0} ms for it)\n",
                f(&p["prepare_ms"]),
                f(&p["threads"]),
                f(&p["in_downtime_ms"]),
                f(&p["waited_ms"])
            )
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statistics_name_postcopy_when_there_was_one() {
        let mut s = json!({"total_ms": 900.0, "downtime_ms": 1.0, "prepare": {}});
        assert!(!describe_stats(&s).contains("postcopy"));
        s["postcopy"] = json!({
            "trigger": "now", "precopy_passes": 0, "pages_missing": 262144,
            "pages_requested": 31, "faults": 31, "latency_p50_us": 61,
            "latency_p99_us": 313, "latency_max_us": 900, "postcopy_ms": 840.0
        });
        let text = describe_stats(&s);
        assert!(text.contains("postcopy (now"), "{text}");
        assert!(text.contains("262144 pages missing"), "{text}");
        assert!(text.contains("latency median 61 us"), "{text}");
        assert!(!text.contains("reconnected"), "{text}");
        s["postcopy"]["reconnects"] = json!(2);
        s["postcopy"]["pages_not_resent"] = json!(5000);
        let text = describe_stats(&s);
        assert!(text.contains("reconnected 2 time(s); 5000 pages"), "{text}");
    }
}
