//! Summed frames: every frame round-trips with its checksum, any flipped bit of a summed
//! frame is caught, and once checksums are required a frame without one is refused.

mod common;

use common::samples;
use ferry_proto::*;

fn summed(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode_with(&mut out, true);
    out
}

#[test]
fn every_kind_round_trips_summed_and_required() {
    for m in samples() {
        let bytes = summed(&m);
        let mut r = &bytes[..];
        let got = read_message_checked(&mut r, &mut Vec::new(), true).unwrap();
        assert_eq!(got, m);
        assert!(r.is_empty(), "{}: checksum bytes left unread", m.name());
        // An unrequiring reader verifies it too.
        assert_eq!(read_message(&mut &bytes[..], &mut Vec::new()).unwrap(), m);
    }
}

#[test]
fn every_flipped_bit_of_a_summed_frame_is_an_error() {
    let m = Message::Ack {
        passes: 3,
        bytes: 0x1234_5678,
    };
    let bytes = summed(&m);
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let r = read_message_checked(&mut &b[..], &mut Vec::new(), true);
        assert!(r.is_err(), "bit {bit} flipped went unnoticed: {r:?}");
    }
}

#[test]
fn a_corrupted_body_is_named_bad_sum() {
    let m = Message::PassEnd { pass: 9, pages: 77 };
    let mut b = summed(&m);
    b[FRAME_HEADER_LEN] ^= 0x40;
    let e = read_message_checked(&mut &b[..], &mut Vec::new(), true).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::BadSum {
                kind: MessageKind::PassEnd
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("corrupted"), "{e}");
}

#[test]
fn an_unsummed_frame_is_refused_once_sums_are_required() {
    let mut b = Vec::new();
    Message::Go.encode(&mut b);
    let e = read_message_checked(&mut &b[..], &mut Vec::new(), true).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::MissingSum {
                kind: MessageKind::Go
            }
        ),
        "{e}"
    );
    assert_eq!(
        read_message_checked(&mut &b[..], &mut Vec::new(), false).unwrap(),
        Message::Go
    );
}

#[test]
fn hot_path_encoders_match_the_messages() {
    let runs = vec![PageRun {
        gpa: 0x3000,
        pages: 2,
    }];
    for sum in [false, true] {
        let mut a = Vec::new();
        encode_pages_header(4, &runs, &[5, 6], sum, &mut a);
        let mut b = Vec::new();
        Message::Pages {
            pass: 4,
            runs: runs.clone(),
            sums: vec![5, 6],
        }
        .encode_with(&mut b, sum);
        assert_eq!(a, b);
        let mut a = Vec::new();
        encode_compressed_header(4, &runs, Codec::Lz4, &[], 10, sum, &mut a);
        let mut b = Vec::new();
        Message::Compressed {
            pass: 4,
            runs: runs.clone(),
            codec: Codec::Lz4,
            sums: vec![],
            len: 10,
        }
        .encode_with(&mut b, sum);
        assert_eq!(a, b);
        let mut a = Vec::new();
        encode_zero_header(1, &runs, sum, &mut a);
        let mut b = Vec::new();
        Message::ZeroPages {
            pass: 1,
            runs: runs.clone(),
        }
        .encode_with(&mut b, sum);
        assert_eq!(a, b);
    }
}

#[test]
fn page_and_compressed_rules_are_enforced() {
    let runs = vec![PageRun { gpa: 0, pages: 2 }];
    let wrong_sums = Message::Pages {
        pass: 0,
        runs: runs.clone(),
        sums: vec![1],
    };
    assert!(wrong_sums
        .validate()
        .unwrap_err()
        .to_string()
        .contains("1 checksums for 2 pages"));
    for len in [0, 2 * PAGE_SIZE as u32, u32::MAX] {
        let m = Message::Compressed {
            pass: 0,
            runs: runs.clone(),
            codec: Codec::Zstd,
            sums: vec![],
            len,
        };
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("Compressed len"), "{len}: {e}");
    }
    // An unknown codec byte is named.
    let mut b = Vec::new();
    Message::Compressed {
        pass: 0,
        runs,
        codec: Codec::Zstd,
        sums: vec![],
        len: 5,
    }
    .encode(&mut b);
    let codec_at = FRAME_HEADER_LEN + 4 + 4 + 12;
    b[codec_at] = 9;
    let e = read_message(&mut &b[..], &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown codec 9"), "{e}");
}
