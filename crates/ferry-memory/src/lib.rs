//! Guest memory, dirty tracking and memory preparation.
//!
//! - [`ram`]: guest RAM regions (anonymous, memfd or hugetlb; optional THP) with a
//!   dirty bitmap for the VMM's own writes.
//! - [`dirty`]: KVM dirty log (manual-protect, initially-set, chunked clear) merged with the
//!   VMM's writes, pass by pass.
//! - [`prepare`]: multithreaded population/locking/pinning of memory in chunks, with undo.

pub mod dirty;
pub mod prepare;
pub mod ram;
