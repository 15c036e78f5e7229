//! Errors of a migration. Each says which side, channel and state it happened in.

use ferry_memory::dirty::DirtyError;
use ferry_proto::ProtoError;
use ferry_transport::TransportError;

use crate::vm::VmError;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Connecting or listening failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A stream could not be read or decoded.
    #[error("{channel} channel, in state {state}: {source}")]
    Proto {
        /// Which channel ("main", "data 2").
        channel: String,
        /// State of the state machine.
        state: &'static str,
        /// The decoding or I/O error.
        source: ProtoError,
    },
    /// Writing to a channel failed.
    #[error("{channel} channel, in state {state}: sending failed: {source}")]
    Send {
        /// Which channel.
        channel: String,
        /// State.
        state: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A message that makes no sense in the current state.
    #[error("unexpected {message} message on the {channel} channel in state {state}")]
    Unexpected {
        /// Message name.
        message: &'static str,
        /// State.
        state: &'static str,
        /// Channel.
        channel: String,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: the peer speaks version {peer}, this Ferry speaks version {ours}")]
    Version {
        /// Peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// The destination refused the migration.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The peer aborted and said why.
    #[error("the {side} reported an error: {reason}")]
    Peer {
        /// "destination" or "source".
        side: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The stream carried something invalid (pages outside RAM, bad channel index...).
    #[error("invalid migration stream: {0}")]
    Invalid(String),
    /// This side refused the other (incompatible VM).
    #[error("incompatible VM: {0}")]
    Incompatible(String),
    /// The VM failed.
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    /// Dirty logging failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Destination memory preparation failed.
    #[error("destination memory preparation: {0}")]
    Prepare(String),
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
    /// A peer did not answer in time.
    #[error("timed out {0}")]
    Timeout(String),
    /// The handover could not be confirmed after the source committed: the VM is paused on
    /// this side with its complete state, and must be resumed by hand on exactly one side.
    #[error("handover unconfirmed: {0}")]
    HandoverUnconfirmed(String),
    /// Local I/O (digest files).
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}
