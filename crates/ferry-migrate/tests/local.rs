//! Local hand-over between fake VMs over a real unix socket: the memory file passes, no
//! page is copied, and an attempt that fails after the destination mapped the memory
//! leaves the guest with the source and gives the memory back.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ferry_migrate::recv::RecvOutcome;
use ferry_migrate::send::SendParams;
use ferry_migrate::{MigrateError, MigrationSource, MigrationTarget, Status};
use ferry_proto::{
    caps, read_message, ChannelRole, Hello, MemRegion, Message, Setup, Timeouts, VmDescription,
    VERSION,
};
use ferry_testkit::fake::FakeSource;
use ferry_transport::Uri;
use vm_memory::{Bytes, GuestAddress};

fn local() -> SendParams {
    SendParams {
        local: true,
        ..params()
    }
}

fn shared_source() -> std::sync::Arc<FakeSource> {
    FakeSource::start_shared(MIB, 256, Duration::from_micros(200))
}

#[test]
fn the_memory_file_is_handed_over_and_no_page_is_copied() {
    let dst = Dest::start(MIB);
    let src = shared_source();
    let stats = completed(Migration::start(&src, &dst.uri, local()).finish());
    assert!(stats.local);
    assert_eq!(
        (stats.pages_data, stats.pages_zero, stats.channels),
        (0, 0, 0)
    );
    let target = dst.target.clone();
    assert!(matches!(dst.finish(), Ok(RecvOutcome::Running(_))));
    assert_handed_over(&src, &target);
    // One memory: what the destination writes, the source's mapping shows.
    let at = GuestAddress((MIB - 1) << 20);
    target.ram().mem().write_obj(0xfeed_u64, at).unwrap();
    assert_eq!(src.ram().mem().read_obj::<u64>(at).unwrap(), 0xfeed);
}

#[test]
fn a_failure_after_the_memory_was_mapped_gives_it_back() {
    let dst = Dest::start(MIB);
    dst.target.fail_load.store(true, Ordering::SeqCst);
    let src = shared_source();
    let e = failed(Migration::start(&src, &dst.uri, local()).finish());
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    // The destination no longer maps the source's memory: the guest's writes stay there.
    let at = GuestAddress((MIB - 1) << 20);
    src.ram().mem().write_obj(0xbeef_u64, at).unwrap();
    assert_eq!(dst.target.ram().mem().read_obj::<u64>(at).unwrap(), 0);
    // And the next hand-over works.
    dst.target.fail_load.store(false, Ordering::SeqCst);
    completed(Migration::start(&src, &dst.uri, local()).finish());
    assert_handed_over(&src, &dst.target);
}

#[test]
fn anonymous_memory_and_tcp_are_refused_before_connecting() {
    let src = FakeSource::start(MIB, 4, Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let uri = Uri::Unix(dir.path().join("nobody.sock"));
    let e = failed(Migration::start(&src, &uri, local()).finish());
    assert!(
        matches!(e, MigrateError::LocalNeedsSharedMemory { .. }),
        "{e}"
    );
    let shared = shared_source();
    let tcp = Uri::Tcp("127.0.0.1:9".into());
    let e = failed(Migration::start(&shared, &tcp, local()).finish());
    assert!(matches!(e, MigrateError::LocalNeedsUnix { .. }), "{e}");
    assert!(src.running() && shared.running());
}

/// A peer that announces a local hand-over but sends no memory file (a forwarded socket
/// drops descriptors) is refused with the reason, and the destination listens on.
#[test]
fn local_memory_without_a_file_is_refused() {
    let dst = Dest::start(MIB);
    let Uri::Unix(path) = &dst.uri else {
        unreachable!()
    };
    let mut main = UnixStream::connect(path).unwrap();
    main.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let send = |s: &mut UnixStream, m: &Message| {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        s.write_all(&buf).unwrap();
    };
    let mut scratch = Vec::new();
    send(
        &mut main,
        &Message::Hello(Hello {
            version: VERSION,
            capabilities: caps::ALL,
            session: 1,
            role: ChannelRole::Main,
            data_channels: 0,
        }),
    );
    let welcome = read_message(&mut main, &mut scratch).unwrap();
    assert!(
        matches!(welcome, Message::Welcome { capabilities, .. } if capabilities & caps::LOCAL != 0),
        "{welcome:?}"
    );
    send(
        &mut main,
        &Message::Setup(Setup {
            vm: VmDescription {
                vcpus: 1,
                page_size: 4096,
                regions: vec![MemRegion {
                    gpa: 0,
                    size: MIB << 20,
                }],
                cpu_features: vec![],
            },
            timeouts: Timeouts {
                progress_ms: 1000,
                switchover_ms: 300,
            },
            devices: vec![],
            parallel_devices: true,
        }),
    );
    assert_eq!(
        read_message(&mut main, &mut scratch).unwrap(),
        Message::SetupAccepted
    );
    send(
        &mut main,
        &Message::LocalMemory {
            locked: false,
            offsets: vec![0],
        },
    );
    let reason = loop {
        match read_message(&mut main, &mut scratch).unwrap() {
            Message::Error { reason } => break reason,
            _ => continue,
        }
    };
    assert!(reason.contains("memory file did not arrive"), "{reason}");
    dst.wait_status(Status::Listening, Duration::from_secs(5));
    assert!(!dst.target.running());
}
