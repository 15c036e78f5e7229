//! Every strict prefix of every valid frame fails cleanly: Eof for the empty
//! prefix, Truncated otherwise, never a panic or another error.

mod common;

use common::*;
use ferry_proto::*;

#[test]
fn every_strict_prefix_of_every_frame_is_truncated() {
    let mut scratch = Vec::new();
    for m in samples() {
        let bytes = encode(&m);
        for len in 0..bytes.len() {
            let res = read_message(&mut &bytes[..len], &mut scratch);
            match (len, res) {
                (0, Err(ProtoError::Eof)) => {}
                (
                    1..,
                    Err(ProtoError::Truncated {
                        needed, available, ..
                    }),
                ) => {
                    assert!(needed > available, "{}: {needed} <= {available}", m.name())
                }
                (_, other) => panic!("{} prefix of {len}/{}: {other:?}", m.name(), bytes.len()),
            }
        }
    }
}

#[test]
fn every_strict_prefix_of_every_body_is_truncated() {
    for m in samples() {
        let bytes = encode(&m);
        let body = &bytes[FRAME_HEADER_LEN..];
        for len in 0..body.len() {
            match decode_body(m.kind(), &body[..len]) {
                Err(ProtoError::Truncated { .. }) => {}
                other => panic!(
                    "{} body prefix of {len}/{}: {other:?}",
                    m.name(),
                    body.len()
                ),
            }
        }
    }
}

#[test]
fn header_truncation_names_the_header() {
    let bytes = encode(&Message::Go);
    let e = read(&bytes[..5]).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Truncated {
                what: "frame header",
                needed: 8,
                available: 5
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "truncated frame header: 8 bytes needed, only 5 available"
    );
}

#[test]
fn body_truncation_names_the_kind() {
    let bytes = encode(&Message::Prepared {
        prepare_us: 1,
        threads: 2,
    });
    let e = read(&bytes[..bytes.len() - 3]).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Truncated {
                what: "Prepared frame body",
                needed: 12,
                available: 9
            }
        ),
        "{e}"
    );
}

#[test]
fn pages_payload_is_not_read_by_the_decoder() {
    // A Pages frame with its payload missing decodes: the payload is the
    // caller's to read.
    let m = Message::Pages {
        pass: 1,
        runs: vec![PageRun { gpa: 0, pages: 2 }],
        sums: vec![],
    };
    assert_eq!(read(&encode(&m)).unwrap(), m);
}
