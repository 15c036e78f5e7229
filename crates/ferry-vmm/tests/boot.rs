//! The workload guest runs under the test VMM, heartbeating and verifying itself.

mod common;

use std::time::Duration;

use common::*;
use ferry_guest::GuestLine;

fn run_workload(vcpus: u32, image: &'static [u8], append: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (path, sink) = serial_file(dir.path(), "serial.txt");
    let vm = std::sync::Arc::new(ferry_vmm::vm::Vm::create(config(64, vcpus), sink).unwrap());
    vm.boot(image, "workload", append).unwrap();
    vm.start(std::sync::Arc::new(|e| panic!("vcpu event: {e:?}")))
        .unwrap();
    vm.resume();
    wait_for(&path, Duration::from_secs(20), "ready", |l| {
        l.iter().any(|l| matches!(l, GuestLine::Ready { .. }))
    });
    let ready = lines(&path)
        .into_iter()
        .find_map(|l| match l {
            GuestLine::Ready { cpus } => Some(cpus),
            _ => None,
        })
        .unwrap();
    assert_eq!(ready, u64::from(vcpus), "every vCPU came up");
    let s0 = max_sweeps(&path);
    wait_for(&path, Duration::from_secs(20), "sweeps to advance", |_| {
        max_sweeps(&path) >= s0 + 2
    });
    vm.shutdown();
    assert!(fails(&path).is_empty(), "guest reported {:?}", fails(&path));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.matches('.').count() > 50, "heartbeats");
}

#[test]
fn workload_runs_on_one_vcpu() {
    run_workload(1, ferry_guest::WORKLOAD_ELF, "ws=4M hb=1");
}

#[test]
fn workload_runs_on_two_vcpus() {
    run_workload(2, ferry_guest::WORKLOAD_ELF, "ws=4M hb=1 cpus=2");
}

#[test]
fn flat_image_with_load_addresses_runs() {
    run_workload(1, ferry_guest::WORKLOAD_FLAT, "ws=2M hb=1");
}

#[test]
fn dma_device_writes_are_checked_by_the_guest() {
    run_workload(1, ferry_guest::WORKLOAD_ELF, "ws=2M hb=1 dma=1");
}
