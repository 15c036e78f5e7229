//! The destination's device loaders: each device takes its stream on its own thread (small
//! ones, like vCPUs, share as many threads as there are CPUs; when the source asked for
//! serial loading, all share one), so devices whose chunks arrive side by side also load
//! side by side and the downtime pays for the slowest.
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

/// Where the receivers hand device chunks: per device (or one for all), a bounded queue
/// for the data channels (a full one holds its channel back) and an unbounded one for the
/// main channel, whose reader is the event loop and must never wait on a loader.
pub(crate) struct DeviceHub {
    queues: Vec<(Sender<Chunk>, Sender<Chunk>)>,
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
        // A loader gone has failed, and reported why (or the attempt is over).
        let _ = match channel {
            Channel::Main => q.1.send(chunk),
            _ => q.0.send(chunk),
        };
        Ok(())
    }
}

/// The devices of one attempt and their loader threads.
pub(crate) struct DeviceLoad {
    pub(crate) hub: Arc<DeviceHub>,
    threads: Vec<JoinHandle<()>>,
    /// Cleared when the attempt ends: a loader still running leaves the devices alone.
    live: Arc<AtomicBool>,
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
        let small: Vec<bool> = list.iter().map(|l| l.dev.small()).collect();
        let plan = crate::device::thread_groups(&small, parallel, crate::device::cpus());
        let groups = crate::device::deal(list, plan);
        let mut queues: Vec<Option<(Sender<Chunk>, Sender<Chunk>)>> = vec![None; n];
        let mut threads = Vec::with_capacity(groups.len());
        for (g, group) in groups.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE);
            let (tx_main, rx_main) = crossbeam_channel::unbounded();
            for l in &group {
                if let Some(q) = queues.get_mut(usize::from(l.index)) {
                    *q = Some((tx.clone(), tx_main.clone()));
                }
            }
            let events = events.clone();
            let alive = live.clone();
            let report = move |ev| events.send(Event::Data { attempt, ev }).is_ok();
            // Small devices load in microseconds, inside the downtime: their thread must not
            // wait out a busy vCPU's time slice first.
            let latency_bound = group.iter().all(|l| l.dev.small());
            let spawned =
                crate::latency::spawn_if(latency_bound, format!("mig-load{g}"), move || {
                    load(group, [&rx, &rx_main], &alive, &report)
                });
            match spawned {
                Ok(join) => threads.push(join),
                Err(e) => {
                    // The loaders started so far end with their queues.
                    live.store(false, Ordering::SeqCst);
                    return Err(MigrateError::io("starting a device loader thread")(e));
                }
            }
        }
        Ok(DeviceLoad {
            hub: Arc::new(DeviceHub {
                queues: queues.into_iter().flatten().collect(),
            }),
            threads,
            live,
        })
    }

    /// From now on the loaders drop what they are given and end: the attempt is over.
    pub(crate) fn cancel(&self) {
        self.live.store(false, Ordering::SeqCst);
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

/// A loader thread: takes its devices' chunks in order (a device's all come on one of
/// the two queues) until the attempt ends or a device fails (reported as the attempt's
/// failure).
fn load(
    mut group: Vec<Loading>,
    queues: [&Receiver<Chunk>; 2],
    live: &AtomicBool,
    report: &impl Fn(DataEvent) -> bool,
) {
    let mut sel = crossbeam_channel::Select::new();
    for q in queues {
        sel.recv(q);
    }
    let mut open = queues.len();
    while open > 0 {
        let op = sel.select();
        let i = op.index();
        let Some(q) = queues.get(i) else { return };
        let Ok(chunk) = op.recv(q) else {
            sel.remove(i);
            open -= 1;
            continue;
        };
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
    /// When each device's load began and ended.
    loads: Vec<(Instant, Instant)>,
}

impl DeviceProgress {
    pub(crate) fn new(count: usize) -> DeviceProgress {
        DeviceProgress {
            initial: vec![false; count],
            loaded: vec![false; count],
            initial_left: count,
            loaded_left: count,
            ready_sent: false,
            loads: Vec::new(),
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
            self.loads.push((began, began + took));
        }
    }

    /// Wall time during which any device was loading: the slowest when they load side by
    /// side, the sum when one after another; time spent waiting for a device's bytes is not
    /// counted.
    pub(crate) fn load_span(&self) -> Duration {
        let mut spans = self.loads.clone();
        spans.sort();
        let mut total = Duration::ZERO;
        let mut cur: Option<(Instant, Instant)> = None;
        for (a, b) in spans {
            cur = match cur {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    total += cb - ca;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        total + cur.map(|(a, b)| b - a).unwrap_or_default()
    }
}
