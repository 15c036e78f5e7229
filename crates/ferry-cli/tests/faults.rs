//! The fault matrix (crates/ferry-testkit/src/matrix.rs) against the real `ferry` binary:
//! one test per case, one at a time. Each case's verdict is that exactly one copy of the
//! guest runs afterwards, its self-check never failed, the source guest was never paused
//! longer than the switchover timeout plus 1 s unless the hand-over committed, and a failed
//! migration's `migrate` exited non-zero naming the cause. `ferry-bench faults --reps N`
//! runs the same matrix N times and prints a table.

use std::sync::{Mutex, MutexGuard};

use ferry_testkit::matrix::{cases, run_case, Config};

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn check(name: &str) {
    let _g = one_at_a_time();
    let cfg = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
    };
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let v = run_case(&cfg, &case);
    println!(
        "{}: {} at {} -> {} ({:.1} s, longest source pause {:.0} ms): {}",
        v.case,
        case.fault,
        case.moment,
        if v.passed { "ok" } else { "FAILED" },
        v.secs,
        v.source_pause_ms,
        v.detail
    );
    assert!(v.passed, "{}: {}", v.case, v.detail);
}

macro_rules! matrix {
    ($($test:ident => $name:literal,)*) => {
        $(#[test] fn $test() { check($name); })*

        #[test]
        fn every_case_has_a_test() {
            let tested = [$($name),*];
            for c in cases() {
                assert!(tested.contains(&c.name), "case {} has no test", c.name);
            }
        }
    };
}

matrix! {
    dest_frozen_briefly => "dest-frozen-briefly",
    dest_frozen_long => "dest-frozen-long",
    dest_frozen_at_complete => "dest-frozen-at-complete",
    dest_frozen_after_loaded => "dest-frozen-after-loaded",
    dest_killed_precopy => "dest-killed-precopy",
    dest_killed_at_complete => "dest-killed-at-complete",
    dest_killed_after_loaded => "dest-killed-after-loaded",
    link_cut_handshake => "link-cut-handshake",
    link_cut_precopy => "link-cut-precopy",
    link_cut_at_loaded => "link-cut-at-loaded",
    link_cut_at_go => "link-cut-at-go",
    link_cut_at_running => "link-cut-at-running",
    garbage_destination => "garbage-destination",
    silent_destination => "silent-destination",
    garbage_to_destination => "garbage-to-destination",
    idle_connection_to_destination => "idle-connection-to-destination",
    connection_storm => "connection-storm",
    corrupt_device_state => "corrupt-device-state",
    quit_destination_precopy => "quit-destination-precopy",
    quit_destination_switchover => "quit-destination-switchover",
    api_on_destination => "api-on-destination",
    api_on_source => "api-on-source",
    quit_source_precopy => "quit-source-precopy",
    cancel_at_switchover => "cancel-at-switchover",
    migrate_client_killed => "migrate-client-killed",
    two_migrates => "two-migrates",
}
