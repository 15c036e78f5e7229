//! `secure`: what mutual TLS, checksums and compression cost and gain (issue 11), side by
//! side with QEMU 7.2 in the same run, on the same guest image.
//!
//! - Limits, in this process: memcpy, the checksum candidates (xxh3, crc32), one loopback
//!   TCP stream plain and in TLS (Ferry's own TLS stream), and zstd/LZ4 on the guest's kind
//!   of pages and on random pages.
//! - TLS, on loopback and on a 10 Gbit/s link: Ferry plain (checksums on, the default), plain without checksums, and
//!   TLS; QEMU multifd plain and `tls-creds-x509`. Both configured alike: 2 channels, 50 ms
//!   downtime limit, destination memory prepared (QEMU `-mem-prealloc`).
//! - Compression per link (tc tbf on a veth pair into a network namespace, or loopback):
//!   Ferry none, lz4, zstd:1 and auto; QEMU multifd none and zstd (level 1).
//!
//! Every configuration runs `reps` times, alternating; the tables give medians (min-max).
//! Every Ferry and QEMU run must leave the guest intact (its self-check, heartbeats).

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{qemu_problems, utc_now};
use crate::ferry::{self, FerryConfig};
use crate::limits::{loopback_tcp_bandwidth, memcpy_bandwidth};
use crate::netshape::{ShapedLink, NS_ADDR};
use crate::qemu::{self, QemuConfig};
use crate::stats::{median, table_row, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Repetitions of every configuration.
    pub reps: usize,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// The guest command line.
    pub append: String,
    /// Links for the compression runs: `loopback` or a tc rate (`1gbit`, `10gbit`).
    pub links: Vec<String>,
    /// Links for the TLS runs (empty: none).
    pub tls_links: Vec<String>,
    /// Only the configurations whose "system config" name contains this.
    pub only: Option<String>,
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The workload image.
    pub image: PathBuf,
    /// Test certificates (scripts/make-test-certs.sh layout).
    pub certs: PathBuf,
}

/// One timed migration.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// "tls" or "compress".
    pub section: &'static str,
    /// `loopback` or the link's rate.
    pub link: String,
    /// "ferry" or "qemu".
    pub system: &'static str,
    /// The configuration's name in the tables.
    pub config: String,
    /// The system's total time, ms.
    pub total_ms: f64,
    /// The guest's longest heartbeat silence, ms.
    pub guest_downtime_ms: f64,
    /// Bytes on the wire: Ferry's own count (compressed); for QEMU the link's counter on a
    /// shaped link (QEMU 7.2 counts pages uncompressed), else QEMU's count.
    pub wire_bytes: u64,
    /// Guest RAM over total time, bytes/s (the rate the migration moved memory).
    pub ram_rate: f64,
    /// Ferry: pass 0's rate (all of RAM), bytes/s; QEMU: the same as `ram_rate`.
    pub pass0_rate: f64,
    /// Ferry: batches sent compressed and raw.
    pub batches: (u64, u64),
    /// The raw result.
    pub raw: Value,
}

/// Limits measured in this process.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// memcpy, bytes/s.
    pub memcpy: f64,
    /// xxh3-64, page by page over a 1 MiB batch in cache (as the channels hash), bytes/s.
    pub xxh3: f64,
    /// crc32 (crc32fast, PCLMULQDQ), likewise.
    pub crc32: f64,
    /// crc32c (SSE 4.2), likewise.
    pub crc32c: f64,
    /// One loopback TCP stream, bytes/s.
    pub tcp: f64,
    /// One loopback TLS stream (Ferry's), bytes/s.
    pub tls: f64,
    /// Compression speed (bytes of input per s) and ratio, by codec and data kind.
    pub codecs: Vec<(String, String, f64, f64)>,
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// Start, UTC.
    pub started: String,
    /// The limits.
    pub limits: Limits,
    /// Every timed run.
    pub runs: Vec<Run>,
    /// TCP goodput of each shaped link (source to destination), bits/s: its physical limit.
    pub link_rates: Vec<(String, f64)>,
}

/// A Ferry or QEMU configuration of one section.
#[derive(Debug, Clone)]
struct Config {
    system: &'static str,
    name: &'static str,
    /// Ferry: `migrate` arguments; QEMU: unused.
    args: Vec<String>,
    tls: bool,
    qemu_zstd: bool,
}

fn ferry_cfg(name: &'static str, args: &[&str], tls: bool) -> Config {
    Config {
        system: "ferry",
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        tls,
        qemu_zstd: false,
    }
}

fn qemu_cfg(name: &'static str, tls: bool, zstd: bool) -> Config {
    Config {
        system: "qemu",
        name,
        args: Vec::new(),
        tls,
        qemu_zstd: zstd,
    }
}

/// Runs the plan.
pub fn run(plan: &Plan) -> Result<Report> {
    if plan.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let started = utc_now();
    let limits = measure_limits(&plan.certs)?;
    eprintln!("{}", limits_text(&limits));
    let mut runs = Vec::new();
    let mut link_rates = Vec::new();
    for link in &plan.tls_links {
        let tls = [
            ferry_cfg("plain, checksums", &[], false),
            ferry_cfg("plain, no checksums", &["--no-checksums"], false),
            ferry_cfg("mutual TLS", &[], true),
            qemu_cfg("multifd plain", false, false),
            qemu_cfg("multifd tls-creds-x509", true, false),
        ];
        run_section(plan, "tls", link, &tls, &mut runs, &mut link_rates)?;
    }
    let compress = [
        ferry_cfg("none", &["--compress", "none"], false),
        ferry_cfg("lz4", &["--compress", "lz4"], false),
        ferry_cfg("zstd:1", &["--compress", "zstd:1"], false),
        ferry_cfg("auto", &["--compress", "auto"], false),
        qemu_cfg("multifd none", false, false),
        qemu_cfg("multifd zstd:1", false, true),
    ];
    for link in &plan.links {
        run_section(
            plan,
            "compress",
            link,
            &compress,
            &mut runs,
            &mut link_rates,
        )?;
    }
    Ok(Report {
        plan: plan.clone(),
        started,
        limits,
        runs,
        link_rates,
    })
}

fn run_section(
    plan: &Plan,
    section: &'static str,
    link: &str,
    configs: &[Config],
    runs: &mut Vec<Run>,
    link_rates: &mut Vec<(String, f64)>,
) -> Result<()> {
    let shaped = match link {
        "loopback" => None,
        rate => Some(ShapedLink::new(rate).with_context(|| format!("shaping a {rate} link"))?),
    };
    if let Some(l) = shaped
        .as_ref()
        .filter(|_| !link_rates.iter().any(|(k, _)| k == link))
    {
        // About a second's worth of traffic.
        let r = l.measure_tcp(l.rate_bits_per_s() / 8)?;
        eprintln!(
            "{link} link ({}): TCP goodput {:.2} Gbit/s in, {:.2} Gbit/s out",
            l.netns(),
            r.to_ns / 1e9,
            r.from_ns / 1e9
        );
        link_rates.push((link.to_string(), r.to_ns));
    }
    let chosen: Vec<&Config> = configs
        .iter()
        .filter(|c| {
            let name = format!("{} {}", c.system, c.name);
            plan.only.as_ref().is_none_or(|o| name.contains(o.as_str()))
        })
        .collect();
    for rep in 1..=plan.reps {
        for c in chosen.iter().copied() {
            let t = Instant::now();
            let r = match c.system {
                "ferry" => ferry_run(plan, c, shaped.as_ref()),
                _ => qemu_run(plan, c, shaped.as_ref()),
            }
            .with_context(|| format!("{section} {link} {} {} (rep {rep})", c.system, c.name))?;
            let r = Run {
                section,
                link: link.to_string(),
                ..r
            };
            eprintln!(
                "{section} {link} rep {rep}/{}: {:<5} {:<24} total {:>8.1} ms, pass 0 {:>5.2} \
                 GB/s, wire {:>7.1} MB, guest downtime {:>6.1} ms, batches c/r {}/{} ({:.0} s)",
                plan.reps,
                r.system,
                r.config,
                r.total_ms,
                r.pass0_rate / 1e9,
                r.wire_bytes as f64 / 1e6,
                r.guest_downtime_ms,
                r.batches.0,
                r.batches.1,
                t.elapsed().as_secs_f64()
            );
            runs.push(r);
        }
    }
    Ok(())
}

fn ferry_run(plan: &Plan, c: &Config, link: Option<&ShapedLink>) -> Result<Run> {
    let mut cfg = FerryConfig::new(&plan.ferry, &plan.image);
    cfg.mem_mib = plan.mem_mib;
    cfg.append = format!("{} cpus=1", plan.append);
    cfg.channels = 2;
    cfg.migrate_args = c.args.clone();
    if c.tls {
        let d = |side: &str| plan.certs.join(side).display().to_string();
        cfg.dest_args = vec!["--tls-dir".into(), d("destination")];
        cfg.migrate_args
            .extend(["--tls-dir".to_string(), d("source")]);
    }
    if let Some(l) = link {
        cfg.dest_netns = Some(l.netns().to_string());
        cfg.dest_host = NS_ADDR.to_string();
    }
    let r = ferry::run_migration(&cfg)?;
    let p = r.problems();
    if !p.is_empty() {
        bail!(
            "GUEST CHECK FAILED after the Ferry migration: {}",
            p.join("; ")
        );
    }
    let count = |k: &str| r.stats[k].as_u64().unwrap_or(0);
    Ok(Run {
        section: "",
        link: String::new(),
        system: "ferry",
        config: c.name.to_string(),
        total_ms: r.total_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        wire_bytes: r.bytes,
        ram_rate: r.ram_bytes as f64 / (r.total_ms / 1e3),
        pass0_rate: r.first_pass_throughput_bytes_per_s,
        batches: (count("batches_compressed"), count("batches_raw")),
        raw: serde_json::to_value(&r)?,
    })
}

fn qemu_run(plan: &Plan, c: &Config, link: Option<&ShapedLink>) -> Result<Run> {
    let mut cfg = QemuConfig::new(&plan.image);
    cfg.binary = plan.qemu.clone();
    cfg.mem_mib = plan.mem_mib;
    cfg.append = plan.append.clone();
    // Configured as Ferry runs: 2 channels, 50 ms, destination memory prepared, vCPUs
    // throttled when precopy does not converge.
    cfg.channels = 2;
    cfg.downtime_limit_ms = Some(50);
    cfg.dest_prealloc = true;
    cfg.auto_converge = true;
    if c.tls {
        cfg.tls_dir = Some(plan.certs.join("qemu"));
    }
    if c.qemu_zstd {
        cfg.compress = Some(("zstd".into(), 1));
    }
    if let Some(l) = link {
        cfg.dest_netns = Some(l.netns().to_string());
        cfg.dest_host = NS_ADDR.to_string();
    }
    let before = link.map(ShapedLink::root_tx_bytes).transpose()?;
    let r = qemu::run_migration(&cfg)?;
    let after = link.map(ShapedLink::root_tx_bytes).transpose()?;
    let p = qemu_problems(&r);
    if !p.is_empty() {
        bail!(
            "GUEST CHECK FAILED after the QEMU migration: {}",
            p.join("; ")
        );
    }
    let wire = match (before, after) {
        (Some(b), Some(a)) => a.saturating_sub(b),
        _ => r.bytes,
    };
    let rate = (plan.mem_mib << 20) as f64 / (r.total_ms / 1e3);
    Ok(Run {
        section: "",
        link: String::new(),
        system: "qemu",
        config: c.name.to_string(),
        total_ms: r.total_ms,
        guest_downtime_ms: r.guest_downtime_ms,
        wire_bytes: wire,
        ram_rate: rate,
        pass0_rate: rate,
        batches: (0, 0),
        raw: serde_json::to_value(&r)?,
    })
}

/// Bytes/s of `f` over `bytes`, median of `reps`.
fn rate(bytes: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut v)
}

/// Pages like the workload guest's (a word at each end, zeros between) and random pages.
fn sample_pages(pages: usize) -> (Vec<u8>, Vec<u8>) {
    let mut guest = vec![0u8; pages * 4096];
    for (i, p) in guest.chunks_mut(4096).enumerate() {
        p[..8].copy_from_slice(&(i as u64 ^ 0x5eed).to_le_bytes());
        p[4088..].copy_from_slice(&((i as u64) << 40 | 7).to_le_bytes());
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random = (0..pages * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (guest, random)
}

fn measure_limits(certs: &std::path::Path) -> Result<Limits> {
    // One batch of pages, hashed page by page 256 times over: it stays in cache, as a
    // batch does between its copy and its send.
    let batch: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let hash_rate = |f: &dyn Fn(&[u8]) -> u64| {
        rate(batch.len() * 256, 5, || {
            for _ in 0..256 {
                for page in batch.chunks(4096) {
                    black_box(f(black_box(page)));
                }
            }
        })
    };
    // What page checksums use: xxh3-64 with AVX2 picked at run time.
    let xxh3 = hash_rate(&|p| twox_hash::XxHash3_64::oneshot(p));
    let crc32 = hash_rate(&|p| u64::from(crc32fast::hash(p)));
    let crc32c = hash_rate(&|p| u64::from(crc32c::crc32c(p)));
    let (guest, random) = sample_pages(256 * 16);
    let mut codecs = Vec::new();
    for (kind, data) in [("guest pages", &guest), ("random", &random)] {
        for codec in ["zstd:1", "lz4"] {
            let (speed, ratio) = codec_rate(codec, data)?;
            codecs.push((codec.to_string(), kind.to_string(), speed, ratio));
        }
    }
    Ok(Limits {
        memcpy: memcpy_bandwidth(256 << 20, 5),
        xxh3,
        crc32,
        crc32c,
        tcp: loopback_tcp_bandwidth(1, 2 << 30)?,
        tls: loopback_tls_bandwidth(certs, 2 << 30)?,
        codecs,
    })
}

/// Compression speed (input bytes/s) and ratio of `codec` on `data`, 1 MiB batches as the
/// channels compress them.
fn codec_rate(codec: &str, data: &[u8]) -> Result<(f64, f64)> {
    let mut out = vec![0u8; (2 << 20) + 4096];
    let mut z = zstd::bulk::Compressor::new(1)?;
    let mut packed = 0usize;
    let speed = rate(data.len(), 5, || {
        packed = data
            .chunks(1 << 20)
            .map(|c| match codec {
                "lz4" => lz4_flex::block::compress_into(c, &mut out).unwrap_or(c.len()),
                _ => z.compress_to_buffer(c, &mut out).unwrap_or(c.len()),
            })
            .sum();
    });
    Ok((speed, packed as f64 / data.len() as f64))
}

/// One loopback stream through Ferry's TLS layer, bytes/s (sender and receiver threads).
fn loopback_tls_bandwidth(certs: &std::path::Path, bytes: u64) -> Result<f64> {
    use ferry_transport::{tls, Listener, TlsConfig, Uri};
    let server_cfg = TlsConfig::load(&certs.join("destination"), None)?;
    let client_cfg = TlsConfig::load(&certs.join("source"), None)?;
    let l = Listener::bind(&Uri::Tcp("127.0.0.1:0".into()))?;
    let uri = l.local_uri();
    let deadline = Instant::now() + Duration::from_secs(10);
    let sender = std::thread::spawn(move || -> Result<()> {
        let sock = ferry_transport::connect(&uri, deadline)?;
        let mut s = tls::connect(sock, &client_cfg, &uri, deadline)?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        s.flush()?;
        s.shutdown_write();
        Ok(())
    });
    let sock = l
        .accept_timeout(Duration::from_secs(10))?
        .context("no TLS connection")?;
    sock.set_nonblocking(true)?;
    let mut hs = tls::ServerHandshake::new(&server_cfg, sock)?;
    while !hs.advance()? {
        if Instant::now() > deadline {
            bail!("TLS handshake timed out");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut s = hs.finish().map_err(|(e, _)| e)?;
    s.set_nonblocking(false)?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        match s.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("TLS sender panicked"))??;
    if got < bytes {
        bail!("the TLS stream ended after {got} of {bytes} bytes");
    }
    Ok(got as f64 / secs)
}

fn limits_text(l: &Limits) -> String {
    let mut out = String::new();
    let gb = |v: f64| format!("{:.2} GB/s", v / 1e9);
    let _ = writeln!(
        out,
        "limits (this process, one core each): memcpy {}; page checksums in cache: xxh3 {}, \
         crc32 {}, crc32c {}; one loopback stream: TCP {}, TLS {} ({:.2}x)",
        gb(l.memcpy),
        gb(l.xxh3),
        gb(l.crc32),
        gb(l.crc32c),
        gb(l.tcp),
        gb(l.tls),
        l.tls / l.tcp
    );
    for (codec, kind, speed, ratio) in &l.codecs {
        let _ = writeln!(
            out,
            "  {codec:<6} on {kind:<11}: {} of input, {:.4} of the size",
            gb(*speed),
            ratio
        );
    }
    out
}

impl Report {
    fn runs(&self, section: &str, link: &str, system: &str, config: &str) -> Vec<&Run> {
        self.runs
            .iter()
            .filter(|r| {
                r.section == section && r.link == link && r.system == system && r.config == config
            })
            .collect()
    }

    fn med(
        &self,
        section: &str,
        link: &str,
        system: &str,
        config: &str,
        f: fn(&Run) -> f64,
    ) -> f64 {
        let mut v: Vec<f64> = self
            .runs(section, link, system, config)
            .into_iter()
            .map(f)
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            median(&mut v)
        }
    }

    fn configs(&self, section: &str, link: &str) -> Vec<(&'static str, String)> {
        let mut seen: Vec<(&'static str, String)> = Vec::new();
        for r in self
            .runs
            .iter()
            .filter(|r| r.section == section && r.link == link)
        {
            if !seen.iter().any(|(s, c)| *s == r.system && *c == r.config) {
                seen.push((r.system, r.config.clone()));
            }
        }
        seen
    }

    fn table(&self, section: &str, link: &str) -> String {
        let widths = [6, 24, 22, 16, 14, 20, 12];
        let mut out = table_row(
            &[
                "system",
                "config",
                "total ms",
                "pass 0 GB/s",
                "wire MB",
                "guest downtime ms",
                "batches c/r",
            ],
            &widths,
        );
        out.push('\n');
        for (system, config) in self.configs(section, link) {
            let rs = self.runs(section, link, system, &config);
            let col =
                |f: fn(&Run) -> f64| Summary::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let b = rs.first().map(|r| r.batches).unwrap_or((0, 0)); // first rep's
            out.push_str(&table_row(
                &[
                    system.to_string(),
                    config.clone(),
                    col(|r| r.total_ms).display(1.0, 0),
                    col(|r| r.pass0_rate).display(1e9, 2),
                    col(|r| r.wire_bytes as f64).display(1e6, 1),
                    col(|r| r.guest_downtime_ms).display(1.0, 1),
                    if system == "ferry" {
                        format!("{}/{}", b.0, b.1)
                    } else {
                        "-".into()
                    },
                ],
                &widths,
            ));
            out.push('\n');
        }
        out
    }

    /// The tables and the ratios the issue judges.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ferry-bench secure ({} UTC): {} MiB guest, append \"{}\", {} rep(s), 2 channels, \
             QEMU 7.2 multifd x2 with -mem-prealloc, a 50 ms downtime limit and auto-converge\nfigures: \
             median (min-max)\n",
            self.started, self.plan.mem_mib, self.plan.append, self.plan.reps
        );
        out.push_str(&limits_text(&self.limits));
        for (link, bits) in &self.link_rates {
            let _ = writeln!(out, "{link} link: TCP goodput {:.2} Gbit/s", bits / 1e9);
        }
        for link in &self.plan.tls_links {
            let _ = writeln!(out, "\nTLS, {link}:\n{}", self.table("tls", link));
            let f = |sys, cfg| self.med("tls", link, sys, cfg, |r| r.pass0_rate);
            let t = |sys, cfg| self.med("tls", link, sys, cfg, |r| r.total_ms);
            let _ = writeln!(
                out,
                "Ferry TLS / plain with checksums (the default): pass-0 throughput {:.2}x, \
                 total time {:.2}x; TLS / plain without checksums: {:.2}x; checksums cost \
                 {:.2}x pass-0 throughput\nQEMU TLS / plain: throughput {:.2}x, total time \
                 {:.2}x\nFerry TLS / QEMU TLS total time: {:.2}x",
                f("ferry", "mutual TLS") / f("ferry", "plain, checksums"),
                t("ferry", "mutual TLS") / t("ferry", "plain, checksums"),
                f("ferry", "mutual TLS") / f("ferry", "plain, no checksums"),
                f("ferry", "plain, checksums") / f("ferry", "plain, no checksums"),
                f("qemu", "multifd tls-creds-x509") / f("qemu", "multifd plain"),
                t("qemu", "multifd tls-creds-x509") / t("qemu", "multifd plain"),
                t("ferry", "mutual TLS") / t("qemu", "multifd tls-creds-x509"),
            );
        }
        for link in &self.plan.links {
            let _ = writeln!(
                out,
                "\ncompression, {link}:\n{}",
                self.table("compress", link)
            );
            let t = |sys, cfg| self.med("compress", link, sys, cfg, |r| r.total_ms);
            let (none, zstd, lz4, auto) = (
                t("ferry", "none"),
                t("ferry", "zstd:1"),
                t("ferry", "lz4"),
                t("ferry", "auto"),
            );
            let _ = writeln!(
                out,
                "Ferry zstd:1 / none {:.2}x, lz4 / none {:.2}x; auto / the best of (none, lz4, \
                 zstd:1) {:.2}x; Ferry zstd:1 / QEMU zstd:1 {:.2}x; Ferry best / QEMU best \
                 {:.2}x",
                zstd / none,
                lz4 / none,
                auto / zstd.min(none).min(lz4),
                zstd / t("qemu", "multifd zstd:1"),
                zstd.min(none).min(lz4).min(auto)
                    / t("qemu", "multifd zstd:1").min(t("qemu", "multifd none")),
            );
        }
        out
    }

    /// Every run as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "benchmark": "secure",
            "started": self.started,
            "mem_mib": self.plan.mem_mib,
            "append": self.plan.append,
            "reps": self.plan.reps,
            "links": self.plan.links,
            "tls_links": self.plan.tls_links,
            "limits": self.limits,
            "link_rates": self.link_rates,
            "runs": self.runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_are_measured_on_both_kinds_of_pages() {
        let (guest, random) = sample_pages(512);
        let (speed, ratio) = codec_rate("zstd:1", &guest).unwrap();
        assert!(speed > 0.0 && ratio < 0.1, "{speed} {ratio}");
        let (_, ratio) = codec_rate("lz4", &random).unwrap();
        assert!(ratio > 0.99, "random data does not shrink: {ratio}");
    }

    #[test]
    fn a_tls_stream_is_measured() {
        let certs = ferry_testkit::certs::Certs::make();
        let dir = certs.source();
        let root = dir.parent().unwrap();
        let r = loopback_tls_bandwidth(root, 64 << 20).unwrap();
        assert!(r > 1e7, "{r} bytes/s");
    }
}
