//! Kicking a vCPU thread out of `KVM_RUN` without a race.
//!
//! A kick is a real-time signal whose handler sets `kvm_run.immediate_exit` of the thread it
//! lands on. If the signal arrives just before the thread enters `KVM_RUN`, the flag makes
//! the next `KVM_RUN` return `EINTR` at once instead of the kick being lost; if it arrives
//! inside `KVM_RUN`, the pending signal ends the run with `EINTR`. The thread clears the flag
//! after each `EINTR`.

use std::cell::Cell;
use std::os::raw::c_int;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

thread_local! {
    // Address of this thread's `kvm_run.immediate_exit`, or null. Const-initialised with no
    // destructor, so reading it from a signal handler does no allocation or locking.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Errors installing or sending kicks.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// `sigaction` failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Install(vmm_sys_util::errno::Error),
    /// `pthread_kill` failed.
    #[error("cannot signal vCPU thread: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: a non-null pointer was stored by `KickRegistration::new` on this very
        // thread and points into the kvm_run mapping of a vCPU fd this thread keeps alive
        // until the registration is dropped (which nulls it first). The write is a single
        // byte the kernel reads at the next KVM_RUN; QEMU sets it from its handler the same way.
        unsafe { ptr.write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install() -> Result<(), KickError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick))
        .as_ref()
        .map(|_| ())
        .map_err(|e| KickError::Install(*e))
}

/// Marks the calling thread as the runner of `vcpu`: kicks landing on this thread set that
/// vCPU's `immediate_exit`. Dropping the registration unmarks the thread; it must be dropped
/// before the vCPU fd (keep both on the vCPU thread).
pub struct KickRegistration {
    // Not Send: the registration is tied to the thread-local it set.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl KickRegistration {
    /// Registers `vcpu`'s `immediate_exit` for kicks on the current thread.
    pub fn new(vcpu: &mut VcpuFd) -> Self {
        let ptr: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        KickRegistration {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for KickRegistration {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Sends a kick to the thread of `handle` (a no-op error if it has exited).
pub fn kick<T>(handle: &JoinHandle<T>) -> Result<(), KickError> {
    handle.kill(kick_signal()).map_err(KickError::Signal)
}
