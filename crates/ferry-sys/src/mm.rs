//! Memory syscalls: owned mappings, memfd, madvise/mlock/mincore on page ranges, and the
//! limits (RLIMIT_MEMLOCK, CAP_IPC_LOCK, hugetlb pools) that decide what can be prepared.
//!
//! # Which functions are `unsafe`, and the volatile-memory registry
//!
//! Populating, locking, unlocking, THP advice and `mincore` never change what memory reads
//! as, so they are safe on any range (a bad range only gives an error). `MADV_DONTNEED` and
//! `MADV_REMOVE` do: they make the range read back as zeros (or as the file's contents).
//! Applied to memory that Rust code holds references into (the heap, a stack) that is
//! undefined behaviour, so the raw [`dont_need`] and [`remove`] are `unsafe fn`.
//!
//! Guest memory is different: the guest (and the kernel, on its behalf) may change it at any
//! time, so Ferry only ever touches it through raw pointers and `VolatileSlice`s, never
//! through references. Such memory is *volatile*, and discarding it is as harmless as a guest
//! write. The registry below records which ranges are volatile: every [`Mmap`] registers
//! itself, a vm-memory `MmapRegion` can be registered safely with [`register_mmap_region`],
//! and anything else with the `unsafe` [`register_volatile`]. The safe [`release`] discards
//! only inside a registered range, and holds the registry lock while it does, so the mapping
//! cannot be unmapped and reused under it.
//!
//! [`fallocate_punch_hole`] is safe: it changes a file the way `write(2)` of zeros would, and
//! writing to a file is safe in Rust even when the file is mapped somewhere (whoever creates
//! references into a shared file mapping takes on that hazard).

use std::any::Any;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::bitmap::Bitmap;
use vm_memory::MmapRegion;

/// Errors of the memory syscall wrappers.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// A syscall failed.
    #[error("{call} failed: {source}")]
    Os {
        /// The syscall (and advice or flag) that failed.
        call: &'static str,
        /// The OS error (errno).
        #[source]
        source: io::Error,
    },
    /// A range or length is not a multiple of the required alignment.
    #[error("{call}: range {addr:#x}+{len:#x} is not aligned to {align:#x} bytes")]
    Misaligned {
        /// The operation.
        call: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The alignment required (the page or huge page size).
        align: usize,
    },
    /// A zero-length range, or one that wraps around the address space.
    #[error("{call}: invalid range {addr:#x}+{len:#x} (empty or wrapping)")]
    InvalidRange {
        /// The operation.
        call: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
    },
    /// A memfd name with an interior NUL byte.
    #[error("memfd name {0:?} contains a NUL byte")]
    InvalidName(String),
    /// [`release`] on a range that is not inside one registered volatile mapping.
    #[error(
        "{call}: range {addr:#x}+{len:#x} is not inside registered volatile memory \
         (register it with mm::register_mmap_region or map it with mm::Mmap)"
    )]
    NotVolatile {
        /// The operation.
        call: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
    },
    /// Registering a range that overlaps one already registered.
    #[error("range {addr:#x}+{len:#x} overlaps memory that is already registered as volatile")]
    AlreadyRegistered {
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
    },
}

impl MmError {
    /// The errno, when a syscall failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            MmError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    fn last(call: &'static str) -> MmError {
        MmError::Os {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

impl From<MmError> for io::Error {
    /// Keeps the raw OS error of a failed syscall (so `raw_os_error()` still works); other
    /// errors become `InvalidInput` carrying the message.
    fn from(e: MmError) -> io::Error {
        match e {
            MmError::Os { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        }
    }
}

/// A huge page size supported by hugetlb (x86-64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HugePageSize {
    /// 2 MiB pages.
    Size2M,
    /// 1 GiB pages.
    Size1G,
}

impl HugePageSize {
    /// The page size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    fn map_flag(self) -> libc::c_int {
        match self {
            HugePageSize::Size2M => libc::MAP_HUGE_2MB,
            HugePageSize::Size1G => libc::MAP_HUGE_1GB,
        }
    }

    fn mfd_flag(self) -> libc::c_uint {
        match self {
            HugePageSize::Size2M => libc::MFD_HUGE_2MB,
            HugePageSize::Size1G => libc::MFD_HUGE_1GB,
        }
    }

    fn sysfs_dir(self) -> &'static str {
        match self {
            HugePageSize::Size2M => "/sys/kernel/mm/hugepages/hugepages-2048kB",
            HugePageSize::Size1G => "/sys/kernel/mm/hugepages/hugepages-1048576kB",
        }
    }
}

/// The base page size (`sysconf(_SC_PAGESIZE)`), cached.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // sysconf cannot fail for _SC_PAGESIZE on Linux; 4 KiB is the only x86-64 value.
        usize::try_from(v).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_kib(&text, field)
}

/// Parses a `Name:   1234 kB` line of a /proc status-like file.
fn status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The default hugetlb page size (`Hugepagesize` in /proc/meminfo), if the kernel has hugetlb.
pub fn huge_page_size_default() -> Option<usize> {
    meminfo_kib("Hugepagesize").and_then(|k| usize::try_from(k * 1024).ok())
}

/// The transparent huge page size (PMD size), if THP is available.
pub fn thp_size() -> Option<usize> {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Free pages in the hugetlb pool of `size` (`free_hugepages`), or `None` when the pool does
/// not exist.
pub fn hugetlb_free_pages(size: HugePageSize) -> Option<u64> {
    std::fs::read_to_string(format!("{}/free_hugepages", size.sysfs_dir()))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `x` is a multiple of `align` (a power of two, as page sizes are).
fn is_aligned(x: usize, align: usize) -> bool {
    x & (align - 1) == 0
}

/// Checks that `addr..addr+len` is non-empty, does not wrap, and is `align`-aligned.
fn check_range(call: &'static str, addr: usize, len: usize, align: usize) -> Result<(), MmError> {
    if len == 0 || addr.checked_add(len).is_none() {
        return Err(MmError::InvalidRange { call, addr, len });
    }
    if !is_aligned(addr, align) || !is_aligned(len, align) {
        return Err(MmError::Misaligned {
            call,
            addr,
            len,
            align,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The volatile-memory registry.

struct Volatile {
    end: usize,
    shared: bool,
    // Keeps a registered vm-memory region mapped while it is registered.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

type Registry = BTreeMap<usize, Volatile>;

fn registry() -> &'static RwLock<Registry> {
    static REG: OnceLock<RwLock<Registry>> = OnceLock::new();
    REG.get_or_init(|| RwLock::new(BTreeMap::new()))
}

// The map is updated by single inserts/removes, so it is consistent even after a panic
// elsewhere poisoned the lock.
fn registry_read() -> RwLockReadGuard<'static, Registry> {
    registry().read().unwrap_or_else(|e| e.into_inner())
}

fn registry_write() -> RwLockWriteGuard<'static, Registry> {
    registry().write().unwrap_or_else(|e| e.into_inner())
}

fn register(
    addr: usize,
    len: usize,
    shared: bool,
    owner: Option<Arc<dyn Any + Send + Sync>>,
) -> Result<(), MmError> {
    check_range("register volatile memory", addr, len, page_size())?;
    let end = addr + len;
    let mut reg = registry_write();
    let before = reg.range(..end).next_back();
    if matches!(before, Some((_, v)) if v.end > addr) {
        return Err(MmError::AlreadyRegistered { addr, len });
    }
    reg.insert(
        addr,
        Volatile {
            end,
            shared,
            _owner: owner,
        },
    );
    Ok(())
}

fn unregister(addr: usize) -> Option<Volatile> {
    registry_write().remove(&addr)
}

/// Whether `addr..addr+len` lies inside one registered volatile mapping, which [`release`]
/// would accept.
pub fn is_volatile(addr: usize, len: usize) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let reg = registry_read();
    matches!(reg.range(..=addr).next_back(), Some((_, v)) if end <= v.end)
}

/// A registration of volatile memory; unregisters (and drops what it keeps alive) on drop.
#[derive(Debug)]
#[must_use = "the range is unregistered as soon as the registration is dropped"]
pub struct VolatileRegistration {
    addr: usize,
}

impl Drop for VolatileRegistration {
    fn drop(&mut self) {
        unregister(self.addr);
    }
}

/// Registers a vm-memory region (guest RAM) as volatile memory so [`release`] may discard
/// it. The registration keeps the region mapped until it is dropped.
///
/// This is safe because vm-memory only hands out guest memory as volatile slices and raw
/// pointers (its `as_slice` is `unsafe`), the same contract as [`Mmap`].
pub fn register_mmap_region<B: Bitmap + Send + Sync + 'static>(
    region: Arc<MmapRegion<B>>,
) -> Result<VolatileRegistration, MmError> {
    let addr = region.as_ptr() as usize;
    let len = region.size();
    let shared = region.flags() & libc::MAP_SHARED != 0;
    register(addr, len, shared, Some(region))?;
    Ok(VolatileRegistration { addr })
}

/// Registers a mapping owned elsewhere as volatile memory so [`release`] may discard it.
///
/// # Safety
/// While the returned registration lives, `addr..addr+len` must stay mapped (as a shared
/// mapping if and only if `shared`), and no Rust reference may point into it: its contents
/// can be discarded at any time by safe code.
pub unsafe fn register_volatile(
    addr: usize,
    len: usize,
    shared: bool,
) -> Result<VolatileRegistration, MmError> {
    register(addr, len, shared, None)?;
    Ok(VolatileRegistration { addr })
}

/// Releases the pages of a range of registered volatile memory: `MADV_DONTNEED` for a
/// private mapping (it reads back as zeros, or the file's contents), `MADV_REMOVE` for a
/// shared one (frees the shmem/hugetlb pages behind it, which then read back as zeros).
///
/// Fails with [`MmError::NotVolatile`] unless the range lies inside one registration.
pub fn release(addr: usize, len: usize) -> Result<(), MmError> {
    check_range("release", addr, len, page_size())?;
    // Hold the read lock across the madvise: unregistering (then munmap) waits for us.
    let reg = registry_read();
    let shared = match reg.range(..=addr).next_back() {
        Some((_, v)) if addr + len <= v.end => v.shared,
        _ => {
            return Err(MmError::NotVolatile {
                call: "release",
                addr,
                len,
            })
        }
    };
    let (call, advice) = if shared {
        ("madvise(MADV_REMOVE)", libc::MADV_REMOVE)
    } else {
        ("madvise(MADV_DONTNEED)", libc::MADV_DONTNEED)
    };
    // SAFETY: the range lies inside a registered volatile mapping, which is still mapped
    // (its owner cannot unregister while we hold the read lock) and which by the
    // registration's contract no Rust reference points into, so discarding its contents
    // cannot invalidate anything Rust relies on.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    drop(reg);
    if rc != 0 {
        return Err(MmError::last(call));
    }
    Ok(())
}

/// Appends the xxh3-64 of every 4 KiB page of `addr..addr+len`, which must lie in one
/// registration of volatile memory (guest RAM), to `out`. The pages are hashed where they
/// are ([`crate::pagehash`]): copying a page out of guest memory first costs more than
/// hashing it.
///
/// Another thread (a running vCPU, a channel placing a page) may write the bytes
/// meanwhile; then a page's hash is that of no particular instant, and callers must take a
/// mismatch to mean "changed" (the page is sent or checked again), never as a fact about a
/// past state.
pub fn hash_volatile_pages(addr: usize, len: usize, out: &mut Vec<u64>) -> Result<(), MmError> {
    use crate::pagehash::{page_xxh3, PAGE};
    check_range("hash", addr, len, PAGE)?;
    // The read lock keeps the mapping in place while we read (unregistering waits for it).
    let reg = registry_read();
    if !matches!(reg.range(..=addr).next_back(), Some((_, v)) if addr + len <= v.end) {
        return Err(MmError::NotVolatile {
            call: "hash",
            addr,
            len,
        });
    }
    out.reserve(len / PAGE);
    for start in (addr..addr + len).step_by(PAGE) {
        // SAFETY: `start..start+PAGE` lies inside a registered volatile mapping, which stays
        // mapped while we hold the read lock (a concurrent `release` may empty the page,
        // never unmap it), so the pointer is valid for PAGE bytes. `page_xxh3` reads it
        // through raw pointers only, so bytes changing meanwhile break no Rust reference's
        // promise; they only change the value.
        out.push(unsafe { page_xxh3(start as *const u8) });
    }
    drop(reg);
    Ok(())
}

/// Drops this process's page-table entries for a range of a *shared* registered mapping
/// (`MADV_DONTNEED`): the data stays in the file, and the next access maps it again. Tearing
/// down a large populated mapping costs time proportional to what is mapped; doing this
/// while the guest still runs leaves little to tear down when it matters (an `exec` inside
/// a live update's pause). Private memory is refused: there it would discard the data.
pub fn drop_page_tables(addr: usize, len: usize) -> Result<(), MmError> {
    dont_need_registered("drop page tables (shared memory only)", addr, len, true)
}

/// Takes a range of registered volatile memory out of this process (`MADV_DONTNEED`), for
/// memory whose guest has left the process for good: private pages are freed (and would
/// read back as zeros); shared pages stay in their file, which another process may map,
/// and only this process's page tables go. Done piece by piece ahead of `exit`, it spares
/// the exit from tearing everything down at once.
pub fn let_go(addr: usize, len: usize) -> Result<(), MmError> {
    dont_need_registered("let go of guest memory", addr, len, false)
}

/// `MADV_DONTNEED` on a range inside one registration (a shared one if `shared_only`).
fn dont_need_registered(
    call: &'static str,
    addr: usize,
    len: usize,
    shared_only: bool,
) -> Result<(), MmError> {
    check_range(call, addr, len, page_size())?;
    let reg = registry_read();
    match reg.range(..=addr).next_back() {
        Some((_, v)) if addr + len <= v.end && (v.shared || !shared_only) => {}
        _ => return Err(MmError::NotVolatile { call, addr, len }),
    }
    // SAFETY: the range lies inside a registered volatile mapping (checked under the read
    // lock, so it stays mapped meanwhile), which by the registration's contract no Rust
    // reference points into and whose contents safe code may discard at any time. On a
    // shared mapping MADV_DONTNEED only removes page-table entries; the pages stay in the
    // file.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    drop(reg);
    if rc != 0 {
        return Err(MmError::last("madvise(MADV_DONTNEED)"));
    }
    Ok(())
}

/// What [`replace_mapping`] puts in place of a registered volatile mapping.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// Fresh private anonymous memory (reads as zeros).
    Anonymous,
    /// `len` bytes of a file (memfd, hugetlb memfd) from `offset`, shared.
    File {
        /// The file.
        fd: BorrowedFd<'a>,
        /// Where the mapping starts in it (page aligned; huge-page aligned for hugetlb).
        offset: u64,
    },
}

/// Replaces the whole of one registered volatile mapping, in place (`MAP_FIXED`), with
/// `backing`: the same addresses, so everything that knows them (KVM memory slots, the
/// VMM's regions) now reaches the new memory. This is how a new process takes over guest
/// memory from another without copying it.
///
/// The range must be exactly one registration (see [`register_mmap_region`]); its shared
/// flag follows the new backing. Like [`release`], this only changes what volatile memory
/// reads as, which its registration contract allows at any time.
pub fn replace_mapping(addr: usize, len: usize, backing: Backing<'_>) -> Result<(), MmError> {
    check_range("replace mapping", addr, len, page_size())?;
    // Held across the mmap: nobody unregisters (and unmaps) the range meanwhile.
    let mut reg = registry_write();
    let v = match reg.get_mut(&addr) {
        Some(v) if v.end == addr + len => v,
        _ => {
            return Err(MmError::NotVolatile {
                call: "replace mapping",
                addr,
                len,
            })
        }
    };
    let (flags, fd, offset, shared) = match backing {
        Backing::Anonymous => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
            false,
        ),
        Backing::File { fd, offset } => {
            let off = libc::off_t::try_from(offset).map_err(|_| MmError::Misaligned {
                call: "replace mapping offset",
                addr: offset as usize,
                len,
                align: page_size(),
            })?;
            (libc::MAP_SHARED, fd.as_raw_fd(), off, true)
        }
    };
    // SAFETY: the range is exactly one registered volatile mapping (checked above, under the
    // registry's write lock, so it cannot be unregistered and unmapped meanwhile). By the
    // registration's contract no Rust reference points into it, so replacing the pages
    // behind these addresses is no different from the guest rewriting them. MAP_FIXED
    // only touches `addr..addr+len`, which the registration owns.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MmError::last("mmap(MAP_FIXED)"));
    }
    v.shared = shared;
    Ok(())
}

/// Size in bytes of the file behind `fd`, and whether it lives on hugetlbfs.
pub fn file_info(fd: BorrowedFd<'_>) -> Result<(u64, bool), MmError> {
    // SAFETY: fstat/fstatfs only write into the zeroed structs we pass, which live for
    // the call; the fd is borrowed and valid.
    let (st, fs) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(MmError::last("fstat"));
        }
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut fs) != 0 {
            return Err(MmError::last("fstatfs"));
        }
        (st, fs)
    };
    Ok((
        u64::try_from(st.st_size).unwrap_or(0),
        fs.f_type == libc::HUGETLBFS_MAGIC,
    ))
}

// ---------------------------------------------------------------------------------------
// Owned mappings.

/// Options for [`Mmap::anonymous`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOptions {
    /// Back the mapping with hugetlb pages of this size (`MAP_HUGETLB`); `len` must be a
    /// multiple of it and the pool must have enough free pages.
    pub hugetlb: Option<HugePageSize>,
    /// `MAP_SHARED` (shmem) instead of `MAP_PRIVATE`.
    pub shared: bool,
    /// `MAP_POPULATE`: fault everything in before returning.
    pub populate: bool,
}

/// An owned read-write memory mapping, unmapped on drop.
///
/// The memory is *volatile* (see the module docs): it is registered so that [`release`] may
/// discard it, and it is only ever exposed as a raw pointer. Code that builds references into
/// it must make sure nothing releases or otherwise changes the memory while they live.
#[derive(Debug)]
pub struct Mmap {
    addr: usize,
    len: usize,
    shared: bool,
}

// SAFETY: an `Mmap` is an address range plus the duty to unmap it; it never dereferences the
// memory itself and only hands out raw pointers, whose use is the caller's responsibility.
// Unmapping from another thread is fine (munmap is process-wide).
unsafe impl Send for Mmap {}
// SAFETY: every `&self` method only reads the immutable address/length fields.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `len` bytes of anonymous read-write memory.
    pub fn anonymous(len: usize, opts: MapOptions) -> Result<Mmap, MmError> {
        let align = opts.hugetlb.map_or_else(page_size, HugePageSize::bytes);
        check_range("mmap", 0, len, align)?;
        let mut flags = libc::MAP_ANONYMOUS
            | if opts.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        if let Some(h) = opts.hugetlb {
            flags |= libc::MAP_HUGETLB | h.map_flag();
        }
        if opts.populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh mapping at an address of the kernel's choosing (no MAP_FIXED)
        // cannot overlap any existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        Mmap::finish(p, len, opts.shared)
    }

    /// Maps `len` bytes of `fd` at `offset` (page-aligned) read-write, shared or private.
    pub fn from_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        shared: bool,
    ) -> Result<Mmap, MmError> {
        check_range("mmap", 0, len, page_size())?;
        let off = libc::off_t::try_from(offset)
            .ok()
            .filter(|&o| is_aligned(o as usize, page_size()))
            .ok_or(MmError::Misaligned {
                call: "mmap offset",
                addr: offset as usize,
                len,
                align: page_size(),
            })?;
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: as above, a new mapping placed by the kernel; the fd is borrowed and valid
        // for the call, and the mapping does not need it to stay open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                off,
            )
        };
        Mmap::finish(p, len, shared)
    }

    fn finish(p: *mut libc::c_void, len: usize, shared: bool) -> Result<Mmap, MmError> {
        if p == libc::MAP_FAILED {
            return Err(MmError::last("mmap"));
        }
        let addr = p as usize;
        if let Err(e) = register(addr, len, shared, None) {
            // SAFETY: we just created this mapping and nothing else knows about it.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        Ok(Mmap { addr, len, shared })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Start of the mapping as an address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping is `MAP_SHARED`.
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // Unregister first: this waits for any `release` in flight on the range, and no new
        // one can find it afterwards, so nothing touches the addresses once they are reused.
        unregister(self.addr);
        // SAFETY: we own this mapping, created in `finish`, and nobody can reach it after
        // drop except through raw pointers whose validity was the holder's concern.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

// ---------------------------------------------------------------------------------------
// memfd and files.

/// The running kernel's version, major and minor (`None` if its release string is not
/// `MAJOR.MINOR...`).
pub fn kernel_version() -> Option<(u32, u32)> {
    let uname = rustix::system::uname();
    let release = uname.release().to_str().ok()?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether `MADV_DONTNEED` works on hugetlb mappings (Linux 5.18 and later), which
/// [`drop_page_tables`] needs there.
pub fn hugetlb_dont_need_supported() -> bool {
    kernel_version().is_some_and(|v| v >= (5, 18))
}

/// Options for [`memfd_create`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemfdOptions {
    /// Create the memfd on hugetlbfs with this page size (`MFD_HUGETLB`).
    pub hugetlb: Option<HugePageSize>,
}

/// Creates an anonymous memory file (close-on-exec). Size it with `File::set_len`.
pub fn memfd_create(name: &str, opts: MemfdOptions) -> Result<OwnedFd, MmError> {
    let cname = CString::new(name).map_err(|_| MmError::InvalidName(name.to_string()))?;
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(h) = opts.hugetlb {
        flags |= libc::MFD_HUGETLB | h.mfd_flag();
    }
    // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MmError::last("memfd_create"));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Frees `len` bytes of `fd` at `offset` (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); the
/// hole reads back as zeros. Safe for the reason given in the module docs.
pub fn fallocate_punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), MmError> {
    let bad = || MmError::InvalidRange {
        call: "fallocate(PUNCH_HOLE)",
        addr: offset as usize,
        len: len as usize,
    };
    let off = libc::off_t::try_from(offset).map_err(|_| bad())?;
    let l = libc::off_t::try_from(len).map_err(|_| bad())?;
    if l == 0 || off.checked_add(l).is_none() {
        return Err(bad());
    }
    // SAFETY: fallocate only changes the file behind a valid borrowed fd.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc != 0 {
        return Err(MmError::last("fallocate(PUNCH_HOLE)"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// madvise, mlock, mincore.

fn advise(call: &'static str, addr: usize, len: usize, advice: libc::c_int) -> Result<(), MmError> {
    check_range(call, addr, len, page_size())?;
    // SAFETY: callers only pass advice that never changes what the memory reads as
    // (populate, THP hints); the kernel validates that the range is mapped.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if rc != 0 {
        return Err(MmError::last(call));
    }
    Ok(())
}

/// Faults the range in writable (`MADV_POPULATE_WRITE`), allocating every page without
/// changing its contents.
pub fn populate_write(addr: usize, len: usize) -> Result<(), MmError> {
    advise(
        "madvise(MADV_POPULATE_WRITE)",
        addr,
        len,
        libc::MADV_POPULATE_WRITE,
    )
}

/// Faults the range in readable (`MADV_POPULATE_READ`); untouched anonymous pages map the
/// shared zero page.
pub fn populate_read(addr: usize, len: usize) -> Result<(), MmError> {
    advise(
        "madvise(MADV_POPULATE_READ)",
        addr,
        len,
        libc::MADV_POPULATE_READ,
    )
}

/// Asks for transparent huge pages on the range (`MADV_HUGEPAGE`).
pub fn huge_page(addr: usize, len: usize) -> Result<(), MmError> {
    advise("madvise(MADV_HUGEPAGE)", addr, len, libc::MADV_HUGEPAGE)
}

/// Opts the range out of transparent huge pages (`MADV_NOHUGEPAGE`).
pub fn no_huge_page(addr: usize, len: usize) -> Result<(), MmError> {
    advise("madvise(MADV_NOHUGEPAGE)", addr, len, libc::MADV_NOHUGEPAGE)
}

/// `MADV_DONTNEED`: drops the pages; a private mapping then reads back as zeros (or as the
/// file's contents). Prefer the safe [`release`] for volatile memory.
///
/// # Safety
/// No Rust reference may point into the range, and nothing may rely on its contents: they
/// are replaced.
pub unsafe fn dont_need(addr: usize, len: usize) -> Result<(), MmError> {
    check_range("madvise(MADV_DONTNEED)", addr, len, page_size())?;
    // SAFETY: the caller guarantees nothing relies on the contents of the range.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(MmError::last("madvise(MADV_DONTNEED)"));
    }
    Ok(())
}

/// `MADV_REMOVE`: frees the shmem/hugetlb pages behind a shared mapping (a hole punched in
/// the file); they read back as zeros. Prefer the safe [`release`] for volatile memory.
///
/// # Safety
/// As for [`dont_need`]; every other mapping of the same file sees the hole too.
pub unsafe fn remove(addr: usize, len: usize) -> Result<(), MmError> {
    check_range("madvise(MADV_REMOVE)", addr, len, page_size())?;
    // SAFETY: the caller guarantees nothing relies on the contents of the range.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_REMOVE) };
    if rc != 0 {
        return Err(MmError::last("madvise(MADV_REMOVE)"));
    }
    Ok(())
}

/// Locks the range in RAM, faulting it in (`mlock`). Needs CAP_IPC_LOCK or room under
/// RLIMIT_MEMLOCK.
pub fn mlock(addr: usize, len: usize) -> Result<(), MmError> {
    check_range("mlock", addr, len, page_size())?;
    // SAFETY: mlock does not change the contents of memory; the kernel checks the range.
    let rc = unsafe { libc::mlock(addr as *const libc::c_void, len) };
    if rc != 0 {
        return Err(MmError::last("mlock"));
    }
    Ok(())
}

/// Unlocks the range (`munlock`); the pages stay resident.
pub fn munlock(addr: usize, len: usize) -> Result<(), MmError> {
    check_range("munlock", addr, len, page_size())?;
    // SAFETY: munlock does not change the contents of memory; the kernel checks the range.
    let rc = unsafe { libc::munlock(addr as *const libc::c_void, len) };
    if rc != 0 {
        return Err(MmError::last("munlock"));
    }
    Ok(())
}

/// Which base pages of the range are resident (`mincore`), one entry per page.
pub fn mincore(addr: usize, len: usize) -> Result<Vec<bool>, MmError> {
    let page = page_size();
    check_range("mincore", addr, len, page)?;
    let mut vec = vec![0u8; len / page];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires; mincore only
    // reads page tables.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(MmError::last("mincore"));
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

// ---------------------------------------------------------------------------------------
// Limits and capabilities.

/// RLIMIT_MEMLOCK as `(soft, hard)` in bytes; `u64::MAX` means unlimited.
pub fn memlock_limit() -> Result<(u64, u64), MmError> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(MmError::last("getrlimit(RLIMIT_MEMLOCK)"));
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Sets RLIMIT_MEMLOCK for the whole process (`u64::MAX` = unlimited). Raising the hard
/// limit needs CAP_SYS_RESOURCE.
pub fn set_memlock_limit(soft: u64, hard: u64) -> Result<(), MmError> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid rlimit, only read by the kernel.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        return Err(MmError::last("setrlimit(RLIMIT_MEMLOCK)"));
    }
    Ok(())
}

/// Bytes the process has locked now (`VmLck` in /proc/self/status).
pub fn locked_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&text, "VmLck").map(|k| k * 1024)
}

const CAP_IPC_LOCK: u32 = 14;

/// Whether the calling thread has CAP_IPC_LOCK in its effective set (so mlock and VFIO
/// pinning ignore RLIMIT_MEMLOCK). False when it cannot be determined.
pub fn has_cap_ipc_lock() -> bool {
    // Capabilities are per thread; fall back to the process view on old kernels.
    let text = std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"))
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops CAP_IPC_LOCK from the calling thread's effective set (threads it creates later
/// inherit that). It stays permitted, so the thread could raise it again. Used to check
/// RLIMIT_MEMLOCK behaviour as an unprivileged process would see it.
pub fn drop_cap_ipc_lock() -> Result<(), MmError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 takes a header and two data structs, both valid and writable here.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(MmError::last("capget"));
    }
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    // SAFETY: as above; capset only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(MmError::last("capset"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_empty_ranges_are_rejected() {
        let p = page_size();
        assert!(matches!(
            populate_write(p + 1, p),
            Err(MmError::Misaligned { .. })
        ));
        assert!(matches!(mlock(p, 0), Err(MmError::InvalidRange { .. })));
        assert!(matches!(
            mincore(usize::MAX - p + 1, 2 * p),
            Err(MmError::InvalidRange { .. })
        ));
    }

    #[test]
    fn mmap_populate_release_roundtrip() {
        let p = page_size();
        let m = Mmap::anonymous(16 * p, MapOptions::default()).expect("mmap");
        assert!(mincore(m.addr(), m.len())
            .expect("mincore")
            .iter()
            .all(|r| !r));
        populate_write(m.addr(), m.len()).expect("populate");
        assert!(mincore(m.addr(), m.len())
            .expect("mincore")
            .iter()
            .all(|r| *r));
        release(m.addr() + 4 * p, 4 * p).expect("release");
        let res = mincore(m.addr(), m.len()).expect("mincore");
        assert_eq!(res.iter().filter(|r| !**r).count(), 4);
        // Running past the mapping's end: refused. (The page right after it may belong to
        // another test's mapping, so only a range that straddles the end is certain to fail;
        // unregistering on drop is checked where the address stays mapped.)
        assert!(matches!(
            release(m.addr() + 15 * p, 2 * p),
            Err(MmError::NotVolatile { .. })
        ));
    }

    #[test]
    fn hashes_registered_pages_in_place() {
        let p = page_size();
        let m = Mmap::anonymous(4 * p, MapOptions::default()).expect("mmap");
        populate_write(m.addr(), m.len()).expect("populate");
        let mut out = Vec::new();
        hash_volatile_pages(m.addr(), 4 * p, &mut out).expect("hash");
        let zeros = vec![0u8; p];
        assert_eq!(out, vec![twox_hash::XxHash3_64::oneshot(&zeros); 4]);
        assert!(matches!(
            hash_volatile_pages(m.addr(), 3 * p + 1, &mut out),
            Err(MmError::Misaligned { .. })
        ));
        assert!(matches!(
            hash_volatile_pages(m.addr() + 3 * p, 2 * p, &mut out),
            Err(MmError::NotVolatile { .. })
        ));
        // Memory that is not registered (a heap buffer): refused.
        let plain = vec![7u8; 2 * p];
        let aligned = (plain.as_ptr() as usize).next_multiple_of(p);
        let before = out.len();
        assert!(matches!(
            hash_volatile_pages(aligned, p, &mut out),
            Err(MmError::NotVolatile { .. })
        ));
        assert_eq!(out.len(), before, "nothing appended on a refusal");
    }

    #[test]
    fn shared_release_frees_shmem() {
        let p = page_size();
        let m = Mmap::anonymous(
            8 * p,
            MapOptions {
                shared: true,
                ..MapOptions::default()
            },
        )
        .expect("mmap");
        populate_write(m.addr(), m.len()).expect("populate");
        release(m.addr(), m.len()).expect("release (MADV_REMOVE)");
        assert!(mincore(m.addr(), m.len())
            .expect("mincore")
            .iter()
            .all(|r| !r));
    }

    #[test]
    fn vm_memory_regions_can_be_registered_once() {
        let p = page_size();
        let region = Arc::new(MmapRegion::<()>::new(8 * p).expect("vm-memory region"));
        let addr = region.as_ptr() as usize;
        assert!(matches!(release(addr, p), Err(MmError::NotVolatile { .. })));
        let reg = register_mmap_region(region.clone()).expect("register");
        assert!(matches!(
            register_mmap_region(region.clone()),
            Err(MmError::AlreadyRegistered { .. })
        ));
        populate_write(addr, 8 * p).expect("populate");
        // MmapRegion::new is a shared mapping, so this is MADV_REMOVE.
        release(addr, 8 * p).expect("release");
        assert!(mincore(addr, 8 * p).expect("mincore").iter().all(|r| !r));
        drop(reg);
        assert!(!is_volatile(addr, p));
    }

    #[test]
    fn memfd_maps_and_punches() {
        let p = page_size();
        let fd = memfd_create("ferry-test", MemfdOptions::default()).expect("memfd");
        let f = std::fs::File::from(fd);
        f.set_len(4 * p as u64).expect("set_len");
        let m = Mmap::from_fd(std::os::fd::AsFd::as_fd(&f), 0, 4 * p, true).expect("mmap fd");
        populate_write(m.addr(), m.len()).expect("populate");
        fallocate_punch_hole(std::os::fd::AsFd::as_fd(&f), 0, 4 * p as u64).expect("punch");
        assert!(matches!(
            memfd_create("a\0b", MemfdOptions::default()),
            Err(MmError::InvalidName(_))
        ));
    }

    #[test]
    fn kernel_version_is_read() {
        let (major, _) = kernel_version().expect("a MAJOR.MINOR kernel release");
        assert!(major >= 3);
    }

    #[test]
    fn limits_are_readable() {
        let (soft, hard) = memlock_limit().expect("getrlimit");
        assert!(soft <= hard);
        assert!(locked_bytes().is_some());
        let _ = has_cap_ipc_lock();
    }

    #[test]
    fn status_parser() {
        let s = "Name:\tx\nVmLck:\t    1234 kB\nHugepagesize:    2048 kB\n";
        assert_eq!(status_kib(s, "VmLck"), Some(1234));
        assert_eq!(status_kib(s, "Hugepagesize"), Some(2048));
        assert_eq!(status_kib(s, "VmPin"), None);
    }
}
