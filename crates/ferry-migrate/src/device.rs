//! What the engine needs from a device (and from each vCPU): the shape of VFIO migration
//! v2. A device's state is an ordered, opaque byte stream that the source reads and the
//! destination writes, in these states:
//!
//! ```text
//! source:       RUNNING -> PRE_COPY -> STOP_COPY   (stays there once the destination runs
//!                                                   the guest; -> RUNNING whenever the guest
//!                                                   comes back: abort, refused Go, forced resume)
//! destination:  RESUMING -> STOP (the stream is loaded) -> RUNNING (just before the guest)
//! ```
//!
//! In PRE_COPY the guest runs and the device streams what it can ahead of time: first its
//! "initial bytes", which the destination must have loaded before the source may pause the
//! guest (switchover-ack), then whatever it dirties. In STOP_COPY (guest paused) it streams
//! the rest and ends. The engine moves every device's stream over the data channels side
//! by side, and loads each on its own thread (small devices, like vCPUs, share as many
//! threads as there are CPUs: [`thread_groups`]).

use std::time::Duration;

use crate::vm::VmError;

/// A device's migration state, after VFIO's `vfio_device_mig_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Working normally; not migrating.
    Running,
    /// Source, guest running: the device streams its initial bytes, then what it dirties.
    PreCopy,
    /// Source, guest paused: the device is frozen and streams the rest of its state.
    StopCopy,
    /// Destination: the device takes the stream.
    Resuming,
    /// Frozen. On a destination, entering it from `Resuming` loads what was written (the
    /// device's firmware cost); the engine measures it as the device's load time.
    Stop,
}

impl DeviceState {
    /// Its name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Running => "RUNNING",
            DeviceState::PreCopy => "PRE_COPY",
            DeviceState::StopCopy => "STOP_COPY",
            DeviceState::Resuming => "RESUMING",
            DeviceState::Stop => "STOP",
        }
    }
}

/// What a device in PRE_COPY still has to send (VFIO's `VFIO_MIG_GET_PRECOPY_INFO`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    /// Initial bytes not read yet: until they reach 0 the switchover must wait.
    pub initial_bytes: u64,
    /// Bytes the device dirtied since they were read.
    pub dirty_bytes: u64,
}

/// A device (or a vCPU) as the engine migrates it. Both sides use the same interface: a
/// source reads, a destination writes.
pub trait MigrationDevice: Send + Sync {
    /// Its name, unique in the VM ("vcpu3", "testdev0"); errors name the device by it.
    fn name(&self) -> &str;
    /// What a destination needs to create the same device when it was started without it
    /// (opaque to the engine; the destination's VMM reads it).
    fn config(&self) -> Vec<u8>;
    /// Moves the device to `to`. The engine only asks for the transitions drawn in the
    /// module documentation.
    fn set_state(&self, to: DeviceState) -> Result<(), VmError>;
    /// Source, in PRE_COPY or STOP_COPY: appends at most `max` next bytes of the stream to
    /// `out` and returns how many. 0 in PRE_COPY means nothing is pending now; 0 in
    /// STOP_COPY means the stream has ended.
    fn read(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, VmError>;
    /// Source, in PRE_COPY: what is still pending.
    fn precopy_info(&self) -> PrecopyInfo;
    /// Source: the bytes STOP_COPY would send if entered now.
    fn stop_copy_size(&self) -> u64;
    /// What entering STOP from RESUMING costs on a destination (its load), as the device
    /// reports it; the downtime estimate counts it.
    fn load_cost(&self) -> Duration;
    /// Destination, in RESUMING: the next bytes of the stream, in order. Fails on a
    /// stream the device cannot take (corrupt, truncated, of another device).
    fn write(&self, data: &[u8]) -> Result<(), VmError>;
    /// Whether saving and loading it is a little CPU work (a vCPU's registers): such
    /// devices share as many threads as there are CPUs. Any other device (a stream to
    /// wait for, a load that waits on firmware) gets a thread of its own on each side.
    fn small(&self) -> bool {
        false
    }
}

/// Which devices share a save or load thread, as lists of indexes into `small` (each
/// device's [`MigrationDevice::small`]). Serial: one thread for all, in order. Parallel:
/// every device alone, except the small ones (vCPUs, whose save and load are CPU work),
/// dealt over at most `cpus` threads (more threads than CPUs only add switching).
pub fn thread_groups(small: &[bool], parallel: bool, cpus: usize) -> Vec<Vec<usize>> {
    if !parallel {
        return vec![(0..small.len()).collect()];
    }
    let (cheap, own): (Vec<usize>, Vec<usize>) =
        (0..small.len()).partition(|&i| small.get(i).copied().unwrap_or(false));
    let pool = cpus.clamp(1, cheap.len().max(1));
    let mut shared: Vec<Vec<usize>> = vec![Vec::new(); pool];
    for (k, i) in cheap.into_iter().enumerate() {
        if let Some(g) = shared.get_mut(k % pool) {
            g.push(i);
        }
    }
    own.into_iter()
        .map(|i| vec![i])
        .chain(shared.into_iter().filter(|g| !g.is_empty()))
        .collect()
}

/// `items` dealt into the groups of `plan` (indexes into `items`, each used once).
pub(crate) fn deal<T>(items: Vec<T>, plan: Vec<Vec<usize>>) -> Vec<Vec<T>> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    plan.into_iter()
        .map(|g| {
            g.into_iter()
                .filter_map(|i| slots.get_mut(i)?.take())
                .collect()
        })
        .collect()
}

/// What loading costs when `groups` load side by side: the slowest thread, each thread
/// paying for its devices one after another.
pub fn load_estimate(groups: &[Vec<usize>], costs: &[Duration]) -> Duration {
    groups
        .iter()
        .map(|g| g.iter().filter_map(|&i| costs.get(i)).sum::<Duration>())
        .max()
        .unwrap_or_default()
}

/// The CPUs this process may use (the pool size for small devices).
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_their_own_thread_and_small_ones_share_one_per_cpu() {
        // Four vCPUs, a device with a stream, two more vCPUs, the platform.
        let small = [true, true, true, true, false, true, true, true];
        let g = thread_groups(&small, true, 2);
        assert_eq!(g, vec![vec![4], vec![0, 2, 5, 7], vec![1, 3, 6]]);
        // Serial: everything on one thread, in order.
        assert_eq!(
            thread_groups(&small, false, 2),
            vec![(0..8).collect::<Vec<_>>()]
        );
        // Fewer small devices than CPUs: no empty thread.
        assert_eq!(
            thread_groups(&[true, false], true, 8),
            vec![vec![1], vec![0]]
        );
        assert!(thread_groups(&[], true, 4).is_empty());
        assert_eq!(
            thread_groups(&[false, false], true, 1),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn the_load_estimate_is_the_slowest_thread() {
        let ms = Duration::from_millis;
        let costs = [ms(1), ms(1), ms(1), ms(20)];
        let small = [true, true, true, false];
        // vCPUs 0 and 2 on one thread (2 ms), 1 on another, the device alone (20 ms).
        assert_eq!(
            load_estimate(&thread_groups(&small, true, 2), &costs),
            ms(20)
        );
        let costs = [ms(15), ms(1), ms(15), ms(20)];
        assert_eq!(
            load_estimate(&thread_groups(&small, true, 2), &costs),
            ms(30)
        );
        assert_eq!(
            load_estimate(&thread_groups(&small, false, 2), &costs),
            ms(51)
        );
    }
}
