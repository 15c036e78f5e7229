//! KVM pieces kvm-ioctls does not have: the manual-protect dirty log
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_CLEAR_DIRTY_LOG`), dirty-log reads into
//! caller-owned buffers, and memory slots that keep their backing mapping alive.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::MmapRegion;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: GET no longer re-protects; CLEAR does.
pub const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: the log starts all-dirty, so enabling it write-protects
/// nothing and huge pages split only as their chunk is cleared.
pub const DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;

const PAGE_SIZE: u64 = 4096;

/// Errors of the KVM wrappers; each names the operation and the slot it was for.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: errno::Error,
    },
    /// The caller's arguments are not what KVM accepts.
    #[error("{op}: {detail}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The capability is missing on this host.
    #[error("KVM capability {0} is not supported by this kernel")]
    Unsupported(&'static str),
}

/// One KVM memory slot as registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    /// Slot number.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set.
    pub log_dirty: bool,
}

impl SlotInfo {
    /// Number of 4 KiB pages in the slot.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Number of u64 words a dirty bitmap of this slot needs.
    pub fn bitmap_words(&self) -> usize {
        usize::try_from(self.pages().div_ceil(64)).unwrap_or(usize::MAX)
    }
}

struct Slot<B: Bitmap> {
    info: SlotInfo,
    // Keeps the mapping alive while KVM may access it through `info.host_addr`.
    _backing: Arc<MmapRegion<B>>,
}

/// A VM file descriptor plus the memory slots registered on it.
///
/// Slots hold an `Arc` of their mapping, and `Drop` deletes every slot before the mappings
/// can go away, so KVM never holds a host address that could be unmapped and reused.
pub struct Vm<B: Bitmap> {
    fd: VmFd,
    slots: Mutex<Vec<Slot<B>>>,
}

impl<B: Bitmap> Vm<B> {
    /// Wraps a VM fd that has no memory slots yet.
    pub fn new(fd: VmFd) -> Self {
        Vm {
            fd,
            slots: Mutex::new(Vec::new()),
        }
    }

    /// The underlying kvm-ioctls VM fd, for everything kvm-ioctls does cover.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    fn lock_slots(&self) -> MutexGuard<'_, Vec<Slot<B>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_region(&self, info: &SlotInfo) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: info.slot,
            flags: if info.log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: info.gpa,
            memory_size: info.size,
            userspace_addr: info.host_addr,
        };
        // SAFETY: for a non-empty slot, `host_addr..host_addr+size` is the whole of a live
        // `MmapRegion` whose `Arc` is stored in `self.slots` until the slot is deleted (size 0,
        // see `Drop`), so KVM never gets an address that is not mapped by this process. A
        // deletion (size 0) hands KVM no address at all.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| KvmError::Ioctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }

    /// Registers `backing` as slot `slot` at guest address `gpa`.
    pub fn add_slot(
        &self,
        slot: u32,
        gpa: u64,
        backing: Arc<MmapRegion<B>>,
        log_dirty: bool,
    ) -> Result<SlotInfo, KvmError> {
        let size = backing.size() as u64;
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(KvmError::Invalid {
                op: "KVM_SET_USER_MEMORY_REGION",
                detail: format!("slot {slot}: gpa {gpa:#x} size {size:#x} not page aligned"),
            });
        }
        let info = SlotInfo {
            slot,
            gpa,
            size,
            host_addr: backing.as_ptr() as u64,
            log_dirty,
        };
        let mut slots = self.lock_slots();
        if slots.iter().any(|s| s.info.slot == slot) {
            return Err(KvmError::Invalid {
                op: "KVM_SET_USER_MEMORY_REGION",
                detail: format!("slot {slot} is already registered"),
            });
        }
        self.set_region(&info)?;
        slots.push(Slot {
            info,
            _backing: backing,
        });
        Ok(info)
    }

    /// The registered slots.
    pub fn slots(&self) -> Vec<SlotInfo> {
        self.lock_slots().iter().map(|s| s.info).collect()
    }

    /// Turns dirty logging on or off for one slot (re-registers it with the flag changed).
    pub fn set_dirty_logging(&self, slot: u32, on: bool) -> Result<(), KvmError> {
        let mut slots = self.lock_slots();
        let entry = slots
            .iter_mut()
            .find(|s| s.info.slot == slot)
            .ok_or_else(|| KvmError::Invalid {
                op: "set dirty logging",
                detail: format!("no slot {slot}"),
            })?;
        let mut info = entry.info;
        info.log_dirty = on;
        self.set_region(&info)?;
        entry.info = info;
        Ok(())
    }

    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set when the kernel has it.
    /// Must be called before any slot gets `KVM_MEM_LOG_DIRTY_PAGES`. Returns the mode bits
    /// enabled.
    pub fn enable_manual_dirty_log(&self) -> Result<u64, KvmError> {
        let supported = self
            .fd
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let supported = u64::try_from(supported).unwrap_or(0);
        if supported & MANUAL_PROTECT_ENABLE == 0 {
            return Err(KvmError::Unsupported("MANUAL_DIRTY_LOG_PROTECT2"));
        }
        let mode = supported & (MANUAL_PROTECT_ENABLE | DIRTY_LOG_INITIALLY_SET);
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = mode;
        self.fd.enable_cap(&cap).map_err(|source| KvmError::Ioctl {
            op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
            source,
        })?;
        Ok(mode)
    }

    fn slot_info(&self, slot: u32) -> Result<SlotInfo, KvmError> {
        self.lock_slots()
            .iter()
            .find(|s| s.info.slot == slot)
            .map(|s| s.info)
            .ok_or_else(|| KvmError::Invalid {
                op: "dirty log",
                detail: format!("no slot {slot}"),
            })
    }

    /// `KVM_GET_DIRTY_LOG` into `bitmap` (bit i = page i of the slot). In manual-protect
    /// mode this only copies the bitmap; pages stay dirty until cleared.
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<(), KvmError> {
        let info = self.slot_info(slot)?;
        if bitmap.len() < info.bitmap_words() {
            return Err(KvmError::Invalid {
                op: "KVM_GET_DIRTY_LOG",
                detail: format!(
                    "slot {slot}: bitmap of {} words, {} needed",
                    bitmap.len(),
                    info.bitmap_words()
                ),
            });
        }
        let mut log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `bitmap` is a live, writable buffer of at least one bit per page of the
        // slot (checked above), which is all KVM writes; the struct matches the kernel ABI.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, KVM_GET_DIRTY_LOG(), &mut log) };
        if ret < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_GET_DIRTY_LOG",
                source: errno::Error::last(),
            });
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages whose bits are set in `bitmap`, where
    /// bit i is page `first_page + i` of the slot. KVM requires `first_page` to be a multiple
    /// of 64 and `num_pages` too unless the range ends at the slot's end.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<(), KvmError> {
        let info = self.slot_info(slot)?;
        let end = first_page.checked_add(u64::from(num_pages));
        let valid = first_page.is_multiple_of(64)
            && num_pages > 0
            && end.is_some_and(|e| {
                e <= info.pages() && (num_pages.is_multiple_of(64) || e == info.pages())
            })
            && bitmap.len() as u64 >= u64::from(num_pages).div_ceil(64);
        if !valid {
            return Err(KvmError::Invalid {
                op: "KVM_CLEAR_DIRTY_LOG",
                detail: format!(
                    "slot {slot} ({} pages): range {first_page}+{num_pages} with a {}-word \
                     bitmap is not 64-page aligned or out of the slot",
                    info.pages(),
                    bitmap.len()
                ),
            });
        }
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
            },
        };
        // SAFETY: KVM only reads `num_pages` bits from the bitmap, which is at least that long
        // (checked above) and lives across the call; the struct matches the kernel ABI.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: errno::Error::last(),
            });
        }
        Ok(())
    }
}

impl<B: Bitmap> Drop for Vm<B> {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut *self.lock_slots());
        let all_deleted = slots.iter().all(|slot| {
            let deleted = SlotInfo {
                size: 0,
                log_dirty: false,
                ..slot.info
            };
            self.set_region(&deleted).is_ok()
        });
        if !all_deleted {
            // KVM may still reference a mapping: leak them rather than unmap memory the
            // kernel could write into after the address is reused.
            std::mem::forget(slots);
        }
    }
}

/// The XSAVE area size this host's KVM uses (`KVM_CAP_XSAVE2`), at least 4096.
pub fn xsave_size(vm: &VmFd) -> usize {
    let n = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_XSAVE2));
    usize::try_from(n)
        .unwrap_or(0)
        .max(std::mem::size_of::<kvm_bindings::kvm_xsave>())
}

/// `KVM_SET_XSAVE` with the fixed 4 KiB area, refused on hosts whose XSAVE state is larger
/// (AMX), where the kernel would read past the end of it.
pub fn set_xsave(
    vm: &VmFd,
    vcpu: &kvm_ioctls::VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
) -> Result<(), KvmError> {
    let needed = xsave_size(vm);
    if needed > std::mem::size_of::<kvm_bindings::kvm_xsave>() {
        return Err(KvmError::Invalid {
            op: "KVM_SET_XSAVE",
            detail: format!("this host's XSAVE area is {needed} bytes; only 4096 is supported"),
        });
    }
    // SAFETY: KVM reads at most `xsave_size` bytes from the area, which we checked is no more
    // than the size of `kvm_xsave`, a live reference for the whole call.
    unsafe { vcpu.set_xsave(xsave) }.map_err(|source| KvmError::Ioctl {
        op: "KVM_SET_XSAVE",
        source,
    })
}
