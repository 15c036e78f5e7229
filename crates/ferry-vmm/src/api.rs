//! The control API: JSON over a unix socket, one request per line, one response per line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`). `migrate` also streams
//! `{"event":"progress","progress":{...}}` lines while it runs.
//!
//! Commands: `info`, `pause`, `resume`, `snapshot {path}`, `quit`,
//! `migrate {uri, channels?, downtime_limit_ms?, max_bandwidth?, auto_converge?, digest_file?}`,
//! `migrate-cancel`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_migrate::send::{migrate, SendParams};
use ferry_migrate::{CancelToken, Progress, Status};
use ferry_transport::Uri;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::migration::Migratable;
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
];

#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Info,
    Pause,
    Resume,
    Snapshot {
        path: PathBuf,
    },
    Quit,
    Migrate {
        uri: String,
        channels: Option<u16>,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
        auto_converge: Option<bool>,
        digest_file: Option<PathBuf>,
    },
    MigrateCancel,
}

/// The running API server; removes its socket when dropped (if it is still its own).
pub struct ApiServer {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Starts serving `path`. A stale socket left by a dead VMM is replaced; a socket another
/// VMM still serves, or any other kind of file, is refused.
pub fn serve(path: &Path, vmm: Arc<Vmm>) -> std::io::Result<ApiServer> {
    use std::os::unix::fs::FileTypeExt;
    let err = |kind, msg: String| {
        std::io::Error::new(kind, format!("API socket {}: {msg}", path.display()))
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket".into(),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(
                std::io::ErrorKind::AddrInUse,
                "another running VMM serves this socket".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(e.kind(), format!("removing the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.kind(), e.to_string()))?;
    let id = file_id(path);
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let vmm = vmm.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || connection(conn, vmm));
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        id,
    })
}

fn write_line(w: &Mutex<UnixStream>, v: &Value) -> std::io::Result<()> {
    let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = v.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
}

fn connection(conn: UnixStream, vmm: Arc<Vmm>) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(conn));
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &vmm, &writer),
            Err(e) => Err(format!(
                "bad request: {e} (commands: {})",
                COMMANDS.join(", ")
            )),
        };
        let v = match reply {
            Ok(result) => json!({"ok": true, "result": result}),
            Err(error) => json!({"ok": false, "error": error}),
        };
        if write_line(&writer, &v).is_err() {
            return;
        }
        if let Some(Event::MigratedAway) = after_reply(&v) {
            vmm.send(Event::MigratedAway);
        }
    }
}

/// A successful migration ends this process, but only after the client got the result.
fn after_reply(v: &Value) -> Option<Event> {
    (v["ok"] == json!(true) && v["result"]["status"] == json!("completed"))
        .then_some(Event::MigratedAway)
}

fn handle(req: Request, vmm: &Arc<Vmm>, writer: &Arc<Mutex<UnixStream>>) -> Result<Value, String> {
    let vm = &vmm.vm;
    match req {
        Request::Info => {
            let cfg = vm.config();
            let report = |p: &Option<Arc<Progress>>| {
                p.as_ref()
                    .map(|p| serde_json::to_value(p.report()).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null)
            };
            let migration = vmm
                .migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(p, _)| p.clone());
            let incoming = vmm
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            Ok(json!({
                "state": if vm.is_paused() { "paused" } else { "running" },
                "vcpus": cfg.vcpus,
                "memory_bytes": cfg.memory.size,
                "memory_backend": cfg.memory.backend.name(),
                "hugepages": cfg.memory.thp,
                "throttle_percent": vm.vcpus().throttle(),
                "migration": report(&migration),
                "incoming": report(&incoming),
            }))
        }
        Request::Pause => vm.pause().map(|_| json!({})).map_err(|e| e.to_string()),
        Request::Resume => {
            vm.resume();
            Ok(json!({}))
        }
        Request::Snapshot { path } => {
            let t = Instant::now();
            vm.snapshot(&path).map_err(|e| e.to_string())?;
            Ok(json!({"path": path, "ms": t.elapsed().as_secs_f64() * 1000.0}))
        }
        Request::Quit => {
            vmm.send(Event::Quit);
            Ok(json!({}))
        }
        Request::MigrateCancel => {
            let m = vmm.migration.lock().unwrap_or_else(|e| e.into_inner());
            match m.as_ref() {
                Some((p, c))
                    if matches!(
                        p.status(),
                        Status::Setup | Status::Active | Status::Switchover
                    ) =>
                {
                    c.cancel();
                    Ok(json!({}))
                }
                _ => Err("no migration is running".into()),
            }
        }
        Request::Migrate {
            uri,
            channels,
            downtime_limit_ms,
            max_bandwidth,
            auto_converge,
            digest_file,
        } => {
            let uri: Uri = uri
                .parse()
                .map_err(|e: ferry_transport::TransportError| e.to_string())?;
            let defaults = SendParams::default();
            let params = SendParams {
                channels: channels.unwrap_or(defaults.channels),
                downtime_limit: downtime_limit_ms
                    .map(Duration::from_millis)
                    .unwrap_or(defaults.downtime_limit),
                max_bandwidth,
                auto_converge: auto_converge.unwrap_or(true),
                digest_file,
                ..defaults
            };
            if params.channels == 0 {
                return Err("channels must be at least 1".into());
            }
            let progress = Progress::new();
            let cancel = CancelToken::new();
            {
                let mut m = vmm.migration.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((p, _)) = m.as_ref() {
                    if matches!(
                        p.status(),
                        Status::Setup | Status::Active | Status::Switchover
                    ) {
                        return Err("a migration is already running".into());
                    }
                    if p.status() == Status::Completed {
                        return Err("this VM was already migrated away".into());
                    }
                }
                *m = Some((progress.clone(), cancel.clone()));
            }
            // Stream progress to this client while the migration runs; dropping `stop`
            // wakes the ticker at once, so the result is not held back.
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let ticker = {
                let progress = progress.clone();
                let writer = writer.clone();
                std::thread::spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(Duration::from_millis(200))
                    {
                        let v = json!({"event": "progress", "progress": progress.report()});
                        if write_line(&writer, &v).is_err() {
                            return;
                        }
                    }
                })
            };
            let result = migrate(
                Arc::new(Migratable(vm.clone())),
                &uri,
                &params,
                progress,
                cancel,
            );
            drop(stop);
            let _ = ticker.join();
            result
                .map(|stats| serde_json::to_value(stats).unwrap_or(Value::Null))
                .map_err(|e| e.to_string())
        }
    }
}
