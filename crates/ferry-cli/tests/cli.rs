//! The workload guest through the real `ferry` binary (and under QEMU, to judge the guest
//! itself): booting on one and two vCPUs, snapshot and restore across processes, and the
//! control API.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferry_guest::ImageKind;
use serde_json::{json, Value};

/// A small guest: 4 MiB hot working set, a heartbeat every millisecond.
const APPEND: &str = "ws=4M hb=1";

/// Fewest heartbeat dots between two status lines (about a second apart; ~1000 when the
/// guest has a CPU to itself) that still count as "the heartbeat keeps coming".
const MIN_DOTS_PER_SECOND: usize = 20;

/// Checks the workload is up on `cpus` CPUs and keeps running: status lines advance, the
/// heartbeat keeps coming, no verification failure.
fn assert_workload_healthy(g: &mut Guest, cpus: u64) {
    g.wait_ready();
    let ready = g.serial().ready();
    assert_eq!(
        ready,
        Some(cpus),
        "Ready line with the wrong CPU count\n{}",
        g.describe()
    );
    g.wait_for("3 status lines after Ready", GUEST_TIMEOUT, |s| {
        s.sweeps_after_ready().len() >= 3
    });
    let s = g.serial();
    assert_eq!(
        s.boots(),
        1,
        "the guest booted more than once\n{}",
        g.describe()
    );
    let sweeps = s.sweeps_after_ready();
    assert!(
        sweeps.windows(2).all(|w| w[0] <= w[1]) && sweeps.last() > sweeps.first(),
        "sweeps do not advance: {sweeps:?}\n{}",
        g.describe()
    );
    let dots = s.dots_per_status_interval();
    assert!(
        dots.len() >= 2 && dots.iter().all(|&d| d >= MIN_DOTS_PER_SECOND),
        "the heartbeat stalled: dots between status lines {dots:?}\n{}",
        g.describe()
    );
    g.assert_no_fails();
}

fn run_under_ferry(vcpus: u32, append: &str) {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let mut g = Guest::ferry(
        &format!("ferry-{vcpus}cpu"),
        dir.path(),
        &kernel_args(&image, append, "64M", vcpus),
        false,
    );
    assert_workload_healthy(&mut g, u64::from(vcpus));
    assert!(
        g.running(),
        "ferry exited under a healthy guest\n{}",
        g.describe()
    );
}

#[test]
fn workload_runs_on_one_vcpu() {
    run_under_ferry(1, APPEND);
}

#[test]
fn workload_runs_on_two_vcpus() {
    run_under_ferry(2, &format!("{APPEND} cpus=2"));
}

/// Fails the test, saying how to install it, when QEMU cannot be run (scripts/test.sh
/// installs it; the workload guest must be checked under QEMU too).
fn require_qemu() {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "qemu-system-x86_64 --version failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "qemu-system-x86_64 is needed to check the workload guest under QEMU but cannot \
             be run ({e}); install it with `apt-get install qemu-system-x86` (scripts/test.sh \
             does)"
        ),
    }
}

fn run_under_qemu(kind: ImageKind) {
    require_qemu();
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(kind, dir.path()).unwrap();
    let serial = dir.path().join("qemu.serial");
    let qemu_args = args(&[
        "-accel",
        "kvm",
        "-m",
        "128",
        "-smp",
        "1",
        "-kernel",
        &image.display().to_string(),
        "-append",
        APPEND,
        "-serial",
        &format!("file:{}", serial.display()),
        "-display",
        "none",
        "-monitor",
        "none",
        "-nodefaults",
        "-no-reboot",
    ]);
    let mut g = Guest::spawn(
        &format!("qemu-{kind:?}"),
        "qemu-system-x86_64",
        &qemu_args,
        dir.path(),
        serial,
        None,
    );
    g.wait_ready();
    assert_eq!(g.serial().ready(), Some(1), "{}", g.describe());
    g.wait_for("2 status lines after Ready", GUEST_TIMEOUT, |s| {
        s.sweeps_after_ready().len() >= 2
    });
    let s = g.serial();
    let sweeps = s.sweeps_after_ready();
    assert!(
        sweeps.last() > sweeps.first(),
        "sweeps do not advance under QEMU: {sweeps:?}\n{}",
        g.describe()
    );
    assert_eq!(s.boots(), 1, "{}", g.describe());
    assert!(s.dots() > 0, "no heartbeat under QEMU\n{}", g.describe());
    g.assert_no_fails();
}

#[test]
fn elf_workload_runs_under_qemu() {
    run_under_qemu(ImageKind::Elf);
}

#[test]
fn flat_workload_runs_under_qemu() {
    run_under_qemu(ImageKind::Flat);
}

#[test]
fn snapshot_restores_in_a_new_process() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    // Not the defaults (512M, 1 vCPU), so the restored size and vCPU count must come from
    // the file.
    let mem: u64 = 96 << 20;
    let mut src = Guest::ferry(
        "source",
        dir.path(),
        &kernel_args(&image, &format!("{APPEND} cpus=2"), "96M", 2),
        true,
    );
    src.wait_ready();
    src.wait_status_lines(2);
    src.wait_api();
    let seen = *src.serial().sweeps().last().unwrap();

    // A relative path: `ferry remote` makes it absolute against its own directory.
    let mut cmd = Command::new(FERRY);
    cmd.current_dir(dir.path())
        .arg("remote")
        .arg("--api-socket")
        .arg(src.api())
        .args(["snapshot", "vm.snap"]);
    let out = run_cmd(cmd);
    assert!(
        out.status.success(),
        "snapshot failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        src.describe()
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "snapshot printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let snap = dir.path().join("vm.snap");
    let reported = result["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no path in the snapshot result: {result}"));
    assert!(
        Path::new(reported).is_absolute(),
        "snapshot path not absolute: {result}"
    );
    assert_eq!(
        std::fs::canonicalize(reported).unwrap(),
        std::fs::canonicalize(&snap).unwrap(),
        "snapshot result names another file: {result}"
    );
    assert!(result["ms"].is_number(), "no duration: {result}");
    let len = std::fs::metadata(&snap).unwrap().len();
    assert!(
        len >= mem,
        "snapshot file of {len} bytes for {mem} bytes of RAM"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    // The source keeps running after the snapshot.
    src.wait_status_lines(1);
    assert_eq!(src.info()["state"], "running");
    src.assert_no_fails();

    src.child.kill().unwrap();
    let st = src.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.signal(), Some(9), "source was not SIGKILLed: {st}");

    let mut dst = Guest::ferry(
        "restored",
        dir.path(),
        &args(&["--restore", &snap.display().to_string()]),
        true,
    );
    dst.wait_api();
    dst.wait_status_lines(2);
    let s = dst.serial();
    assert_eq!(
        s.boots(),
        0,
        "the restored guest rebooted\n{}",
        dst.describe()
    );
    assert_eq!(
        s.ready(),
        None,
        "the restored guest started over\n{}",
        dst.describe()
    );
    let sweeps = s.sweeps();
    const MARGIN: u64 = 2;
    assert!(
        sweeps[0] + MARGIN >= seen,
        "restored guest's sweeps {sweeps:?} start below {seen} seen before the snapshot\n{}",
        dst.describe()
    );
    assert!(
        sweeps.windows(2).all(|w| w[0] <= w[1]) && sweeps.last() > sweeps.first(),
        "restored guest's sweeps do not advance: {sweeps:?}\n{}",
        dst.describe()
    );
    let info = dst.info();
    assert_eq!(info["memory_bytes"], json!(mem), "{info}");
    assert_eq!(info["vcpus"], json!(2), "{info}");
    assert_eq!(info["state"], "running", "{info}");
    dst.assert_no_fails();
    dst.remote_ok(&["quit"]);
    let st = dst.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "restored VM exited with {st}");
}

/// Serial output size, sampled a few times over `d`: the sizes seen.
fn serial_sizes(p: &Path, d: Duration) -> Vec<u64> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    loop {
        out.push(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
        if Instant::now() >= end {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn api_info_pause_resume_quit_and_unknown_commands() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let mut run_args = kernel_args(&image, APPEND, "64M", 1);
    run_args.extend(args(&["--memory-backend", "memfd"]));
    let mut g = Guest::ferry("api", dir.path(), &run_args, true);
    g.wait_ready();
    g.wait_api();

    let info = g.info();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], json!(1), "{info}");
    assert_eq!(info["memory_bytes"], json!(64u64 << 20), "{info}");
    assert_eq!(info["memory_backend"], "memfd", "{info}");

    // Unknown command: an error naming the known ones; the connection stays usable.
    let reply = raw_request(g.api(), r#"{"command":"bogus"}"#);
    assert_eq!(reply["ok"], json!(false), "{reply}");
    let err = reply["error"].as_str().unwrap_or_else(|| panic!("{reply}"));
    assert!(err.contains("bogus"), "{err}");
    for c in [
        "info",
        "pause",
        "resume",
        "snapshot",
        "quit",
        "migrate",
        "migrate-cancel",
    ] {
        assert!(err.contains(c), "error does not name {c}: {err}");
    }
    {
        let mut s = UnixStream::connect(g.api()).unwrap();
        s.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
        s.write_all(b"this is not json\n{\"command\":\"info\"}\n")
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], json!(false), "{v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("info")),
            "{v}"
        );
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], json!(true), "after a bad request: {v}");
        assert_eq!(v["result"]["state"], "running", "{v}");
    }

    // Pause: the guest stops printing.
    g.remote_ok(&["pause"]);
    assert_eq!(g.info()["state"], "paused");
    let sizes = serial_sizes(&g.serial, Duration::from_millis(300));
    assert!(
        sizes.windows(2).all(|w| w[0] == w[1]),
        "serial output grew while paused: {sizes:?}"
    );
    // Resume: it prints again.
    g.remote_ok(&["resume"]);
    assert_eq!(g.info()["state"], "running");
    let paused_len = *sizes.last().unwrap() as usize;
    g.wait_for("output after resume", GUEST_TIMEOUT, |s| {
        s.raw.len() > paused_len + 10
    });
    g.wait_status_lines(1);
    g.assert_no_fails();

    g.remote_ok(&["quit"]);
    let st = g.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.code(), Some(0), "quit: {st}\n{}", g.describe());
    assert!(
        !g.api().exists(),
        "the API socket was left behind after quit"
    );
}

/// One client's requests until the socket is gone: each must get a reply. Returns how many
/// replies were refusals because the process is exiting.
fn request_until_gone(sock: &Path) -> usize {
    let mut refused = 0;
    loop {
        let Ok(mut s) = UnixStream::connect(sock) else {
            return refused;
        };
        s.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
        if s.write_all(b"{\"command\":\"resume\"}\n").is_err() {
            return refused;
        }
        let mut reply = String::new();
        let n = BufReader::new(s).read_line(&mut reply);
        assert!(
            matches!(n, Ok(k) if k > 0),
            "a request got no reply before the process exited: {n:?}"
        );
        let v: Value = serde_json::from_str(&reply).unwrap();
        if v["ok"] != json!(true) {
            let err = v["error"].as_str().unwrap_or_default();
            // Four clients in a loop can outrun the server's connection limit: that
            // refusal is a reply too.
            let busy = err.contains("too many API connections");
            assert!(
                busy || err.contains("refused: this process is exiting"),
                "{v}"
            );
            refused += usize::from(!busy);
        }
    }
}

#[test]
fn quit_answers_every_client_before_the_process_exits() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let mut g = Guest::ferry(
        "api",
        dir.path(),
        &kernel_args(&image, APPEND, "64M", 1),
        true,
    );
    g.wait_ready();
    g.wait_api();
    let sock = g.api().to_path_buf();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let s = sock.clone();
            std::thread::spawn(move || request_until_gone(&s))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    g.remote_ok(&["quit"]);
    let refused: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let st = g.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.code(), Some(0), "quit: {st}\n{}", g.describe());
    assert!(!sock.exists(), "the API socket was left behind after quit");
    // Not asserted (timing): usually some requests raced the quit and were refused.
    eprintln!("requests refused while exiting: {refused}");
}

#[test]
fn remote_with_a_bad_socket_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let out = remote(&missing, &["info"]);
    assert_clean_failure(
        "remote to a missing socket",
        &out,
        &[
            "ferry: error: cannot connect to the API socket",
            &missing.display().to_string(),
            "No such file",
        ],
    );
    assert!(out.stdout.is_empty());
    let not_socket = dir.path().join("plain-file");
    std::fs::write(&not_socket, "x").unwrap();
    let out = remote(&not_socket, &["pause"]);
    assert_clean_failure(
        "remote to a file that is not a socket",
        &out,
        &[
            "cannot connect to the API socket",
            &not_socket.display().to_string(),
        ],
    );
}

/// `--api-socket` never clobbers a regular file, and never steals a live VM's socket.
#[test]
fn api_socket_is_not_taken_from_others() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let kernel = kernel_args(&image, "ws=1M hb=10", "32M", 1);

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let mut a = vec!["run".to_string()];
    a.extend(kernel.iter().cloned());
    a.extend(args(&[
        "--serial",
        "null",
        "--api-socket",
        file.to_str().unwrap(),
    ]));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = ferry(&refs);
    assert_clean_failure(
        "regular file as API socket",
        &out,
        &["exists and is not a socket"],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    let mut first = Guest::ferry("first", dir.path(), &kernel, true);
    first.wait_api();
    let sock = first.api().to_path_buf();
    let mut b = vec!["run".to_string()];
    b.extend(kernel.iter().cloned());
    b.extend(args(&[
        "--serial",
        "null",
        "--api-socket",
        sock.to_str().unwrap(),
    ]));
    let refs: Vec<&str> = b.iter().map(String::as_str).collect();
    let out = ferry(&refs);
    assert_clean_failure(
        "second VM on a live socket",
        &out,
        &["another running VMM serves this socket"],
    );
    // The first VM is still reachable on its socket.
    assert_eq!(first.info()["state"], "running");
}

/// The control API's limits: a private socket whatever the umask, bounded requests, a
/// bounded number of connections.
/// A child killed when the test ends, even by a panic (a VM left running would skew every
/// test after it).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn api_socket_is_private_and_bounded() {
    use std::os::unix::fs::PermissionsExt;
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    let sock = dir.path().join("api.sock");
    // umask 000 would make a plainly bound socket world-writable.
    let mut child = Killed(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 000 && exec {FERRY} run --kernel '{}' --append 'ws=1M hb=10' --memory 32M \
                 --serial null --api-socket '{}'",
                image.display(),
                sock.display()
            ))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-api"))
        .collect();
    assert!(leftovers.is_empty(), "private bind directory left behind");

    // A request over 64 KiB is refused and its connection closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    let big = format!(
        "{{\"command\":\"info\",\"x\":\"{}\"}}\n",
        "a".repeat(70_000)
    );
    let _ = s.write_all(big.as_bytes());
    let mut line = String::new();
    let mut r = BufReader::new(&s);
    r.read_line(&mut line).unwrap();
    assert!(line.contains("longer than 65536 bytes"), "{line}");
    // The server closes it; let its slot be freed before counting connections below.
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    std::thread::sleep(Duration::from_millis(200));

    // At most 16 connections at once; the 17th is told why.
    let held: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&mut extra).read_line(&mut line).unwrap();
    assert!(line.contains("too many API connections"), "{line}");
    drop(held);
    // Freed slots serve again.
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let out = remote(&sock, &["info"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = remote(&sock, &["quit"]);
    let _ = wait_timeout(&mut child.0, CMD_TIMEOUT);
}
