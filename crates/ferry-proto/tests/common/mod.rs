//! Shared helpers for the ferry-proto tests: sample messages and a builder
//! for hand-made (usually broken) frames.
#![allow(dead_code)] // each test binary uses a different subset

use ferry_proto::*;

/// At least one message of every kind, with edge values where they matter.
pub fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            version: VERSION,
            capabilities: caps::ALL,
            session: 0x0123_4567_89ab_cdef,
            role: ChannelRole::Main,
            data_channels: 4,
        }),
        Message::Hello(Hello {
            version: VERSION,
            capabilities: caps::ZERO_RUNS,
            session: u64::MAX,
            role: ChannelRole::Data { index: 3 },
            data_channels: 4,
        }),
        Message::Hello(Hello {
            version: VERSION,
            capabilities: caps::POSTCOPY,
            session: 2,
            role: ChannelRole::Urgent,
            data_channels: 2,
        }),
        Message::Discard {
            early: true,
            runs: vec![
                PageRun {
                    gpa: 0,
                    pages: u32::MAX,
                },
                PageRun {
                    gpa: 0x1_0000_0000,
                    pages: 3,
                },
            ],
        },
        Message::Discarded { discard_us: 12 },
        Message::Postcopy { pass: 3 },
        Message::PageRequest {
            seq: 9,
            runs: vec![PageRun {
                gpa: 0x5000,
                pages: MAX_BATCH_PAGES,
            }],
        },
        Message::Placed {
            first_page: 0,
            last: false,
            words: vec![u64::MAX; MAX_PLACED_WORDS as usize],
        },
        Message::Placed {
            first_page: 64 << 20,
            last: true,
            words: vec![],
        },
        Message::PostcopyDone {
            faults: 80,
            requested: 77,
            p50_us: 120,
            p99_us: 900,
            max_us: 1500,
        },
        // A future version must still decode so the engine can refuse it.
        Message::Hello(Hello {
            version: 99,
            capabilities: u64::MAX,
            session: 1,
            role: ChannelRole::Data { index: u16::MAX },
            data_channels: u16::MAX,
        }),
        Message::Welcome {
            version: VERSION,
            capabilities: caps::SWITCHOVER_ACK,
        },
        Message::Setup(Setup {
            timeouts: Timeouts {
                progress_ms: 30_000,
                switchover_ms: 2_000,
            },
            vm: VmDescription {
                vcpus: 4,
                page_size: 4096,
                regions: vec![
                    MemRegion {
                        gpa: 0,
                        size: 0xc000_0000,
                    },
                    MemRegion {
                        gpa: 0x1_0000_0000,
                        size: 0x4000_0000,
                    },
                    // Ends exactly at the top of the address space minus a page.
                    MemRegion {
                        gpa: 0xffff_ffff_ffff_e000,
                        size: 0x1000,
                    },
                ],
                cpu_features: vec![
                    CpuFeature {
                        leaf: 0,
                        subleaf: 0,
                        regs: [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
                    },
                    CpuFeature {
                        leaf: 7,
                        subleaf: 1,
                        regs: [1, 2, 3, u32::MAX],
                    },
                ],
            },
            devices: vec![
                DeviceInfo {
                    name: "vcpu0".into(),
                    config: vec![],
                },
                DeviceInfo {
                    name: "testdev1 «é»".into(),
                    config: (0..=255).collect(),
                },
            ],
            parallel_devices: true,
        }),
        Message::Setup(Setup {
            timeouts: Timeouts {
                progress_ms: 1,
                switchover_ms: u32::MAX,
            },
            vm: VmDescription {
                vcpus: 1,
                page_size: 4096,
                regions: vec![MemRegion {
                    gpa: 0x10_0000,
                    size: 0x1000,
                }],
                cpu_features: vec![],
            },
            devices: vec![],
            parallel_devices: false,
        }),
        Message::SetupAccepted,
        Message::Refuse {
            reason: "version 2 is not supported – «ünïcödé» ✓".into(),
        },
        Message::Refuse {
            reason: "x".repeat(MAX_STRING as usize),
        },
        Message::Pages {
            pass: 0,
            runs: vec![
                PageRun { gpa: 0, pages: 3 },
                PageRun {
                    gpa: 0x7_0000,
                    pages: 5,
                },
            ],
            sums: vec![],
        },
        Message::Pages {
            pass: 7,
            runs: vec![PageRun {
                gpa: 0x1000,
                pages: MAX_BATCH_PAGES,
            }],
            sums: (0..u64::from(MAX_BATCH_PAGES)).collect(),
        },
        Message::Pages {
            pass: u32::MAX,
            runs: (0..MAX_BATCH_PAGES as u64)
                .map(|i| PageRun {
                    gpa: i * 2 * PAGE_SIZE,
                    pages: 1,
                })
                .collect(),
            sums: vec![u64::MAX; MAX_BATCH_PAGES as usize],
        },
        Message::Compressed {
            pass: 4,
            runs: vec![PageRun {
                gpa: 0x8000,
                pages: 2,
            }],
            codec: Codec::Zstd,
            sums: vec![1, 2],
            len: 100,
        },
        Message::Compressed {
            pass: 5,
            runs: vec![PageRun {
                gpa: 0,
                pages: MAX_BATCH_PAGES,
            }],
            codec: Codec::Lz4,
            sums: vec![],
            len: MAX_BATCH_PAGES * PAGE_SIZE as u32 - 1,
        },
        Message::ZeroPages {
            pass: 1,
            runs: vec![
                PageRun {
                    gpa: 0x2000,
                    pages: u32::MAX,
                },
                // The highest run that does not overflow.
                PageRun {
                    gpa: 0xffff_ffff_ffff_e000,
                    pages: 1,
                },
            ],
        },
        Message::ZeroPages {
            pass: 2,
            runs: (0..MAX_RUNS as u64)
                .map(|i| PageRun {
                    gpa: i * PAGE_SIZE,
                    pages: 1,
                })
                .collect(),
        },
        Message::PassEnd {
            pass: 3,
            pages: 1 << 40,
        },
        Message::Ack {
            passes: 0,
            bytes: 0,
        },
        Message::Ack {
            passes: u32::MAX,
            bytes: u64::MAX,
        },
        Message::Ping { nonce: 0 },
        Message::Pong { nonce: u64::MAX },
        Message::LocalMemory {
            locked: true,
            offsets: vec![0, 0xc000_0000],
        },
        Message::LocalMemory {
            locked: false,
            offsets: vec![0x1000; MAX_REGIONS as usize],
        },
        Message::MemoryAdopted { adopt_us: 12 },
        Message::DeviceData {
            device: 0,
            seq: 0,
            flags: DEVICE_INITIAL_END,
            data: vec![],
        },
        Message::DeviceData {
            device: u16::MAX,
            seq: u32::MAX,
            flags: DEVICE_INITIAL_END | DEVICE_END,
            data: (0..=255).collect(),
        },
        Message::DeviceData {
            device: 7,
            seq: 3,
            flags: 0,
            data: vec![0xA5; MAX_DEVICE_CHUNK as usize],
        },
        Message::DevicesReady,
        Message::Complete { final_pass: 9 },
        Message::Prepared {
            prepare_us: 123_456,
            threads: 8,
        },
        Message::Loaded { load_us: 42 },
        Message::Go,
        Message::Running { resume_us: 7 },
        Message::Error {
            reason: String::new(),
        },
        Message::Error {
            reason: "destination ran out of memory".into(),
        },
    ]
}

/// The frame of `m` (header and body).
pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out);
    out
}

/// The frame of `m` followed by its payload (a recognisable byte pattern).
pub fn encode_with_payload(m: &Message) -> Vec<u8> {
    let mut out = encode(m);
    out.extend(payload(m.payload_len()));
    out
}

pub fn payload(len: u64) -> impl Iterator<Item = u8> {
    (0..len).map(|i| (i % 251) as u8)
}

/// Reads one message from `bytes` with a fresh scratch buffer.
pub fn read(bytes: &[u8]) -> Result<Message, ProtoError> {
    read_message(&mut &bytes[..], &mut Vec::new())
}

/// Builder for hand-made bodies.
#[derive(Default, Clone)]
pub struct Body(pub Vec<u8>);

impl Body {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Drops the last `n` bytes.
    pub fn truncate(mut self, n: usize) -> Self {
        let len = self.0.len().saturating_sub(n);
        self.0.truncate(len);
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(self, s: &str) -> Self {
        self.u32(s.len() as u32).bytes(s.as_bytes())
    }
    /// Header with the right body length, then the body.
    pub fn frame(self, kind: MessageKind) -> Vec<u8> {
        frame(kind as u16, 0, self.0.len() as u32, &self.0)
    }
}

/// Raw frame: any kind, flags and claimed length, then `body`.
pub fn frame(kind: u16, flags: u16, body_len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A valid Hello body (for tests that break one field of it).
pub fn hello_body() -> Body {
    Body::new()
        .bytes(&MAGIC)
        .u32(VERSION)
        .u64(caps::ALL)
        .u64(5)
        .u8(0)
        .u16(0)
        .u16(2)
}

/// A Pages/ZeroPages body with these (gpa, pages) runs.
pub fn runs_body(pass: u32, runs: &[(u64, u32)]) -> Body {
    let mut b = Body::new().u32(pass).u32(runs.len() as u32);
    for &(gpa, pages) in runs {
        b = b.u64(gpa).u32(pages);
    }
    b
}

/// A Setup body with these regions and `features` zeroed CPUID entries.
pub fn setup_body(vcpus: u32, page_size: u32, regions: &[(u64, u64)], features: u32) -> Body {
    let mut b = Body::new()
        .u32(vcpus)
        .u32(page_size)
        .u32(regions.len() as u32);
    for &(gpa, size) in regions {
        b = b.u64(gpa).u64(size);
    }
    b = b.u32(features);
    for i in 0..features {
        b = b.u32(i).u32(0).u32(1).u32(2).u32(3).u32(4);
    }
    // Timeouts: progress 30 s, switchover 2 s; no device; parallel loading.
    b.u32(30_000).u32(2_000).u32(0).u8(1)
}

/// A Setup body (one region, no feature) with these devices.
pub fn setup_with_devices(devices: &[(&str, &[u8])]) -> Body {
    let mut b = Body::new()
        .u32(1)
        .u32(4096)
        .u32(1)
        .u64(0)
        .u64(4096)
        .u32(0)
        .u32(30_000)
        .u32(2_000)
        .u32(devices.len() as u32);
    for (name, config) in devices {
        b = b.str(name).u32(config.len() as u32).bytes(config);
    }
    b.u8(1)
}

/// A DeviceData body: device, seq, flags, then `len` as the data length and `data`.
pub fn device_data(flags: u8, len: u32, data: &[u8]) -> Body {
    Body::new().u16(0).u32(0).u8(flags).u32(len).bytes(data)
}
