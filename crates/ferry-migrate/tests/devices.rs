//! Device state streams without KVM: fake devices with their own load times and initial
//! bytes move side by side over the data channels; the destination loads each on its own
//! thread, acknowledges initial bytes before the source may pause (switchover-ack), and a
//! damaged stream is refused with the device named while the source keeps the guest.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_migrate::send::SendParams;
use ferry_migrate::{DeviceState, MigrateError, MigrationDevice};
use ferry_testkit::fake::FakeSource;
use ferry_testkit::fake_device::FakeDevice;

/// Adds devices with these load times (ms), each with some initial bytes and a state.
fn with_devices(src: &FakeSource, loads: &[u64]) -> Vec<Arc<FakeDevice>> {
    loads
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let state = vec![i as u8; 1000 + i * 777];
            let d = FakeDevice::source(
                &format!("gpu{i}"),
                vec![0xA0 | i as u8; 64 << 10],
                Duration::from_millis(*ms),
                move || state.clone(),
            );
            src.add_device(d.clone());
            d
        })
        .collect()
}

/// Migrates a quiet fake VM with devices loading in `loads` ms; returns the destination's
/// device load span (what the downtime pays for them), ms.
fn device_part(loads: &[u64], parallel: bool) -> f64 {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    with_devices(&src, loads);
    let p = SendParams {
        parallel_devices: parallel,
        switchover_timeout: Duration::from_secs(2),
        ..params()
    };
    let stats = completed(Migration::start(&src, &dst.uri, p).finish());
    assert_handed_over(&src, &dst.target);
    let initial: Vec<_> = dst.target.devices().iter().map(|d| d.initial()).collect();
    for (i, got) in initial.iter().skip(1).enumerate() {
        let (bytes, _) = got.clone().expect("initial bytes arrived");
        assert_eq!(
            bytes,
            vec![0xA0 | i as u8; 64 << 10],
            "gpu{i}'s initial bytes"
        );
    }
    assert_eq!(stats.devices as usize, loads.len() + 1);
    assert_eq!(stats.parallel_devices, parallel);
    stats.downtime.dest_load_ms
}

#[test]
fn devices_load_side_by_side_so_the_downtime_pays_for_the_slowest() {
    let loads = [10, 20, 40, 80];
    let parallel = device_part(&loads, true);
    let slowest = 80.0;
    assert!(
        parallel >= slowest && parallel <= slowest * 1.1,
        "device part {parallel:.1} ms, slowest device {slowest} ms"
    );
}

#[test]
fn serial_loading_pays_for_the_sum() {
    let loads = [10, 20, 40, 80];
    let serial = device_part(&loads, false);
    let sum: u64 = loads.iter().sum();
    assert!(
        serial >= sum as f64,
        "device part {serial:.1} ms, sum {sum} ms"
    );
}

#[test]
fn a_corrupt_device_stream_is_refused_naming_the_device_and_the_source_keeps_the_guest() {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    let devs = with_devices(&src, &[0, 0, 0]);
    devs[1]
        .corrupt
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    let text = e.to_string();
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("gpu1") && reason.contains("corrupt")),
        "{text}"
    );
    assert_source_owns(&src, &dst.target);
    for d in &devs {
        assert_eq!(
            d.state(),
            Some(DeviceState::Running),
            "devices run again here"
        );
    }
    // And the next migration, with the device healthy again, goes through.
    devs[1]
        .corrupt
        .store(false, std::sync::atomic::Ordering::SeqCst);
    dst.wait_status(ferry_migrate::Status::Listening, Duration::from_secs(5));
    completed(Migration::start(&src, &dst.uri, params()).finish());
    assert_handed_over(&src, &dst.target);
    for d in &devs {
        assert_eq!(
            d.state(),
            Some(DeviceState::StopCopy),
            "stopped for good here"
        );
    }
    for d in dst.target.devices() {
        assert_eq!(d.state(), Some(DeviceState::Running), "running there");
    }
}

#[test]
fn a_destination_that_will_not_run_the_guest_after_go_gives_it_back_with_running_devices() {
    let target = ferry_testkit::fake::FakeTarget::new(MIB);
    target
        .fail_resume
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dst = Dest::with_target(target);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    let devs = with_devices(&src, &[0, 5]);
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(e.to_string().contains("injected"), "{e}");
    assert_source_owns(&src, &dst.target);
    for d in &devs {
        assert_eq!(d.state(), Some(DeviceState::Running), "{}", d.name());
    }
}

#[test]
fn a_vm_without_any_device_migrates() {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    src.clear_devices();
    let stats = completed(Migration::start(&src, &dst.uri, params()).finish());
    assert_eq!(stats.devices, 0);
    assert_handed_over(&src, &dst.target);
}

#[test]
fn a_truncated_device_stream_is_refused_naming_the_device() {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    let devs = with_devices(&src, &[0, 0]);
    devs[0]
        .truncate
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(&e, MigrateError::Peer { reason, .. } if reason.contains("gpu0") && reason.contains("truncated")),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
}

#[test]
fn the_source_pauses_only_after_the_destination_loaded_every_initial_byte() {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    let slow = FakeDevice::slow_initial(
        "nic0",
        vec![7; 256 << 10],
        Duration::from_millis(400),
        || vec![1, 2, 3],
    );
    src.add_device(slow);
    let p = SendParams {
        switchover_timeout: Duration::from_secs(2),
        ..params()
    };
    completed(Migration::start(&src, &dst.uri, p).finish());
    assert_handed_over(&src, &dst.target);
    let nic = dst
        .target
        .devices()
        .into_iter()
        .find(|d| d.name() == "nic0")
        .expect("nic0 on the destination");
    let (_, initial_at) = nic.initial().expect("initial bytes loaded");
    let paused = src.first_pause().expect("the source paused");
    assert!(
        paused >= initial_at,
        "the source paused {:?} before the destination had the initial bytes",
        initial_at - paused
    );
}

#[test]
fn a_destination_that_never_loads_the_initial_bytes_is_given_up_on() {
    let dst = Dest::start(MIB);
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    // Longer than the progress timeout of the test parameters (1.5 s).
    let slow = FakeDevice::slow_initial("nic0", vec![7; 4096], Duration::from_secs(3), || vec![1]);
    src.add_device(slow.clone());
    let e = failed(Migration::start(&src, &dst.uri, params()).finish());
    assert!(
        matches!(
            e,
            MigrateError::Timeout {
                what: ferry_migrate::error::Waited::DevicesReady,
                ..
            }
        ),
        "{e}"
    );
    assert_source_owns(&src, &dst.target);
    assert_eq!(slow.state(), Some(DeviceState::Running));
}
