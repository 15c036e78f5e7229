//! A VM without KVM, for engine tests: guest RAM, a "vCPU" thread that keeps writing a
//! working set while the guest runs, and state that is a counter. The engine cannot tell it
//! from the test VMM, and a test can check afterwards that memory and state arrived intact
//! and which side runs the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_memory::dirty::{DirtyError, DirtyLogBackend};
use ferry_memory::ram::{Backend, GuestRam, MemoryConfig, PAGE_SIZE};
use ferry_migrate::{MigrationDevice, MigrationSource, MigrationTarget, VmError};
use ferry_proto::{DeviceInfo, MemRegion, VmDescription};
use vm_memory::{Bytes, GuestAddress};

use crate::fake_device::FakeDevice;

/// The device every fake VM has: its state is the guest's write counter.
pub const SECTION: &str = "fake-machine";

/// One device's state, as a source had it at the pause or a destination loaded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The device.
    pub name: String,
    /// Its state.
    pub data: Vec<u8>,
}

/// An error a fake VM was told to produce.
#[derive(Debug, thiserror::Error)]
#[error("injected failure: {0}")]
pub struct Injected(pub &'static str);

fn ram(mib: u64) -> Arc<GuestRam> {
    ram_of(mib, Backend::Anonymous)
}

fn ram_of(mib: u64, backend: Backend) -> Arc<GuestRam> {
    let cfg = MemoryConfig {
        size: mib << 20,
        backend,
        thp: false,
    };
    Arc::new(GuestRam::new(cfg).expect("test memory"))
}

fn describe(ram: &GuestRam) -> VmDescription {
    VmDescription {
        vcpus: 1,
        page_size: PAGE_SIZE as u32,
        regions: ram
            .regions()
            .iter()
            .map(|r| MemRegion {
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
        cpu_features: vec![],
    }
}

/// A dirty log with nothing from "KVM": every guest write of the fake goes through
/// vm-memory, whose own bitmap the tracker merges.
struct NoKvmLog;

impl DirtyLogBackend for NoKvmLog {
    fn start(&self) -> Result<(), DirtyError> {
        Ok(())
    }
    fn stop(&self) -> Result<(), DirtyError> {
        Ok(())
    }
    fn initially_set(&self) -> bool {
        true
    }
    fn fetch(&self, _region: usize, bitmap: &mut [u64]) -> Result<(), DirtyError> {
        bitmap.fill(0);
        Ok(())
    }
    fn clear(&self, _: usize, _: u64, _: u32, _: &[u64]) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// Run state of the fake vCPU.
#[derive(Default)]
struct Run {
    paused: bool,
    paused_at: Option<std::time::Instant>,
    longest_pause: Duration,
    /// The vCPU is between two writes (not touching memory).
    parked: bool,
    stop: bool,
}

/// A running fake VM that can be migrated away.
pub struct FakeSource {
    ram: Arc<GuestRam>,
    run: Arc<(Mutex<Run>, Condvar)>,
    writes: Arc<AtomicU64>,
    throttle: AtomicU8,
    resumes: AtomicU64,
    vcpu: Mutex<Option<JoinHandle<()>>>,
    devices: Mutex<Vec<Arc<FakeDevice>>>,
    first_pause: Mutex<Option<std::time::Instant>>,
    /// Make the next `pause` fail.
    pub fail_pause: AtomicBool,
}

impl FakeSource {
    /// `mib` of RAM, all non-zero except the last MiB, with a vCPU rewriting the first
    /// `ws_pages` pages as fast as it can (sleeping `nap` every 256 writes).
    pub fn start(mib: u64, ws_pages: u64, nap: Duration) -> Arc<FakeSource> {
        FakeSource::start_on(ram(mib), ws_pages, nap)
    }

    /// As [`FakeSource::start`], on shared (memfd) memory, which a local hand-over passes.
    pub fn start_shared(mib: u64, ws_pages: u64, nap: Duration) -> Arc<FakeSource> {
        FakeSource::start_on(ram_of(mib, Backend::Memfd), ws_pages, nap)
    }

    fn start_on(ram: Arc<GuestRam>, ws_pages: u64, nap: Duration) -> Arc<FakeSource> {
        let pages = ram.size() / PAGE_SIZE;
        for p in 0..pages.saturating_sub(256) {
            let _ = ram
                .mem()
                .write_obj(p ^ 0x5eed, GuestAddress(p * PAGE_SIZE + 8));
        }
        let run = Arc::new((Mutex::new(Run::default()), Condvar::new()));
        let writes = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (ram, run, writes) = (ram.clone(), run.clone(), writes.clone());
            std::thread::spawn(move || vcpu_loop(&ram, &run, &writes, ws_pages.max(1), nap))
        };
        let counter = writes.clone();
        let machine = FakeDevice::source(SECTION, Vec::new(), Duration::ZERO, move || {
            counter.load(Ordering::SeqCst).to_le_bytes().to_vec()
        });
        Arc::new(FakeSource {
            ram,
            run,
            writes,
            throttle: AtomicU8::new(0),
            resumes: AtomicU64::new(0),
            vcpu: Mutex::new(Some(vcpu)),
            devices: Mutex::new(vec![machine]),
            first_pause: Mutex::new(None),
            fail_pause: AtomicBool::new(false),
        })
    }

    /// Removes every device, the machine's too (a VM with nothing but RAM).
    pub fn clear_devices(&self) {
        lock(&self.devices).clear();
    }

    /// Adds a device (before a migration starts).
    pub fn add_device(&self, d: Arc<FakeDevice>) {
        lock(&self.devices).push(d);
    }

    /// When the guest was first paused (by anyone).
    pub fn first_pause(&self) -> Option<std::time::Instant> {
        *lock(&self.first_pause)
    }

    /// Whether the guest runs here.
    pub fn running(&self) -> bool {
        !lock(&self.run.0).paused
    }

    /// The longest time the guest was paused and then resumed (a pause still going on is
    /// not counted).
    pub fn longest_pause(&self) -> Duration {
        lock(&self.run.0).longest_pause
    }

    /// How many times the engine resumed it.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::SeqCst)
    }

    /// Guest writes so far (grows while it runs).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// The throttle the engine set last.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// A digest per page.
    pub fn digests(&self) -> Vec<u64> {
        self.ram.page_digests()
    }

    /// Every device's state now, as a destination should load it.
    pub fn state(&self) -> Vec<Section> {
        lock(&self.devices)
            .iter()
            .map(|d| Section {
                name: d.name().to_owned(),
                data: d.state_now(),
            })
            .collect()
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        lock(&self.run.0).stop = true;
        self.run.1.notify_all();
        if let Some(j) = lock(&self.vcpu).take() {
            let _ = j.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake vCPU: writes a growing counter to page after page of the working set.
fn vcpu_loop(
    ram: &GuestRam,
    run: &(Mutex<Run>, Condvar),
    writes: &AtomicU64,
    ws: u64,
    nap: Duration,
) {
    let mut i = 0u64;
    loop {
        {
            let mut r = lock(&run.0);
            r.parked = true;
            run.1.notify_all();
            while r.paused && !r.stop {
                r = run.1.wait(r).unwrap_or_else(|e| e.into_inner());
            }
            if r.stop {
                return;
            }
            r.parked = false;
        }
        for _ in 0..256 {
            let n = writes.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = ram.mem().write_obj(n, GuestAddress((i % ws) * PAGE_SIZE));
            i += 1;
        }
        if !nap.is_zero() {
            std::thread::sleep(nap);
        }
    }
}

impl MigrationSource for FakeSource {
    fn description(&self) -> VmDescription {
        describe(&self.ram)
    }
    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }
    fn dirty_log(&self) -> Arc<dyn DirtyLogBackend> {
        Arc::new(NoKvmLog)
    }
    fn is_paused(&self) -> bool {
        !self.running()
    }
    fn pause(&self) -> Result<(), VmError> {
        if self.fail_pause.swap(false, Ordering::SeqCst) {
            return Err(VmError::new(Injected("pause")));
        }
        lock(&self.first_pause).get_or_insert_with(std::time::Instant::now);
        let mut r = lock(&self.run.0);
        r.paused = true;
        r.paused_at.get_or_insert_with(std::time::Instant::now);
        while !r.parked {
            r = self.run.1.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        {
            let mut r = lock(&self.run.0);
            r.paused = false;
            if let Some(t) = r.paused_at.take() {
                r.longest_pause = r.longest_pause.max(t.elapsed());
            }
        }
        self.run.1.notify_all();
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::SeqCst);
    }
    fn devices(&self) -> Vec<Arc<dyn MigrationDevice>> {
        lock(&self.devices)
            .iter()
            .map(|d| d.clone() as Arc<dyn MigrationDevice>)
            .collect()
    }
}

/// An empty fake VM that receives a migration.
pub struct FakeTarget {
    ram: Arc<GuestRam>,
    devices: Mutex<Vec<Arc<FakeDevice>>>,
    loaded: Mutex<Option<Vec<Section>>>,
    loads: AtomicU64,
    running: AtomicBool,
    /// Make `load_state` fail.
    pub fail_load: AtomicBool,
    /// Make `resume` fail.
    pub fail_resume: AtomicBool,
}

impl FakeTarget {
    /// A target with `mib` of RAM (the layout must match the source's to be accepted).
    pub fn new(mib: u64) -> Arc<FakeTarget> {
        FakeTarget::on(ram(mib))
    }

    /// As [`FakeTarget::new`], on shared (memfd) memory.
    pub fn new_shared(mib: u64) -> Arc<FakeTarget> {
        FakeTarget::on(ram_of(mib, Backend::Memfd))
    }

    /// As [`FakeTarget::new`], on hugetlb memory (needs `mib / 2` free 2 MiB huge pages).
    pub fn new_hugetlb(mib: u64) -> Arc<FakeTarget> {
        FakeTarget::on(ram_of(mib, Backend::Hugetlb))
    }

    fn on(ram: Arc<GuestRam>) -> Arc<FakeTarget> {
        Arc::new(FakeTarget {
            ram,
            devices: Mutex::new(Vec::new()),
            loaded: Mutex::new(None),
            loads: AtomicU64::new(0),
            running: AtomicBool::new(false),
            fail_load: AtomicBool::new(false),
            fail_resume: AtomicBool::new(false),
        })
    }

    /// Whether the guest runs here.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// The state loaded last.
    pub fn loaded(&self) -> Option<Vec<Section>> {
        lock(&self.loaded).clone()
    }

    /// The devices of the last attempt.
    pub fn devices(&self) -> Vec<Arc<FakeDevice>> {
        lock(&self.devices).clone()
    }

    /// How many times state was loaded (one per attempt that got that far).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    /// A digest per page.
    pub fn digests(&self) -> Vec<u64> {
        self.ram.page_digests()
    }
}

impl MigrationTarget for FakeTarget {
    fn description(&self) -> VmDescription {
        describe(&self.ram)
    }
    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }
    fn devices(&self, wanted: &[DeviceInfo]) -> Result<Vec<Arc<dyn MigrationDevice>>, VmError> {
        let list = wanted
            .iter()
            .map(|w| FakeDevice::target(&w.name, &w.config).map_err(VmError::new))
            .collect::<Result<Vec<_>, _>>()?;
        *lock(&self.devices) = list.clone();
        Ok(list
            .into_iter()
            .map(|d| d as Arc<dyn MigrationDevice>)
            .collect())
    }
    fn finish_load(&self) -> Result<(), VmError> {
        if self.fail_load.load(Ordering::SeqCst) {
            return Err(VmError::new(Injected("load_state")));
        }
        let sections = lock(&self.devices)
            .iter()
            .map(|d| Section {
                name: d.name().to_owned(),
                data: d.loaded().unwrap_or_default(),
            })
            .collect();
        self.loads.fetch_add(1, Ordering::SeqCst);
        *lock(&self.loaded) = Some(sections);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        if self.fail_resume.load(Ordering::SeqCst) {
            return Err(VmError::new(Injected("resume")));
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The state a source would send now (for comparing with what a target loaded).
pub fn source_state(src: &FakeSource) -> Vec<Section> {
    src.state()
}
