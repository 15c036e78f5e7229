//! A KVM virtual machine: guest RAM, in-kernel irqchip and PIT, vCPUs, devices; booting
//! multiboot images; saving and restoring the whole machine; snapshots to a file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ferry_memory::dirty::{DirtyError, DirtyLogBackend};
use ferry_memory::ram::{pc_layout, Backend, GuestRam, MemoryConfig, MemoryError, PAGE_SIZE};
use ferry_state::snapshot::{SnapshotError, SnapshotHeader};
use ferry_state::{MachineState, PlatformState, RegionLayout, StateError, VcpuState, VmState};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_segment, CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{Devices, SerialSink};
use crate::multiboot::{self, MultibootError, BOOTLOADER_MAGIC};
use crate::vcpu::{self, EventSink, VcpuError, VcpuManager};

/// Where the boot GDT goes (below the image, in conventional memory).
const BOOT_GDT: u64 = 0x500;
/// KVM's TSS and identity-map pages, in the hole below 4 GiB.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Errors creating, booting, saving or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM is not usable.
    #[error("cannot use KVM: {0}")]
    NoKvm(String),
    /// A KVM VM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// Operation.
        op: &'static str,
        /// OS error.
        source: kvm_ioctls::Error,
    },
    /// Low-level KVM wrapper error.
    #[error(transparent)]
    Sys(#[from] ferry_sys::kvm::KvmError),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Image loading.
    #[error(transparent)]
    Multiboot(#[from] MultibootError),
    /// vCPU control or state.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// State encoding.
    #[error(transparent)]
    State(#[from] StateError),
    /// Snapshot file.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// State that does not fit this VM.
    #[error("state does not match this VM: {0}")]
    Mismatch(String),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// What to build.
#[derive(Debug, Clone, Copy)]
pub struct VmConfig {
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// A virtual machine.
pub struct Vm {
    vm: Arc<ferry_sys::kvm::Vm<AtomicBitmap>>,
    ram: Arc<GuestRam>,
    vcpus: VcpuManager,
    devices: Arc<Devices>,
    msrs: Vec<u32>,
    supported_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    // What vCPU 0 reports, read while it is not running: reading it later would have to
    // wait for the vCPU thread to leave KVM_RUN.
    guest_cpuid: std::sync::Mutex<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    manual_dirty_log: u64,
    config: VmConfig,
    // Kept open for the VM's lifetime (KVM ioctls on the system fd).
    _kvm: Kvm,
}

fn lapic_set_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        if let Some(slot) = lapic.regs.get_mut(offset + i) {
            *slot = *b as _;
        }
    }
}

fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, out) in b.iter_mut().enumerate() {
        *out = lapic.regs.get(offset + i).map(|v| *v as u8).unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// CPUID for vCPU `id` of `count`: APIC IDs, logical CPU count, hypervisor bit.
pub(crate) fn vcpu_cpuid(
    base: &[kvm_bindings::kvm_cpuid_entry2],
    id: u32,
    count: u32,
) -> Vec<kvm_bindings::kvm_cpuid_entry2> {
    base.iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_FFFF) | (id << 24) | (count.min(255) << 16);
                    if count > 1 {
                        e.edx |= 1 << 28;
                    }
                    e.ecx |= 1 << 31;
                }
                0xB | 0x1F => e.edx = id,
                _ => {}
            }
            e
        })
        .collect()
}

impl Vm {
    /// Creates the VM: RAM, irqchip, PIT and vCPUs (not running).
    pub fn create(config: VmConfig, serial: SerialSink) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::NoKvm(format!("opening /dev/kvm: {e}")))?;
        let max = kvm.get_max_vcpus() as u32;
        if config.vcpus == 0 || config.vcpus > max {
            return Err(VmError::Config(format!(
                "--vcpus {} is out of range (1..={max} on this host)",
                config.vcpus
            )));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let vm = Arc::new(ferry_sys::kvm::Vm::new(fd));
        vm.fd()
            .set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.fd()
            .set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.fd()
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.fd()
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        // Manual protect must be on before any slot logs; without it we fall back to the
        // legacy log (correct, just not chunked).
        let manual_dirty_log = vm.enable_manual_dirty_log().unwrap_or(0);
        let xsave = ferry_sys::kvm::xsave_size(vm.fd());
        if xsave > std::mem::size_of::<kvm_bindings::kvm_xsave>() {
            return Err(VmError::Config(format!(
                "this host's XSAVE state is {xsave} bytes (AMX?); only 4 KiB is supported"
            )));
        }

        let ram = Arc::new(GuestRam::new(config.memory)?);
        for r in ram.regions() {
            let backing = ram
                .mmap_region(r.index)
                .ok_or_else(|| VmError::Config(format!("no mapping for region {}", r.index)))?;
            vm.add_slot(r.index as u32, r.gpa, backing, false)?;
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let supported_cpuid = supported.as_slice().to_vec();
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut fds = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = CpuId::from_entries(&vcpu_cpuid(&supported_cpuid, id, config.vcpus))
                .map_err(|e| VmError::Config(format!("CPUID: {e:?}")))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            // Virtual-wire mode as firmware leaves it: LINT0 = ExtINT, LINT1 = NMI.
            let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            let lint0 = lapic_reg(&lapic, 0x350);
            let lint1 = lapic_reg(&lapic, 0x360);
            lapic_set_reg(&mut lapic, 0x350, (lint0 & !0x700) | (7 << 8));
            lapic_set_reg(&mut lapic, 0x360, (lint1 & !0x700) | (4 << 8));
            fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            fds.push(fd);
        }
        let msrs = fds
            .first()
            .map(|fd| vcpu::readable_msrs(fd, msr_list.as_slice()))
            .unwrap_or_default();
        let guest_cpuid = fds
            .first()
            .and_then(|fd| fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).ok())
            .map(|c| c.as_slice().to_vec())
            .unwrap_or_default();
        let devices = Arc::new(Devices::new(ram.clone(), serial));
        Ok(Vm {
            guest_cpuid: std::sync::Mutex::new(guest_cpuid),
            vm,
            ram,
            vcpus: VcpuManager::new(fds),
            devices,
            msrs,
            supported_cpuid,
            manual_dirty_log,
            config,
            _kvm: kvm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &VcpuManager {
        &self.vcpus
    }

    /// CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.supported_cpuid
    }

    /// The CPUID vCPU 0 has (as KVM reports it back).
    pub fn guest_cpuid(&self) -> Vec<kvm_bindings::kvm_cpuid_entry2> {
        self.guest_cpuid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The MSRs saved per vCPU.
    pub fn saved_msrs(&self) -> &[u32] {
        &self.msrs
    }

    /// The KVM dirty log of this VM's RAM.
    pub fn dirty_log(&self) -> Arc<KvmDirtyLog> {
        Arc::new(KvmDirtyLog {
            vm: self.vm.clone(),
            regions: self.ram.regions().len(),
            manual: self.manual_dirty_log & ferry_sys::kvm::MANUAL_PROTECT_ENABLE != 0,
            initially_set: self.manual_dirty_log & ferry_sys::kvm::DIRTY_LOG_INITIALLY_SET != 0,
        })
    }

    /// Loads a multiboot image and points the boot vCPU at it. `image_name` goes first on
    /// the command line, as QEMU does.
    pub fn boot(&self, image: &[u8], image_name: &str, append: &str) -> Result<(), VmError> {
        let ranges: Vec<(u64, u64)> = self.ram.regions().iter().map(|r| (r.gpa, r.size)).collect();
        let cmdline = if append.is_empty() {
            image_name.to_string()
        } else {
            format!("{image_name} {append}")
        };
        let plan = multiboot::plan(image, &ranges, &cmdline)?;
        let mem = self.ram.mem();
        for s in plan.segments.iter().chain(std::iter::once(&plan.info)) {
            mem.write_slice(&s.data, GuestAddress(s.gpa))
                .map_err(|e| VmError::Config(format!("loading at {:#x}: {e}", s.gpa)))?;
            // Fresh guest RAM is already zero, which covers the bss.
        }
        // Flat GDT: null, 32-bit code (0x08), data (0x10).
        let gdt: [u64; 3] = [0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
        for (i, e) in gdt.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))
                .map_err(|e| VmError::Config(format!("writing the boot GDT: {e}")))?;
        }
        self.vcpus
            .with_fd(0, |fd| setup_boot_vcpu(fd, plan.entry, plan.info_addr))
            .ok_or_else(|| VmError::Config("no vCPU 0".into()))?
    }

    /// Starts the vCPU threads (paused); `resume` runs the guest.
    pub fn start(&self, events: EventSink) -> Result<(), VmError> {
        Ok(self.vcpus.start(self.devices.clone(), events)?)
    }

    /// Stops every vCPU outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VmError> {
        Ok(self.vcpus.pause()?)
    }

    /// Runs the guest.
    pub fn resume(&self) {
        // Devices first: a vCPU may touch one at once.
        self.devices.run_testdevs();
        self.vcpus.resume();
    }

    /// The emulated devices.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Adds a test device (`--device testdev,...`, or one a migration source has).
    pub fn add_testdev(
        &self,
        index: usize,
        config: crate::testdev::TestDevConfig,
    ) -> Result<Arc<crate::testdev::TestDev>, crate::testdev::TestDevError> {
        self.devices.add_testdev(index, config)
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// Stops the vCPU threads for good.
    pub fn shutdown(&self) {
        self.vcpus.shutdown();
    }

    /// Saves the whole machine (not RAM). The VM must be paused.
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        if !self.vcpus.is_paused() {
            return Err(VmError::Config("save_state needs a paused VM".into()));
        }
        let vcpus = (0..self.vcpus.count())
            .map(|i| self.save_vcpu(i))
            .collect::<Result<Vec<_>, _>>()?;
        let p = self.save_platform()?;
        Ok(MachineState {
            memory: p.memory,
            vcpus,
            vm: p.vm,
            devices: p.devices,
        })
    }

    /// Saves one vCPU (the VM must be paused). vCPUs save independently of each other, so
    /// a migration saves them side by side.
    pub fn save_vcpu(&self, i: usize) -> Result<VcpuState, VmError> {
        self.vcpus
            .with_fd(i, |fd| {
                vcpu::save_vcpu(fd, i as u32, &self.msrs, KVM_MAX_CPUID_ENTRIES)
            })
            .ok_or_else(|| VmError::Config(format!("no vCPU {i}")))?
            .map_err(VmError::from)
    }

    /// Restores one vCPU (the VM must not run).
    pub fn restore_vcpu(&self, i: usize, v: &VcpuState) -> Result<(), VmError> {
        self.vcpus
            .with_fd(i, |fd| vcpu::restore_vcpu(self.vm.fd(), fd, v))
            .ok_or_else(|| VmError::Config(format!("no vCPU {i}")))?
            .map_err(VmError::from)
    }

    /// Saves what is VM-wide: irqchips, PIT, clock, emulated devices (after the vCPUs are
    /// paused).
    pub fn save_platform(&self) -> Result<PlatformState, VmError> {
        let fd = self.vm.fd();
        let chip = |id: u32| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let vm = VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        };
        Ok(PlatformState {
            memory: self.layout(),
            vm,
            devices: self.devices.state(),
        })
    }

    fn layout(&self) -> Vec<RegionLayout> {
        self.ram
            .regions()
            .iter()
            .map(|r| RegionLayout {
                gpa: r.gpa,
                size: r.size,
            })
            .collect()
    }

    /// Restores a saved machine into this VM (same layout and vCPU count), which must not
    /// be running.
    pub fn restore_state(&self, s: &MachineState) -> Result<(), VmError> {
        if !self.vcpus.is_paused() {
            return Err(VmError::Config("restore_state needs a paused VM".into()));
        }
        self.check_layout(&s.memory)?;
        if s.vcpus.len() != self.vcpus.count() {
            return Err(VmError::Mismatch(format!(
                "{} vCPUs saved, this VM has {}",
                s.vcpus.len(),
                self.vcpus.count()
            )));
        }
        for (i, v) in s.vcpus.iter().enumerate() {
            self.restore_vcpu(i, v)?;
        }
        self.restore_platform(&s.vm, &s.devices)
    }

    /// Refuses a state saved from another memory layout.
    pub fn check_layout(&self, memory: &[RegionLayout]) -> Result<(), VmError> {
        if memory != self.layout() {
            return Err(VmError::Mismatch(format!(
                "memory layout {:?} vs this VM's {:?}",
                memory,
                self.layout()
            )));
        }
        Ok(())
    }

    /// Restores what is VM-wide, after the vCPUs: irqchips, PIT, devices, and the KVM clock
    /// last (guest time resumes from the saved value).
    pub fn restore_platform(
        &self,
        vm: &VmState,
        devices: &ferry_state::DeviceState,
    ) -> Result<(), VmError> {
        let s = (vm, devices);
        let fd = self.vm.fd();
        fd.set_pit2(&s.0.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        for chip in [&s.0.pic_master, &s.0.pic_slave, &s.0.ioapic] {
            fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.devices.set_state(s.1);
        if let Some(Ok(c)) = self
            .vcpus
            .with_fd(0, |fd| fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))
        {
            *self.guest_cpuid.lock().unwrap_or_else(|e| e.into_inner()) = c.as_slice().to_vec();
        }
        // Guest time continues from the saved value, like the TSC restored through its MSR.
        let mut clock = s.0.clock;
        clock.flags = 0;
        fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Writes a snapshot of the running or paused VM to `path` (pausing it meanwhile).
    pub fn snapshot(&self, path: &Path) -> Result<(), VmError> {
        let was_running = !self.vcpus.is_paused();
        if was_running {
            self.pause()?;
        }
        let result = self.write_snapshot(path);
        if was_running {
            self.resume();
        }
        result
    }

    /// Writes the snapshot to a new temporary file beside `path` (never an existing file or
    /// a symlink planted at its name), then renames it into place.
    fn write_snapshot(&self, path: &Path) -> Result<(), VmError> {
        let (file, tmp) =
            ferry_migrate::files::create_temp_beside(path).map_err(|source| SnapshotError::Io {
                what: "creating the snapshot file",
                path: path.to_path_buf(),
                source,
            })?;
        let r = self.write_snapshot_to(file, &tmp, path);
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    fn write_snapshot_to(&self, file: File, tmp: &Path, path: &Path) -> Result<(), VmError> {
        let io = |what: &'static str| {
            move |source| SnapshotError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let state = self.save_state()?.encode()?;
        let regions: Vec<(u64, u64)> = self.ram.regions().iter().map(|r| (r.gpa, r.size)).collect();
        let mut header = SnapshotHeader::layout(state.len() as u64, &regions);
        header.state_crc = crc32fast::hash(&state);
        let end = header
            .regions
            .last()
            .map(|r| r.file_offset + r.size)
            .unwrap_or(header.state_offset + header.state_len);
        file.set_len(end).map_err(io("sizing the snapshot file"))?;
        file.write_all_at(&state, header.state_offset)
            .map_err(io("writing the state"))?;
        let mut buf = vec![0u8; 1 << 20];
        for (i, r) in self.ram.regions().iter().enumerate() {
            let mut crc = crc32fast::Hasher::new();
            let mut off = 0u64;
            while off < r.size {
                let len = (r.size - off).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..len];
                self.ram.slice(r.gpa + off, len)?.copy_to(&mut chunk[..]);
                crc.update(chunk);
                // Zero pages stay holes in the (pre-sized) file.
                write_nonzero_pages(&file, chunk, header.regions[i].file_offset + off)
                    .map_err(io("writing guest memory"))?;
                off += len as u64;
            }
            header.regions[i].crc = crc.finalize();
        }
        file.write_all_at(&header.encode(), 0)
            .map_err(io("writing the header"))?;
        file.sync_all().map_err(io("syncing the snapshot file"))?;
        std::fs::rename(tmp, path).map_err(io("renaming the snapshot file into place"))?;
        Ok(())
    }

    /// Creates a VM from a snapshot file: layout and vCPU count come from the file; the
    /// backend from `backend`/`thp`. The VM is paused; call `start` and `resume`.
    pub fn from_snapshot(
        path: &Path,
        backend: Backend,
        thp: bool,
        serial: SerialSink,
    ) -> Result<Vm, VmError> {
        let io = |what: &'static str| {
            move |source| SnapshotError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = File::open(path).map_err(io("opening the snapshot file"))?;
        let len = file
            .metadata()
            .map_err(io("reading the snapshot file's size"))?
            .len();
        let header = SnapshotHeader::read_from(&mut file, len)?;
        let mut state_bytes = vec![0u8; header.state_len as usize];
        file.read_exact_at(&mut state_bytes, header.state_offset)
            .map_err(io("reading the state"))?;
        if crc32fast::hash(&state_bytes) != header.state_crc {
            return Err(SnapshotError::Corrupt("state checksum mismatch".into()).into());
        }
        let state = MachineState::decode(&state_bytes)?;
        let total: u64 = header.regions.iter().map(|r| r.size).sum();
        let file_layout: Vec<(u64, u64)> = header.regions.iter().map(|r| (r.gpa, r.size)).collect();
        if file_layout != pc_layout(total) {
            return Err(SnapshotError::Corrupt(format!(
                "memory layout {file_layout:?} is not the layout of {total} bytes of RAM"
            ))
            .into());
        }
        let vm = Vm::create(
            VmConfig {
                memory: MemoryConfig {
                    size: total,
                    backend,
                    thp,
                },
                vcpus: state.vcpus.len() as u32,
            },
            serial,
        )?;
        let mut buf = vec![0u8; 1 << 20];
        for r in &header.regions {
            let mut crc = crc32fast::Hasher::new();
            let mut off = 0u64;
            while off < r.size {
                let len = (r.size - off).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..len];
                file.read_exact_at(chunk, r.file_offset + off)
                    .map_err(io("reading guest memory"))?;
                crc.update(chunk);
                for (p, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                    if page.iter().any(|b| *b != 0) {
                        let gpa = r.gpa + off + (p as u64) * PAGE_SIZE;
                        vm.ram
                            .mem()
                            .write_slice(page, GuestAddress(gpa))
                            .map_err(|e| VmError::Config(format!("restoring {gpa:#x}: {e}")))?;
                    }
                }
                off += len as u64;
            }
            if crc.finalize() != r.crc {
                return Err(SnapshotError::Corrupt(format!(
                    "memory at {:#x} ({} bytes) fails its checksum",
                    r.gpa, r.size
                ))
                .into());
            }
        }
        vm.restore_state(&state)?;
        Ok(vm)
    }
}

fn write_nonzero_pages(file: &File, chunk: &[u8], file_offset: u64) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let mut run_start: Option<usize> = None;
    let pages = chunk.len().div_ceil(page);
    for p in 0..=pages {
        let nonzero = p < pages
            && chunk[p * page..((p + 1) * page).min(chunk.len())]
                .iter()
                .any(|b| *b != 0);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(p),
            (false, Some(s)) => {
                let end = (p * page).min(chunk.len());
                file.write_all_at(&chunk[s * page..end], file_offset + (s * page) as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Multiboot machine state: 32-bit protected mode, paging off, flat segments, interrupts off,
/// EAX = magic, EBX = information structure.
fn setup_boot_vcpu(fd: &VcpuFd, entry: u32, info_addr: u32) -> Result<(), VmError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs = segment(0x08, 0xB, 1);
    let data = segment(0x10, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        db: 0,
        g: 0,
        ..segment(0, 0xB, 0)
    };
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = 0;
    sregs.idt.limit = 0x3FF;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = u64::from(entry);
    regs.rax = u64::from(BOOTLOADER_MAGIC);
    regs.rbx = u64::from(info_addr);
    regs.rflags = 2;
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// KVM's dirty log for a VM's RAM slots (slot number = region index).
pub struct KvmDirtyLog {
    vm: Arc<ferry_sys::kvm::Vm<AtomicBitmap>>,
    regions: usize,
    manual: bool,
    initially_set: bool,
}

impl DirtyLogBackend for KvmDirtyLog {
    fn start(&self) -> Result<(), DirtyError> {
        for slot in 0..self.regions as u32 {
            self.vm
                .set_dirty_logging(slot, true)
                .map_err(|e| DirtyError::Backend(e.to_string()))?;
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), DirtyError> {
        for slot in 0..self.regions as u32 {
            self.vm
                .set_dirty_logging(slot, false)
                .map_err(|e| DirtyError::Backend(e.to_string()))?;
        }
        Ok(())
    }

    fn initially_set(&self) -> bool {
        self.initially_set
    }

    fn fetch(&self, region: usize, bitmap: &mut [u64]) -> Result<(), DirtyError> {
        // Without manual protect this GET also re-protects, which is still correct: pages are
        // read after it. Clearing then has nothing to do.
        self.vm
            .get_dirty_log(region as u32, bitmap)
            .map_err(|e| DirtyError::Backend(e.to_string()))
    }

    fn clear(
        &self,
        region: usize,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<(), DirtyError> {
        if !self.manual {
            return Ok(());
        }
        self.vm
            .clear_dirty_log(region as u32, first_page, num_pages, bitmap)
            .map_err(|e| DirtyError::Backend(e.to_string()))
    }
}
