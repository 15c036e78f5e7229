//! Ferry's live migration engine.
//!
//! The engine moves a VM it sees only through two traits, [`MigrationSource`] and
//! [`MigrationTarget`], over a main channel plus N data channels ([`ferry_proto`] on
//! [`ferry_transport`] sockets). The sender ([`send::migrate`]) and the receiver
//! ([`recv::receive`]) are phase machines, each driven by one event loop: a phase holds its
//! own data and turns each event (a peer's message, a data channel's report, an API
//! [`control::Command`], the clock) into the next phase. A message or command with no
//! meaning in a phase is refused with an error naming both.
//!
//! Precopy: pass 0 sends all RAM, later passes what the dirty log reports. Each guest page
//! always travels on the same data channel (pages are partitioned by 1 MiB chunk), so a
//! page's newer copy can never overtake an older one; `PassEnd` markers tell the
//! destination when a pass is complete on a channel (with its page count, so a lost frame
//! is noticed), and its `Ack`s tell the source that the destination is making progress.
//! `Ping`/`Pong` measure the round trip the downtime estimate counts. Whether to pass
//! again, throttle or switch over is a pure function of what was measured ([`policy`]).
//!
//! Ownership: exactly one side may run the guest at any instant (see `docs/ownership.md`).
//! The source owns it until it has the destination's `Loaded` and has written `Go`; the
//! destination runs it only after `Go`. Every wait has a deadline: a stalled destination
//! fails precopy after the progress timeout, and a switchover not committed within the
//! switchover timeout is aborted with the guest resumed on the source. A hand-over whose
//! `Go` was sent but never confirmed leaves the guest paused on both sides until one side
//! learns the outcome or an operator resumes one side with force.

pub mod channel;
pub mod compat;
pub mod control;
pub mod device;
pub mod digest;
pub mod error;
pub mod files;
pub mod policy;
pub mod progress;
pub mod recv;
pub mod send;
pub mod vm;

mod events;
mod latency;
mod limit;
mod wire;

pub use control::{Command, CommandError, Commander};
pub use device::{DeviceState, MigrationDevice, PrecopyInfo};
pub use error::MigrateError;
pub use progress::{MigrationStats, Progress, ProgressReport, Status};
pub use vm::{MigrationSource, MigrationTarget, VmError};

/// Pages per chunk: the unit of channel partitioning and of `KVM_CLEAR_DIRTY_LOG`.
pub const CHUNK_PAGES: u64 = ferry_memory::dirty::DEFAULT_CHUNK_PAGES;
