//! Multithreaded memory preparation: populate, lock or pin guest memory before switchover.
//!
//! On a migration destination, guest RAM (possibly many GiB) has to be faulted in
//! (`MADV_POPULATE_WRITE`), locked (`mlock`) or pinned for DMA before the guest resumes, so
//! that the work stays off the downtime path. Like the kernel's padata multithreaded jobs,
//! [`start`] splits the ranges into chunks and a few low-priority helper threads take chunks
//! from a shared atomic cursor, so fast and slow helpers balance out.
//!
//! A job is all or nothing. The first error wins: every helper stops taking chunks, each one
//! undoes the chunks it completed, and only then does [`PrepareHandle::wait`] return the
//! error. [`PrepareHandle::cancel`] does the same and yields [`PrepareError::Cancelled`].
//! The outcome is decided once no helper is applying any more; a cancel after that point
//! has no effect and `wait` returns the report.
//!
//! The number of helpers honours the caller's CPU affinity, the online CPUs and the cgroup
//! CPU quota (v1 `cpu.cfs_quota_us` and v2 `cpu.max`, the tightest along the path to the
//! root); see [`thread_budget`].

use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_sys::mm::{self, MmError};
use ferry_sys::sched;

/// Default chunk size: small enough that cancellation is prompt and that the address-space
/// lock a chunk holds does not stall the process (thread creation, a migration's
/// handshake) for long when the host backs memory slowly (32 MiB chunks were seen to hold
/// it for seconds), large enough that per-chunk costs vanish.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// Default nice value of the helpers: they must yield to vCPU and transfer threads.
pub const DEFAULT_NICE: i32 = 19;

/// A page-aligned range of host virtual memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostRange {
    /// Start address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

impl HostRange {
    /// A range of `len` bytes at `addr`.
    pub fn new(addr: usize, len: usize) -> HostRange {
        HostRange { addr, len }
    }

    /// One past the last byte (saturating, so invalid ranges cannot overflow here).
    pub fn end(&self) -> usize {
        self.addr.saturating_add(self.len)
    }
}

impl fmt::Display for HostRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}..{:#x} ({} KiB)",
            self.addr,
            self.end(),
            self.len / 1024
        )
    }
}

/// One kind of preparation, applied chunk by chunk from several threads at once.
pub trait PrepareStep: Send + Sync {
    /// Short name for errors and logs.
    fn name(&self) -> &'static str;

    /// Checks a whole range before the job starts, so a job that could not be undone is
    /// refused up front. The default accepts everything.
    fn validate(&self, _r: HostRange) -> Result<(), io::Error> {
        Ok(())
    }

    /// Prepares one chunk. Should leave the chunk as it found it when it fails.
    fn apply(&self, r: HostRange) -> Result<(), io::Error>;

    /// Reverts `apply` on a chunk it succeeded on; best effort (log, do not panic).
    fn undo(&self, r: HostRange);
}

/// Why a step is needed, for [`check_feasible`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Fault memory in ([`Populate`]).
    Populate,
    /// Lock memory in RAM ([`Lock`]); charged to RLIMIT_MEMLOCK.
    Lock,
    /// Pin memory for DMA (as a VFIO map does); charged to RLIMIT_MEMLOCK like `mlock`.
    Pin,
}

fn not_volatile(r: HostRange) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{r} is not registered volatile memory, so undo could not release it \
             (map it with ferry_sys::mm::Mmap or register it with mm::register_mmap_region)"
        ),
    )
}

/// Releases a chunk after a failure or on undo; errors are only logged (nothing better to do).
fn release_logged(step: &str, r: HostRange) {
    if let Err(e) = mm::release(r.addr, r.len) {
        tracing::warn!(step, range = %r, error = %e, "prepare: releasing pages failed");
    }
}

/// Faults memory in writable (`MADV_POPULATE_WRITE`). Undo releases the pages
/// (`MADV_DONTNEED` on private memory, `MADV_REMOVE` on shared memory, picked from the
/// mapping's registration), which discards their contents: use it on memory whose contents
/// do not matter yet, such as destination RAM before any page has arrived.
///
/// The ranges must be registered volatile memory (see [`ferry_sys::mm::release`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Populate;

impl PrepareStep for Populate {
    fn name(&self) -> &'static str {
        "populate"
    }

    fn validate(&self, r: HostRange) -> Result<(), io::Error> {
        if mm::is_volatile(r.addr, r.len) {
            Ok(())
        } else {
            Err(not_volatile(r))
        }
    }

    fn apply(&self, r: HostRange) -> Result<(), io::Error> {
        mm::populate_write(r.addr, r.len).map_err(|e| {
            // Part of the chunk may be populated; give it back so the chunk is untouched.
            release_logged(self.name(), r);
            io::Error::from(e)
        })
    }

    fn undo(&self, r: HostRange) {
        release_logged(self.name(), r);
    }
}

/// Locks memory in RAM (`mlock`, which populates it too). Undo unlocks, then releases the
/// pages like [`Populate`] (discarding their contents).
///
/// The ranges must be registered volatile memory (see [`ferry_sys::mm::release`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lock;

impl Lock {
    fn unlock_and_release(&self, r: HostRange) {
        if let Err(e) = mm::munlock(r.addr, r.len) {
            tracing::warn!(range = %r, error = %e, "prepare: munlock failed");
        }
        release_logged(self.name(), r);
    }
}

impl PrepareStep for Lock {
    fn name(&self) -> &'static str {
        "lock"
    }

    fn validate(&self, r: HostRange) -> Result<(), io::Error> {
        Populate.validate(r)
    }

    fn apply(&self, r: HostRange) -> Result<(), io::Error> {
        mm::mlock(r.addr, r.len).map_err(|e| {
            // A failed mlock can leave the range locked and partly faulted in.
            self.unlock_and_release(r);
            io::Error::from(e)
        })
    }

    fn undo(&self, r: HostRange) {
        self.unlock_and_release(r);
    }
}

/// Tuning of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareOptions {
    /// At most this many helpers (`None`: as many as the [`thread_budget`] allows).
    pub max_threads: Option<usize>,
    /// Bytes per chunk, rounded up to the page size; the unit of balancing and of
    /// cancellation latency.
    pub chunk_bytes: usize,
    /// Nice value set on each helper thread (only the helpers, never the caller).
    pub nice: i32,
    /// Page size of the memory: ranges must be aligned to it and chunks are multiples of it.
    /// `None` is the base page size; use the huge page size for hugetlb memory (whose
    /// madvise calls need huge-page alignment).
    pub page_size: Option<usize>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            max_threads: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            nice: DEFAULT_NICE,
            page_size: None,
        }
    }
}

/// How many helper threads a job may use, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThreadBudget {
    /// What the caller asked for.
    pub requested: Option<usize>,
    /// CPUs in the calling thread's affinity mask.
    pub affinity: usize,
    /// Online CPUs.
    pub online: usize,
    /// The tightest cgroup CPU quota on the path to the root, in CPUs, if any.
    pub cgroup_quota: Option<f64>,
    /// The result: the minimum of the above (the quota rounded up), at least 1.
    pub threads: usize,
}

/// Progress of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes applied so far (undo does not subtract).
    pub done_bytes: u64,
    /// Bytes in the job.
    pub total_bytes: u64,
    /// Chunks applied so far.
    pub chunks_done: usize,
    /// Chunks in the job.
    pub chunks_total: usize,
}

/// The result of a job that completed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrepareReport {
    /// The step's name.
    pub step: &'static str,
    /// Bytes prepared.
    pub bytes: u64,
    /// Chunks prepared.
    pub chunks: usize,
    /// Helper threads used.
    pub threads: usize,
    /// Chunk size used.
    pub chunk_bytes: usize,
    /// From `start` until the last chunk was done.
    pub elapsed: Duration,
    /// The thread budget the job ran under.
    pub budget: ThreadBudget,
}

/// Errors of memory preparation.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A range is empty, misaligned, wraps, or overlaps another one.
    #[error("prepare: range #{index} {range}: {reason}")]
    InvalidRange {
        /// Position in the list passed to `start`.
        index: usize,
        /// The range.
        range: HostRange,
        /// What is wrong with it.
        reason: String,
    },
    /// The options cannot be used.
    #[error("prepare: invalid options: {0}")]
    InvalidOptions(String),
    /// The step refused a range before anything started.
    #[error("prepare step `{step}` cannot be used on {range}: {source}")]
    Rejected {
        /// The step.
        step: &'static str,
        /// The range.
        range: HostRange,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No helper thread could be started.
    #[error("prepare: cannot start a helper thread: {0}")]
    Spawn(#[source] io::Error),
    /// The step failed on a chunk; every completed chunk has been undone.
    #[error(
        "prepare step `{step}` failed on {range}: {source} \
         ({undone_chunks} completed chunks were undone)"
    )]
    Step {
        /// The step.
        step: &'static str,
        /// The chunk that failed.
        range: HostRange,
        /// The OS error (or the panic message of the step).
        #[source]
        source: io::Error,
        /// Chunks undone.
        undone_chunks: usize,
    },
    /// The job was cancelled; every completed chunk has been undone.
    #[error("prepare step `{step}` was cancelled ({undone_chunks} completed chunks were undone)")]
    Cancelled {
        /// The step.
        step: &'static str,
        /// Chunks undone.
        undone_chunks: usize,
    },
    /// Locking or pinning this much would exceed RLIMIT_MEMLOCK.
    #[error(
        "prepare: locking {needed} bytes (with {locked} already locked) exceeds \
         RLIMIT_MEMLOCK of {limit} bytes and the process lacks CAP_IPC_LOCK; raise the \
         limit (ulimit -l, LimitMEMLOCK=) or grant CAP_IPC_LOCK"
    )]
    MemlockLimit {
        /// Bytes the job would lock.
        needed: u64,
        /// Bytes already locked by the process.
        locked: u64,
        /// The soft RLIMIT_MEMLOCK.
        limit: u64,
    },
    /// A system query failed.
    #[error("prepare: {0}")]
    Sys(#[from] MmError),
    /// A helper thread died outside the step (a bug in the engine).
    #[error("prepare: a helper thread panicked")]
    HelperPanicked,
}

// ---------------------------------------------------------------------------------------
// Thread budget and cgroup CPU quota.

/// Works out how many helpers may run: `min(requested, affinity, online, ceil(quota))`, at
/// least 1. Affinity is that of the calling thread, which the helpers inherit.
pub fn thread_budget(requested: Option<usize>) -> ThreadBudget {
    let online = sched::online_cpus().unwrap_or(1);
    let affinity = sched::affinity().map_or(online, |c| c.len());
    let cgroup_quota = cgroup_cpu_quota();
    ThreadBudget {
        requested,
        affinity,
        online,
        cgroup_quota,
        threads: budget_threads(requested, affinity, online, cgroup_quota),
    }
}

fn budget_threads(
    requested: Option<usize>,
    affinity: usize,
    online: usize,
    quota: Option<f64>,
) -> usize {
    let mut t = requested.unwrap_or(usize::MAX).min(affinity).min(online);
    if let Some(q) = quota {
        // A quota of 0.5 CPU still allows one thread; 1.5 CPUs allow two.
        let cap = q.ceil();
        if cap.is_finite() && cap >= 1.0 {
            t = t.min(cap as usize);
        } else {
            t = 1;
        }
    }
    t.max(1)
}

/// The tightest CPU quota (in CPUs) of the process's cgroups, v1 and v2, from its own
/// cgroup up to the root. `None` when there is no quota or it cannot be read.
pub fn cgroup_cpu_quota() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cpu_quota_from(&cgroup, &mountinfo, &|p| std::fs::read_to_string(p).ok())
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_opts: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(c) = u8::try_from(v) {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let mut post = post.split_whitespace();
            let fstype = post.next()?.to_string();
            let _source = post.next()?;
            let super_opts = post.next().unwrap_or("").to_string();
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: PathBuf::from(unescape(pre.get(4)?)),
                fstype,
                super_opts,
            })
        })
        .collect()
}

/// The directories from the mount point down to the cgroup at `path`, or `None` when the
/// cgroup is not visible under this mount.
fn cgroup_dirs(mount: &Mount, path: &str) -> Option<Vec<PathBuf>> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let rel = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let mut dir = mount.point.clone();
    let mut dirs = vec![dir.clone()];
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if comp == ".." || comp == "." {
            // Outside our cgroup namespace: cannot be mapped to a directory.
            return None;
        }
        dir.push(comp);
        dirs.push(dir.clone());
    }
    Some(dirs)
}

fn v1_quota(dir: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Option<f64> {
    let quota: i64 = read(&dir.join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
    let period: i64 = read(&dir.join("cpu.cfs_period_us"))?.trim().parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

fn v2_quota(dir: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Option<f64> {
    let text = read(&dir.join("cpu.max"))?;
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    if quota == "max" {
        return None;
    }
    let quota: i64 = quota.parse().ok()?;
    let period: i64 = it.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// The quota logic on given file contents; `read` reads a control file.
fn cpu_quota_from(
    proc_cgroup: &str,
    mountinfo: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<f64> {
    let mounts = parse_mountinfo(mountinfo);
    let mut best: Option<f64> = None;
    for line in proc_cgroup.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "cpu") {
            continue;
        }
        let dirs = mounts
            .iter()
            .filter(|m| {
                if v2 {
                    m.fstype == "cgroup2"
                } else {
                    m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "cpu")
                }
            })
            .find_map(|m| cgroup_dirs(m, path));
        let Some(dirs) = dirs else { continue };
        for d in &dirs {
            let q = if v2 {
                v2_quota(d, read)
            } else {
                v1_quota(d, read)
            };
            if let Some(q) = q {
                best = Some(best.map_or(q, |b| b.min(q)));
            }
        }
    }
    best
}

// ---------------------------------------------------------------------------------------
// Feasibility.

/// Checks, before starting, that `total_bytes` of `kind` can be prepared at all: for
/// [`StepKind::Lock`] and [`StepKind::Pin`], that the memory fits under RLIMIT_MEMLOCK
/// (with what is already locked) unless the process has CAP_IPC_LOCK. Populating has no
/// such limit and always passes.
pub fn check_feasible(kind: StepKind, total_bytes: u64) -> Result<(), PrepareError> {
    match kind {
        StepKind::Populate => Ok(()),
        StepKind::Lock | StepKind::Pin => {
            let (soft, _hard) = mm::memlock_limit()?;
            let locked = mm::locked_bytes().unwrap_or(0);
            memlock_verdict(total_bytes, locked, soft, mm::has_cap_ipc_lock())
        }
    }
}

fn memlock_verdict(
    needed: u64,
    locked: u64,
    limit: u64,
    cap_ipc_lock: bool,
) -> Result<(), PrepareError> {
    if cap_ipc_lock || limit == u64::MAX || locked.saturating_add(needed) <= limit {
        Ok(())
    } else {
        Err(PrepareError::MemlockLimit {
            needed,
            locked,
            limit,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The engine.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

struct Phase {
    /// Helpers still taking chunks.
    applying: usize,
    /// Set once `applying` reaches 0.
    outcome: Option<Outcome>,
    finished_at: Option<Instant>,
}

struct Job {
    step: Arc<dyn PrepareStep>,
    chunks: Vec<HostRange>,
    total_bytes: u64,
    cursor: AtomicUsize,
    stop: AtomicBool,
    cancelled: AtomicBool,
    done_bytes: AtomicU64,
    chunks_done: AtomicUsize,
    undone: AtomicUsize,
    first_error: Mutex<Option<(HostRange, io::Error)>>,
    phase: Mutex<Phase>,
    phase_changed: Condvar,
    nice: std::sync::atomic::AtomicI32,
    // Helper thread ids, so their priority can be changed while they run.
    tids: Mutex<Vec<libc::pid_t>>,
    started: Instant,
}

// Nothing runs user code while holding these locks, so a poisoned lock still holds
// consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

impl Job {
    fn fail(&self, r: HostRange, e: io::Error) {
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some((r, e));
        }
        self.stop.store(true, Ordering::Release);
    }

    /// A helper stops applying. The last one decides the outcome; with `wait`, blocks until
    /// the outcome is known and returns it.
    fn leave(&self, wait: bool) -> Option<Outcome> {
        let mut ph = lock(&self.phase);
        ph.applying = ph.applying.saturating_sub(1);
        if ph.applying == 0 && ph.outcome.is_none() {
            let outcome = if lock(&self.first_error).is_some() {
                Outcome::Failed
            } else if self.cancelled.load(Ordering::Acquire)
                || self.chunks_done.load(Ordering::Acquire) < self.chunks.len()
            {
                // Incomplete without an error can only come from a cancel.
                Outcome::Cancelled
            } else {
                Outcome::Completed
            };
            ph.outcome = Some(outcome);
            ph.finished_at = Some(Instant::now());
            self.phase_changed.notify_all();
        }
        if !wait {
            return ph.outcome;
        }
        while ph.outcome.is_none() {
            ph = self
                .phase_changed
                .wait(ph)
                .unwrap_or_else(|e| e.into_inner());
        }
        ph.outcome
    }

    fn helper(&self) {
        // Leaves the apply phase even if this thread dies unexpectedly, so the others
        // never wait forever.
        struct Guard<'a>(&'a Job, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                // Under the lock `NiceControl::set` holds, so it never renices a thread id
                // the kernel has handed to another thread after this one exited.
                let me = sched::gettid();
                lock(&self.0.tids).retain(|t| *t != me);
                if !self.1 {
                    self.0.fail(
                        HostRange::new(0, 0),
                        io::Error::other("prepare helper thread died"),
                    );
                    self.0.leave(false);
                }
            }
        }
        let mut guard = Guard(self, false);

        // Registered before the nice value is read, so a change made in between still
        // reaches this thread through `set_nice`.
        lock(&self.tids).push(sched::gettid());
        let nice = self.nice.load(Ordering::SeqCst);
        if let Err(e) = sched::set_thread_nice(nice) {
            tracing::warn!(nice, error = %e, "prepare: cannot set helper nice value");
        }
        let mut done: Vec<HostRange> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed);
            let Some(&r) = self.chunks.get(i) else { break };
            match catch_unwind(AssertUnwindSafe(|| self.step.apply(r))) {
                Ok(Ok(())) => {
                    done.push(r);
                    self.done_bytes.fetch_add(r.len as u64, Ordering::Relaxed);
                    self.chunks_done.fetch_add(1, Ordering::AcqRel);
                }
                Ok(Err(e)) => {
                    self.fail(r, e);
                    break;
                }
                Err(p) => {
                    let msg = panic_message(p.as_ref());
                    self.fail(r, io::Error::other(format!("step panicked: {msg}")));
                    break;
                }
            }
        }
        guard.1 = true;
        if self.leave(true) == Some(Outcome::Completed) {
            return;
        }
        // Undo in reverse order of applying, in parallel with the other helpers.
        for r in done.into_iter().rev() {
            if catch_unwind(AssertUnwindSafe(|| self.step.undo(r))).is_err() {
                tracing::warn!(step = self.step.name(), range = %r, "prepare: undo panicked");
            }
            self.undone.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running job. Dropping it without [`wait`](Self::wait) cancels it and waits for the
/// helpers (undoing unless the job had already completed).
pub struct PrepareHandle {
    job: Arc<Job>,
    threads: Vec<JoinHandle<()>>,
    budget: ThreadBudget,
    chunk_bytes: usize,
}

impl fmt::Debug for PrepareHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrepareHandle")
            .field("step", &self.job.step.name())
            .field("threads", &self.threads.len())
            .field("progress", &self.progress())
            .finish()
    }
}

fn validate_ranges(ranges: &[HostRange], page: usize) -> Result<(), PrepareError> {
    let bad = |index: usize, reason: String| PrepareError::InvalidRange {
        index,
        range: ranges[index],
        reason,
    };
    for (i, r) in ranges.iter().enumerate() {
        if r.len == 0 {
            return Err(bad(i, "zero length".into()));
        }
        if r.addr.checked_add(r.len).is_none() {
            return Err(bad(i, "wraps around the address space".into()));
        }
        // `page` is a power of two (checked by `start`).
        if r.addr & (page - 1) != 0 || r.len & (page - 1) != 0 {
            return Err(bad(
                i,
                format!("not aligned to the page size ({page} bytes)"),
            ));
        }
    }
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].addr);
    for w in order.windows(2) {
        if ranges[w[0]].end() > ranges[w[1]].addr {
            return Err(bad(w[1], format!("overlaps range #{}", w[0])));
        }
    }
    Ok(())
}

/// Starts preparing `ranges` with `step` on helper threads and returns at once.
///
/// Refuses (before touching anything) empty, misaligned, wrapping or overlapping ranges,
/// ranges the step's `validate` rejects, and a zero chunk size.
pub fn start(
    ranges: Vec<HostRange>,
    step: Arc<dyn PrepareStep>,
    opts: PrepareOptions,
) -> Result<PrepareHandle, PrepareError> {
    let base = mm::page_size();
    let page = opts.page_size.unwrap_or(base);
    if !page.is_power_of_two() || page < base {
        return Err(PrepareError::InvalidOptions(format!(
            "page size {page} is not a power of two of at least {base}"
        )));
    }
    if opts.chunk_bytes == 0 {
        return Err(PrepareError::InvalidOptions("chunk size is 0".into()));
    }
    let chunk_bytes = opts
        .chunk_bytes
        .checked_next_multiple_of(page)
        .ok_or_else(|| PrepareError::InvalidOptions("chunk size too large".into()))?;
    validate_ranges(&ranges, page)?;
    for &r in &ranges {
        step.validate(r).map_err(|source| PrepareError::Rejected {
            step: step.name(),
            range: r,
            source,
        })?;
    }

    let mut chunks = Vec::new();
    for r in &ranges {
        let mut off = 0;
        while off < r.len {
            let len = chunk_bytes.min(r.len - off);
            chunks.push(HostRange::new(r.addr + off, len));
            off += len;
        }
    }
    let total_bytes = ranges.iter().map(|r| r.len as u64).sum();
    let budget = thread_budget(opts.max_threads);
    let planned = budget.threads.min(chunks.len());

    let job = Arc::new(Job {
        step,
        chunks,
        total_bytes,
        cursor: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        cancelled: AtomicBool::new(false),
        done_bytes: AtomicU64::new(0),
        chunks_done: AtomicUsize::new(0),
        undone: AtomicUsize::new(0),
        first_error: Mutex::new(None),
        phase: Mutex::new(Phase {
            applying: planned,
            outcome: (planned == 0).then_some(Outcome::Completed),
            finished_at: None,
        }),
        phase_changed: Condvar::new(),
        nice: std::sync::atomic::AtomicI32::new(opts.nice),
        tids: Mutex::new(Vec::new()),
        started: Instant::now(),
    });

    let mut threads = Vec::with_capacity(planned);
    let mut spawn_error = None;
    for n in 0..planned {
        let j = job.clone();
        match std::thread::Builder::new()
            .name(format!("ferry-prep-{n}"))
            .spawn(move || j.helper())
        {
            Ok(h) => threads.push(h),
            Err(e) => {
                // Run with the helpers we have; this one will never apply anything.
                tracing::warn!(error = %e, helper = n, "prepare: cannot spawn helper");
                job.leave(false);
                spawn_error = Some(e);
            }
        }
    }
    if threads.is_empty() {
        if let Some(e) = spawn_error {
            return Err(PrepareError::Spawn(e));
        }
    }
    tracing::debug!(
        step = job.step.name(),
        bytes = total_bytes,
        chunks = job.chunks.len(),
        threads = threads.len(),
        "prepare: started"
    );
    Ok(PrepareHandle {
        job,
        threads,
        budget,
        chunk_bytes,
    })
}

/// Changes the priority of a running job's helpers, e.g. to finish faster once nothing else
/// needs the CPUs (a migration waiting only for the preparation).
#[derive(Clone)]
pub struct NiceControl(Arc<Job>);

impl NiceControl {
    /// Sets every helper's nice value, now and for helpers yet to start. Returns how many
    /// running helpers were changed (raising priority needs CAP_SYS_NICE).
    pub fn set(&self, nice: i32) -> usize {
        self.0.nice.store(nice, Ordering::SeqCst);
        let tids = lock(&self.0.tids);
        tids.iter()
            .filter(|&&tid| match sched::set_nice_of(tid, nice) {
                Ok(()) => true,
                Err(e) => {
                    // ESRCH: the helper has finished.
                    tracing::debug!(tid, nice, error = %e, "prepare: cannot renice helper");
                    false
                }
            })
            .count()
    }
}

/// Cancels a running job from elsewhere (its handle may be waited on by another thread).
#[derive(Clone)]
pub struct Canceller(Arc<Job>);

impl Canceller {
    /// As [`PrepareHandle::cancel`].
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Release);
        self.0.stop.store(true, Ordering::Release);
    }
}

impl PrepareHandle {
    /// A canceller for this job.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.job.clone())
    }

    /// A control to change the helpers' priority while the job runs.
    pub fn nice_control(&self) -> NiceControl {
        NiceControl(self.job.clone())
    }

    /// How far the job has got.
    pub fn progress(&self) -> Progress {
        Progress {
            done_bytes: self.job.done_bytes.load(Ordering::Relaxed),
            total_bytes: self.job.total_bytes,
            chunks_done: self.job.chunks_done.load(Ordering::Relaxed),
            chunks_total: self.job.chunks.len(),
        }
    }

    /// Asks the helpers to stop after their current chunk and undo what they did. Has no
    /// effect once the job has completed.
    pub fn cancel(&self) {
        self.job.cancelled.store(true, Ordering::Release);
        self.job.stop.store(true, Ordering::Release);
    }

    /// Whether every helper has exited, so [`wait`](Self::wait) will not block.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Helper threads running the job.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The thread budget the job was started with.
    pub fn budget(&self) -> ThreadBudget {
        self.budget
    }

    fn join_all(&mut self) -> bool {
        let mut ok = true;
        for h in self.threads.drain(..) {
            ok &= h.join().is_ok();
        }
        ok
    }

    /// Waits for the job. On error or cancellation every completed chunk has been undone
    /// by the time this returns.
    pub fn wait(mut self) -> Result<PrepareReport, PrepareError> {
        let threads = self.threads.len();
        if !self.join_all() {
            tracing::warn!("prepare: a helper thread panicked outside the step");
        }
        let step = self.job.step.name();
        let undone_chunks = self.job.undone.load(Ordering::Relaxed);
        let (outcome, finished_at) = {
            let ph = lock(&self.job.phase);
            (ph.outcome, ph.finished_at)
        };
        match outcome {
            Some(Outcome::Completed) => {
                let elapsed = finished_at.map_or_else(
                    || self.job.started.elapsed(),
                    |t| t.duration_since(self.job.started),
                );
                Ok(PrepareReport {
                    step,
                    bytes: self.job.done_bytes.load(Ordering::Relaxed),
                    chunks: self.job.chunks_done.load(Ordering::Relaxed),
                    threads,
                    chunk_bytes: self.chunk_bytes,
                    elapsed,
                    budget: self.budget,
                })
            }
            Some(Outcome::Failed) => {
                let first = lock(&self.job.first_error).take();
                match first {
                    Some((range, source)) => Err(PrepareError::Step {
                        step,
                        range,
                        source,
                        undone_chunks,
                    }),
                    None => Err(PrepareError::HelperPanicked),
                }
            }
            Some(Outcome::Cancelled) => Err(PrepareError::Cancelled {
                step,
                undone_chunks,
            }),
            // Only reachable if a helper died before deciding, which the guard prevents.
            None => Err(PrepareError::HelperPanicked),
        }
    }
}

impl Drop for PrepareHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.cancel();
            self.join_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(files: HashMap<&'static str, &'static str>) -> impl Fn(&Path) -> Option<String> {
        move |p: &Path| files.get(p.to_str()?).map(|s| s.to_string())
    }

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_quota_takes_the_tightest_ancestor() {
        let files = HashMap::from([
            ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"),
            ("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"),
            ("/sys/fs/cgroup/cpu/a/cpu.cfs_quota_us", "150000\n"),
            ("/sys/fs/cgroup/cpu/a/cpu.cfs_period_us", "100000\n"),
            ("/sys/fs/cgroup/cpu/a/b/cpu.cfs_quota_us", "-1\n"),
            ("/sys/fs/cgroup/cpu/a/b/cpu.cfs_period_us", "100000\n"),
        ]);
        let cg = "2:cpuacct:/\n1:cpu:/a/b\n0::/\n";
        let q = cpu_quota_from(cg, MOUNTINFO, &reader(files));
        assert_eq!(q, Some(1.5));
    }

    #[test]
    fn v1_no_quota_anywhere() {
        let files = HashMap::from([
            ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"),
            ("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(
            cpu_quota_from("1:cpu:/\n0::/\n", MOUNTINFO, &reader(files)),
            None
        );
    }

    #[test]
    fn v2_cpu_max_and_combined_controllers() {
        let mi = "\
25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate
";
        let files = HashMap::from([
            ("/sys/fs/cgroup/user.slice/cpu.max", "max 100000\n"),
            ("/sys/fs/cgroup/user.slice/job/cpu.max", "50000 100000\n"),
        ]);
        assert_eq!(
            cpu_quota_from("0::/user.slice/job\n", mi, &reader(files)),
            Some(0.5)
        );
        // v1 with cpu,cpuacct co-mounted and a non-root mount root (container without
        // cgroupns) and an escaped mount point.
        let mi = "\
32 31 0:29 /docker/abc /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu,cpuacct
";
        let files = HashMap::from([
            ("/sys/fs/cgroup/cpu x/cpu.cfs_quota_us", "200000"),
            ("/sys/fs/cgroup/cpu x/cpu.cfs_period_us", "100000"),
        ]);
        assert_eq!(
            cpu_quota_from("3:cpu,cpuacct:/docker/abc\n", mi, &reader(files)),
            Some(2.0)
        );
    }

    #[test]
    fn budget_arithmetic() {
        assert_eq!(budget_threads(None, 2, 2, None), 2);
        assert_eq!(budget_threads(Some(8), 1, 2, None), 1);
        assert_eq!(budget_threads(None, 8, 8, Some(0.5)), 1);
        assert_eq!(budget_threads(None, 8, 8, Some(1.5)), 2);
        assert_eq!(budget_threads(Some(0), 8, 8, None), 1);
        assert_eq!(budget_threads(Some(3), 8, 4, Some(16.0)), 3);
    }

    #[test]
    fn memlock_verdict_both_branches() {
        assert!(memlock_verdict(64 << 20, 0, 8 << 20, true).is_ok());
        assert!(memlock_verdict(64 << 20, 0, u64::MAX, false).is_ok());
        assert!(memlock_verdict(4 << 20, 2 << 20, 8 << 20, false).is_ok());
        let e = memlock_verdict(64 << 20, 1 << 20, 8 << 20, false).unwrap_err();
        assert!(matches!(
            e,
            PrepareError::MemlockLimit {
                needed: 67108864,
                locked: 1048576,
                limit: 8388608
            }
        ));
        assert!(e.to_string().contains("CAP_IPC_LOCK"));
    }

    #[test]
    fn ranges_are_validated() {
        let p = mm::page_size();
        let cases = [
            (vec![HostRange::new(p, 0)], "zero length"),
            (vec![HostRange::new(p + 1, p)], "aligned"),
            (vec![HostRange::new(usize::MAX - p + 1, 2 * p)], "wraps"),
            (
                vec![HostRange::new(4 * p, 2 * p), HostRange::new(5 * p, p)],
                "overlaps",
            ),
        ];
        for (ranges, want) in cases {
            let e = validate_ranges(&ranges, p).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(validate_ranges(&[HostRange::new(p, p), HostRange::new(2 * p, p)], p).is_ok());
    }
}
