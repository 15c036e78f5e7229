//! The control API: JSON over a unix socket, one request per line, one response per line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`). `migrate` also streams
//! `{"event":"progress","progress":{...}}` lines while it runs.
//!
//! Commands: `info`, `pause`, `resume {force?}`, `snapshot {path}`, `quit {force?}`,
//! `migrate {uri, channels?, downtime_limit_ms?, max_bandwidth?, auto_converge?,
//! digest_file?, handshake_timeout_ms?, progress_timeout_ms?, switchover_timeout_ms?,
//! local?, tls_dir?, tls_hostname?, compress?, checksums?, postcopy?, serial_devices?}`,
//! `migrate {uri, resume: true}` (a broken postcopy reconnects to `uri`),
//! `migrate-cancel`, `migrate-start-postcopy`, `migrate-recover {uri}` (a postcopy
//! destination listens on `uri` as well), `update {exec}` (this process execs a new binary
//! that takes the VM over and answers on this connection).
//!
//! While a migration runs, `pause`, `resume`, `snapshot`, `quit` and `migrate-cancel` are
//! decided by the migration's phase ([`crate::owner`]): refused, or turned into a clean
//! abort; never queued to act after the hand-over. `force` is only meaningful after an
//! unconfirmed hand-over.
//!
//! Limits: requests of at most [`MAX_REQUEST`] bytes, at most [`MAX_CONNECTIONS`]
//! connections at once, idle connections closed after [`IDLE_TIMEOUT`]; the socket is
//! created with mode 0600 whatever the umask.
//!
//! When the process ends, closing the API removes the socket first (a new client gets
//! "cannot connect"), then answers every request already sent (refused, since the process
//! is ending) before the process exits: no client is left without a reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_migrate::control::Command;
use ferry_migrate::send::{PostcopyMode, SendParams};
use ferry_migrate::Progress;
use ferry_transport::Uri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::owner::{client_answer, MigrationResult, OwnerError, Role};
use crate::runner::{Event, Vmm};

/// Every command, for the error on an unknown one.
pub const COMMANDS: &[&str] = &[
    "info",
    "pause",
    "resume",
    "snapshot",
    "quit",
    "migrate",
    "migrate-cancel",
    "migrate-start-postcopy",
    "migrate-recover",
    "update",
];

/// Longest request line, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Most API connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the API threads look whether the process is ending; once it is, a connection
/// quiet for this long is closed.
const CLOSING_CHECK: Duration = Duration::from_millis(100);

/// What the API threads share with the process's exit.
#[derive(Debug, Default)]
pub(crate) struct ApiState {
    /// The process is ending: stop accepting, close quiet connections.
    closing: AtomicBool,
    /// Whether the accepting thread still runs.
    accepting: AtomicBool,
    /// Connections open (each on its own thread).
    connections: AtomicUsize,
    /// The socket file, while this process serves it.
    socket: Mutex<Option<SocketFile>>,
}

/// A socket file this process created, known by device and inode so that a file another
/// process put there since is never removed.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn remove_if_ours(&self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ApiState {
    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn remove_socket(&self) {
        if let Some(f) = self.socket.lock().unwrap_or_else(|e| e.into_inner()).take() {
            f.remove_if_ours();
        }
    }
}

impl Vmm {
    /// Stops the API before the process exits: removes the socket, lets the connections
    /// already open get an answer to what they sent (a pending `migrate` or `quit` its
    /// result), and waits for them to close, at most `timeout`.
    pub(crate) fn close_api(&self, timeout: Duration) {
        let api = &self.api;
        api.closing.store(true, Ordering::SeqCst);
        api.remove_socket();
        let deadline = Instant::now() + timeout;
        while (api.accepting.load(Ordering::SeqCst) || api.connections.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Info,
    Pause,
    Resume {
        #[serde(default)]
        force: bool,
    },
    Snapshot {
        path: PathBuf,
    },
    Quit {
        #[serde(default)]
        force: bool,
    },
    Migrate(Box<MigrateRequest>),
    MigrateCancel,
    MigrateStartPostcopy,
    MigrateRecover {
        uri: String,
    },
    Update {
        exec: PathBuf,
    },
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    uri: String,
    channels: Option<u16>,
    downtime_limit_ms: Option<u64>,
    max_bandwidth: Option<u64>,
    auto_converge: Option<bool>,
    digest_file: Option<PathBuf>,
    handshake_timeout_ms: Option<u64>,
    progress_timeout_ms: Option<u64>,
    switchover_timeout_ms: Option<u64>,
    local: Option<bool>,
    /// Directory with ca.pem, cert.pem and key.pem: mutual TLS on every channel.
    tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the URI's host).
    tls_hostname: Option<String>,
    /// none, lz4, zstd, zstd:LEVEL or auto.
    compress: Option<String>,
    /// Checksums on frames and pages without TLS (default true).
    checksums: Option<bool>,
    /// Postcopy: off (default), on-request, after-precopy or now.
    postcopy: Option<String>,
    /// Save and load device state one device after another (default false: side by side).
    serial_devices: Option<bool>,
    /// Point a broken postcopy's reconnections at `uri` (no other field may be given).
    resume: Option<bool>,
}

/// The running API server; removes its socket when dropped (if it is still its own).
pub struct ApiServer {
    vmm: Arc<Vmm>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.vmm.api.closing.store(true, Ordering::SeqCst);
        self.vmm.api.remove_socket();
    }
}

fn api_err(path: &Path, kind: std::io::ErrorKind, msg: String) -> std::io::Error {
    std::io::Error::new(kind, format!("API socket {}: {msg}", path.display()))
}

/// Removes a stale socket left by a dead VMM; refuses a live one or any other file.
fn clear_stale(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        let msg = "exists and is not a socket".into();
        return Err(api_err(path, std::io::ErrorKind::AlreadyExists, msg));
    }
    if UnixStream::connect(path).is_ok() {
        let msg = "another running VMM serves this socket".into();
        return Err(api_err(path, std::io::ErrorKind::AddrInUse, msg));
    }
    std::fs::remove_file(path)
        .map_err(|e| api_err(path, e.kind(), format!("removing the stale socket: {e}")))
}

/// Binds `path` with mode 0600 regardless of the umask: the socket is created in a new
/// private (0700) directory beside it, its mode set, then renamed into place, so nobody
/// else can connect in between.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let err = |e: std::io::Error| api_err(path, e.kind(), e.to_string());
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let private = dir.join(format!(".ferry-api.{}.{stamp:x}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let inner = private.join("sock");
    let r = UnixListener::bind(&inner)
        .and_then(|l| {
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&inner, path)?;
            Ok(l)
        })
        .map_err(err);
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    r
}

/// Starts serving `path`. A stale socket left by a dead VMM is replaced; a socket another
/// VMM still serves, or any other kind of file, is refused.
pub fn serve(path: &Path, vmm: Arc<Vmm>) -> std::io::Result<ApiServer> {
    clear_stale(path)?;
    let listener = bind_private(path)?;
    *vmm.api.socket.lock().unwrap_or_else(|e| e.into_inner()) = Some(SocketFile {
        path: path.to_path_buf(),
        id: file_id(path),
    });
    vmm.api.accepting.store(true, Ordering::SeqCst);
    let v = vmm.clone();
    let spawned = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            accept_until_closing(&listener, &v);
            v.api.accepting.store(false, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        vmm.api.accepting.store(false, Ordering::SeqCst);
        vmm.api.remove_socket();
        return Err(e);
    }
    Ok(ApiServer { vmm })
}

/// Accepts connections until the process is ending and none is waiting (the socket file is
/// gone by then, so none can come).
fn accept_until_closing(listener: &UnixListener, vmm: &Arc<Vmm>) {
    loop {
        let ready = ferry_transport::wait_readable(&[listener.as_fd()], CLOSING_CHECK)
            .map(|r| r[0])
            .unwrap_or(false);
        if ready {
            if let Ok((conn, _)) = listener.accept() {
                admit(conn, vmm);
            }
        } else if vmm.api.closing() {
            return;
        }
    }
}

/// Serves `conn` on its own thread, unless too many connections are open.
fn admit(conn: UnixStream, vmm: &Arc<Vmm>) {
    let open = &vmm.api.connections;
    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        open.fetch_sub(1, Ordering::SeqCst);
        let mut c = conn;
        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
        let msg = json!({"ok": false, "error": format!("too many API connections (at most {MAX_CONNECTIONS})")});
        let _ = c.write_all(format!("{msg}\n").as_bytes());
        return;
    }
    let v = vmm.clone();
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            connection(conn, &v);
            v.api.connections.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_line(w: &Mutex<UnixStream>, v: &Value) -> std::io::Result<()> {
    let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = v.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes; `None` at the end, after
/// [`IDLE_TIMEOUT`] of silence, or once the process is ending and the client has been quiet
/// for [`CLOSING_CHECK`]. The stream's read timeout must be [`CLOSING_CHECK`].
fn read_request(r: &mut BufReader<UnixStream>, api: &ApiState) -> Option<Result<String, String>> {
    let mut buf = Vec::new();
    let mut idle = Duration::ZERO;
    let mut quiet_while_closing = false;
    loop {
        let room = (MAX_REQUEST as u64 + 1).saturating_sub(buf.len() as u64);
        match r.by_ref().take(room).read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) if buf.len() > MAX_REQUEST => {
                return Some(Err(format!(
                    "request longer than {MAX_REQUEST} bytes; closing the connection"
                )))
            }
            Ok(_) if buf.ends_with(b"\n") => {
                return Some(String::from_utf8(buf).map_err(|_| "request is not UTF-8".into()))
            }
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => {}
            Err(_) => return None,
        }
        idle += CLOSING_CHECK;
        let nothing_sent = buf.is_empty() && r.buffer().is_empty();
        if idle >= IDLE_TIMEOUT || (nothing_sent && quiet_while_closing) {
            return None;
        }
        quiet_while_closing = nothing_sent && api.closing();
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn connection(conn: UnixStream, vmm: &Arc<Vmm>) {
    if conn.set_read_timeout(Some(CLOSING_CHECK)).is_err() {
        return;
    }
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(conn));
    let mut reader = BufReader::new(read_half);
    while let Some(line) = read_request(&mut reader, &vmm.api) {
        let (reply, close) = match line {
            Err(e) => (Err(e), true),
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => (handle(req, vmm, &writer), false),
                Err(e) => (
                    Err(format!(
                        "bad request: {e} (commands: {})",
                        COMMANDS.join(", ")
                    )),
                    false,
                ),
            },
        };
        let v = match reply {
            Ok(result) => json!({"ok": true, "result": result}),
            Err(error) => json!({"ok": false, "error": error}),
        };
        if write_line(&writer, &v).is_err() || close {
            return;
        }
    }
}

fn report(p: Option<Arc<Progress>>) -> Value {
    p.map(|p| serde_json::to_value(p.report()).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

fn info(vmm: &Vmm) -> Value {
    let vm = &vmm.vm;
    let cfg = vm.config();
    let role = vmm.role.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = vmm
        .last_migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let incoming = match &role {
        Role::Incoming(e) => Some(e.progress.clone()),
        _ => vmm
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    json!({
        "state": if vm.is_paused() { "paused" } else { "running" },
        "role": role.name(),
        "vcpus": cfg.vcpus,
        "memory_bytes": cfg.memory.size,
        // After a local hand-over, the adopted memory's.
        "memory_backend": vm.ram().config().backend.name(),
        "hugepages": cfg.memory.thp,
        "throttle_percent": vm.vcpus().throttle(),
        "migration": report(last),
        "incoming": report(incoming),
        "devices": testdevs(vm),
    })
}

/// The test devices: configuration, migration state and the mutator's own check.
fn testdevs(vm: &crate::vm::Vm) -> Value {
    use ferry_migrate::MigrationDevice;
    vm.devices()
        .testdevs()
        .iter()
        .map(|d| {
            json!({
                "name": d.name(),
                "config": d.device_config().to_string(),
                "state": d.state().name(),
                "steps": d.steps(),
                "fails": d.fails(),
                "digest": format!("{:016x}", d.digest()),
            })
        })
        .collect()
}

fn handle(req: Request, vmm: &Arc<Vmm>, writer: &Arc<Mutex<UnixStream>>) -> Result<Value, String> {
    match req {
        Request::Info => Ok(info(vmm)),
        Request::Migrate(m) => migrate(*m, vmm, writer),
        Request::MigrateRecover { uri } => {
            let uri = parse_uri(&uri)?;
            vmm.command(Command::Recover { uri }, Box::new(|_| Ok(Value::Null)))
                .map_err(|e| e.to_string())
        }
        Request::Update { exec } => Err(update(&exec, vmm, writer)),
        other => run_command(other, vmm).map_err(|e| e.to_string()),
    }
}

/// A command on the guest's run state, as its current owner allows.
fn run_command(req: Request, vmm: &Arc<Vmm>) -> Result<Value, OwnerError> {
    let done = || Ok(json!({}));
    match req {
        Request::Pause => vmm.command(
            Command::Pause,
            Box::new(|vm| Ok(vm.pause().map(|_| json!({}))?)),
        ),
        Request::Resume { force } => vmm.command(
            Command::Resume { force },
            Box::new(|vm| {
                vm.resume();
                done()
            }),
        ),
        Request::Snapshot { path } => vmm.command(
            Command::Snapshot,
            Box::new(move |vm| {
                let t = Instant::now();
                vm.snapshot(&path)?;
                Ok(json!({"path": path, "ms": t.elapsed().as_secs_f64() * 1000.0}))
            }),
        ),
        Request::Quit { force } => vmm.command(
            Command::Quit { force },
            Box::new(|_| {
                vmm.send(Event::Quit);
                done()
            }),
        ),
        Request::MigrateCancel => vmm.command(Command::Cancel, Box::new(|_| done())),
        Request::MigrateStartPostcopy => vmm.command(Command::StartPostcopy, Box::new(|_| done())),
        Request::Info
        | Request::Migrate(_)
        | Request::MigrateRecover { .. }
        | Request::Update { .. } => Ok(Value::Null),
    }
}

/// Execs a new binary that takes the VM over and answers this client itself; returns (the
/// reason) only when the update did not happen.
fn update(exe: &Path, vmm: &Arc<Vmm>, writer: &Mutex<UnixStream>) -> String {
    let reply = writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .try_clone()
        .ok()
        .map(std::os::fd::OwnedFd::from);
    vmm.update_exec(exe, reply).to_string()
}

fn parse_uri(uri: &str) -> Result<Uri, String> {
    uri.parse()
        .map_err(|e: ferry_transport::TransportError| e.to_string())
}

/// `migrate` with `resume`: a broken postcopy reconnects to `m.uri` from now on.
fn migrate_resume(m: &MigrateRequest, vmm: &Arc<Vmm>) -> Result<Value, String> {
    let uri = parse_uri(&m.uri)?;
    resume_only(m)?;
    vmm.command(Command::Reconnect { uri }, Box::new(|_| Ok(Value::Null)))
        .map_err(|e| e.to_string())
}

/// Refuses a `migrate` with `resume` that sets anything but the URI.
fn resume_only(m: &MigrateRequest) -> Result<(), String> {
    let fields = serde_json::to_value(m).map_err(|e| e.to_string())?;
    let set: Vec<&str> = fields
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| *k != "uri" && *k != "resume" && !v.is_null())
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default();
    if set.is_empty() {
        return Ok(());
    }
    Err(format!(
        "migrate with resume takes only uri (the running migration keeps its other \
         settings), not {}",
        set.join(", ")
    ))
}

/// Starts a migration and follows it to its answer.
fn migrate(m: MigrateRequest, vmm: &Arc<Vmm>, writer: &Mutex<UnixStream>) -> Result<Value, String> {
    if m.resume == Some(true) {
        return migrate_resume(&m, vmm);
    }
    let uri = parse_uri(&m.uri)?;
    let d = SendParams::default();
    let ms = |v: Option<u64>, def: Duration| v.map(Duration::from_millis).unwrap_or(def);
    let tls = match &m.tls_dir {
        Some(dir) => Some(
            ferry_transport::TlsConfig::load(dir, m.tls_hostname.clone())
                .map_err(|e| e.to_string())?,
        ),
        None if m.tls_hostname.is_some() => {
            return Err("tls_hostname needs tls_dir (--tls-hostname needs --tls-dir)".into())
        }
        None => None,
    };
    let compression = match &m.compress {
        Some(c) => c.parse().map_err(|e: String| format!("compress {e}"))?,
        None => d.compression,
    };
    let params = SendParams {
        channels: m.channels.unwrap_or(d.channels),
        downtime_limit: ms(m.downtime_limit_ms, d.downtime_limit),
        max_bandwidth: m.max_bandwidth,
        auto_converge: m.auto_converge.unwrap_or(true),
        digest_file: m.digest_file,
        handshake_timeout: ms(m.handshake_timeout_ms, d.handshake_timeout),
        progress_timeout: ms(m.progress_timeout_ms, d.progress_timeout),
        switchover_timeout: ms(m.switchover_timeout_ms, d.switchover_timeout),
        local: m.local.unwrap_or(false),
        tls,
        compression,
        checksums: m.checksums.unwrap_or(true),
        postcopy: parse_postcopy(m.postcopy.as_deref())?,
        parallel_devices: !m.serial_devices.unwrap_or(false),
    };
    let (progress, result) = vmm
        .start_migration(uri, params)
        .map_err(|e| e.to_string())?;
    follow(&progress, &result, writer)
}

/// The `postcopy` field of a migrate request.
fn parse_postcopy(v: Option<&str>) -> Result<PostcopyMode, String> {
    Ok(match v {
        None | Some("off") => PostcopyMode::Off,
        Some("on-request") => PostcopyMode::OnRequest,
        Some("after-precopy") => PostcopyMode::AfterPrecopy,
        Some("now") => PostcopyMode::Now,
        Some(o) => {
            return Err(format!(
                "postcopy '{o}' is not one of off, on-request, after-precopy, now"
            ))
        }
    })
}

/// Streams progress to the client until the migration has an answer for it. A client that
/// goes away stops only this stream; the migration goes on.
fn follow(
    progress: &Progress,
    result: &MigrationResult,
    writer: &Mutex<UnixStream>,
) -> Result<Value, String> {
    let mut client = true;
    loop {
        if let Some(answer) = client_answer(progress, result, Duration::from_millis(200)) {
            return answer;
        }
        if client {
            let v = json!({"event": "progress", "progress": progress.report()});
            client = write_line(writer, &v).is_ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_fields_are_refused() {
        let m: Request =
            serde_json::from_str(r#"{"command":"migrate","uri":"tcp:h:1","channels":2}"#).unwrap();
        assert!(matches!(&m, Request::Migrate(r) if r.channels == Some(2)));
        let p: Request = serde_json::from_str(
            r#"{"command":"migrate","uri":"tcp:h:1","postcopy":"after-precopy"}"#,
        )
        .unwrap();
        let Request::Migrate(p) = p else {
            panic!("not a migrate request")
        };
        assert_eq!(
            parse_postcopy(p.postcopy.as_deref()),
            Ok(PostcopyMode::AfterPrecopy)
        );
        assert!(parse_postcopy(Some("later")).unwrap_err().contains("later"));
        let r: Request = serde_json::from_str(r#"{"command":"migrate-start-postcopy"}"#).unwrap();
        assert!(matches!(r, Request::MigrateStartPostcopy));
        let r: Request = serde_json::from_str(r#"{"command":"resume","force":true}"#).unwrap();
        assert!(matches!(r, Request::Resume { force: true }));
        let r: Request = serde_json::from_str(r#"{"command":"quit"}"#).unwrap();
        assert!(matches!(r, Request::Quit { force: false }));
        let bad = serde_json::from_str::<Request>(r#"{"command":"migrate","uri":"x","bogus":1}"#);
        assert!(bad.unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn resume_and_recover_requests() {
        let r: Request =
            serde_json::from_str(r#"{"command":"migrate-recover","uri":"tcp:h:2"}"#).unwrap();
        assert!(matches!(r, Request::MigrateRecover { uri } if uri == "tcp:h:2"));
        let parse = |s: &str| match serde_json::from_str::<Request>(s).unwrap() {
            Request::Migrate(m) => m,
            _ => panic!("not a migrate request"),
        };
        let m = parse(r#"{"command":"migrate","uri":"tcp:h:2","resume":true}"#);
        assert_eq!(resume_only(&m), Ok(()));
        let m = parse(r#"{"command":"migrate","uri":"tcp:h:2","resume":true,"channels":8}"#);
        assert!(resume_only(&m).unwrap_err().contains("not channels"));
    }
}
