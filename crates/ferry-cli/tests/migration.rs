//! Live migration end to end, through the real `ferry` binary: a self-verifying workload
//! guest moves between two processes over TCP and unix sockets, and every injected failure
//! leaves the source guest running.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_guest::{GuestLine, ImageKind};
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const MEM: &str = "128M";

/// Every test here runs guests that keep CPUs busy: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial_guard() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Proc {
    name: &'static str,
    child: Child,
    serial: PathBuf,
    api: PathBuf,
    stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn lines(&self) -> Vec<GuestLine> {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .lines()
            .filter_map(GuestLine::parse)
            .collect()
    }

    fn sweeps(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| match l {
                GuestLine::Status { sweeps, .. } => Some(*sweeps),
                _ => None,
            })
            .collect()
    }

    fn fails(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter_map(|l| match l {
                GuestLine::Fail(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Proc) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out waiting for {what}\nserial:\n{}\nstderr:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.serial).unwrap_or_default(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn wait_ready(&self) {
        self.wait_for("the guest to be ready", Duration::from_secs(60), |p| {
            p.lines()
                .iter()
                .any(|l| matches!(l, GuestLine::Ready { .. }))
        });
    }

    /// Waits for `n` more status lines: the guest is alive and checking itself.
    fn wait_progress(&self, n: usize) {
        let start = self.sweeps().len();
        self.wait_for("the guest to make progress", Duration::from_secs(60), |p| {
            p.sweeps().len() >= start + n
        });
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn info(&self) -> Value {
        let out = remote(&self.api, &["info"]);
        assert!(
            out.status.success(),
            "info failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn spawn(name: &'static str, dir: &Path, args: &[String]) -> Proc {
    spawn_env(name, dir, args, &[])
}

fn spawn_env(name: &'static str, dir: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
    let serial = dir.join(format!("{name}.serial"));
    let api = dir.join(format!("{name}.sock"));
    let stderr = dir.join(format!("{name}.stderr"));
    let mut all = vec![
        "run".to_string(),
        "--serial".into(),
        format!("file:{}", serial.display()),
        "--api-socket".into(),
        api.display().to_string(),
    ];
    all.extend_from_slice(args);
    let child = Command::new(FERRY)
        .args(&all)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let p = Proc {
        name,
        child,
        serial,
        api,
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.api.exists() {
        assert!(
            Instant::now() < deadline,
            "{name} never opened its API socket: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

fn s(v: &str) -> String {
    v.to_string()
}

fn source(dir: &Path, vcpus: u32) -> Proc {
    source_with(dir, vcpus, MEM, "ws=8M")
}

fn source_with(dir: &Path, vcpus: u32, mem: &str, ws: &str) -> Proc {
    let img = ferry_guest::write_image(ImageKind::Elf, dir).unwrap();
    let p = spawn(
        "source",
        dir,
        &[
            s("--kernel"),
            img.display().to_string(),
            s("--append"),
            format!("{ws} hb=1 dma=1 cpus={vcpus}"),
            s("--memory"),
            s(mem),
            s("--vcpus"),
            vcpus.to_string(),
        ],
    );
    p.wait_ready();
    p.wait_progress(1);
    p
}

fn destination(
    dir: &Path,
    name: &'static str,
    uri: &str,
    mem: &str,
    vcpus: u32,
    extra: &[String],
) -> Proc {
    let mut args = vec![
        s("--incoming"),
        s(uri),
        s("--memory"),
        s(mem),
        s("--vcpus"),
        vcpus.to_string(),
    ];
    args.extend_from_slice(extra);
    spawn(name, dir, &args)
}

fn remote(api: &Path, args: &[&str]) -> Output {
    Command::new(FERRY)
        .arg("remote")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_uri() -> String {
    format!("tcp:127.0.0.1:{}", free_port())
}

/// The source is alive after a failure: running, heartbeating, still verifying itself.
fn assert_source_unharmed(src: &mut Proc) {
    assert!(
        src.wait_exit(Duration::from_millis(10)).is_none(),
        "source process exited"
    );
    assert_eq!(src.info()["state"], "running", "source guest resumed");
    src.wait_progress(2);
    assert!(
        src.fails().is_empty(),
        "source guest verification: {:?}",
        src.fails()
    );
}

/// A destination after a failed attempt: still alive, listening for the next migration,
/// the guest never run, and `info` naming why the attempt failed.
fn assert_destination_listening(dst: &mut Proc, phrases: &[&str]) {
    assert!(
        dst.wait_exit(Duration::from_millis(300)).is_none(),
        "the destination must survive a failed attempt: {}",
        dst.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = dst.info();
        let incoming = &info["incoming"];
        let error = incoming["error"].as_str().unwrap_or("").to_string();
        if incoming["status"] == "listening" && phrases.iter().any(|p| error.contains(p)) {
            assert_eq!(info["role"], "migrating-in");
            assert_eq!(info["state"], "paused", "the guest never ran here");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "destination state {info} does not name any of {phrases:?}\n{}",
            dst.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The statistics of a `migrate --json` that succeeded and completed (its failure is
/// reported with both VMs' logs).
fn completed_stats(out: &Output, src: &Proc, dst: &Proc) -> Value {
    assert!(
        out.status.success(),
        "migrate failed: {}\nsource: {}\ndestination: {}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr(),
        dst.stderr()
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
    stats
}

fn migrate_json(src: &Proc, uri: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", uri, "--json"];
    args.extend_from_slice(extra);
    remote(&src.api, &args)
}

/// Every page identical on both sides (the source's digest at the switchover against the
/// destination's once all memory arrived); a differing page is named.
fn assert_same_memory(src: &Path, dst: &Path) {
    match ferry_migrate::digest::compare_files(src, dst) {
        Ok(pages) => assert_eq!(pages, (128u64 << 20) as usize / 4096),
        Err(e) => panic!("memory differs: {e}"),
    }
}

fn migrate_case(uri_kind: &str, channels: u16, vcpus: u32) {
    let stats = migrate_case_with(uri_kind, channels, vcpus, &[], &[]);
    // Checksums are on by default on plain channels.
    assert_eq!(stats["checksums"], true, "{stats}");
    assert_eq!(stats["tls"], false, "{stats}");
}

/// A migration with `dst_extra` for the destination and `mig_extra` for `migrate`, checked
/// end to end; returns its statistics.
fn migrate_case_with(
    uri_kind: &str,
    channels: u16,
    vcpus: u32,
    dst_extra: &[String],
    mig_extra: &[&str],
) -> Value {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = if uri_kind == "tcp" {
        tcp_uri()
    } else {
        format!("unix:{}", dir.path().join("mig.sock").display())
    };
    let dst_digest = dir.path().join("dst.digest");
    let src_digest = dir.path().join("src.digest");
    let mut dst_args = vec![s("--digest-file"), dst_digest.display().to_string()];
    dst_args.extend_from_slice(dst_extra);
    let mut dst = destination(dir.path(), "destination", &uri, MEM, vcpus, &dst_args);
    let mut src = source(dir.path(), vcpus);
    let before = *src.sweeps().last().unwrap();

    let channels_arg = channels.to_string();
    let mut args = vec![
        "--channels",
        &channels_arg,
        "--digest-file",
        src_digest.to_str().unwrap(),
        // The destination hashes all of memory inside the switchover.
        "--switchover-timeout",
        "60000",
    ];
    args.extend_from_slice(mig_extra);
    let out = migrate_json(&src, &uri, &args);
    let stats = completed_stats(&out, &src, &dst);
    assert_eq!(stats["channels"], channels);
    assert!(stats["pages_data"].as_u64().unwrap() > 10_000, "{stats}");
    assert!(stats["downtime_ms"].as_f64().unwrap() > 0.0);

    // The source recorded the hand-over: running the guest there again is refused (or the
    // process is already gone), and it exits cleanly.
    let again = remote(&src.api, &["resume"]);
    assert!(
        !again.status.success(),
        "resume after the hand-over must fail"
    );
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("migrated away") || err.contains("cannot connect"),
        "{err}"
    );
    let st = src
        .wait_exit(Duration::from_secs(10))
        .expect("source did not exit");
    assert!(st.success(), "source exit status {st}: {}", src.stderr());

    // Memory at the switchover is identical on both sides, page for page.
    assert_same_memory(&src_digest, &dst_digest);

    // The guest runs on the destination, carries on from where it was, and its own checks hold.
    dst.wait_progress(2);
    let after = dst.sweeps();
    assert!(
        after.iter().all(|s| *s >= before),
        "sweeps went back: {before} then {after:?}"
    );
    assert!(
        dst.fails().is_empty(),
        "destination guest verification: {:?}",
        dst.fails()
    );
    assert!(
        src.fails().is_empty(),
        "source guest verification: {:?}",
        src.fails()
    );
    assert_carries_on_then_quit(&mut dst, &[]);
    stats
}

/// The destination runs the guest on (no reboot), has said the migration is complete
/// (and each of `also`), and quits cleanly when told.
fn assert_carries_on_then_quit(dst: &mut Proc, also: &[&str]) {
    assert!(
        dst.lines()
            .iter()
            .all(|l| !matches!(l, GuestLine::Boot { .. })),
        "guest rebooted"
    );
    assert_eq!(dst.info()["state"], "running");
    let said = dst.stderr();
    for phrase in std::iter::once(&"incoming migration complete").chain(also) {
        assert!(said.contains(phrase), "no {phrase:?} in: {said}");
    }
    assert!(remote(&dst.api, &["quit"]).status.success());
    assert!(dst
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

#[test]
fn migrates_over_mutual_tls_with_zstd() {
    let certs = ferry_testkit::certs::Certs::make();
    let (src_tls, dst_tls) = (certs.source(), certs.destination());
    let stats = migrate_case_with(
        "tcp",
        2,
        1,
        &[s("--tls-dir"), dst_tls.display().to_string()],
        &["--tls-dir", src_tls.to_str().unwrap(), "--compress", "zstd"],
    );
    assert_eq!(stats["tls"], true, "{stats}");
    assert_eq!(
        stats["checksums"], false,
        "TLS authenticates every byte: {stats}"
    );
    assert!(stats["batches_compressed"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn migrates_with_lz4_and_checksums() {
    let stats = migrate_case_with("unix", 2, 2, &[], &["--compress", "lz4"]);
    assert_eq!(stats["checksums"], true, "{stats}");
    assert!(stats["batches_compressed"].as_u64().unwrap() > 0, "{stats}");
}

/// A mutual-TLS destination refuses a plaintext source and one whose certificate another
/// CA signed; both sources keep their guests, the destination keeps listening.
#[test]
fn a_tls_destination_refuses_plaintext_and_foreign_certificates() {
    let _g = serial_guard();
    let certs = ferry_testkit::certs::Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let tls = [s("--tls-dir"), certs.destination().display().to_string()];
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &tls);
    let mut src = source(dir.path(), 1);
    let other = certs.other_ca();
    for (extra, why) in [
        (vec![], "accepts only mutual-TLS migrations"),
        (
            vec!["--tls-dir", other.to_str().unwrap()],
            "received fatal alert: UnknownCA",
        ),
    ] {
        let out = migrate_json(&src, &uri, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{err}");
        assert_source_unharmed(&mut src);
        assert!(
            dst.wait_exit(Duration::from_millis(200)).is_none(),
            "{}",
            dst.stderr()
        );
        assert_eq!(dst.info()["state"], "paused", "the guest never ran here");
    }
    let log = dst.stderr();
    assert!(log.contains("accepts only mutual-TLS"), "{log}");
    assert!(
        log.contains("UnknownIssuer"),
        "refusal logged with its reason: {log}"
    );
}

/// A byte flipped in a cold page's data on the way: with checksums (plain) and with TLS the
/// migration fails with the reason, the source keeps its guest, the destination never runs
/// one with a wrong page.
#[test]
fn a_flipped_byte_in_the_page_stream_fails_plain_and_tls_migrations() {
    use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, RawFlip, Trigger};
    use ferry_transport::Uri;
    let _g = serial_guard();
    let certs = ferry_testkit::certs::Certs::make();
    let dir = tempfile::tempdir().unwrap();
    let mut src = source(dir.path(), 1);
    for tls in [false, true] {
        let uri = tcp_uri();
        let mut dst_args = vec![];
        let mut mig: Vec<String> = vec![];
        if tls {
            dst_args = vec![s("--tls-dir"), certs.destination().display().to_string()];
            mig = vec![
                s("--tls-dir"),
                certs.source().display().to_string(),
                s("--tls-hostname"),
                s("localhost"),
            ];
        }
        let name = if tls {
            "tls-destination"
        } else {
            "destination"
        };
        let mut dst = destination(dir.path(), name, &uri, MEM, 1, &dst_args);
        let upstream: Uri = uri.parse().unwrap();
        let listen = Uri::Tcp("127.0.0.1:0".into());
        // The 100th page batch holds cold pages (the hot set is the first 8 MiB).
        let p = if tls {
            let flip = RawFlip {
                connection: 1,
                offset: 50 << 20,
            };
            Proxy::start_raw(&listen, upstream, flip).unwrap()
        } else {
            let when = Trigger::Frame {
                dir: Dir::ToDestination,
                kind: ferry_proto::MessageKind::Pages,
                nth: 100,
            };
            let f = Fault {
                when,
                action: Action::CorruptLast,
            };
            Proxy::start(&listen, upstream, vec![f]).unwrap()
        };
        let via = p.uri().to_string();
        let mut args: Vec<&str> = vec!["--channels", "2"];
        args.extend(mig.iter().map(String::as_str));
        let out = migrate_json(&src, &via, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!p.fired().is_empty(), "tls={tls}: the byte was flipped");
        let why = if tls {
            "TLS record failed authentication"
        } else {
            "arrived corrupted on data"
        };
        assert!(
            !out.status.success() && err.contains(why),
            "tls={tls}: {err}"
        );
        assert_source_unharmed(&mut src);
        assert_destination_listening(&mut dst, &[why]);
    }
}

/// Postcopy end to end: the guest runs on the destination before its memory is there and
/// pulls what it touches; its own checks hold and it carries on. With `start`, the
/// migration is switched to postcopy by `migrate-start-postcopy` while precopy runs.
/// Returns the source's statistics.
fn postcopy_case(vcpus: u32, mig_extra: &[&str], dst_extra: &[String], start: bool) -> Value {
    postcopy_case_saying(vcpus, mig_extra, dst_extra, start, &[])
}

/// [`postcopy_case`], and the destination's completion line says each of `dst_says`.
fn postcopy_case_saying(
    vcpus: u32,
    mig_extra: &[&str],
    dst_extra: &[String],
    start: bool,
    dst_says: &[&str],
) -> Value {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, vcpus, dst_extra);
    let mut src = source(dir.path(), vcpus);
    let before = *src.sweeps().last().unwrap();
    let mut args = vec!["--channels", "2"];
    args.extend_from_slice(mig_extra);
    let out = std::thread::scope(|sc| {
        let m = sc.spawn(|| migrate_json(&src, &uri, &args));
        if start {
            src.wait_for("precopy to run", Duration::from_secs(30), |p| {
                p.info()["migration"]["status"] == "active"
            });
            let r = remote(&src.api, &["migrate-start-postcopy"]);
            assert!(
                r.status.success(),
                "migrate-start-postcopy: {}",
                String::from_utf8_lossy(&r.stderr)
            );
        }
        m.join().unwrap()
    });
    let stats = completed_stats(&out, &src, &dst);
    let p = &stats["postcopy"];
    assert!(p["pages_missing"].as_u64().unwrap() > 0, "{stats}");
    let st = src
        .wait_exit(Duration::from_secs(10))
        .expect("source did not exit");
    assert!(st.success(), "source exit status {st}: {}", src.stderr());
    // The destination has every page and the guest's checks over all of them hold.
    dst.wait_progress(3);
    assert!(
        dst.fails().is_empty(),
        "destination guest verification: {:?}",
        dst.fails()
    );
    assert!(
        dst.sweeps().iter().all(|s| *s >= before),
        "sweeps went back"
    );
    let mut says = vec!["\"postcopy\":{"];
    says.extend_from_slice(dst_says);
    assert_carries_on_then_quit(&mut dst, &says);
    stats
}

#[test]
fn postcopy_moves_a_running_guest_one_vcpu() {
    let stats = postcopy_case(1, &["--postcopy"], &[], false);
    assert_eq!(stats["postcopy"]["trigger"], "now", "{stats}");
    assert_eq!(stats["postcopy"]["precopy_passes"], 0, "{stats}");
}

#[test]
fn postcopy_moves_a_running_guest_two_vcpus_into_shared_memory() {
    // The preparation at full speed, so that it has filled the file before `migrate`
    // (at nice 19 two busy vCPUs can hold it off for seconds, and then postcopy frees the
    // pages and uses UFFDIO_COPY instead).
    let dst = [
        s("--memory-backend"),
        s("memfd"),
        s("--fault-queues"),
        s("4"),
        s("--prepare-nice"),
        s("0"),
    ];
    // memfd memory keeps its prepared pages: they are written into the file and mapped.
    let stats = postcopy_case_saying(2, &["--postcopy"], &dst, false, &["\"placement\":\"file\""]);
    assert_eq!(stats["postcopy"]["trigger"], "now", "{stats}");
}

#[test]
fn postcopy_moves_a_running_guest_into_hugetlb_memory() {
    if !ferry_sys::uffd::Uffd::minor_faults_supported(true)
        || !ferry_sys::mm::hugetlb_dont_need_supported()
    {
        eprintln!("skipped: this kernel cannot take postcopy into hugetlb memory");
        return;
    }
    // 128 MiB of 2 MiB pages on the destination; each is mapped whole once complete.
    let _pages = HugePages::reserve(64);
    let dst = [s("--memory-backend"), s("hugetlb")];
    let says = ["\"placement\":\"file-2m\""];
    let stats = postcopy_case_saying(1, &["--postcopy"], &dst, false, &says);
    assert_eq!(stats["postcopy"]["trigger"], "now", "{stats}");
}

#[test]
fn postcopy_after_a_precopy_that_cannot_converge_on_a_capped_link() {
    // 100 MB/s cannot carry the hot set within 50 ms: postcopy instead of throttling, and
    // the requested pages pass the cap.
    let stats = postcopy_case(
        1,
        &["--postcopy-after-precopy", "--max-bandwidth", "100M"],
        &[],
        false,
    );
    assert_eq!(stats["postcopy"]["trigger"], "after-precopy", "{stats}");
    assert!(stats["postcopy"]["precopy_passes"].as_u64().unwrap() >= 1);
    assert_eq!(stats["max_throttle_percent"], 0, "{stats}");
}

#[test]
fn migrate_start_postcopy_switches_a_running_precopy() {
    let stats = postcopy_case(
        2,
        &[
            "--postcopy-on-request",
            "--max-bandwidth",
            "60M",
            "--no-auto-converge",
        ],
        &[],
        true,
    );
    assert_eq!(stats["postcopy"]["trigger"], "requested", "{stats}");
}

/// A TCP proxy that cuts every connection when more than `limit` bytes have gone towards
/// the destination. With `once`, connections made after the cut are forwarded untouched
/// (the link is back); otherwise they are cut at their first bytes. Returns its URI and
/// whether the cut happened.
fn cut_proxy(target: String, limit: u64, once: bool) -> (String, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let was_cut = cut.clone();
    std::thread::spawn(move || {
        for a in l.incoming().flatten() {
            let Ok(b) = TcpStream::connect(&target) else {
                continue;
            };
            let limited = !once || !cut.load(Ordering::SeqCst);
            if limited {
                conns.lock().unwrap().push(a.try_clone().unwrap());
                conns.lock().unwrap().push(b.try_clone().unwrap());
            }
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (sent, cut2, conns2) = (sent.clone(), cut.clone(), conns.clone());
            std::thread::spawn(move || {
                let (mut a, mut b) = (a, b);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if limited && sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit {
                        cut2.store(true, Ordering::SeqCst);
                        for c in conns2.lock().unwrap().iter() {
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        }
                        break;
                    }
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
            });
        }
    });
    (uri, was_cut)
}

/// After a postcopy: the source exited cleanly, the destination runs the guest, whose own
/// checks stay clean, and quits when asked.
fn assert_postcopy_ended_well(src: &mut Proc, dst: &mut Proc) {
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    dst.wait_progress(3);
    assert!(
        dst.fails().is_empty(),
        "destination guest: {:?}",
        dst.fails()
    );
    assert_eq!(dst.info()["state"], "running");
    assert!(remote(&dst.api, &["quit"]).status.success());
    assert!(dst.wait_exit(Duration::from_secs(10)).is_some());
}

/// The link dies in the middle of postcopy, after the guest moved: the source keeps the
/// pages, the destination keeps the guest, the source reconnects, and postcopy completes
/// with the guest's own checks intact.
#[test]
fn postcopy_survives_a_link_cut() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut src = source(dir.path(), 1);
    let (via, was_cut) = cut_proxy(uri.trim_start_matches("tcp:").to_string(), 40 << 20, true);
    let out = migrate_json(&src, &via, &["--channels", "2", "--postcopy"]);
    completed_stats(&out, &src, &dst);
    assert!(was_cut.load(Ordering::SeqCst), "the link was never cut");
    assert!(
        src.stderr().contains("postcopy broke off"),
        "{}",
        src.stderr()
    );
    assert_postcopy_ended_well(&mut src, &mut dst);
    assert!(dst.stderr().contains("incoming migration complete"));
}

/// The link dies in the middle of postcopy and never comes back (the proxy cuts every later
/// connection too): the destination listens on a new address (`migrate-recover`), the
/// source is pointed there (`migrate --resume`), and postcopy completes with the guest's
/// own checks intact.
#[test]
fn postcopy_cut_for_good_is_recovered_at_a_new_address() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut src = source(dir.path(), 1);
    let (via, was_cut) = cut_proxy(uri.trim_start_matches("tcp:").to_string(), 40 << 20, false);
    let api = src.api.clone();
    let mig = std::thread::spawn(move || {
        remote(
            &api,
            &["migrate", &via, "--json", "--channels", "2", "--postcopy"],
        )
    });
    let paused = |side: &'static str| move |p: &Proc| p.info()[side]["status"] == "postcopy-paused";
    let wait = Duration::from_secs(30);
    src.wait_for("postcopy to break off", wait, paused("migration"));
    dst.wait_for("postcopy to break off", wait, paused("incoming"));
    assert!(was_cut.load(Ordering::SeqCst));
    let new = tcp_uri();
    let out = remote(&dst.api, &["migrate-recover", &new]);
    assert!(out.status.success(), "{out:?}");
    let out = remote(&src.api, &["migrate", &new, "--resume"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reconnecting to tcp:"),
        "{out:?}"
    );
    let out = mig.join().unwrap();
    let stats = completed_stats(&out, &src, &dst);
    assert_eq!(stats["postcopy"]["reconnects"], 1, "{stats}");
    // What arrived before the cut (about 40 MiB) is not pushed again.
    assert!(
        stats["postcopy"]["pages_not_resent"].as_u64() > Some(1000),
        "{stats}"
    );
    assert_postcopy_ended_well(&mut src, &mut dst);
}

/// The destination's word that every page arrived (`PostcopyDone`) is lost on the way: the
/// destination, which runs the guest, keeps its listener and says it again when the source
/// reconnects, so the source ends its migration instead of reconnecting forever.
#[test]
fn a_lost_postcopy_done_is_said_again() {
    use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, Trigger};
    use ferry_transport::Uri;
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut src = source(dir.path(), 1);
    let lost = Fault {
        when: Trigger::Frame {
            dir: Dir::ToSource,
            kind: ferry_proto::MessageKind::PostcopyDone,
            nth: 1,
        },
        action: Action::Drop,
    };
    let listen = Uri::Tcp("127.0.0.1:0".into());
    let px = Proxy::start(&listen, uri.parse().unwrap(), vec![lost]).unwrap();
    let via = px.uri().to_string();
    let out = migrate_json(&src, &via, &["--channels", "2", "--postcopy"]);
    let stats = completed_stats(&out, &src, &dst);
    assert!(
        stats["postcopy"]["reconnects"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_postcopy_ended_well(&mut src, &mut dst);
}

#[test]
fn migrates_over_tcp_one_channel_one_vcpu() {
    migrate_case("tcp", 1, 1);
}

#[test]
fn migrates_over_tcp_four_channels_two_vcpus() {
    migrate_case("tcp", 4, 2);
}

#[test]
fn migrates_over_unix_one_channel_two_vcpus() {
    migrate_case("unix", 1, 2);
}

#[test]
fn migrates_over_unix_four_channels_one_vcpu() {
    migrate_case("unix", 4, 1);
}

#[test]
fn killed_destination_leaves_the_source_running_and_usable() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut src = source(dir.path(), 1);
    // A slow link, so there is a migration in flight to kill.
    let api = src.api.clone();
    let u = uri.clone();
    let mig = std::thread::spawn(move || {
        remote(&api, &["migrate", &u, "--max-bandwidth", "8M", "--json"])
    });
    src.wait_for("bytes to flow", Duration::from_secs(30), |p| {
        p.info()["migration"]["bytes"].as_u64().unwrap_or(0) > 4 << 20
    });
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let out = mig.join().unwrap();
    assert!(
        !out.status.success(),
        "migrate must fail when the destination dies"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("closed") || err.contains("Broken pipe") || err.contains("reset"),
        "unclear error: {err}"
    );
    assert_source_unharmed(&mut src);
    assert_eq!(src.info()["migration"]["status"], "failed");

    // Still usable: migrate again, to a new destination.
    let uri2 = tcp_uri();
    let dst2 = destination(dir.path(), "destination2", &uri2, MEM, 1, &[]);
    let out = migrate_json(&src, &uri2, &[]);
    assert!(
        out.status.success(),
        "second migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dst2.wait_progress(2);
    assert!(dst2.fails().is_empty(), "{:?}", dst2.fails());
}

#[test]
fn mismatched_destination_is_refused_with_the_reason() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, "256M", 1, &[]);
    let mut src = source(dir.path(), 1);
    let out = migrate_json(&src, &uri, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("--memory 128M"),
        "source error: {err}"
    );
    assert_destination_listening(&mut dst, &["128 MiB"]);
    assert_source_unharmed(&mut src);
}

#[test]
fn cancel_leaves_the_source_running() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut src = source(dir.path(), 1);
    let api = src.api.clone();
    let u = uri.clone();
    let mig = std::thread::spawn(move || remote(&api, &["migrate", &u, "--max-bandwidth", "8M"]));
    src.wait_for("bytes to flow", Duration::from_secs(30), |p| {
        p.info()["migration"]["bytes"].as_u64().unwrap_or(0) > 2 << 20
    });
    assert!(remote(&src.api, &["migrate-cancel"]).status.success());
    let out = mig.join().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    assert_source_unharmed(&mut src);
    assert_eq!(src.info()["migration"]["status"], "cancelled");
    assert_destination_listening(&mut dst, &["cancelled"]);
}

#[test]
fn garbage_from_the_destination_fails_cleanly() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    // Not a Ferry destination: it answers every connection with noise.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(&[0xAB; 4096]);
        }
    });
    let mut src = source(dir.path(), 1);
    let out = migrate_json(&src, &uri, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("main channel") && err.contains("kind"),
        "error: {err}"
    );
    assert_source_unharmed(&mut src);
}

#[test]
fn garbage_to_the_destination_is_refused() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut c = TcpStream::connect(uri.strip_prefix("tcp:").unwrap()).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    dst.wait_for(
        "the stray connection to be dropped",
        Duration::from_secs(10),
        |p| p.stderr().contains("dropped a connection"),
    );
    let err = dst.stderr();
    assert!(
        err.contains("not a Ferry") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        dst.wait_exit(Duration::from_millis(200)).is_none(),
        "destination survives"
    );
    assert_eq!(dst.info()["incoming"]["status"], "listening");
}

#[test]
fn other_protocol_version_is_refused_by_name() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let mut c = TcpStream::connect(uri.strip_prefix("tcp:").unwrap()).unwrap();
    let mut buf = Vec::new();
    ferry_proto::Message::Hello(ferry_proto::Hello {
        version: 99,
        capabilities: 0,
        session: 1,
        role: ferry_proto::ChannelRole::Main,
        data_channels: 1,
    })
    .encode(&mut buf);
    c.write_all(&buf).unwrap();
    let reply = ferry_proto::read_message(&mut c, &mut Vec::new()).unwrap();
    match reply {
        ferry_proto::Message::Refuse { reason } => {
            assert!(reason.contains("version 99"), "{reason}")
        }
        m => panic!("expected Refuse, got {m:?}"),
    }
    dst.wait_for("the refusal to be logged", Duration::from_secs(10), |p| {
        p.stderr().contains("version 99")
    });
    assert!(
        dst.wait_exit(Duration::from_millis(200)).is_none(),
        "destination survives"
    );
}

/// Forwards connections to `target`, but cuts every connection once `limit` bytes went from
/// the source towards the destination.
fn cutting_proxy(target: String, limit: u64) -> String {
    cut_proxy(target, limit, false).0
}

#[test]
fn truncated_stream_fails_both_sides_cleanly() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let proxy = cutting_proxy(uri.strip_prefix("tcp:").unwrap().to_string(), 20 << 20);
    let mut src = source(dir.path(), 1);
    let out = migrate_json(&src, &proxy, &["--channels", "2"]);
    assert!(
        !out.status.success(),
        "migration through a cut link must fail"
    );
    assert_source_unharmed(&mut src);
    assert_destination_listening(&mut dst, &["closed", "truncated", "ended", "reset"]);
}

/// Reserves 2 MiB huge pages for a test and gives them back afterwards.
struct HugePages;

impl HugePages {
    fn reserve(pages: u64) -> ferry_testkit::hugepages::HugePages {
        ferry_testkit::hugepages::HugePages::reserve(pages).unwrap_or_else(|| {
            panic!(
                "cannot reserve {pages} huge pages in /proc/sys/vm/nr_hugepages; the hugetlb \
                 tests need root and free memory"
            )
        })
    }
}

/// How a process's guest memory (its mapping of exactly [`MEM`]) is backed, from
/// /proc/PID/smaps, in KiB.
#[derive(Debug, Default)]
struct Backing {
    anon_huge_kib: u64,
    hugetlb_kib: u64,
    kernel_page_kib: u64,
}

fn guest_backing(pid: u32) -> Backing {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let kib = |l: &str, key: &str| -> Option<u64> {
        l.strip_prefix(key)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let mut found = None::<Backing>;
    let mut current = None::<Backing>;
    for l in text.lines() {
        if let Some(size) = kib(l, "Size:") {
            if let Some(b) = current.take() {
                found = Some(b);
            }
            current = (size == 128 * 1024).then(Backing::default);
            continue;
        }
        let Some(b) = current.as_mut() else { continue };
        if let Some(v) = kib(l, "AnonHugePages:") {
            b.anon_huge_kib = v;
        } else if let Some(v) = kib(l, "KernelPageSize:") {
            b.kernel_page_kib = v;
        } else if let Some(v) = kib(l, "Shared_Hugetlb:").or_else(|| kib(l, "Private_Hugetlb:")) {
            b.hugetlb_kib += v;
        }
    }
    current
        .or(found)
        .unwrap_or_else(|| panic!("no {MEM} mapping in /proc/{pid}/smaps"))
}

/// Checks that guest memory is backed by huge pages of the kind asked for: transparent huge
/// pages for at least half of it, or hugetlb pages for all of it (the guest fills its
/// memory at boot; the destination has received every page).
fn assert_huge(name: &str, pid: u32, kind: &str) {
    let b = guest_backing(pid);
    let whole = 128 * 1024;
    let ok = match kind {
        "thp" => b.anon_huge_kib >= whole / 2,
        _ => b.kernel_page_kib == 2048 && b.hugetlb_kib == whole,
    };
    assert!(
        ok,
        "{name}: guest memory is not backed by {kind} pages: {b:?}"
    );
}

fn migrate_backend(kind: &str, src_extra: &[String], dst_extra: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let dst_digest = dir.path().join("dst.digest");
    let src_digest = dir.path().join("src.digest");
    let mut extra = dst_extra.to_vec();
    extra.extend([s("--digest-file"), dst_digest.display().to_string()]);
    let dst = destination(dir.path(), "destination", &uri, MEM, 1, &extra);
    let img = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let mut args = vec![
        s("--kernel"),
        img.display().to_string(),
        s("--append"),
        s("ws=8M hb=1 dma=1"),
        s("--memory"),
        s(MEM),
    ];
    args.extend_from_slice(src_extra);
    let mut src = spawn("source", dir.path(), &args);
    src.wait_ready();
    src.wait_progress(1);
    assert_huge("source", src.child.id(), kind);
    let out = migrate_json(
        &src,
        &uri,
        &[
            "--digest-file",
            src_digest.to_str().unwrap(),
            // The destination hashes all of memory inside the switchover.
            "--switchover-timeout",
            "60000",
        ],
    );
    assert!(
        out.status.success(),
        "migrate failed: {}\ndestination: {}",
        String::from_utf8_lossy(&out.stderr),
        dst.stderr()
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["prepare"]["reported"], true, "{stats}");
    assert_eq!(stats["prepare"]["in_downtime_ms"], 0.0, "{stats}");
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    assert_same_memory(&src_digest, &dst_digest);
    dst.wait_progress(2);
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    assert_eq!(dst.info()["state"], "running");
    assert_huge("destination", dst.child.id(), kind);
}

#[test]
fn migrates_transparent_huge_page_memory() {
    let _g = serial_guard();
    migrate_backend("thp", &[s("--hugepages")], &[s("--hugepages")]);
}

#[test]
fn migrates_hugetlb_memory_with_locked_destination() {
    let _g = serial_guard();
    // 128 MiB on each side.
    let _pages = HugePages::reserve(128);
    migrate_backend(
        "hugetlb",
        &[s("--memory-backend"), s("hugetlb")],
        &[
            s("--memory-backend"),
            s("hugetlb"),
            s("--prepare"),
            s("lock"),
        ],
    );
}

#[test]
fn hugetlb_destination_without_reserved_pages_is_refused_before_listening() {
    let _g = serial_guard();
    // More than the free huge pages, whatever the machine has reserved.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0);
    let mem = format!("{}M", (free + 8) * 2);
    let port = free_port();
    let out = Command::new(FERRY)
        .args([
            "run",
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
            "--memory",
            &mem,
        ])
        .args(["--memory-backend", "hugetlb", "--serial", "null"])
        .output()
        .unwrap();
    assert_refused_before_listening(&out, port, &["huge pages", "nr_hugepages"]);
}

#[test]
fn lock_preparation_beyond_the_memlock_limit_is_refused_before_listening() {
    let _g = serial_guard();
    let port = free_port();
    // No CAP_IPC_LOCK (dropped from the bounding and inheritable sets) and a 1 MiB limit.
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock"])
        .args(["prlimit", "--memlock=1048576:1048576", FERRY])
        .args([
            "run",
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
            "--memory",
            "64M",
        ])
        .args(["--prepare", "lock", "--serial", "null"])
        .output()
        .expect("setpriv and prlimit (util-linux) are needed for this test");
    assert_refused_before_listening(&out, port, &["--prepare", "MEMLOCK"]);
}

/// A destination that cannot do what it was asked fails at once, says why, and never
/// listened: no source could have started sending to it.
fn assert_refused_before_listening(out: &Output, port: u16, phrases: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for p in phrases {
        assert!(err.contains(p), "missing '{p}' in: {err}");
    }
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "it must not have listened"
    );
}

#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let dst = destination(dir.path(), "destination", &uri, "32M", 1, &[]);
    let src = source_with(dir.path(), 1, "32M", "ws=4M");
    // The guest rewrites its 4 MiB working set every ~20 ms; 6 MB/s cannot keep up.
    let out = migrate_json(
        &src,
        &uri,
        &["--max-bandwidth", "6M", "--downtime-limit", "30"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        stats["max_throttle_percent"].as_u64().unwrap() >= 20,
        "{stats}"
    );
    assert!(stats["passes"].as_u64().unwrap() >= 4, "{stats}");
    dst.wait_progress(2);
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    assert_eq!(
        dst.info()["throttle_percent"],
        0,
        "the destination runs unthrottled"
    );
}

/// `ferry demo` on a small guest (it bounds its own waits).
fn demo(flip: Option<&str>) -> Output {
    let mut cmd = Command::new(FERRY);
    cmd.args(["demo", "--memory", "128M", "--ws", "8M"]);
    if let Some(gpa) = flip {
        cmd.env("FERRY_TEST_FLIP_BYTE", gpa);
    }
    cmd.output().unwrap()
}

#[test]
fn demo_compares_every_page() {
    let _g = serial_guard();
    let out = demo(None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("memory check: all 32768 pages identical on source and destination"),
        "{text}"
    );
    assert!(text.contains("guest self-check: OK"), "{text}");
}

#[test]
fn demo_fails_naming_a_page_broken_after_loading() {
    let _g = serial_guard();
    // Cold memory, which the guest's own sampling check would rarely look at.
    let out = demo(Some("0x6000123"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("memory check: FAILED - 1 of 32768 pages differ")
            && text.contains("page at guest address 0x6000000"),
        "{text}"
    );
}

/// A guest on shared memory (`backend`: memfd or hugetlb), running and checking itself,
/// with `env` in its process's environment.
fn shared_vm(name: &'static str, dir: &Path, backend: &str, env: &[(&str, &str)]) -> Proc {
    let img = ferry_guest::write_image(ImageKind::Elf, dir).unwrap();
    let p = spawn_env(
        name,
        dir,
        &[
            s("--kernel"),
            img.display().to_string(),
            s("--append"),
            s("ws=8M hb=1 dma=1"),
            s("--memory"),
            s(MEM),
            s("--memory-backend"),
            s(backend),
        ],
        env,
    );
    p.wait_ready();
    p.wait_progress(1);
    p
}

/// The source of a local hand-over.
fn shared_source(dir: &Path, backend: &str) -> Proc {
    shared_vm("source", dir, backend, &[])
}

/// `migrate --local` with digests on both sides; returns the output and the digest paths.
fn migrate_local(src: &Proc, dir: &Path, uri: &str, extra: &[&str]) -> (Output, PathBuf) {
    let digest = dir.join(format!("src-{}.digest", free_port()));
    // Both sides hash all of memory inside the switchover.
    let mut args = vec![
        "--local",
        "--digest-file",
        digest.to_str().unwrap(),
        "--switchover-timeout",
        "60000",
    ];
    args.extend_from_slice(extra);
    (migrate_json(src, uri, &args), digest)
}

/// The hand-over succeeded: nothing copied, the same memory on both sides, the guest runs
/// on the destination from where it was and its own checks hold, the source exited.
fn assert_local_hand_over(out: &Output, src: &mut Proc, dst: &Proc, digests: (&Path, &Path)) {
    assert!(
        out.status.success(),
        "migrate --local failed: {}\nsource: {}\ndestination: {}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr(),
        dst.stderr()
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["local"], true, "{stats}");
    assert_eq!(stats["pages_data"], 0, "{stats}");
    assert_eq!(stats["channels"], 0, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() < 1 << 20, "{stats}");
    let before = *src.sweeps().last().unwrap();
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    assert_same_memory(digests.0, digests.1);
    dst.wait_progress(2);
    assert!(
        dst.sweeps().iter().all(|s| *s >= before),
        "{:?}",
        dst.sweeps()
    );
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    assert!(src.fails().is_empty(), "{:?}", src.fails());
    assert_eq!(dst.info()["state"], "running");
}

#[test]
fn local_hand_over_of_memfd_memory_copies_no_page() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("local.sock").display());
    let dst_digest = dir.path().join("dst.digest");
    let dst = destination(
        dir.path(),
        "destination",
        &uri,
        MEM,
        1,
        &[s("--digest-file"), dst_digest.display().to_string()],
    );
    let mut src = shared_source(dir.path(), "memfd");
    let (out, src_digest) = migrate_local(&src, dir.path(), &uri, &[]);
    assert_local_hand_over(&out, &mut src, &dst, (&src_digest, &dst_digest));
    // The destination now runs on the source's memory file, and says so.
    assert_eq!(dst.info()["memory_backend"], "memfd");
}

#[test]
fn local_hand_over_of_hugetlb_memory() {
    let _g = serial_guard();
    let _pages = HugePages::reserve(128);
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("local.sock").display());
    let dst_digest = dir.path().join("dst.digest");
    let dst = destination(
        dir.path(),
        "destination",
        &uri,
        MEM,
        1,
        &[
            s("--memory-backend"),
            s("hugetlb"),
            // Nothing to prepare: the source's memory replaces this process's own.
            s("--prepare"),
            s("none"),
            s("--digest-file"),
            dst_digest.display().to_string(),
        ],
    );
    let mut src = shared_source(dir.path(), "hugetlb");
    let (out, src_digest) = migrate_local(&src, dir.path(), &uri, &[]);
    assert_local_hand_over(&out, &mut src, &dst, (&src_digest, &dst_digest));
    assert_huge("destination", dst.child.id(), "hugetlb");
}

#[test]
fn a_failed_local_hand_over_leaves_the_guest_with_the_old_process() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("local.sock").display());
    let dst_digest = dir.path().join("dst.digest");
    let mut dst = destination(
        dir.path(),
        "destination",
        &uri,
        MEM,
        1,
        &[s("--digest-file"), dst_digest.display().to_string()],
    );
    let mut src = shared_source(dir.path(), "memfd");
    // A hung new process: the old one gives up and keeps the guest running.
    let pid = dst.child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let (out, _) = migrate_local(&src, dir.path(), &uri, &["--handshake-timeout", "500"]);
    signal("-CONT");
    assert!(!out.status.success(), "the hand-over must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out"), "{err}");
    src.wait_progress(2);
    assert_eq!(src.info()["state"], "running");
    assert!(src.fails().is_empty(), "{:?}", src.fails());
    // The new process, back, drops the stale attempt; the next hand-over works, every page
    // equal.
    assert_destination_listening(&mut dst, &["source", "handshake", "closed"]);
    let (out, src_digest) = migrate_local(&src, dir.path(), &uri, &[]);
    assert_local_hand_over(&out, &mut src, &dst, (&src_digest, &dst_digest));
}

#[test]
fn local_hand_over_is_refused_where_it_cannot_work() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 1);
    let unix = format!("unix:{}", dir.path().join("none.sock").display());
    let out = migrate_json(&src, &unix, &["--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("memory is anonymous") && err.contains("--memory-backend memfd"),
        "{err}"
    );
    let out = migrate_json(&src, &tcp_uri(), &["--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a unix: URI"), "{err}");
    src.wait_progress(1);
    assert_eq!(src.info()["state"], "running");
}

/// A memfd guest for `update --exec`, with `env` in its environment.
fn updatable(dir: &Path, env: &[(&str, &str)]) -> Proc {
    shared_vm("vm", dir, "memfd", env)
}

/// The guest kept running through whatever happened: no reboot, no failed check, its
/// progress carried on, and the API answers.
fn assert_guest_carries_on(p: &Proc, before: u64) {
    p.wait_progress(2);
    assert!(*p.sweeps().last().unwrap() > before, "{:?}", p.sweeps());
    assert_eq!(
        p.lines()
            .iter()
            .filter(|l| matches!(l, GuestLine::Boot { .. }))
            .count(),
        1,
        "the guest rebooted"
    );
    assert!(p.fails().is_empty(), "{:?}", p.fails());
    assert_eq!(p.info()["state"], "running");
}

/// Updates `vm` in place twice with this build: same PID each time, the guest carrying on
/// with its memory still on `backend`; then quits it.
fn update_twice_then_quit(mut vm: Proc, backend: &str) {
    let pid = vm.child.id();
    for _ in 0..2 {
        let before = *vm.sweeps().last().unwrap();
        let out = remote(&vm.api, &["update", "--exec", FERRY]);
        assert!(
            out.status.success(),
            "update failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            vm.stderr()
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["pid"], pid, "{r}");
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_guest_carries_on(&vm, before);
        assert_eq!(vm.info()["memory_backend"], backend);
        if backend == "hugetlb" {
            // The new binary's mapping is hugetlb. Smaps counts only the huge pages this
            // process has touched since the exec, so not all of memory yet.
            let b = guest_backing(pid);
            assert!(
                b.kernel_page_kib == 2048 && b.hugetlb_kib > 0,
                "guest memory is not a hugetlb mapping after the update: {b:?}"
            );
        }
    }
    assert!(vm.wait_exit(Duration::from_millis(100)).is_none());
    assert!(remote(&vm.api, &["quit"]).status.success());
    assert!(vm
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

#[test]
fn update_exec_hands_the_vm_to_a_new_binary_in_the_same_process() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    update_twice_then_quit(updatable(dir.path(), &[]), "memfd");
}

/// `update --exec` of a guest in hugetlb memory: the new binary maps the same huge pages
/// (over a placeholder it reserves itself, 2 MiB aligned) and the guest carries on.
#[test]
fn update_exec_of_hugetlb_memory() {
    let _g = serial_guard();
    let _pages = HugePages::reserve(64);
    let dir = tempfile::tempdir().unwrap();
    update_twice_then_quit(shared_vm("vm", dir.path(), "hugetlb", &[]), "hugetlb");
}

#[test]
fn a_failing_new_binary_leaves_the_vm_running() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    // The new binary takes over, then fails before running the guest (test hook): it hands
    // the VM back to the previous binary, and the client hears why.
    let vm = updatable(dir.path(), &[("FERRY_TEST_TAKEOVER_FAIL", "1")]);
    let before = *vm.sweeps().last().unwrap();
    let out = remote(&vm.api, &["update", "--exec", FERRY]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("could not take the VM over") && err.contains("took it back"),
        "{err}"
    );
    assert_guest_carries_on(&vm, before);
    // Not a ferry at all: refused before the guest is even paused.
    let before = *vm.sweeps().last().unwrap();
    let out = remote(&vm.api, &["update", "--exec", "/bin/true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a ferry that can take this VM over"),
        "{err}"
    );
    assert_guest_carries_on(&vm, before);
}

#[test]
fn update_exec_needs_shared_memory() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 1);
    let out = remote(&src.api, &["update", "--exec", FERRY]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--memory-backend memfd"), "{err}");
    assert_eq!(src.info()["state"], "running");
}

/// A source with test devices (`--device` specs), its guest writing and checking their
/// memory through MMIO (`tdev=`).
fn source_with_devices(dir: &Path, vcpus: u32, append: &str, devices: &[&str]) -> Proc {
    named_source_with_devices("source", dir, vcpus, append, devices)
}

fn named_source_with_devices(
    name: &'static str,
    dir: &Path,
    vcpus: u32,
    append: &str,
    devices: &[&str],
) -> Proc {
    let img = ferry_guest::write_image(ImageKind::Elf, dir).unwrap();
    let mut args = vec![
        s("--kernel"),
        img.display().to_string(),
        s("--append"),
        format!("{append} hb=1 cpus={vcpus}"),
        s("--memory"),
        s(MEM),
        s("--vcpus"),
        vcpus.to_string(),
    ];
    for d in devices {
        args.push(s("--device"));
        args.push(s(d));
    }
    let p = spawn(name, dir, &args);
    p.wait_ready();
    p.wait_progress(1);
    p
}

/// Every test device of `p`: (name, steps, fails, state).
fn testdevs(p: &Proc) -> Vec<(String, u64, u64, String)> {
    p.info()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["steps"].as_u64().unwrap(),
                d["fails"].as_u64().unwrap(),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn test_devices_load_side_by_side_and_keep_checking_themselves() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    // Started without --device: it creates the source's devices from their description.
    let dst_digest = dir.path().join("dst.digest");
    let src_digest = dir.path().join("src.digest");
    let digest_arg = [s("--digest-file"), dst_digest.display().to_string()];
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 2, &digest_arg);
    let loads = [20u64, 40, 60];
    let specs: Vec<String> = loads
        .iter()
        .enumerate()
        .map(|(i, ms)| format!("testdev,mem={}M,load-ms={ms}", 2 + 2 * i))
        .collect();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let src = source_with_devices(dir.path(), 2, "ws=4M tdev=3", &specs);
    let before: Vec<u64> = testdevs(&src).iter().map(|d| d.1).collect();
    assert!(before.iter().all(|s| *s > 0), "devices step: {before:?}");

    let out = migrate_json(
        &src,
        &uri,
        &[
            "--switchover-timeout",
            "60000",
            "--digest-file",
            src_digest.to_str().unwrap(),
        ],
    );
    let stats = completed_stats(&out, &src, &dst);
    assert_same_memory(&src_digest, &dst_digest);
    // 2 vCPUs, the platform, 3 test devices.
    assert_eq!(stats["devices"], 6, "{stats}");
    assert_eq!(stats["parallel_devices"], true);
    let part = stats["downtime"]["dest_load_ms"].as_f64().unwrap();
    assert!(
        (60.0..=66.0).contains(&part),
        "device part of the downtime {part} ms; slowest device 60 ms, sum 120 ms: {stats}"
    );

    // The guest checks the device memory it wrote through MMIO, and each device checks the
    // half it writes itself: both go on without a failure, from where they were.
    dst.wait_progress(3);
    assert!(dst.fails().is_empty(), "guest: {:?}", dst.fails());
    let after = testdevs(&dst);
    assert_eq!(after.len(), 3, "{after:?}");
    for (i, (name, steps, fails, state)) in after.iter().enumerate() {
        assert_eq!(name, &format!("testdev{i}"));
        assert_eq!(*fails, 0, "{name} found pages it did not write");
        assert_eq!(state, "RUNNING");
        assert!(
            *steps > before[i],
            "{name} carried on: {steps} after {}",
            before[i]
        );
    }
    assert_carries_on_then_quit(&mut dst, &[]);
}

#[test]
fn a_destination_with_other_devices_refuses_and_the_source_keeps_the_guest() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let extra = [s("--device"), s("testdev,mem=8M")];
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &extra);
    let mut src = source_with_devices(dir.path(), 1, "ws=4M tdev=1", &["testdev,mem=4M"]);
    let out = migrate_json(&src, &uri, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("testdev0") && err.contains("configured differently"),
        "{err}"
    );
    assert_source_unharmed(&mut src);
    assert_eq!(testdevs(&src)[0].2, 0, "source device check");
    assert_eq!(testdevs(&src)[0].3, "RUNNING");
    assert_destination_listening(&mut dst, &["testdev0"]);
}

#[test]
fn a_64_vcpu_vm_migrates_with_its_vcpus_saved_side_by_side_then_one_by_one() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        format!("unix:{}", dir.path().join("a.sock").display()),
        format!("unix:{}", dir.path().join("b.sock").display()),
    );
    let first = destination(dir.path(), "first", &a, MEM, 64, &[]);
    let src = source_with_devices(dir.path(), 64, "ws=2M active=2", &[]);
    let out = migrate_json(&src, &a, &["--switchover-timeout", "10000"]);
    let stats = completed_stats(&out, &src, &first);
    assert_eq!(stats["devices"], 65, "{stats}");
    assert_eq!(stats["parallel_devices"], true);
    first.wait_progress(2);
    assert!(first.fails().is_empty(), "{:?}", first.fails());
    // And on again, one vCPU after another (the shape of QEMU before 10.0).
    let mut second = destination(dir.path(), "second", &b, MEM, 64, &[]);
    let out = migrate_json(
        &first,
        &b,
        &["--switchover-timeout", "10000", "--serial-devices"],
    );
    let stats = completed_stats(&out, &first, &second);
    assert_eq!(stats["parallel_devices"], false);
    second.wait_progress(2);
    assert!(second.fails().is_empty(), "{:?}", second.fails());
    assert_carries_on_then_quit(&mut second, &[]);
}

#[test]
fn a_local_hand_over_streams_device_state_over_the_socket() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("local.sock").display());
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    let img = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let mut src = spawn(
        "source",
        dir.path(),
        &[
            s("--kernel"),
            img.display().to_string(),
            s("--append"),
            s("ws=4M hb=1 tdev=1"),
            s("--memory"),
            s(MEM),
            s("--memory-backend"),
            s("memfd"),
            s("--device"),
            s("testdev,mem=1M,load-ms=10"),
        ],
    );
    src.wait_ready();
    src.wait_progress(1);
    let before = testdevs(&src)[0].1;
    let out = migrate_json(&src, &uri, &["--local"]);
    let stats = completed_stats(&out, &src, &dst);
    assert_eq!(stats["local"], true);
    assert_eq!(stats["pages_data"], 0, "no page copied: {stats}");
    assert_eq!(stats["devices"], 3, "vCPU, platform, testdev0: {stats}");
    assert!(src.wait_exit(Duration::from_secs(10)).is_some());
    dst.wait_progress(2);
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    let (name, steps, fails, state) = testdevs(&dst).remove(0);
    assert_eq!(
        (name.as_str(), fails, state.as_str()),
        ("testdev0", 0, "RUNNING")
    );
    assert!(steps > before, "{steps} after {before}");
    assert_carries_on_then_quit(&mut dst, &[]);
}

#[test]
fn postcopy_loads_every_device_before_the_guest_runs_there() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 2, &[]);
    let src = source_with_devices(
        dir.path(),
        2,
        "ws=8M tdev=2",
        &["testdev,mem=2M,load-ms=30", "testdev,mem=1M,precopy=0"],
    );
    let before = testdevs(&src);
    let out = migrate_json(&src, &uri, &["--postcopy", "--channels", "2"]);
    let stats = completed_stats(&out, &src, &dst);
    assert!(
        stats["postcopy"]["pages_missing"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(stats["devices"], 5, "{stats}");
    assert!(
        stats["downtime"]["dest_load_ms"].as_f64().unwrap() >= 30.0,
        "{stats}"
    );
    dst.wait_progress(3);
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    let after = testdevs(&dst);
    assert_eq!(after.len(), 2);
    for (i, (name, steps, fails, state)) in after.iter().enumerate() {
        assert_eq!((*fails, state.as_str()), (0, "RUNNING"), "{name}");
        assert!(*steps > before[i].1, "{name} carried on");
    }
    assert_carries_on_then_quit(&mut dst, &["\"postcopy\":{"]);
}

#[test]
fn devices_a_cancelled_attempt_created_give_way_to_the_next_source() {
    let _g = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let uri = tcp_uri();
    let mut dst = destination(dir.path(), "destination", &uri, MEM, 1, &[]);
    // The first source's devices are created on the destination, then it cancels.
    let mut first = named_source_with_devices(
        "first",
        dir.path(),
        1,
        "ws=4M tdev=2",
        &["testdev,mem=4M", "testdev,mem=1M"],
    );
    let api = first.api.clone();
    let u = uri.clone();
    let mig = std::thread::spawn(move || remote(&api, &["migrate", &u, "--max-bandwidth", "8M"]));
    first.wait_for("bytes to flow", Duration::from_secs(30), |p| {
        p.info()["migration"]["bytes"].as_u64().unwrap_or(0) > 2 << 20
    });
    assert!(remote(&first.api, &["migrate-cancel"]).status.success());
    assert!(!mig.join().unwrap().status.success());
    assert_source_unharmed(&mut first);
    assert_destination_listening(&mut dst, &["cancelled"]);
    assert_eq!(testdevs(&dst).len(), 2, "created by the first attempt");
    // Another source, with one device of another size: it is taken as it is.
    let second =
        named_source_with_devices("second", dir.path(), 1, "ws=4M tdev=1", &["testdev,mem=8M"]);
    let out = migrate_json(&second, &uri, &[]);
    let stats = completed_stats(&out, &second, &dst);
    assert_eq!(stats["devices"], 3, "{stats}");
    dst.wait_progress(2);
    assert!(dst.fails().is_empty(), "{:?}", dst.fails());
    let devs = testdevs(&dst);
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!((devs[0].2, devs[0].3.as_str()), (0, "RUNNING"));
    assert_eq!(dst.info()["devices"][0]["config"], "mem=8388608,load-ms=0");
    assert_carries_on_then_quit(&mut dst, &[]);
}
