//! Nothing left behind when the benchmark is interrupted.
//!
//! Errors and panics are covered by guards ([`crate::qemu::ChildGuard`] kills and reaps its
//! child on drop, `WorkDir` removes its directory), but a signal ends the process without
//! running destructors. [`install`] starts a thread that, on SIGINT, SIGTERM or SIGHUP,
//! kills every child still registered here (each VM holds gigabytes and busy vCPUs that
//! would skew whatever runs next), removes the registered directories and exits.
//!
//! A child is registered while it is alive and unreaped: the guard unregisters it before
//! reaping it, under the same lock the signal thread holds while killing, so a pid killed
//! here is always still ours.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

struct Registry {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers a live child to kill on a signal.
pub fn register_pid(pid: u32) {
    registry().pids.push(pid);
}

/// Forgets a child; call before reaping it.
pub fn unregister_pid(pid: u32) {
    registry().pids.retain(|&p| p != pid);
}

/// Remembers a directory (or file) to remove on a signal.
pub fn register_dir(dir: PathBuf) {
    registry().dirs.push(dir);
}

/// Forgets a directory.
pub fn unregister_dir(dir: &PathBuf) {
    registry().dirs.retain(|d| d != dir);
}

/// Starts the signal thread (once, at program start).
pub fn install() -> Result<()> {
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                // Held until exit, so no guard reaps a pid between the kill and the exit.
                let reg = registry();
                if !reg.pids.is_empty() {
                    eprintln!(
                        "ferry-bench: signal {sig}: killing {} child process(es)",
                        reg.pids.len()
                    );
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .args(reg.pids.iter().map(u32::to_string))
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
                for d in &reg.dirs {
                    // Directories, and shared-memory files.
                    let _ = std::fs::remove_dir_all(d).or_else(|_| std::fs::remove_file(d));
                }
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_and_forget() {
        register_pid(4_000_000_001);
        register_pid(4_000_000_002);
        unregister_pid(4_000_000_001);
        let pids = registry().pids.clone();
        assert!(pids.contains(&4_000_000_002) && !pids.contains(&4_000_000_001));
        unregister_pid(4_000_000_002);
        let d = PathBuf::from("/nonexistent/ferry-bench-test");
        register_dir(d.clone());
        unregister_dir(&d);
        assert!(!registry().dirs.contains(&d));
    }
}
