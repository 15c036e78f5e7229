//! What the engine needs from a VM. The test VMM implements these; the engine knows nothing
//! else about it.

use std::sync::Arc;

use ferry_memory::dirty::DirtyLogBackend;
use ferry_memory::ram::GuestRam;
use ferry_proto::{DeviceInfo, VmDescription};

use crate::device::MigrationDevice;

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
    /// Every device and vCPU, each with its own state stream; the order is the one the
    /// destination gets them in.
    fn devices(&self) -> Vec<Arc<dyn MigrationDevice>>;
}

/// An empty VM shell that receives a migration.
pub trait MigrationTarget: Send + Sync {
    /// Layout, vCPU count and the CPU features this host can give the guest.
    fn description(&self) -> VmDescription;
    /// Guest RAM.
    fn ram(&self) -> Arc<GuestRam>;
    /// The devices (and vCPUs) for a source's list, in its order: this VM's own, checked
    /// against what the source describes, or created from their `config` when this VM was
    /// started without them. The error names the device that cannot be had. Called once
    /// per attempt; the engine then moves each to RESUMING.
    fn devices(&self, wanted: &[DeviceInfo]) -> Result<Vec<Arc<dyn MigrationDevice>>, VmError>;
    /// Every device has loaded its stream (each is in STOP): what is VM-wide and must come
    /// after them (the guest clock) is set. The guest stays paused. May be called again by
    /// a later attempt when an earlier one was aborted after it.
    fn finish_load(&self) -> Result<(), VmError>;
    /// Runs the guest.
    fn resume(&self) -> Result<(), VmError>;
}
