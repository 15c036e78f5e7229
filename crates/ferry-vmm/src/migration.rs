//! The test VMM seen through the engine's traits: its devices, each vCPU and the VM-wide
//! state are each a [`MigrationDevice`] with its own stream, so a migration saves and loads
//! them side by side.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_memory::dirty::DirtyLogBackend;
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_migrate::VmError;
use ferry_migrate::{DeviceState, MigrationDevice, MigrationSource, MigrationTarget, PrecopyInfo};
use ferry_proto::{CpuFeature, DeviceInfo, MemRegion, VmDescription};
use ferry_state::{decode_part, encode_part, PlatformState, PLATFORM_MAGIC, VCPU_MAGIC};
use kvm_bindings::kvm_cpuid_entry2;

use crate::testdev::TestDevConfig;
use crate::vm::{vcpu_cpuid, Vm};

/// Name of the VM-wide part (irqchips, PIT, clock, UART, DMA device).
pub const PLATFORM_DEVICE: &str = "platform";
/// What a vCPU's (or the platform's) state is expected to take on the wire, before it is
/// saved.
const PART_STATE_ESTIMATE: u64 = 16 << 10;
/// What loading one vCPU (or the platform) costs a destination, as reported for the
/// downtime estimate.
const SMALL_LOAD_COST: Duration = Duration::from_micros(200);
/// Most a vCPU's or the platform's stream may hold (a vCPU's state is about 20 KiB): a
/// source cannot make the destination buffer more.
const MAX_PART: usize = 4 << 20;

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

/// Why the destination cannot have the source's devices, or load one.
#[derive(Debug, thiserror::Error)]
enum PartError {
    #[error("device '{0}': the source has it, this VM cannot create it")]
    Unknown(String),
    #[error("device '{name}': configured differently here ({here}) than on the source ({there})")]
    Differs {
        name: String,
        here: String,
        there: String,
    },
    #[error("device '{0}': this VM has it, the source does not")]
    Extra(String),
    #[error("device '{0}': bad configuration from the source: {1}")]
    Config(String, String),
    #[error("{0}: no state arrived before its end")]
    Empty(String),
    #[error("{0}: its state stream is larger than any state ({1} bytes)")]
    TooLong(String, usize),
    #[error("the platform state never loaded")]
    NoPlatform,
}

/// A part saved whole at STOP_COPY and loaded whole at STOP: a vCPU or the platform.
#[derive(Default)]
struct Blob {
    /// Source: the saved state, and how much of it was read.
    saved: Vec<u8>,
    read: usize,
    /// Destination: what has arrived.
    received: Vec<u8>,
}

fn lock(b: &Mutex<Blob>) -> MutexGuard<'_, Blob> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

impl Blob {
    fn read(&mut self, out: &mut Vec<u8>, max: usize) -> usize {
        let rest = self.saved.get(self.read..).unwrap_or_default();
        let n = rest.len().min(max);
        out.extend_from_slice(rest.get(..n).unwrap_or_default());
        self.read += n;
        n
    }

    fn write(&mut self, name: &str, data: &[u8]) -> Result<(), VmError> {
        let len = self.received.len() + data.len();
        if len > MAX_PART {
            return Err(vm_err(PartError::TooLong(name.into(), len)));
        }
        self.received.extend_from_slice(data);
        Ok(())
    }

    /// What arrived, taken; an empty stream is an error.
    fn take(&mut self, name: &str) -> Result<Vec<u8>, VmError> {
        let got = std::mem::take(&mut self.received);
        if got.is_empty() {
            return Err(vm_err(PartError::Empty(name.into())));
        }
        Ok(got)
    }
}

/// What a small part saves at STOP_COPY and loads at STOP, whole.
trait Whole: Send + Sync {
    fn save(&self) -> Result<Vec<u8>, VmError>;
    fn load(&self, bytes: &[u8]) -> Result<(), VmError>;
}

/// A part of the machine small enough to save and load whole (a vCPU, the platform): its
/// stream is its state saved at STOP_COPY, its load is at STOP.
struct SmallPart<W> {
    name: String,
    whole: W,
    blob: Mutex<Blob>,
}

impl<W: Whole> SmallPart<W> {
    fn new(name: String, whole: W) -> Arc<Self> {
        Arc::new(SmallPart {
            name,
            whole,
            blob: Mutex::new(Blob::default()),
        })
    }
}

impl<W: Whole> MigrationDevice for SmallPart<W> {
    fn name(&self) -> &str {
        &self.name
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn set_state(&self, to: DeviceState) -> Result<(), VmError> {
        let mut b = lock(&self.blob);
        match to {
            DeviceState::StopCopy => {
                b.saved = self.whole.save()?;
                b.read = 0;
            }
            DeviceState::Stop => {
                let bytes = b.take(&self.name)?;
                self.whole.load(&bytes)?;
            }
            DeviceState::Running | DeviceState::PreCopy | DeviceState::Resuming => {
                *b = Blob::default();
            }
        }
        Ok(())
    }
    fn read(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, VmError> {
        Ok(lock(&self.blob).read(out, max))
    }
    fn precopy_info(&self) -> PrecopyInfo {
        PrecopyInfo::default()
    }
    fn stop_copy_size(&self) -> u64 {
        PART_STATE_ESTIMATE
    }
    fn load_cost(&self) -> Duration {
        SMALL_LOAD_COST
    }
    fn write(&self, data: &[u8]) -> Result<(), VmError> {
        lock(&self.blob).write(&self.name, data)
    }
    fn small(&self) -> bool {
        true
    }
}

/// One vCPU: its registers, saved and restored on their own.
struct Vcpu {
    vm: Arc<Vm>,
    index: usize,
}

impl Whole for Vcpu {
    fn save(&self) -> Result<Vec<u8>, VmError> {
        let s = self.vm.save_vcpu(self.index).map_err(vm_err)?;
        encode_part(&VCPU_MAGIC, &s).map_err(vm_err)
    }
    fn load(&self, bytes: &[u8]) -> Result<(), VmError> {
        let s = decode_part(&VCPU_MAGIC, bytes).map_err(vm_err)?;
        self.vm.restore_vcpu(self.index, &s).map_err(vm_err)
    }
}

/// What is VM-wide: irqchips, PIT, clock and the emulated UART and DMA device. Loaded
/// (decoded and checked) at STOP, applied by `finish_load` after every vCPU.
struct Platform {
    vm: Arc<Vm>,
    loaded: Mutex<Option<PlatformState>>,
}

impl Whole for Platform {
    fn save(&self) -> Result<Vec<u8>, VmError> {
        let s = self.vm.save_platform().map_err(vm_err)?;
        encode_part(&PLATFORM_MAGIC, &s).map_err(vm_err)
    }
    fn load(&self, bytes: &[u8]) -> Result<(), VmError> {
        let s: PlatformState = decode_part(&PLATFORM_MAGIC, bytes).map_err(vm_err)?;
        self.vm.check_layout(&s.memory).map_err(vm_err)?;
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        Ok(())
    }
}

/// A [`Vm`] as a migration source or target: the same parts serve both.
pub struct Migratable {
    vm: Arc<Vm>,
    vcpus: Vec<Arc<SmallPart<Vcpu>>>,
    platform: Arc<SmallPart<Platform>>,
}

impl Migratable {
    /// The VM's migration view.
    pub fn new(vm: Arc<Vm>) -> Migratable {
        let vcpus = (0..vm.config().vcpus as usize)
            .map(|index| {
                let whole = Vcpu {
                    vm: vm.clone(),
                    index,
                };
                SmallPart::new(format!("vcpu{index}"), whole)
            })
            .collect();
        let whole = Platform {
            vm: vm.clone(),
            loaded: Mutex::new(None),
        };
        let platform = SmallPart::new(PLATFORM_DEVICE.to_owned(), whole);
        Migratable {
            vm,
            vcpus,
            platform,
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Every part: vCPUs, the platform, then the test devices.
    fn parts(&self) -> Vec<Arc<dyn MigrationDevice>> {
        let mut out: Vec<Arc<dyn MigrationDevice>> = Vec::new();
        out.extend(
            self.vcpus
                .iter()
                .map(|v| v.clone() as Arc<dyn MigrationDevice>),
        );
        out.push(self.platform.clone());
        out.extend(
            self.vm
                .devices()
                .testdevs()
                .into_iter()
                .map(|d| d as Arc<dyn MigrationDevice>),
        );
        out
    }

    /// This VM's part named like the source's, or a test device created from its config.
    fn part_for(
        &self,
        mine: &[Arc<dyn MigrationDevice>],
        w: &DeviceInfo,
    ) -> Result<Arc<dyn MigrationDevice>, VmError> {
        let index = w
            .name
            .strip_prefix("testdev")
            .and_then(|i| i.parse::<usize>().ok());
        let adopted = index.is_some_and(|i| self.vm.devices().is_adopted(i));
        if let Some(d) = mine.iter().find(|d| d.name() == w.name) {
            // One an earlier attempt created from another source's description is replaced.
            if d.config() != w.config && !adopted {
                let show = |c: &[u8]| match TestDevConfig::decode(c) {
                    Ok(c) => c.to_string(),
                    Err(_) => format!("{} bytes", c.len()),
                };
                return Err(vm_err(PartError::Differs {
                    name: w.name.clone(),
                    here: show(&d.config()),
                    there: show(&w.config),
                }));
            }
            if d.config() == w.config {
                return Ok(d.clone());
            }
        }
        let index = index.ok_or_else(|| vm_err(PartError::Unknown(w.name.clone())))?;
        let config = TestDevConfig::decode(&w.config)
            .map_err(|e| vm_err(PartError::Config(w.name.clone(), e.to_string())))?;
        let dev = self
            .vm
            .devices()
            .adopt_testdev(index, config)
            .map_err(vm_err)?;
        Ok(dev)
    }
}

impl MigrationSource for Migratable {
    fn description(&self) -> VmDescription {
        describe(&self.vm, &self.vm.guest_cpuid())
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.vm.ram().clone()
    }

    fn dirty_log(&self) -> Arc<dyn DirtyLogBackend> {
        self.vm.dirty_log()
    }

    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    fn pause(&self) -> Result<(), VmError> {
        self.vm.pause().map_err(vm_err)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.vm.resume();
        Ok(())
    }

    fn set_throttle(&self, percent: u8) {
        self.vm.vcpus().set_throttle(percent);
    }

    fn devices(&self) -> Vec<Arc<dyn MigrationDevice>> {
        self.parts()
    }
}

impl MigrationTarget for Migratable {
    fn description(&self) -> VmDescription {
        // What this host can give: KVM's supported CPUID with this VMM's own additions, and
        // whatever its vCPUs actually expose (some KVMs, like the one Ferry is tested on,
        // show vCPUs more than KVM_GET_SUPPORTED_CPUID lists).
        let mut cpuid = vcpu_cpuid(self.vm.supported_cpuid(), 0, self.vm.config().vcpus);
        for g in self.vm.guest_cpuid() {
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
        describe(&self.vm, &cpuid)
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.vm.ram().clone()
    }

    fn devices(&self, wanted: &[DeviceInfo]) -> Result<Vec<Arc<dyn MigrationDevice>>, VmError> {
        // Test devices an earlier attempt created and this source lacks go away.
        self.vm
            .devices()
            .drop_adopted(|i| !wanted.iter().any(|w| w.name == format!("testdev{i}")));
        let mine = self.parts();
        if let Some(extra) = mine
            .iter()
            .find(|d| !wanted.iter().any(|w| w.name == d.name()))
        {
            return Err(vm_err(PartError::Extra(extra.name().to_owned())));
        }
        wanted.iter().map(|w| self.part_for(&mine, w)).collect()
    }

    fn finish_load(&self) -> Result<(), VmError> {
        let p = self
            .platform
            .whole
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| vm_err(PartError::NoPlatform))?;
        self.vm.restore_platform(&p.vm, &p.devices).map_err(vm_err)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.vm.resume();
        Ok(())
    }
}
