//! Postcopy without KVM: a fake source and destination over unix sockets. The destination's
//! "guest" is a thread reading every page while pages still arrive, so its reads fault and
//! are served on the urgent channel; afterwards every page must equal the paused source's.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use ferry_memory::ram::PAGE_SIZE;
use ferry_migrate::control::Command;
use ferry_migrate::recv::{PrepareMode, RecvOutcome};
use ferry_migrate::send::{PostcopyMode, SendParams};
use ferry_migrate::{MigrateError, MigrationSource, MigrationTarget, Status};
use ferry_testkit::fake::{FakeSource, FakeTarget};
use ferry_transport::Uri;
use vm_memory::{Bytes, GuestAddress};

fn postcopy(mode: PostcopyMode) -> SendParams {
    SendParams {
        postcopy: mode,
        ..params()
    }
}

/// Reads every page of the target's memory once it runs, in a scattered order, as a guest
/// would touch it, and compares what it read with the paused source's copy; returns how
/// many pages it read and how many of them differed.
fn toucher(
    src: &Arc<FakeSource>,
    dst: &Arc<FakeTarget>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u64, u64)> {
    let dst = dst.clone();
    let src_ram = src.ram();
    std::thread::spawn(move || {
        while !dst.running() {
            if stop.load(Ordering::Relaxed) {
                return (0, 0);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let ram = dst.ram();
        let pages = ram.size() / PAGE_SIZE;
        let (mut read, mut wrong) = (0, 0);
        // A stride coprime with the page count visits every page once. The source is paused
        // from before the destination runs, so its copy is the one every read must see.
        for i in 0..pages {
            let at = GuestAddress((i * 97) % pages * PAGE_SIZE);
            let got: [u64; 2] = ram.mem().read_obj(at).unwrap();
            let want: [u64; 2] = src_ram.mem().read_obj(at).unwrap();
            read += 1;
            wrong += u64::from(got != want);
        }
        (read, wrong)
    })
}

fn received(o: Result<RecvOutcome, MigrateError>) -> ferry_migrate::recv::ReceiveStats {
    match o {
        Ok(RecvOutcome::Running(s)) => s,
        o => panic!("expected the guest running on the destination, got {o:?}"),
    }
}

/// Migrates `src` to `dst` with `params` while a guest thread on the destination reads all
/// of its memory, and checks that nothing was lost; returns both sides' statistics.
fn migrate_touched(
    src: &Arc<FakeSource>,
    dst: Dest,
    params: SendParams,
) -> (
    ferry_migrate::MigrationStats,
    ferry_migrate::recv::ReceiveStats,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let guest = toucher(src, &dst.target, stop.clone());
    let m = Migration::start(src, &dst.uri, params);
    let stats = completed(m.finish());
    let target = dst.target.clone();
    let rstats = received(dst.finish());
    stop.store(true, Ordering::Relaxed);
    let (read, wrong) = guest.join().unwrap();
    assert_eq!(read, MIB * 256, "the guest read every page");
    assert_eq!(wrong, 0, "pages the guest read differed from the source's");
    assert_handed_over(src, &target);
    (stats, rstats)
}

/// A postcopy without precopy into a destination preparing as `prepare`: every page missing
/// at the switch came, pushed or asked for.
fn moves_everything(prepare: PrepareMode) {
    let dst = Dest::with(
        FakeTarget::new(MIB),
        ferry_migrate::recv::ReceiveParams {
            prepare,
            ..recv_params()
        },
    );
    let (stats, rstats) = migrate_touched(&busy_source(), dst, postcopy(PostcopyMode::Now));
    let p = stats.postcopy.expect("postcopy statistics");
    let r = rstats.postcopy.expect("destination postcopy statistics");
    assert_eq!(p.trigger, "now");
    assert!(p.pages_missing > 0);
    assert_eq!(r.faults, p.faults);
    assert!(r.queues >= 1);
    assert!(
        r.pushed_pages + r.requested_pages >= p.pages_missing,
        "every missing page came: {r:?} {p:?}"
    );
}

#[test]
fn postcopy_without_precopy_moves_every_page() {
    moves_everything(PrepareMode::None);
}

#[test]
fn postcopy_discards_prepared_destination_memory() {
    // Populated memory never faults: postcopy must make it missing first.
    moves_everything(PrepareMode::Populate);
}

#[test]
fn postcopy_on_shared_destination_memory() {
    let dst = Dest::with(FakeTarget::new_shared(MIB), recv_params());
    migrate_touched(&busy_source(), dst, postcopy(PostcopyMode::Now));
}

/// A prepared memfd destination keeps its file's pages through postcopy: the guest mapping
/// only loses its page tables, and pages are written into the file and mapped (MINOR
/// faults). The guest still reads every page as the source had it, never the zeros (or
/// stale bytes) the file held.
#[test]
fn postcopy_keeps_a_prepared_shared_destinations_file_pages() {
    let dst = Dest::with(
        FakeTarget::new_shared(MIB),
        ferry_migrate::recv::ReceiveParams {
            prepare: PrepareMode::Populate,
            ..recv_params()
        },
    );
    let (_, rstats) = migrate_touched(&busy_source(), dst, postcopy(PostcopyMode::Now));
    let r = rstats.postcopy.expect("destination postcopy statistics");
    if ferry_sys::uffd::Uffd::minor_faults_supported(false) {
        assert_eq!(r.placement, "file", "{r:?}");
    }
}

/// The urgent channel goes through mutual TLS like the others: with the background push
/// held to 4 MiB/s, the guest's reads fault and are answered over it.
#[test]
fn postcopy_over_mutual_tls_answers_faults_on_the_urgent_channel() {
    let certs = ferry_testkit::certs::Certs::make();
    let tls = |dir: std::path::PathBuf| Some(ferry_transport::TlsConfig::load(&dir, None).unwrap());
    let dst = Dest::with(
        FakeTarget::new(MIB),
        ferry_migrate::recv::ReceiveParams {
            tls: tls(certs.destination()),
            ..recv_params()
        },
    );
    let p = SendParams {
        tls: tls(certs.source()),
        max_bandwidth: Some(4 << 20),
        ..postcopy(PostcopyMode::Now)
    };
    // A plaintext channel would be refused by this destination: the migration completing
    // with pages asked for and answered is the proof.
    let (_, rstats) = migrate_touched(&busy_source(), dst, p);
    let r = rstats.postcopy.expect("destination postcopy statistics");
    assert!(r.requested_pages > 0, "faults answered over TLS: {r:?}");
}

/// hugetlb destination memory takes postcopy too: each huge page is mapped whole once its
/// missing pieces have come, and the guest reads every page as the source had it. With and
/// without a precopy first (then some pieces of a hidden huge page are right already).
#[test]
fn postcopy_into_hugetlb_memory() {
    let Some(_reserved) = ferry_testkit::hugepages::HugePages::reserve(MIB / 2) else {
        eprintln!("skipped: cannot reserve huge pages (needs root)");
        return;
    };
    if !ferry_sys::uffd::Uffd::minor_faults_supported(true)
        || !ferry_sys::mm::hugetlb_dont_need_supported()
    {
        eprintln!("skipped: no MINOR faults on hugetlbfs (or no MADV_DONTNEED there) here");
        return;
    }
    let dst = Dest::with(FakeTarget::new_hugetlb(MIB), recv_params());
    let (_, rstats) = migrate_touched(&busy_source(), dst, postcopy(PostcopyMode::Now));
    let r = rstats.postcopy.expect("destination postcopy statistics");
    assert_eq!(r.placement, "file-2m", "{r:?}");
    let (stats, rstats) =
        after_stuck_precopy_into(Dest::with(FakeTarget::new_hugetlb(MIB), recv_params()));
    assert!(stats.postcopy.is_some_and(|p| p.precopy_passes >= 1));
    assert_eq!(rstats.postcopy.map(|r| r.placement), Some("file-2m"));
}

/// A postcopy after a precopy that cannot converge: a working set rewritten without pause
/// against a 1 ms limit.
fn after_stuck_precopy() -> ferry_migrate::MigrationStats {
    after_stuck_precopy_into(Dest::start(MIB)).0
}

fn after_stuck_precopy_into(
    dst: Dest,
) -> (
    ferry_migrate::MigrationStats,
    ferry_migrate::recv::ReceiveStats,
) {
    let src = FakeSource::start(MIB, 2048, Duration::ZERO);
    let params = SendParams {
        downtime_limit: Duration::from_millis(1),
        ..postcopy(PostcopyMode::AfterPrecopy)
    };
    migrate_touched(&src, dst, params)
}

/// On memfd memory the pages precopy wrote and the guest dirtied since stay in the file,
/// stale, when postcopy starts: the guest must read the source's last copy of each.
#[test]
fn postcopy_after_precopy_into_shared_memory_never_shows_a_stale_page() {
    let prepared = ferry_migrate::recv::ReceiveParams {
        prepare: PrepareMode::Populate,
        ..recv_params()
    };
    let (stats, rstats) =
        after_stuck_precopy_into(Dest::with(FakeTarget::new_shared(MIB), prepared));
    let p = stats.postcopy.expect("postcopy statistics");
    assert!(p.precopy_passes >= 1 && p.pages_missing > 0, "{p:?}");
    let r = rstats.postcopy.expect("destination postcopy statistics");
    if ferry_sys::uffd::Uffd::minor_faults_supported(false) {
        assert_eq!(r.placement, "file", "{r:?}");
    }
}

#[test]
fn postcopy_after_a_precopy_that_does_not_converge() {
    let stats = after_stuck_precopy();
    let p = stats.postcopy.as_ref().expect("postcopy statistics");
    assert_eq!(p.trigger, "after-precopy");
    assert!(p.precopy_passes >= 1);
    assert_eq!(
        stats.max_throttle_percent, 0,
        "postcopy instead of throttling"
    );
}

#[test]
fn migrate_start_postcopy_switches_a_running_precopy() {
    let src = FakeSource::start(MIB, 2048, Duration::ZERO);
    let params = SendParams {
        downtime_limit: Duration::from_millis(1),
        auto_converge: false,
        ..postcopy(PostcopyMode::OnRequest)
    };
    let dst = Dest::start(MIB);
    let m = Migration::start(&src, &dst.uri, params);
    m.wait_status(Status::Active, Duration::from_secs(5));
    let answer = m.command(Command::StartPostcopy).unwrap();
    assert!(answer.contains("postcopy"), "{answer}");
    let stats = completed(m.finish());
    let target = dst.target.clone();
    received(dst.finish());
    assert_handed_over(&src, &target);
    assert_eq!(stats.postcopy.unwrap().trigger, "requested");
}

#[test]
fn migrate_start_postcopy_is_refused_without_postcopy() {
    let src = FakeSource::start(MIB, 2048, Duration::ZERO);
    let params = SendParams {
        downtime_limit: Duration::from_millis(1),
        auto_converge: false,
        ..params()
    };
    let dst = Dest::start(MIB);
    let m = Migration::start(&src, &dst.uri, params);
    m.wait_status(Status::Active, Duration::from_secs(5));
    let e = m.command(Command::StartPostcopy).unwrap_err();
    assert!(e.contains("without postcopy"), "{e}");
    // Recovery commands have nothing to act on, and each side names the other's.
    let elsewhere = Uri::Unix(std::env::temp_dir().join("ferry-never-bound.sock"));
    let e = m
        .command(Command::Reconnect {
            uri: elsewhere.clone(),
        })
        .unwrap_err();
    assert!(e.contains("no postcopy to resume"), "{e}");
    let e = m
        .command(Command::Recover {
            uri: elsewhere.clone(),
        })
        .unwrap_err();
    assert!(e.contains("destination's command"), "{e}");
    let e = dst
        .command(Command::Recover {
            uri: elsewhere.clone(),
        })
        .unwrap_err();
    assert!(e.contains("no postcopy here to recover"), "{e}");
    let e = dst
        .command(Command::Reconnect { uri: elsewhere })
        .unwrap_err();
    assert!(e.contains("source's command"), "{e}");
    m.command(Command::Cancel).unwrap();
    failed(m.finish());
    assert_source_owns(&src, &dst.target);
}

#[test]
fn a_destination_with_locked_memory_refuses_postcopy_and_the_source_runs_on() {
    let dst = Dest::with(
        FakeTarget::new(MIB),
        ferry_migrate::recv::ReceiveParams {
            prepare: PrepareMode::Lock,
            ..recv_params()
        },
    );
    let src = busy_source();
    let m = Migration::start(&src, &dst.uri, postcopy(PostcopyMode::Now));
    let e = failed(m.finish());
    assert!(matches!(e, MigrateError::PostcopyRefused), "{e}");
    assert_source_owns(&src, &dst.target);
}

#[test]
fn a_failure_before_go_gives_the_guest_back_and_the_destination_forgets_postcopy() {
    let target = FakeTarget::new(MIB);
    target.fail_load.store(true, Ordering::SeqCst);
    let dst = Dest::with_target(target.clone());
    let src = busy_source();
    let m = Migration::start(&src, &dst.uri, postcopy(PostcopyMode::Now));
    let e = failed(m.finish());
    assert!(e.to_string().contains("load"), "{e}");
    assert_source_owns(&src, &target);
    // The next attempt, precopy, succeeds on the same destination: its memory is whole.
    target.fail_load.store(false, Ordering::SeqCst);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    let m = Migration::start(&src, &dst.uri, params());
    completed(m.finish());
    received(dst.finish());
    assert_handed_over(&src, &target);
}

/// The end of postcopy races the destination closing its channels against its
/// `PostcopyDone`: repeated, the source must always learn that it is done (not mistake the
/// closing for a broken link).
#[test]
fn the_end_of_postcopy_is_never_mistaken_for_a_broken_link() {
    for _ in 0..6 {
        after_stuck_precopy();
    }
}

/// `Go` is lost with the link: the source has committed (and reconnects), the destination
/// has the state loaded but never heard `Go`. The reconnection stands for it: the guest runs
/// on the destination and postcopy completes, never on both sides.
#[test]
fn a_go_lost_with_the_link_is_recovered_by_the_reconnection() {
    use ferry_proto::MessageKind;
    use ferry_testkit::proxy::{Action, Dir, Fault, Trigger};
    // Repeated: which side notices the cut first, and through which channel, varies.
    for _ in 0..4 {
        let dst = Dest::start(MIB);
        let src = busy_source();
        let cut = Fault {
            when: Trigger::first(Dir::ToDestination, MessageKind::Go),
            action: Action::Cut,
        };
        let px = proxy(&dst, vec![cut]);
        let m = Migration::start(&src, &px.uri(), postcopy(PostcopyMode::Now));
        m.wait_status(Status::PostcopyPaused, Duration::from_secs(10));
        assert!(!dst.target.running(), "no Go reached the destination yet");
        assert!(!src.running(), "the committed source never resumes");
        px.heal();
        completed(m.finish());
        let target = dst.target.clone();
        received(dst.finish());
        assert_handed_over(&src, &target);
    }
}

/// A source resuming a postcopy at an address where no postcopy runs (the destination
/// ended, or another process listens there) is refused, never taken as a new migration.
#[test]
fn a_resume_without_a_postcopy_here_is_refused() {
    use ferry_proto::{caps, read_message, ChannelRole, Hello, Message, VERSION};
    use std::io::Write;
    let dst = Dest::start(MIB);
    let ferry_transport::Uri::Unix(path) = &dst.uri else {
        panic!("unix socket expected")
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    let mut buf = Vec::new();
    Message::Hello(Hello {
        version: VERSION,
        capabilities: caps::POSTCOPY | caps::RESUME,
        session: 7,
        role: ChannelRole::Main,
        data_channels: 2,
    })
    .encode(&mut buf);
    s.write_all(&buf).unwrap();
    let answer = read_message(&mut s, &mut Vec::new()).unwrap();
    assert!(
        matches!(&answer, Message::Refuse { reason } if reason.contains("no postcopy here")),
        "{answer:?}"
    );
    assert_eq!(dst.progress.status(), Status::Listening);
    assert!(!dst.target.running());
}

/// Postcopy through a proxy that does `action` at the 8th pushed frame; `mend` runs once
/// the source has paused the migration (and brings the link back). Afterwards every page
/// must be right on the destination, which kept running the guest.
fn postcopy_through_a_broken_link(
    action: ferry_testkit::proxy::Action,
    mend: impl FnOnce(&ferry_testkit::proxy::Proxy, &Migration, &Dest),
) {
    use ferry_proto::MessageKind;
    use ferry_testkit::proxy::{Dir, Fault, Trigger};
    let dst = Dest::start(MIB);
    let src = busy_source();
    let fault = Fault {
        when: Trigger::Frame {
            dir: Dir::ToDestination,
            kind: MessageKind::Pages,
            nth: 8,
        },
        action,
    };
    let px = proxy(&dst, vec![fault]);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = toucher(&src, &dst.target, stop.clone());
    let params = SendParams {
        // A bandwidth cap keeps the push in flight long enough to be broken.
        max_bandwidth: Some(16 << 20),
        ..postcopy(PostcopyMode::Now)
    };
    let m = Migration::start(&src, &px.uri(), params);
    m.wait_status(Status::PostcopyPaused, Duration::from_secs(10));
    assert!(!src.running(), "the source never runs the guest again");
    mend(&px, &m, &dst);
    let stats = completed(m.finish());
    let target = dst.target.clone();
    received(dst.finish());
    stop.store(true, Ordering::Relaxed);
    let (read, wrong) = guest.join().unwrap();
    assert_eq!(read, MIB * 256, "the guest read every page");
    assert_eq!(wrong, 0, "pages the guest read differed from the source's");
    assert_handed_over(&src, &target);
    let p = stats.postcopy.unwrap();
    assert!(p.reconnects >= 1, "{p:?}");
    // Pages placed before the break are not pushed again.
    assert!(p.pages_not_resent > 0, "{p:?}");
    assert!(p.pages_not_resent < p.pages_missing, "{p:?}");
}

/// The link is cut in the middle of postcopy (the guest runs on the destination, pages are
/// still on the source): both sides hold on, the source reconnects once the link is back,
/// the destination asks again for what its guest waits for, and every page arrives right.
#[test]
fn a_link_cut_mid_postcopy_is_recovered_on_a_new_connection() {
    use ferry_testkit::proxy::Action;
    postcopy_through_a_broken_link(Action::Cut, |px, m, dst| {
        dst.wait_status(Status::PostcopyPaused, Duration::from_secs(5));
        assert!(dst.target.running(), "the destination keeps the guest");
        // Both refuse what would lose the guest.
        assert!(m.command(Command::Resume { force: false }).is_err());
        assert!(dst.command(Command::Cancel).is_err());
        std::thread::sleep(Duration::from_millis(300));
        px.heal();
    });
}

/// The link is cut in the middle of postcopy and never comes back: the destination listens
/// on a new address (`migrate-recover`), the source is pointed there (`migrate --resume`),
/// and postcopy goes on over the new connection to its end.
#[test]
fn a_link_cut_mid_postcopy_is_recovered_at_a_new_address() {
    use ferry_testkit::proxy::Action;
    let dir = tempfile::tempdir().unwrap();
    let new = Uri::Unix(dir.path().join("recover.sock"));
    postcopy_through_a_broken_link(Action::Cut, |_, m, dst| {
        dst.wait_status(Status::PostcopyPaused, Duration::from_secs(5));
        // An address in use (here: the first listener's socket file) is refused.
        let e = dst
            .command(Command::Recover {
                uri: dst.uri.clone(),
            })
            .unwrap_err();
        assert!(e.contains("exists"), "{e}");
        let said = dst.command(Command::Recover { uri: new.clone() }).unwrap();
        assert!(said.contains("--resume"), "{said}");
        let said = m.command(Command::Reconnect { uri: new.clone() }).unwrap();
        assert!(said.contains("reconnecting to unix:"), "{said}");
        // The proxy stays cut: every page that still comes, comes the new way.
    });
}

/// A link that goes silent in the middle of postcopy (no reset, nothing arrives) is found
/// out by the source's pings within the progress timeout, and recovered when it comes back.
#[test]
fn a_silent_link_mid_postcopy_is_detected_and_recovered() {
    use ferry_testkit::proxy::Action;
    postcopy_through_a_broken_link(Action::Freeze, |px, _, _| px.thaw());
}

/// A destination that hands its listener, once its postcopy has ended, to
/// [`answer_late_resumes`], as the VMM does; `receive` runs on its own thread.
struct LateDest {
    uri: Uri,
    target: Arc<FakeTarget>,
    progress: Arc<ferry_migrate::Progress>,
    commander: ferry_migrate::control::Commander,
    join: JoinHandle<ferry_migrate::recv::LateAnswers>,
}

fn late_dest(dir: &std::path::Path) -> LateDest {
    use ferry_migrate::control;
    use ferry_migrate::recv::{answer_late_resumes, receive};
    use ferry_transport::Listener;
    let uri = Uri::Unix(dir.join("incoming.sock"));
    let listener = Listener::bind(&uri).unwrap();
    let target = FakeTarget::new(MIB);
    let (commander, commands) = control::channel();
    let progress = ferry_migrate::Progress::new();
    let (t, p, rp) = (target.clone(), progress.clone(), recv_params());
    let join = std::thread::spawn(move || {
        let out = receive(t, &listener, &rp, p, None, commands);
        let Ok(RecvOutcome::Running(mut stats)) = out else {
            panic!("expected the guest running here, got {out:?}")
        };
        let ended = stats.postcopy_ended.take().expect("a postcopy ended here");
        answer_late_resumes(listener, ended, &rp).unwrap()
    });
    LateDest {
        uri,
        target,
        progress,
        commander,
        join,
    }
}

/// A proxy from a new socket in `dir` to `to` that drops the first `PostcopyDone`.
fn losing_done(dir: &std::path::Path, name: &str, to: Uri) -> ferry_testkit::proxy::Proxy {
    use ferry_proto::MessageKind;
    use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, Trigger};
    let lost = Fault {
        when: Trigger::Frame {
            dir: Dir::ToSource,
            kind: MessageKind::PostcopyDone,
            nth: 1,
        },
        action: Action::Drop,
    };
    Proxy::start(&Uri::Unix(dir.join(name)), to, vec![lost]).unwrap()
}

/// The destination's `PostcopyDone` is lost on the way: the destination has every page and
/// runs the guest, the source (which did not hear it) holds its pages and reconnects. The
/// destination keeps its listener and tells it again, so the source ends too, instead of
/// reconnecting forever.
#[test]
fn a_lost_postcopy_done_is_said_again_to_the_reconnecting_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = late_dest(dir.path());
    let px = losing_done(dir.path(), "px.sock", d.uri.clone());
    let src = busy_source();
    let m = Migration::start(&src, &px.uri(), postcopy(PostcopyMode::Now));
    let late = d.join.join().unwrap();
    let stats = completed(m.finish());
    let p = stats.postcopy.unwrap();
    assert!(p.reconnects >= 1, "the source reconnected: {p:?}");
    assert_handed_over(&src, &d.target);
    drop(late);
}

/// The same after the source was moved to a new address (`migrate-recover`, `migrate
/// --resume`): the new address answers the late reconnection too.
#[test]
fn a_lost_postcopy_done_after_a_move_is_said_again_at_the_new_address() {
    use ferry_proto::MessageKind;
    use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, Trigger};
    let dir = tempfile::tempdir().unwrap();
    let d = late_dest(dir.path());
    // The first link is cut for good at the 8th pushed frame.
    let cut = Fault {
        when: Trigger::Frame {
            dir: Dir::ToDestination,
            kind: MessageKind::Pages,
            nth: 8,
        },
        action: Action::Cut,
    };
    let first = Proxy::start(
        &Uri::Unix(dir.path().join("a.sock")),
        d.uri.clone(),
        vec![cut],
    );
    let first = first.unwrap();
    let src = busy_source();
    let params = SendParams {
        max_bandwidth: Some(16 << 20),
        ..postcopy(PostcopyMode::Now)
    };
    let m = Migration::start(&src, &first.uri(), params);
    m.wait_status(Status::PostcopyPaused, Duration::from_secs(10));
    wait_status(
        &d.progress,
        Status::PostcopyPaused,
        Duration::from_secs(5),
        "destination",
    );
    let new = Uri::Unix(dir.path().join("recover.sock"));
    let recover = |uri: &Uri| {
        d.commander
            .send(
                Command::Recover { uri: uri.clone() },
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())
    };
    recover(&new).unwrap();
    // Asked again for the same address: already done.
    assert!(recover(&new).unwrap().contains("already listening"));
    let second = losing_done(dir.path(), "b.sock", new);
    m.command(Command::Reconnect { uri: second.uri() }).unwrap();
    let late = d.join.join().unwrap();
    let stats = completed(m.finish());
    let p = stats.postcopy.unwrap();
    assert!(
        p.reconnects >= 2,
        "reconnected after the cut and after the lost word: {p:?}"
    );
    assert_handed_over(&src, &d.target);
    drop(late);
}
