//! Test support for Ferry, shared by the engine's harness tests, the CLI's end-to-end tests
//! and the benchmarks:
//!
//! - [`proxy`]: a frame-aware proxy that freezes, cuts, delays or corrupts a migration at
//!   an exact protocol step, or runs a hook there (signal a process, call the API);
//! - [`fake`]: VMs without KVM (RAM, a writing "vCPU", a counter as state) that implement
//!   the engine's traits; [`fake_device`]: devices without hardware for them;
//! - [`certs`]: test certificates for mutual TLS;
//! - [`hugepages`]: 2 MiB huge pages reserved for a test;
//! - [`serial`]: the workload guest's serial output, heartbeats timestamped;
//! - [`matrix`]: the fault matrix against real `ferry` processes.

pub mod certs;
pub mod fake;
pub mod fake_device;
pub mod hugepages;
pub mod matrix;
pub mod proxy;
pub mod serial;
