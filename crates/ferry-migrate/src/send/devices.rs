//! The source's device streams: every device is read on its own thread (small ones, like
//! vCPUs, share as many threads as there are CPUs; serial, all share one), and its chunks
//! go out on one data channel, tagged with the device and a sequence number, between page
//! batches. In PRE_COPY a device sends its
//! initial bytes, then what it dirties; at the switchover all devices enter STOP_COPY at
//! once and stream the rest side by side, so the downtime pays for the slowest, not the
//! sum.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use ferry_proto::{DeviceInfo, DEVICE_END, DEVICE_INITIAL_END, MAX_DEVICE_CHUNK};

use crate::device::{DeviceState, MigrationDevice};
use crate::error::MigrateError;

/// Bytes a device read asks for at a time.
const CHUNK: usize = 256 << 10;
/// How often a PRE_COPY device with nothing pending is asked again.
const PRECOPY_POLL: Duration = Duration::from_millis(2);
/// The longest a device that had nothing pending waits before it is asked again.
const PRECOPY_POLL_MAX: Duration = Duration::from_millis(100);
/// How long a device thread waits on a full channel queue before it looks at the stage.
const QUEUE_WAIT: Duration = Duration::from_millis(10);
/// Device bytes handed to the event loop for the main channel and not written yet.
const MAIN_WINDOW: usize = 4 << 20;

/// One chunk of one device's stream, on its way to a channel.
#[derive(Debug)]
pub(crate) struct DeviceChunk {
    pub(crate) device: u16,
    pub(crate) seq: u32,
    pub(crate) flags: u8,
    pub(crate) data: Vec<u8>,
}

/// What device threads tell the event loop.
pub(crate) enum DeviceEvent {
    /// A chunk for the main channel (a local hand-over has no data channel).
    Chunk(DeviceChunk),
    /// The device's initial bytes have all been handed to its channel.
    InitialSent,
    /// The device's stop-copy stream has been handed to its channel, `save` after the
    /// group's switchover began (in a shared thread, the devices before it included).
    Ended { device: u16, save: Duration },
    /// A device failed.
    Failed(MigrateError),
}

/// Where a device's chunks go.
#[derive(Clone)]
pub(crate) enum Route {
    /// A data channel's sender (its queue).
    Channel(Sender<DeviceChunk>),
    /// The event loop, which writes them on the main channel.
    Main,
}

/// Bytes in flight to the event loop (the main route): a device thread waits while the
/// loop has [`MAIN_WINDOW`] bytes to write, so a large device cannot fill the loop's queue
/// (and hold up its ticks and commands).
#[derive(Default)]
pub(crate) struct Window {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Window {
    fn used(&self) -> MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room for `n` bytes (a chunk larger than the window goes alone) until
    /// `give_up` says so; returns whether there was room.
    fn take(&self, n: usize, give_up: impl Fn() -> bool) -> bool {
        let mut used = self.used();
        while *used > 0 && *used + n > MAIN_WINDOW {
            if give_up() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, QUEUE_WAIT)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *used += n;
        true
    }

    /// The event loop wrote `n` bytes.
    pub(crate) fn give(&self, n: usize) {
        let mut used = self.used();
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    PreCopy,
    StopCopy,
    /// The hand-over committed: the devices stay stopped.
    Done,
    /// The migration failed: the devices run again.
    Abort,
}

struct Shared {
    stage: Mutex<Stage>,
    changed: Condvar,
}

impl Shared {
    fn stage(&self) -> MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, s: Stage) {
        *self.stage() = s;
        self.changed.notify_all();
    }

    /// The migration is over (committed or aborted): streams stop where they are.
    fn ending(&self) -> bool {
        matches!(*self.stage(), Stage::Abort | Stage::Done)
    }

    /// Waits up to `d` for the stage to leave `from`; returns the stage.
    fn wait_change(&self, from: Stage, d: Duration) -> Stage {
        let g = self.stage();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, d, |s| *s == from)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// A device with its place in the Setup's list and its route.
struct Dev {
    index: u16,
    dev: Arc<dyn MigrationDevice>,
    route: Route,
    seq: u32,
    initial_sent: bool,
}

/// The device sender threads. Dropped without [`DeviceSenders::abort`], the devices
/// stay as they are (stopped after a switchover): running them again is a decision only an
/// abort makes.
pub(crate) struct DeviceSenders {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    devices: Vec<Arc<dyn MigrationDevice>>,
    parallel: bool,
    /// The main route's flow control.
    pub(crate) window: Arc<Window>,
}

/// The Setup's description of `devices`.
pub(crate) fn describe(devices: &[Arc<dyn MigrationDevice>]) -> Vec<DeviceInfo> {
    devices
        .iter()
        .map(|d| DeviceInfo {
            name: d.name().to_owned(),
            config: d.config(),
        })
        .collect()
}

impl DeviceSenders {
    /// Moves every device to PRE_COPY and starts streaming. Device `i` goes on
    /// `routes[i % routes.len()]`; `report` reaches the event loop.
    pub(crate) fn start(
        devices: Vec<Arc<dyn MigrationDevice>>,
        routes: &[Route],
        parallel: bool,
        report: impl Fn(DeviceEvent) -> bool + Clone + Send + 'static,
    ) -> Result<DeviceSenders, MigrateError> {
        let shared = Arc::new(Shared {
            stage: Mutex::new(Stage::PreCopy),
            changed: Condvar::new(),
        });
        let mut out = DeviceSenders {
            shared: shared.clone(),
            threads: Vec::new(),
            devices: devices.clone(),
            parallel,
            window: Arc::new(Window::default()),
        };
        // Whatever fails from here, every device runs again (abort).
        match out.spawn(devices, routes, report) {
            Ok(()) => Ok(out),
            Err(e) => {
                out.abort();
                Err(e)
            }
        }
    }

    fn spawn(
        &mut self,
        devices: Vec<Arc<dyn MigrationDevice>>,
        routes: &[Route],
        report: impl Fn(DeviceEvent) -> bool + Clone + Send + 'static,
    ) -> Result<(), MigrateError> {
        let mut list = Vec::with_capacity(devices.len());
        for (i, dev) in devices.into_iter().enumerate() {
            let route = routes
                .get(i % routes.len().max(1))
                .cloned()
                .unwrap_or(Route::Main);
            dev.set_state(DeviceState::PreCopy)
                .map_err(device_err(&*dev, "entering PRE_COPY"))?;
            list.push(Dev {
                index: u16::try_from(i).unwrap_or(u16::MAX),
                dev,
                route,
                seq: 0,
                initial_sent: false,
            });
        }
        let groups = crate::device::deal(list, self.groups());
        for (n, group) in groups.into_iter().enumerate() {
            let shared = self.shared.clone();
            let report = report.clone();
            let window = self.window.clone();
            // Small devices save in microseconds, inside the downtime.
            let latency_bound = group.iter().all(|d| d.dev.small());
            let join = crate::latency::spawn_if(latency_bound, format!("mig-dev{n}"), move || {
                run(group, &shared, &window, &report)
            })
            .map_err(MigrateError::io("starting a device thread"))?;
            self.threads.push(join);
        }
        Ok(())
    }

    /// How many devices stream.
    pub(crate) fn count(&self) -> usize {
        self.devices.len()
    }

    /// The guest is paused: every device enters STOP_COPY and streams the rest.
    pub(crate) fn stop_copy(&self) {
        self.shared.set(Stage::StopCopy);
    }

    /// Bytes the devices would still send at a switchover now.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.stop_copy_size())
            .fold(0u64, u64::saturating_add)
    }

    /// Which devices share a thread (the destination groups them the same way).
    fn groups(&self) -> Vec<Vec<usize>> {
        let small: Vec<bool> = self.devices.iter().map(|d| d.small()).collect();
        crate::device::thread_groups(&small, self.parallel, crate::device::cpus())
    }

    /// What loading the devices costs a destination: its slowest loader thread.
    pub(crate) fn load_cost(&self) -> Duration {
        let costs: Vec<Duration> = self.devices.iter().map(|d| d.load_cost()).collect();
        crate::device::load_estimate(&self.groups(), &costs)
    }

    /// The destination runs the guest: the threads end and the devices stay stopped.
    pub(crate) fn finish(mut self) {
        self.shared.set(Stage::Done);
        self.join();
    }

    /// The guest stays here: the threads stop (a stream in flight is dropped), then every
    /// device runs again, before the guest does.
    pub(crate) fn abort(mut self) {
        self.shared.set(Stage::Abort);
        self.join();
        for d in &self.devices {
            if let Err(e) = d.set_state(DeviceState::Running) {
                tracing::error!("device '{}': could not run again: {e}", d.name());
            }
        }
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceSenders {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.set(Stage::Done);
            self.join();
        }
    }
}

fn device_err<'a>(
    dev: &'a dyn MigrationDevice,
    op: &'static str,
) -> impl FnOnce(crate::vm::VmError) -> MigrateError + 'a {
    move |source| MigrateError::Device {
        device: dev.name().to_owned(),
        op,
        source,
    }
}

/// A device thread: PRE_COPY until the switchover, then STOP_COPY, then it waits for the
/// outcome (the owner of [`DeviceSenders`] runs the devices again if it aborts). A failure
/// is reported and fails the migration.
fn run(
    mut group: Vec<Dev>,
    shared: &Shared,
    window: &Window,
    report: &impl Fn(DeviceEvent) -> bool,
) {
    let out = Out {
        shared,
        window,
        report,
    };
    let r = precopy(&mut group, &out).and_then(|stage| match stage {
        Stage::StopCopy => stop_copy(&mut group, &out),
        s => Ok(s),
    });
    if let Err(e) = r {
        // Once the migration ends, a failure is no news.
        if !shared.ending() {
            report(DeviceEvent::Failed(e));
        }
        let mut s = *shared.stage();
        while !matches!(s, Stage::Abort | Stage::Done) {
            s = shared.wait_change(s, Duration::from_millis(100));
        }
    }
}

/// Where a device thread's chunks and reports go.
struct Out<'a, R> {
    shared: &'a Shared,
    window: &'a Window,
    report: &'a R,
}

/// Streams what the devices have while the guest runs; returns the stage that ended it.
fn precopy<R: Fn(DeviceEvent) -> bool>(
    group: &mut [Dev],
    out: &Out<'_, R>,
) -> Result<Stage, MigrateError> {
    let shared = out.shared;
    let mut buf = Vec::with_capacity(CHUNK);
    // A device with nothing to send is asked less and less often (a big VM has many idle
    // vCPUs); a stage change wakes the thread at once anyway.
    let mut poll = PRECOPY_POLL;
    loop {
        let mut sent = false;
        for d in group.iter_mut() {
            sent |= precopy_one(d, &mut buf, out)?;
        }
        let stage = *shared.stage();
        if stage != Stage::PreCopy {
            return Ok(stage);
        }
        if sent {
            poll = PRECOPY_POLL;
            continue;
        }
        if shared.wait_change(Stage::PreCopy, poll) != Stage::PreCopy {
            return Ok(*shared.stage());
        }
        poll = (poll * 2).min(PRECOPY_POLL_MAX);
    }
}

/// One read of a PRE_COPY device; the chunk that ends its initial bytes (or an empty one,
/// for a device without any) carries [`DEVICE_INITIAL_END`]. Returns whether it sent.
fn precopy_one<R: Fn(DeviceEvent) -> bool>(
    d: &mut Dev,
    buf: &mut Vec<u8>,
    out: &Out<'_, R>,
) -> Result<bool, MigrateError> {
    if out.shared.ending() {
        return Ok(false);
    }
    buf.clear();
    let n = d
        .dev
        .read(buf, CHUNK)
        .map_err(device_err(&*d.dev, "reading its PRE_COPY stream"))?;
    let initial_end = !d.initial_sent && d.dev.precopy_info().initial_bytes == 0;
    if n == 0 && !initial_end {
        return Ok(false);
    }
    let flags = if initial_end { DEVICE_INITIAL_END } else { 0 };
    d.initial_sent |= initial_end;
    send_chunks(d, buf, flags, out)?;
    if initial_end {
        (out.report)(DeviceEvent::InitialSent);
    }
    Ok(n > 0)
}

/// Enters STOP_COPY on every device of the group and streams each to its end, one after
/// another (a group is one device, small devices sharing a thread, or all when serial).
fn stop_copy<R: Fn(DeviceEvent) -> bool>(
    group: &mut [Dev],
    out: &Out<'_, R>,
) -> Result<Stage, MigrateError> {
    let shared = out.shared;
    let t = Instant::now();
    for d in group.iter() {
        d.dev
            .set_state(DeviceState::StopCopy)
            .map_err(device_err(&*d.dev, "entering STOP_COPY"))?;
    }
    let mut buf = Vec::with_capacity(CHUNK);
    for d in group.iter_mut() {
        loop {
            if shared.ending() {
                return Err(gone(d.dev.name()));
            }
            buf.clear();
            let n = d
                .dev
                .read(&mut buf, CHUNK)
                .map_err(device_err(&*d.dev, "reading its STOP_COPY stream"))?;
            if n == 0 {
                break;
            }
            send_chunks(d, &buf, 0, out)?;
        }
        send_chunks(d, &[], DEVICE_END, out)?;
        (out.report)(DeviceEvent::Ended {
            device: d.index,
            save: t.elapsed(),
        });
    }
    let mut s = *shared.stage();
    while s == Stage::StopCopy {
        s = shared.wait_change(s, Duration::from_millis(100));
    }
    Ok(s)
}

/// Sends `data` as one or more chunks (a device may return more than a frame holds); the
/// flags go on the last.
fn send_chunks<R: Fn(DeviceEvent) -> bool>(
    d: &mut Dev,
    data: &[u8],
    flags: u8,
    out: &Out<'_, R>,
) -> Result<(), MigrateError> {
    let max = MAX_DEVICE_CHUNK as usize;
    let mut parts: Vec<&[u8]> = data.chunks(max).collect();
    if parts.is_empty() {
        parts.push(&[]);
    }
    let last = parts.len() - 1;
    for (i, part) in parts.into_iter().enumerate() {
        let chunk = DeviceChunk {
            device: d.index,
            seq: d.seq,
            flags: if i == last { flags } else { 0 },
            data: part.to_vec(),
        };
        d.seq = d.seq.wrapping_add(1);
        deliver(&d.route, chunk, out, d.dev.name())?;
    }
    Ok(())
}

/// A stream cut short because the migration ended.
fn gone(name: &str) -> MigrateError {
    MigrateError::DeviceStream {
        device: name.to_owned(),
        problem: "has no channel any more (the migration is ending)".into(),
    }
}

/// Queues a chunk on its route; gives up when the migration ends or the channel is gone.
fn deliver<R: Fn(DeviceEvent) -> bool>(
    route: &Route,
    mut chunk: DeviceChunk,
    out: &Out<'_, R>,
    name: &str,
) -> Result<(), MigrateError> {
    let ending = || out.shared.ending();
    if ending() {
        return Err(gone(name));
    }
    match route {
        Route::Main => {
            if !out.window.take(chunk.data.len(), ending) {
                return Err(gone(name));
            }
            (out.report)(DeviceEvent::Chunk(chunk))
                .then_some(())
                .ok_or_else(|| gone(name))
        }
        Route::Channel(tx) => loop {
            match tx.send_timeout(chunk, QUEUE_WAIT) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => return Err(gone(name)),
                Err(SendTimeoutError::Timeout(c)) => {
                    if ending() {
                        return Err(gone(name));
                    }
                    chunk = c;
                }
            }
        },
    }
}
