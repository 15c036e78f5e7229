//! Descriptors a process inherits across `exec` (a live update hands guest memory and state
//! to the new binary this way).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of descriptor `fd`, inherited across `exec`.
///
/// Only a descriptor without `FD_CLOEXEC` is taken: every descriptor this process opens
/// itself (Rust's std, rustix, this crate) is opened close-on-exec, so one without the flag
/// can only have come from the previous program. Claiming sets the flag, so the same number
/// cannot be claimed twice, and the descriptor does not leak into children.
pub fn claim_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is standard input, output or error"),
        ));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} was not inherited (or was claimed already)"),
        ));
    }
    // SAFETY: as above, F_SETFD only changes this descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and, having been without FD_CLOEXEC, was not
    // opened by code in this process, so nothing else owns it; setting the flag above
    // under this claim makes any second claim fail, so ownership is taken exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn only_inherited_descriptors_are_claimed_and_only_once() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        // Opened here, so close-on-exec: refused.
        assert!(claim_inherited(f.as_raw_fd()).is_err());
        rustix::io::fcntl_setfd(&f, rustix::io::FdFlags::empty()).unwrap();
        let n = f.into_raw_fd();
        let owned = claim_inherited(n).unwrap();
        assert_eq!(owned.as_raw_fd(), n);
        assert!(claim_inherited(n).is_err(), "claimed twice");
        assert!(claim_inherited(1).is_err());
        drop(owned);
        assert!(claim_inherited(n).is_err(), "closed");
    }
}
