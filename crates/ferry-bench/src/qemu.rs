//! The QEMU yardstick: one live migration between two local QEMU processes.
//!
//! Both QEMUs run the same multiboot workload image (`-kernel`) with KVM. Each one's COM1
//! goes to its stdout (`-serial stdio`), a pipe read by a [`Recorder`], so heartbeats are
//! timestamped as they leave each process. Each is driven over QMP on its own unix socket
//! (`-qmp unix:PATH,server=on,wait=off`). The destination starts with `-incoming defer`
//! so the migration capabilities can be set before `migrate-incoming` opens the port;
//! QEMU requires multifd to be set on both sides before that.
//!
//! Every child is owned by a guard that kills and reaps it on drop, so an error (or a
//! panic) anywhere leaves no QEMU behind.
//!
//! Issue 11 options: TLS with mutual authentication (`tls-creds-x509` objects on both sides,
//! certificates from `scripts/make-test-certs.sh`), multifd compression, and a destination
//! inside a network namespace (a [`crate::netshape::ShapedLink`]), reached over its veth.
//! QEMU 7.2 counts multifd pages uncompressed in `ram.transferred` and `ram.multifd-bytes`
//! even with `multifd-compression`; what crossed the wire is on the link's counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_guest::GuestLine;
use serde::Serialize;
use serde_json::{json, Value};

use crate::limits::CpuSample;
use crate::pin::{self, Pinning};
use ferry_testkit::serial::{beat_interval, longest_gap_at, Recorder};

/// How one QEMU migration is run. [`QemuConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary (default `qemu-system-x86_64`, looked up in `PATH`).
    pub binary: PathBuf,
    /// The multiboot image (`ferry_guest::write_image(ImageKind::Elf, dir)`).
    pub image: PathBuf,
    /// Guest memory in MiB (`-m`), default 1024.
    pub mem_mib: u64,
    /// vCPUs (`-smp`), default 1.
    pub cpus: u32,
    /// The guest command line (`-append`), default `ws=64M hb=1`.
    pub append: String,
    /// Migration channels: 1 is QEMU's single stream; N > 1 is multifd with N channels.
    pub channels: u32,
    /// QEMU's `downtime-limit` in ms; `None` keeps QEMU's default (300 ms).
    pub downtime_limit_ms: Option<u64>,
    /// QEMU's `max-bandwidth` in bytes/s. QEMU 7.2's default is 128 MiB/s, which would
    /// measure the throttle rather than QEMU, so [`QemuConfig::new`] sets 1 TB/s (no limit
    /// here). `None` keeps QEMU's default.
    pub max_bandwidth: Option<u64>,
    /// Add `-nodefaults` (no default VGA, NIC, floppy, CD-ROM). Default true: the workload
    /// needs only COM1, and the defaults add the VGA's 16 MiB of video RAM and the NIC's
    /// ROM to the RAM QEMU migrates.
    pub nodefaults: bool,
    /// Start the destination with `-mem-prealloc`, so its guest memory is faulted in
    /// before the migration starts. Default false (QEMU's default). On this machine
    /// first-touch faults on memory the outer host has not backed run at about
    /// 0.3 GiB/s and dominate QEMU's total time: 1 GiB took 4-9 s without prealloc and
    /// 0.5-1.4 s with it.
    pub dest_prealloc: bool,
    /// Quit the source QEMU (QMP `quit`) as soon as the migration has completed, before
    /// the watch. Default true: a Ferry source exits by itself after a migration, and
    /// tearing down a process with 1 GiB of guest memory stalls other work on this 2-CPU
    /// machine for tens of ms, so both sources go away at the same point, inside the
    /// window where the guest's heartbeat is watched.
    pub quit_source: bool,
    /// Extra arguments for both QEMUs.
    pub extra_args: Vec<String>,
    /// How long the guest runs after its `ready` line before `migrate` (default 2 s), so
    /// the working set is hot.
    pub warmup: Duration,
    /// How long the destination is watched after the migration completed (default 2 s).
    pub watch: Duration,
    /// Limit for QMP to come up and for the source guest's `ready` line (default 120 s;
    /// QEMU takes about 4 s to start here and the guest about 8 s to fill 1 GiB).
    pub start_timeout: Duration,
    /// Limit for the migration itself (default 300 s); it is cancelled after that.
    pub migrate_timeout: Duration,
    /// `query-migrate` period while migrating (default 20 ms).
    pub poll_interval: Duration,
    /// A local migration as QEMU 7.2 does it: guest RAM in a shared file in /dev/shm that
    /// both QEMUs map (`memory-backend-file,share=on`), the `x-ignore-shared` capability
    /// (no page is sent), over a unix socket. Default false.
    pub ignore_shared: bool,
    /// The `auto-converge` capability (vCPU throttling when precopy does not converge, as
    /// Ferry does by default). Default false (QEMU's default).
    pub auto_converge: bool,
    /// Thread placement (`--pin`): both processes' vCPU threads are placed as soon as both
    /// answer on their control sockets (the rest start placed, see `pin::confine_bench`).
    pub pin: Option<Pinning>,
    /// TLS on every migration channel, with certificates checked both ways: a directory
    /// in QEMU's layout (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// `client-cert.pem`, `client-key.pem`; `scripts/make-test-certs.sh OUT` writes it to
    /// `OUT/qemu`). Both QEMUs get `-object tls-creds-x509,...,verify-peer=on` (server on
    /// the destination, client on the source) and `tls-creds`; the source checks the
    /// destination's certificate against `tls-hostname` = `dest_host`. Default `None`.
    pub tls_dir: Option<PathBuf>,
    /// Multifd compression, method and level: `("zstd", 1)` sets `multifd-compression`
    /// `zstd` and `multifd-zstd-level` 1 (`zlib` likewise). QEMU 7.2 compresses only
    /// multifd channels, so this needs `channels` > 1. Default `None`.
    pub compress: Option<(String, u32)>,
    /// Run the destination QEMU inside this network namespace (`ip netns exec NAME`),
    /// e.g. [`crate::netshape::ShapedLink::netns`]; set `dest_host` to its address
    /// ([`crate::netshape::NS_ADDR`]). The QMP sockets are file-system paths, which
    /// connect across namespaces. Default `None`.
    pub dest_netns: Option<String>,
    /// The address the destination listens on and the source connects to (`tcp:HOST:PORT`),
    /// also the TLS hostname. Default `127.0.0.1`.
    pub dest_host: String,
    /// Postcopy, switching at once (`migrate-start-postcopy` right after `migrate`), with
    /// `postcopy-preempt` when `Some(true)`; the destination also measures its vCPUs'
    /// `postcopy-blocktime`. QEMU 7.2 refuses multifd with postcopy: one channel. Default
    /// `None`.
    pub postcopy: Option<bool>,
}

impl QemuConfig {
    /// The defaults described on each field, for `image` and 1 channel.
    pub fn new(image: impl Into<PathBuf>) -> QemuConfig {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            image: image.into(),
            mem_mib: 1024,
            cpus: 1,
            append: "ws=64M hb=1".to_string(),
            channels: 1,
            downtime_limit_ms: None,
            max_bandwidth: Some(1_000_000_000_000),
            nodefaults: true,
            dest_prealloc: false,
            quit_source: true,
            extra_args: Vec::new(),
            warmup: Duration::from_secs(2),
            watch: Duration::from_secs(2),
            start_timeout: Duration::from_secs(120),
            migrate_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(20),
            ignore_shared: false,
            auto_converge: false,
            pin: None,
            tls_dir: None,
            compress: None,
            dest_netns: None,
            dest_host: "127.0.0.1".to_string(),
            postcopy: None,
        }
    }
}

/// What one QEMU migration measured. Times are in ms, sizes in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct QemuResult {
    /// Always `"qemu"`.
    pub system: &'static str,
    /// Channels used (1 = single stream, N > 1 = multifd).
    pub channels: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The guest command line.
    pub append: String,
    /// Whether the destination ran with `-mem-prealloc`.
    pub dest_prealloc: bool,
    /// QEMU's `total-time`.
    pub total_ms: f64,
    /// QEMU's `downtime` (source side: VM stopped until the last byte is sent).
    pub downtime_ms: f64,
    /// QEMU's `setup-time`.
    pub setup_ms: f64,
    /// Longest heartbeat silence over both QEMUs from `migrate` to the end of the watch.
    pub guest_downtime_ms: f64,
    /// When that silence began, in ms after `migrate` was sent (compare with
    /// `observed_total_ms` to see that it is the switchover).
    pub guest_gap_start_ms: f64,
    /// Last source heartbeat to first destination heartbeat: the switchover's own
    /// silence. `guest_downtime_ms` is larger when the guest stalled longer during precopy.
    pub switchover_gap_ms: f64,
    /// From `migrate` sent until `query-migrate` said completed (poll-period resolution).
    pub observed_total_ms: f64,
    /// Median interval between the source guest's heartbeats during the warm-up: the
    /// resolution of `guest_downtime_ms`.
    pub beat_interval_ms: f64,
    /// QEMU's `ram.transferred`.
    pub bytes: u64,
    /// QEMU's `ram.total` (guest RAM plus ROMs and other RAM regions).
    pub ram_total_bytes: u64,
    /// QEMU's `ram.multifd-bytes` (0 without multifd).
    pub multifd_bytes: u64,
    /// QEMU's `ram.normal`: pages sent whole.
    pub normal_pages: u64,
    /// QEMU's `ram.duplicate`: zero pages sent as a flag.
    pub duplicate_pages: u64,
    /// QEMU's `ram.dirty-sync-count`: precopy passes.
    pub dirty_sync_count: u64,
    /// QEMU's `ram.mbps` at completion.
    pub mbps: f64,
    /// `bytes` / `total_ms`.
    pub throughput_bytes_per_s: f64,
    /// `FERRY-GUEST FAIL` lines from either QEMU.
    pub guest_fail_lines: usize,
    /// Destination heartbeats from completion to the end of the watch.
    pub heartbeats_after: usize,
    /// Destination `FERRY-GUEST ok` lines in the same time: the guest's memory self-check
    /// goes on (it prints one about once a second).
    pub status_lines_after: usize,
    /// The destination's `query-status` at the end of the watch (`running` if all is well).
    pub dest_status: String,
    /// The average number of CPUs that processes other than the two QEMUs and this one
    /// kept busy during the migration (0 on a quiet machine; it has 2): other work
    /// running at the same time skews every figure above.
    pub other_cpus: f64,
    /// With `mark=1` in the guest's command line: from `migrate` to the end of the guest's
    /// first sweep of its hot set done wholly on the destination (its second sweep mark
    /// there), ms; NaN without marks.
    pub first_pass_ms: f64,
    /// Postcopy: the destination's `postcopy-blocktime` (time vCPUs waited for pages), ms.
    pub postcopy_blocktime_ms: f64,
    /// With `mark=1`: the guest's median sweep of its hot set on the source during the
    /// warm-up, and its first sweep done wholly on the destination, ms (NaN without marks).
    pub sweeps: Sweeps,
}

/// The guest's sweep times around a migration (`mark=1`), ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sweeps {
    /// Median sweep on the source during the warm-up.
    pub source_ms: f64,
    /// The first sweep done wholly on the destination.
    pub first_dest_ms: f64,
}

impl Sweeps {
    /// From the source's marks in `[warm_from, t_migrate)` and the destination's after.
    pub(crate) fn of(
        src: &[Instant],
        dst: &[Instant],
        warm_from: Instant,
        t_migrate: Instant,
    ) -> Sweeps {
        let mut before: Vec<f64> = src
            .windows(2)
            .filter(|w| w[0] >= warm_from && w[1] < t_migrate)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
            .collect();
        let after: Vec<&Instant> = dst.iter().filter(|t| **t >= t_migrate).collect();
        Sweeps {
            source_ms: crate::stats::median(&mut before),
            first_dest_ms: match after.as_slice() {
                [a, b, ..] => (**b - **a).as_secs_f64() * 1e3,
                _ => f64::NAN,
            },
        }
    }
}

impl QemuResult {
    /// Whether the guest came through intact: no FAIL line, running and heartbeating on
    /// the destination.
    pub fn guest_ok(&self) -> bool {
        self.guest_fail_lines == 0 && self.heartbeats_after > 0 && self.dest_status == "running"
    }
}

/// Runs one QEMU migration as described by `cfg`: on loopback, or to a destination in a
/// network namespace (`dest_netns`).
pub fn run_migration(cfg: &QemuConfig) -> Result<QemuResult> {
    if cfg.compress.is_some() && cfg.channels < 2 {
        bail!("QEMU compresses only multifd channels: compress needs channels > 1");
    }
    // Declared first so it is removed last, after both QEMUs are dead.
    let dir = WorkDir::new()?;
    let shm = SharedRam::new(cfg)?;
    let uri = if cfg.ignore_shared {
        format!("unix:{}", dir.0.join("mig.sock").display())
    } else {
        // In a namespace of its own the destination has every port free.
        format!("tcp:{}:{}", cfg.dest_host, free_port()?)
    };

    // Both start at once: each takes seconds to come up.
    let mut dst = QemuProc::spawn(cfg, "dst", &dir.0, true, shm.as_ref())?;
    let mut src = QemuProc::spawn(cfg, "src", &dir.0, false, shm.as_ref())?;
    let mut dst_qmp = dst.connect_qmp(cfg.start_timeout)?;
    let mut src_qmp = src.connect_qmp(cfg.start_timeout)?;
    let pids = [src.child.0.id(), dst.child.0.id()];
    pin::pin_pair(cfg.pin.as_ref(), pids, cfg.cpus, pin::qemu_vcpu)?;

    for qmp in [&mut dst_qmp, &mut src_qmp] {
        set_migration_params(qmp, cfg)?;
    }
    dst_qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .context("dst: migrate-incoming")?;

    src.serial
        .wait_for(|l| matches!(l, GuestLine::Ready { .. }), cfg.start_timeout)
        .with_context(|| format!("src: waiting for the guest's ready line{}", src.stderr()))?;
    let warm_from = Instant::now();
    thread::sleep(cfg.warmup);
    dst.check_alive()?;

    let cpu_before = CpuSample::take(&pids)?;
    let t_migrate = Instant::now();
    src_qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .context("src: migrate")?;
    if cfg.postcopy.is_some() {
        src_qmp
            .execute("migrate-start-postcopy", None)
            .context("src: migrate-start-postcopy")?;
    }
    loop {
        thread::sleep(cfg.poll_interval);
        let info = src_qmp
            .execute("query-migrate", None)
            .context("src: query-migrate")?;
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => break,
            s @ ("failed" | "cancelled") => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("");
                bail!("QEMU migration {s}: {why}{}{}", src.stderr(), dst.stderr());
            }
            _ if t_migrate.elapsed() > cfg.migrate_timeout => {
                let _ = src_qmp.execute("migrate_cancel", None);
                bail!(
                    "QEMU migration did not complete in {:?}",
                    cfg.migrate_timeout
                );
            }
            _ => {}
        }
    }
    let t_complete = Instant::now();
    let cpu_after = CpuSample::take(&pids)?;
    let info = final_migration_info(&mut src_qmp)?;
    if cfg.quit_source {
        // The reply may or may not arrive before QEMU closes the socket; either is fine.
        let _ = src_qmp.execute("quit", None);
    }

    thread::sleep(cfg.watch);
    let t_end = Instant::now();
    let dest_status = dst_qmp
        .execute("query-status", None)
        .context("dst: query-status")?
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();

    let postcopy_blocktime_ms = match cfg.postcopy {
        Some(_) => dst_qmp
            .execute("query-migrate", None)
            .context("dst: query-migrate")?
            .get("postcopy-blocktime")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        None => f64::NAN,
    };
    let src_beats = src.serial.beats();
    let dst_beats = dst.serial.beats();
    let gap = longest_gap_at(&[&src_beats, &dst_beats], (t_migrate, t_end));
    let ram = &info["ram"];
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let int = |v: &Value| v.as_u64().unwrap_or(0);
    let total_ms = num(&info["total-time"]);
    let bytes = int(&ram["transferred"]);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(QemuResult {
        system: "qemu",
        channels: cfg.channels,
        mem_mib: cfg.mem_mib,
        cpus: cfg.cpus,
        append: cfg.append.clone(),
        dest_prealloc: cfg.dest_prealloc,
        total_ms,
        downtime_ms: num(&info["downtime"]),
        setup_ms: num(&info["setup-time"]),
        guest_downtime_ms: ms(gap.len),
        guest_gap_start_ms: ms(gap.start - t_migrate),
        switchover_gap_ms: match (src_beats.last(), dst_beats.first()) {
            (Some(&last), Some(&first)) if first >= last => ms(first - last),
            _ => f64::NAN,
        },
        observed_total_ms: ms(t_complete - t_migrate),
        beat_interval_ms: beat_interval(&src_beats, warm_from, t_migrate)
            .map(ms)
            .unwrap_or(f64::NAN),
        bytes,
        ram_total_bytes: int(&ram["total"]),
        multifd_bytes: int(&ram["multifd-bytes"]),
        normal_pages: int(&ram["normal"]),
        duplicate_pages: int(&ram["duplicate"]),
        dirty_sync_count: int(&ram["dirty-sync-count"]),
        mbps: num(&ram["mbps"]),
        throughput_bytes_per_s: if total_ms > 0.0 {
            bytes as f64 / (total_ms / 1e3)
        } else {
            f64::NAN
        },
        guest_fail_lines: src.serial.fail_count() + dst.serial.fail_count(),
        heartbeats_after: dst.serial.beats_between(t_complete, t_end),
        status_lines_after: dst
            .serial
            .lines()
            .iter()
            .filter(|l| l.at >= t_complete && matches!(l.line, GuestLine::Status { .. }))
            .count(),
        dest_status,
        other_cpus: cpu_after.others_since(&cpu_before),
        first_pass_ms: first_pass_ms(&dst.serial.marks(), t_migrate),
        postcopy_blocktime_ms,
        sweeps: Sweeps::of(
            &src.serial.marks(),
            &dst.serial.marks(),
            warm_from,
            t_migrate,
        ),
    })
}

/// From `t_migrate` to the guest's second sweep mark on the destination (its first sweep
/// done wholly there), ms; NaN when there are fewer than two marks.
pub(crate) fn first_pass_ms(dst_marks: &[Instant], t_migrate: Instant) -> f64 {
    dst_marks
        .iter()
        .filter(|t| **t >= t_migrate)
        .nth(1)
        .map(|t| (*t - t_migrate).as_secs_f64() * 1e3)
        .unwrap_or(f64::NAN)
}

/// `query-migrate` once QEMU has filled in its totals.
///
/// QEMU 7.2 reports `completed` a moment before the migration thread computes
/// `total-time` and `downtime`; until then both read 0 (seen here once in six runs).
fn final_migration_info(qmp: &mut Qmp) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .context("src: query-migrate")?;
        let total = info.get("total-time").and_then(Value::as_u64).unwrap_or(0);
        if total > 0 {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            bail!("QEMU reported completed but no total-time: {info}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Capabilities and parameters that must be equal on both sides, plus the source's limits
/// (harmless on the destination).
/// The shared guest-RAM file of an `ignore_shared` run, removed on drop.
struct SharedRam(PathBuf);

impl SharedRam {
    fn new(cfg: &QemuConfig) -> Result<Option<SharedRam>> {
        if !cfg.ignore_shared {
            return Ok(None);
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/ferry-bench-ram-{}-{n}",
            std::process::id()
        ));
        crate::cleanup::register_dir(path.clone());
        Ok(Some(SharedRam(path)))
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        crate::cleanup::unregister_dir(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn set_migration_params(qmp: &mut Qmp, cfg: &QemuConfig) -> Result<()> {
    if cfg.ignore_shared {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
        )
        .context("enabling x-ignore-shared")?;
    }
    if cfg.channels > 1 {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "multifd", "state": true }] })),
        )
        .context("enabling multifd")?;
    }
    if cfg.auto_converge {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] })),
        )
        .context("enabling auto-converge")?;
    }
    if let Some(preempt) = cfg.postcopy {
        let mut caps = vec![
            json!({ "capability": "postcopy-ram", "state": true }),
            json!({ "capability": "postcopy-blocktime", "state": true }),
        ];
        if preempt {
            caps.push(json!({ "capability": "postcopy-preempt", "state": true }));
        }
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .context("enabling postcopy")?;
    }
    let mut params = serde_json::Map::new();
    if cfg.channels > 1 {
        params.insert("multifd-channels".into(), json!(cfg.channels));
    }
    if cfg.tls_dir.is_some() {
        params.insert("tls-creds".into(), json!(TLS_ID));
        params.insert("tls-hostname".into(), json!(cfg.dest_host));
    }
    if let Some((method, level)) = &cfg.compress {
        if !matches!(method.as_str(), "zstd" | "zlib") {
            bail!("unknown multifd compression {method:?} (QEMU 7.2 has zstd and zlib)");
        }
        params.insert("multifd-compression".into(), json!(method));
        params.insert(format!("multifd-{method}-level"), json!(level));
    }
    if let Some(ms) = cfg.downtime_limit_ms {
        params.insert("downtime-limit".into(), json!(ms));
    }
    if let Some(bw) = cfg.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(bw));
    }
    if !params.is_empty() {
        qmp.execute("migrate-set-parameters", Some(Value::Object(params)))
            .context("migrate-set-parameters")?;
    }
    Ok(())
}

/// The id of the `tls-creds-x509` object on both QEMUs.
const TLS_ID: &str = "tls0";

/// A free loopback port. Another process could take it before QEMU binds it, but nothing
/// else here allocates ports in that moment.
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A private directory for the QMP and API sockets, removed on drop.
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl WorkDir {
    pub(crate) fn new() -> Result<WorkDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short: a unix socket path must fit in 108 bytes.
        let path = std::env::temp_dir().join(format!("ferry-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        crate::cleanup::register_dir(path.clone());
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        crate::cleanup::unregister_dir(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Most of a QEMU's stderr kept for error messages; the rest is read and dropped.
const STDERR_KEEP: usize = 64 * 1024;

/// One QEMU child with its serial recorder; the child is killed and reaped on drop.
struct QemuProc {
    name: &'static str,
    child: ChildGuard,
    qmp_path: PathBuf,
    serial: Recorder,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl QemuProc {
    fn spawn(
        cfg: &QemuConfig,
        name: &'static str,
        dir: &Path,
        incoming: bool,
        shm: Option<&SharedRam>,
    ) -> Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut cmd = match &cfg.dest_netns {
            // `ip netns exec` execs QEMU, so the child's pid is QEMU's own.
            Some(netns) if incoming => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(&cfg.binary);
                c
            }
            _ => Command::new(&cfg.binary),
        };
        cmd.args(["-accel", "kvm", "-m"])
            .arg(cfg.mem_mib.to_string())
            .arg("-smp")
            .arg(cfg.cpus.to_string())
            .arg("-kernel")
            .arg(&cfg.image)
            .arg("-append")
            .arg(&cfg.append)
            .args([
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if cfg.nodefaults {
            cmd.arg("-nodefaults");
        }
        if cfg.pin.is_some() {
            // Names the vCPU threads `CPU n/KVM`, so they can be told apart.
            cmd.args(["-name", "ferry-bench,debug-threads=on"]);
        }
        if let Some(shm) = shm {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                    cfg.mem_mib,
                    shm.0.display()
                ))
                .args(["-machine", "memory-backend=ram0"]);
        }
        if let Some(tls) = &cfg.tls_dir {
            // QEMU's option syntax escapes a comma as two.
            let dir = tls.display().to_string().replace(',', ",,");
            let endpoint = if incoming { "server" } else { "client" };
            cmd.arg("-object").arg(format!(
                "tls-creds-x509,id={TLS_ID},dir={dir},endpoint={endpoint},verify-peer=on"
            ));
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
            if cfg.dest_prealloc {
                cmd.arg("-mem-prealloc");
            }
        }
        cmd.args(&cfg.extra_args)
            // QEMU's stdio chardev reads stdin; give it nothing rather than our terminal.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(
            cmd.spawn()
                .with_context(|| format!("starting {}", cfg.binary.display()))?,
        );
        // From here on the guard owns the child, so every early return kills it.
        let stdout = child
            .0
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let stderr_pipe = child.0.stderr.take();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let serial = Recorder::spawn(name, stdout)?;
        if let Some(mut pipe) = stderr_pipe {
            let kept_stderr = Arc::clone(&stderr);
            thread::Builder::new()
                .name(format!("stderr-{name}"))
                .spawn(move || {
                    // Keep draining after the cap so QEMU never blocks on a full pipe.
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = pipe.read(&mut buf) {
                        let mut kept = kept_stderr.lock().unwrap_or_else(|e| e.into_inner());
                        let room = STDERR_KEEP.saturating_sub(kept.len()).min(n);
                        kept.extend_from_slice(&buf[..room]);
                    }
                })?;
        }
        Ok(QemuProc {
            name,
            child,
            qmp_path,
            serial,
            stderr,
        })
    }

    /// QEMU's stderr so far, formatted to append to an error message.
    fn stderr(&self) -> String {
        let kept = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&kept);
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!("\n{} QEMU stderr:\n{text}", self.name)
        }
    }

    /// Fails if the child has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.0.try_wait()? {
            // Give the stderr thread a moment to collect the last words.
            thread::sleep(Duration::from_millis(50));
            bail!("{} QEMU exited with {status}{}", self.name, self.stderr());
        }
        Ok(())
    }

    /// Connects to the QMP socket once QEMU has created it.
    fn connect_qmp(&mut self, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            match UnixStream::connect(&self.qmp_path) {
                Ok(s) => return Qmp::handshake(s).with_context(|| format!("{}: QMP", self.name)),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("{}: QMP socket not up after {timeout:?}", self.name)
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Kills and reaps the child on drop (and on a signal, through [`crate::cleanup`]).
pub(crate) struct ChildGuard(pub(crate) Child);

impl ChildGuard {
    /// Takes ownership of a just-spawned child.
    pub(crate) fn new(child: Child) -> ChildGuard {
        crate::cleanup::register_pid(child.id());
        ChildGuard(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Before reaping, so the signal thread never kills a pid that is no longer ours.
        crate::cleanup::unregister_pid(self.0.id());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One message from a QMP server.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting (`{"QMP": {...}}`).
    Greeting(Value),
    /// A command's result, with the `id` echoed if the command had one.
    Return {
        /// The echoed `id`.
        id: Option<Value>,
        /// The `return` value.
        value: Value,
    },
    /// A command's failure.
    Error {
        /// The echoed `id`.
        id: Option<Value>,
        /// `error.class`, e.g. `GenericError`.
        class: String,
        /// `error.desc`, human-readable.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// `event`, e.g. `STOP`.
        name: String,
        /// `data`, or null.
        data: Value,
    },
}

/// Parses one line of QMP output.
pub fn parse_qmp(line: &str) -> Result<QmpMessage> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("bad QMP JSON: {}", line.trim()))?;
    let id = v.get("id").cloned();
    if let Some(value) = v.get("return") {
        Ok(QmpMessage::Return {
            id,
            value: value.clone(),
        })
    } else if let Some(err) = v.get("error") {
        let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(QmpMessage::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        })
    } else if let Some(name) = v.get("event").and_then(Value::as_str) {
        Ok(QmpMessage::Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        })
    } else if let Some(g) = v.get("QMP") {
        Ok(QmpMessage::Greeting(g.clone()))
    } else {
        bail!("unknown QMP message: {}", line.trim())
    }
}

/// Reads messages until the reply to command `id`, keeping events in `events`.
///
/// A reply without an `id` is taken as ours too: QEMU sends one when it could not parse
/// the command far enough to find its `id`.
fn read_reply<R: BufRead>(r: &mut R, id: u64, events: &mut Vec<QmpMessage>) -> Result<Value> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).context("reading from QMP")? == 0 {
            bail!("QMP connection closed");
        }
        if line.trim().is_empty() {
            continue;
        }
        let ours = |got: &Option<Value>| match got {
            Some(g) => g.as_u64() == Some(id),
            None => true,
        };
        match parse_qmp(&line)? {
            QmpMessage::Return { id: got, value } if ours(&got) => return Ok(value),
            QmpMessage::Error {
                id: got,
                class,
                desc,
            } if ours(&got) => {
                bail!("QMP error {class}: {desc}")
            }
            ev @ QmpMessage::Event { .. } => events.push(ev),
            // The greeting, or a late reply to an earlier command.
            _ => {}
        }
    }
}

/// A minimal synchronous QMP client.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Asynchronous events received while waiting for replies, oldest first.
    pub events: Vec<QmpMessage>,
}

impl Qmp {
    /// Reads the greeting from a connected socket and enters command mode.
    pub fn handshake(stream: UnixStream) -> Result<Qmp> {
        // Long enough for a QEMU busy in the switchover; short enough not to hang a bench.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: Vec::new(),
        };
        let mut line = String::new();
        qmp.reader
            .read_line(&mut line)
            .context("reading the QMP greeting")?;
        match parse_qmp(&line)? {
            QmpMessage::Greeting(_) => {}
            other => bail!("expected the QMP greeting, got {other:?}"),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .with_context(|| format!("sending {command}"))?;
        read_reply(&mut self.reader, id, &mut self.events).with_context(|| command.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::{Mutex, MutexGuard};

    /// Held by the tests that run guests: one at a time on this 2-CPU machine.
    pub(crate) fn heavy() -> MutexGuard<'static, ()> {
        static HEAVY: Mutex<()> = Mutex::new(());
        HEAVY.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bench's QEMU driver against the real QEMU (which scripts/test.sh installs), on a
    /// small guest: the migration completes, the guest runs on the destination and checks
    /// itself, and every figure the tables use was measured.
    #[test]
    fn a_small_qemu_migration_is_measured() {
        let _heavy = heavy();
        let dir = WorkDir::new().unwrap();
        let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0).unwrap();
        let mut cfg = QemuConfig::new(&image);
        cfg.mem_mib = 128;
        cfg.append = "ws=8M hb=1 cpus=1".into();
        cfg.channels = 2;
        cfg.dest_prealloc = true;
        cfg.downtime_limit_ms = Some(50);
        cfg.warmup = Duration::from_millis(500);
        let r = run_migration(&cfg).unwrap();
        assert!(r.guest_ok(), "{r:?}");
        for (name, v) in [
            ("total", r.total_ms),
            ("downtime", r.downtime_ms),
            ("guest downtime", r.guest_downtime_ms),
            ("switchover gap", r.switchover_gap_ms),
            ("throughput", r.throughput_bytes_per_s),
        ] {
            assert!(v.is_finite() && v > 0.0, "{name} = {v}: {r:?}");
        }
        assert!(r.bytes >= 100 << 20, "{r:?}");
    }

    /// Test certificates from `scripts/make-test-certs.sh`, in `dir`; returns QEMU's layout.
    /// Fails (rather than skips) without openssl.
    pub(crate) fn test_certs(dir: &Path) -> PathBuf {
        if let Err(e) = ferry_testkit::certs::make_in(dir) {
            panic!("{e}");
        }
        dir.join("qemu")
    }

    /// A small guest migrated with TLS (mutual, certificates checked) and zstd on two
    /// multifd channels over loopback.
    #[test]
    fn a_tls_zstd_qemu_migration_is_measured() {
        let _heavy = heavy();
        let dir = WorkDir::new().unwrap();
        let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0).unwrap();
        let mut cfg = QemuConfig::new(&image);
        cfg.mem_mib = 128;
        cfg.append = "ws=8M hb=1 cpus=1".into();
        cfg.channels = 2;
        cfg.dest_prealloc = true;
        cfg.warmup = Duration::from_millis(500);
        cfg.tls_dir = Some(test_certs(&dir.0.join("certs")));
        cfg.compress = Some(("zstd".into(), 1));
        let r = run_migration(&cfg).unwrap();
        assert!(r.guest_ok(), "{r:?}");
        assert!(r.total_ms > 0.0 && r.throughput_bytes_per_s > 0.0, "{r:?}");
        // Uncompressed page bytes (QEMU 7.2 counts them so), all on the multifd channels.
        assert!(
            r.bytes >= 100 << 20 && r.multifd_bytes >= 100 << 20,
            "{r:?}"
        );
    }

    /// The destination inside a shaped link's namespace, reached over the veth with TLS
    /// (the certificate names 10.77.0.2) and zstd: the guest comes through, and the wire
    /// carried far fewer bytes than QEMU counts (the workload's pages compress well).
    #[test]
    fn a_qemu_migration_crosses_a_shaped_link() {
        let _heavy = heavy();
        let dir = WorkDir::new().unwrap();
        let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0).unwrap();
        let link = crate::netshape::ShapedLink::new("1gbit").unwrap();
        let mut cfg = QemuConfig::new(&image);
        cfg.mem_mib = 128;
        cfg.append = "ws=8M hb=1 cpus=1".into();
        cfg.channels = 2;
        cfg.dest_prealloc = true;
        cfg.warmup = Duration::from_millis(500);
        cfg.tls_dir = Some(test_certs(&dir.0.join("certs")));
        cfg.compress = Some(("zstd".into(), 1));
        cfg.dest_netns = Some(link.netns().to_string());
        cfg.dest_host = crate::netshape::NS_ADDR.to_string();
        let tx = || link.root_tx_bytes().unwrap();
        let before = tx();
        let r = run_migration(&cfg).unwrap();
        let wire = tx() - before;
        println!("{}; wire bytes {wire}", serde_json::to_string(&r).unwrap());
        assert!(r.guest_ok(), "{r:?}");
        assert!(r.bytes >= 100 << 20, "{r:?}");
        assert!(wire > 0 && wire < r.bytes / 4, "wire {wire}: {r:?}");
    }

    #[test]
    fn parses_qmp_messages() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert!(matches!(
            parse_qmp(greeting).unwrap(),
            QmpMessage::Greeting(_)
        ));
        let err = r#"{"id": 3, "error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}"#;
        assert_eq!(
            parse_qmp(err).unwrap(),
            QmpMessage::Error {
                id: Some(json!(3)),
                class: "GenericError".into(),
                desc: "Parameter 'uri' is missing".into()
            }
        );
        let ev = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        assert_eq!(
            parse_qmp(ev).unwrap(),
            QmpMessage::Event {
                name: "STOP".into(),
                data: Value::Null
            }
        );
        assert!(parse_qmp("{\"foo\": 1}").is_err());
        assert!(parse_qmp("not json").is_err());
    }

    #[test]
    fn reply_skips_events_and_stale_replies() {
        let stream = concat!(
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"STOP\"}\r\n",
            "{\"return\": {}, \"id\": 6}\r\n",
            "\r\n",
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 5}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\r\n",
            "{\"return\": {\"status\": \"completed\", \"total-time\": 3512, \"downtime\": 75, ",
            "\"ram\": {\"transferred\": 1130000000, \"normal\": 270000}}, \"id\": 7}\r\n",
            "{\"return\": {}, \"id\": 8}\r\n",
        );
        let mut r = Cursor::new(stream.as_bytes());
        let mut events = Vec::new();
        let v = read_reply(&mut r, 7, &mut events).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["total-time"], 3512);
        assert_eq!(v["ram"]["transferred"], 1_130_000_000u64);
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[1], QmpMessage::Event { name, data } if name == "MIGRATION" && data["status"] == "completed")
        );
        // The next reply is still there for the next command.
        assert_eq!(read_reply(&mut r, 8, &mut events).unwrap(), json!({}));
        // End of stream: an error, not a hang.
        assert!(read_reply(&mut r, 9, &mut events).is_err());
    }

    #[test]
    fn reply_errors_and_unnumbered_replies() {
        let stream = concat!(
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": 2}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\n",
        );
        let mut r = Cursor::new(stream.as_bytes());
        let mut events = Vec::new();
        let e = read_reply(&mut r, 2, &mut events).unwrap_err();
        assert!(e.to_string().contains("GenericError: no"), "{e}");
        let e = read_reply(&mut r, 3, &mut events).unwrap_err();
        assert!(e.to_string().contains("JSON parse error"), "{e}");
    }

    /// Runs real QEMU migrations (1 GiB guest, ws=64M, 1 vCPU; 1 and 2 channels, three
    /// times each) and the limits, and prints the figures. Ignored by default: it needs
    /// `qemu-system-x86_64` and KVM and takes about two minutes. Run with
    /// `cargo test -p ferry-bench --release -- --ignored --nocapture qemu_loopback`;
    /// `FERRY_QEMU_RUNS=N` changes the repetitions, `FERRY_QEMU_NODEFAULTS=0` keeps
    /// QEMU's default devices, `FERRY_QEMU_PREALLOC=1` preallocates the destination.
    #[test]
    #[ignore = "a benchmark, not a test: minutes of 1 GiB migrations (a_small_qemu_migration_is_measured covers the driver)"]
    fn qemu_loopback_migrations() {
        use crate::stats::Summary;
        let dir = WorkDir::new().unwrap();
        let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0).unwrap();
        let runs: usize = std::env::var("FERRY_QEMU_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        for channels in [1, 2] {
            let mut results = Vec::new();
            for _ in 0..runs {
                let mut cfg = QemuConfig::new(&image);
                cfg.channels = channels;
                cfg.nodefaults = std::env::var("FERRY_QEMU_NODEFAULTS").as_deref() != Ok("0");
                cfg.dest_prealloc = std::env::var("FERRY_QEMU_PREALLOC").as_deref() == Ok("1");
                let r = run_migration(&cfg).unwrap();
                println!("{}", serde_json::to_string(&r).unwrap());
                assert!(r.guest_ok(), "guest not ok after migration: {r:?}");
                results.push(r);
            }
            let col =
                |f: fn(&QemuResult) -> f64| Summary::of(&results.iter().map(f).collect::<Vec<_>>());
            println!(
                "channels={channels}: total {} ms, QEMU downtime {} ms, guest downtime {} ms, \
                 switchover gap {} ms, bytes {} GB, throughput {} GB/s, other CPUs {}",
                col(|r| r.total_ms).display(1.0, 0),
                col(|r| r.downtime_ms).display(1.0, 0),
                col(|r| r.guest_downtime_ms).display(1.0, 1),
                col(|r| r.switchover_gap_ms).display(1.0, 1),
                col(|r| r.bytes as f64).display(1e9, 3),
                col(|r| r.throughput_bytes_per_s).display(1e9, 3),
                col(|r| r.other_cpus).display(1.0, 2),
            );
        }
        let memcpy = crate::limits::memcpy_bandwidth(256 << 20, 5);
        println!("memcpy 256 MiB: {:.2} GB/s", memcpy / 1e9);
        for conns in [1, 2] {
            let tcp = crate::limits::loopback_tcp_bandwidth(conns, 2 << 30).unwrap();
            println!("loopback TCP x{conns}: {:.2} GB/s", tcp / 1e9);
        }
    }
}
