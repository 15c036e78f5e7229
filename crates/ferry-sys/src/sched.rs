//! Scheduling of threads: thread id, CPU affinity, nice value, time slice, online CPUs.
//!
//! Affinity and nice are per thread on Linux; every function here acts on one thread (the
//! calling one, unless it takes a thread id), never on the whole process.

use std::io;
use std::time::Duration;

/// Errors of the scheduling wrappers.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// A syscall failed.
    #[error("{call} failed: {source}")]
    Os {
        /// The syscall that failed.
        call: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// An empty CPU list for [`set_affinity`].
    #[error("set_affinity: the CPU list is empty")]
    EmptyCpuSet,
    /// A CPU number too large for any affinity mask the kernel accepts.
    #[error("set_affinity: CPU {0} is out of range")]
    CpuOutOfRange(usize),
}

impl SchedError {
    fn last(call: &'static str) -> SchedError {
        SchedError::Os {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

const WORD_BITS: usize = libc::c_ulong::BITS as usize;
// Largest mask we try: far above any real NR_CPUS (8192 on distribution kernels).
const MAX_CPUS: usize = 1 << 20;

/// The calling thread's kernel thread id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// CPUs currently online (`sysconf(_SC_NPROCESSORS_ONLN)`).
pub fn online_cpus() -> Result<usize, SchedError> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| SchedError::last("sysconf(_SC_NPROCESSORS_ONLN)"))
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), in increasing order.
pub fn affinity() -> Result<Vec<usize>, SchedError> {
    // Start at glibc's 1024-CPU cpu_set_t and grow while the kernel's mask is larger.
    let mut words = 1024 / WORD_BITS;
    loop {
        let mut mask = vec![0 as libc::c_ulong; words];
        let bytes = words * std::mem::size_of::<libc::c_ulong>();
        // SAFETY: `mask` is `bytes` long and writable; the kernel writes at most `bytes`
        // bytes (pid 0 = the calling thread).
        let rc = unsafe {
            libc::sched_getaffinity(0, bytes, mask.as_mut_ptr().cast::<libc::cpu_set_t>())
        };
        if rc == 0 {
            let cpus = mask
                .iter()
                .enumerate()
                .flat_map(|(w, &bits)| {
                    (0..WORD_BITS)
                        .filter(move |b| bits & (1 << b) != 0)
                        .map(move |b| w * WORD_BITS + b)
                })
                .collect();
            return Ok(cpus);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) && words * WORD_BITS < MAX_CPUS {
            words *= 2;
            continue;
        }
        return Err(SchedError::Os {
            call: "sched_getaffinity",
            source: err,
        });
    }
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity`). Threads it creates later
/// inherit the mask.
pub fn set_affinity(cpus: &[usize]) -> Result<(), SchedError> {
    set_affinity_of(0, cpus)
}

/// Restricts thread `tid` (of any process this one may control; 0 = the calling thread)
/// to `cpus`. Threads it creates later inherit the mask.
pub fn set_affinity_of(tid: libc::pid_t, cpus: &[usize]) -> Result<(), SchedError> {
    let max = *cpus.iter().max().ok_or(SchedError::EmptyCpuSet)?;
    if max >= MAX_CPUS {
        return Err(SchedError::CpuOutOfRange(max));
    }
    let words = (max / WORD_BITS + 1).max(1024 / WORD_BITS);
    let mut mask = vec![0 as libc::c_ulong; words];
    for &c in cpus {
        mask[c / WORD_BITS] |= 1 << (c % WORD_BITS);
    }
    let bytes = words * std::mem::size_of::<libc::c_ulong>();
    // SAFETY: `mask` is `bytes` long and only read by the kernel.
    let rc =
        unsafe { libc::sched_setaffinity(tid, bytes, mask.as_ptr().cast::<libc::cpu_set_t>()) };
    if rc != 0 {
        return Err(SchedError::last("sched_setaffinity"));
    }
    Ok(())
}

/// Sets the nice value of the calling thread only (`setpriority(PRIO_PROCESS, gettid())`).
/// The kernel clamps it to -20..=19; lowering it below the current value needs
/// CAP_SYS_NICE (or RLIMIT_NICE room).
pub fn set_thread_nice(nice: i32) -> Result<(), SchedError> {
    set_nice_of(gettid(), nice)
}

/// Sets the nice value of thread `tid` of this process (same rules as [`set_thread_nice`]).
pub fn set_nice_of(tid: libc::pid_t, nice: i32) -> Result<(), SchedError> {
    // SAFETY: setpriority has no memory-safety preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(SchedError::last("setpriority"));
    }
    Ok(())
}

/// The nice value of the calling thread.
pub fn thread_nice() -> Result<i32, SchedError> {
    let tid = gettid() as libc::id_t;
    // The raw syscall returns 20 - nice (1..=40), so unlike glibc's getpriority a result of
    // -1 can only mean an error; no errno juggling is needed.
    // SAFETY: getpriority takes two integers and has no memory-safety preconditions.
    let rc = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, tid) };
    if rc < 0 {
        return Err(SchedError::last("getpriority"));
    }
    Ok(20 - rc as i32)
}

/// `struct sched_attr` as of its first version (`SCHED_ATTR_SIZE_VER0`, 48 bytes): the
/// kernel reads and writes no more than `size` bytes of it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_ATTR_SIZE_VER0: u32 = 48;

fn sched_getattr() -> Result<SchedAttr, SchedError> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a writable SCHED_ATTR_SIZE_VER0-byte struct of the kernel's layout
    // and the kernel writes at most that many bytes (pid 0 = the calling thread).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            SCHED_ATTR_SIZE_VER0,
            0,
        )
    };
    if rc != 0 {
        return Err(SchedError::last("sched_getattr"));
    }
    Ok(attr)
}

/// `SCHED_FLAG_RESET_ON_FORK`: threads this one creates start with the defaults (since
/// Linux 6.12 that includes the time slice, which they would otherwise inherit).
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// Asks the scheduler for a time slice of `slice` for the calling thread
/// (`sched_setattr` with `sched_runtime` under `SCHED_OTHER`, Linux 6.12+ EEVDF; the kernel
/// clamps it to 0.1-100 ms, and `Duration::ZERO` restores the default). A thread with a
/// shorter slice than the running one preempts it when it wakes, so a control thread that
/// sleeps on a socket gets a CPU within a fraction of a millisecond even while busy vCPU
/// threads fill every CPU, instead of waiting out their slices. Policy and nice value are
/// kept. With a slice set, the thread is also marked reset-on-fork, so the threads it
/// creates (bulk workers, say) start with the default slice again (and, if this thread
/// had a negative nice value, with nice 0). Returns the slice asked for, as the kernel now
/// holds it: zero where the kernel has no custom slices (it ignores the request), where
/// the thread is not under `SCHED_OTHER` / `SCHED_BATCH` (left alone), or when `slice` is
/// zero (the kernel's default).
pub fn set_thread_slice(slice: Duration) -> Result<Duration, SchedError> {
    set_slice(slice, true)
}

/// [`set_thread_slice`] without reset-on-fork: the threads this one creates from now on
/// start with the same slice (for a control thread starting another one, which would
/// otherwise wait for its first CPU under the default slice).
pub fn set_thread_slice_inherited(slice: Duration) -> Result<Duration, SchedError> {
    set_slice(slice, false)
}

fn set_slice(slice: Duration, reset_on_fork: bool) -> Result<Duration, SchedError> {
    let mut attr = sched_getattr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(Duration::ZERO);
    }
    attr.size = SCHED_ATTR_SIZE_VER0;
    attr.flags = if slice.is_zero() {
        attr.flags & SCHED_FLAG_RESET_ON_FORK
    } else if reset_on_fork {
        SCHED_FLAG_RESET_ON_FORK
    } else {
        0
    };
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a readable SCHED_ATTR_SIZE_VER0-byte struct of the kernel's layout,
    // filled from sched_getattr so policy and nice stay as they were (pid 0 = the calling
    // thread).
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(SchedError::last("sched_setattr"));
    }
    Ok(if slice.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_nanos(sched_getattr()?.runtime)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_roundtrip_in_a_thread() {
        let online = online_cpus().expect("online");
        let cpus = affinity().expect("affinity");
        assert!(!cpus.is_empty() && cpus.len() <= online.max(cpus.len()));
        let first = cpus[0];
        std::thread::spawn(move || {
            set_affinity(&[first]).expect("set_affinity");
            assert_eq!(affinity().expect("affinity"), vec![first]);
        })
        .join()
        .expect("thread");
        // The spawning thread is unaffected.
        assert_eq!(affinity().expect("affinity"), cpus);
        assert!(matches!(set_affinity(&[]), Err(SchedError::EmptyCpuSet)));
    }

    #[test]
    fn nice_is_per_thread() {
        let before = thread_nice().expect("nice");
        std::thread::spawn(|| {
            set_thread_nice(19).expect("set nice");
            assert_eq!(thread_nice().expect("nice"), 19);
        })
        .join()
        .expect("thread");
        assert_eq!(thread_nice().expect("nice"), before);
        assert!(gettid() > 0);
    }

    #[test]
    fn a_short_slice_is_per_thread_kept_from_children_and_keeps_the_nice_value() {
        let slice = Duration::from_micros(200);
        std::thread::spawn(move || {
            let before = sched_getattr().expect("getattr").runtime;
            set_thread_nice(5).expect("set nice");
            let held = set_thread_slice(slice).expect("set slice");
            // Kernels before 6.12 ignore the request; those with custom slices hold it.
            assert!(held.is_zero() || held == slice, "{held:?}");
            assert_eq!(thread_nice().expect("nice"), 5);
            // A thread created now starts with the default slice, not this one.
            let child = std::thread::spawn(|| sched_getattr().expect("getattr").runtime)
                .join()
                .expect("child");
            assert_eq!(child, before, "the child inherited the short slice");
            set_thread_slice(Duration::ZERO).expect("reset");
            assert_eq!(sched_getattr().expect("getattr").runtime, before);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn an_inherited_slice_reaches_the_threads_created_next() {
        let slice = Duration::from_micros(300);
        std::thread::spawn(move || {
            let held = set_thread_slice_inherited(slice).expect("set slice");
            let child = std::thread::spawn(|| sched_getattr().expect("getattr").runtime)
                .join()
                .expect("child");
            if !held.is_zero() {
                assert_eq!(
                    child,
                    held.as_nanos() as u64,
                    "the child starts with the slice"
                );
            }
            // Back to reset-on-fork: the next child starts with the default again.
            let before = std::thread::spawn(|| sched_getattr().expect("getattr").runtime)
                .join()
                .expect("child");
            set_thread_slice(slice).expect("set slice");
            let after = std::thread::spawn(|| sched_getattr().expect("getattr").runtime)
                .join()
                .expect("child");
            if !held.is_zero() {
                assert_eq!(before, held.as_nanos() as u64);
                assert_ne!(after, held.as_nanos() as u64, "reset-on-fork again");
            }
        })
        .join()
        .expect("thread");
    }
}
