//! `ferry`: live migration for KVM virtual machines.

mod client;
mod demo;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_memory::ram::{Backend, MemoryConfig};
use ferry_migrate::recv::{PrepareMode, ReceiveParams};
use ferry_transport::Uri;
use ferry_vmm::runner::{self, Boot, Outcome, RunConfig, SerialConfig};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration for KVM virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM: boot a multiboot image, restore a snapshot, or wait for a migration.
    Run(RunArgs),
    /// Send a command to a running VM's control API.
    Remote(RemoteArgs),
    /// Migrate a self-checking workload guest between two ferry processes on this machine.
    Demo(demo::DemoArgs),
    /// Take a VM over from the ferry that exec'd this one (`remote update --exec`); not
    /// run by hand.
    #[command(hide = true)]
    Takeover(TakeoverArgs),
}

#[derive(Args)]
struct TakeoverArgs {
    /// Print the hand-over format this binary reads, and exit.
    #[arg(long)]
    check: bool,
    /// Inherited guest memory file.
    #[arg(long, required_unless_present = "check")]
    memory_fd: Option<i32>,
    /// Inherited machine state.
    #[arg(long, required_unless_present = "check")]
    state_fd: Option<i32>,
    /// The previous binary, run again if this one cannot take over.
    #[arg(long)]
    fallback_fd: Option<i32>,
    /// The API connection to answer.
    #[arg(long)]
    reply_fd: Option<i32>,
    /// This is the previous binary taking the VM back; why the new one failed.
    #[arg(long)]
    fell_back: Option<String>,
}

/// Parses sizes like 512M, 1G, 64K or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size '{s}' (examples: 512M, 1G, 65536)"))
}

#[derive(Args)]
struct RunArgs {
    /// Multiboot v1 image to boot (ELF32, or flat with load addresses in its header).
    #[arg(long, value_name = "IMAGE")]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    append: String,
    /// Guest RAM [default: 512M] (a restored snapshot brings its own).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Number of vCPUs [default: 1] (a restored snapshot brings its own).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest serial output: stdout, file:PATH or null.
    #[arg(long, default_value = "stdout")]
    serial: SerialConfig,
    /// Serve the control API on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A test device with its own memory, a stand-in for a VFIO device such as a vGPU:
    /// `testdev,mem=SIZE[,load-ms=N]` (repeatable; device i answers MMIO at
    /// 0xD0000000 + i * 16 MiB). Loading its final state on a migration destination takes
    /// load-ms. A migration destination needs the same ones, or none.
    #[arg(long = "device", value_name = "SPEC", value_parser = parse_device)]
    devices: Vec<ferry_vmm::testdev::TestDevConfig>,
    /// Guest memory backend: anonymous, memfd or hugetlb.
    #[arg(long, default_value = "anonymous")]
    memory_backend: Backend,
    /// Back anonymous guest memory with transparent huge pages.
    #[arg(long)]
    hugepages: bool,
    /// Resume a snapshot file instead of booting.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    restore: Option<PathBuf>,
    /// Wait for an incoming migration on tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "URI", conflicts_with_all = ["kernel", "restore"])]
    incoming: Option<Uri>,
    /// Destination memory preparation while precopy runs: populate, lock or none.
    #[arg(long, default_value = "populate", requires = "incoming")]
    prepare: PrepareMode,
    /// Threads for memory preparation (default: as many as CPU affinity and cgroup quota allow).
    #[arg(long, requires = "incoming")]
    prepare_threads: Option<usize>,
    /// Nice value of the preparation threads (19 yields to vCPUs and transfer threads).
    #[arg(
        long,
        default_value_t = 19,
        allow_negative_numbers = true,
        requires = "incoming"
    )]
    prepare_nice: i32,
    /// Write a digest of every guest page at the switchover to this file (for verification;
    /// the hashing happens inside the switchover, so give the source a --switchover-timeout
    /// long enough for it).
    #[arg(long, requires = "incoming")]
    digest_file: Option<PathBuf>,
    /// Milliseconds a connection to --incoming has to complete the Ferry handshake (and a
    /// migration's channels to follow its first one); others are dropped.
    #[arg(long, default_value_t = 10_000, requires = "incoming")]
    handshake_timeout: u64,
    /// Accept only mutual-TLS migrations: DIR holds ca.pem (the CA that signs the sources
    /// this side trusts), cert.pem and key.pem (this side's own); see
    /// scripts/make-test-certs.sh.
    #[arg(long, value_name = "DIR", requires = "incoming")]
    tls_dir: Option<PathBuf>,
    /// Postcopy: split guest memory into N ranges, each with its own userfaultfd and fault
    /// handler thread (default: one per vCPU).
    #[arg(long, value_name = "N", requires = "incoming", value_parser = clap::value_parser!(u16).range(1..=16))]
    fault_queues: Option<u16>,
}

#[derive(Args)]
struct RemoteArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Subcommand)]
enum RemoteCommand {
    /// State, memory, vCPUs, migration progress.
    Info,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume {
        /// After an unconfirmed hand-over: resume here anyway, accepting that the other
        /// side may run the guest too.
        #[arg(long)]
        force: bool,
    },
    /// Write a snapshot (memory and complete state) to a file.
    Snapshot {
        /// Output file.
        path: PathBuf,
    },
    /// Stop the VM and its process (a migration that has not committed is aborted first).
    Quit {
        /// After an unconfirmed hand-over: quit anyway, accepting that this may be the only
        /// copy of the guest.
        #[arg(long)]
        force: bool,
    },
    /// Live-migrate the VM; waits until it has ended.
    Migrate(MigrateArgs),
    /// Cancel a running migration (a source keeps the guest; a destination discards the
    /// incoming attempt and waits for the next).
    MigrateCancel,
    /// Switch the running migration to postcopy (at the end of the pass in flight); it must
    /// have been started with --postcopy-on-request or --postcopy-after-precopy.
    MigrateStartPostcopy,
    /// On the destination of a postcopy that broke off: listen on URI as well, for the
    /// source's reconnection (`migrate URI --resume` on the source).
    MigrateRecover {
        /// tcp:HOST:PORT or unix:PATH (a path that does not exist yet).
        uri: Uri,
    },
    /// Live update in place: the VM's process execs a new ferry binary, which takes the VM
    /// over (same PID, memory mapped again, not copied). Needs --memory-backend memfd or
    /// hugetlb.
    Update {
        /// The new ferry binary.
        #[arg(long, value_name = "PATH")]
        exec: PathBuf,
    },
}

#[derive(Args)]
struct MigrateArgs {
    /// Destination: tcp:HOST:PORT or unix:PATH.
    uri: Uri,
    /// Parallel data channels.
    #[arg(long, default_value_t = 4)]
    channels: u16,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 50)]
    downtime_limit: u64,
    /// Bandwidth cap over all channels, bytes per second.
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// Do not throttle vCPUs when precopy does not converge.
    #[arg(long)]
    no_auto_converge: bool,
    /// Write a digest of every guest page at the switchover to this file.
    #[arg(long)]
    digest_file: Option<PathBuf>,
    /// Milliseconds to connect and complete the handshake with the destination.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout: u64,
    /// Milliseconds precopy may go without the destination acknowledging any progress.
    #[arg(long, default_value_t = 30_000)]
    progress_timeout: u64,
    /// Milliseconds the guest may stay paused here before the hand-over commits; past it
    /// the migration is aborted and the guest resumes here.
    #[arg(long, default_value_t = 2_000)]
    switchover_timeout: u64,
    /// Local hand-over to a destination on this host (a unix: URI): pass the guest memory
    /// file instead of copying pages (the VM needs --memory-backend memfd or hugetlb).
    #[arg(long)]
    local: bool,
    /// Mutual TLS on every channel: DIR holds ca.pem (the CA that signs the destinations
    /// this side trusts), cert.pem and key.pem (this side's own).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the URI's host).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    tls_hostname: Option<String>,
    /// Page compression: none, lz4, zstd, zstd:LEVEL (1-19) or auto (per channel and batch,
    /// the cheapest of raw, lz4 and zstd:1 on the measured link).
    #[arg(long, default_value = "none", value_parser = parse_compress)]
    compress: String,
    /// No checksums on frames and pages (they are on by default without TLS).
    #[arg(long)]
    no_checksums: bool,
    /// Save and load device and vCPU state one device after another on one thread (the
    /// shape of QEMU before 10.0), instead of side by side.
    #[arg(long)]
    serial_devices: bool,
    /// Postcopy right after the setup: the guest runs on the destination at once and pulls
    /// the pages it lacks (no precopy pass).
    #[arg(long, conflicts_with_all = ["postcopy_after_precopy", "postcopy_on_request", "local"])]
    postcopy: bool,
    /// Precopy first; switch to postcopy when precopy does not converge (instead of
    /// throttling the guest), or on migrate-start-postcopy.
    #[arg(long, conflicts_with_all = ["postcopy_on_request", "local"])]
    postcopy_after_precopy: bool,
    /// Precopy, but allow migrate-start-postcopy to switch to postcopy.
    #[arg(long, conflicts_with = "local")]
    postcopy_on_request: bool,
    /// Print the final statistics as one JSON line.
    #[arg(long)]
    json: bool,
    /// A postcopy that broke off reconnects to URI (where the destination listens after
    /// its `migrate-recover URI`), at once; returns when the source has taken it. The
    /// running migration keeps its other settings.
    #[arg(long, conflicts_with_all = [
        "postcopy", "postcopy_after_precopy", "postcopy_on_request", "local", "json",
        "channels", "downtime_limit", "max_bandwidth", "no_auto_converge", "digest_file",
        "handshake_timeout", "progress_timeout", "switchover_timeout", "tls_dir",
        "tls_hostname", "compress", "no_checksums", "serial_devices",
    ])]
    resume: bool,
}

/// The API's `postcopy` value for the postcopy flags.
fn postcopy_mode(m: &MigrateArgs) -> &'static str {
    if m.postcopy {
        "now"
    } else if m.postcopy_after_precopy {
        "after-precopy"
    } else if m.postcopy_on_request {
        "on-request"
    } else {
        "off"
    }
}

/// Checks a `--compress` value here, so a typo fails before anything is sent.
/// `--device testdev,mem=SIZE[,load-ms=N]`.
fn parse_device(s: &str) -> Result<ferry_vmm::testdev::TestDevConfig, String> {
    let rest = s.strip_prefix("testdev,").ok_or_else(|| {
        format!("'{s}': the only device kind is testdev (testdev,mem=SIZE[,load-ms=N])")
    })?;
    ferry_vmm::testdev::TestDevConfig::parse(rest).map_err(|e| e.to_string())
}

fn parse_compress(s: &str) -> Result<String, String> {
    s.parse::<ferry_migrate::channel::Compression>()
        .map(|c| c.to_string())
}

/// The environment variable of the test hook that flips one byte of an incoming guest's
/// memory once it has all arrived (so that tests can prove the digest check catches it).
pub const FLIP_BYTE_ENV: &str = "FERRY_TEST_FLIP_BYTE";

/// The guest address `FERRY_TEST_FLIP_BYTE` names (decimal or 0x-hex), if it is set.
fn flip_byte_hook() -> Result<Option<u64>> {
    let Ok(v) = std::env::var(FLIP_BYTE_ENV) else {
        return Ok(None);
    };
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed
        .map(Some)
        .with_context(|| format!("{FLIP_BYTE_ENV}={v:?} is not a guest address"))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let boot = match (args.kernel, args.restore, args.incoming) {
        (Some(path), None, None) => Boot::Kernel {
            path,
            append: args.append,
        },
        (None, Some(path), None) => {
            if args.memory.is_some() || args.vcpus.is_some() {
                bail!(
                    "--memory and --vcpus come from the snapshot; do not give them with --restore"
                );
            }
            Boot::Restore { path }
        }
        (None, None, Some(uri)) => Boot::Incoming {
            uri,
            params: ReceiveParams {
                prepare: args.prepare,
                prepare_threads: args.prepare_threads,
                prepare_nice: args.prepare_nice,
                digest_file: args.digest_file,
                flip_byte_at: flip_byte_hook()?,
                handshake_timeout: std::time::Duration::from_millis(args.handshake_timeout),
                tls: args
                    .tls_dir
                    .map(|d| ferry_transport::TlsConfig::load(&d, None))
                    .transpose()?,
                fault_queues: args.fault_queues.map(usize::from),
            },
        },
        _ => bail!("give one of --kernel IMAGE, --restore FILE or --incoming URI"),
    };
    let cfg = RunConfig {
        boot,
        memory: MemoryConfig {
            size: args.memory.unwrap_or(512 << 20),
            backend: args.memory_backend,
            thp: args.hugepages,
        },
        vcpus: args.vcpus.unwrap_or(1),
        serial: args.serial,
        api_socket: args.api_socket,
        testdevs: args.devices,
    };
    run_to_end(cfg)
}

/// Runs the VM configured by `cfg` and turns its end into the exit status.
fn run_to_end(cfg: RunConfig) -> Result<ExitCode> {
    let outcome = runner::run(cfg, |stats| {
        eprintln!(
            "ferry: incoming migration complete: {}",
            serde_json::to_string(stats).unwrap_or_default()
        );
    })?;
    Ok(match outcome {
        Outcome::GuestStopped { reason, error } => {
            eprintln!("ferry: {reason}");
            if error {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Outcome::Quit | Outcome::MigratedAway => ExitCode::SUCCESS,
    })
}

fn takeover(a: TakeoverArgs) -> Result<ExitCode> {
    if a.check {
        println!("{}", ferry_vmm::update::CHECK_REPLY);
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(memory), Some(state)) = (a.memory_fd, a.state_fd) else {
        bail!("takeover needs --memory-fd and --state-fd");
    };
    let inh =
        ferry_vmm::update::Inherited::claim(memory, state, a.fallback_fd, a.reply_fd, a.fell_back)?;
    let h = &inh.state.header;
    let serial = match h.serial.strip_prefix("file:") {
        Some(p) => SerialConfig::Append(PathBuf::from(p)),
        None => h.serial.parse().map_err(anyhow::Error::msg)?,
    };
    let cfg = RunConfig {
        memory: MemoryConfig {
            size: h.memory_bytes,
            backend: Backend::Anonymous,
            thp: false,
        },
        vcpus: h.vcpus,
        serial,
        api_socket: h.api_socket.clone(),
        testdevs: Vec::new(),
        boot: Boot::Takeover(Box::new(inh)),
    };
    run_to_end(cfg)
}

fn remote(args: RemoteArgs) -> Result<ExitCode> {
    let sock = &args.api_socket;
    let print =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match args.command {
        RemoteCommand::Info => print(client::request(sock, &json!({"command": "info"}), |_| {})?),
        RemoteCommand::Pause => {
            client::request(sock, &json!({"command": "pause"}), |_| {})?;
        }
        RemoteCommand::Resume { force } => {
            say(client::request(
                sock,
                &json!({"command": "resume", "force": force}),
                |_| {},
            )?);
        }
        RemoteCommand::Quit { force } => {
            say(client::request(
                sock,
                &json!({"command": "quit", "force": force}),
                |_| {},
            )?);
        }
        RemoteCommand::Update { exec } => {
            let exec = std::path::absolute(&exec).context("--exec path")?;
            print(client::request(
                sock,
                &json!({"command": "update", "exec": exec}),
                |_| {},
            )?)
        }
        RemoteCommand::MigrateCancel => {
            say(client::request(
                sock,
                &json!({"command": "migrate-cancel"}),
                |_| {},
            )?);
        }
        RemoteCommand::MigrateStartPostcopy => {
            say(client::request(
                sock,
                &json!({"command": "migrate-start-postcopy"}),
                |_| {},
            )?);
        }
        RemoteCommand::Snapshot { path } => {
            let path = std::path::absolute(&path).context("snapshot path")?;
            print(client::request(
                sock,
                &json!({"command": "snapshot", "path": path}),
                |_| {},
            )?)
        }
        RemoteCommand::MigrateRecover { uri } => {
            say(client::request(
                sock,
                &json!({"command": "migrate-recover", "uri": uri.to_string()}),
                |_| {},
            )?);
        }
        RemoteCommand::Migrate(m) if m.resume => {
            say(client::request(
                sock,
                &json!({"command": "migrate", "uri": m.uri.to_string(), "resume": true}),
                |_| {},
            )?);
        }
        RemoteCommand::Migrate(m) => {
            let postcopy = postcopy_mode(&m);
            let req = json!({
                "command": "migrate",
                "uri": m.uri.to_string(),
                "channels": m.channels,
                "downtime_limit_ms": m.downtime_limit,
                "max_bandwidth": m.max_bandwidth,
                "auto_converge": !m.no_auto_converge,
                "digest_file": m.digest_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
                "handshake_timeout_ms": m.handshake_timeout,
                "local": m.local,
                "tls_dir": m.tls_dir.map(|p| std::path::absolute(&p).unwrap_or(p)),
                "tls_hostname": m.tls_hostname,
                "compress": m.compress,
                "checksums": !m.no_checksums,
                "serial_devices": m.serial_devices,
                "postcopy": postcopy,
                "progress_timeout_ms": m.progress_timeout,
                "switchover_timeout_ms": m.switchover_timeout,
            });
            let show = !m.json && std::io::stderr().is_terminal();
            let stats = client::migrate(sock, &req, show)?;
            if m.json {
                println!("{stats}");
            } else {
                print!("{}", client::describe_stats(&stats));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what the engine said it did, when it said something (a command handled by a
/// running migration).
fn say(result: serde_json::Value) {
    if let Some(m) = result.get("message").and_then(|m| m.as_str()) {
        eprintln!("ferry: {m}");
    }
}

/// The error and its causes, each once: most of Ferry's errors already include their cause
/// in their own message.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(a) => run(a),
        Command::Remote(a) => remote(a),
        Command::Demo(a) => demo::run(a),
        Command::Takeover(a) => takeover(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
