//! Low-level wrappers over KVM, userfaultfd and memory/scheduling syscalls.
//!
//! This is the only crate in Ferry with `unsafe` code; every block carries a `// SAFETY:`
//! comment. Everything above it sees safe functions with typed errors. It fills the gaps of
//! kvm-ioctls (manual-protect dirty log, `KVM_CLEAR_DIRTY_LOG`, vCPU kicking) in its style.

pub mod fd;
pub mod iov;
pub mod kick;
pub mod kvm;
pub mod mm;
pub mod pagehash;
pub mod sched;
pub mod uffd;
