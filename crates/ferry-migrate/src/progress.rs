//! Live progress (read by the control API while a migration runs), status, and the
//! final statistics.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Nothing started.
    None,
    /// Connecting and handshaking.
    Setup,
    /// Precopy passes.
    Active,
    /// Guest paused, last pages and state moving.
    Switchover,
    /// Done: the destination runs the guest.
    Completed,
    /// Failed; the source runs on.
    Failed,
    /// Cancelled; the source runs on.
    Cancelled,
    /// `Go` was sent but the destination never confirmed it runs the guest: both sides keep
    /// it paused until one learns the outcome or an operator resumes one with force.
    Unconfirmed,
    /// Destination: waiting for a migration to arrive.
    Listening,
    /// Postcopy: the guest runs on the destination; pages it lacks still move.
    Postcopy,
    /// Postcopy broke off: the guest runs (or waits) on the destination and pages it lacks
    /// are still here. Neither side can run it alone; nothing is discarded.
    PostcopyPaused,
}

impl Status {
    fn from_u8(v: u8) -> Status {
        match v {
            1 => Status::Setup,
            2 => Status::Active,
            3 => Status::Switchover,
            4 => Status::Completed,
            5 => Status::Failed,
            6 => Status::Cancelled,
            7 => Status::Unconfirmed,
            8 => Status::Listening,
            9 => Status::Postcopy,
            10 => Status::PostcopyPaused,
            _ => Status::None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Status::None => 0,
            Status::Setup => 1,
            Status::Active => 2,
            Status::Switchover => 3,
            Status::Completed => 4,
            Status::Failed => 5,
            Status::Cancelled => 6,
            Status::Unconfirmed => 7,
            Status::Listening => 8,
            Status::Postcopy => 9,
            Status::PostcopyPaused => 10,
        }
    }
}

/// Counters updated by the engine as it goes.
#[derive(Debug)]
pub struct Progress {
    status: AtomicU8,
    /// Current pass.
    pub pass: AtomicU64,
    /// Bytes sent or received on all channels.
    pub bytes: AtomicU64,
    /// Pages sent as data.
    pub pages_data: AtomicU64,
    /// Pages sent as zero runs.
    pub pages_zero: AtomicU64,
    /// Pages dirty at the last sync.
    pub dirty_pages: AtomicU64,
    /// Bytes the guest dirtied per second in the last pass.
    pub dirty_rate: AtomicU64,
    /// Measured bandwidth, bytes/s.
    pub bandwidth: AtomicU64,
    /// Downtime estimate, µs.
    pub expected_downtime_us: AtomicU64,
    /// vCPU throttle, percent.
    pub throttle: AtomicU64,
    /// Guest RAM size.
    pub ram_bytes: AtomicU64,
    /// Batches of data pages sent compressed.
    pub batches_compressed: AtomicU64,
    /// Batches of data pages sent as they are.
    pub batches_raw: AtomicU64,
    /// Postcopy: pages sent because the destination faulted on them.
    pub pages_requested: AtomicU64,
    /// Bytes of device and vCPU state streams (frames included).
    pub device_bytes: AtomicU64,
    started: Mutex<Option<Instant>>,
    phase: Mutex<&'static str>,
    error: Mutex<Option<String>>,
}

/// A snapshot of [`Progress`], as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressReport {
    /// Status.
    pub status: Status,
    /// Current pass.
    pub pass: u64,
    /// Bytes so far.
    pub bytes: u64,
    /// Data pages so far.
    pub pages_data: u64,
    /// Zero pages so far.
    pub pages_zero: u64,
    /// Dirty pages at the last sync.
    pub dirty_pages: u64,
    /// Guest dirty rate, bytes/s.
    pub dirty_rate: u64,
    /// Throughput, bytes/s.
    pub throughput: u64,
    /// Expected downtime, ms.
    pub expected_downtime_ms: f64,
    /// Throttle, percent.
    pub throttle_percent: u64,
    /// Postcopy: pages sent (source) because the destination faulted on them.
    pub pages_requested: u64,
    /// Time since the start, ms.
    pub elapsed_ms: u64,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// The engine's phase ("precopy", "awaiting-go", ...).
    pub phase: &'static str,
    /// Why the migration failed or is unconfirmed, when it did or is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            status: AtomicU8::new(0),
            pass: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            pages_data: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            dirty_pages: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            expected_downtime_us: AtomicU64::new(0),
            throttle: AtomicU64::new(0),
            ram_bytes: AtomicU64::new(0),
            batches_compressed: AtomicU64::new(0),
            batches_raw: AtomicU64::new(0),
            pages_requested: AtomicU64::new(0),
            device_bytes: AtomicU64::new(0),
            started: Mutex::new(None),
            phase: Mutex::new("none"),
            error: Mutex::new(None),
        }
    }
}

impl Progress {
    /// A fresh progress record.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Resets and starts the clock.
    pub fn begin(&self, ram_bytes: u64) {
        for c in [
            &self.pass,
            &self.bytes,
            &self.pages_data,
            &self.pages_zero,
            &self.dirty_pages,
            &self.dirty_rate,
            &self.bandwidth,
            &self.expected_downtime_us,
            &self.throttle,
            &self.batches_compressed,
            &self.batches_raw,
            &self.pages_requested,
            &self.device_bytes,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.ram_bytes.store(ram_bytes, Ordering::Relaxed);
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.set_status(Status::Setup);
    }

    /// Records the engine's phase, for `info`.
    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// The engine's phase.
    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the migration failed or is unconfirmed.
    pub fn set_error(&self, e: &impl std::fmt::Display) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    /// Why the migration failed or is unconfirmed, if it did or is.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the status.
    pub fn set_status(&self, s: Status) {
        self.status.store(s.to_u8(), Ordering::SeqCst);
    }

    /// The status.
    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::SeqCst))
    }

    /// A consistent-enough snapshot for display.
    pub fn report(&self) -> ProgressReport {
        let elapsed = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        ProgressReport {
            status: self.status(),
            pass: self.pass.load(Ordering::Relaxed),
            bytes,
            pages_data: self.pages_data.load(Ordering::Relaxed),
            pages_zero: self.pages_zero.load(Ordering::Relaxed),
            dirty_pages: self.dirty_pages.load(Ordering::Relaxed),
            dirty_rate: self.dirty_rate.load(Ordering::Relaxed),
            throughput: if secs > 0.0 {
                (bytes as f64 / secs) as u64
            } else {
                0
            },
            expected_downtime_ms: self.expected_downtime_us.load(Ordering::Relaxed) as f64 / 1000.0,
            throttle_percent: self.throttle.load(Ordering::Relaxed),
            pages_requested: self.pages_requested.load(Ordering::Relaxed),
            elapsed_ms: elapsed.as_millis() as u64,
            ram_bytes: self.ram_bytes.load(Ordering::Relaxed),
            phase: self.phase(),
            error: self.error(),
        }
    }
}

/// Where the downtime went (source's clock; destination times as it reported them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// Final dirty-log sync after pausing.
    pub final_sync_ms: f64,
    /// Sending the last dirty pages (overlaps with the state).
    pub final_pages_ms: f64,
    /// Saving and sending device and vCPU state (overlaps with the pages).
    pub state_ms: f64,
    /// From everything sent to the destination's `Loaded`.
    pub wait_loaded_ms: f64,
    /// Destination: loading the state (its own clock).
    pub dest_load_ms: f64,
    /// From `Loaded` arriving (`Go` is written at once) to the destination's `Running`,
    /// the guest's resume included.
    pub go_to_running_ms: f64,
    /// Destination: resuming the vCPUs (its own clock).
    pub dest_resume_ms: f64,
}

/// Destination memory preparation as seen from the source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrepareStats {
    /// Whether the destination reported a preparation.
    pub reported: bool,
    /// How long it took (destination's clock).
    pub prepare_ms: f64,
    /// Helper threads it used (0: the destination did not prepare memory).
    pub threads: u32,
    /// How long the switchover was held back waiting for it, after precopy had converged.
    pub waited_ms: f64,
    /// How much of it fell inside the downtime (0 when the acknowledgement arrived before
    /// the guest was paused, which the engine waits for).
    pub in_downtime_ms: f64,
}

/// Statistics of a finished migration (what `ferry remote migrate --json` prints).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// "completed".
    pub status: String,
    /// From the start to the destination running the guest.
    pub total_ms: f64,
    /// Connecting, handshake, starting the dirty log.
    pub setup_ms: f64,
    /// Guest paused on the source until it runs on the destination.
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime: DowntimeBreakdown,
    /// Downtime limit asked for.
    pub downtime_limit_ms: f64,
    /// Downtime estimate at the switchover decision.
    pub expected_downtime_ms: f64,
    /// Whether the estimate met the limit (false when throttling at maximum could not get
    /// there and the engine switched over anyway).
    pub converged: bool,
    /// Bytes on all channels.
    pub bytes: u64,
    /// Pages sent with their data.
    pub pages_data: u64,
    /// Pages sent as zero runs.
    pub pages_zero: u64,
    /// Precopy passes, including the final one.
    pub passes: u64,
    /// Guest dirty rate, bytes/s, measured over the longest precopy pass after pass 0.
    pub dirty_rate: u64,
    /// Bytes per second over the whole migration.
    pub throughput: u64,
    /// Bytes per second of pass 0 (all of RAM).
    pub first_pass_throughput: u64,
    /// Data channels.
    pub channels: u16,
    /// Highest vCPU throttle used, percent.
    pub max_throttle_percent: u8,
    /// Destination memory preparation.
    pub prepare: PrepareStats,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// True when `Running` came only after the switchover timeout (the hand-over was
    /// unconfirmed for a while).
    pub confirmed_late: bool,
    /// A local hand-over: the memory file was passed, no page was copied.
    pub local: bool,
    /// Local hand-over: the destination mapping (and locking) the memory file, before the
    /// guest was paused.
    pub adopt_ms: f64,
    /// Every channel was mutual TLS.
    pub tls: bool,
    /// Frames and pages carried checksums.
    pub checksums: bool,
    /// Page compression asked for (`none`, `lz4`, `zstd:N`, `auto`).
    pub compression: String,
    /// Batches of data pages sent compressed.
    pub batches_compressed: u64,
    /// Batches of data pages sent as they are.
    pub batches_raw: u64,
    /// Postcopy, when the migration switched to it.
    pub postcopy: Option<Box<PostcopySendStats>>,
    /// Devices (vCPUs included) whose state streamed.
    pub devices: u32,
    /// Whether they were saved and loaded side by side (else one after another).
    pub parallel_devices: bool,
    /// Bytes of their streams, frames included.
    pub device_bytes: u64,
}

/// What postcopy did, as the source saw it and the destination reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopySendStats {
    /// How it started: "now" (no precopy), "after-precopy" (precopy did not converge) or
    /// "requested" (`migrate-start-postcopy`).
    pub trigger: String,
    /// Precopy passes before the switch.
    pub precopy_passes: u64,
    /// Pages the destination lacked at the switch (pushed in the background or asked for).
    pub pages_missing: u64,
    /// Pages sent because the destination faulted on them.
    pub pages_requested: u64,
    /// From `Running` to the destination having every page, ms.
    pub postcopy_ms: f64,
    /// Faults the destination's guest took on missing pages (destination's count).
    pub faults: u64,
    /// Fault latency on the destination, median, µs.
    pub latency_p50_us: u64,
    /// Fault latency, 99th percentile, µs.
    pub latency_p99_us: u64,
    /// Fault latency, longest, µs.
    pub latency_max_us: u64,
    /// Times the link broke after `Go` and this side reconnected.
    pub reconnects: u32,
    /// Pages not pushed again after a reconnection because the destination said it held
    /// them (summed over reconnections).
    pub pages_not_resent: u64,
}
