//! The protocol's messages, their validation rules and their encoding.

use std::fmt;

use crate::codec::{self, len64};
use crate::{
    ProtoError, MAX_BATCH_PAGES, MAX_CONTROL_LEN, MAX_CPU_FEATURES, MAX_DEVICES, MAX_DEVICE_CHUNK,
    MAX_PLACED_WORDS, MAX_REGIONS, MAX_RUNS, MAX_STRING, PAGE_SIZE,
};

/// What a channel carries; sent in its [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRole {
    /// The control channel: handshake, setup, state and switchover.
    Main,
    /// A memory channel, numbered from 0.
    Data {
        /// Index of this data channel among the session's data channels.
        index: u16,
    },
    /// Postcopy's urgent channel: page requests from the destination and their answers,
    /// never behind bulk traffic. Opened when the source offers [`crate::caps::POSTCOPY`].
    Urgent,
}

/// First frame on every channel, source to destination.
///
/// Its layout is frozen across protocol versions so that a peer of another
/// version can still be decoded and told why it is refused; decoding does
/// not reject an unknown `version` (the engine compares versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the source speaks.
    pub version: u32,
    /// [`crate::caps`] bits the source offers.
    pub capabilities: u64,
    /// Identifies the migration, so channels of one session can be grouped.
    pub session: u64,
    /// What this channel carries.
    pub role: ChannelRole,
    /// How many data channels the session opens.
    pub data_channels: u16,
}

/// One guest memory region, in guest physical addresses.
///
/// Valid when `gpa` and `size` are page aligned, `size > 0` and
/// `gpa + size` does not overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}

/// One CPUID entry the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeature {
    /// CPUID leaf (`eax` input).
    pub leaf: u32,
    /// CPUID subleaf (`ecx` input).
    pub subleaf: u32,
    /// Output registers: `eax`, `ebx`, `ecx`, `edx`.
    pub regs: [u32; 4],
}

/// What the VM looks like; the destination builds an identical one.
///
/// Valid when `vcpus >= 1`, `page_size == 4096`, there are
/// 1..=[`MAX_REGIONS`] valid regions and at most [`MAX_CPU_FEATURES`]
/// CPUID entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDescription {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest page size in bytes; must be [`PAGE_SIZE`].
    pub page_size: u32,
    /// Guest memory layout.
    pub regions: Vec<MemRegion>,
    /// CPUID entries the guest sees.
    pub cpu_features: Vec<CpuFeature>,
}

/// The source's deadlines for this migration, announced in [`Setup`] so that
/// both sides give up on a silent peer at the same time.
///
/// Valid when both are at least 1 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest time without progress (no data acknowledged by the
    /// destination, no message from the source) before a side gives up, ms.
    pub progress_ms: u32,
    /// Longest time the source guest stays paused before the hand-over is
    /// committed (or, after `Go`, confirmed), ms.
    pub switchover_ms: u32,
}

/// What the source announces once the channels are up: the VM to build and
/// the deadlines both sides keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The VM.
    pub vm: VmDescription,
    /// The deadlines.
    pub timeouts: Timeouts,
    /// Its devices and vCPUs, in the order [`Message::DeviceData`] numbers them (at most
    /// [`MAX_DEVICES`]).
    pub devices: Vec<DeviceInfo>,
    /// Load the device streams side by side, each on its own thread (else one after
    /// another on one thread, the shape of QEMU before 10.0).
    pub parallel_devices: bool,
}

/// A run of consecutive guest pages.
///
/// Valid when `gpa` is page aligned, `pages >= 1` and
/// `gpa + pages * PAGE_SIZE` does not overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
}

/// A device (or vCPU) whose state streams in [`Message::DeviceData`] frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Non-empty name, unique in the VM, at most [`MAX_STRING`] bytes.
    pub name: String,
    /// What a destination needs to create the device (opaque, at most [`MAX_STRING`]
    /// bytes).
    pub config: Vec<u8>,
}

/// [`Message::DeviceData`] flag: this chunk ends the device's initial bytes (the
/// destination acknowledges them all with [`Message::DevicesReady`]).
pub const DEVICE_INITIAL_END: u8 = 1;
/// [`Message::DeviceData`] flag: this chunk ends the device's stream (its stop-copy state is
/// complete).
pub const DEVICE_END: u8 = 2;

/// Frame kinds, as the `u16` in the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageKind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome,
    /// [`Message::Setup`].
    Setup,
    /// [`Message::SetupAccepted`].
    SetupAccepted,
    /// [`Message::Refuse`].
    Refuse,
    /// [`Message::Pages`].
    Pages,
    /// [`Message::ZeroPages`].
    ZeroPages,
    /// [`Message::PassEnd`].
    PassEnd,
    /// [`Message::DeviceData`].
    DeviceData,
    /// [`Message::Complete`].
    Complete,
    /// [`Message::Prepared`].
    Prepared,
    /// [`Message::Loaded`].
    Loaded,
    /// [`Message::Go`].
    Go,
    /// [`Message::Running`].
    Running,
    /// [`Message::Error`].
    Error,
    /// [`Message::Ack`].
    Ack,
    /// [`Message::Ping`].
    Ping,
    /// [`Message::Pong`].
    Pong,
    /// [`Message::LocalMemory`].
    LocalMemory,
    /// [`Message::MemoryAdopted`].
    MemoryAdopted,
    /// [`Message::Compressed`].
    Compressed,
    /// [`Message::Discard`].
    Discard,
    /// [`Message::Discarded`].
    Discarded,
    /// [`Message::Postcopy`].
    Postcopy,
    /// [`Message::PageRequest`].
    PageRequest,
    /// [`Message::PostcopyDone`].
    PostcopyDone,
    /// [`Message::DevicesReady`].
    DevicesReady,
    /// [`Message::Placed`].
    Placed,
}

impl MessageKind {
    /// Every kind, in wire order.
    pub const ALL: [MessageKind; 28] = [
        MessageKind::Hello,
        MessageKind::Welcome,
        MessageKind::Setup,
        MessageKind::SetupAccepted,
        MessageKind::Refuse,
        MessageKind::Pages,
        MessageKind::ZeroPages,
        MessageKind::PassEnd,
        MessageKind::DeviceData,
        MessageKind::Complete,
        MessageKind::Prepared,
        MessageKind::Loaded,
        MessageKind::Go,
        MessageKind::Running,
        MessageKind::Error,
        MessageKind::Ack,
        MessageKind::Ping,
        MessageKind::Pong,
        MessageKind::LocalMemory,
        MessageKind::MemoryAdopted,
        MessageKind::Compressed,
        MessageKind::Discard,
        MessageKind::Discarded,
        MessageKind::Postcopy,
        MessageKind::PageRequest,
        MessageKind::PostcopyDone,
        MessageKind::DevicesReady,
        MessageKind::Placed,
    ];

    /// The kind's name, as in "unexpected Pages in state Setup".
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Hello => "Hello",
            MessageKind::Welcome => "Welcome",
            MessageKind::Setup => "Setup",
            MessageKind::SetupAccepted => "SetupAccepted",
            MessageKind::Refuse => "Refuse",
            MessageKind::Pages => "Pages",
            MessageKind::ZeroPages => "ZeroPages",
            MessageKind::PassEnd => "PassEnd",
            MessageKind::DeviceData => "DeviceData",
            MessageKind::Complete => "Complete",
            MessageKind::Prepared => "Prepared",
            MessageKind::Loaded => "Loaded",
            MessageKind::Go => "Go",
            MessageKind::Running => "Running",
            MessageKind::Error => "Error",
            MessageKind::Ack => "Ack",
            MessageKind::Ping => "Ping",
            MessageKind::Pong => "Pong",
            MessageKind::LocalMemory => "LocalMemory",
            MessageKind::MemoryAdopted => "MemoryAdopted",
            MessageKind::Compressed => "Compressed",
            MessageKind::Discard => "Discard",
            MessageKind::Discarded => "Discarded",
            MessageKind::Postcopy => "Postcopy",
            MessageKind::PageRequest => "PageRequest",
            MessageKind::PostcopyDone => "PostcopyDone",
            MessageKind::DevicesReady => "DevicesReady",
            MessageKind::Placed => "Placed",
        }
    }

    /// Largest body a frame of this kind may have: a full [`MAX_DEVICE_CHUNK`] for
    /// DeviceData, [`MAX_CONTROL_LEN`] for everything else.
    pub fn max_body_len(self) -> u32 {
        match self {
            MessageKind::DeviceData => MAX_DEVICE_CHUNK.saturating_add(DEVICE_DATA_FIXED),
            _ => MAX_CONTROL_LEN,
        }
    }

    /// The kind with wire number `v`, if there is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        MessageKind::ALL.into_iter().find(|k| *k as u16 == v)
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Every channel, first frame, source to destination.
    Hello(Hello),
    /// Destination to source on the main channel: the Hello is accepted.
    Welcome {
        /// Protocol version the destination speaks.
        version: u32,
        /// [`crate::caps`] bits the destination accepts.
        capabilities: u64,
    },
    /// Source to destination: what the VM looks like, and the deadlines.
    Setup(Setup),
    /// Destination to source: the Setup is accepted.
    SetupAccepted,
    /// Destination to source: handshake or setup refused.
    Refuse {
        /// Why, for the operator (at most [`MAX_STRING`] bytes).
        reason: String,
    },
    /// Data channel: guest pages whose contents follow the frame
    /// ([`Message::payload_len`] raw bytes, run by run, page by page).
    /// Carries 1..=[`MAX_BATCH_PAGES`] pages in 1..=[`MAX_RUNS`] runs.
    Pages {
        /// Copy pass the pages belong to.
        pass: u32,
        /// Where the pages go.
        runs: Vec<PageRun>,
        /// Empty, or one checksum per page in order ([`page_sum`] of its bytes), when
        /// [`crate::caps::PAGE_SUMS`] was agreed.
        sums: Vec<u64>,
    },
    /// Data channel: like [`Message::Pages`], but the pages' bytes follow compressed, as
    /// `len` bytes of one `codec` frame (fewer bytes than the pages hold: a batch that does
    /// not shrink is sent as Pages).
    Compressed {
        /// Copy pass the pages belong to.
        pass: u32,
        /// Where the pages go.
        runs: Vec<PageRun>,
        /// How the payload is compressed.
        codec: Codec,
        /// Empty, or one checksum per page of the decompressed bytes.
        sums: Vec<u64>,
        /// Compressed payload bytes after the frame.
        len: u32,
    },
    /// Data channel: these pages are all zero; 1..=[`MAX_RUNS`] runs of any
    /// length, and no payload.
    ZeroPages {
        /// Copy pass the pages belong to.
        pass: u32,
        /// The zero pages.
        runs: Vec<PageRun>,
    },
    /// Data channel sync marker: everything of `pass` on this channel has
    /// been sent.
    PassEnd {
        /// The pass that ended.
        pass: u32,
        /// Pages (data and zero) this channel sent in that pass.
        pages: u64,
    },
    /// Data channel (main channel in a local hand-over): the next chunk of one device's
    /// state stream. A device's chunks travel on one channel, numbered from 0, so its
    /// stream stays in order while devices move side by side.
    DeviceData {
        /// The device: its index in the Setup's device list.
        device: u16,
        /// The chunk's number in the device's stream.
        seq: u32,
        /// [`DEVICE_INITIAL_END`] and [`DEVICE_END`] bits.
        flags: u8,
        /// The stream's bytes (at most [`MAX_DEVICE_CHUNK`]).
        data: Vec<u8>,
    },
    /// Source to destination: all memory and state sent.
    Complete {
        /// Number of the last pass.
        final_pass: u32,
    },
    /// Destination to source: destination memory preparation finished.
    Prepared {
        /// Time the preparation took, in microseconds.
        prepare_us: u64,
        /// Threads it used.
        threads: u32,
    },
    /// Destination to source: state loaded, ready to run the guest.
    Loaded {
        /// Time loading took, in microseconds.
        load_us: u64,
    },
    /// Source to destination: the source has committed; run the guest.
    /// After sending it the source never runs the guest on its own again.
    Go,
    /// Destination to source: the guest runs on the destination.
    Running {
        /// Time from Go to the guest running, in microseconds.
        resume_us: u64,
    },
    /// Either side: abort, with the reason. It is also a promise: a source
    /// sends it only before `Go` and then keeps the guest; a destination
    /// sends it only before running the guest and then never runs it.
    Error {
        /// Why, for the operator (at most [`MAX_STRING`] bytes).
        reason: String,
    },
    /// Destination to source, on the main channel: what has arrived. Sent
    /// whenever a pass completes on every channel and periodically while
    /// bytes arrive, so the source can tell a slow link from a stalled peer.
    Ack {
        /// Passes complete on every data channel.
        passes: u32,
        /// Bytes received so far on all channels.
        bytes: u64,
    },
    /// Source to destination, main channel: answer with a `Pong` of the same nonce at once
    /// (the source measures the round trip its downtime estimate needs).
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Destination to source: the answer to a `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Source to destination, main channel, local hand-over only (after `SetupAccepted`):
    /// the guest memory file travels with this frame as `SCM_RIGHTS` ancillary data, and
    /// `offsets[i]` is where the Setup's region `i` starts in it. The destination maps it
    /// in place of its own memory; no page is sent.
    LocalMemory {
        /// The source keeps this memory locked in RAM (`mlock`); the destination does too.
        locked: bool,
        /// File offset of each memory region, in the Setup's order (at most
        /// [`MAX_REGIONS`]).
        offsets: Vec<u64>,
    },
    /// Destination to source: the guest memory file is mapped (and locked if asked); the
    /// source may pause the guest.
    MemoryAdopted {
        /// Time mapping (and locking) took, in microseconds.
        adopt_us: u64,
    },
    /// Source to destination, main channel (postcopy agreed): the destination's copies of
    /// these pages are stale or were never sent; it must make them missing, to be filled
    /// in postcopy. Sent before the switch (`early`: all memory, for a postcopy without
    /// precopy, while the guest still runs on the source; acknowledged with `Discarded`) or
    /// at it, before `Postcopy` (the pages dirtied since they were sent; applied once every
    /// precopy page is in). 1..=[`MAX_RUNS`] runs of any length.
    Discard {
        /// Before the switch (else at it).
        early: bool,
        /// The pages.
        runs: Vec<PageRun>,
    },
    /// Destination to source: every `Discard` so far is done; the switch may come.
    Discarded {
        /// Time the discards took, in microseconds.
        discard_us: u64,
    },
    /// Source to destination, main channel, after the switch's `Discard`s and instead of
    /// `Complete`: the switch to postcopy (the devices' stop-copy streams are on their way). Every page the destination is missing comes as pass `pass`,
    /// pushed on the data channels and, when asked for, on the urgent channel.
    Postcopy {
        /// The pass of the postcopy pages.
        pass: u32,
    },
    /// Destination to source, urgent channel: a vCPU waits for these pages; send them now.
    /// 1..=[`MAX_RUNS`] runs of at most [`MAX_BATCH_PAGES`] pages in all.
    PageRequest {
        /// Numbers requests, for the statistics.
        seq: u32,
        /// The pages.
        runs: Vec<PageRun>,
    },
    /// Destination to source, main channel: every device has loaded its initial bytes; the
    /// source may pause the guest (QEMU's `switchover-ack`).
    DevicesReady,
    /// Destination to source, main channel, right after the `Welcome` of a postcopy that
    /// reconnects: which pages it holds already, as a bitmap over the guest's pages (bit
    /// `i` of `words[j]` is page `first_page + 64 * j + i`, counting the regions in order,
    /// each padded to a multiple of 64 pages), in frames of at most [`MAX_PLACED_WORDS`]
    /// words; the last has `last` set. The source then pushes only the pages still missing.
    Placed {
        /// The first page the words cover (a multiple of 64).
        first_page: u64,
        /// This frame ends the bitmap.
        last: bool,
        /// One bit per page, set where the page is present.
        words: Vec<u64>,
    },
    /// Destination to source: every page is here; the source may let go of the guest.
    PostcopyDone {
        /// Page faults the destination's guest took on missing pages.
        faults: u64,
        /// Pages the destination asked for on the urgent channel.
        requested: u64,
        /// Fault latency (fault read to page placed), median, in microseconds.
        p50_us: u64,
        /// Fault latency, 99th percentile, in microseconds.
        p99_us: u64,
        /// Fault latency, longest, in microseconds.
        max_us: u64,
    },
}

/// A page compression format of [`Message::Compressed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// One zstd frame.
    Zstd = 1,
    /// One LZ4 block (raw block format, no frame header).
    Lz4 = 2,
}

impl Codec {
    /// The codec with wire number `v`.
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// Its name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }
}

/// The checksum of one page in [`Message::Pages`] and [`Message::Compressed`]: xxh3-64 of
/// its bytes (with AVX2 where the CPU has it; the value is the same either way).
pub fn page_sum(page: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(page)
}

// Fixed sizes of encoded items, used to size bodies and to check counts
// against the bytes left before allocating.
pub(crate) const HELLO_LEN: u64 = 8 + 4 + 8 + 8 + 1 + 2 + 2;
pub(crate) const RUN_LEN: u64 = 8 + 4;
pub(crate) const REGION_LEN: u64 = 8 + 8;
pub(crate) const FEATURE_LEN: u64 = 4 + 4 + 4 * 4;
pub(crate) const TIMEOUTS_LEN: u64 = 4 + 4;
/// A device description's fixed part: name length, config length.
pub(crate) const DEVICE_INFO_MIN_LEN: u64 = 4 + 4;
/// A DeviceData body's fixed part: device, seq, flags, data length.
const DEVICE_DATA_FIXED: u32 = 2 + 4 + 1 + 4;
pub(crate) const DEVICE_DATA_MIN_LEN: u64 = DEVICE_DATA_FIXED as u64;

/// `s` cut to at most [`MAX_STRING`] bytes, at a character boundary.
fn bounded(s: impl Into<String>) -> String {
    let mut s = s.into();
    let max = MAX_STRING as usize;
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
    }
    s
}

impl Message {
    /// An `Error` with `reason`, cut to the protocol's string limit if need be (a reason
    /// may quote peer input).
    pub fn error(reason: impl Into<String>) -> Message {
        Message::Error {
            reason: bounded(reason),
        }
    }

    /// A `Refuse` with `reason`, cut to the protocol's string limit if need be.
    pub fn refuse(reason: impl Into<String>) -> Message {
        Message::Refuse {
            reason: bounded(reason),
        }
    }

    /// The message's name ("Hello", "Pages", ...), for "unexpected X in state
    /// Y" errors.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The frame kind this message is sent as.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Welcome { .. } => MessageKind::Welcome,
            Message::Setup(_) => MessageKind::Setup,
            Message::SetupAccepted => MessageKind::SetupAccepted,
            Message::Refuse { .. } => MessageKind::Refuse,
            Message::Pages { .. } => MessageKind::Pages,
            Message::ZeroPages { .. } => MessageKind::ZeroPages,
            Message::PassEnd { .. } => MessageKind::PassEnd,
            Message::DeviceData { .. } => MessageKind::DeviceData,
            Message::DevicesReady => MessageKind::DevicesReady,
            Message::Complete { .. } => MessageKind::Complete,
            Message::Prepared { .. } => MessageKind::Prepared,
            Message::Loaded { .. } => MessageKind::Loaded,
            Message::Go => MessageKind::Go,
            Message::Running { .. } => MessageKind::Running,
            Message::Error { .. } => MessageKind::Error,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Ping { .. } => MessageKind::Ping,
            Message::Pong { .. } => MessageKind::Pong,
            Message::LocalMemory { .. } => MessageKind::LocalMemory,
            Message::MemoryAdopted { .. } => MessageKind::MemoryAdopted,
            Message::Compressed { .. } => MessageKind::Compressed,
            Message::Discard { .. } => MessageKind::Discard,
            Message::Discarded { .. } => MessageKind::Discarded,
            Message::Postcopy { .. } => MessageKind::Postcopy,
            Message::PageRequest { .. } => MessageKind::PageRequest,
            Message::PostcopyDone { .. } => MessageKind::PostcopyDone,
            Message::Placed { .. } => MessageKind::Placed,
        }
    }

    /// Raw bytes that follow this frame on the stream: total pages times
    /// [`PAGE_SIZE`] for Pages, `len` for Compressed, 0 for everything else.
    pub fn payload_len(&self) -> u64 {
        match self {
            Message::Pages { runs, .. } => total_pages(runs).saturating_mul(PAGE_SIZE),
            Message::Compressed { len, .. } => u64::from(*len),
            _ => 0,
        }
    }

    /// Appends the frame (header and body, not the Pages payload) to `out`.
    ///
    /// `encode` does not validate: a message breaking a semantic rule (say a
    /// misaligned run) is encoded as is and the peer rejects it. Oversized
    /// input (strings, counts or a body over their limits) is a programming
    /// error of the sender: debug builds panic on it, release builds encode
    /// it anyway (lengths past `u32::MAX` saturate) and the peer rejects the
    /// frame. Call [`Message::validate`] first to find out without sending.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(out, false);
    }

    /// Like [`Message::encode`]; with `sum`, the frame carries its checksum
    /// ([`crate::FLAG_SUMMED`]).
    pub fn encode_with(&self, out: &mut Vec<u8>, sum: bool) {
        debug_assert!(
            self.check_limits().is_ok(),
            "encoding an oversized {} frame: {:?}",
            self.name(),
            self.check_limits()
        );
        let start = out.len();
        let body_len = self.body_len();
        codec::put_header(out, self.kind(), body_len);
        match self {
            Message::Hello(h) => codec::put_hello(out, h),
            Message::Welcome {
                version,
                capabilities,
            } => {
                codec::put_u32(out, *version);
                codec::put_u64(out, *capabilities);
            }
            Message::Setup(s) => codec::put_setup(out, s),
            Message::SetupAccepted | Message::Go => {}
            Message::Refuse { reason } | Message::Error { reason } => codec::put_str(out, reason),
            Message::Pages { pass, runs, sums } => {
                codec::put_runs(out, *pass, runs);
                codec::put_sums(out, sums);
            }
            Message::Compressed {
                pass,
                runs,
                codec: c,
                sums,
                len,
            } => codec::put_compressed(out, *pass, runs, *c, sums, *len),
            Message::ZeroPages { pass, runs } => codec::put_runs(out, *pass, runs),
            Message::PassEnd { pass, pages } => {
                codec::put_u32(out, *pass);
                codec::put_u64(out, *pages);
            }
            Message::DeviceData {
                device,
                seq,
                flags,
                data,
            } => codec::put_device_data(out, *device, *seq, *flags, data),
            Message::DevicesReady => {}
            Message::Complete { final_pass } => codec::put_u32(out, *final_pass),
            Message::Prepared {
                prepare_us,
                threads,
            } => {
                codec::put_u64(out, *prepare_us);
                codec::put_u32(out, *threads);
            }
            Message::Loaded { load_us } => codec::put_u64(out, *load_us),
            Message::Running { resume_us } => codec::put_u64(out, *resume_us),
            Message::Ack { passes, bytes } => {
                codec::put_u32(out, *passes);
                codec::put_u64(out, *bytes);
            }
            Message::Ping { nonce } | Message::Pong { nonce } => codec::put_u64(out, *nonce),
            Message::LocalMemory { locked, offsets } => {
                codec::put_u32(out, u32::from(*locked));
                codec::put_u32(out, u32::try_from(offsets.len()).unwrap_or(u32::MAX));
                offsets.iter().for_each(|o| codec::put_u64(out, *o));
            }
            Message::MemoryAdopted { adopt_us } => codec::put_u64(out, *adopt_us),
            Message::Discard { early, runs } => {
                codec::put_u8(out, u8::from(*early));
                codec::put_run_list(out, runs)
            }
            Message::Discarded { discard_us } => codec::put_u64(out, *discard_us),
            Message::Postcopy { pass } => codec::put_u32(out, *pass),
            Message::PageRequest { seq, runs } => codec::put_runs(out, *seq, runs),
            Message::Placed {
                first_page,
                last,
                words,
            } => {
                codec::put_u64(out, *first_page);
                codec::put_u8(out, u8::from(*last));
                codec::put_u32(out, u32::try_from(words.len()).unwrap_or(u32::MAX));
                words.iter().for_each(|w| codec::put_u64(out, *w));
            }
            Message::PostcopyDone {
                faults,
                requested,
                p50_us,
                p99_us,
                max_us,
            } => [faults, requested, p50_us, p99_us, max_us]
                .into_iter()
                .for_each(|v| codec::put_u64(out, *v)),
        }
        debug_assert_eq!(
            len64(out.len().saturating_sub(start)),
            body_len.saturating_add(len64(crate::FRAME_HEADER_LEN)),
            "body_len() disagrees with the encoding of {}",
            self.name()
        );
        if sum {
            codec::seal(out, start);
        }
    }

    /// Checks every rule the decoder enforces, so a sender can refuse to
    /// send what the peer would reject. `decode_body` returns only messages
    /// for which this is `Ok`.
    pub fn validate(&self) -> Result<(), ProtoError> {
        self.check_limits()?;
        match self {
            Message::Setup(Setup {
                vm: d,
                timeouts,
                devices,
                ..
            }) => {
                check_timeouts(timeouts)?;
                check_devices(devices)?;
                if d.vcpus == 0 {
                    return Err(invalid(
                        "Setup vcpus",
                        "0 vCPUs (at least 1 is needed)".into(),
                    ));
                }
                if u64::from(d.page_size) != PAGE_SIZE {
                    return Err(invalid(
                        "Setup page_size",
                        format!("{} is not the supported page size {PAGE_SIZE}", d.page_size),
                    ));
                }
                if d.regions.is_empty() {
                    return Err(invalid(
                        "Setup regions",
                        "no memory regions (at least 1 is needed)".into(),
                    ));
                }
                d.regions.iter().try_for_each(check_region)
            }
            Message::Pages { runs, sums, .. } => {
                check_runs("Pages runs", "Pages run", runs)?;
                check_sums("Pages sums", runs, sums)
            }
            Message::Compressed {
                runs, sums, len, ..
            } => {
                check_runs("Compressed runs", "Compressed run", runs)?;
                check_sums("Compressed sums", runs, sums)?;
                check_compressed_len(runs, *len)
            }
            Message::ZeroPages { runs, .. } => check_runs("ZeroPages runs", "ZeroPages run", runs),
            Message::Discard { runs, .. } => check_runs("Discard runs", "Discard run", runs),
            Message::PageRequest { runs, .. } => {
                check_runs("PageRequest runs", "PageRequest run", runs)?;
                check_batch_pages(total_pages(runs))
            }
            Message::Placed { first_page, .. } if !first_page.is_multiple_of(64) => Err(invalid(
                "Placed first_page",
                format!("{first_page} is not a multiple of 64"),
            )),
            Message::LocalMemory { offsets, .. } => {
                if offsets.is_empty() {
                    return Err(invalid(
                        "LocalMemory offsets",
                        "no offsets (one per memory region is needed)".into(),
                    ));
                }
                match offsets.iter().find(|o| !is_page_aligned(**o)) {
                    Some(o) => Err(invalid(
                        "LocalMemory offset",
                        format!("{o:#x} is not aligned to the {PAGE_SIZE}-byte page size"),
                    )),
                    None => Ok(()),
                }
            }
            Message::DeviceData { flags, .. }
                if flags & !(DEVICE_INITIAL_END | DEVICE_END) != 0 =>
            {
                Err(invalid(
                    "DeviceData flags",
                    format!("unknown flag bits {flags:#04x}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Limits whose breach makes a frame oversized (as opposed to
    /// semantically invalid): string lengths, counts and the body length.
    fn check_limits(&self) -> Result<(), ProtoError> {
        match self {
            Message::Setup(Setup { vm: d, devices, .. }) => {
                check_count("Setup region count", d.regions.len(), MAX_REGIONS)?;
                check_count(
                    "Setup cpu feature count",
                    d.cpu_features.len(),
                    MAX_CPU_FEATURES,
                )?;
                check_count("Setup device count", devices.len(), MAX_DEVICES)?;
                for dev in devices {
                    check_string("Setup device name", &dev.name)?;
                    check_count("Setup device config length", dev.config.len(), MAX_STRING)?;
                }
            }
            Message::Refuse { reason } => check_string("Refuse reason", reason)?,
            Message::Error { reason } => check_string("Error reason", reason)?,
            Message::Pages { runs, sums, .. } | Message::Compressed { runs, sums, .. } => {
                check_count("Pages run count", runs.len(), MAX_RUNS)?;
                check_count("Pages sum count", sums.len(), MAX_BATCH_PAGES)?;
                check_batch_pages(total_pages(runs))?;
            }
            Message::ZeroPages { runs, .. } => {
                check_count("ZeroPages run count", runs.len(), MAX_RUNS)?
            }
            Message::Discard { runs, .. } => {
                check_count("Discard run count", runs.len(), MAX_RUNS)?
            }
            Message::PageRequest { runs, .. } => {
                check_count("PageRequest run count", runs.len(), MAX_RUNS)?
            }
            Message::DeviceData { data, .. } => {
                check_count("DeviceData length", data.len(), MAX_DEVICE_CHUNK)?
            }
            Message::LocalMemory { offsets, .. } => {
                check_count("LocalMemory offset count", offsets.len(), MAX_REGIONS)?
            }
            Message::Placed { words, .. } => {
                check_count("Placed word count", words.len(), MAX_PLACED_WORDS)?
            }
            _ => {}
        }
        let kind = self.kind();
        let len = self.body_len();
        let max = u64::from(kind.max_body_len());
        if len > max {
            return Err(ProtoError::TooLong { kind, len, max });
        }
        Ok(())
    }

    /// Length of the encoded body (saturating, so absurd input stays
    /// detectable as too long instead of wrapping).
    fn body_len(&self) -> u64 {
        match self {
            Message::Hello(_) => HELLO_LEN,
            Message::Welcome { .. } => 4 + 8,
            Message::Setup(Setup { vm: d, devices, .. }) => 4u64
                .saturating_add(4)
                .saturating_add(4)
                .saturating_add(len64(d.regions.len()).saturating_mul(REGION_LEN))
                .saturating_add(4)
                .saturating_add(len64(d.cpu_features.len()).saturating_mul(FEATURE_LEN))
                .saturating_add(TIMEOUTS_LEN)
                .saturating_add(4)
                .saturating_add(devices.iter().fold(0u64, |acc, dev| {
                    acc.saturating_add(DEVICE_INFO_MIN_LEN)
                        .saturating_add(len64(dev.name.len()))
                        .saturating_add(len64(dev.config.len()))
                }))
                .saturating_add(1),
            Message::SetupAccepted | Message::Go => 0,
            Message::Refuse { reason } | Message::Error { reason } => {
                4u64.saturating_add(len64(reason.len()))
            }
            Message::Pages { runs, sums, .. } => pages_body_len(runs, sums.len()),
            Message::Compressed { runs, sums, .. } => compressed_body_len(runs, sums.len()),
            Message::ZeroPages { runs, .. } => runs_body_len(runs),
            Message::PassEnd { .. } => 4 + 8,
            Message::DeviceData { data, .. } => {
                DEVICE_DATA_MIN_LEN.saturating_add(len64(data.len()))
            }
            Message::DevicesReady => 0,
            Message::Complete { .. } => 4,
            Message::Prepared { .. } => 8 + 4,
            Message::Loaded { .. } | Message::Running { .. } => 8,
            Message::Ack { .. } => 4 + 8,
            Message::Ping { .. } | Message::Pong { .. } => 8,
            Message::LocalMemory { offsets, .. } => {
                8u64.saturating_add(len64(offsets.len()).saturating_mul(8))
            }
            Message::MemoryAdopted { .. } => 8,
            // The early flag in place of a pass.
            Message::Discard { runs, .. } => runs_body_len(runs).saturating_sub(3),
            Message::PageRequest { runs, .. } => runs_body_len(runs),
            Message::Discarded { .. } => 8,
            Message::PostcopyDone { .. } => 5 * 8,
            Message::Placed { words, .. } => {
                (8u64 + 1 + 4).saturating_add(len64(words.len()).saturating_mul(8))
            }
            Message::Postcopy { .. } => 4,
        }
    }
}

/// Body length of a Pages frame with these runs and `sums` checksums.
pub(crate) fn pages_body_len(runs: &[PageRun], sums: usize) -> u64 {
    runs_body_len(runs)
        .saturating_add(4)
        .saturating_add(len64(sums).saturating_mul(8))
}

/// Body length of a Compressed frame: a Pages body plus codec and payload length.
pub(crate) fn compressed_body_len(runs: &[PageRun], sums: usize) -> u64 {
    pages_body_len(runs, sums).saturating_add(1 + 4)
}

/// No checksums, or one per page.
fn check_sums(what: &'static str, runs: &[PageRun], sums: &[u64]) -> Result<(), ProtoError> {
    let pages = total_pages(runs);
    if sums.is_empty() || len64(sums.len()) == pages {
        return Ok(());
    }
    Err(invalid(
        what,
        format!(
            "{} checksums for {pages} pages (0 or one per page)",
            sums.len()
        ),
    ))
}

/// A compressed payload is not empty and smaller than the pages it holds.
fn check_compressed_len(runs: &[PageRun], len: u32) -> Result<(), ProtoError> {
    let raw = total_pages(runs).saturating_mul(PAGE_SIZE);
    if len == 0 || u64::from(len) >= raw {
        return Err(invalid(
            "Compressed len",
            format!("{len} bytes for {raw} bytes of pages (must be 1 to {raw} - 1)"),
        ));
    }
    Ok(())
}

/// Body length of a Pages or ZeroPages frame with these runs.
pub(crate) fn runs_body_len(runs: &[PageRun]) -> u64 {
    8u64.saturating_add(len64(runs.len()).saturating_mul(RUN_LEN))
}

/// Sum of the runs' page counts (cannot overflow for sane input; saturates
/// rather than wrap for absurd input).
pub(crate) fn total_pages(runs: &[PageRun]) -> u64 {
    runs.iter()
        .map(|r| u64::from(r.pages))
        .fold(0, u64::saturating_add)
}

fn invalid(what: &'static str, detail: String) -> ProtoError {
    ProtoError::Invalid { what, detail }
}

fn check_count(what: &'static str, count: usize, max: u32) -> Result<(), ProtoError> {
    let count = len64(count);
    let max = u64::from(max);
    if count > max {
        return Err(ProtoError::TooMany { what, count, max });
    }
    Ok(())
}

fn check_string(what: &'static str, s: &str) -> Result<(), ProtoError> {
    let len = len64(s.len());
    let max = u64::from(MAX_STRING);
    if len > max {
        return Err(ProtoError::StringTooLong { what, len, max });
    }
    Ok(())
}

pub(crate) fn check_batch_pages(total: u64) -> Result<(), ProtoError> {
    let max = u64::from(MAX_BATCH_PAGES);
    if total > max {
        return Err(ProtoError::TooMany {
            what: "Pages frame page count",
            count: total,
            max,
        });
    }
    Ok(())
}

/// Non-empty list of valid runs. For Pages this also makes the total page
/// count at least 1, since every run has at least one page.
fn check_runs(list: &'static str, what: &'static str, runs: &[PageRun]) -> Result<(), ProtoError> {
    if runs.is_empty() {
        return Err(invalid(
            list,
            format!("no runs (1 to {MAX_RUNS} are needed)"),
        ));
    }
    runs.iter().try_for_each(|r| check_run(what, r))
}

fn check_run(what: &'static str, r: &PageRun) -> Result<(), ProtoError> {
    if !is_page_aligned(r.gpa) {
        return Err(invalid(
            what,
            format!(
                "gpa {:#x} is not aligned to the {PAGE_SIZE}-byte page size",
                r.gpa
            ),
        ));
    }
    if r.pages == 0 {
        return Err(invalid(
            what,
            format!("run at gpa {:#x} has 0 pages", r.gpa),
        ));
    }
    let end = u64::from(r.pages)
        .checked_mul(PAGE_SIZE)
        .and_then(|len| r.gpa.checked_add(len));
    if end.is_none() {
        return Err(invalid(
            what,
            format!(
                "run at gpa {:#x} of {} pages overflows the 64-bit address space",
                r.gpa, r.pages
            ),
        ));
    }
    Ok(())
}

/// Device names: non-empty and unique (a stream is routed by its device's place in the
/// list, and errors name the device).
fn check_devices(devices: &[DeviceInfo]) -> Result<(), ProtoError> {
    for (i, d) in devices.iter().enumerate() {
        if d.name.is_empty() {
            return Err(invalid(
                "Setup device name",
                format!("device {i} has an empty name"),
            ));
        }
        if devices.iter().take(i).any(|o| o.name == d.name) {
            return Err(invalid(
                "Setup device name",
                format!("'{}' appears twice", d.name),
            ));
        }
    }
    Ok(())
}

fn check_timeouts(t: &Timeouts) -> Result<(), ProtoError> {
    if t.progress_ms == 0 || t.switchover_ms == 0 {
        return Err(invalid(
            "Setup timeouts",
            format!(
                "progress {} ms, switchover {} ms (both must be at least 1 ms)",
                t.progress_ms, t.switchover_ms
            ),
        ));
    }
    Ok(())
}

fn check_region(r: &MemRegion) -> Result<(), ProtoError> {
    const WHAT: &str = "Setup region";
    if !is_page_aligned(r.gpa) {
        return Err(invalid(
            WHAT,
            format!(
                "gpa {:#x} is not aligned to the {PAGE_SIZE}-byte page size",
                r.gpa
            ),
        ));
    }
    if r.size == 0 {
        return Err(invalid(
            WHAT,
            format!("region at gpa {:#x} has size 0", r.gpa),
        ));
    }
    if !is_page_aligned(r.size) {
        return Err(invalid(
            WHAT,
            format!(
                "region at gpa {:#x} has size {:#x}, not a multiple of the {PAGE_SIZE}-byte page size",
                r.gpa, r.size
            ),
        ));
    }
    if r.gpa.checked_add(r.size).is_none() {
        return Err(invalid(
            WHAT,
            format!(
                "region at gpa {:#x} of size {:#x} overflows the 64-bit address space",
                r.gpa, r.size
            ),
        ));
    }
    Ok(())
}

/// Mask test instead of `is_multiple_of`, which is newer than the MSRV.
fn is_page_aligned(v: u64) -> bool {
    v & (PAGE_SIZE - 1) == 0
}
