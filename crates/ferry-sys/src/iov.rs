//! Vectored socket I/O straight from and into guest memory.
//!
//! Guest memory can change under us at any time (the guest runs while precopy reads it), so
//! Rust references to it would be unsound; these functions hand the kernel raw iovecs built
//! from `VolatileSlice`s, whose lifetimes guarantee the memory stays mapped.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Most iovecs passed to one syscall (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop_front = 0;
    for iov in iovs.iter_mut() {
        if n >= iov.iov_len {
            n -= iov.iov_len;
            drop_front += 1;
        } else {
            // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
            iov.iov_len -= n;
            break;
        }
    }
    iovs.drain(..drop_front);
}

/// Runs `op` (readv or writev) until every iovec is done: retries interrupted calls and
/// short transfers; a transfer of 0 bytes is `zero_kind`.
fn drive(
    iovs: &mut Vec<libc::iovec>,
    zero_msg: &'static str,
    zero_kind: io::ErrorKind,
    mut op: impl FnMut(*const libc::iovec, libc::c_int) -> isize,
) -> io::Result<()> {
    while !iovs.is_empty() {
        let count = iovs.len().min(IOV_MAX) as libc::c_int;
        let n = op(iovs.as_ptr(), count);
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(zero_kind, zero_msg));
        }
        advance(iovs, n as usize);
    }
    Ok(())
}

/// Writes `header` followed by every slice, in order, completely (retrying short writes).
pub fn write_all_volatile<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    header: &[u8],
    slices: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(slices.len() + 1);
    if !header.is_empty() {
        iovs.push(libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        });
    }
    // The guards keep any bitmap/guard bookkeeping alive for the duration of the syscalls.
    let guards: Vec<_> = slices.iter().map(|s| (s.ptr_guard(), s.len())).collect();
    for (guard, len) in &guards {
        if *len > 0 {
            iovs.push(libc::iovec {
                iov_base: guard.as_ptr().cast_mut().cast(),
                iov_len: *len,
            });
        }
    }
    drive(
        &mut iovs,
        "writev wrote 0 bytes",
        io::ErrorKind::WriteZero,
        |iov, count| {
            // SAFETY: every iovec points to memory that stays valid for this call: `header` is
            // borrowed, and each guest slice is a VolatileSlice borrowed for the call whose
            // mapping outlives it. writev only reads from the buffers.
            unsafe { libc::writev(fd.as_raw_fd(), iov, count) }
        },
    )
}

/// Fills every slice, in order, from `fd` (retrying short reads). Reaching end of stream
/// before all slices are full is `UnexpectedEof`.
pub fn read_exact_volatile<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    slices: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    let guards: Vec<_> = slices
        .iter()
        .map(|s| (s.ptr_guard_mut(), s.len()))
        .collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(g, len)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: *len,
        })
        .collect();
    drive(
        &mut iovs,
        "stream ended in the middle of page data",
        io::ErrorKind::UnexpectedEof,
        |iov, count| {
            // SAFETY: each iovec covers a VolatileSlice of mapped guest memory borrowed for
            // the duration of this call; the kernel writes at most iov_len bytes into each.
            unsafe { libc::readv(fd.as_raw_fd(), iov, count) }
        },
    )
}

/// Whether every byte of `slice` is zero. Reads with volatile loads (the guest may be
/// writing concurrently; a torn answer is fine because such a page is dirty again).
pub fn is_zero<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> bool {
    let guard = slice.ptr_guard();
    let ptr = guard.as_ptr();
    let len = slice.len();
    let words = len / 8;
    let base = ptr as usize;
    if !base.is_multiple_of(8) {
        return (0..len).all(|i| {
            // SAFETY: i < len, inside the slice's mapped memory.
            unsafe { ptr.add(i).read_volatile() == 0 }
        });
    }
    let wptr = ptr.cast::<u64>();
    let mut i = 0;
    // Unrolled by 8 so the common non-zero page exits after the first group.
    while i + 8 <= words {
        // SAFETY: i + 8 <= words, so all eight u64 loads are inside the aligned slice.
        let acc = unsafe {
            wptr.add(i).read_volatile()
                | wptr.add(i + 1).read_volatile()
                | wptr.add(i + 2).read_volatile()
                | wptr.add(i + 3).read_volatile()
                | wptr.add(i + 4).read_volatile()
                | wptr.add(i + 5).read_volatile()
                | wptr.add(i + 6).read_volatile()
                | wptr.add(i + 7).read_volatile()
        };
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    while i < words {
        // SAFETY: i < words, inside the aligned slice.
        if unsafe { wptr.add(i).read_volatile() } != 0 {
            return false;
        }
        i += 1;
    }
    (words * 8..len).all(|j| {
        // SAFETY: j < len, inside the slice.
        unsafe { ptr.add(j).read_volatile() == 0 }
    })
}

/// Bytes in a socket's send queue: for TCP, sent but not yet acknowledged plus not yet sent
/// (`SIOCOUTQ`); for a unix stream, not yet read by the peer. How fast it drains while it is
/// not empty is the rate of the link (or of the peer), whatever the buffer sizes.
pub fn send_queue_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through the pointer, which points to a
    // live local of that type; the descriptor is borrowed, so it stays open meanwhile.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn round_trip_through_socket() {
        let src: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        let dst: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        for p in 0..64u64 {
            src.write_obj(p * 7 + 1, GuestAddress(p * 4096 + 8))
                .unwrap();
        }
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let slices: Vec<_> = (0..64u64)
                .step_by(2)
                .map(|p| src.get_slice(GuestAddress(p * 4096), 4096).unwrap())
                .collect();
            write_all_volatile(a.as_fd(), b"HDR!", &slices).unwrap();
        });
        let mut hdr = [0u8; 4];
        std::io::Read::read_exact(&mut &b, &mut hdr).unwrap();
        assert_eq!(&hdr, b"HDR!");
        let dslices: Vec<_> = (0..64u64)
            .step_by(2)
            .map(|p| dst.get_slice(GuestAddress(p * 4096), 4096).unwrap())
            .collect();
        read_exact_volatile(b.as_fd(), &dslices).unwrap();
        writer.join().unwrap();
        for p in 0..64u64 {
            let v: u64 = dst.read_obj(GuestAddress(p * 4096 + 8)).unwrap();
            assert_eq!(v, if p % 2 == 0 { p * 7 + 1 } else { 0 });
        }
        assert!(!is_zero(&dst.get_slice(GuestAddress(0), 4096).unwrap()));
        assert!(is_zero(&dst.get_slice(GuestAddress(4096), 4096).unwrap()));
        assert!(is_zero(
            &dst.get_slice(GuestAddress(4096 + 8), 100).unwrap()
        ));
    }

    #[test]
    fn eof_in_page_data_is_an_error() {
        let dst: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &a, &[1u8; 100]).unwrap();
        drop(a);
        let s = [dst.get_slice(GuestAddress(0), 4096).unwrap()];
        let err = read_exact_volatile(b.as_fd(), &s).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_send_queue_counts_what_the_peer_has_not_read() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(send_queue_bytes(a.as_fd()).unwrap(), 0);
        a.write_all(&[7u8; 1000]).unwrap();
        assert!(send_queue_bytes(a.as_fd()).unwrap() >= 1000);
        drop(b);
    }
}
