//! Encode -> read_message round trips, Pages payload handling and the
//! kind table.

mod common;

use std::io::Read;

use common::*;
use ferry_proto::*;

#[test]
fn samples_cover_every_kind() {
    let kinds: Vec<MessageKind> = samples().iter().map(Message::kind).collect();
    for k in MessageKind::ALL {
        assert!(kinds.contains(&k), "no sample of {k}");
    }
}

#[test]
fn every_sample_round_trips_alone() {
    for m in samples() {
        let bytes = encode(&m);
        assert_eq!(read(&bytes).unwrap(), m, "{}", m.name());
        // The body decodes on its own too, and is canonical.
        let body = &bytes[FRAME_HEADER_LEN..];
        assert_eq!(decode_body(m.kind(), body).unwrap(), m);
        let header = decode_header(bytes[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.kind, m.kind());
        assert_eq!(header.body_len as usize, body.len());
        assert!(m.validate().is_ok());
    }
}

#[test]
fn stream_of_all_samples_with_payloads() {
    let msgs = samples();
    let mut stream = Vec::new();
    for m in &msgs {
        stream.extend(encode_with_payload(m));
    }
    let mut r = &stream[..];
    let mut scratch = Vec::new();
    for m in &msgs {
        let got = read_message(&mut r, &mut scratch).unwrap();
        assert_eq!(&got, m);
        // The caller reads the payload itself, straight after the frame.
        let mut data = vec![0u8; usize::try_from(got.payload_len()).unwrap()];
        r.read_exact(&mut data).unwrap();
        assert!(data.iter().copied().eq(payload(got.payload_len())));
    }
    assert!(matches!(
        read_message(&mut r, &mut scratch),
        Err(ProtoError::Eof)
    ));
}

#[test]
fn payload_len_is_pages_times_page_size() {
    for m in samples() {
        let expected = match &m {
            Message::Pages { runs, .. } => {
                runs.iter().map(|r| u64::from(r.pages)).sum::<u64>() * PAGE_SIZE
            }
            Message::Compressed { len, .. } => u64::from(*len),
            _ => 0,
        };
        assert_eq!(m.payload_len(), expected, "{}", m.name());
    }
    let m = Message::Pages {
        pass: 0,
        runs: vec![
            PageRun { gpa: 0, pages: 3 },
            PageRun {
                gpa: 0x10000,
                pages: 5,
            },
        ],
        sums: vec![],
    };
    assert_eq!(m.payload_len(), 8 * 4096);
    // ZeroPages carries no payload whatever its page count.
    let z = Message::ZeroPages {
        pass: 0,
        runs: vec![PageRun {
            gpa: 0,
            pages: u32::MAX,
        }],
    };
    assert_eq!(z.payload_len(), 0);
}

#[test]
fn hot_path_encoders_match_message_encode() {
    for m in samples() {
        let mut out = vec![0xaa]; // appends, does not overwrite
        match &m {
            Message::Pages { pass, runs, sums } => {
                encode_pages_header(*pass, runs, sums, false, &mut out)
            }
            Message::ZeroPages { pass, runs } => encode_zero_header(*pass, runs, false, &mut out),
            _ => continue,
        }
        assert_eq!(out[0], 0xaa);
        assert_eq!(&out[1..], &encode(&m)[..], "{}", m.name());
    }
}

#[test]
fn encode_appends() {
    let mut out = b"prefix".to_vec();
    Message::Go.encode(&mut out);
    Message::Complete { final_pass: 1 }.encode(&mut out);
    assert_eq!(&out[..6], b"prefix");
    let mut r = &out[6..];
    let mut scratch = Vec::new();
    assert_eq!(read_message(&mut r, &mut scratch).unwrap(), Message::Go);
    assert_eq!(
        read_message(&mut r, &mut scratch).unwrap(),
        Message::Complete { final_pass: 1 }
    );
}

#[test]
fn wire_layout_is_little_endian_and_as_documented() {
    let bytes = encode(&Message::PassEnd {
        pass: 0x0102_0304,
        pages: 0x0a0b_0c0d_0e0f_1011,
    });
    assert_eq!(
        bytes,
        [
            8, 0, // kind PassEnd
            0, 0, // flags
            12, 0, 0, 0, // body_len
            4, 3, 2, 1, // pass
            0x11, 0x10, 0x0f, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, // pages
        ]
    );
    // The frozen Hello layout: magic, version, caps, session, role, index, data_channels.
    let hello = encode(&Message::Hello(Hello {
        version: 1,
        capabilities: 3,
        session: 5,
        role: ChannelRole::Data { index: 2 },
        data_channels: 4,
    }));
    let expected = frame(
        1,
        0,
        33,
        &Body::new()
            .bytes(b"FERRYMIG")
            .u32(1)
            .u64(3)
            .u64(5)
            .u8(1)
            .u16(2)
            .u16(4)
            .0,
    );
    assert_eq!(hello, expected);
}

#[test]
fn kind_table() {
    for (i, k) in MessageKind::ALL.into_iter().enumerate() {
        let v = i as u16 + 1;
        assert_eq!(k as u16, v);
        assert_eq!(MessageKind::from_u16(v), Some(k));
        assert_eq!(k.to_string(), k.name());
        // A full device chunk and its fixed fields.
        let max = if k == MessageKind::DeviceData {
            MAX_DEVICE_CHUNK + 11
        } else {
            MAX_CONTROL_LEN
        };
        assert_eq!(k.max_body_len(), max);
    }
    assert_eq!(MessageKind::from_u16(0), None);
    assert_eq!(MessageKind::from_u16(29), None);
    assert_eq!(MessageKind::from_u16(u16::MAX), None);
    let names: Vec<&str> = samples().iter().map(Message::name).collect();
    assert!(names.contains(&"Hello") && names.contains(&"Pages") && names.contains(&"Go"));
}

/// A reader that hands out one byte at a time and is interrupted in
/// between, like a slow socket under signals.
struct Trickle<'a> {
    data: &'a [u8],
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.data.len()).min(1);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn short_and_interrupted_reads_are_retried() {
    let mut stream = Vec::new();
    for m in samples() {
        stream.extend(encode(&m));
    }
    let mut r = Trickle {
        data: &stream,
        interrupt: false,
    };
    let mut scratch = Vec::new();
    for m in samples() {
        assert_eq!(read_message(&mut r, &mut scratch).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r, &mut scratch),
        Err(ProtoError::Eof)
    ));
}

#[test]
fn io_errors_are_reported_as_io() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::ConnectionReset.into())
        }
    }
    let err = read_message(&mut Broken, &mut Vec::new()).unwrap_err();
    assert!(matches!(&err, ProtoError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset));
    // And in the middle of a body.
    let bytes = encode(&Message::Complete { final_pass: 1 });
    let mut r = (&bytes[..FRAME_HEADER_LEN + 1]).chain(Broken);
    assert!(matches!(
        read_message(&mut r, &mut Vec::new()),
        Err(ProtoError::Io(_))
    ));
}

#[test]
fn validate_matches_decoder_on_semantic_errors() {
    // encode() does not check semantic rules, so the peer gets to reject.
    let bad = Message::Pages {
        pass: 0,
        runs: vec![PageRun {
            gpa: 0x1001,
            pages: 1,
        }],
        sums: vec![],
    };
    assert!(matches!(bad.validate(), Err(ProtoError::Invalid { .. })));
    assert!(matches!(
        read(&encode(&bad)),
        Err(ProtoError::Invalid {
            what: "Pages run",
            ..
        })
    ));
}

/// A reader that returns at most `chunk` bytes per call.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len()).min(self.chunk);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn large_device_body_grows_scratch_exactly() {
    let m = Message::DeviceData {
        device: 3,
        seq: 9,
        flags: DEVICE_END,
        data: (0..MAX_DEVICE_CHUNK)
            .map(|i: u32| (i % 253) as u8)
            .collect(),
    };
    let bytes = encode(&m);
    let body_len = bytes.len() - FRAME_HEADER_LEN;
    let mut scratch = Vec::new();
    let mut r = Chunked {
        data: &bytes,
        chunk: 1000,
    };
    assert_eq!(read_message(&mut r, &mut scratch).unwrap(), m);
    // Grown as the bytes came, and never past the body itself.
    assert_eq!(scratch.len(), body_len);
    assert_eq!(scratch.capacity(), body_len);
    // The scratch buffer is reused for the next frame.
    let go = encode(&Message::Go);
    assert_eq!(
        read_message(&mut &go[..], &mut scratch).unwrap(),
        Message::Go
    );
    assert!(scratch.is_empty());
}

/// Page checksums are xxh3-64 whichever implementation computes them: frames use
/// xxhash-rust, pages the runtime-dispatched one, and an older peer hashed pages with the
/// former.
#[test]
fn page_sums_are_xxh3_64() {
    let page: Vec<u8> = (0..4096u32).map(|i| (i ^ (i >> 5)) as u8).collect();
    for bytes in [&page[..], &[0u8; 4096][..], &page[..100]] {
        assert_eq!(
            ferry_proto::page_sum(bytes),
            xxhash_rust::xxh3::xxh3_64(bytes)
        );
    }
}
