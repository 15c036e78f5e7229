//! The receiver against a hostile source: random sequences of well-formed messages (runs
//! outside guest RAM, wrong channel indices and sessions, messages out of phase, a Go
//! nobody earned) on the main and data channels. Whatever arrives, the receiver must not
//! panic, must not run the guest without a Go after loading, and must go back to listening
//! (or hold a loaded guest paused, unconfirmed) once the peer is gone.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_migrate::Status;
use ferry_proto::{
    caps, ChannelRole, Hello, MemRegion, Message, PageRun, Setup, Timeouts, VmDescription, VERSION,
};
use ferry_transport::Uri;
use proptest::prelude::*;

/// One thing the hostile source does.
#[derive(Debug, Clone)]
enum Step {
    /// A message on the main channel.
    Main(Message),
    /// A message on data connection `conn` (if open), with its page payload.
    Data(usize, Message),
    /// Opens a data connection greeting as `index`, of this session or another.
    Open { index: u16, same_session: bool },
    /// Waits a little, letting the receiver act.
    Nap(u8),
}

/// A small guest: what matters here is the receiver's logic, not the bytes.
const H_MIB: u64 = 4;
const RAM: u64 = H_MIB << 20;

fn page() -> impl Strategy<Value = u64> {
    // Mostly inside RAM, sometimes just past it or far away.
    prop_oneof![
        8 => (0..RAM / 4096).prop_map(|p| p * 4096),
        1 => (RAM / 4096..RAM / 4096 + 8).prop_map(|p| p * 4096),
        1 => Just(0xffff_ffff_ffff_e000u64),
    ]
}

fn runs() -> impl Strategy<Value = Vec<PageRun>> {
    prop::collection::vec(
        (page(), 1u32..4).prop_map(|(gpa, pages)| PageRun { gpa, pages }),
        1..4,
    )
}

fn setup() -> impl Strategy<Value = Message> {
    (prop::bool::weighted(0.8), 1u32..400, 1u32..400).prop_map(
        |(fits, progress_ms, switchover_ms)| {
            let size = if fits { RAM } else { RAM * 2 };
            Message::Setup(Setup {
                vm: VmDescription {
                    vcpus: 1,
                    page_size: 4096,
                    regions: vec![MemRegion { gpa: 0, size }],
                    cpu_features: vec![],
                },
                timeouts: Timeouts {
                    progress_ms,
                    switchover_ms,
                },
                devices: fake_devices(),
                parallel_devices: true,
            })
        },
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        3 => setup(),
        2 => (0u16..2, 0u32..3, 0u8..4, prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(device, seq, flags, data)| Message::DeviceData { device, seq, flags, data }),
        2 => (0u32..3).prop_map(|final_pass| Message::Complete { final_pass }),
        2 => Just(Message::Go),
        1 => Just(Message::Error { reason: "hostile".into() }),
        1 => (any::<u32>(), any::<u64>()).prop_map(|(passes, bytes)| Message::Ack { passes, bytes }),
        1 => Just(Message::Loaded { load_us: 1 }),
        1 => Just(Message::Running { resume_us: 1 }),
        1 => Just(Message::SetupAccepted),
        1 => Just(Message::Welcome { version: VERSION, capabilities: 0 }),
        2 => (0u32..3, runs()).prop_map(|(pass, runs)| Message::Pages { pass, runs, sums: vec![] }),
        1 => (0u32..3, runs(), 1u32..4096).prop_map(|(pass, runs, len)| Message::Compressed {
            pass,
            runs,
            codec: ferry_proto::Codec::Zstd,
            sums: vec![],
            len,
        }),
        1 => (0u32..3, runs()).prop_map(|(pass, runs)| Message::ZeroPages { pass, runs }),
        2 => (0u32..3).prop_map(|pass| Message::PassEnd { pass, pages: 0 }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => message().prop_map(Step::Main),
        4 => (0usize..3, message()).prop_map(|(c, m)| Step::Data(c, m)),
        2 => (0u16..4, prop::bool::weighted(0.8)).prop_map(|(index, same_session)| Step::Open { index, same_session }),
        1 => (0u8..20).prop_map(Step::Nap),
    ]
}

fn hello(session: u64, role: ChannelRole, data_channels: u16) -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        version: VERSION,
        // Unsummed frames (checksums are the sender's and receiver's to test elsewhere), and
        // no postcopy (whose urgent channel the script does not open).
        capabilities: caps::ALL & !caps::PAGE_SUMS & !caps::POSTCOPY,
        session,
        role,
        data_channels,
    })
    .encode(&mut b);
    b
}

/// Encodes `m` with its page payload (a page of the run's first byte pattern).
fn frame(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    let payload = usize::try_from(m.payload_len()).unwrap_or(0).min(16 << 20);
    b.resize(b.len() + payload, 0x5a);
    b
}

fn connect(uri: &Uri) -> Option<UnixStream> {
    let Uri::Unix(p) = uri else { return None };
    let s = UnixStream::connect(p).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(300))).ok()?;
    Some(s)
}

/// What the hostile source does around its random steps.
#[derive(Debug, Clone, Copy)]
struct Frame {
    /// Start like a real source: every data channel, then a Setup that fits.
    prefix: bool,
    /// End like a real source (device state, PassEnd everywhere, Complete), then maybe `Go` once
    /// the destination said Loaded.
    finish: Option<bool>,
}

const SESSION: u64 = 42;

/// The destination's answers, read on a thread: whether it said Loaded.
fn watch_loaded(main: &UnixStream) -> (Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>) {
    let loaded = Arc::new(AtomicBool::new(false));
    let reader = main.try_clone().ok().map(|mut r| {
        let l = loaded.clone();
        std::thread::spawn(move || {
            let mut scratch = Vec::new();
            while let Ok(m) = ferry_proto::read_message(&mut r, &mut scratch) {
                if matches!(m, Message::Loaded { .. }) {
                    l.store(true, Ordering::SeqCst);
                }
            }
        })
    });
    (loaded, reader)
}

fn open_data(uri: &Uri, index: u16, session: u64, channels: u16) -> Option<UnixStream> {
    let mut d = connect(uri)?;
    let _ = d.write_all(&hello(session, ChannelRole::Data { index }, channels));
    Some(d)
}

/// Plays the script against the destination; returns whether a Go was sent after the
/// destination had said Loaded.
fn play(uri: &Uri, channels: u16, frame_: Frame, steps: &[Step]) -> bool {
    let Some(mut main) = connect(uri) else {
        return false;
    };
    let _ = main.write_all(&hello(SESSION, ChannelRole::Main, channels));
    let (loaded, reader) = watch_loaded(&main);
    let mut data: Vec<UnixStream> = Vec::new();
    if frame_.prefix {
        data.extend((0..channels).filter_map(|i| open_data(uri, i, SESSION, channels)));
        let _ = main.write_all(&frame(&valid_setup()));
    }
    let mut earned_go = false;
    for s in steps {
        match s {
            Step::Main(m) => {
                earned_go |= matches!(m, Message::Go) && loaded.load(Ordering::SeqCst);
                let _ = main.write_all(&frame(m));
            }
            Step::Data(c, m) => {
                if let Some(d) = data.get_mut(*c) {
                    let _ = d.write_all(&frame(m));
                }
            }
            Step::Open {
                index,
                same_session,
            } => {
                let session = if *same_session { SESSION } else { 7 };
                data.extend(open_data(uri, *index, session, channels));
            }
            Step::Nap(ms) => std::thread::sleep(Duration::from_millis(u64::from(*ms))),
        }
    }
    if let Some(go) = frame_.finish {
        earned_go |= finish(&mut main, &mut data, &loaded, go);
    }
    std::thread::sleep(Duration::from_millis(20));
    let _ = main.shutdown(std::net::Shutdown::Both);
    for d in &data {
        let _ = d.shutdown(std::net::Shutdown::Both);
    }
    if let Some(r) = reader {
        let _ = r.join();
    }
    earned_go
}

fn valid_setup() -> Message {
    Message::Setup(Setup {
        vm: VmDescription {
            vcpus: 1,
            page_size: 4096,
            regions: vec![MemRegion { gpa: 0, size: RAM }],
            cpu_features: vec![],
        },
        timeouts: Timeouts {
            progress_ms: 1000,
            switchover_ms: 300,
        },
        devices: fake_devices(),
        parallel_devices: true,
    })
}

/// The fake VM's one device, loading at once.
fn fake_devices() -> Vec<ferry_proto::DeviceInfo> {
    vec![ferry_proto::DeviceInfo {
        name: "fake-machine".into(),
        config: 0u64.to_le_bytes().to_vec(),
    }]
}

/// A fake device's frame: length, bytes, CRC.
fn device_frame(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out
}

/// The end of a real migration; sends Go (if `go`) once Loaded came. Returns whether it did.
fn finish(main: &mut UnixStream, data: &mut [UnixStream], loaded: &AtomicBool, go: bool) -> bool {
    // The whole stream of the one device: its (empty) initial bytes, then its state.
    let mut stream = device_frame(&[]);
    stream.extend_from_slice(&device_frame(&[1, 2, 3]));
    let state = Message::DeviceData {
        device: 0,
        seq: 0,
        flags: ferry_proto::DEVICE_INITIAL_END | ferry_proto::DEVICE_END,
        data: stream,
    };
    // Device streams travel on the data channels (on the main one only in a local
    // hand-over).
    match data.first_mut() {
        Some(d) => {
            let _ = d.write_all(&frame(&state));
        }
        None => {
            let _ = main.write_all(&frame(&state));
        }
    }
    for d in data.iter_mut() {
        let _ = d.write_all(&frame(&Message::PassEnd { pass: 0, pages: 0 }));
    }
    let _ = main.write_all(&frame(&Message::Complete { final_pass: 0 }));
    let deadline = Instant::now() + Duration::from_millis(300);
    while !loaded.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if go && loaded.load(Ordering::SeqCst) {
        let _ = main.write_all(&frame(&Message::Go));
        return true;
    }
    false
}

fn script() -> impl Strategy<Value = Frame> {
    (
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(false)), Just(Some(true))],
    )
        .prop_map(|(prefix, finish)| Frame { prefix, finish })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_hostile_source_never_breaks_the_destination(
        channels in prop_oneof![4 => 1u16..3, 1 => Just(0u16), 1 => Just(200u16)],
        shape in script(),
        steps in prop::collection::vec(step(), 0..24),
    ) {
        let dst = Dest::start(H_MIB);
        let earned_go = play(&dst.uri, channels, shape, &steps);
        // The receiver settles: listening again, running after an earned Go, or holding a
        // loaded guest paused.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = dst.progress.status();
            let settled = match st {
                Status::Listening => true,
                Status::Completed => dst.ended(),
                Status::Unconfirmed => dst.target.loads() > 0,
                _ => false,
            };
            if settled {
                break;
            }
            prop_assert!(Instant::now() < deadline, "stuck in {st:?} / {}", dst.progress.phase());
            std::thread::sleep(Duration::from_millis(5));
        }
        prop_assert!(!dst.target.running() || earned_go, "the guest ran without an earned Go");
        if dst.target.running() {
            prop_assert!(dst.target.loads() > 0);
        }
        // And it still serves: a real migration after the hostile one succeeds.
        if dst.progress.status() == Status::Listening {
            let src = ferry_testkit::fake::FakeSource::start(H_MIB, 4, Duration::from_millis(1));
            completed(Migration::start(&src, &dst.uri, params()).finish());
            assert_handed_over(&src, &dst.target);
        }
    }
}

/// The script's valid frame alone is a real (empty) migration: the destination loads and,
/// on the earned Go, runs the guest. So the random steps above perturb a sequence that
/// does reach `Loaded` and `Go`.
#[test]
fn the_valid_frame_alone_hands_the_guest_over() {
    let dst = Dest::start(H_MIB);
    let shape = Frame {
        prefix: true,
        finish: Some(true),
    };
    assert!(play(&dst.uri, 2, shape, &[]), "Go was earned");
    assert!(matches!(
        dst.finish().unwrap(),
        ferry_migrate::recv::RecvOutcome::Running(_)
    ));
}

/// Without the Go, the loaded guest is held paused and never run.
#[test]
fn the_valid_frame_without_go_holds_the_guest_paused() {
    let dst = Dest::start(H_MIB);
    let shape = Frame {
        prefix: true,
        finish: Some(false),
    };
    assert!(!play(&dst.uri, 2, shape, &[]));
    dst.wait_status(Status::Unconfirmed, Duration::from_secs(5));
    assert_eq!(dst.target.loads(), 1);
    assert!(!dst.target.running());
}
