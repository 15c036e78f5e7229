//! Ferry's live migration engine.
//!
//! The engine moves a VM it sees only through two traits, [`MigrationSource`] and
//! [`MigrationTarget`], over a main channel plus N data channels ([`ferry_proto`] on
//! [`ferry_transport`] sockets). The sender ([`send::migrate`]) and the receiver
//! ([`recv::receive`]) are explicit state machines: any message that arrives in a state
//! where it has no meaning aborts the migration with an error naming both.
//!
//! Precopy: pass 0 sends all RAM, later passes what the dirty log reports. Each guest page
//! always travels on the same data channel (pages are partitioned by 1 MiB chunk), so a
//! page's newer copy can never overtake an older one and channels need no cross-channel
//! ordering; `PassEnd` markers tell the destination when a pass is complete on a channel.
//! Switchover happens when the estimated downtime (what is still dirty plus the state,
//! at the measured bandwidth) is under the limit and the destination has acknowledged that
//! its memory is prepared. Vcpu throttling (auto-converge) kicks in when passes stop
//! shrinking.
//!
//! The handover cannot lose the VM: the source pauses, sends the last pages and the state,
//! and waits for the destination's `Loaded`. Only then does it commit and send `Go`; the
//! destination runs the guest only after `Go`. Any failure before the commit resumes the
//! source. A failure after it (the `Go`/`Running` exchange cut) leaves the VM paused on both
//! sides, with the full state on each, for an operator to resume the right one.

pub mod compat;
pub mod error;
pub mod progress;
pub mod recv;
pub mod send;
pub mod vm;

mod limit;

pub use error::MigrateError;
pub use progress::{CancelToken, MigrationStats, Progress, ProgressReport, Status};
pub use vm::{MigrationSource, MigrationTarget, VmError};

/// Pages per chunk: the unit of channel partitioning and of `KVM_CLEAR_DIRTY_LOG`.
pub const CHUNK_PAGES: u64 = ferry_memory::dirty::DEFAULT_CHUNK_PAGES;
