//! The destination's device loaders: each device (vCPUs included) takes its stream on its
//! own thread (or, when the source asked for serial loading, all on one), so devices whose
//! chunks arrive side by side also load side by side and the downtime pays for the slowest.
//! A chunk is checked against its device's sequence before the device sees it; the device
//! checks its own bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_proto::{DEVICE_END, DEVICE_INITIAL_END};

use super::data::DataEvent;
use super::Event;
use crate::device::{DeviceState, MigrationDevice};
use crate::error::{Channel, MigrateError};

/// Chunks queued per loader before the channel that brings them waits.
const QUEUE: usize = 64;

/// One chunk of a device's stream, as it arrived.
struct Chunk {
    device: u16,
    seq: u32,
    flags: u8,
    data: Vec<u8>,
}

/// Where the receivers hand device chunks: one queue per device, or one for all.
pub(crate) struct DeviceHub {
    queues: Vec<Sender<Chunk>>,
}

impl DeviceHub {
    /// Queues a chunk for its device's loader (waits while the loader is behind).
    pub(crate) fn deliver(
        &self,
        channel: Channel,
        device: u16,
        seq: u32,
        flags: u8,
        data: Vec<u8>,
    ) -> Result<(), MigrateError> {
        let q = self
            .queues
            .get(usize::from(device))
            .ok_or(MigrateError::UnknownDevice {
                channel,
                index: device,
                count: self.queues.len(),
            })?;
        let chunk = Chunk {
            device,
            seq,
            flags,
            data,
        };
        // A loader gone has failed, and reported why.
        let _ = q.send(chunk);
        Ok(())
    }
}

/// The devices of one attempt and their loader threads.
pub(crate) struct DeviceLoad {
    pub(crate) hub: Arc<DeviceHub>,
    threads: Vec<JoinHandle<()>>,
    /// Cleared when the attempt ends: a loader still running leaves the devices alone.
    live: Arc<AtomicBool>,
    pub(crate) names: Vec<String>,
}

/// A device's place in its loader.
struct Loading {
    index: u16,
    dev: Arc<dyn MigrationDevice>,
    next: u32,
    ended: bool,
}

impl DeviceLoad {
    /// Starts the loaders for `devices` (already in RESUMING) of attempt `attempt`.
    pub(crate) fn start(
        devices: Vec<Arc<dyn MigrationDevice>>,
        parallel: bool,
        attempt: u64,
        events: &Sender<Event>,
    ) -> Result<DeviceLoad, MigrateError> {
        let live = Arc::new(AtomicBool::new(true));
        let names = devices.iter().map(|d| d.name().to_owned()).collect();
        let list: Vec<Loading> = devices
            .into_iter()
            .enumerate()
            .map(|(i, dev)| Loading {
                index: u16::try_from(i).unwrap_or(u16::MAX),
                dev,
                next: 0,
                ended: false,
            })
            .collect();
        let n = list.len();
        let groups: Vec<Vec<Loading>> = if parallel {
            list.into_iter().map(|l| vec![l]).collect()
        } else {
            vec![list]
        };
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(groups.len());
        for (g, group) in groups.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE);
            queues.extend(std::iter::repeat_n(tx, group.len()));
            let events = events.clone();
            let live = live.clone();
            let report = move |ev| events.send(Event::Data { attempt, ev }).is_ok();
            let join = std::thread::Builder::new()
                .name(format!("mig-load{g}"))
                .spawn(move || load(group, &rx, &live, &report))
                .map_err(MigrateError::io("starting a device loader thread"))?;
            threads.push(join);
        }
        Ok(DeviceLoad {
            hub: Arc::new(DeviceHub { queues }),
            threads,
            live,
            names,
        })
    }

    /// How many devices load.
    pub(crate) fn count(&self) -> usize {
        self.names.len()
    }

    /// Ends the loaders. Every data receiver must have stopped (they hold the hub).
    pub(crate) fn stop(mut self) {
        self.live.store(false, Ordering::SeqCst);
        // Dropping the last hub closes the queues: the loaders' loops end.
        self.hub = Arc::new(DeviceHub { queues: Vec::new() });
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceLoad {
    fn drop(&mut self) {
        self.live.store(false, Ordering::SeqCst);
    }
}

/// A loader thread: takes its devices' chunks in order until the attempt ends or a
/// device fails (reported as the attempt's failure).
fn load(
    mut group: Vec<Loading>,
    rx: &Receiver<Chunk>,
    live: &AtomicBool,
    report: &impl Fn(DataEvent) -> bool,
) {
    for chunk in rx.iter() {
        if !live.load(Ordering::SeqCst) {
            return;
        }
        let Some(l) = group.iter_mut().find(|l| l.index == chunk.device) else {
            continue;
        };
        match take(l, chunk, report) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                report(DataEvent::Failed(e));
                return;
            }
        }
    }
}

/// Gives one chunk to its device; returns whether the event loop still listens.
fn take(
    l: &mut Loading,
    c: Chunk,
    report: &impl Fn(DataEvent) -> bool,
) -> Result<bool, MigrateError> {
    let name = || l.dev.name().to_owned();
    if l.ended {
        return Err(MigrateError::DeviceStream {
            device: name(),
            problem: format!("went on after its end (chunk {})", c.seq),
        });
    }
    if c.seq != l.next {
        return Err(MigrateError::DeviceStream {
            device: name(),
            problem: format!(
                "skipped from chunk {} to {} (a chunk was lost or reordered)",
                l.next, c.seq
            ),
        });
    }
    l.next = l.next.wrapping_add(1);
    if !c.data.is_empty() {
        l.dev
            .write(&c.data)
            .map_err(|source| MigrateError::Device {
                device: name(),
                op: "loading its stream",
                source,
            })?;
    }
    if c.flags & DEVICE_INITIAL_END != 0 && !report(DataEvent::DeviceInitial { device: l.index }) {
        return Ok(false);
    }
    if c.flags & DEVICE_END == 0 {
        return Ok(true);
    }
    l.ended = true;
    let began = Instant::now();
    l.dev
        .set_state(DeviceState::Stop)
        .map_err(|source| MigrateError::Device {
            device: name(),
            op: "loading its final state",
            source,
        })?;
    Ok(report(DataEvent::DeviceLoaded {
        device: l.index,
        began,
        took: began.elapsed(),
    }))
}

/// What the event loop knows of the devices' loading.
#[derive(Debug)]
pub(crate) struct DeviceProgress {
    initial: Vec<bool>,
    loaded: Vec<bool>,
    /// Devices whose initial bytes are not all loaded yet.
    pub(crate) initial_left: usize,
    /// Devices not loaded yet.
    pub(crate) loaded_left: usize,
    /// `DevicesReady` went out.
    pub(crate) ready_sent: bool,
    /// The first device load began, and the last one ended.
    span: Option<(Instant, Instant)>,
}

impl DeviceProgress {
    pub(crate) fn new(count: usize) -> DeviceProgress {
        DeviceProgress {
            initial: vec![false; count],
            loaded: vec![false; count],
            initial_left: count,
            loaded_left: count,
            ready_sent: false,
            span: None,
        }
    }

    /// A device's initial bytes are loaded.
    pub(crate) fn initial(&mut self, device: u16) {
        if let Some(b) = self.initial.get_mut(usize::from(device)).filter(|b| !**b) {
            *b = true;
            self.initial_left -= 1;
        }
    }

    /// A device's whole stream is loaded: its load began at `began` and took `took`.
    pub(crate) fn loaded(&mut self, device: u16, began: Instant, took: Duration) {
        if let Some(b) = self.loaded.get_mut(usize::from(device)).filter(|b| !**b) {
            *b = true;
            self.loaded_left -= 1;
            let end = began + took;
            self.span = Some(match self.span {
                None => (began, end),
                Some((a, b)) => (a.min(began), b.max(end)),
            });
        }
    }

    /// Wall time from the first device load's start to the last one's end.
    pub(crate) fn load_span(&self) -> Duration {
        self.span.map(|(a, b)| b - a).unwrap_or_default()
    }
}
