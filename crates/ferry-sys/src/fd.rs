//! Descriptors a process inherits across `exec` (a live update hands guest memory and state
//! to the new binary this way).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`claim_inherited_at_startup`] ran.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Takes ownership of descriptors inherited across `exec`, once per process, while it is
/// still single-threaded.
///
/// Only a descriptor without `FD_CLOEXEC` is taken: every descriptor Rust's std, rustix and
/// this crate open is close-on-exec, and at startup nothing in this process can have cleared
/// the flag yet, so a descriptor without it came from the previous program. Claiming sets
/// the flag, so it does not leak into children. Refused after the first call, or once a
/// second thread exists (which could race the claim or own such a descriptor).
pub fn claim_inherited_at_startup(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "inherited descriptors were claimed already",
        ));
    }
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(
            "inherited descriptors must be claimed while the process has one thread",
        ));
    }
    let mut owned = Vec::with_capacity(fds.len());
    for &fd in fds {
        if owned.iter().any(|o: &OwnedFd| o.as_raw_fd() == fd) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd} named twice"),
            ));
        }
        owned.push(claim_inherited(fd)?);
    }
    Ok(owned)
}

/// Takes ownership of one inherited descriptor (see [`claim_inherited_at_startup`], the only
/// caller, which makes the conditions below hold).
fn claim_inherited(fd: RawFd) -> io::Result<OwnedFd> {
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
    // SAFETY: `fd` is open (F_GETFD succeeded). Without FD_CLOEXEC at startup, in a
    // single-threaded process that claims once (checked by the caller), it was not opened
    // by code in this process, so nothing else owns it; duplicates in one call are refused,
    // so ownership is taken exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    // The test harness is multi-threaded, so the public entry refuses here; the rules of
    // a single claim are checked on the inner function.
    #[test]
    fn a_threaded_process_cannot_claim() {
        let e = claim_inherited_at_startup(&[3]).unwrap_err();
        assert!(e.to_string().contains("one thread") || e.to_string().contains("already"));
    }

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
