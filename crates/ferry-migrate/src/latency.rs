//! The engine's latency-bound threads: event loops, control-channel readers, the acceptor
//! and the connector, the threads of small devices (vCPUs, the platform), postcopy's fault
//! handlers and urgent-page server. They sleep most of the time and must
//! get a CPU at once when a message or fault arrives, even while vCPU threads keep every
//! CPU busy (the common case on a small host). Under the kernel's default time slice a
//! waking thread can wait out a busy vCPU's slice, which was measured here at 1-4 ms of
//! extra switchover and round-trip time; a short slice lets it preempt on wake-up.

use std::time::Duration;

/// The slice asked for (the kernel's minimum is 0.1 ms): these threads run for tens of
/// microseconds per wake-up.
pub(crate) const CONTROL_SLICE: Duration = Duration::from_micros(100);

/// Marks the calling thread as latency-bound. Best effort: a kernel without custom slices
/// (before 6.12) or a thread under a real-time policy keeps what it had.
pub(crate) fn control_thread() {
    match ferry_sys::sched::set_thread_slice(CONTROL_SLICE) {
        Ok(held) if held.is_zero() => {
            tracing::trace!("this kernel keeps its default time slice for control threads")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("no short time slice for a control thread: {e}"),
    }
}

/// Starts a latency-bound thread from a control thread (the caller is left one: short
/// slice, reset-on-fork). The new thread holds the short
/// slice from its first instant: a thread that set it only once running would first wait
/// for a CPU under the default slice, up to a busy vCPU's turn (measured at 2-7 ms before
/// a local hand-over's connection or first device load began).
pub(crate) fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let _ = ferry_sys::sched::set_thread_slice_inherited(CONTROL_SLICE);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        control_thread();
        f()
    });
    // Back to reset-on-fork for the caller's other threads (bulk workers), whatever the
    // call above reported: it may have failed after the kernel took the new flags.
    control_thread();
    spawned
}

/// Starts a thread: through [`spawn`] if it is latency-bound, else with the default slice.
pub(crate) fn spawn_if<T: Send + 'static>(
    latency_bound: bool,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    if latency_bound {
        spawn(name, f)
    } else {
        std::thread::Builder::new().name(name).spawn(f)
    }
}

/// [`control_thread`] for the calling thread until dropped, then the default slice again:
/// for a thread the engine did not start (the caller's), which may go on to other work.
/// Threads started meanwhile (data channels, helpers) keep the default slice.
pub(crate) struct ControlThread(());

impl ControlThread {
    pub(crate) fn enter() -> ControlThread {
        control_thread();
        ControlThread(())
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        let _ = ferry_sys::sched::set_thread_slice(Duration::ZERO);
    }
}
