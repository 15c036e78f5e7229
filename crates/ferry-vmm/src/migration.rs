//! The test VMM seen through the engine's traits.

use std::sync::Arc;

use ferry_memory::dirty::DirtyLogBackend;
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_migrate::{MigrationSource, MigrationTarget, VmError};
use ferry_proto::{CpuFeature, MemRegion, StateSection, VmDescription};
use ferry_state::MachineState;
use kvm_bindings::kvm_cpuid_entry2;

use crate::vm::{vcpu_cpuid, Vm};

/// Name of the single state section this VMM sends.
pub const MACHINE_SECTION: &str = "machine";

/// The CPUID leaves whose feature bits the guest may rely on: (leaf, subleaf, which of
/// eax/ebx/ecx/edx are feature masks).
const FEATURE_LEAVES: [(u32, u32, [bool; 4]); 4] = [
    (0x1, 0, [false, false, true, true]),
    (0x7, 0, [false, true, true, true]),
    (0xD, 1, [true, false, false, false]),
    (0x8000_0001, 0, [false, false, true, true]),
];

fn features(cpuid: &[kvm_cpuid_entry2]) -> Vec<CpuFeature> {
    FEATURE_LEAVES
        .iter()
        .filter_map(|(leaf, subleaf, mask)| {
            let e = cpuid
                .iter()
                .find(|e| e.function == *leaf && e.index == *subleaf)?;
            let regs = [e.eax, e.ebx, e.ecx, e.edx];
            let mut out = [0u32; 4];
            for i in 0..4 {
                if mask[i] {
                    out[i] = regs[i];
                }
            }
            Some(CpuFeature {
                leaf: *leaf,
                subleaf: *subleaf,
                regs: out,
            })
        })
        .collect()
}

fn describe(vm: &Vm, cpuid: &[kvm_cpuid_entry2]) -> VmDescription {
    VmDescription {
        vcpus: vm.config().vcpus,
        page_size: PAGE_SIZE as u32,
        regions: vm
            .ram()
            .regions()
            .iter()
            .map(|r| MemRegion {
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
        cpu_features: features(cpuid),
    }
}

fn vm_err(e: impl std::error::Error + Send + Sync + 'static) -> VmError {
    VmError::new(e)
}

/// Why a received state cannot be loaded.
#[derive(Debug, thiserror::Error)]
enum SectionError {
    #[error("no '{MACHINE_SECTION}' state section")]
    Missing,
    #[error("unknown state section '{0}'")]
    Unknown(String),
}

/// A [`Vm`] as a migration source or target.
pub struct Migratable(pub Arc<Vm>);

impl MigrationSource for Migratable {
    fn description(&self) -> VmDescription {
        describe(&self.0, &self.0.guest_cpuid())
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.0.ram().clone()
    }

    fn dirty_log(&self) -> Arc<dyn DirtyLogBackend> {
        self.0.dirty_log()
    }

    fn is_paused(&self) -> bool {
        self.0.is_paused()
    }

    fn pause(&self) -> Result<(), VmError> {
        self.0.pause().map_err(vm_err)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.0.resume();
        Ok(())
    }

    fn set_throttle(&self, percent: u8) {
        self.0.vcpus().set_throttle(percent);
    }

    fn save_state(&self) -> Result<Vec<StateSection>, VmError> {
        let data = self
            .0
            .save_state()
            .map_err(vm_err)?
            .encode()
            .map_err(vm_err)?;
        Ok(vec![StateSection {
            name: MACHINE_SECTION.into(),
            data,
        }])
    }
}

impl MigrationTarget for Migratable {
    fn description(&self) -> VmDescription {
        // What this host can give: KVM's supported CPUID with this VMM's own additions, and
        // whatever its vCPUs actually expose (some KVMs, like the one Ferry is tested on,
        // show vCPUs more than KVM_GET_SUPPORTED_CPUID lists).
        let mut cpuid = vcpu_cpuid(self.0.supported_cpuid(), 0, self.0.config().vcpus);
        for g in self.0.guest_cpuid() {
            match cpuid
                .iter_mut()
                .find(|e| e.function == g.function && e.index == g.index)
            {
                Some(e) => {
                    e.eax |= g.eax;
                    e.ebx |= g.ebx;
                    e.ecx |= g.ecx;
                    e.edx |= g.edx;
                }
                None => cpuid.push(g),
            }
        }
        describe(&self.0, &cpuid)
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.0.ram().clone()
    }

    fn load_state(&self, sections: &[StateSection]) -> Result<(), VmError> {
        let machine = sections
            .iter()
            .find(|s| s.name == MACHINE_SECTION)
            .ok_or_else(|| vm_err(SectionError::Missing))?;
        if let Some(other) = sections.iter().find(|s| s.name != MACHINE_SECTION) {
            return Err(vm_err(SectionError::Unknown(other.name.clone())));
        }
        let state = MachineState::decode(&machine.data).map_err(vm_err)?;
        self.0.restore_state(&state).map_err(vm_err)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.0.resume();
        Ok(())
    }
}
