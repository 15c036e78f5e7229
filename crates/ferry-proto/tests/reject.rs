//! Every validation rule, on hand-built bad frames, with the right error
//! variant and a message that names the field, value and limit.

mod common;

use std::io::Read;

use common::*;
use ferry_proto::*;
use MessageKind as K;

/// Reads `bytes` and returns the error (panics if it decodes).
fn err(bytes: &[u8]) -> ProtoError {
    match read(bytes) {
        Ok(m) => panic!("decoded {m:?}, expected an error"),
        Err(e) => e,
    }
}

#[test]
fn bad_magic() {
    let mut body = hello_body().0;
    body[0] = b'X';
    let e = err(&Body(body).frame(K::Hello));
    assert!(matches!(e, ProtoError::BadMagic), "{e}");
    assert!(e.to_string().contains("FERRYMIG"));
}

#[test]
fn hello_with_unknown_version_still_decodes() {
    let mut body = hello_body().0;
    body[8..12].copy_from_slice(&7u32.to_le_bytes());
    match read(&Body(body).frame(K::Hello)).unwrap() {
        Message::Hello(h) => assert_eq!(h.version, 7),
        m => panic!("{m:?}"),
    }
}

#[test]
fn hello_bad_role_and_main_index() {
    let mut body = hello_body().0;
    body[28] = 3; // role byte
    let e = err(&Body(body).frame(K::Hello));
    assert!(
        matches!(
            e,
            ProtoError::Invalid {
                what: "Hello role",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains('3'));

    let mut body = hello_body().0;
    body[29] = 5; // channel index of a main channel
    let e = err(&Body(body).frame(K::Hello));
    assert!(
        matches!(
            e,
            ProtoError::Invalid {
                what: "Hello channel index",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_kind() {
    for kind in [0u16, 29, 0x7fff, u16::MAX] {
        let e = err(&frame(kind, 0, 0, &[]));
        assert!(matches!(e, ProtoError::UnknownKind(k) if k == kind), "{e}");
        assert!(e.to_string().contains(&kind.to_string()));
    }
}

#[test]
fn unknown_flags() {
    for flags in [2u16, 3, 0x8000] {
        let e = err(&frame(K::Go as u16, flags, 0, &[]));
        assert!(matches!(e, ProtoError::BadFlags(f) if f == flags), "{e}");
    }
}

#[test]
fn decode_header_checks_kind_flags_and_length() {
    let h = |kind: u16, flags: u16, len: u32| {
        let f = frame(kind, flags, len, &[]);
        decode_header(f[..8].try_into().unwrap())
    };
    assert_eq!(
        h(6, 0, 20).unwrap(),
        FrameHeader {
            kind: K::Pages,
            body_len: 20,
            summed: false,
        }
    );
    let device_max = K::DeviceData.max_body_len();
    assert!(device_max > MAX_DEVICE_CHUNK);
    assert!(h(K::DeviceData as u16, 0, device_max).is_ok());
    assert!(h(K::Setup as u16, 0, MAX_CONTROL_LEN).is_ok());
    assert!(matches!(
        h(K::Setup as u16, 0, MAX_CONTROL_LEN + 1),
        Err(ProtoError::TooLong { kind: K::Setup, len, max })
            if len == u64::from(MAX_CONTROL_LEN) + 1 && max == u64::from(MAX_CONTROL_LEN)
    ));
    assert!(matches!(
        h(K::DeviceData as u16, 0, device_max + 1),
        Err(ProtoError::TooLong {
            kind: K::DeviceData,
            ..
        })
    ));
    assert!(matches!(h(99, 0, 0), Err(ProtoError::UnknownKind(99))));
    assert!(matches!(h(1, 2, 0), Err(ProtoError::BadFlags(2))));
}

/// Counts the bytes pulled from the inner reader.
struct Counting<'a> {
    inner: &'a [u8],
    pulled: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pulled += n;
        Ok(n)
    }
}

#[test]
fn body_len_over_limit_fails_from_the_header_alone() {
    // 2 GiB claimed, nothing follows: must fail before reading or allocating.
    for kind in MessageKind::ALL {
        let bytes = frame(kind as u16, 0, 2 << 30, &[]);
        let mut r = Counting {
            inner: &bytes,
            pulled: 0,
        };
        let mut scratch = Vec::new();
        let e = read_message(&mut r, &mut scratch).unwrap_err();
        assert!(
            matches!(e, ProtoError::TooLong { kind: k, len, .. } if k == kind && len == 2 << 30),
            "{e}"
        );
        assert_eq!(r.pulled, FRAME_HEADER_LEN);
        assert_eq!(scratch.capacity(), 0, "allocated for a rejected header");
    }
    let e = err(&frame(K::DeviceData as u16, 0, u32::MAX, &[]));
    assert_eq!(
        e.to_string(),
        format!(
            "DeviceData frame body of {} bytes exceeds the limit of {}",
            u32::MAX,
            K::DeviceData.max_body_len()
        )
    );
}

#[test]
fn lying_body_len_within_limit_costs_little_memory() {
    // A DeviceData header claiming its largest body, followed by 10 bytes.
    let max = K::DeviceData.max_body_len();
    let bytes = frame(K::DeviceData as u16, 0, max, &[0; 10]);
    let mut scratch = Vec::new();
    let e = read_message(&mut &bytes[..], &mut scratch).unwrap_err();
    assert!(
        matches!(e, ProtoError::Truncated { what: "DeviceData frame body", needed, available: 10 }
            if needed == u64::from(max)),
        "{e}"
    );
    assert!(scratch.capacity() <= 64 << 10, "{}", scratch.capacity());
}

#[test]
fn decode_body_rejects_an_oversized_body() {
    let body = vec![0u8; MAX_CONTROL_LEN as usize + 1];
    assert!(matches!(
        decode_body(K::Error, &body),
        Err(ProtoError::TooLong { kind: K::Error, .. })
    ));
}

#[test]
fn counts_larger_than_the_remaining_bytes() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            Body::new().u32(0).u32(100).frame(K::Pages),
            "Pages run count",
        ),
        (
            Body::new().u32(0).u32(512).frame(K::ZeroPages),
            "ZeroPages run count",
        ),
        (
            Body::new().u32(1).u32(4096).u32(4000).frame(K::Setup),
            "Setup region count",
        ),
        (
            setup_with_regions().u32(4096).u64(0).frame(K::Setup),
            "Setup cpu feature count",
        ),
        (
            device_data(0, 60000, &[1, 2]).frame(K::DeviceData),
            "DeviceData data",
        ),
        (
            Body::new().u32(4000).bytes(b"abc").frame(K::Refuse),
            "Refuse reason",
        ),
        (Body::new().u32(10).frame(K::Error), "Error reason"),
        (
            setup_with_devices(&[])
                .truncate(5)
                .u32(1)
                .str("cpu")
                .u32(4000)
                .bytes(&[1, 2])
                .frame(K::Setup),
            "Setup device config",
        ),
    ];
    for (bytes, what) in cases {
        let e = err(&bytes);
        assert!(
            matches!(e, ProtoError::Truncated { what: w, needed, available } if w == what && needed > available),
            "{what}: {e}"
        );
    }
}

/// A Setup body up to (not including) the CPU feature count.
fn setup_with_regions() -> Body {
    Body::new().u32(1).u32(4096).u32(1).u64(0).u64(4096)
}

#[test]
fn counts_over_their_limit() {
    let cases: Vec<(Vec<u8>, &str, u32)> = vec![
        (
            Body::new().u32(0).u32(MAX_RUNS + 1).frame(K::Pages),
            "Pages run count",
            MAX_RUNS,
        ),
        (
            Body::new().u32(0).u32(u32::MAX).frame(K::ZeroPages),
            "ZeroPages run count",
            MAX_RUNS,
        ),
        (
            Body::new()
                .u32(1)
                .u32(4096)
                .u32(MAX_REGIONS + 1)
                .frame(K::Setup),
            "Setup region count",
            MAX_REGIONS,
        ),
        (
            setup_with_regions()
                .u32(MAX_CPU_FEATURES + 1)
                .frame(K::Setup),
            "Setup cpu feature count",
            MAX_CPU_FEATURES,
        ),
        (
            device_data(0, MAX_DEVICE_CHUNK + 1, &[]).frame(K::DeviceData),
            "DeviceData length",
            MAX_DEVICE_CHUNK,
        ),
        (
            setup_with_devices(&[])
                .truncate(5)
                .u32(MAX_DEVICES + 1)
                .frame(K::Setup),
            "Setup device count",
            MAX_DEVICES,
        ),
    ];
    for (bytes, what, limit) in cases {
        let e = err(&bytes);
        assert!(
            matches!(e, ProtoError::TooMany { what: w, count, max } if w == what && count > max && max == u64::from(limit)),
            "{what}: {e}"
        );
        assert!(e.to_string().contains(&limit.to_string()), "{e}");
    }
}

#[test]
fn strings_over_max_string() {
    let long = "y".repeat(MAX_STRING as usize + 1);
    for (bytes, what) in [
        (Body::new().str(&long).frame(K::Refuse), "Refuse reason"),
        (Body::new().str(&long).frame(K::Error), "Error reason"),
        (
            setup_with_devices(&[(&long, &[])]).frame(K::Setup),
            "Setup device name",
        ),
    ] {
        let e = err(&bytes);
        assert!(
            matches!(e, ProtoError::StringTooLong { what: w, len: 4097, max: 4096 } if w == what),
            "{what}: {e}"
        );
        assert_eq!(
            e.to_string(),
            format!("{what}: string of 4097 bytes exceeds the limit of 4096")
        );
    }
}

#[test]
fn trailing_bytes() {
    let e = err(&Body::new().u8(0).frame(K::Go));
    assert!(
        matches!(
            e,
            ProtoError::TrailingBytes {
                kind: K::Go,
                extra: 1
            }
        ),
        "{e}"
    );
    let e = err(&hello_body().u32(0).frame(K::Hello));
    assert!(
        matches!(
            e,
            ProtoError::TrailingBytes {
                kind: K::Hello,
                extra: 4
            }
        ),
        "{e}"
    );
    let e = err(&runs_body(0, &[(0, 1)]).u32(0).u8(9).frame(K::Pages));
    assert!(
        matches!(
            e,
            ProtoError::TrailingBytes {
                kind: K::Pages,
                extra: 1
            }
        ),
        "{e}"
    );
    let e = err(&Body::new().u64(1).u64(2).frame(K::Running));
    assert!(
        matches!(
            e,
            ProtoError::TrailingBytes {
                kind: K::Running,
                extra: 8
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "Running frame: 8 unexpected bytes after the last field"
    );
}

#[test]
fn bad_utf8() {
    let bad = [b'o', b'k', 0xff, 0xfe];
    for (bytes, what) in [
        (
            Body::new().u32(4).bytes(&bad).frame(K::Refuse),
            "Refuse reason",
        ),
        (
            Body::new().u32(4).bytes(&bad).frame(K::Error),
            "Error reason",
        ),
        (
            setup_with_devices(&[])
                .truncate(5)
                .u32(1)
                .u32(4)
                .bytes(&bad)
                .u32(0)
                .u8(1)
                .frame(K::Setup),
            "Setup device name",
        ),
        // A code point cut in half.
        (
            Body::new().u32(1).bytes(&[0xc3]).frame(K::Error),
            "Error reason",
        ),
    ] {
        let e = err(&bytes);
        assert!(
            matches!(e, ProtoError::BadUtf8 { what: w } if w == what),
            "{what}: {e}"
        );
    }
}

fn assert_invalid(bytes: &[u8], what: &str, needle: &str) {
    let e = err(bytes);
    assert!(
        matches!(&e, ProtoError::Invalid { what: w, .. } if *w == what),
        "expected Invalid {what}, got {e}"
    );
    assert!(
        e.to_string().contains(needle),
        "{e:?} should mention {needle}"
    );
}

#[test]
fn misaligned_gpa() {
    assert_invalid(
        &runs_body(0, &[(0x1001, 1)]).u32(0).frame(K::Pages),
        "Pages run",
        "0x1001",
    );
    assert_invalid(
        &runs_body(0, &[(0, 1), (0x800, 2)]).frame(K::ZeroPages),
        "ZeroPages run",
        "0x800",
    );
    assert_invalid(
        &setup_body(1, 4096, &[(0x10, 4096)], 0).frame(K::Setup),
        "Setup region",
        "0x10",
    );
    assert_invalid(
        &setup_body(1, 4096, &[(0, 4096), (0x10000, 0x1800)], 0).frame(K::Setup),
        "Setup region",
        "0x1800",
    );
}

#[test]
fn zero_pages_and_empty_lists() {
    assert_invalid(
        &runs_body(0, &[(0x3000, 0)]).u32(0).frame(K::Pages),
        "Pages run",
        "0 pages",
    );
    assert_invalid(
        &runs_body(0, &[(0, 1), (0x3000, 0)]).frame(K::ZeroPages),
        "ZeroPages run",
        "0 pages",
    );
    assert_invalid(
        &runs_body(0, &[]).u32(0).frame(K::Pages),
        "Pages runs",
        "no runs",
    );
    assert_invalid(
        &runs_body(0, &[]).frame(K::ZeroPages),
        "ZeroPages runs",
        "no runs",
    );
    assert_invalid(
        &setup_body(1, 4096, &[(0x4000, 0)], 0).frame(K::Setup),
        "Setup region",
        "size 0",
    );
    assert_invalid(
        &setup_body(1, 4096, &[], 0).frame(K::Setup),
        "Setup regions",
        "no memory regions",
    );
}

#[test]
fn address_overflow() {
    let top = 0xffff_ffff_ffff_f000u64;
    assert_invalid(
        &runs_body(0, &[(top, 1)]).u32(0).frame(K::Pages),
        "Pages run",
        "overflows",
    );
    assert_invalid(
        &runs_body(0, &[(top - 0xf000, 17)]).u32(0).frame(K::Pages),
        "Pages run",
        "overflows",
    );
    assert_invalid(
        &runs_body(0, &[(top - 0x1000, 2)]).frame(K::ZeroPages),
        "ZeroPages run",
        "overflows",
    );
    assert_invalid(
        &setup_body(1, 4096, &[(top, 0x2000)], 0).frame(K::Setup),
        "Setup region",
        "overflows",
    );
    // One page below the top is fine.
    assert!(read(&runs_body(0, &[(top - 0x1000, 1)]).frame(K::ZeroPages)).is_ok());
}

#[test]
fn too_many_pages() {
    let e = err(&runs_body(0, &[(0, 200), (0x100_0000, 100)])
        .u32(0)
        .frame(K::Pages));
    assert!(
        matches!(
            e,
            ProtoError::TooMany {
                what: "Pages frame page count",
                count: 300,
                max: 256
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "Pages frame page count: 300 exceeds the limit of 256"
    );
    // Huge page counts in runs of their own are too many, not an overflow.
    let e = err(&runs_body(0, &[(0, u32::MAX), (0, u32::MAX)])
        .u32(0)
        .frame(K::Pages));
    assert!(matches!(e, ProtoError::TooMany { .. }), "{e}");
    // Exactly the limit is fine, and ZeroPages has no page limit.
    assert!(read(
        &runs_body(0, &[(0, 255), (0x100_0000, 1)])
            .u32(0)
            .frame(K::Pages)
    )
    .is_ok());
    assert!(read(&runs_body(0, &[(0, 1 << 20), (1 << 40, 1 << 20)]).frame(K::ZeroPages)).is_ok());
}

#[test]
fn setup_rules() {
    assert_invalid(
        &setup_body(0, 4096, &[(0, 4096)], 0).frame(K::Setup),
        "Setup vcpus",
        "0 vCPUs",
    );
    assert_invalid(
        &setup_body(1, 65536, &[(0, 4096)], 0).frame(K::Setup),
        "Setup page_size",
        "65536",
    );
    // Timeouts of 0 ms: a deadline that has passed before anything started.
    let mut zero = setup_body(1, 4096, &[(0, 4096)], 0).frame(K::Setup);
    let n = zero.len();
    // The timeouts, before the (empty) device list and its flag.
    zero[n - 13..n - 5].fill(0);
    assert_invalid(&zero, "Setup timeouts", "at least 1 ms");
    // At the limits it decodes.
    let regions: Vec<(u64, u64)> = (0..MAX_REGIONS as u64).map(|i| (i << 20, 4096)).collect();
    assert!(read(&setup_body(1, 4096, &regions, MAX_CPU_FEATURES).frame(K::Setup)).is_ok());
}

#[test]
fn device_rules() {
    assert_invalid(
        &setup_with_devices(&[("a", &[]), ("", &[])]).frame(K::Setup),
        "Setup device name",
        "device 1",
    );
    assert_invalid(
        &setup_with_devices(&[("vcpu0", &[]), ("vcpu0", &[1])]).frame(K::Setup),
        "Setup device name",
        "twice",
    );
    assert_invalid(
        &device_data(0x80, 0, &[]).frame(K::DeviceData),
        "DeviceData flags",
        "0x80",
    );
    // Many devices are fine up to the limit, and a full chunk decodes.
    let names: Vec<String> = (0..MAX_DEVICES).map(|i| format!("d{i}")).collect();
    let list: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
    match read(&setup_with_devices(&list).frame(K::Setup)).unwrap() {
        Message::Setup(s) => assert_eq!(s.devices.len(), MAX_DEVICES as usize),
        m => panic!("{m:?}"),
    }
    let full = vec![7u8; MAX_DEVICE_CHUNK as usize];
    match read(&device_data(DEVICE_END, MAX_DEVICE_CHUNK, &full).frame(K::DeviceData)).unwrap() {
        Message::DeviceData { data, flags, .. } => {
            assert_eq!((data.len(), flags), (full.len(), DEVICE_END))
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn fixed_bodies_too_short() {
    for (kind, what) in [
        (K::Welcome, "Welcome version"),
        (K::PassEnd, "PassEnd pass"),
        (K::Complete, "Complete final_pass"),
        (K::Prepared, "Prepared prepare_us"),
        (K::Loaded, "Loaded load_us"),
        (K::Running, "Running resume_us"),
        (K::Hello, "Hello magic"),
    ] {
        let e = err(&Body::new().u8(1).frame(kind));
        assert!(
            matches!(e, ProtoError::Truncated { what: w, available: 1, .. } if w == what),
            "{kind}: {e}"
        );
    }
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "oversized")]
fn encoding_oversized_input_asserts_in_debug() {
    let m = Message::Error {
        reason: "z".repeat(MAX_STRING as usize + 1),
    };
    m.encode(&mut Vec::new());
}

#[cfg(not(debug_assertions))]
#[test]
fn encoding_oversized_input_is_rejected_by_the_peer_in_release() {
    let m = Message::Error {
        reason: "z".repeat(MAX_STRING as usize + 1),
    };
    assert!(matches!(
        m.validate(),
        Err(ProtoError::StringTooLong { .. })
    ));
    let e = err(&encode(&m));
    assert!(matches!(e, ProtoError::StringTooLong { .. }), "{e}");
    let runs: Vec<PageRun> = (0..300)
        .map(|i| PageRun {
            gpa: i << 12,
            pages: 1,
        })
        .collect();
    let mut out = Vec::new();
    encode_pages_header(0, &runs, &[], false, &mut out);
    assert!(matches!(err(&out), ProtoError::TooMany { .. }));
}

#[test]
fn validate_reports_oversized_messages() {
    let runs: Vec<PageRun> = (0..300)
        .map(|i| PageRun {
            gpa: i << 12,
            pages: 1,
        })
        .collect();
    let m = Message::Pages {
        pass: 0,
        runs,
        sums: vec![],
    };
    assert!(matches!(m.validate(), Err(ProtoError::TooMany { .. })));
    // Every device config within its limit, but together past the control frame limit.
    let devices = (0..300)
        .map(|i| DeviceInfo {
            name: format!("d{i}"),
            config: vec![0; MAX_STRING as usize],
        })
        .collect();
    let big = Message::Setup(Setup {
        vm: VmDescription {
            vcpus: 1,
            page_size: 4096,
            regions: vec![MemRegion { gpa: 0, size: 4096 }],
            cpu_features: vec![],
        },
        timeouts: Timeouts {
            progress_ms: 1,
            switchover_ms: 1,
        },
        devices,
        parallel_devices: true,
    });
    assert!(matches!(
        big.validate(),
        Err(ProtoError::TooLong { kind: K::Setup, .. })
    ));
    let big = Message::DeviceData {
        device: 0,
        seq: 0,
        flags: 0,
        data: vec![0; MAX_DEVICE_CHUNK as usize + 1],
    };
    assert!(matches!(big.validate(), Err(ProtoError::TooMany { .. })));
}

#[test]
fn local_memory_rules() {
    // Unknown flag bits.
    let mut body = Vec::new();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    let e = decode_body(K::LocalMemory, &body).unwrap_err();
    assert!(e.to_string().contains("unknown bits"), "{e}");
    // A count beyond the limit is refused before reading (or allocating) offsets.
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&(MAX_REGIONS + 1).to_le_bytes());
    let e = decode_body(K::LocalMemory, &body).unwrap_err();
    assert!(matches!(e, ProtoError::TooMany { .. }), "{e}");
    // No offsets, or a misaligned one.
    for offsets in [vec![], vec![0x1001]] {
        let m = Message::LocalMemory {
            locked: false,
            offsets,
        };
        assert!(
            matches!(m.validate(), Err(ProtoError::Invalid { .. })),
            "{m:?}"
        );
    }
}

#[test]
fn placed_bitmaps_are_checked_before_allocating() {
    let body = |first: u64, last: u8, count: u32, words: usize| {
        let mut b = Vec::new();
        b.extend_from_slice(&first.to_le_bytes());
        b.push(last);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend(std::iter::repeat_n(0xFFu8, words * 8));
        b
    };
    let ok = decode_body(K::Placed, &body(128, 1, 2, 2)).unwrap();
    assert!(
        matches!(ok, Message::Placed { first_page: 128, last: true, ref words } if words.len() == 2)
    );
    // A count beyond the limit, or beyond the bytes there: refused before reading words.
    let e = decode_body(K::Placed, &body(0, 0, MAX_PLACED_WORDS + 1, 0)).unwrap_err();
    assert!(matches!(e, ProtoError::TooMany { .. }), "{e}");
    let e = decode_body(K::Placed, &body(0, 0, 1000, 1)).unwrap_err();
    assert!(matches!(e, ProtoError::Truncated { .. }), "{e}");
    // A first page that does not start a word, a flag that is not 0 or 1.
    let e = decode_body(K::Placed, &body(65, 0, 1, 1)).unwrap_err();
    assert!(e.to_string().contains("multiple of 64"), "{e}");
    let e = decode_body(K::Placed, &body(0, 2, 1, 1)).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Invalid {
                what: "Placed last",
                ..
            }
        ),
        "{e}"
    );
}
