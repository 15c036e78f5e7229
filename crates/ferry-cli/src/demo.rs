//! `ferry demo`: boots the built-in self-checking workload in one ferry process, migrates it
//! live to a second ferry process over TCP on this machine, and checks the result two ways:
//! every page's digest on the source at the switchover against the destination's once all
//! memory arrived, and the guest's own memory verification on the destination.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_guest::{GuestLine, ImageKind};
use serde_json::json;

use crate::client;

#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    memory: u64,
    /// vCPUs. With 2 on a 2-CPU host the source guest leaves no CPU for the destination's
    /// low-priority memory preparation, which then finishes late.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Hot working set the guest rewrites continuously.
    #[arg(long, default_value = "64M")]
    ws: String,
    /// Data channels.
    #[arg(long, default_value_t = 4)]
    channels: u16,
    /// Keep the logs (in the printed directory).
    #[arg(long)]
    keep: bool,
}

/// Kills the child processes if the demo stops early.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lines(path: &Path) -> Vec<GuestLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(GuestLine::parse)
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn ferry(args: &[String], err_log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err_log)?)
        .spawn()
        .context("starting a ferry process")
}

/// The destination's time hashing every page (from its completion line), ms.
fn destination_digest_ms(err_log: &Path) -> f64 {
    std::fs::read_to_string(err_log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.split_once("incoming migration complete: "))
        .and_then(|(_, j)| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| v["digest_ms"].as_f64())
        .unwrap_or(f64::NAN)
}

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let dir: PathBuf = tmp.path().to_path_buf();
    let image = ferry_guest::write_image(ImageKind::Elf, &dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (src_log, dst_log) = (
        dir.join("source-serial.log"),
        dir.join("destination-serial.log"),
    );
    let (src_api, dst_api) = (dir.join("source.sock"), dir.join("destination.sock"));
    let (src_digest, dst_digest) = (dir.join("source.digest"), dir.join("destination.digest"));
    let mem = format!("{}", a.memory);
    let vcpus = a.vcpus.to_string();
    let s = |x: &str| x.to_string();

    println!(
        "ferry demo: a {} MiB, {}-vCPU guest rewriting a {} working set and checking all of its memory",
        a.memory >> 20,
        a.vcpus,
        a.ws
    );
    let mut kids = Kids(Vec::new());
    kids.0.push(ferry(
        &[
            s("run"),
            s("--incoming"),
            uri.clone(),
            s("--memory"),
            mem.clone(),
            s("--vcpus"),
            vcpus.clone(),
            s("--serial"),
            format!("file:{}", dst_log.display()),
            s("--api-socket"),
            dst_api.display().to_string(),
            s("--digest-file"),
            dst_digest.display().to_string(),
        ],
        &dir.join("destination.err"),
    )?);
    kids.0.push(ferry(
        &[
            s("run"),
            s("--kernel"),
            image.display().to_string(),
            s("--append"),
            format!("ws={} hb=1 dma=1 cpus={}", a.ws, a.vcpus),
            s("--memory"),
            mem,
            s("--vcpus"),
            vcpus,
            s("--serial"),
            format!("file:{}", src_log.display()),
            s("--api-socket"),
            src_api.display().to_string(),
        ],
        &dir.join("source.err"),
    )?);
    println!(
        "  source process {} boots the guest; destination process {} waits on {uri}",
        kids.0[1].id(),
        kids.0[0].id()
    );
    wait_until(
        "the guest to fill its memory",
        Duration::from_secs(120),
        || {
            Ok(lines(&src_log)
                .iter()
                .any(|l| matches!(l, GuestLine::Ready { .. })))
        },
    )?;
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "  guest running and verifying itself; migrating over {} channels...",
        a.channels
    );

    let req = json!({
        "command": "migrate",
        "uri": uri,
        "channels": a.channels,
        "digest_file": src_digest,
    });
    let stats = client::migrate(&src_api, &req, std::io::stderr().is_terminal())
        .context("migration failed")?;

    // The source exits on its own after a successful migration.
    let src_status = {
        let src = &mut kids.0[1];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = src.try_wait()? {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let before = lines(&dst_log).len();
    std::thread::sleep(Duration::from_secs(2));
    let after = lines(&dst_log);
    let status_lines = after
        .iter()
        .skip(before)
        .filter(|l| matches!(l, GuestLine::Status { .. }))
        .count();
    let beats = std::fs::read_to_string(&dst_log)
        .unwrap_or_default()
        .matches('.')
        .count();
    let fails: Vec<String> = lines(&src_log)
        .into_iter()
        .chain(after)
        .filter_map(|l| match l {
            GuestLine::Fail(f) => Some(f),
            _ => None,
        })
        .collect();
    let _ = client::request(&dst_api, &json!({"command": "quit"}), |_| {});
    let hashing_ms = destination_digest_ms(&dir.join("destination.err"));
    print!("{}", client::describe_stats(&stats));
    println!(
        "  of the downtime, {hashing_ms:.0} ms went to hashing every page on the destination for the memory check below; the migration itself took {:.1} ms",
        stats["downtime_ms"].as_f64().unwrap_or(f64::NAN) - hashing_ms
    );
    let memory = ferry_migrate::digest::compare_files(&src_digest, &dst_digest);
    let self_check = fails.is_empty() && status_lines > 0;
    let source_clean = src_status.is_some_and(|s| s.success());
    match &memory {
        Ok(pages) => println!(
            "memory check: all {pages} pages identical on source and destination (a digest of every page on each side, taken while the guest was paused)"
        ),
        Err(e) => println!("memory check: FAILED - {e}"),
    }
    if self_check {
        println!(
            "guest self-check: OK - running on the destination ({beats} heartbeats, {status_lines} status lines in the last 2 s), its own checks found no wrong value"
        );
    } else {
        println!("guest self-check: FAILED");
        for f in &fails {
            println!("  {f}");
        }
        if status_lines == 0 {
            println!("  the guest made no progress on the destination");
        }
    }
    if !source_clean {
        println!("the source process did not exit cleanly: {src_status:?}");
    }
    let ok = memory.is_ok() && self_check && source_clean;
    if a.keep {
        let kept = tmp.keep();
        println!("logs kept in {}", kept.display());
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
