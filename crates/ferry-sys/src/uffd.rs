//! userfaultfd: page faults on registered memory delivered to a handler, and the ioctls that
//! resolve them by placing a page atomically (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), by mapping
//! a page its file already holds (`UFFDIO_CONTINUE`, for MINOR faults on shmem) or by waking
//! the waiters (`UFFDIO_WAKE`).
//!
//! Placing a page writes memory behind Rust's back, so it is only allowed into registered
//! *volatile* memory (see [`crate::mm`]), which nothing holds references into. Registration
//! is restricted the same way. The kernel never overwrites a page that is present: a copy
//! onto one fails with [`Placed::Exists`], which is how a page already placed (by another
//! channel, or written by the running guest) is never replaced by an older copy.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::mm;

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_CONTINUE: libc::c_ulong = 0xc020_aa07;
const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_MINOR: u64 = 4;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// Fault messages carry the faulting thread's id.
const FEATURE_THREAD_ID: u64 = 1 << 8;
/// MISSING faults on shmem (memfd) mappings.
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// MINOR faults on shmem: the file holds the page but this mapping does not map it.
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// MINOR faults on hugetlbfs (hugetlb memfd) mappings.
const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
const MSG_LEN: usize = 32;

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `uffdio_zeropage` and `uffdio_continue`, which share a layout: a range, a mode, and the
/// bytes done (or a negative error) written back by the kernel.
#[repr(C)]
struct RangeArg {
    range: Range,
    mode: u64,
    done: i64,
}

/// Errors of the userfaultfd wrappers.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A syscall or ioctl failed.
    #[error("{call} failed: {source}")]
    Os {
        /// The call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A range outside registered volatile memory.
    #[error(transparent)]
    Range(#[from] mm::MmError),
    /// The kernel registered the range but cannot place pages into it with the ioctls the
    /// handlers need (copy, zero page, wake).
    #[error(
        "the kernel cannot resolve missing-page faults in this memory (available ioctls \
         {ioctls:#x}, needed {needed:#x})"
    )]
    Unsupported {
        /// The ioctls the kernel offers for the range.
        ioctls: u64,
        /// The ones needed.
        needed: u64,
    },
}

/// `_UFFDIO_WAKE`, `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE` in a registration's ioctl mask.
const NEEDED_IOCTLS: u64 = 1 << 0x02 | 1 << 0x03 | 1 << 0x04;
/// `_UFFDIO_WAKE` and `_UFFDIO_CONTINUE`: what a registration that also takes MINOR faults
/// is resolved with (pages are written through the file and then mapped; hugetlbfs has no
/// `UFFDIO_ZEROPAGE`).
const NEEDED_MINOR_IOCTLS: u64 = 1 << 0x02 | 1 << 0x07;

fn os(call: &'static str) -> UffdError {
    UffdError::Os {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A page fault on registered memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (not page aligned).
    pub addr: u64,
    /// A write fault.
    pub write: bool,
    /// The faulting thread's id (0 when the kernel does not report it).
    pub tid: u32,
}

/// What a placement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The whole range was placed (and its waiters woken).
    All,
    /// The page at offset `done` (bytes) of the range was present already; the pages before
    /// it were placed.
    Exists {
        /// Bytes placed before the present page.
        done: u64,
    },
}

/// One userfaultfd, non-blocking, with close-on-exec.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    /// The features the handshake settled (all the kernel has, for a handshake asking for
    /// none).
    features: u64,
}

impl Uffd {
    /// Opens a userfaultfd for kernel- and user-mode faults, with thread ids and shmem
    /// support.
    pub fn new() -> Result<Uffd, UffdError> {
        Uffd::open(FEATURE_THREAD_ID | FEATURE_MISSING_SHMEM)
    }

    /// Like [`Uffd::new`], and able to take MINOR faults ([`Uffd::register_missing_minor`])
    /// on shmem (memfd) memory, and on hugetlbfs (hugetlb memfd) memory where the kernel
    /// offers them; fails on kernels without MINOR faults on shmem (before 5.14).
    pub fn with_minor() -> Result<Uffd, UffdError> {
        let hugetlb = if Uffd::minor_faults_supported(true) {
            FEATURE_MINOR_HUGETLBFS
        } else {
            0
        };
        Uffd::open(FEATURE_THREAD_ID | FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM | hugetlb)
    }

    /// Whether this kernel offers MINOR faults on shmem, or with `hugetlb` on hugetlbfs
    /// (asked once, then remembered).
    pub fn minor_faults_supported(hugetlb: bool) -> bool {
        static FEATURES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // A handshake asking for no feature is answered with every feature the kernel has.
        let features = *FEATURES.get_or_init(|| Uffd::open(0).map(|u| u.features).unwrap_or(0));
        let want = if hugetlb {
            FEATURE_MINOR_HUGETLBFS
        } else {
            FEATURE_MINOR_SHMEM
        };
        features & want == want
    }

    fn open(features: u64) -> Result<Uffd, UffdError> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(os("userfaultfd"));
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = ApiArg {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a properly sized ApiArg that outlives the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut ApiArg) };
        if rc != 0 {
            return Err(os("ioctl(UFFDIO_API)"));
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    /// Registers `[addr, addr + len)` for MISSING faults: from now on a thread touching a
    /// page there that is not present waits until the page is placed or woken.
    pub fn register_missing(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.register(addr, len, REGISTER_MODE_MISSING, NEEDED_IOCTLS)
    }

    /// Registers a range of shared (memfd or hugetlb memfd) memory for MISSING and MINOR
    /// faults: a thread waits on a page its file lacks, and also on one the file holds but
    /// this mapping does not map yet (its page tables were dropped). The handler writes such
    /// a page through the file, then maps it with [`Uffd::continue_pages`] (on hugetlb, whole
    /// huge pages only). Needs [`Uffd::with_minor`].
    pub fn register_missing_minor(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.register(
            addr,
            len,
            REGISTER_MODE_MISSING | REGISTER_MODE_MINOR,
            NEEDED_MINOR_IOCTLS,
        )
    }

    fn register(&self, addr: usize, len: usize, mode: u64, needed: u64) -> Result<(), UffdError> {
        check_volatile("UFFDIO_REGISTER", addr, len)?;
        let mut arg = RegisterArg {
            range: range(addr, len),
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a RegisterArg that outlives the call;
        // registration changes how faults are handled, not what memory holds.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_REGISTER,
                &mut arg as *mut RegisterArg,
            )
        };
        if rc != 0 {
            return Err(os("ioctl(UFFDIO_REGISTER)"));
        }
        if arg.ioctls & needed != needed {
            let _ = self.unregister(addr, len);
            return Err(UffdError::Unsupported {
                ioctls: arg.ioctls,
                needed,
            });
        }
        Ok(())
    }

    /// Unregisters a range: faults there are ordinary again.
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut arg = range(addr, len);
        // SAFETY: UFFDIO_UNREGISTER reads a Range that outlives the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_UNREGISTER,
                &mut arg as *mut Range,
            )
        };
        if rc != 0 {
            return Err(os("ioctl(UFFDIO_UNREGISTER)"));
        }
        Ok(())
    }

    /// Places `src` at `dst` (page aligned, whole pages) and wakes whoever waits there,
    /// unless a page in the range is present: then the pages before it are placed and
    /// [`Placed::Exists`] says where it stopped.
    pub fn copy(&self, dst: usize, src: &[u8]) -> Result<Placed, UffdError> {
        check_volatile("UFFDIO_COPY", dst, src.len())?;
        let mut arg = CopyArg {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // A partial copy (it stopped at a present page, or was interrupted) ends in EAGAIN
        // with the bytes copied; the retry from there tells which.
        let mut before = 0u64;
        loop {
            // SAFETY: `src` is a live slice of `len` bytes; `dst` lies in registered
            // volatile memory (checked above), which nothing holds references into, so the
            // kernel writing it is like the guest writing it.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut arg as *mut CopyArg) };
            if rc == 0 {
                return Ok(Placed::All);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return Ok(Placed::Exists {
                        done: before + arg.copy.max(0) as u64,
                    })
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    let done = arg.copy.max(0) as u64;
                    before += done;
                    arg.dst += done;
                    arg.src += done;
                    arg.len -= done.min(arg.len);
                    arg.copy = 0;
                    if arg.len == 0 {
                        return Ok(Placed::All);
                    }
                }
                _ => {
                    return Err(UffdError::Os {
                        call: "ioctl(UFFDIO_COPY)",
                        source: err,
                    })
                }
            }
        }
    }

    /// Places zero pages over `[addr, addr + len)`; like [`Uffd::copy`] for a present page.
    pub fn zero(&self, addr: usize, len: usize) -> Result<Placed, UffdError> {
        self.range_ioctl(UFFDIO_ZEROPAGE, "ioctl(UFFDIO_ZEROPAGE)", addr, len)
    }

    /// Maps the pages the file already holds over `[addr, addr + len)` (a range registered
    /// with [`Uffd::register_missing_minor`]) and wakes whoever waits there; like
    /// [`Uffd::copy`] for a page this mapping maps already.
    pub fn continue_pages(&self, addr: usize, len: usize) -> Result<Placed, UffdError> {
        self.range_ioctl(UFFDIO_CONTINUE, "ioctl(UFFDIO_CONTINUE)", addr, len)
    }

    /// `UFFDIO_ZEROPAGE` or `UFFDIO_CONTINUE` over a range: retried from where a partial
    /// call stopped, and [`Placed::Exists`] at a page that is present.
    fn range_ioctl(
        &self,
        request: libc::c_ulong,
        call: &'static str,
        addr: usize,
        len: usize,
    ) -> Result<Placed, UffdError> {
        check_volatile(call, addr, len)?;
        let mut arg = RangeArg {
            range: range(addr, len),
            mode: 0,
            done: 0,
        };
        let mut before = 0u64;
        loop {
            // SAFETY: `request` is UFFDIO_ZEROPAGE or UFFDIO_CONTINUE, which read and write
            // a RangeArg that outlives the call. The range lies in registered volatile memory
            // (checked above), which nothing holds references into: mapping zero pages, or
            // the file's own pages, there is like the guest writing it.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), request, &mut arg as *mut RangeArg) };
            if rc == 0 {
                return Ok(Placed::All);
            }
            let err = io::Error::last_os_error();
            let done = arg.done.max(0) as u64;
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return Ok(Placed::Exists {
                        done: before + done,
                    })
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    before += done;
                    arg.range.start += done;
                    arg.range.len -= done.min(arg.range.len);
                    arg.done = 0;
                    if arg.range.len == 0 {
                        return Ok(Placed::All);
                    }
                }
                _ => return Err(UffdError::Os { call, source: err }),
            }
        }
    }

    /// Wakes the threads waiting on `[addr, addr + len)` (their page is present by now).
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut arg = range(addr, len);
        // SAFETY: UFFDIO_WAKE reads a Range that outlives the call; it changes no memory.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut arg as *mut Range) };
        if rc != 0 {
            return Err(os("ioctl(UFFDIO_WAKE)"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for faults and appends those pending (up to `max`) to `out`.
    /// Returns how many were read (0: none within the timeout).
    pub fn read_faults(
        &self,
        out: &mut Vec<Fault>,
        max: usize,
        timeout: Duration,
    ) -> Result<usize, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll reads and writes one pollfd that outlives the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(UffdError::Os {
                call: "poll(userfaultfd)",
                source: err,
            });
        }
        if rc == 0 {
            return Ok(0);
        }
        let mut buf = [0u8; MSG_LEN * 64];
        let want = (max.clamp(1, 64)) * MSG_LEN;
        // SAFETY: read writes at most `want` <= buf.len() bytes into `buf`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                want,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return Ok(0);
            }
            return Err(UffdError::Os {
                call: "read(userfaultfd)",
                source: err,
            });
        }
        let before = out.len();
        for msg in buf
            .get(..n as usize)
            .unwrap_or_default()
            .chunks_exact(MSG_LEN)
        {
            if let Some(f) = parse(msg) {
                out.push(f);
            }
        }
        Ok(out.len() - before)
    }
}

/// Decodes one `uffd_msg`; `None` for events other than page faults.
fn parse(msg: &[u8]) -> Option<Fault> {
    let u64_at = |o: usize| {
        msg.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if *msg.first()? != EVENT_PAGEFAULT {
        return None;
    }
    let flags = u64_at(8)?;
    let addr = u64_at(16)?;
    let tid = msg
        .get(24..28)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0);
    Some(Fault {
        addr,
        write: flags & PAGEFAULT_FLAG_WRITE != 0,
        tid,
    })
}

fn range(addr: usize, len: usize) -> Range {
    Range {
        start: addr as u64,
        len: len as u64,
    }
}

fn check_volatile(call: &'static str, addr: usize, len: usize) -> Result<(), UffdError> {
    let p = mm::page_size();
    if len == 0 || !addr.is_multiple_of(p) || !len.is_multiple_of(p) {
        return Err(mm::MmError::Misaligned {
            call,
            addr,
            len,
            align: p,
        }
        .into());
    }
    if !mm::is_volatile(addr, len) {
        return Err(mm::MmError::NotVolatile { call, addr, len }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MapOptions, Mmap};

    fn map(pages: usize, shared: bool) -> Mmap {
        Mmap::anonymous(
            pages * mm::page_size(),
            MapOptions {
                shared,
                ..MapOptions::default()
            },
        )
        .unwrap()
    }

    fn read_u8(addr: usize) -> u8 {
        // SAFETY: test memory owned by a live Mmap; a volatile read of one byte.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    /// A thread touching a missing page waits until the handler copies it in; a second
    /// copy onto the same page reports it present; zero pages and wake work.
    fn fault_copy_exists(shared: bool) {
        let p = mm::page_size();
        let m = map(4, shared);
        let base = m.addr();
        let u = Uffd::new().unwrap();
        u.register_missing(base, 4 * p).unwrap();
        let toucher = std::thread::spawn(move || read_u8(base + p + 5));
        let mut faults = Vec::new();
        while faults.is_empty() {
            u.read_faults(&mut faults, 8, Duration::from_secs(5))
                .unwrap();
        }
        assert_eq!(faults[0].addr as usize & !(p - 1), base + p);
        assert!(!faults[0].write);
        let page = vec![7u8; p];
        assert_eq!(u.copy(base + p, &page).unwrap(), Placed::All);
        assert_eq!(toucher.join().unwrap(), 7);
        // Never overwritten: the range's first page is missing, its second present.
        let two = vec![9u8; 2 * p];
        assert_eq!(
            u.copy(base, &two).unwrap(),
            Placed::Exists { done: p as u64 }
        );
        assert_eq!(read_u8(base), 9);
        assert_eq!(read_u8(base + p), 7);
        assert_eq!(u.zero(base + 2 * p, 2 * p).unwrap(), Placed::All);
        assert_eq!(read_u8(base + 3 * p), 0);
        u.wake(base, 4 * p).unwrap();
        u.unregister(base, 4 * p).unwrap();
    }

    #[test]
    fn anonymous_fault_copy_exists() {
        fault_copy_exists(false);
    }

    #[test]
    fn shared_fault_copy_exists() {
        fault_copy_exists(true);
    }

    /// MINOR faults: a page the file holds but the mapping does not map makes the toucher
    /// wait; the handler writes the page through the file and maps it with CONTINUE, which
    /// wakes the toucher and shows the new contents. A hole in the file is a MISSING fault
    /// that the same two steps resolve; a mapped page is reported present.
    #[test]
    fn minor_faults_on_memfd_are_resolved_through_the_file() {
        use std::os::unix::fs::FileExt;
        if !Uffd::minor_faults_supported(false) {
            eprintln!("skipped: this kernel has no MINOR faults on shmem");
            return;
        }
        let p = mm::page_size();
        let f = std::fs::File::from(mm::memfd_create("ferry-test", Default::default()).unwrap());
        f.set_len(4 * p as u64).unwrap();
        let m = Mmap::from_fd(std::os::fd::AsFd::as_fd(&f), 0, 4 * p, true).unwrap();
        let base = m.addr();
        f.write_all_at(&vec![1u8; 2 * p], 0).unwrap();
        crate::mm::populate_write(base, 2 * p).unwrap();
        mm::drop_page_tables(base, 2 * p).unwrap();
        let u = Uffd::with_minor().unwrap();
        u.register_missing_minor(base, 4 * p).unwrap();
        let mut faults = Vec::new();
        for page in [1usize, 3] {
            let toucher = std::thread::spawn(move || read_u8(base + page * p + 9));
            faults.clear();
            while faults.is_empty() {
                u.read_faults(&mut faults, 8, Duration::from_secs(5))
                    .unwrap();
            }
            assert_eq!(faults[0].addr as usize & !(p - 1), base + page * p);
            f.write_all_at(&vec![5u8; p], (page * p) as u64).unwrap();
            assert_eq!(u.continue_pages(base + page * p, p).unwrap(), Placed::All);
            assert_eq!(toucher.join().unwrap(), 5, "page {page}");
        }
        assert_eq!(
            u.continue_pages(base, p).unwrap(),
            Placed::All,
            "page 0 is held by the file, so it maps"
        );
        assert_eq!(read_u8(base), 1);
        assert_eq!(
            u.continue_pages(base + p, p).unwrap(),
            Placed::Exists { done: 0 }
        );
        u.unregister(base, 4 * p).unwrap();
    }

    #[test]
    fn refuses_memory_that_is_not_volatile() {
        let u = Uffd::new().unwrap();
        let heap = vec![0u8; 3 * mm::page_size()];
        let p = mm::page_size();
        let addr = (heap.as_ptr() as usize + p - 1) & !(p - 1);
        assert!(matches!(
            u.copy(addr, &heap[..p]),
            Err(UffdError::Range(mm::MmError::NotVolatile { .. }))
        ));
        assert!(u.register_missing(addr, p).is_err());
    }

    #[test]
    fn parse_ignores_other_events() {
        let mut msg = [0u8; MSG_LEN];
        msg[0] = 0x13;
        assert_eq!(parse(&msg), None);
        msg[0] = EVENT_PAGEFAULT;
        msg[8] = 1;
        msg[16..24].copy_from_slice(&0x1234u64.to_le_bytes());
        msg[24..28].copy_from_slice(&42u32.to_le_bytes());
        assert_eq!(
            parse(&msg),
            Some(Fault {
                addr: 0x1234,
                write: true,
                tid: 42
            })
        );
    }
}
