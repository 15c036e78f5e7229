//! What the engine needs from a VM. The test VMM implements these; the engine knows nothing
//! else about it.

use std::sync::Arc;

use ferry_memory::dirty::DirtyLogBackend;
use ferry_memory::ram::GuestRam;
use ferry_proto::{StateSection, VmDescription};

/// An error from the VM side. The engine does not look inside it: it reports it with the
/// operation that failed ([`crate::MigrateError::Vm`]).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct VmError(pub Box<dyn std::error::Error + Send + Sync>);

impl VmError {
    /// Wraps any error of the VMM.
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        VmError(e.into())
    }
}

/// A running VM that can be migrated away.
pub trait MigrationSource: Send + Sync {
    /// Layout, vCPU count and the CPU features the guest sees.
    fn description(&self) -> VmDescription;
    /// Guest RAM.
    fn ram(&self) -> Arc<GuestRam>;
    /// The guest-write dirty log.
    fn dirty_log(&self) -> Arc<dyn DirtyLogBackend>;
    /// Whether the guest is paused right now.
    fn is_paused(&self) -> bool;
    /// Stops the guest (all vCPUs out of the hypervisor).
    fn pause(&self) -> Result<(), VmError>;
    /// Runs the guest again.
    fn resume(&self) -> Result<(), VmError>;
    /// Throttles the vCPUs to `percent` % idle (0 = off).
    fn set_throttle(&self, percent: u8);
    /// Device and vCPU state; called while paused.
    fn save_state(&self) -> Result<Vec<StateSection>, VmError>;
}

/// An empty VM shell that receives a migration.
pub trait MigrationTarget: Send + Sync {
    /// Layout, vCPU count and the CPU features this host can give the guest.
    fn description(&self) -> VmDescription;
    /// Guest RAM.
    fn ram(&self) -> Arc<GuestRam>;
    /// Loads device and vCPU state (the guest stays paused). May be called again by a later
    /// attempt when an earlier one was aborted after loading.
    fn load_state(&self, sections: &[StateSection]) -> Result<(), VmError>;
    /// Runs the guest.
    fn resume(&self) -> Result<(), VmError>;
}
