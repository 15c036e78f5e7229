//! Ferry's migration wire protocol: versioned, little-endian, length-checked.
//!
//! This crate knows nothing of KVM: it only turns [`Message`]s into bytes and
//! back, and refuses anything malformed with a [`ProtoError`] that names the
//! offending field, value and limit.
//!
//! # Format
//!
//! Little-endian throughout. A frame is an 8-byte header followed by a body:
//!
//! | bytes | field      | meaning                                          |
//! |-------|------------|--------------------------------------------------|
//! | 0..2  | `kind`     | [`MessageKind`] as `u16`                         |
//! | 2..4  | `flags`    | 0, or [`FLAG_SUMMED`]                            |
//! | 4..8  | `body_len` | body bytes, at most [`MessageKind::max_body_len`] |
//!
//! Strings are a `u32` byte length then UTF-8 (at most [`MAX_STRING`] bytes);
//! vectors are a `u32` count then the items. Bytes left over after a body's
//! last field are an error.
//!
//! A frame with [`FLAG_SUMMED`] is followed by 8 more bytes: xxh3-64 of its
//! header (flags included) and body. Once [`caps::PAGE_SUMS`] is agreed, every
//! frame after the `Welcome` carries one, and Pages carry one checksum per page.
//!
//! [`Message::Pages`] is special: its body only holds the page list, and the
//! raw page bytes ([`Message::payload_len`] of them) follow the frame on the
//! stream, outside `body_len`. The decoder never reads them, so the receiver
//! can read them straight into guest memory.
//!
//! # Hostile input
//!
//! Every length and count read from the wire is checked against its limit
//! and against the bytes actually present before anything is allocated, so
//! a peer cannot make the decoder allocate more than a kind's body limit, and
//! nothing a peer sends can make it panic.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// Input-reachable panics are bugs here: let clippy enforce it on the library.
#![warn(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

mod codec;
mod error;
mod message;

pub use codec::{
    decode_body, decode_header, encode_compressed_header, encode_pages_header, encode_zero_header,
    read_message, read_message_checked, FrameHeader,
};
pub use error::ProtoError;
pub use message::{
    page_sum, ChannelRole, Codec, CpuFeature, DeviceInfo, Hello, MemRegion, Message, MessageKind,
    PageRun, Setup, Timeouts, VmDescription, DEVICE_END, DEVICE_INITIAL_END,
};

/// First bytes of every [`Hello`] body: identifies a Ferry migration stream.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version spoken by this crate.
pub const VERSION: u32 = 5;
/// Frame header flag: the body is followed by the frame's xxh3-64 checksum.
pub const FLAG_SUMMED: u16 = 1;
/// Guest page size; page runs and memory regions are in units of it.
pub const PAGE_SIZE: u64 = 4096;
/// Length of a whole [`Hello`] frame (header and body), which never changes.
pub const HELLO_FRAME_LEN: usize = FRAME_HEADER_LEN + 33;
/// Length of the fixed frame header (`kind`, `flags`, `body_len`).
pub const FRAME_HEADER_LEN: usize = 8;
/// Most data pages one [`Message::Pages`] frame may announce.
pub const MAX_BATCH_PAGES: u32 = 256;
/// Most runs in one [`Message::Pages`] or [`Message::ZeroPages`] frame.
pub const MAX_RUNS: u32 = 512;
/// Longest string (in bytes) anywhere in the protocol.
pub const MAX_STRING: u32 = 4096;
/// Most memory regions in a [`VmDescription`].
pub const MAX_REGIONS: u32 = 4096;
/// Most CPUID entries in a [`VmDescription`].
pub const MAX_CPU_FEATURES: u32 = 4096;
/// Most devices (vCPUs included) in a [`Setup`].
pub const MAX_DEVICES: u32 = 4096;
/// Most bytes of a device stream in one [`Message::DeviceData`] frame.
pub const MAX_DEVICE_CHUNK: u32 = 1 << 20;
/// Body limit of every frame kind other than [`Message::DeviceData`].
pub const MAX_CONTROL_LEN: u32 = 1 << 20;
/// Most bitmap words in one [`Message::Placed`] (1 Mi pages, 4 GiB of guest memory).
pub const MAX_PLACED_WORDS: u32 = 1 << 14;

/// Capability bits exchanged in [`Hello`] and [`Message::Welcome`]; both
/// sides use the intersection of what they offered.
pub mod caps {
    /// Zero pages are announced as [`crate::Message::ZeroPages`] runs instead
    /// of being sent as data.
    pub const ZERO_RUNS: u64 = 1 << 0;
    /// The destination acknowledges switchover with
    /// [`crate::Message::Running`].
    pub const SWITCHOVER_ACK: u64 = 1 << 1;
    /// A local hand-over: the guest memory file is passed over the unix socket
    /// ([`crate::Message::LocalMemory`]) instead of its pages; no data channel. A source
    /// offers it only when asked to; a destination accepts it only on a unix socket.
    pub const LOCAL: u64 = 1 << 2;
    /// Integrity without TLS: every frame after the `Welcome` carries its checksum
    /// ([`crate::FLAG_SUMMED`]) and every page its own ([`crate::page_sum`]), verified on
    /// arrival. A source offers it unless its channels are TLS (whose AEAD covers it).
    pub const PAGE_SUMS: u64 = 1 << 3;
    /// The source may send [`crate::Message::Compressed`] frames in zstd.
    pub const ZSTD: u64 = 1 << 4;
    /// The source may send [`crate::Message::Compressed`] frames in LZ4.
    pub const LZ4: u64 = 1 << 5;
    /// Postcopy: the source may switch to running the guest on the destination before all
    /// pages are there ([`crate::Message::Postcopy`]); it opens the urgent channel
    /// ([`crate::ChannelRole::Urgent`]) for the pages the destination faults on.
    pub const POSTCOPY: u64 = 1 << 6;
    /// In a main channel's `Hello`: not a new migration but the source of a postcopy whose
    /// link broke, reconnecting with the same session id. The destination takes the new
    /// channels in place of the old ones, asks again for the pages its vCPUs wait for, and
    /// the source pushes again what the destination may lack (pass in a new `Postcopy`).
    /// A flag of the Hello, not negotiated: never in [`ALL`] nor in a `Welcome`.
    pub const RESUME: u64 = 1 << 7;
    /// Every capability this version negotiates.
    pub const ALL: u64 = ZERO_RUNS | SWITCHOVER_ACK | LOCAL | PAGE_SUMS | ZSTD | LZ4 | POSTCOPY;
}
