//! Data-channel receivers: one thread per channel reads pages straight into guest memory
//! and reports pass ends to the event loop.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{read_message, Message, PageRun, ProtoError};
use ferry_sys::iov;
use ferry_transport::Stream;
use vm_memory::Bytes;

use super::Event;
use crate::error::{Channel, MigrateError};
use crate::progress::Progress;

/// What a data channel tells the event loop.
pub(crate) enum DataEvent {
    /// Everything of `pass` on this channel has arrived.
    PassEnd { channel: u16, pass: u32 },
    /// The source closed the channel.
    Closed { channel: u16 },
    /// The channel failed (I/O, a hostile frame).
    Failed(MigrateError),
}

/// When anything last arrived from the source, in ms since the attempt began; shared by
/// the receivers and the loop, which gives up on a silent source.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    /// Bytes received on every channel of this attempt.
    pub(crate) bytes: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since anything arrived.
    pub(crate) fn idle(&self) -> std::time::Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Which destination pages hold data (so a zero run only has to clear those).
pub(crate) struct Written {
    regions: Vec<(u64, Vec<AtomicU64>)>,
}

impl Written {
    pub(crate) fn new(ram: &GuestRam) -> Self {
        Written {
            regions: ram
                .regions()
                .iter()
                .map(|r| {
                    (
                        r.gpa,
                        (0..r.pages().div_ceil(64))
                            .map(|_| AtomicU64::new(0))
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    fn locate(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.regions.iter().find_map(|(base, words)| {
            let page = gpa.checked_sub(*base)? / PAGE_SIZE;
            words
                .get((page / 64) as usize)
                .map(|w| (w, 1u64 << (page % 64)))
        })
    }

    pub(crate) fn set(&self, gpa: u64) {
        if let Some((w, bit)) = self.locate(gpa) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    pub(crate) fn take(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }
}

pub(crate) struct DataRx {
    pub(crate) attempt: u64,
    pub(crate) channel: u16,
    pub(crate) phase: &'static str,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) written: Arc<Written>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) tx: Sender<Event>,
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl DataRx {
    fn emit(&self, ev: DataEvent) -> bool {
        self.tx
            .send(Event::Data {
                attempt: self.attempt,
                ev,
            })
            .is_ok()
    }

    pub(crate) fn run(self, mut stream: Stream) {
        let ev = match self.receive(&mut stream) {
            Ok(()) => DataEvent::Closed {
                channel: self.channel,
            },
            Err(e) => DataEvent::Failed(e),
        };
        self.emit(ev);
    }

    fn name(&self) -> Channel {
        Channel::Data(self.channel)
    }

    fn slice_of(&self, r: &PageRun) -> Result<ferry_memory::ram::GuestSlice<'_>, MigrateError> {
        let bad = || MigrateError::OutsideRam {
            channel: self.name(),
            gpa: r.gpa,
            pages: r.pages,
        };
        self.ram
            .region_of(r.gpa, u64::from(r.pages))
            .ok_or_else(bad)?;
        self.ram
            .slice(r.gpa, (u64::from(r.pages) * PAGE_SIZE) as usize)
            .map_err(|_| bad())
    }

    fn receive(&self, stream: &mut Stream) -> Result<(), MigrateError> {
        let mut scratch = Vec::new();
        // Pages (data and zero) since the last PassEnd, checked against its count: a frame
        // lost on the way cannot go unnoticed.
        let mut pass_pages = 0u64;
        loop {
            let msg = match read_message(stream, &mut scratch) {
                Ok(m) => m,
                Err(ProtoError::Eof) => return Ok(()),
                Err(source) => {
                    return Err(MigrateError::Receive {
                        channel: self.name(),
                        phase: self.phase,
                        source,
                    })
                }
            };
            self.activity.touch();
            match msg {
                Message::Pages { runs, .. } => {
                    let slices = runs
                        .iter()
                        .map(|r| self.slice_of(r))
                        .collect::<Result<Vec<_>, _>>()?;
                    // Marked before the bytes land: a read cut short still leaves these
                    // pages known as written, so a later zero run clears them.
                    for r in &runs {
                        for p in 0..u64::from(r.pages) {
                            self.written.set(r.gpa + p * PAGE_SIZE);
                        }
                    }
                    iov::read_exact_volatile(stream.as_fd(), &slices).map_err(|e| {
                        MigrateError::Receive {
                            channel: self.name(),
                            phase: self.phase,
                            source: ProtoError::Io(e),
                        }
                    })?;
                    self.activity.touch();
                    let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
                    pass_pages += pages;
                    self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
                    self.progress
                        .bytes
                        .fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
                    self.activity
                        .bytes
                        .fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
                }
                Message::ZeroPages { runs, .. } => {
                    for r in &runs {
                        let slice = self.slice_of(r)?;
                        for p in 0..u64::from(r.pages) {
                            // Fresh destination memory is zero; only pages written earlier
                            // in this migration need clearing.
                            if self.written.take(r.gpa + p * PAGE_SIZE) {
                                slice
                                    .write_slice(&ZERO_PAGE, (p * PAGE_SIZE) as usize)
                                    .map_err(|_| MigrateError::OutsideRam {
                                        channel: self.name(),
                                        gpa: r.gpa,
                                        pages: r.pages,
                                    })?;
                            }
                        }
                        self.progress
                            .pages_zero
                            .fetch_add(u64::from(r.pages), Ordering::Relaxed);
                        pass_pages += u64::from(r.pages);
                    }
                }
                Message::PassEnd { pass, pages } => {
                    if pages != pass_pages {
                        return Err(MigrateError::PassPages {
                            channel: self.channel,
                            pass,
                            announced: pages,
                            arrived: pass_pages,
                        });
                    }
                    pass_pages = 0;
                    let ev = DataEvent::PassEnd {
                        channel: self.channel,
                        pass,
                    };
                    if !self.emit(ev) {
                        return Ok(());
                    }
                }
                m => {
                    return Err(MigrateError::Unexpected {
                        message: m.name(),
                        phase: self.phase,
                        channel: self.name(),
                    })
                }
            }
        }
    }
}
