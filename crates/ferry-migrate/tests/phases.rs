//! Every phase transition of the sender and the receiver, and every failure, without KVM:
//! fake VMs over unix sockets, faults injected at exact protocol steps by the proxy.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_migrate::control::Command;
use ferry_migrate::error::{AbortCause, Waited};
use ferry_migrate::recv::RecvOutcome;
use ferry_migrate::send::{SendOutcome, SendParams};
use ferry_migrate::{MigrateError, Status};
use ferry_proto::MessageKind as K;
use ferry_testkit::fake::{FakeSource, FakeTarget};
use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, Trigger};

/// A destination whose VM fails the step `flag` picks.
fn failing_destination(flag: fn(&FakeTarget) -> &std::sync::atomic::AtomicBool) -> Dest {
    let target = FakeTarget::new(MIB);
    flag(&target).store(true, std::sync::atomic::Ordering::SeqCst);
    Dest::with_target(target)
}

/// A busy source migrating through `faults` to a fresh destination, expected to fail.
fn failed_through(faults: Vec<Fault>) -> (Dest, Arc<FakeSource>, Proxy, MigrateError) {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let p = proxy(&dst, faults);
    let e = failed(Migration::start(&src, &p.uri(), params()).finish());
    (dst, src, p, e)
}

fn at(dir: Dir, kind: K, action: Action) -> Fault {
    Fault {
        when: Trigger::first(dir, kind),
        action,
    }
}

#[test]
fn a_migration_moves_memory_and_state_and_hands_over_once() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let m = Migration::start(&src, &dst.uri, params());
    let stats = completed(m.finish());
    assert_eq!(stats.status, "completed");
    assert!(stats.passes >= 2, "{stats:?}");
    assert!(stats.downtime_ms < 800.0, "{stats:?}");
    assert_handed_over(&src, &dst.target);
    match dst.finish().unwrap() {
        RecvOutcome::Running(s) => {
            assert_eq!(s.attempts, 1);
            assert!(!s.confirmed_late);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn an_incompatible_destination_refuses_and_keeps_listening() {
    let dst = Dest::start(MIB * 2);
    let src = busy_source();
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Refused(r) if r.contains(&format!("--memory {MIB}M"))),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    assert!(dst
        .progress
        .error()
        .unwrap_or_default()
        .contains("incompatible"));
}

#[test]
fn a_failed_attempt_is_discarded_and_the_next_one_succeeds() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let p = proxy(
        &dst,
        vec![Fault {
            when: Trigger::Frame {
                dir: Dir::ToDestination,
                kind: K::Pages,
                nth: 5,
            },
            action: Action::Cut,
        }],
    );
    let e = failed(Migration::start(&src, &p.uri(), params()).finish());
    assert!(
        matches!(
            e,
            MigrateError::Closed { .. } | MigrateError::Send { .. } | MigrateError::Receive { .. }
        ),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    completed(Migration::start(&src, &dst.uri, params()).finish());
    assert_handed_over(&src, &dst.target);
    match dst.finish().unwrap() {
        RecvOutcome::Running(s) => assert_eq!(s.attempts, 2),
        o => panic!("{o:?}"),
    }
}

#[test]
fn cancel_works_in_every_phase_before_the_commit() {
    // Each freeze holds the link at a phase boundary; the cancel lands in that phase.
    let cases: [(&str, Trigger); 4] = [
        ("handshake", Trigger::first(Dir::ToSource, K::Welcome)),
        ("setup", Trigger::first(Dir::ToSource, K::SetupAccepted)),
        ("precopy", Trigger::first(Dir::ToDestination, K::PassEnd)),
        (
            "switchover",
            Trigger::first(Dir::ToDestination, K::Complete),
        ),
    ];
    for (phase, when) in cases {
        let dst = Dest::start(MIB);
        let src = busy_source();
        let p = proxy(
            &dst,
            vec![Fault {
                when,
                action: Action::Freeze,
            }],
        );
        let long = Duration::from_secs(5);
        let prm = SendParams {
            switchover_timeout: long,
            progress_timeout: long,
            handshake_timeout: long,
            ..params()
        };
        let m = Migration::start(&src, &p.uri(), prm);
        assert!(p.wait_fired(long), "{phase}: fault never fired");
        m.wait_phase(phase, long);
        let reply = m.command(Command::Cancel).unwrap();
        assert!(reply.contains("cancelled"), "{phase}: {reply}");
        let e = failed(m.finish());
        assert!(
            matches!(e, MigrateError::Aborted(AbortCause::Cancel)),
            "{phase}: {e}"
        );
        assert_source_owns(&src, &dst.target);
    }
}

#[test]
fn a_silent_destination_fails_the_handshake_in_time() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let p = proxy(
        &dst,
        vec![Fault {
            when: Trigger::FirstConnection,
            action: Action::Freeze,
        }],
    );
    let t = Instant::now();
    let e = failed(Migration::start(&src, &p.uri(), params()).finish());
    assert!(
        matches!(
            e,
            MigrateError::Timeout {
                what: Waited::Welcome | Waited::Connect,
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < params().handshake_timeout + Duration::from_secs(1));
    assert_source_owns(&src, &dst.target);
}

#[test]
fn a_stalled_destination_fails_precopy_after_the_progress_timeout() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let freeze = Fault {
        when: Trigger::Frame {
            dir: Dir::ToDestination,
            kind: K::Pages,
            nth: 8,
        },
        action: Action::Freeze,
    };
    let p = proxy(&dst, vec![freeze]);
    let t = Instant::now();
    let e = failed(Migration::start(&src, &p.uri(), params()).finish());
    assert!(
        matches!(
            e,
            MigrateError::Timeout {
                what: Waited::Progress,
                ..
            }
        ),
        "{e}"
    );
    let took = t.elapsed();
    assert!(took >= params().progress_timeout, "{took:?}");
    assert!(
        took < params().progress_timeout + Duration::from_secs(2),
        "{took:?}"
    );
    assert_source_owns(&src, &dst.target);
    // The destination, hearing nothing for the same timeout, discards the attempt.
    drop(p);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

#[test]
fn a_switchover_not_committed_in_time_resumes_the_source_within_the_bound() {
    let (dst, src, p, e) =
        failed_through(vec![at(Dir::ToDestination, K::Complete, Action::Freeze)]);
    assert!(
        matches!(
            e,
            MigrateError::Timeout {
                what: Waited::Loaded,
                ..
            }
        ),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    let pause = src.longest_pause();
    assert!(
        pause >= params().switchover_timeout
            && pause < params().switchover_timeout + Duration::from_millis(500),
        "paused {pause:?}"
    );
    p.thaw();
    // The destination gets the source's Error after Complete and never runs the guest.
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    assert!(!dst.target.running());
}

#[test]
fn a_late_loaded_is_not_committed() {
    // Loaded arrives after the switchover deadline: the source must not send Go.
    let late = Action::Delay(Duration::from_millis(1200));
    let (dst, src, _p, e) = failed_through(vec![at(Dir::ToSource, K::Loaded, late)]);
    assert!(
        matches!(
            e,
            MigrateError::Timeout {
                what: Waited::Loaded,
                ..
            }
        ),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    assert!(!dst.target.running());
}

#[test]
fn a_lost_go_leaves_both_paused_until_an_operator_decides() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let p = proxy(&dst, vec![at(Dir::ToDestination, K::Go, Action::Cut)]);
    let m = Migration::start(&src, &p.uri(), params());
    m.wait_status(Status::Unconfirmed, Duration::from_secs(10));
    dst.wait_status(Status::Unconfirmed, Duration::from_secs(10));
    assert!(!src.running() && !dst.target.running(), "both paused");
    // Plain commands are refused and say why.
    let r = m.command(Command::Resume { force: false }).unwrap_err();
    assert!(r.contains("--force") && r.contains("unconfirmed"), "{r}");
    assert!(m.command(Command::Cancel).unwrap_err().contains("refused"));
    assert!(dst
        .command(Command::Resume { force: false })
        .unwrap_err()
        .contains("--force"));
    // The operator picks the source.
    let r = m.command(Command::Resume { force: true }).unwrap();
    assert!(r.contains("by force"), "{r}");
    assert!(matches!(m.finish(), SendOutcome::ForcedResume));
    assert!(dst.command(Command::Quit { force: true }).is_ok());
    let target = dst.target.clone();
    assert!(matches!(dst.finish().unwrap(), RecvOutcome::Quit));
    assert_source_owns(&src, &target);
}

#[test]
fn a_late_go_still_hands_over_and_the_source_learns_it() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let hold = Action::FreezeFor(Duration::from_millis(1500));
    let p = proxy(&dst, vec![at(Dir::ToDestination, K::Go, hold)]);
    let m = Migration::start(&src, &p.uri(), params());
    m.wait_status(Status::Unconfirmed, Duration::from_secs(10));
    dst.wait_status(Status::Unconfirmed, Duration::from_secs(10));
    let stats = completed(m.finish());
    assert!(stats.confirmed_late);
    assert_handed_over(&src, &dst.target);
    match dst.finish().unwrap() {
        RecvOutcome::Running(s) => assert!(s.confirmed_late),
        o => panic!("{o:?}"),
    }
    drop(p);
}

#[test]
fn a_lost_running_leaves_the_source_paused_and_the_destination_running() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let p = proxy(&dst, vec![at(Dir::ToSource, K::Running, Action::Cut)]);
    let m = Migration::start(&src, &p.uri(), params());
    m.wait_status(Status::Unconfirmed, Duration::from_secs(10));
    assert!(matches!(dst.finish().unwrap(), RecvOutcome::Running(_)));
    assert!(m
        .command(Command::Quit { force: false })
        .unwrap_err()
        .contains("--force"));
    assert!(m.command(Command::Quit { force: true }).is_ok());
    assert!(matches!(m.finish(), SendOutcome::Quit));
    assert!(!src.running());
}

#[test]
fn a_destination_that_cannot_run_the_guest_after_go_gives_it_back() {
    let dst = failing_destination(|t| &t.fail_resume);
    let src = busy_source();
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("running the guest")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

#[test]
fn a_destination_that_cannot_load_the_state_gives_it_back() {
    let dst = failing_destination(|t| &t.fail_load);
    let src = busy_source();
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("loading the state")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
}

#[test]
fn a_source_that_cannot_pause_keeps_running() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    src.fail_pause
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(
            e,
            MigrateError::Vm {
                op: "pausing the guest",
                ..
            }
        ),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

#[test]
fn commands_are_decided_by_the_phase() {
    let dst = Dest::start(MIB);
    // Listening: nothing to resume or cancel.
    assert!(dst
        .command(Command::Resume { force: false })
        .unwrap_err()
        .contains("no guest here"));
    assert!(dst
        .command(Command::Cancel)
        .unwrap_err()
        .contains("no incoming migration"));
    let src = busy_source();
    let slow = SendParams {
        max_bandwidth: Some(4 << 20),
        ..params()
    };
    let m = Migration::start(&src, &dst.uri, slow);
    m.wait_phase("precopy", Duration::from_secs(5));
    for c in [
        Command::Resume { force: false },
        Command::Pause,
        Command::Snapshot,
    ] {
        let r = m.command(c.clone()).unwrap_err();
        assert!(r.contains("refused in migration phase precopy"), "{r}");
        let r = dst.command(c).unwrap_err();
        assert!(r.contains("refused in migration phase receiving"), "{r}");
    }
    assert!(src.running(), "refusals changed nothing");
    // quit on the destination aborts the attempt; the source gets the guest back.
    assert!(dst
        .command(Command::Quit { force: false })
        .unwrap()
        .contains("aborted"));
    let e = failed(m.finish());
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("quit")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    assert!(matches!(dst.finish().unwrap(), RecvOutcome::Quit));
}

#[test]
fn quit_on_the_source_aborts_before_quitting() {
    let dst = Dest::start(MIB);
    let src = busy_source();
    let slow = SendParams {
        max_bandwidth: Some(4 << 20),
        ..params()
    };
    let m = Migration::start(&src, &dst.uri, slow);
    m.wait_phase("precopy", Duration::from_secs(5));
    assert!(m.command(Command::Quit { force: false }).is_ok());
    assert!(matches!(m.finish(), SendOutcome::Quit));
    assert!(
        src.running(),
        "the guest was given back before the process quits"
    );
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    assert!(dst.progress.error().unwrap_or_default().contains("quit"));
}

#[test]
fn a_corrupt_frame_fails_the_attempt_and_the_source_keeps_the_guest() {
    let (dst, src, _p, e) =
        failed_through(vec![at(Dir::ToDestination, K::DeviceData, Action::Corrupt)]);
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("DeviceData")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

#[test]
fn a_lost_page_frame_is_detected_and_the_source_keeps_the_guest() {
    let drop_one = Fault {
        when: Trigger::Frame {
            dir: Dir::ToDestination,
            kind: K::Pages,
            nth: 3,
        },
        action: Action::Drop,
    };
    let (dst, src, _p, e) = failed_through(vec![drop_one]);
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("announced")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

#[test]
fn stray_connections_and_a_second_migration_do_not_disturb_the_first() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dst = Dest::start(MIB);
    let ferry_transport::Uri::Unix(path) = dst.uri.clone() else {
        unreachable!()
    };
    // Garbage, silence, and a Hello of another version, before the real migration.
    let mut garbage = UnixStream::connect(&path).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _idle = UnixStream::connect(&path).unwrap();
    let mut old = UnixStream::connect(&path).unwrap();
    let mut hello = Vec::new();
    ferry_proto::Message::Hello(ferry_proto::Hello {
        version: 1,
        capabilities: 0,
        session: 9,
        role: ferry_proto::ChannelRole::Main,
        data_channels: 1,
    })
    .encode(&mut hello);
    old.write_all(&hello).unwrap();
    let reply = ferry_proto::read_message(&mut old, &mut Vec::new()).unwrap();
    assert!(
        matches!(reply, ferry_proto::Message::Refuse { ref reason } if reason.contains("version 1")),
        "{reply:?}"
    );
    // A slow real migration, and a second source trying meanwhile.
    let src = busy_source();
    let slow = SendParams {
        max_bandwidth: Some(8 << 20),
        ..params()
    };
    let first = Migration::start(&src, &dst.uri, slow);
    first.wait_phase("precopy", Duration::from_secs(5));
    let other = busy_source();
    let e = failed(Migration::start(&other, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Refused(r) if r.contains("already receiving")),
        "{e}"
    );
    assert!(other.running());
    completed(first.finish());
    assert_handed_over(&src, &dst.target);
    match dst.finish().unwrap() {
        RecvOutcome::Running(s) => assert!(s.stray_connections >= 3, "{s:?}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn invalid_parameters_are_refused_before_anything_starts() {
    let src = busy_source();
    let dst = Dest::start(MIB);
    let cases = [
        (
            SendParams {
                channels: 0,
                ..params()
            },
            "channels must be 1 to 64",
        ),
        (
            SendParams {
                channels: 65,
                ..params()
            },
            "channels must be 1 to 64",
        ),
        (
            SendParams {
                switchover_timeout: Duration::from_millis(40),
                ..params()
            },
            "switchover-timeout (40 ms) must be longer than downtime-limit (50 ms)",
        ),
        (
            SendParams {
                progress_timeout: Duration::ZERO,
                ..params()
            },
            "progress-timeout must be 1 ms",
        ),
        (
            SendParams {
                max_bandwidth: Some(0),
                ..params()
            },
            "max-bandwidth",
        ),
    ];
    for (p, words) in cases {
        let e = failed(Migration::start(&src, &dst.uri, p).finish());
        assert!(e.to_string().contains(words), "{e}");
    }
    assert!(src.running());
    assert_eq!(
        dst.progress.status(),
        Status::Listening,
        "nothing reached it"
    );
}

#[test]
fn an_idle_source_converges_at_once() {
    let dst = Dest::start(MIB);
    let idle = FakeSource::start(MIB, 1, Duration::from_millis(50));
    let stats = completed(Migration::start(&idle, &dst.uri, params()).finish());
    assert!(stats.converged, "{stats:?}");
    assert_handed_over(&idle, &dst.target);
}

#[test]
fn a_guest_paused_before_the_migration_stays_paused_after_a_failed_switchover() {
    let dst = failing_destination(|t| &t.fail_load);
    let src = busy_source();
    ferry_migrate::MigrationSource::pause(src.as_ref()).unwrap();
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("loading the state")),
        "{e}"
    );
    assert!(!src.running(), "the operator's pause is kept");
    assert_eq!(src.resumes(), 0);
    assert!(!dst.target.running());
}
