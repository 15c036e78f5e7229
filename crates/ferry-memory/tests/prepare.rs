//! The preparation engine against real syscalls: residency (mincore), locking (smaps),
//! failure and cancellation undo, thread budget (affinity, cgroup v1 quota), helper nice
//! values and RLIMIT_MEMLOCK feasibility. Several tests re-run this binary as a child
//! process (selected by `CHILD_ENV`) to change process-wide state safely.

use std::collections::HashSet;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_memory::prepare::{
    check_feasible, start, thread_budget, HostRange, Lock, Populate, PrepareError, PrepareOptions,
    PrepareStep, StepKind,
};
use ferry_sys::mm::{self, MapOptions, Mmap};
use ferry_sys::sched;

const MIB: usize = 1 << 20;
const CHILD_ENV: &str = "FERRY_PREPARE_TEST_CHILD";

fn map(len: usize) -> Mmap {
    Mmap::anonymous(len, MapOptions::default()).expect("mmap")
}

fn range(m: &Mmap) -> HostRange {
    HostRange::new(m.addr(), m.len())
}

fn resident_pages(m: &Mmap) -> usize {
    mm::mincore(m.addr(), m.len())
        .expect("mincore")
        .into_iter()
        .filter(|r| *r)
        .count()
}

/// Sum of `Locked:` (kB) over the VMAs of /proc/self/smaps that overlap the mapping.
fn locked_kib(m: &Mmap) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let (lo, hi) = (m.addr(), m.addr() + m.len());
    let mut inside = false;
    let mut total = 0;
    for line in text.lines() {
        let head = line.split(' ').next().unwrap_or("");
        if let Some((s, e)) = head.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s < hi && e > lo;
                continue;
            }
        }
        if let (true, Some(v)) = (inside, line.strip_prefix("Locked:")) {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .expect("Locked value");
        }
    }
    total
}

fn opts(chunk_bytes: usize) -> PrepareOptions {
    PrepareOptions {
        chunk_bytes,
        ..PrepareOptions::default()
    }
}

/// A stand-in for a pinning step: records everything, wraps an optional real step, can
/// sleep per chunk, fail or panic on the Nth call.
#[derive(Default)]
struct Recorder {
    inner: Option<Box<dyn PrepareStep>>,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
    delay: Duration,
    calls: AtomicUsize,
    applied: Mutex<Vec<HostRange>>,
    undone: Mutex<Vec<HostRange>>,
    nices: Mutex<Vec<i32>>,
    tids: Mutex<HashSet<i32>>,
}

impl Recorder {
    fn applied(&self) -> Vec<HostRange> {
        let mut v = self.applied.lock().expect("lock").clone();
        v.sort_by_key(|r| r.addr);
        v
    }

    fn undone(&self) -> Vec<HostRange> {
        let mut v = self.undone.lock().expect("lock").clone();
        v.sort_by_key(|r| r.addr);
        v
    }
}

impl PrepareStep for Recorder {
    fn name(&self) -> &'static str {
        "recording-pin"
    }

    fn validate(&self, r: HostRange) -> Result<(), io::Error> {
        self.inner.as_ref().map_or(Ok(()), |s| s.validate(r))
    }

    fn apply(&self, r: HostRange) -> Result<(), io::Error> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.nices
            .lock()
            .expect("lock")
            .push(sched::thread_nice().expect("nice"));
        self.tids.lock().expect("lock").insert(sched::gettid());
        std::thread::sleep(self.delay);
        if self.fail_at == Some(n) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.panic_at == Some(n) {
            panic!("injected panic on call {n}");
        }
        if let Some(s) = &self.inner {
            s.apply(r)?;
        }
        self.applied.lock().expect("lock").push(r);
        Ok(())
    }

    fn undo(&self, r: HostRange) {
        self.undone.lock().expect("lock").push(r);
        if let Some(s) = &self.inner {
            s.undo(r);
        }
    }
}

/// Runs this test binary again with `CHILD_ENV=mode`, running only `test`. The child reads
/// one line from stdin before it starts; `before_go` runs with the child's pid first.
fn run_child(mode: &str, test: &str, before_go: impl FnOnce(u32)) -> std::process::Output {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    before_go(child.id());
    let mut stdin = child.stdin.take().expect("stdin");
    // The child may already have failed; its output tells why.
    let _ = stdin.write_all(b"go\n");
    drop(stdin);
    child.wait_with_output().expect("child output")
}

fn child_wait_for_go() {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).expect("read go");
}

fn assert_child_ok(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // Make sure the test really ran in the child (a filter typo would run nothing).
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}

#[test]
fn populate_makes_64_mib_resident() {
    let m = map(64 * MIB);
    assert_eq!(resident_pages(&m), 0);
    let h = start(vec![range(&m)], Arc::new(Populate), opts(4 * MIB)).expect("start");
    let report = h.wait().expect("populate");
    assert_eq!(resident_pages(&m), m.len() / mm::page_size());
    assert_eq!(report.bytes, 64 * MIB as u64);
    assert_eq!(report.chunks, 16);
    assert_eq!(report.threads, report.budget.threads.min(16));
    println!(
        "populated 64 MiB in {:?} with {} threads",
        report.elapsed, report.threads
    );
}

#[test]
fn lock_locks_everything_and_progress_adds_up() {
    let m = map(32 * MIB);
    let h = start(vec![range(&m)], Arc::new(Lock), opts(2 * MIB)).expect("start");
    while !h.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let p = h.progress();
    assert_eq!(
        (p.done_bytes, p.total_bytes),
        (32 * MIB as u64, 32 * MIB as u64)
    );
    assert_eq!((p.chunks_done, p.chunks_total), (16, 16));
    h.wait().expect("lock");
    assert_eq!(locked_kib(&m), 32 * 1024);
    mm::munlock(m.addr(), m.len()).expect("munlock");
}

fn injected_failure(inner: Box<dyn PrepareStep>, m: &Mmap) -> Arc<Recorder> {
    let rec = Arc::new(Recorder {
        inner: Some(inner),
        fail_at: Some(20),
        ..Recorder::default()
    });
    let h = start(vec![range(m)], rec.clone(), opts(MIB)).expect("start");
    let threads = h.threads();
    let err = h.wait().expect_err("must fail");
    match &err {
        PrepareError::Step {
            step,
            range,
            source,
            undone_chunks,
        } => {
            assert_eq!(*step, "recording-pin");
            assert!(range.addr >= m.addr() && range.end() <= m.addr() + m.len());
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
            assert_eq!(*undone_chunks, rec.applied().len());
        }
        other => panic!("unexpected error {other}"),
    }
    // Calls 0..20 came before the failing one and all completed.
    let applied = rec.applied();
    assert!(
        applied.len() >= 20 && applied.len() < 64,
        "{}",
        applied.len()
    );
    assert_eq!(
        rec.undone(),
        applied,
        "undo must cover exactly the applied chunks"
    );
    println!("{err} (threads: {threads})");
    rec
}

#[test]
fn injected_failure_undoes_populate() {
    let m = map(64 * MIB);
    injected_failure(Box::new(Populate), &m);
    assert_eq!(resident_pages(&m), 0, "pages still resident after undo");
}

#[test]
fn injected_failure_undoes_lock() {
    let m = map(64 * MIB);
    injected_failure(Box::new(Lock), &m);
    assert_eq!(locked_kib(&m), 0, "memory still locked after undo");
    assert_eq!(resident_pages(&m), 0, "pages still resident after undo");
}

#[test]
fn panicking_step_is_an_error_and_undone() {
    let m = map(16 * MIB);
    let rec = Arc::new(Recorder {
        inner: Some(Box::new(Populate)),
        panic_at: Some(5),
        ..Recorder::default()
    });
    let err = start(vec![range(&m)], rec.clone(), opts(MIB))
        .expect("start")
        .wait()
        .expect_err("must fail");
    assert!(err.to_string().contains("injected panic"), "{err}");
    assert_eq!(rec.undone(), rec.applied());
    assert_eq!(resident_pages(&m), 0);
}

#[test]
fn threads_honour_the_affinity_mask() {
    std::thread::spawn(|| {
        let cpus = sched::affinity().expect("affinity");
        sched::set_affinity(&cpus[..1]).expect("set_affinity");
        let budget = thread_budget(None);
        assert_eq!(budget.affinity, 1);
        assert_eq!(budget.threads, 1);

        let m = map(16 * MIB);
        let rec = Arc::new(Recorder {
            inner: Some(Box::new(Populate)),
            ..Recorder::default()
        });
        let report = start(vec![range(&m)], rec.clone(), opts(MIB))
            .expect("start")
            .wait()
            .expect("prepare");
        assert_eq!(report.threads, 1);
        assert_eq!(rec.tids.lock().expect("lock").len(), 1);
        // The helper inherited the mask.
        assert_eq!(sched::affinity().expect("affinity"), cpus[..1].to_vec());
    })
    .join()
    .expect("affinity thread");
}

#[test]
fn helpers_run_at_nice_19_and_the_caller_is_untouched() {
    let before = sched::thread_nice().expect("nice");
    let m = map(8 * MIB);
    let rec = Arc::new(Recorder::default());
    start(vec![range(&m)], rec.clone(), opts(MIB))
        .expect("start")
        .wait()
        .expect("prepare");
    let nices = rec.nices.lock().expect("lock").clone();
    assert_eq!(nices.len(), 8);
    assert!(nices.iter().all(|&n| n == 19), "{nices:?}");
    assert_eq!(sched::thread_nice().expect("nice"), before);
}

#[test]
fn helpers_can_be_reniced_while_they_run() {
    let m = map(16 * MIB);
    let rec = Arc::new(Recorder {
        delay: Duration::from_millis(20),
        ..Recorder::default()
    });
    let handle = start(vec![range(&m)], rec.clone(), opts(MIB)).expect("start");
    let control = handle.nice_control();
    while rec.calls.load(Ordering::SeqCst) < 4 {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(control.set(0) >= 1, "no running helper was reniced");
    handle.wait().expect("prepare");
    let nices = rec.nices.lock().expect("lock").clone();
    assert_eq!(nices.len(), 16);
    assert_eq!(nices.first(), Some(&19), "{nices:?}");
    assert_eq!(nices.last(), Some(&0), "{nices:?}");
}

#[test]
fn cancel_stops_promptly_and_undoes() {
    let m = map(64 * MIB);
    let rec = Arc::new(Recorder {
        inner: Some(Box::new(Populate)),
        delay: Duration::from_millis(20),
        ..Recorder::default()
    });
    // 256 chunks of 20 ms: several seconds of work. Nice 0 here: this checks the engine's
    // reaction time, and nice-19 helpers can be starved for seconds by unrelated load (a
    // parallel cargo build), which would make the bound below meaningless.
    let o = PrepareOptions {
        nice: 0,
        ..opts(256 * 1024)
    };
    let h = start(vec![range(&m)], rec.clone(), o).expect("start");
    let t0 = Instant::now();
    while h.progress().chunks_done < 6 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.cancel();
    let cancelled_at = Instant::now();
    let err = h.wait().expect_err("cancelled");
    let took = cancelled_at.elapsed();
    // One chunk (20 ms) plus undoing a few chunks, with generous slack for a loaded machine.
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    match err {
        PrepareError::Cancelled { undone_chunks, .. } => {
            assert_eq!(undone_chunks, rec.applied().len());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(rec.applied().len() >= 6 && rec.applied().len() < 256);
    assert_eq!(rec.undone(), rec.applied());
    assert_eq!(resident_pages(&m), 0);
    println!(
        "cancelled after {} chunks; wait returned {took:?} after cancel",
        rec.applied().len()
    );
}

#[test]
fn cancel_after_completion_keeps_the_result() {
    let m = map(4 * MIB);
    let h = start(vec![range(&m)], Arc::new(Populate), opts(MIB)).expect("start");
    while !h.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    h.cancel();
    h.wait().expect("completed before the cancel");
    assert_eq!(resident_pages(&m), m.len() / mm::page_size());
}

#[test]
fn bad_ranges_are_refused_before_anything_runs() {
    let p = mm::page_size();
    let m = map(4 * p);
    let rec = Arc::new(Recorder::default());
    let cases = [
        vec![HostRange::new(m.addr(), 0)],
        vec![HostRange::new(m.addr() + 1, p)],
        vec![HostRange::new(m.addr(), p + 7)],
        vec![
            HostRange::new(m.addr(), 2 * p),
            HostRange::new(m.addr() + p, p),
        ],
    ];
    for ranges in cases {
        let err = start(ranges.clone(), rec.clone(), opts(MIB)).expect_err("refused");
        assert!(
            matches!(err, PrepareError::InvalidRange { .. }),
            "{ranges:?}: {err}"
        );
    }
    assert_eq!(rec.calls.load(Ordering::SeqCst), 0);
    // Zero chunk size.
    let err = start(vec![range(&m)], rec.clone(), opts(0)).expect_err("refused");
    assert!(matches!(err, PrepareError::InvalidOptions(_)));
    // An empty job completes at once.
    let r = start(Vec::new(), rec, opts(MIB)).expect("start").wait();
    assert_eq!(r.expect("empty job").bytes, 0);
}

#[test]
fn populate_refuses_memory_it_could_not_release() {
    // Heap memory: Rust owns it, so undo must never discard it; the step refuses it.
    let p = mm::page_size();
    let buf = vec![7u8; 4 * p];
    let addr = (buf.as_ptr() as usize).next_multiple_of(p);
    let err =
        start(vec![HostRange::new(addr, p)], Arc::new(Populate), opts(MIB)).expect_err("refused");
    assert!(matches!(err, PrepareError::Rejected { .. }), "{err}");
    assert!(buf.iter().all(|&b| b == 7));
}

/// The v1 `cpu` controller's mount point, from /proc/self/mountinfo.
fn cpu_v1_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let (fstype, _src, opts) = (post.next()?, post.next()?, post.next()?);
        let point = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup" && opts.split(',').any(|o| o == "cpu")).then(|| PathBuf::from(point))
    })
}

/// Removes the test cgroup even when the test fails.
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..50 {
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // EBUSY while the exiting child is still being torn down.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("could not remove test cgroup {}", self.0.display());
    }
}

fn write_file(path: &Path, s: &str) {
    std::fs::write(path, s).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn cgroup_quota_limits_threads() {
    const NAME: &str = "cgroup_quota_limits_threads";
    if std::env::var(CHILD_ENV).as_deref() == Ok("cgroup") {
        child_wait_for_go();
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let budget = thread_budget(None);
        println!("child cgroups:\n{own}child budget: {budget:?}");
        let q = budget.cgroup_quota.expect("quota seen");
        assert!((q - 0.5).abs() < 1e-6, "quota {q}");
        assert_eq!(budget.threads, 1);
        let m = map(8 * MIB);
        let report = start(vec![range(&m)], Arc::new(Populate), opts(MIB))
            .expect("start")
            .wait()
            .expect("populate");
        assert_eq!(report.threads, 1);
        return;
    }

    // This machine has the cgroup v1 cpu controller and the tests run as root (CI too):
    // without them the test cannot check anything, so it fails rather than pass unrun.
    let mount = cpu_v1_mount().unwrap_or_else(|| {
        panic!("{NAME}: no cgroup v1 cpu controller is mounted; this test needs one")
    });
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = mount.join(format!("ferry-prepare-test-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{NAME}: cannot create the test cgroup {} ({e}); run the tests as root",
            dir.display()
        )
    });
    let _cleanup = CgroupDir(dir.clone());
    write_file(&dir.join("cpu.cfs_period_us"), "100000");
    write_file(&dir.join("cpu.cfs_quota_us"), "50000");

    let out = run_child("cgroup", NAME, |pid| {
        write_file(&dir.join("cgroup.procs"), &pid.to_string());
    });
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert_child_ok(&out);
    // The parent itself is not in the cgroup.
    assert!(thread_budget(None).cgroup_quota.is_none_or(|q| q > 0.5));
}

#[test]
fn check_feasible_follows_memlock_limit_and_capability() {
    const NAME: &str = "check_feasible_follows_memlock_limit_and_capability";
    if std::env::var(CHILD_ENV).as_deref() == Ok("memlock") {
        child_wait_for_go();
        mm::set_memlock_limit(MIB as u64, MIB as u64).expect("setrlimit");
        mm::drop_cap_ipc_lock().expect("drop CAP_IPC_LOCK");
        assert!(!mm::has_cap_ipc_lock());

        let err = check_feasible(StepKind::Lock, 64 * MIB as u64).expect_err("infeasible");
        println!("child: {err}");
        assert!(matches!(
            err,
            PrepareError::MemlockLimit { limit, .. } if limit == MIB as u64
        ));
        assert!(check_feasible(StepKind::Pin, 64 * MIB as u64).is_err());
        check_feasible(StepKind::Lock, 256 * 1024).expect("fits");
        check_feasible(StepKind::Populate, 64 * MIB as u64).expect("populate has no limit");

        // The kernel agrees: locking 4 MiB fails part-way, and everything is undone.
        let m = map(4 * MIB);
        let err = start(vec![range(&m)], Arc::new(Lock), opts(256 * 1024))
            .expect("start")
            .wait()
            .expect_err("mlock over the limit");
        println!("child: {err}");
        match &err {
            PrepareError::Step { step, source, .. } => {
                assert_eq!(*step, "lock");
                let errno = source.raw_os_error();
                assert!(
                    errno == Some(libc::ENOMEM) || errno == Some(libc::EPERM),
                    "{errno:?}"
                );
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(locked_kib(&m), 0);
        assert_eq!(resident_pages(&m), 0);
        return;
    }

    if mm::has_cap_ipc_lock() {
        // Privileged: any size is feasible whatever the limit.
        check_feasible(StepKind::Lock, 1 << 40).expect("CAP_IPC_LOCK ignores the limit");
    }
    let out = run_child("memlock", NAME, |_| {});
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert_child_ok(&out);
}
