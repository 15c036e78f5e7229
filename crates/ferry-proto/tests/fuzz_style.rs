//! Deterministic fuzzing on stable: 200,000 random and mutated inputs fed
//! to `read_message` (and every kind's `decode_body`); nothing may panic,
//! and whatever decodes must re-encode to the exact bytes it came from.

mod common;

use common::*;
use ferry_proto::*;

/// xorshift64*: tiny, deterministic, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

const ITERATIONS: usize = 200_000;

/// Interesting values to plant in length and count fields.
const MAGIC_U32: [u32; 10] = [
    0,
    1,
    255,
    256,
    257,
    4096,
    4097,
    MAX_CONTROL_LEN,
    MAX_DEVICE_CHUNK,
    u32::MAX,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if input.is_empty() {
            input.push(rng.byte());
            continue;
        }
        let at = rng.below(input.len());
        match rng.below(7) {
            0 => input[at] ^= 1 << rng.below(8),
            1 => input[at] = rng.byte(),
            2 => input.insert(at, rng.byte()),
            3 => {
                input.remove(at);
            }
            4 => input.truncate(at),
            5 => {
                // Plant a boundary value in a u32 field (or anywhere).
                let v = MAGIC_U32[rng.below(MAGIC_U32.len())].to_le_bytes();
                for (i, b) in v.iter().enumerate() {
                    if let Some(slot) = input.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            _ => {
                // Fix up body_len after a size change, so mutations reach the body decoder.
                if input.len() >= FRAME_HEADER_LEN {
                    let len = (input.len() - FRAME_HEADER_LEN) as u32;
                    input[4..8].copy_from_slice(&len.to_le_bytes());
                }
            }
        }
    }
}

/// Reads frames until the first error, checking every decoded frame.
fn drive(input: &[u8], scratch: &mut Vec<u8>) -> usize {
    let mut r = input;
    let mut decoded = 0;
    loop {
        let before = r;
        match read_message(&mut r, scratch) {
            Ok(m) => {
                decoded += 1;
                let consumed = before.len() - r.len();
                // Canonical encoding: a decoded frame re-encodes to its bytes.
                assert_eq!(encode(&m), &before[..consumed], "{m:?}");
                assert!(m.validate().is_ok());
                let skip = usize::try_from(m.payload_len()).unwrap().min(r.len());
                r = &r[skip..];
            }
            Err(_) => return decoded,
        }
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut msgs = samples();
    msgs.push(Message::Pages {
        pass: 1,
        runs: vec![PageRun {
            gpa: 0x5000,
            pages: 1,
        }],
        sums: vec![7],
    });
    let seeds: Vec<Vec<u8>> = msgs
        .iter()
        .map(encode_with_payload)
        // Keep seeds small so the test stays fast in debug builds.
        .filter(|s| s.len() <= 4096 + 64)
        .collect();
    assert!(seeds.len() >= 15, "{}", seeds.len());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut scratch = Vec::new();
    let mut input = Vec::new();
    let mut decoded = 0usize;
    for _ in 0..ITERATIONS {
        input.clear();
        match rng.below(4) {
            // Pure noise.
            0 => input.extend((0..rng.below(64)).map(|_| rng.byte())),
            // A valid header of a random kind over a random body.
            1 => {
                let kind = 1 + rng.below(15) as u16;
                let body: Vec<u8> = (0..rng.below(48)).map(|_| rng.byte()).collect();
                input.extend(frame(kind, 0, body.len() as u32, &body));
            }
            // A mutated valid frame.
            2 => {
                input.extend_from_slice(&seeds[rng.below(seeds.len())]);
                mutate(&mut rng, &mut input);
            }
            // Several valid frames, then mutations anywhere in the stream.
            _ => {
                for _ in 0..2 + rng.below(3) {
                    input.extend_from_slice(&seeds[rng.below(seeds.len())]);
                }
                if rng.below(4) != 0 {
                    mutate(&mut rng, &mut input);
                }
            }
        }
        decoded += drive(&input, &mut scratch);
        if let Some(body) = input.get(FRAME_HEADER_LEN..) {
            for kind in MessageKind::ALL {
                if let Ok(m) = decode_body(kind, body) {
                    assert_eq!(m.kind(), kind);
                }
            }
        }
    }
    // The generator must reach the decoders' success paths, not just the
    // header checks.
    assert!(decoded > ITERATIONS / 4, "only {decoded} frames decoded");
}
