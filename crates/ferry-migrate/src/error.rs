//! Errors of a migration. Each says which side, channel and phase it happened in.

use std::fmt;
use std::time::Duration;

use ferry_memory::dirty::DirtyError;
use ferry_memory::prepare::PrepareError;
use ferry_memory::ram::MemoryError;
use ferry_proto::{Message, ProtoError};
use ferry_transport::{TlsError, TransportError};

use crate::vm::VmError;

/// A channel of a migration, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The control channel.
    Main,
    /// A data channel.
    Data(u16),
    /// Postcopy's urgent channel.
    Urgent,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Main => f.write_str("main"),
            Channel::Data(i) => write!(f, "data {i}"),
            Channel::Urgent => f.write_str("urgent"),
        }
    }
}

/// Who ended a migration early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortCause {
    /// `migrate-cancel`.
    Cancel,
    /// `quit` while the migration ran: it is aborted, then the process quits.
    Quit,
}

/// What a side stopped waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Connecting and opening every channel.
    Connect,
    /// The destination's `Welcome`.
    Welcome,
    /// The destination's `SetupAccepted`.
    SetupAccepted,
    /// The source's data channels and `Setup`, after its main channel.
    Handshake,
    /// The destination to acknowledge progress during precopy.
    Progress,
    /// Anything from the source while receiving.
    Source,
    /// The destination's `Loaded` within the switchover timeout.
    Loaded,
    /// The destination to map the memory file of a local hand-over.
    Adopted,
    /// The destination to make its memory ready for postcopy.
    Discarded,
    /// The destination to load every device's initial bytes (switchover-ack).
    DevicesReady,
}

impl fmt::Display for Waited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Waited::Connect => "for the connections to the destination",
            Waited::Welcome => "for the destination to answer the handshake",
            Waited::SetupAccepted => "for the destination to accept the VM description",
            Waited::Handshake => "for the source's data channels and VM description",
            Waited::Progress => "for the destination to acknowledge any data (it stopped making progress)",
            Waited::Source => "for the source to send anything (it stopped making progress)",
            Waited::Loaded => "for the destination to load the state (switchover timeout); the guest was resumed on the source",
            Waited::Adopted => "for the destination to map the guest memory file",
            Waited::Discarded => "for the destination to make its memory ready for postcopy",
            Waited::DevicesReady => "for the destination to load every device's initial bytes",
        })
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Connecting or listening failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A stream could not be read or decoded.
    #[error("{channel} channel, in phase {phase}: {source}")]
    Receive {
        /// Which channel.
        channel: Channel,
        /// Phase of the side that read.
        phase: &'static str,
        /// The decoding or I/O error.
        source: ProtoError,
    },
    /// The peer closed a channel.
    #[error("the {side} closed the {channel} channel in phase {phase}")]
    Closed {
        /// "source" or "destination".
        side: &'static str,
        /// Which channel.
        channel: Channel,
        /// Phase of this side.
        phase: &'static str,
    },
    /// Writing to a channel failed.
    #[error("{channel} channel, in phase {phase}: sending failed: {source}")]
    Send {
        /// Which channel.
        channel: Channel,
        /// Phase.
        phase: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A message that makes no sense in the current phase.
    #[error("unexpected {message} message on the {channel} channel in phase {phase}")]
    Unexpected {
        /// Message name.
        message: &'static str,
        /// Phase.
        phase: &'static str,
        /// Channel.
        channel: Channel,
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
    #[error("the {side} aborted the migration: {reason}")]
    Peer {
        /// "destination" or "source".
        side: &'static str,
        /// Its reason.
        reason: String,
    },
    /// Pages announced on a data channel that are not inside guest RAM.
    #[error("{channel} channel: {pages} pages at {gpa:#x} are not inside guest RAM")]
    OutsideRam {
        /// Which channel.
        channel: Channel,
        /// First page.
        gpa: u64,
        /// Page count.
        pages: u32,
    },
    /// A data channel with an index past the announced count, or announced twice.
    #[error("data channel index {index} is {problem} (the source announced {count} channels)")]
    BadChannel {
        /// The index.
        index: u16,
        /// "out of range" or "a duplicate".
        problem: &'static str,
        /// Channels announced.
        count: u16,
    },
    /// A channel count this side does not accept.
    #[error("the source asked for {asked} data channels; this destination accepts 1 to {max}")]
    ChannelCount {
        /// Asked for.
        asked: u16,
        /// Limit.
        max: u16,
    },
    /// Passes ending out of order on a data channel.
    #[error("data channel {channel}: pass {pass} ended after pass {after}")]
    PassOrder {
        /// Channel index.
        channel: u16,
        /// The pass that ended.
        pass: u32,
        /// The pass that had ended before.
        after: u32,
    },
    /// A pass's page count on a data channel does not match what arrived (a frame lost).
    #[error(
        "data channel {channel}: pass {pass} announced {announced} pages but {arrived} arrived"
    )]
    PassPages {
        /// Channel index.
        channel: u16,
        /// The pass.
        pass: u32,
        /// Pages its PassEnd announced.
        announced: u64,
        /// Pages that arrived.
        arrived: u64,
    },
    /// Pages arrived after every channel had ended its final pass.
    #[error("{} sent pages after the final pass", match .channel { Some(c) => format!("data channel {c}"), None => "a data channel".into() })]
    AfterFinalPass {
        /// The channel, when known.
        channel: Option<u16>,
    },
    /// A data channel closed before the migration had sent everything.
    #[error("data channel {channel} closed in phase {phase} before the migration completed")]
    DataClosed {
        /// Channel index.
        channel: u16,
        /// Phase.
        phase: &'static str,
    },
    /// This side refused the other (incompatible VM).
    #[error("incompatible VM: {0}")]
    Incompatible(String),
    /// A device (or vCPU) failed a step of its migration.
    #[error("device '{device}': {op}: {source}")]
    Device {
        /// The device's name.
        device: String,
        /// What was being done.
        op: &'static str,
        /// Its error.
        source: VmError,
    },
    /// A device's stream broke a rule of the protocol (order, end).
    #[error("device '{device}': its stream {problem}")]
    DeviceStream {
        /// The device's name.
        device: String,
        /// What is wrong.
        problem: String,
    },
    /// A device chunk for a device the Setup did not list.
    #[error("{channel} channel: data for device #{index}, but the source listed {count} devices")]
    UnknownDevice {
        /// Where it came.
        channel: Channel,
        /// The device index it named.
        index: u16,
        /// Devices in the Setup.
        count: usize,
    },
    /// The destination cannot have the source's devices.
    #[error("devices: {0}")]
    Devices(VmError),
    /// The destination's VM gave other devices than the source listed.
    #[error("devices: the source listed {asked}, this VM gave {got} (or in another order)")]
    DeviceList {
        /// Devices in the Setup.
        asked: usize,
        /// Devices the VM gave.
        got: usize,
    },
    /// The VM failed.
    #[error("VM: {op}: {source}")]
    Vm {
        /// What was being done.
        op: &'static str,
        /// Its error.
        source: VmError,
    },
    /// Dirty logging failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Guest memory could not be accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A page digest file could not be written.
    #[error(transparent)]
    Digest(crate::digest::DigestError),
    /// A data channel sender reported a pass other than the one running (an engine bug).
    #[error("a data channel finished pass {got} while pass {expected} was running")]
    WorkerOutOfStep {
        /// The pass running.
        expected: u32,
        /// The pass reported.
        got: u32,
    },
    /// Destination memory preparation failed.
    #[error("destination memory preparation: {0}")]
    Prepare(#[from] PrepareError),
    /// Cancelled by the user, or aborted because the user asked the process to quit.
    #[error("migration {}", match .0 { AbortCause::Cancel => "cancelled", AbortCause::Quit => "aborted: the process was asked to quit" })]
    Aborted(AbortCause),
    /// The peer did not answer or progress in time.
    #[error("timed out after {:.1} s waiting {what}", .after.as_secs_f64())]
    Timeout {
        /// What.
        what: Waited,
        /// After how long.
        after: Duration,
    },
    /// `--local` to a URI that is not a unix socket.
    #[error("a local hand-over needs a unix: URI (the destination on this host), not {uri}")]
    LocalNeedsUnix {
        /// The URI given.
        uri: String,
    },
    /// `--local` with memory another process cannot map.
    #[error(
        "a local hand-over passes the guest memory file to the new process, but this VM's \
         memory is {backend} (private to this process); start the VM with \
         --memory-backend memfd (or hugetlb)"
    )]
    LocalNeedsSharedMemory {
        /// The VM's memory backend.
        backend: &'static str,
    },
    /// The destination did not offer a local hand-over.
    #[error(
        "the destination does not take a local hand-over (it is not reached over a unix \
         socket on this host, or it is an older ferry)"
    )]
    LocalRefused,
    /// The `LocalMemory` frame came without exactly one file descriptor.
    #[error(
        "the source's memory file did not arrive ({got} descriptors came with LocalMemory): \
         a local hand-over needs both processes on one host, on a unix socket that is not \
         forwarded"
    )]
    LocalNoMemoryFile {
        /// Descriptors that came.
        got: usize,
    },
    /// A local hand-over's memory could not be given back after a failed attempt: this
    /// destination must not receive again.
    #[error("giving back the source's memory after a failed local hand-over failed: {0}")]
    Disown(MemoryError),
    /// A channel count outside what Ferry opens.
    #[error("channels must be 1 to {max}, not {asked}")]
    Channels {
        /// Asked for.
        asked: u16,
        /// Limit.
        max: u16,
    },
    /// A bandwidth cap of 0.
    #[error("max-bandwidth must be more than 0 bytes/s")]
    ZeroBandwidth,
    /// A timeout outside what the protocol carries.
    #[error("{name} must be 1 ms to 49 days, not {value:?}")]
    TimeoutRange {
        /// Which option.
        name: &'static str,
        /// Its value.
        value: Duration,
    },
    /// A switchover timeout the downtime limit could never fit in.
    #[error(
        "switchover-timeout ({} ms) must be longer than downtime-limit ({} ms): the switchover \
         would be aborted before it could meet the limit",
        .switchover.as_millis(),
        .limit.as_millis()
    )]
    SwitchoverBelowLimit {
        /// The switchover timeout.
        switchover: Duration,
        /// The downtime limit.
        limit: Duration,
    },
    /// Postcopy was to place pages through the memory file, but guest memory has none (an
    /// engine bug: only memfd memory is placed that way).
    #[error(
        "postcopy was to write pages into the guest memory file, but guest memory has no file"
    )]
    NoMemoryFile,
    /// Dirty tracking was gone while precopy needed it (an engine bug).
    #[error("dirty tracking stopped while the migration still needed it")]
    NotTracking,
    /// A sender was stopped because the migration is ending.
    #[error("the migration is ending")]
    Stopping,
    /// A channel's TLS handshake failed (a certificate refused either way, or a peer that
    /// does not speak TLS).
    #[error("{channel} channel: {source}")]
    Tls {
        /// Which channel.
        channel: Channel,
        /// Why.
        source: TlsError,
    },
    /// A local hand-over passes file descriptors, which a TLS stream cannot carry.
    #[error(
        "--local and --tls-dir do not go together: a local hand-over passes the memory file \
         over a unix socket to a process on this host"
    )]
    LocalWithTls,
    /// The destination did not accept the compression asked for.
    #[error("the destination does not accept {asked} compression")]
    CompressionRefused {
        /// What was asked (`--compress`).
        asked: String,
    },
    /// Pages arrived without the checksums the handshake agreed on.
    #[error(
        "{channel} channel: a {kind} frame came without page checksums, though they were agreed"
    )]
    MissingPageSums {
        /// Which channel.
        channel: Channel,
        /// Pages or Compressed.
        kind: &'static str,
    },
    /// A page's checksum did not match and no good copy followed: corrupted in transit.
    #[error(
        "page at guest address {gpa:#x} arrived corrupted on data {channel} channel (stream \
         offset {offset}: checksum mismatch) and was never sent again intact"
    )]
    CorruptPage {
        /// Which data channel.
        channel: u16,
        /// The page.
        gpa: u64,
        /// Byte offset of the page's data in the channel's stream.
        offset: u64,
    },
    /// A compressed batch was corrupted: it did not decompress, or a page's checksum did
    /// not match.
    #[error(
        "compressed pages corrupted on data {channel} channel at stream offset {offset}: {why}"
    )]
    CorruptBatch {
        /// Which data channel.
        channel: u16,
        /// Byte offset of the batch's payload in the channel's stream.
        offset: u64,
        /// What was wrong.
        why: String,
    },
    /// Postcopy was asked for, but the destination does not offer it.
    #[error(
        "the destination does not accept postcopy (its memory backend is hugetlb or locked, \
         or it is a local hand-over); migrate without postcopy"
    )]
    PostcopyRefused,
    /// Postcopy was asked for with a local hand-over, which copies no page.
    #[error("--local hands the memory over without copying it: postcopy does not apply")]
    LocalWithPostcopy,
    /// `migrate-start-postcopy` for a migration that did not enable postcopy.
    #[error("this migration was started without postcopy")]
    PostcopyNotEnabled,
    /// A userfaultfd operation failed on the destination.
    #[error("postcopy: {what}: {source}")]
    Uffd {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: ferry_sys::uffd::UffdError,
    },
    /// A page that a running guest needs came corrupted: it cannot be placed.
    #[error(
        "postcopy: the page at guest address {gpa:#x} arrived corrupted on the {channel} channel \
         (checksum mismatch)"
    )]
    CorruptPostcopyPage {
        /// Which channel.
        channel: Channel,
        /// The page.
        gpa: u64,
    },
    /// Local I/O (digest files, threads).
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}

impl MigrateError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
        let what = what.into();
        move |source| MigrateError::Io { what, source }
    }

    /// A main-channel read that failed: the peer (`"source"` or `"destination"`) closed it,
    /// or sent something undecodable.
    pub(crate) fn main_read(peer: &'static str, e: ProtoError, phase: &'static str) -> Self {
        match e {
            ProtoError::Eof => MigrateError::Closed {
                side: peer,
                channel: Channel::Main,
                phase,
            },
            source => MigrateError::Receive {
                channel: Channel::Main,
                phase,
                source,
            },
        }
    }

    /// A main-channel message with no place in `phase`. The peer's own `Error` (and a
    /// destination's `Refuse`) is reported as what it is.
    pub(crate) fn main_unexpected(peer: &'static str, m: Message, phase: &'static str) -> Self {
        match m {
            Message::Error { reason } => MigrateError::Peer { side: peer, reason },
            Message::Refuse { reason } if peer == "destination" => MigrateError::Refused(reason),
            m => MigrateError::Unexpected {
                message: m.name(),
                phase,
                channel: Channel::Main,
            },
        }
    }

    /// Whether the peer already knows (it sent the reason), so telling it is pointless.
    pub(crate) fn came_from_peer(&self) -> bool {
        matches!(self, MigrateError::Peer { .. } | MigrateError::Refused(_))
    }
}
