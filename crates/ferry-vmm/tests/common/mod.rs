//! Helpers shared by the VMM's integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest::GuestLine;
use ferry_memory::ram::{Backend, MemoryConfig};
use ferry_vmm::devices::SerialSink;
use ferry_vmm::vm::{Vm, VmConfig};

pub fn config(mib: u64, vcpus: u32) -> VmConfig {
    VmConfig {
        memory: MemoryConfig {
            size: mib << 20,
            backend: Backend::Anonymous,
            thp: false,
        },
        vcpus,
    }
}

pub fn serial_file(dir: &Path, name: &str) -> (PathBuf, SerialSink) {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    (path, SerialSink::Fd(f))
}

pub fn lines(path: &Path) -> Vec<GuestLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(GuestLine::parse)
        .collect()
}

/// Waits until `pred` holds on the parsed serial output, or panics with the output.
pub fn wait_for(path: &Path, timeout: Duration, what: &str, pred: impl Fn(&[GuestLine]) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let l = lines(path);
        if pred(&l) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; guest printed:\n{}",
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn fails(path: &Path) -> Vec<String> {
    lines(path)
        .into_iter()
        .filter_map(|l| match l {
            GuestLine::Fail(s) => Some(s),
            _ => None,
        })
        .collect()
}

pub fn max_sweeps(path: &Path) -> u64 {
    lines(path)
        .iter()
        .filter_map(|l| match l {
            GuestLine::Status { sweeps, .. } => Some(*sweeps),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

pub fn boot(cfg: VmConfig, serial: SerialSink, append: &str) -> Arc<Vm> {
    let vm = Arc::new(Vm::create(cfg, serial).unwrap());
    vm.boot(ferry_guest::WORKLOAD_ELF, "workload.elf", append)
        .unwrap();
    vm.start(Arc::new(|e| eprintln!("vcpu event: {e:?}")))
        .unwrap();
    vm.resume();
    vm
}

/// Waits until the guest has printed at least `n` status lines.
pub fn wait_status_lines(path: &Path, n: usize) {
    wait_for(path, Duration::from_secs(20), "status lines", |l| {
        l.iter()
            .filter(|l| matches!(l, GuestLine::Status { .. }))
            .count()
            >= n
    });
}
