//! Errors of encoding and decoding frames.

use crate::MessageKind;

/// Why a frame could not be read or decoded.
///
/// Every message names the field (and frame kind) at fault, the offending
/// value and the limit it broke, so it can be shown to an operator as is.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying stream failed.
    #[error("I/O error on the migration stream: {0}")]
    Io(#[from] std::io::Error),

    /// The stream ended cleanly before the first byte of a frame header.
    #[error("the migration stream ended (the peer closed it before the next frame)")]
    Eof,

    /// The input ended inside a frame, or a count claims more items than the
    /// bytes that are left could hold.
    #[error("truncated {what}: {needed} bytes needed, only {available} available")]
    Truncated {
        /// The field or part of the frame that is cut short.
        what: &'static str,
        /// Bytes that field needs (at least).
        needed: u64,
        /// Bytes that were actually there.
        available: u64,
    },

    /// A Hello did not start with [`crate::MAGIC`].
    #[error("bad magic in Hello: the peer does not speak the Ferry migration protocol (expected \"FERRYMIG\")")]
    BadMagic,

    /// The header's `kind` is not a known [`MessageKind`].
    #[error("unknown frame kind {0} (known kinds are 1 to 21)")]
    UnknownKind(u16),

    /// The header's `flags` hold an unknown bit.
    #[error("frame flags {0:#06x} are not allowed (only 0x0001, summed, is known)")]
    BadFlags(u16),

    /// A frame's checksum does not match its header and body: it was corrupted on the way.
    #[error("{kind} frame corrupted in transit: its checksum does not match")]
    BadSum {
        /// Kind of the frame (as its possibly corrupted header says).
        kind: MessageKind,
    },

    /// Checksums were agreed, and a frame came without one.
    #[error("{kind} frame without a checksum, though checksums were agreed")]
    MissingSum {
        /// Kind of the frame.
        kind: MessageKind,
    },

    /// A frame body is longer than its kind allows.
    #[error("{kind} frame body of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Kind of the frame.
        kind: MessageKind,
        /// Body length claimed by the header (or computed when encoding).
        len: u64,
        /// [`MessageKind::max_body_len`] of the kind.
        max: u64,
    },

    /// A string is longer than [`crate::MAX_STRING`].
    #[error("{what}: string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        /// Which string.
        what: &'static str,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },

    /// A count (of runs, pages, regions, sections, ...) is over its limit.
    #[error("{what}: {count} exceeds the limit of {max}")]
    TooMany {
        /// What is counted, with the frame kind.
        what: &'static str,
        /// The count found.
        count: u64,
        /// The limit.
        max: u64,
    },

    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Which string.
        what: &'static str,
    },

    /// A field is well formed but its value is not allowed.
    #[error("{what}: {detail}")]
    Invalid {
        /// Which field, with the frame kind.
        what: &'static str,
        /// The offending value and the rule it breaks.
        detail: String,
    },

    /// Bytes are left in a body after its last field.
    #[error("{kind} frame: {extra} unexpected bytes after the last field")]
    TrailingBytes {
        /// Kind of the frame.
        kind: MessageKind,
        /// How many bytes are left over.
        extra: usize,
    },
}
