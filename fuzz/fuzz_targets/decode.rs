//! Feeds arbitrary bytes to the ferry-proto decoder: as a stream of frames
//! through `read_message` (summed or not), and as a body of every kind through
//! `decode_body`. Nothing may panic, and whatever decodes must re-encode to
//! the exact bytes it was read from (the encoding is canonical).
#![no_main]

use ferry_proto::{decode_body, read_message, MessageKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut scratch = Vec::new();
    loop {
        let before = r;
        let Ok(msg) = read_message(&mut r, &mut scratch) else {
            break;
        };
        let consumed = &before[..before.len() - r.len()];
        // A summed frame (flag bit 0) re-encodes with its checksum.
        let summed = consumed.get(2).is_some_and(|f| f & 1 != 0);
        let mut again = Vec::new();
        msg.encode_with(&mut again, summed);
        assert_eq!(again, consumed, "non-canonical round trip of {msg:?}");
        assert!(msg.validate().is_ok());
        // Skip the Pages payload, as a receiver would read it into memory.
        let skip = usize::try_from(msg.payload_len())
            .unwrap_or(usize::MAX)
            .min(r.len());
        r = &r[skip..];
    }
    for kind in MessageKind::ALL {
        if let Ok(msg) = decode_body(kind, data) {
            assert_eq!(msg.kind(), kind);
        }
    }
});
