//! The engine harness: a fake source and a fake destination (no KVM) talking over real
//! unix sockets, optionally through the fault-injecting proxy.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migrate::control::{self, Command, Commander};
use ferry_migrate::recv::{receive, PrepareMode, ReceiveParams, RecvOutcome};
use ferry_migrate::send::{migrate, SendOutcome, SendParams};
use ferry_migrate::{MigrateError, Progress, Status};
use ferry_testkit::fake::{source_state, FakeSource, FakeTarget};
use ferry_testkit::proxy::{Fault, Proxy};
use ferry_transport::{Listener, Uri};

/// Guest RAM of the fakes, MiB.
pub const MIB: u64 = 16;

/// Deadlines short enough for tests.
pub fn params() -> SendParams {
    SendParams {
        channels: 2,
        downtime_limit: Duration::from_millis(50),
        handshake_timeout: Duration::from_millis(1500),
        progress_timeout: Duration::from_millis(1500),
        switchover_timeout: Duration::from_millis(800),
        ..SendParams::default()
    }
}

/// The destination's parameters in tests: no preparation, short deadlines.
pub fn recv_params() -> ReceiveParams {
    ReceiveParams {
        prepare: PrepareMode::None,
        handshake_timeout: Duration::from_millis(1000),
        ..ReceiveParams::default()
    }
}

/// A destination receiving on a fresh unix socket, on its own thread.
pub struct Dest {
    pub target: Arc<FakeTarget>,
    pub uri: Uri,
    pub progress: Arc<Progress>,
    pub commander: Commander,
    join: Option<JoinHandle<Result<RecvOutcome, MigrateError>>>,
    _dir: tempfile::TempDir,
}

impl Dest {
    pub fn start(mib: u64) -> Dest {
        Dest::with_target(FakeTarget::new(mib))
    }

    pub fn with_target(target: Arc<FakeTarget>) -> Dest {
        Dest::with(target, recv_params())
    }

    pub fn with(target: Arc<FakeTarget>, params: ReceiveParams) -> Dest {
        let dir = tempfile::tempdir().unwrap();
        let uri = Uri::Unix(dir.path().join("incoming.sock"));
        let listener = Listener::bind(&uri).unwrap();
        let progress = Progress::new();
        let (commander, commands) = control::channel();
        let (t, p) = (target.clone(), progress.clone());
        let join = std::thread::spawn(move || receive(t, &listener, &params, p, None, commands));
        let d = Dest {
            target,
            uri,
            progress,
            commander,
            join: Some(join),
            _dir: dir,
        };
        d.wait_status(Status::Listening, Duration::from_secs(5));
        d
    }

    pub fn wait_status(&self, want: Status, timeout: Duration) {
        wait_status(&self.progress, want, timeout, "destination");
    }

    pub fn command(&self, c: Command) -> Result<String, String> {
        self.commander
            .send(c, Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }

    /// Waits for `receive` to return.
    pub fn finish(mut self) -> Result<RecvOutcome, MigrateError> {
        let j = self.join.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !j.is_finished() {
            assert!(Instant::now() < deadline, "receive did not return");
            std::thread::sleep(Duration::from_millis(10));
        }
        j.join().unwrap()
    }

    pub fn ended(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            if !j.is_finished() {
                let _ = self
                    .commander
                    .send(Command::Quit { force: true }, Duration::from_secs(5));
            }
            let _ = j.join();
        }
    }
}

pub fn wait_status(p: &Progress, want: Status, timeout: Duration, who: &str) {
    let deadline = Instant::now() + timeout;
    while p.status() != want {
        assert!(
            Instant::now() < deadline,
            "{who}: status {:?} (phase {}, error {:?}), waited for {want:?}",
            p.status(),
            p.phase(),
            p.error()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A migration running on its own thread.
pub struct Migration {
    pub vm: Arc<FakeSource>,
    pub progress: Arc<Progress>,
    pub commander: Commander,
    join: Option<JoinHandle<SendOutcome>>,
}

impl Migration {
    pub fn start(vm: &Arc<FakeSource>, uri: &Uri, params: SendParams) -> Migration {
        let progress = Progress::new();
        let (commander, commands) = control::channel();
        let (v, u, p) = (vm.clone(), uri.clone(), progress.clone());
        let join = std::thread::spawn(move || migrate(v, &u, &params, p, commands));
        Migration {
            vm: vm.clone(),
            progress,
            commander,
            join: Some(join),
        }
    }

    pub fn command(&self, c: Command) -> Result<String, String> {
        self.commander
            .send(c, Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }

    pub fn wait_status(&self, want: Status, timeout: Duration) {
        wait_status(&self.progress, want, timeout, "source");
    }

    pub fn wait_phase(&self, phase: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.progress.phase() != phase {
            assert!(
                Instant::now() < deadline,
                "source phase {} (status {:?}), waited for {phase}",
                self.progress.phase(),
                self.progress.status()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn finish(mut self) -> SendOutcome {
        let j = self.join.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !j.is_finished() {
            assert!(Instant::now() < deadline, "migrate did not return");
            std::thread::sleep(Duration::from_millis(10));
        }
        j.join().unwrap()
    }
}

/// A busy fake guest: `MIB` of RAM, 512 hot pages rewritten continuously.
pub fn busy_source() -> Arc<FakeSource> {
    FakeSource::start(MIB, 512, Duration::from_micros(200))
}

/// A proxy in front of `dst` applying `faults`.
pub fn proxy(dst: &Dest, faults: Vec<Fault>) -> Proxy {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "ferry-proxy-{}-{:?}-{n}.sock",
        std::process::id(),
        std::thread::current().id()
    ));
    Proxy::start(&Uri::Unix(dir), dst.uri.clone(), faults).unwrap()
}

/// The hand-over happened and nothing was lost: the destination runs the guest, the source
/// keeps it paused, and memory and state are identical.
pub fn assert_handed_over(src: &FakeSource, dst: &FakeTarget) {
    assert!(dst.running(), "destination runs the guest");
    assert!(!src.running(), "source keeps the guest paused");
    let (a, b) = (src.digests(), dst.digests());
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} pages differ");
    assert_eq!(dst.loaded(), Some(source_state(src)), "state identical");
}

/// The source kept the guest: it runs there and nowhere else.
pub fn assert_source_owns(src: &FakeSource, dst: &FakeTarget) {
    assert!(src.running(), "source runs the guest");
    assert!(!dst.running(), "destination never ran the guest");
}

pub fn failed(o: SendOutcome) -> MigrateError {
    match o {
        SendOutcome::Failed(e) => e,
        o => panic!("expected a failure, got {o:?}"),
    }
}

pub fn completed(o: SendOutcome) -> ferry_migrate::MigrationStats {
    match o {
        SendOutcome::Completed(s) => s,
        o => panic!("expected completion, got {o:?}"),
    }
}
