//! Guest RAM: the host mappings behind guest physical memory, laid out like a PC.
//!
//! RAM below 3 GiB is one region at guest address 0; anything above continues at 4 GiB,
//! leaving the hole for the LAPIC/IOAPIC and firmware as QEMU's `pc` machine does. Each
//! region is one vm-memory `MmapRegion` with an `AtomicBitmap`, so every write the VMM
//! itself makes through vm-memory (device emulation) is tracked for migration, beside
//! KVM's dirty log for guest writes.

use std::fs::File;
use std::sync::Arc;

use ferry_sys::mm;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion, VolatileSlice,
};

/// Guest page size Ferry tracks and migrates in.
pub const PAGE_SIZE: u64 = 4096;
/// Guest RAM below this address; the rest goes above 4 GiB.
pub const LOW_MEM_LIMIT: u64 = 0xC000_0000;
/// Where RAM above the PCI hole starts.
pub const HIGH_MEM_START: u64 = 1 << 32;
/// 2 MiB: the huge page size for hugetlb backing and THP.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The guest memory vm-memory type Ferry uses everywhere.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;
/// A slice of guest memory.
pub type GuestSlice<'a> = VolatileSlice<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// What backs guest RAM on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Private anonymous memory (the default).
    Anonymous,
    /// A shared memfd (shmem), which another process can map.
    Memfd,
    /// A shared memfd of 2 MiB hugetlb pages; needs reserved huge pages.
    Hugetlb,
}

impl Backend {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Anonymous => "anonymous",
            Backend::Memfd => "memfd",
            Backend::Hugetlb => "hugetlb",
        }
    }

    /// Whether the mapping is `MAP_SHARED`.
    pub fn is_shared(self) -> bool {
        !matches!(self, Backend::Anonymous)
    }
}

impl std::str::FromStr for Backend {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, MemoryError> {
        match s {
            "anonymous" | "anon" => Ok(Backend::Anonymous),
            "memfd" => Ok(Backend::Memfd),
            "hugetlb" => Ok(Backend::Hugetlb),
            other => Err(MemoryError::Config(format!(
                "unknown memory backend '{other}' (expected anonymous, memfd or hugetlb)"
            ))),
        }
    }
}

/// How to build guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Total RAM in bytes (a multiple of 4 KiB; 2 MiB for hugetlb).
    pub size: u64,
    /// Host backing.
    pub backend: Backend,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on anonymous memory.
    pub thp: bool,
}

/// Errors building or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The configuration cannot be built.
    #[error("guest memory: {0}")]
    Config(String),
    /// Too few huge pages are reserved for a hugetlb backend.
    #[error(
        "guest memory: hugetlb backend needs {needed} free 2 MiB huge pages but only {free} are \
         available (reserve more with: echo N > /proc/sys/vm/nr_hugepages)"
    )]
    HugePages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// A host syscall failed.
    #[error("guest memory: {what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("guest memory: mapping region {index}: {detail}")]
    Mmap {
        /// Region index.
        index: usize,
        /// vm-memory's error.
        detail: String,
    },
    /// Another process's memory file does not fit this guest RAM (local hand-over).
    #[error("guest memory: the source's memory file does not fit this VM: {0}")]
    Foreign(String),
    /// An access outside guest RAM.
    #[error("guest memory: {len} bytes at {gpa:#x} are not inside guest RAM")]
    OutOfRange {
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// One contiguous region of guest RAM (one KVM memory slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Index in `GuestRam::regions`, also the KVM slot number.
    pub index: usize,
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRegion {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// One past the last guest address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// The PC layout of `size` bytes of RAM: (guest address, size) pairs.
pub fn pc_layout(size: u64) -> Vec<(u64, u64)> {
    if size <= LOW_MEM_LIMIT {
        vec![(0, size)]
    } else {
        vec![(0, LOW_MEM_LIMIT), (HIGH_MEM_START, size - LOW_MEM_LIMIT)]
    }
}

/// Where each region starts in a guest memory file of one piece (regions in order).
fn own_offsets(regions: &[RamRegion]) -> Vec<u64> {
    regions
        .iter()
        .scan(0u64, |off, r| {
            let at = *off;
            *off += r.size;
            Some(at)
        })
        .collect()
}

/// The memory files of guest RAM.
#[derive(Debug)]
struct Files {
    /// What backs guest RAM now.
    current: Option<Arc<File>>,
    /// Where each region starts in `current`.
    offsets: Vec<u64>,
    /// This VM's own memfd (kept while adopted memory replaces it).
    own: Option<Arc<File>>,
    /// The backend of `current` when it came from another process.
    adopted: Option<Backend>,
}

/// A host address range of guest RAM (for preparation and madvise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRegion {
    /// Region index.
    pub index: usize,
    /// Host virtual address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Guest RAM.
pub struct GuestRam {
    mem: GuestMem,
    regions: Vec<RamRegion>,
    config: MemoryConfig,
    // The file behind guest RAM (none for anonymous memory): its own memfd, or one adopted
    // from another process in a local hand-over; kept so it can be handed on.
    file: std::sync::Mutex<Files>,
    // Guest RAM is only ever reached through volatile slices and raw pointers, so it may be
    // released (undo of a failed preparation) without breaking Rust references.
    _volatile: Vec<mm::VolatileRegistration>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .field("config", &self.config)
            .finish()
    }
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MemoryError {
    let what = what.into();
    move |source| MemoryError::Host { what, source }
}

impl GuestRam {
    /// Maps guest RAM as configured.
    pub fn new(config: MemoryConfig) -> Result<GuestRam, MemoryError> {
        let align = match config.backend {
            Backend::Hugetlb => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        };
        if config.size == 0 || !config.size.is_multiple_of(align) {
            return Err(MemoryError::Config(format!(
                "size {} is not a non-zero multiple of {} KiB for the {} backend",
                config.size,
                align / 1024,
                config.backend.name()
            )));
        }
        if config.thp && config.backend == Backend::Hugetlb {
            return Err(MemoryError::Config(
                "--hugepages (THP) and the hugetlb backend are mutually exclusive".into(),
            ));
        }
        if config.thp && config.backend == Backend::Memfd {
            return Err(MemoryError::Config(
                "transparent huge pages are not available for memfd (shmem) memory here; \
                 use the anonymous backend with --hugepages, or the hugetlb backend"
                    .into(),
            ));
        }
        let file = match config.backend {
            Backend::Anonymous => None,
            Backend::Memfd => Some(
                mm::memfd_create("ferry-guest-ram", mm::MemfdOptions { hugetlb: None }).map_err(
                    |e| MemoryError::Host {
                        what: "memfd_create".into(),
                        source: e.into(),
                    },
                )?,
            ),
            Backend::Hugetlb => {
                let needed = config.size / HUGE_PAGE_SIZE;
                let free = mm::hugetlb_free_pages(mm::HugePageSize::Size2M).unwrap_or(0);
                if free < needed {
                    return Err(MemoryError::HugePages { needed, free });
                }
                Some(
                    mm::memfd_create(
                        "ferry-guest-ram",
                        mm::MemfdOptions {
                            hugetlb: Some(mm::HugePageSize::Size2M),
                        },
                    )
                    .map_err(|e| MemoryError::Host {
                        what: "memfd_create(MFD_HUGETLB)".into(),
                        source: e.into(),
                    })?,
                )
            }
        };
        let file = file.map(|fd| Arc::new(File::from(fd)));
        if let Some(f) = &file {
            f.set_len(config.size)
                .map_err(host_err("sizing the guest memory file"))?;
        }

        let mut regions = Vec::new();
        let mut mmap_regions = Vec::new();
        let mut file_off = 0u64;
        for (index, (gpa, size)) in pc_layout(config.size).into_iter().enumerate() {
            let len = usize::try_from(size)
                .map_err(|_| MemoryError::Config(format!("region of {size} bytes too large")))?;
            let bitmap = AtomicBitmap::with_len(len);
            let mut builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            builder = match &file {
                None => builder
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
                Some(f) => builder
                    .with_mmap_flags(libc::MAP_SHARED)
                    .with_file_offset(FileOffset::from_arc(f.clone(), file_off))
                    .with_hugetlbfs(config.backend == Backend::Hugetlb),
            };
            let region: MmapRegion<AtomicBitmap> =
                builder.build().map_err(|e| MemoryError::Mmap {
                    index,
                    detail: e.to_string(),
                })?;
            if config.thp {
                mm::huge_page(region.as_ptr() as usize, len).map_err(|e| MemoryError::Host {
                    what: "madvise(MADV_HUGEPAGE)".into(),
                    source: e.into(),
                })?;
            }
            let guest_region =
                GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or_else(|| {
                    MemoryError::Mmap {
                        index,
                        detail: "region wraps the guest address space".into(),
                    }
                })?;
            mmap_regions.push(guest_region);
            regions.push(RamRegion { index, gpa, size });
            file_off += size;
        }
        let mem = GuestMemoryMmap::from_regions(mmap_regions).map_err(|e| MemoryError::Mmap {
            index: 0,
            detail: e.to_string(),
        })?;
        let volatile = mem
            .iter()
            .map(|r| mm::register_mmap_region(r.get_mmap()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MemoryError::Host {
                what: "registering guest memory".into(),
                source: e.into(),
            })?;
        let offsets = own_offsets(&regions);
        Ok(GuestRam {
            mem,
            regions,
            config,
            file: std::sync::Mutex::new(Files {
                offsets,
                current: file.clone(),
                own: file,
                adopted: None,
            }),
            _volatile: volatile,
        })
    }

    /// How this RAM was built; the backend is the adopted memory's after a local hand-over.
    pub fn config(&self) -> MemoryConfig {
        let mut c = self.config;
        if let Some(b) = self.files().adopted {
            c.backend = b;
        }
        c
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.config.size
    }

    /// The regions, in guest-address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The vm-memory view, for device emulation (writes through it are dirty-tracked).
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The mapping of region `index`, to register with KVM.
    pub fn mmap_region(&self, index: usize) -> Option<Arc<MmapRegion<AtomicBitmap>>> {
        self.mem.iter().nth(index).map(|r| r.get_mmap())
    }

    /// The host ranges of every region.
    pub fn host_regions(&self) -> Vec<HostRegion> {
        self.mem
            .iter()
            .enumerate()
            .map(|(index, r)| HostRegion {
                index,
                addr: r.as_ptr() as usize,
                len: r.len() as usize,
            })
            .collect()
    }

    /// The file behind guest RAM (its own memfd, or the one adopted from another process),
    /// and where each region starts in it; `None` for anonymous memory.
    pub fn file(&self) -> Option<(Arc<File>, Vec<u64>)> {
        let f = self.files();
        f.current.clone().map(|c| (c, f.offsets.clone()))
    }

    /// Drops this process's page tables over shared guest RAM (the data stays in the file;
    /// the guest's next accesses map it again), so that unmapping it later is quick.
    pub fn drop_page_tables(&self) -> Result<(), MemoryError> {
        for r in self.host_regions() {
            mm::drop_page_tables(r.addr, r.len).map_err(|e| MemoryError::Host {
                what: "dropping the page tables of shared guest memory".into(),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// Once the guest has left this process for good: takes guest memory out of this
    /// process `chunk` bytes at a time, calling `between` after each piece and stopping
    /// early when it returns false (see
    /// [`mm::let_go`]: private memory is freed, shared memory keeps its file and loses only
    /// this process's page tables). The process's exit then has little left to tear down,
    /// and a caller that pauses in `between` hands the CPU back between pieces, instead of
    /// the exit taking it from a guest next door for tens of milliseconds per GiB. Locked
    /// memory is refused by the kernel (the first piece fails) and left to the exit.
    pub fn let_go_gradually(
        &self,
        chunk: usize,
        mut between: impl FnMut() -> bool,
    ) -> Result<(), MemoryError> {
        let step = chunk.max(mm::page_size()) / mm::page_size() * mm::page_size();
        for r in self.host_regions() {
            let mut off = 0;
            while off < r.len {
                let len = step.min(r.len - off);
                mm::let_go(r.addr + off, len).map_err(|e| MemoryError::Host {
                    what: "letting go of guest memory after the guest left".into(),
                    source: e.into(),
                })?;
                off += len;
                if !between() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Whether this RAM maps another process's memory (a local hand-over in progress).
    pub fn is_adopted(&self) -> bool {
        self.files().adopted.is_some()
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps another process's guest memory file in place of this RAM (a local hand-over):
    /// the same guest and host addresses, now backed by `file` at `offsets[i]` for region
    /// `i`, locked in RAM when `lock`. Nothing is copied. [`GuestRam::disown`] undoes it.
    ///
    /// The guest must not run here, and nothing may write this RAM, until the other
    /// process has stopped using the memory: both processes now share it.
    pub fn adopt(&self, file: File, offsets: &[u64], lock: bool) -> Result<(), MemoryError> {
        let mut f = self.files();
        if f.adopted.is_some() {
            return Err(MemoryError::Foreign(
                "this VM already maps another process's memory".into(),
            ));
        }
        let hugetlb = self.check_foreign(&file, offsets)?;
        for (r, off) in self.host_regions().iter().zip(offsets) {
            let backing = mm::Backing::File {
                fd: std::os::fd::AsFd::as_fd(&file),
                offset: *off,
            };
            if let Err(e) = mm::replace_mapping(r.addr, r.len, backing) {
                // Whatever was replaced goes back to this process's own memory.
                f.adopted = Some(Backend::Memfd);
                drop(f);
                let _ = self.disown();
                return Err(MemoryError::Host {
                    what: format!(
                        "mapping the source's memory file over region {}{}",
                        r.index,
                        if hugetlb { " (hugetlb)" } else { "" }
                    ),
                    source: e.into(),
                });
            }
        }
        f.current = Some(Arc::new(file));
        f.offsets = offsets.to_vec();
        f.adopted = Some(if hugetlb {
            Backend::Hugetlb
        } else {
            Backend::Memfd
        });
        drop(f);
        if lock {
            for r in self.host_regions() {
                mm::mlock(r.addr, r.len).map_err(|e| MemoryError::Host {
                    what: "locking the adopted guest memory (mlock)".into(),
                    source: e.into(),
                })?;
            }
        }
        Ok(())
    }

    /// Checks that `file` can back every region at `offsets`; whether it is hugetlb.
    fn check_foreign(&self, file: &File, offsets: &[u64]) -> Result<bool, MemoryError> {
        let bad = |m: String| Err(MemoryError::Foreign(m));
        if offsets.len() != self.regions.len() {
            return bad(format!(
                "{} regions offered, this VM has {}",
                offsets.len(),
                self.regions.len()
            ));
        }
        let (size, hugetlb) =
            mm::file_info(std::os::fd::AsFd::as_fd(file)).map_err(|e| MemoryError::Host {
                what: "inspecting the source's memory file".into(),
                source: e.into(),
            })?;
        let align = if hugetlb { HUGE_PAGE_SIZE } else { PAGE_SIZE };
        for (r, (region, off)) in self
            .host_regions()
            .iter()
            .zip(self.regions.iter().zip(offsets))
        {
            if off.checked_add(region.size).is_none_or(|end| end > size) {
                return bad(format!(
                    "region {} needs {:#x} bytes at offset {off:#x}; the file has {size:#x}",
                    region.index, region.size
                ));
            }
            if !(off.is_multiple_of(align) && (r.addr as u64).is_multiple_of(align)) {
                return bad(format!(
                    "region {} is not aligned to the file's {} KiB pages here; start this VM \
                     with --memory-backend {}",
                    region.index,
                    align / 1024,
                    if hugetlb { "hugetlb" } else { "memfd" }
                ));
            }
        }
        Ok(hugetlb)
    }

    /// Gives back another process's memory adopted by [`GuestRam::adopt`]: this RAM is its
    /// own memory again (its own memfd, or fresh anonymous memory), and the other process's
    /// guest is untouched by anything this one does from now on.
    pub fn disown(&self) -> Result<(), MemoryError> {
        let mut f = self.files();
        if f.adopted.is_none() {
            return Ok(());
        }
        let own = f.own.clone();
        let own_offsets = own_offsets(&self.regions);
        for (r, off) in self.host_regions().iter().zip(&own_offsets) {
            let backing = match &own {
                Some(file) => mm::Backing::File {
                    fd: std::os::fd::AsFd::as_fd(&**file),
                    offset: *off,
                },
                None => mm::Backing::Anonymous,
            };
            mm::replace_mapping(r.addr, r.len, backing).map_err(|e| MemoryError::Host {
                what: format!("restoring this VM's own memory in region {}", r.index),
                source: e.into(),
            })?;
        }
        f.current = own;
        f.offsets = own_offsets;
        f.adopted = None;
        Ok(())
    }

    /// Frees this VM's own memory file once adopted memory replaced it for good (after a
    /// local hand-over completed); its pages would otherwise stay allocated.
    pub fn free_own_memory(&self) {
        let f = self.files();
        if let (Some(_), Some(own)) = (f.adopted, &f.own) {
            if let Err(e) =
                mm::fallocate_punch_hole(std::os::fd::AsFd::as_fd(&**own), 0, self.size())
            {
                tracing::warn!("freeing the unused own guest memory file: {e}");
            }
        }
    }

    /// The host address of `len` bytes at `gpa`, which must lie inside one region.
    pub fn host_addr(&self, gpa: u64, len: u64) -> Option<usize> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|end| end <= r.end()))?;
        let base = self.host_regions().get(r.index)?.addr;
        usize::try_from(gpa - r.gpa).ok().map(|off| base + off)
    }

    /// The guest address of host address `addr`, if it is guest RAM.
    pub fn gpa_of(&self, addr: usize) -> Option<u64> {
        self.host_regions().iter().find_map(|h| {
            let off = addr.checked_sub(h.addr).filter(|o| *o < h.len)?;
            let r = self.regions.get(h.index)?;
            Some(r.gpa + off as u64)
        })
    }

    /// Throws away the contents of `len` bytes at `gpa` (inside one region): anonymous
    /// memory reads back as zeros, shared memory is freed from its file. Pages made missing
    /// this way are what a userfaultfd registered for MISSING faults reports.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let addr = self
            .host_addr(gpa, len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        let n = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        mm::release(addr, n).map_err(|e| MemoryError::Host {
            what: format!("discarding {len:#x} bytes of guest memory at {gpa:#x}"),
            source: e.into(),
        })
    }

    /// The size of the pages the memory's host mapping is made of: 2 MiB for hugetlb, the
    /// base page otherwise (what [`GuestRam::hide`] and a mapping work in).
    pub fn file_page_size(&self) -> u64 {
        match self.config().backend {
            Backend::Hugetlb => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        }
    }

    /// A second mapping of the file behind guest RAM, at the same guest addresses (`None`
    /// for anonymous memory). Writing through it fills the file's pages without mapping
    /// them into the guest mapping, and without the file's inode lock a `pwrite` takes.
    /// Its writes are not dirty-tracked.
    pub fn file_alias(&self) -> Result<Option<GuestMemoryMmap>, MemoryError> {
        let Some((file, offsets)) = self.file() else {
            return Ok(None);
        };
        let mut regions = Vec::new();
        for r in &self.regions {
            let len = usize::try_from(r.size).map_err(|_| {
                MemoryError::Config(format!("region of {} bytes too large", r.size))
            })?;
            let off = offsets.get(r.index).copied().ok_or(MemoryError::Mmap {
                index: r.index,
                detail: "the memory file has no offset for this region".into(),
            })?;
            let region = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_file_offset(FileOffset::from_arc(file.clone(), off))
                .with_hugetlbfs(self.config().backend == Backend::Hugetlb)
                .build()
                .map_err(|e| MemoryError::Mmap {
                    index: r.index,
                    detail: format!("mapping the guest memory file again: {e}"),
                })?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(r.gpa)).ok_or_else(|| {
                    MemoryError::Mmap {
                        index: r.index,
                        detail: "region wraps the guest address space".into(),
                    }
                })?,
            );
        }
        GuestMemoryMmap::from_regions(regions)
            .map(Some)
            .map_err(|e| MemoryError::Mmap {
                index: 0,
                detail: e.to_string(),
            })
    }

    /// Drops this process's page tables over `len` bytes of shared guest memory at `gpa`
    /// (inside one region): the file keeps the pages, and the next access maps them again,
    /// which is what a userfaultfd registered for MINOR faults reports.
    pub fn hide(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let addr = self
            .host_addr(gpa, len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        let n = usize::try_from(len).map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        mm::drop_page_tables(addr, n).map_err(|e| MemoryError::Host {
            what: format!("dropping the page tables over {len:#x} bytes at {gpa:#x}"),
            source: e.into(),
        })
    }

    /// `len` bytes of guest memory at `gpa`, which must lie inside one region.
    pub fn slice(&self, gpa: u64, len: usize) -> Result<GuestSlice<'_>, MemoryError> {
        self.mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: len as u64,
            })
    }

    /// Which region holds `pages` pages starting at `gpa`, if one does entirely.
    pub fn region_of(&self, gpa: u64, pages: u64) -> Option<&RamRegion> {
        let len = pages.checked_mul(PAGE_SIZE)?;
        let end = gpa.checked_add(len)?;
        self.regions.iter().find(|r| gpa >= r.gpa && end <= r.end())
    }

    /// Takes and resets the bitmap of pages the VMM wrote in region `index` (bit per page).
    pub fn take_vmm_dirty(&self, index: usize) -> Vec<u64> {
        self.mem
            .iter()
            .nth(index)
            .map(|r| r.get_mmap().bitmap().get_and_reset())
            .unwrap_or_default()
    }

    /// The guest-physical address of every page of RAM, in region order (the order of
    /// [`GuestRam::page_digests`]).
    pub fn page_addresses(&self) -> Vec<u64> {
        self.regions
            .iter()
            .flat_map(|r| (0..r.pages()).map(move |p| r.gpa + p * PAGE_SIZE))
            .collect()
    }

    /// Inverts the byte at `gpa` (a test hook: a wrong page on purpose).
    pub fn flip_byte(&self, gpa: u64) -> Result<(), MemoryError> {
        let s = self.slice(gpa, 1)?;
        let mut b = [0u8; 1];
        s.copy_to(&mut b[..]);
        b[0] = !b[0];
        s.copy_from(&b[..]);
        Ok(())
    }

    /// A 64-bit digest (xxh3) per page of guest RAM, in region order: what tests, the demo
    /// and the bench compare across a migration. Hashed on up to [`DIGEST_THREADS`]
    /// threads; the guest must not run meanwhile.
    pub fn page_digests(&self) -> Vec<u64> {
        let pages = self.page_addresses();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, DIGEST_THREADS);
        let per = pages.len().div_ceil(threads).max(1);
        let mut out = vec![0u64; pages.len()];
        std::thread::scope(|s| {
            for (gpas, digests) in pages.chunks(per).zip(out.chunks_mut(per)) {
                s.spawn(move || self.digest_pages(gpas, digests));
            }
        });
        out
    }

    /// Hashes the pages at `gpas` into `out` (0 for a page that is not RAM).
    fn digest_pages(&self, gpas: &[u64], out: &mut [u64]) {
        let mut one = Vec::with_capacity(1);
        for (gpa, d) in gpas.iter().zip(out.iter_mut()) {
            one.clear();
            *d = match self.page_sums(*gpa, 1, &mut one) {
                Ok(()) => one.first().copied().unwrap_or(0),
                Err(_) => 0,
            };
        }
    }

    /// Appends the digest ([`page_digest`]) of each of the `pages` pages at `gpa` (inside
    /// one region) to `out`, hashed where they lie in guest memory. A page written
    /// meanwhile (a running guest) gets a digest of no particular instant.
    pub fn page_sums(&self, gpa: u64, pages: u64, out: &mut Vec<u64>) -> Result<(), MemoryError> {
        let out_of_range = || MemoryError::OutOfRange {
            gpa,
            len: pages.saturating_mul(PAGE_SIZE),
        };
        let len = pages.checked_mul(PAGE_SIZE).ok_or_else(out_of_range)?;
        let addr = self.host_addr(gpa, len).ok_or_else(out_of_range)?;
        let n = usize::try_from(len).map_err(|_| out_of_range())?;
        mm::hash_volatile_pages(addr, n, out).map_err(|e| MemoryError::Host {
            what: format!("hashing {pages} pages of guest memory at {gpa:#x}"),
            source: e.into(),
        })
    }
}

/// Most threads [`GuestRam::page_digests`] uses.
pub const DIGEST_THREADS: usize = 4;

/// The digest of one page's bytes, as [`GuestRam::page_digests`] computes it: xxh3-64.
pub fn page_digest(page: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_at_the_hole() {
        assert_eq!(pc_layout(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            pc_layout(4 << 30),
            vec![
                (0, LOW_MEM_LIMIT),
                (HIGH_MEM_START, (4 << 30) - LOW_MEM_LIMIT)
            ]
        );
    }

    #[test]
    fn vmm_writes_are_tracked() {
        let ram = GuestRam::new(MemoryConfig {
            size: 16 << 20,
            backend: Backend::Anonymous,
            thp: false,
        })
        .unwrap();
        assert!(ram.take_vmm_dirty(0).iter().all(|w| *w == 0));
        ram.mem()
            .write_obj(0xdead_u64, GuestAddress(5 * 4096 + 8))
            .unwrap();
        let bits = ram.take_vmm_dirty(0);
        assert_eq!(bits[0], 1 << 5);
        assert!(
            ram.take_vmm_dirty(0).iter().all(|w| *w == 0),
            "reset after take"
        );
    }

    #[test]
    fn memfd_backend_and_digests() {
        let ram = GuestRam::new(MemoryConfig {
            size: 8 << 20,
            backend: Backend::Memfd,
            thp: false,
        })
        .unwrap();
        assert!(ram.file().is_some());
        let before = ram.page_digests();
        ram.mem().write_obj(1u8, GuestAddress(3 * 4096)).unwrap();
        let after = ram.page_digests();
        let diff: Vec<_> = (0..before.len())
            .filter(|i| before[*i] != after[*i])
            .collect();
        assert_eq!(diff, vec![3]);
    }

    #[test]
    fn page_sums_in_place_match_the_digest_of_the_bytes() {
        let ram = GuestRam::new(MemoryConfig {
            size: 8 << 20,
            backend: Backend::Anonymous,
            thp: false,
        })
        .unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        ram.mem()
            .write_slice(&data, GuestAddress(5 * 4096))
            .unwrap();
        let mut sums = Vec::new();
        ram.page_sums(5 * 4096, 3, &mut sums).unwrap();
        let want: Vec<u64> = data.chunks(4096).map(page_digest).collect();
        assert_eq!(sums, want);
        assert_eq!(ram.page_digests()[5..8], want[..]);
        // Past the end of RAM: refused, nothing appended.
        assert!(ram.page_sums((8 << 20) - 4096, 2, &mut sums).is_err());
        assert_eq!(sums.len(), 3);
    }

    #[test]
    fn letting_go_frees_private_memory_and_keeps_a_shared_file() {
        for backend in [Backend::Anonymous, Backend::Memfd] {
            let ram = GuestRam::new(MemoryConfig {
                size: 4 << 20,
                backend,
                thp: false,
            })
            .unwrap();
            for page in 0..1024u64 {
                ram.mem().write_obj(7u8, GuestAddress(page * 4096)).unwrap();
            }
            // Private pages are freed; shared ones stay in the file and map back in.
            let kept = |b: u8| if backend.is_shared() { b } else { 0 };
            let last = GuestAddress(1023 * 4096);
            let mut pieces = 0;
            ram.let_go_gradually(1 << 20, || {
                pieces += 1;
                true
            })
            .unwrap();
            assert_eq!(pieces, 4, "{backend:?}: one call per 1 MiB piece");
            assert_eq!(
                ram.mem().read_obj::<u8>(last).unwrap(),
                kept(7),
                "{backend:?}"
            );
            // Stopped after the first piece, the last page stays as it is.
            ram.mem().write_obj(9u8, last).unwrap();
            ram.let_go_gradually(1 << 20, || false).unwrap();
            assert_eq!(ram.mem().read_obj::<u8>(last).unwrap(), 9, "{backend:?}");
            ram.let_go_gradually(4 << 20, || true).unwrap();
            assert_eq!(
                ram.mem().read_obj::<u8>(last).unwrap(),
                kept(9),
                "{backend:?}"
            );
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let err = GuestRam::new(MemoryConfig {
            size: 4097,
            backend: Backend::Anonymous,
            thp: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
        let err = GuestRam::new(MemoryConfig {
            size: 3 << 20,
            backend: Backend::Hugetlb,
            thp: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("2048 KiB"), "{err}");
        assert!("bogus".parse::<Backend>().is_err());
    }

    fn ram(size: u64, backend: Backend) -> GuestRam {
        GuestRam::new(MemoryConfig {
            size,
            backend,
            thp: false,
        })
        .unwrap()
    }

    fn dup(f: &File) -> File {
        f.try_clone().unwrap()
    }

    #[test]
    fn adopted_memory_is_shared_until_disowned() {
        for own in [Backend::Anonymous, Backend::Memfd] {
            let src = ram(8 << 20, Backend::Memfd);
            let dst = ram(8 << 20, own);
            src.mem()
                .write_obj(0x1234_u64, GuestAddress(0x5000))
                .unwrap();
            dst.mem()
                .write_obj(0x9999_u64, GuestAddress(0x6000))
                .unwrap();
            let (file, offsets) = src.file().unwrap();
            dst.adopt(dup(&file), &offsets, false).unwrap();
            // The same memory, both ways, with nothing copied.
            assert_eq!(
                dst.mem().read_obj::<u64>(GuestAddress(0x5000)).unwrap(),
                0x1234
            );
            assert_eq!(dst.mem().read_obj::<u64>(GuestAddress(0x6000)).unwrap(), 0);
            dst.mem().write_obj(7u64, GuestAddress(0x7000)).unwrap();
            assert_eq!(src.mem().read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 7);
            assert!(
                dst.adopt(dup(&file), &offsets, false).is_err(),
                "adopted twice"
            );
            // The adopted file is what a further hand-over passes on.
            assert_eq!(dst.file().unwrap().1, offsets);
            dst.disown().unwrap();
            dst.mem().write_obj(8u64, GuestAddress(0x7000)).unwrap();
            assert_eq!(src.mem().read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 7);
            assert_eq!(src.page_digests().len(), dst.page_digests().len());
            // A memfd destination gets its own contents back; anonymous memory starts over.
            let own_back = dst.mem().read_obj::<u64>(GuestAddress(0x6000)).unwrap();
            assert_eq!(own_back, if own == Backend::Memfd { 0x9999 } else { 0 });
        }
    }

    #[test]
    fn foreign_memory_that_does_not_fit_is_refused() {
        assert!(ram(8 << 20, Backend::Anonymous).file().is_none());
        let small = ram(4 << 20, Backend::Memfd);
        let dst = ram(8 << 20, Backend::Memfd);
        let (file, offsets) = small.file().unwrap();
        let e = dst.adopt(dup(&file), &offsets, false).unwrap_err();
        assert!(e.to_string().contains("the file has 0x400000"), "{e}");
        let e = dst.adopt(dup(&file), &[0, 0], false).unwrap_err();
        assert!(
            e.to_string().contains("2 regions offered, this VM has 1"),
            "{e}"
        );
        // Nothing was replaced: the destination's memory is still its own.
        dst.mem().write_obj(3u64, GuestAddress(0)).unwrap();
        assert_eq!(small.mem().read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
    }
}
