//! `ferry-bench`: Ferry's benchmarks, side by side with QEMU and the machine's limits.
//!
//! - `migrate`: the issue 3 case (1 GiB guest, 64 MiB hot working set) migrated on
//!   loopback by QEMU 7.2 and by Ferry, alternating, with memcpy and loopback TCP
//!   bandwidth measured in the same run.
//! - `prepare`: destination memory preparation throughput (issue 4).
//! - `migrate-prepare`: a 4 GiB Ferry migration with destination preparation off and on.
//! - `dirty-log`: the time of each KVM dirty-log call and the guest's worst stall, by RAM
//!   size and page kind (issue 4).
//! - `faults`: the fault matrix (issue 7): faults and hostile operations against real
//!   `ferry` processes at every moment of a migration, each case several times.
//! - `local`: a local hand-over (issue 10), QEMU 7.2 `x-ignore-shared` against Ferry
//!   `migrate --local`, at 1, 4 and 8 GiB.
//! - `secure`: mutual TLS, checksums and compression (issue 11) against QEMU 7.2
//!   `tls-creds-x509` and multifd zstd, on loopback and on links shaped to 1 and 10 Gbit/s.
//! - `demand-paging`: the fault path alone (issue 8): N threads touching missing memory,
//!   faults resolved through one shared userfaultfd, one per range, or by the touching
//!   thread itself.
//! - `postcopy`: postcopy switching at once (issue 8), QEMU 7.2 `postcopy-ram` (with and
//!   without `postcopy-preempt`) against Ferry `migrate --postcopy`, with the fault-latency
//!   floor (a loopback round trip carrying a page, plus a page copy) in the same run.
//!
//! Build both binaries first: `cargo build --release -p ferry-cli -p ferry-bench`, then
//! `target/release/ferry-bench SUBCOMMAND`. See BENCHMARKS.md.

mod bench;
mod cleanup;
mod demand;
mod devices;
mod dirtylog;
mod faults;
mod ferry;
mod limits;
mod local;
mod netshape;
mod pin;
mod postcopy;
mod prepare;
mod qemu;
mod secure;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench::{Case, Plan};
use crate::pin::Pinning;

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    about = "Ferry benchmarks: side by side with QEMU and the machine's limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live migration of the same guest by QEMU and by Ferry, alternating (issue 3).
    Migrate(MigrateArgs),
    /// Memory preparation (MADV_POPULATE_WRITE) by size, page kind and threads (issue 4).
    Prepare(PrepareArgs),
    /// A large Ferry migration with destination memory preparation off and on (issue 4).
    MigratePrepare(MigratePrepareArgs),
    /// KVM dirty-log call times and guest stalls by RAM size and page kind (issue 4).
    DirtyLog(DirtyLogArgs),
    /// The fault matrix: faults and hostile API use at every moment of a migration (issue 7).
    Faults(FaultArgs),
    /// Local hand-over without copying memory, QEMU x-ignore-shared vs Ferry --local, by
    /// size (issue 10).
    Local(LocalArgs),
    /// Mutual TLS, checksums and compression, QEMU 7.2 tls-creds-x509 and multifd zstd vs
    /// Ferry, on loopback and shaped links (issue 11; needs root for the links).
    Secure(SecureArgs),
    /// Postcopy switching at once, QEMU 7.2 postcopy-ram (and postcopy-preempt) vs Ferry
    /// --postcopy, and the fault-latency floor (issue 8).
    Postcopy(PostcopyArgs),
    /// The fault path alone: N threads touching missing memory, one shared userfaultfd vs
    /// one per range vs the touching thread resolving its own fault (issue 8).
    DemandPaging(DemandArgs),
    /// Device state: downtime by device count and state size, devices saved and loaded
    /// side by side vs one after another, and a 64-vCPU VM's vCPU state both ways (issue 9).
    Devices(DevicesArgs),
}

#[derive(Args)]
struct DevicesArgs {
    /// Device counts (1 to 16).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    counts: Vec<usize>,
    /// Device memory sizes (their stop-copy state), MiB.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    sizes: Vec<u64>,
    /// Each device's load on the destination (firmware), ms.
    #[arg(long, default_value_t = 20)]
    load_ms: u32,
    /// vCPUs of the big-VM rows (2 of them run, the rest halt); 0 for none.
    #[arg(long, default_value_t = 64)]
    big_vcpus: u32,
    /// Repetitions of every configuration and mode.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The ferry binary (default: `ferry` next to this program).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// Print every raw run as one JSON document on stdout (the tables then go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemandArgs {
    /// Thread ("vCPU") counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    vcpus: Vec<usize>,
    /// Memory each thread touches, MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Repetitions.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print every raw run as one JSON document on stdout (the tables then go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PostcopyArgs {
    /// Repetitions of every configuration.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u64,
    /// Hot working set the guest rewrites continuously (`ws=`).
    #[arg(long, default_value = "64M")]
    ws: String,
    /// vCPU counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    vcpus: Vec<u32>,
    /// Ferry's data channels.
    #[arg(long, default_value_t = 2)]
    channels: u32,
    /// Systems to run: qemu, qemu-preempt, ferry (anonymous destination memory),
    /// ferry-memfd (memfd destination memory: MINOR faults, prepared pages kept),
    /// ferry-hugetlb (hugetlb destination memory, 2 MiB pages; reserves them, needs root).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qemu,qemu-preempt,ferry,ferry-memfd,ferry-hugetlb"
    )]
    systems: Vec<String>,
    /// Extra arguments for Ferry's `migrate` (after `--postcopy`), comma-separated, e.g.
    /// `--no-checksums`.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    migrate_args: Vec<String>,
    /// The ferry binary (default: `ferry` next to this program).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: PathBuf,
    /// Print every raw run as one JSON document on stdout (the tables then go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SecureArgs {
    /// Repetitions of every configuration.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u64,
    /// Hot working set the guest rewrites continuously (`ws=`).
    #[arg(long, default_value = "16M")]
    ws: String,
    /// Links for the compression runs: `loopback` or tc rates (`none` for no compression
    /// runs; with `--tls-links none` too, only the limits are measured).
    #[arg(long, value_delimiter = ',', default_value = "1gbit,10gbit,loopback")]
    links: Vec<String>,
    /// Only the configurations whose "system config" name contains this (e.g. `ferry auto`).
    #[arg(long)]
    only: Option<String>,
    /// Links for the TLS runs (`none` for no TLS runs).
    #[arg(long, value_delimiter = ',', default_value = "loopback,10gbit")]
    tls_links: Vec<String>,
    /// The ferry binary (default: `ferry` next to this program).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: PathBuf,
    /// Print every raw run as one JSON document on stdout (the tables then go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LocalArgs {
    /// Guest sizes in GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sizes: Vec<u64>,
    /// Repetitions per size and system.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Hot working set the guest rewrites continuously (`ws=`).
    #[arg(long, default_value = "64M")]
    ws: String,
    /// Seconds the guest runs after its ready line before the hand-over.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// The ferry binary (default: `ferry` next to this program).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: PathBuf,
    /// Print every raw run as one JSON document on stdout (the tables then go to stderr).
    #[arg(long)]
    json: bool,
    /// Pin both systems alike (as `migrate --pin`): the vCPU on the first CPU, every other
    /// thread of both processes and of the bench on the others (`update --exec` runs are
    /// not placed).
    #[arg(long)]
    pin: bool,
}

#[derive(Args)]
struct FaultArgs {
    /// Runs of every case.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// The ferry binary (default: `ferry` next to this program).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogPages {
    /// 4 KiB pages.
    #[value(name = "4k")]
    Small,
    /// Transparent huge pages.
    Thp,
    /// hugetlb 2 MiB pages (reserved for the run through /proc/sys/vm/nr_hugepages; root).
    Hugetlb,
}

#[derive(Args)]
struct DirtyLogArgs {
    /// Guest RAM sizes in GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sizes: Vec<u64>,
    /// Page kinds.
    #[arg(long, value_delimiter = ',', default_value = "4k,thp,hugetlb")]
    pages: Vec<LogPages>,
    /// Print the rows as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Options shared by the two migration benchmarks.
#[derive(Args)]
struct Common {
    /// vCPUs of the guest (both systems).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Channels: QEMU multifd channels (1 = QEMU's single stream) and Ferry data channels.
    #[arg(long, default_value_t = 2)]
    channels: u32,
    /// Hot working set the guest rewrites continuously (`ws=`).
    #[arg(long, default_value = "64M")]
    ws: String,
    /// Downtime limit for both systems, ms (default: each system's own, QEMU 300, Ferry 50).
    #[arg(long)]
    downtime_limit: Option<u64>,
    /// Seconds the guest runs after its ready line before the migration starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Add the Ferry variant with the destination's preparation helpers at nice 0
    /// (on by default with 2 or more vCPUs, whose busy vCPUs starve nice-19 helpers).
    #[arg(long)]
    nice0: bool,
    /// Pin both systems alike, from outside (as `taskset`, libvirt's `emulatorpin` and
    /// `vcpupin` do): the bench and both VMs start on every CPU but the first N (N =
    /// vCPUs), and vCPU i moves to the i-th CPU once both VMs answer. Needs more CPUs than
    /// vCPUs.
    #[arg(long)]
    pin: bool,
    /// The ferry binary (default: `ferry` next to this program, i.e. target/release/ferry).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// Print every raw run and the summaries as one JSON document on stdout (the tables
    /// then go to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    common: Common,
    /// Repetitions (each runs every row once).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu: PathBuf,
    /// Ferry rows only (no QEMU; no ratios).
    #[arg(long)]
    no_qemu: bool,
}

#[derive(Args)]
struct MigratePrepareArgs {
    #[command(flatten)]
    common: Common,
    /// Repetitions (each runs every row once).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Guest memory, GiB.
    #[arg(long, default_value_t = 4)]
    memory_gib: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PageKind {
    /// 4 KiB pages.
    #[value(name = "4k")]
    Small,
    /// Transparent huge pages (MADV_HUGEPAGE).
    Thp,
}

#[derive(Args)]
struct PrepareArgs {
    /// Sizes in GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sizes: Vec<u64>,
    /// Helper thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Page kinds.
    #[arg(long, value_delimiter = ',', default_value = "4k,thp")]
    pages: Vec<PageKind>,
    /// Repetitions per configuration.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Do not pre-warm: measure first touch of memory the outer host may not back yet
    /// (slower and much more variable on this nested machine).
    #[arg(long)]
    cold: bool,
    /// Print the rows as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
}

/// The ferry binary: `explicit`, or `ferry` next to this program.
fn locate_ferry(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("ferry"),
    };
    if !path.is_file() {
        bail!(
            "no ferry binary at {}: build it first with `cargo build --release -p ferry-cli` \
             (or give --ferry PATH)",
            path.display()
        );
    }
    Ok(path)
}

/// Prints the human report on stdout, or on stderr with the JSON on stdout.
fn emit(text: &str, json: Option<serde_json::Value>) {
    match json {
        Some(j) => {
            eprintln!("{text}");
            println!("{j}");
        }
        None => println!("{text}"),
    }
}

fn case(c: &Common, mem_mib: u64, qemu: PathBuf, image: &Path) -> Result<Case> {
    if c.vcpus == 0 || c.channels == 0 {
        bail!("--vcpus and --channels must be at least 1");
    }
    Ok(Case {
        mem_mib,
        cpus: c.vcpus,
        ws: c.ws.clone(),
        channels: c.channels,
        downtime_limit_ms: c.downtime_limit,
        warmup: Duration::try_from_secs_f64(c.warmup).context("--warmup")?,
        ferry: locate_ferry(c.ferry.clone())?,
        qemu,
        image: image.to_path_buf(),
        pin: c
            .pin
            .then(|| Pinning::for_vcpus(c.vcpus, &ferry_sys::sched::affinity()?))
            .transpose()?,
    })
}

/// Whether `bin` names an executable file (as a path, or found in `PATH`).
/// QEMU must be there: the QEMU rows are the point of these benchmarks.
fn require_qemu(qemu: &Path) -> Result<()> {
    if !executable_exists(qemu) {
        bail!(
            "{} not found: install QEMU 7.2 with `apt-get install qemu-system-x86`, or give \
             --qemu PATH",
            qemu.display()
        );
    }
    Ok(())
}

fn executable_exists(bin: &Path) -> bool {
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn migrate(a: MigrateArgs) -> Result<()> {
    if !a.no_qemu && !executable_exists(&a.qemu) {
        bail!(
            "{} not found: install QEMU 7.2 with `apt-get install qemu-system-x86` (or run \
             crates/ferry-bench/run.sh, which does), give --qemu PATH, or use --no-qemu",
            a.qemu.display()
        );
    }
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let case = case(&a.common, a.memory_mib, a.qemu, &image)?;
    if let Some(p) = &case.pin {
        pin::confine_bench(p)?;
    }
    let nice0 = a.common.nice0 || a.common.vcpus >= 2;
    let plan = Plan {
        rows: bench::migrate_rows(case.channels, !a.no_qemu, nice0),
        case,
        reps: a.reps,
        limits: true,
    };
    let report = bench::run(&plan)?;
    emit(
        &report.migrate_text(),
        a.common.json.then(|| report.to_json("migrate")),
    );
    Ok(())
}

fn migrate_prepare(a: MigratePrepareArgs) -> Result<()> {
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let mem_mib = a
        .memory_gib
        .checked_mul(1024)
        .filter(|&m| m > 0)
        .context("--memory-gib must be at least 1")?;
    let case = case(
        &a.common,
        mem_mib,
        PathBuf::from("qemu-system-x86_64"),
        &image,
    )?;
    if let Some(p) = &case.pin {
        pin::confine_bench(p)?;
    }
    let nice0 = a.common.nice0 || a.common.vcpus >= 2;
    let plan = Plan {
        rows: bench::migrate_prepare_rows(nice0),
        case,
        reps: a.reps,
        limits: false,
    };
    let report = bench::run(&plan)?;
    emit(
        &report.migrate_prepare_text(),
        a.common.json.then(|| report.to_json("migrate-prepare")),
    );
    Ok(())
}

fn prepare_bench(a: PrepareArgs) -> Result<()> {
    let huge: Vec<bool> = a.pages.iter().map(|p| matches!(p, PageKind::Thp)).collect();
    let load = bench::other_load(Duration::from_secs(1))?;
    eprintln!(
        "other load before the first run: {load:.2} CPUs busy (of {})",
        bench::cpu_count()
    );
    let started = bench::utc_now();
    let rows =
        prepare::run(&a.sizes, &a.threads, &huge, a.reps, !a.cold).map_err(anyhow::Error::msg)?;
    let text = format!(
        "ferry-bench prepare: MADV_POPULATE_WRITE through ferry_memory::prepare ({started} UTC)\n\
         machine: {} CPUs; other load before the first run {load:.2} CPUs\n{}",
        bench::cpu_count(),
        prepare::table(&rows)
    );
    let json = a.json.then(|| {
        serde_json::json!({
            "benchmark": "prepare",
            "started_utc": started,
            "machine": { "cpus": bench::cpu_count() },
            "load_before_cpus": load,
            "reps": a.reps,
            "prewarmed": !a.cold,
            "rows": rows,
        })
    });
    emit(&text, json);
    Ok(())
}

fn dirty_log(a: DirtyLogArgs) -> Result<()> {
    let kinds: Vec<dirtylog::Kind> = a
        .pages
        .iter()
        .map(|p| match p {
            LogPages::Small => dirtylog::Kind::Small,
            LogPages::Thp => dirtylog::Kind::Thp,
            LogPages::Hugetlb => dirtylog::Kind::Hugetlb,
        })
        .collect();
    let m = dirtylog::run(&a.sizes, &kinds)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m.rows)?);
    } else {
        dirtylog::print_table(&m.rows);
    }
    if !m.failed.is_empty() {
        bail!(
            "{} measurement(s) failed:\n{}",
            m.failed.len(),
            m.failed.join("\n")
        );
    }
    Ok(())
}

fn fault_matrix(a: FaultArgs) -> Result<()> {
    let cfg = ferry_testkit::matrix::Config {
        ferry: locate_ferry(a.ferry)?,
    };
    let started = bench::utc_now();
    let table = faults::run(&cfg, a.reps.max(1), a.only.as_deref())?;
    println!(
        "ferry-bench faults ({started} UTC): every case {} times; switchover timeout {} ms, \
         progress timeout {} ms, handshake timeout {} ms\n{table}",
        a.reps.max(1),
        ferry_testkit::matrix::SWITCHOVER_MS,
        ferry_testkit::matrix::PROGRESS_MS,
        ferry_testkit::matrix::HANDSHAKE_MS
    );
    Ok(())
}

fn local_handover(a: LocalArgs) -> Result<()> {
    require_qemu(&a.qemu)?;
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let plan = local::Plan {
        sizes_gib: a.sizes,
        reps: a.reps,
        append: format!("ws={} hb=1", a.ws),
        warmup: Duration::try_from_secs_f64(a.warmup).context("--warmup")?,
        ferry: locate_ferry(a.ferry)?,
        qemu: a.qemu,
        image,
        pin: a
            .pin
            .then(|| Pinning::for_vcpus(1, &ferry_sys::sched::affinity()?))
            .transpose()?,
    };
    if let Some(p) = &plan.pin {
        pin::confine_bench(p)?;
    }
    let report = local::run(&plan)?;
    emit(&report.text(), a.json.then(|| report.to_json()));
    Ok(())
}

fn devices_bench(a: DevicesArgs) -> Result<()> {
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let plan = devices::Plan {
        counts: a.counts,
        sizes_mib: a.sizes,
        load_ms: a.load_ms,
        big_vcpus: a.big_vcpus,
        reps: a.reps,
        ferry: locate_ferry(a.ferry)?,
        image,
    };
    let report = devices::run(&plan)?;
    emit(&report.text(), a.json.then(|| report.to_json()));
    Ok(())
}

fn postcopy_bench(a: PostcopyArgs) -> Result<()> {
    require_qemu(&a.qemu)?;
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let plan = postcopy::Plan {
        reps: a.reps,
        mem_mib: a.mem,
        ws: a.ws,
        vcpus: a.vcpus,
        channels: a.channels,
        ferry: locate_ferry(a.ferry)?,
        qemu: a.qemu,
        image,
        systems: a.systems,
        migrate_args: a.migrate_args,
    };
    let report = postcopy::run(&plan)?;
    emit(&report.text(), a.json.then(|| report.to_json()));
    Ok(())
}

fn secure_bench(a: SecureArgs) -> Result<()> {
    require_qemu(&a.qemu)?;
    let dir = qemu::WorkDir::new()?;
    let image = ferry_guest::write_image(ferry_guest::ImageKind::Elf, &dir.0)?;
    let certs = dir.0.join("certs");
    ferry_testkit::certs::make_in(&certs).map_err(anyhow::Error::msg)?;
    let plan = secure::Plan {
        reps: a.reps,
        mem_mib: a.mem,
        append: format!("ws={} hb=1", a.ws),
        links: a.links.into_iter().filter(|l| l != "none").collect(),
        tls_links: a.tls_links.into_iter().filter(|l| l != "none").collect(),
        only: a.only,
        ferry: locate_ferry(a.ferry)?,
        qemu: a.qemu,
        image,
        certs,
    };
    let report = secure::run(&plan)?;
    emit(&report.text(), a.json.then(|| report.to_json()));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cleanup::install() {
        eprintln!("ferry-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let r = match cli.command {
        Cmd::Migrate(a) => migrate(a),
        Cmd::Prepare(a) => prepare_bench(a),
        Cmd::MigratePrepare(a) => migrate_prepare(a),
        Cmd::DirtyLog(a) => dirty_log(a),
        Cmd::Faults(a) => fault_matrix(a),
        Cmd::Local(a) => local_handover(a),
        Cmd::Secure(a) => secure_bench(a),
        Cmd::Postcopy(a) => postcopy_bench(a),
        Cmd::Devices(a) => devices_bench(a),
        Cmd::DemandPaging(a) => {
            let plan = demand::Plan {
                vcpus: a.vcpus,
                mib_per_vcpu: a.mib,
                reps: a.reps,
            };
            demand::run(&plan).map(|r| emit(&r.text(), a.json.then(|| r.to_json())))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: BENCHMARK FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables() {
        assert!(executable_exists(Path::new("sh")));
        assert!(!executable_exists(Path::new("no-such-binary-ferry-bench")));
        assert!(!executable_exists(Path::new("/nonexistent/qemu")));
        assert!(locate_ferry(Some("/nonexistent/ferry".into())).is_err());
    }

    #[test]
    fn parses_arguments() {
        let cli =
            Cli::try_parse_from(["ferry-bench", "prepare", "--sizes", "1,4", "--pages", "thp"])
                .unwrap();
        match cli.command {
            Cmd::Prepare(a) => {
                assert_eq!(a.sizes, [1, 4]);
                assert_eq!(a.threads, [1, 2]);
                assert!(matches!(a.pages[..], [PageKind::Thp]));
                assert_eq!(a.reps, 3);
            }
            _ => panic!("wrong subcommand"),
        }
        let cli = Cli::try_parse_from(["ferry-bench", "migrate", "--vcpus", "2"]).unwrap();
        match cli.command {
            Cmd::Migrate(a) => {
                assert_eq!((a.common.vcpus, a.common.channels, a.reps), (2, 2, 5));
                assert_eq!(a.memory_mib, 1024);
            }
            _ => panic!("wrong subcommand"),
        }
        let cli = Cli::try_parse_from(["ferry-bench", "migrate-prepare"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::MigratePrepare(MigratePrepareArgs {
                reps: 3,
                memory_gib: 4,
                ..
            })
        ));
    }
}
