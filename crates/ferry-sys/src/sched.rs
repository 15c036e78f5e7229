//! Scheduling of the calling thread: thread id, CPU affinity, nice value, online CPUs.
//!
//! Affinity and nice are per thread on Linux; every function here acts on the calling thread
//! only, never on the whole process.

use std::io;

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
    // SAFETY: `mask` is `bytes` long and only read by the kernel (pid 0 = calling thread).
    let rc = unsafe { libc::sched_setaffinity(0, bytes, mask.as_ptr().cast::<libc::cpu_set_t>()) };
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
}
