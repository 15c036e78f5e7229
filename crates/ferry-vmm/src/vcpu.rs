//! vCPU threads: the `KVM_RUN` loop, pausing (all vCPUs parked outside `KVM_RUN`, so their
//! state can be read or written), auto-converge throttling, and per-vCPU state save/restore.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_state::VcpuState;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::devices::Devices;

/// How long `pause` waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const MSR_IA32_TSC: u32 = 0x10;
/// Throttle time slice (QEMU's auto-converge uses the same 10 ms).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Errors of vCPU control and state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// Operation.
        op: &'static str,
        /// OS error.
        source: kvm_ioctls::Error,
    },
    /// An MSR could not be restored.
    #[error("vCPU {vcpu}: KVM refused to restore MSR {index:#x}")]
    Msr {
        /// vCPU index.
        vcpu: u32,
        /// The MSR.
        index: u32,
    },
    /// Other failures (named).
    #[error("vCPU {vcpu}: {detail}")]
    Other {
        /// vCPU index.
        vcpu: u32,
        /// What went wrong.
        detail: String,
    },
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?} ({1} of {2} stopped)")]
    PauseTimeout(Duration, usize, usize),
    /// Thread creation failed.
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The kick signal could not be installed.
    #[error(transparent)]
    Kick(#[from] ferry_sys::kick::KickError),
}

/// Where vCPU threads report events.
pub type EventSink = Arc<dyn Fn(VcpuEvent) + Send + Sync>;

/// Something a vCPU thread reports to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest stopped (shutdown, triple fault, internal error).
    Stopped {
        /// vCPU that saw it.
        vcpu: u32,
        /// Why.
        reason: String,
        /// Whether it is an error (vs. an orderly shutdown).
        error: bool,
    },
}

#[derive(Default)]
struct CtlState {
    pause: bool,
    parked: usize,
    threads: usize,
    exit: bool,
}

struct Control {
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The vCPUs of a VM and their threads.
pub struct VcpuManager {
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    ctl: Arc<Control>,
    // Shared with the throttle ticker; handles stay (unjoined, so valid to signal) until
    // `shutdown` has stopped the ticker.
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    throttle: Arc<AtomicU8>,
    throttle_thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock_fd(fd: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuManager {
    /// Wraps created vCPU fds; no thread runs yet and the vCPUs count as paused.
    pub fn new(fds: Vec<VcpuFd>) -> Self {
        VcpuManager {
            fds: fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect(),
            ctl: Arc::new(Control {
                state: Mutex::new(CtlState {
                    pause: true,
                    ..Default::default()
                }),
                cv: Condvar::new(),
            }),
            threads: Arc::new(Mutex::new(Vec::new())),
            throttle: Arc::new(AtomicU8::new(0)),
            throttle_thread: Mutex::new(None),
        }
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    /// Runs `f` on vCPU `index`'s fd. Only meaningful while paused (or before start).
    pub fn with_fd<R>(&self, index: usize, f: impl FnOnce(&VcpuFd) -> R) -> Option<R> {
        self.fds.get(index).map(|fd| f(&lock_fd(fd)))
    }

    /// Starts one thread per vCPU, paused; `resume` lets them run.
    pub fn start(&self, devices: Arc<Devices>, events: EventSink) -> Result<(), VcpuError> {
        ferry_sys::kick::install()?;
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if !threads.is_empty() {
            return Ok(());
        }
        for (i, fd) in self.fds.iter().enumerate() {
            let fd = fd.clone();
            let ctl = self.ctl.clone();
            let devices = devices.clone();
            let events = events.clone();
            let throttle = self.throttle.clone();
            let index = i as u32;
            ctl.lock().threads += 1;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(index, fd, ctl, devices, events, throttle))
                .map_err(VcpuError::Spawn)?;
            threads.push(h);
        }
        Ok(())
    }

    fn kick_all(&self) {
        kick_threads(&self.threads);
    }

    /// Stops every vCPU outside `KVM_RUN` and waits until all have parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.ctl.lock().pause = true;
        self.ctl.cv.notify_all();
        self.kick_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut st = self.ctl.lock();
        while st.parked < st.threads {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout(
                    PAUSE_TIMEOUT,
                    st.parked,
                    st.threads,
                ));
            }
            st = self
                .ctl
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.ctl.lock().pause = false;
        self.ctl.cv.notify_all();
    }

    /// Whether the vCPUs are (requested to be) paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.lock().pause
    }

    /// Throttles every vCPU to run only `100 - percent` % of the time (0 = off, max 99).
    pub fn set_throttle(&self, percent: u8) {
        let percent = percent.min(99);
        let old = self.throttle.swap(percent, Ordering::SeqCst);
        if percent == 0 || old != 0 {
            return;
        }
        // A ticker kicks the vCPUs every slice so each gets out of KVM_RUN to sleep its share,
        // even a guest that never exits on its own.
        let mut slot = self
            .throttle_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return; // the running ticker sees the new value
        }
        if let Some(h) = slot.take() {
            let _ = h.join();
        }
        let throttle = self.throttle.clone();
        let threads = self.threads.clone();
        *slot = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(THROTTLE_SLICE);
                    kick_threads(&threads);
                }
            })
            .ok();
    }

    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&self) {
        self.throttle.store(0, Ordering::SeqCst);
        if let Some(h) = self
            .throttle_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
        {
            let mut st = self.ctl.lock();
            st.exit = true;
            st.pause = true;
        }
        self.ctl.cv.notify_all();
        self.kick_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn kick_threads(threads: &Mutex<Vec<JoinHandle<()>>>) {
    let threads = threads.lock().unwrap_or_else(|e| e.into_inner());
    for t in threads.iter() {
        // A thread that already exited needs no kick.
        let _ = ferry_sys::kick::kick(t);
    }
}

fn vcpu_thread(
    index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<Control>,
    devices: Arc<Devices>,
    events: EventSink,
    throttle: Arc<AtomicU8>,
) {
    let _kick = {
        let mut guard = lock_fd(&fd);
        ferry_sys::kick::KickRegistration::new(&mut guard)
    };
    let mut last_throttle = Instant::now();
    let mut stopped = false;
    loop {
        {
            let mut st = ctl.lock();
            if st.exit {
                break;
            }
            if st.pause || stopped {
                st.parked += 1;
                ctl.cv.notify_all();
                while (st.pause || stopped) && !st.exit {
                    st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.parked -= 1;
                continue;
            }
        }
        let pct = throttle.load(Ordering::Relaxed);
        if pct > 0 && last_throttle.elapsed() >= THROTTLE_SLICE {
            // Sleep off this vCPU's share, but wake at once for a pause or exit.
            let until = Instant::now() + THROTTLE_SLICE * u32::from(pct) / u32::from(100 - pct);
            let mut st = ctl.lock();
            while !st.pause && !st.exit {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                st = ctl
                    .cv
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(st);
            last_throttle = Instant::now();
            continue;
        }
        let mut guard = lock_fd(&fd);
        let stop = match guard.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                devices.pio_out(port, data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.pio_in(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                devices.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                devices.mmio_write(addr, data);
                None
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Hlt) => Some(("guest halted".to_string(), false)),
            Ok(VcpuExit::Shutdown) => Some(("guest shut down (triple fault)".to_string(), true)),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Some((format!("guest requested system event {kind}"), false))
            }
            Ok(VcpuExit::InternalError) => Some((
                "KVM internal error (instruction emulation failed)".to_string(),
                true,
            )),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some((
                format!("VM entry failed (hardware reason {reason:#x} on cpu {cpu})"),
                true,
            )),
            Ok(other) => Some((format!("unhandled vCPU exit {other:?}"), true)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                guard.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some((format!("KVM_RUN failed: {e}"), true)),
        };
        drop(guard);
        if let Some((reason, error)) = stop {
            stopped = true;
            events(VcpuEvent::Stopped {
                vcpu: index,
                reason,
                error,
            });
        }
    }
    ctl.lock().threads -= 1;
    ctl.cv.notify_all();
}

fn kvm_err(vcpu: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { vcpu, op, source }
}

/// The MSRs of `msr_list` that this vCPU can read back, in order (some MSRs KVM lists are not
/// readable on every host).
pub fn readable_msrs(fd: &VcpuFd, msr_list: &[u32]) -> Vec<u32> {
    let mut ok = Vec::with_capacity(msr_list.len());
    let mut pending: Vec<u32> = msr_list.to_vec();
    while !pending.is_empty() {
        let chunk: Vec<u32> = pending.iter().take(KVM_MAX_MSR_ENTRIES).copied().collect();
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = fd.get_msrs(&mut msrs).unwrap_or(0);
        ok.extend_from_slice(&chunk[..n.min(chunk.len())]);
        // The entry at `n` failed: skip it and continue after it.
        let consumed = (n + 1).min(chunk.len());
        pending.drain(..consumed);
    }
    ok
}

/// Saves vCPU `id`'s state. The vCPU must not be running.
pub fn save_vcpu(
    fd: &VcpuFd,
    id: u32,
    msr_list: &[u32],
    cpuid_entries: usize,
) -> Result<VcpuState, VcpuError> {
    // Order matters; see the crate docs of ferry-state.
    let mp_state = fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(cpuid_entries)
        .map_err(kvm_err(id, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let mut msrs = Vec::with_capacity(msr_list.len());
    for chunk in msr_list.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| VcpuError::Other {
            vcpu: id,
            detail: format!("MSR list: {e:?}"),
        })?;
        let n = fd.get_msrs(&mut m).map_err(kvm_err(id, "KVM_GET_MSRS"))?;
        if n != chunk.len() {
            return Err(VcpuError::Other {
                vcpu: id,
                detail: format!("KVM_GET_MSRS read {n} of {} MSRs", chunk.len()),
            });
        }
        msrs.extend_from_slice(m.as_slice());
    }
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        mp_state,
        events,
        debugregs,
        tsc_khz,
    })
}

/// Restores a vCPU's state. The vCPU must not be running.
pub fn restore_vcpu(vm: &VmFd, fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    let id = s.id;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(|e| VcpuError::Other {
                vcpu: id,
                detail: format!(
                    "the guest's TSC runs at {khz} kHz and this host cannot match it ({e})"
                ),
            })?;
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| VcpuError::Other {
        vcpu: id,
        detail: format!("CPUID of {} entries: {e:?}", s.cpuid.len()),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let m = Msrs::from_entries(chunk).map_err(|e| VcpuError::Other {
            vcpu: id,
            detail: format!("MSR list: {e:?}"),
        })?;
        let n = fd.set_msrs(&m).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(VcpuError::Msr {
                vcpu: id,
                index: chunk.get(n).map(|e| e.index).unwrap_or(0),
            });
        }
    }
    fd.set_sregs(&s.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    ferry_sys::kvm::set_xsave(vm, fd, &s.xsave).map_err(|e| VcpuError::Other {
        vcpu: id,
        detail: e.to_string(),
    })?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    // KVM's TSC-sync heuristic may treat a host TSC write as "meant to match the last one"
    // and add the time elapsed since then (here: since the vCPU was created, possibly a whole
    // precopy ago). Writing the TSC once more, last, bounds that to microseconds.
    if let Some(tsc) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC) {
        let m = Msrs::from_entries(std::slice::from_ref(tsc)).map_err(|e| VcpuError::Other {
            vcpu: id,
            detail: format!("TSC MSR: {e:?}"),
        })?;
        if fd.set_msrs(&m).map_err(kvm_err(id, "KVM_SET_MSRS(TSC)"))? != 1 {
            return Err(VcpuError::Msr {
                vcpu: id,
                index: MSR_IA32_TSC,
            });
        }
    }
    Ok(())
}
