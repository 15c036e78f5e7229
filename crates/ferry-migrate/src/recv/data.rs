//! Data-channel receivers: one thread per channel reads pages straight into guest memory
//! and reports pass ends to the event loop.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::Instant;

use crossbeam_channel::Sender;
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{page_sum, read_message_checked, Codec, Message, PageRun, ProtoError};
use ferry_transport::Stream;
use vm_memory::Bytes;

use super::devices::DeviceHub;
use super::postcopy::{place_checked, receive_pages, Arrival, Space};
use super::Event;
use crate::channel::{sum_guest_pages, Unpacker, Wire};
use crate::error::{Channel, MigrateError};
use crate::progress::Progress;

/// The receiver phase data channels work in (for error messages).
const PHASE: &str = "receiving";

/// What a data channel tells the event loop.
pub(crate) enum DataEvent {
    /// Everything of `pass` on this channel has arrived.
    PassEnd { channel: u16, pass: u32 },
    /// The source closed the channel.
    Closed { channel: u16 },
    /// The channel failed (I/O, a hostile frame), or a device loader did.
    Failed(MigrateError),
    /// A device loader: the device's initial bytes are loaded.
    DeviceInitial { device: u16 },
    /// A device loader: the device's whole stream is loaded (its load began at `began`).
    DeviceLoaded {
        device: u16,
        began: Instant,
        took: std::time::Duration,
    },
}

/// When anything last arrived from the source, in ms since the attempt began; shared by
/// the receivers and the loop, which gives up on a silent source.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    /// Bytes received on every channel of this attempt.
    pub(crate) bytes: AtomicU64,
    /// Once set, no receiver writes guest memory any more (the state is being loaded and
    /// the guest may run). Receivers hold it shared while they write a frame.
    sealed: RwLock<bool>,
    /// Pages whose checksum did not match and that no intact copy has replaced yet:
    /// guest address to (data channel, stream offset of its bytes).
    suspects: Mutex<HashMap<u64, (u16, u64)>>,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sealed: RwLock::new(false),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u16, u64)>> {
        self.suspects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails, naming the lowest one, if any page arrived corrupted and never intact after.
    pub(crate) fn check_suspects(&self) -> Result<(), MigrateError> {
        let s = self.suspects();
        match s.iter().min_by_key(|(gpa, _)| **gpa) {
            None => Ok(()),
            Some((gpa, (channel, offset))) => Err(MigrateError::CorruptPage {
                channel: *channel,
                gpa: *gpa,
                offset: *offset,
            }),
        }
    }

    /// Forgets suspect pages in `runs` (they are discarded and come again in postcopy).
    pub(crate) fn forget_suspects(&self, runs: &[PageRun]) {
        let mut s = self.suspects();
        if s.is_empty() {
            return;
        }
        s.retain(|gpa, _| {
            !runs
                .iter()
                .any(|r| *gpa >= r.gpa && *gpa < r.gpa + u64::from(r.pages) * PAGE_SIZE)
        });
    }

    /// Permission to write one frame into guest memory, unless sealed.
    fn open(&self, channel: u16) -> Result<RwLockReadGuard<'_, bool>, MigrateError> {
        let g = self.sealed.read().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Err(MigrateError::AfterFinalPass {
                channel: Some(channel),
            });
        }
        Ok(g)
    }

    /// Stops every receiver from writing guest memory from now on. Fails when a receiver is
    /// in the middle of a frame: all final passes have ended, so that frame is one too many.
    pub(crate) fn seal(&self) -> Result<(), MigrateError> {
        match self.sealed.try_write() {
            Ok(mut g) => {
                *g = true;
                Ok(())
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                *p.into_inner() = true;
                Ok(())
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                Err(MigrateError::AfterFinalPass { channel: None })
            }
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

/// One bit per guest page: which destination pages hold data (so a zero run only has to
/// clear those), and in postcopy which pages are placed and which were asked for.
pub(crate) struct PageBits {
    /// Per region: its first address, its pages, and a bit per page (padded to whole words).
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl PageBits {
    pub(crate) fn new(ram: &GuestRam) -> Self {
        PageBits {
            regions: ram
                .regions()
                .iter()
                .map(|r| {
                    (
                        r.gpa,
                        r.pages(),
                        (0..r.pages().div_ceil(64))
                            .map(|_| AtomicU64::new(0))
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    /// Every page's bit set.
    pub(crate) fn full(ram: &GuestRam) -> Self {
        let bits = PageBits::new(ram);
        for (_, _, words) in &bits.regions {
            for w in words {
                w.store(u64::MAX, Ordering::Relaxed);
            }
        }
        bits
    }

    fn locate(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.regions.iter().find_map(|(base, pages, words)| {
            let page = gpa.checked_sub(*base)? / PAGE_SIZE;
            if page >= *pages {
                return None;
            }
            words
                .get((page / 64) as usize)
                .map(|w| (w, 1u64 << (page % 64)))
        })
    }

    /// Every word, region after region (each padded to whole words).
    pub(crate) fn words(&self) -> Vec<u64> {
        self.regions
            .iter()
            .flat_map(|(_, _, words)| words.iter().map(|w| w.load(Ordering::Relaxed)))
            .collect()
    }

    pub(crate) fn set(&self, gpa: u64) {
        if let Some((w, bit)) = self.locate(gpa) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.load(Ordering::Relaxed) & bit != 0)
    }

    /// Sets the bit; returns whether it was set already.
    pub(crate) fn test_and_set(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.fetch_or(bit, Ordering::Relaxed) & bit != 0)
    }

    pub(crate) fn take(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }
}

pub(crate) struct DataRx {
    pub(crate) attempt: u64,
    pub(crate) wire: Wire,
    pub(crate) channel: u16,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) written: Arc<PageBits>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) tx: Sender<Event>,
    /// Set at the switch to postcopy: from its pass on, pages are placed atomically into
    /// the running guest's memory, never written straight into it.
    pub(crate) postcopy: Arc<OnceLock<(u32, Arc<Space>)>>,
    /// Where device chunks go.
    pub(crate) devices: Arc<DeviceHub>,
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
        let mut ch = ChannelRx {
            stream,
            offset: 0,
            unpacker: Unpacker::default(),
        };
        // Pages (data and zero) since the last PassEnd, checked against its count: a frame
        // lost on the way cannot go unnoticed.
        let mut pass_pages = 0u64;
        loop {
            let msg = match read_message_checked(&mut ch, &mut scratch, self.wire.sums) {
                Ok(m) => m,
                Err(ProtoError::Eof) => return Ok(()),
                Err(source) => return Err(self.read_error(source)),
            };
            self.activity.touch();
            if let Some(space) = self.postcopy_space(&msg) {
                pass_pages += self.place_postcopy(&mut ch, &space, msg)?;
                continue;
            }
            match msg {
                Message::Pages { runs, sums, .. } => {
                    pass_pages += self.place(&mut ch, &runs, &sums)?;
                }
                Message::Compressed {
                    runs,
                    codec,
                    sums,
                    len,
                    ..
                } => pass_pages += self.unpack(&mut ch, &runs, codec, &sums, len)?,
                Message::ZeroPages { runs, .. } => pass_pages += self.zero(&runs)?,
                Message::DeviceData {
                    device,
                    seq,
                    flags,
                    data,
                } => {
                    let len = data.len() as u64;
                    self.devices
                        .deliver(self.name(), device, seq, flags, data)?;
                    self.activity.bytes.fetch_add(len, Ordering::Relaxed);
                    self.progress.device_bytes.fetch_add(len, Ordering::Relaxed);
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
                        phase: PHASE,
                        channel: self.name(),
                    })
                }
            }
        }
    }

    /// The postcopy memory, if `msg` carries pages of the postcopy pass.
    fn postcopy_space(&self, msg: &Message) -> Option<Arc<Space>> {
        let pass = match msg {
            Message::Pages { pass, .. }
            | Message::Compressed { pass, .. }
            | Message::ZeroPages { pass, .. } => *pass,
            _ => return None,
        };
        self.postcopy
            .get()
            .filter(|(p, _)| pass >= *p)
            .map(|(_, s)| s.clone())
    }

    /// Reads a postcopy frame's pages into a buffer, checks them and places them; returns
    /// its page count.
    fn place_postcopy(
        &self,
        ch: &mut ChannelRx<'_>,
        space: &Space,
        msg: Message,
    ) -> Result<u64, MigrateError> {
        let channel = self.name();
        let pages = match msg {
            Message::ZeroPages { runs, .. } => {
                for r in &runs {
                    space.place_zero(channel, r.gpa, u64::from(r.pages), true)?;
                }
                let pages = runs.iter().map(|r| u64::from(r.pages)).sum();
                self.progress.pages_zero.fetch_add(pages, Ordering::Relaxed);
                return Ok(pages);
            }
            Message::Pages { runs, sums, .. } => {
                let how = Arrival {
                    channel,
                    sums_required: self.wire.sums,
                    pushed: true,
                };
                let mut buf = std::mem::take(&mut ch.unpacker.pages);
                let got = receive_pages(ch, &mut buf, space, how, &runs, &sums);
                ch.unpacker.pages = buf;
                let len = got?;
                self.progress.bytes.fetch_add(len, Ordering::Relaxed);
                self.activity.bytes.fetch_add(len, Ordering::Relaxed);
                len / PAGE_SIZE
            }
            Message::Compressed {
                runs,
                codec,
                sums,
                len,
                ..
            } => {
                self.require_sums(&sums, "Compressed")?;
                let pages = self.read_compressed(ch, &runs, codec, &sums, len)?;
                place_checked(space, channel, &runs, &sums, &ch.unpacker.pages, true)?;
                pages
            }
            _ => 0,
        };
        self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
        Ok(pages)
    }

    fn require_sums(&self, sums: &[u64], kind: &'static str) -> Result<(), MigrateError> {
        if self.wire.sums && sums.is_empty() {
            return Err(MigrateError::MissingPageSums {
                channel: self.name(),
                kind,
            });
        }
        Ok(())
    }

    fn read_error(&self, source: ProtoError) -> MigrateError {
        MigrateError::Receive {
            channel: self.name(),
            phase: PHASE,
            source,
        }
    }

    /// Reads a Pages frame's payload straight into guest memory and checks its pages;
    /// returns its page count.
    fn place(
        &self,
        ch: &mut ChannelRx<'_>,
        runs: &[PageRun],
        sums: &[u64],
    ) -> Result<u64, MigrateError> {
        self.require_sums(sums, "Pages")?;
        let _open = self.activity.open(self.channel)?;
        let slices = runs
            .iter()
            .map(|r| self.slice_of(r))
            .collect::<Result<Vec<_>, _>>()?;
        // Marked before the bytes land: a read cut short still leaves these pages known
        // as written, so a later zero run clears them.
        for r in runs {
            for p in 0..u64::from(r.pages) {
                self.written.set(r.gpa + p * PAGE_SIZE);
            }
        }
        let at = ch.offset;
        ch.stream
            .read_pages(&slices)
            .map_err(|e| self.read_error(ProtoError::Io(e)))?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        let bytes = pages * PAGE_SIZE;
        ch.offset += bytes;
        if !sums.is_empty() {
            self.check_placed(runs, sums, at)?;
        }
        self.activity.touch();
        self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.activity.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(pages)
    }

    /// Checks pages that landed in guest memory against their sums: a mismatch makes the
    /// page suspect (the source guest may have written it while it was sent, and then it
    /// comes again), a match clears an earlier suspicion.
    fn check_placed(&self, runs: &[PageRun], sums: &[u64], at: u64) -> Result<(), MigrateError> {
        let gpas = runs
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |p| r.gpa + p * PAGE_SIZE));
        // Hashed in place and without the lock (every channel hashes its own pages); the
        // lock only updates the list.
        let mut found = Vec::with_capacity(sums.len());
        sum_guest_pages(&self.ram, runs, &mut found)?;
        let mut verdicts = Vec::with_capacity(sums.len());
        for (i, ((gpa, sum), got)) in gpas.zip(sums).zip(&found).enumerate() {
            let intact = got == sum;
            if !intact {
                let offset = at + i as u64 * PAGE_SIZE;
                tracing::debug!(
                    gpa,
                    offset,
                    channel = self.channel,
                    "page checksum mismatch"
                );
            }
            verdicts.push((gpa, intact, at + i as u64 * PAGE_SIZE));
        }
        let mut suspects = self.activity.suspects();
        for (gpa, intact, offset) in verdicts {
            if intact {
                suspects.remove(&gpa);
            } else {
                suspects.insert(gpa, (self.channel, offset));
            }
        }
        Ok(())
    }

    /// Reads a Compressed frame's payload, decompresses and checks it, and copies the
    /// pages into guest memory; returns its page count.
    fn unpack(
        &self,
        ch: &mut ChannelRx<'_>,
        runs: &[PageRun],
        codec: Codec,
        sums: &[u64],
        len: u32,
    ) -> Result<u64, MigrateError> {
        self.require_sums(sums, "Compressed")?;
        let _open = self.activity.open(self.channel)?;
        let pages = self.read_compressed(ch, runs, codec, sums, len)?;
        self.copy_in(runs, &ch.unpacker.pages)?;
        self.progress.pages_data.fetch_add(pages, Ordering::Relaxed);
        Ok(pages)
    }

    /// Reads a Compressed frame's payload and decompresses it into `ch.unpacker.pages`,
    /// checking every page against its sum; returns its page count.
    fn read_compressed(
        &self,
        ch: &mut ChannelRx<'_>,
        runs: &[PageRun],
        codec: Codec,
        sums: &[u64],
        len: u32,
    ) -> Result<u64, MigrateError> {
        if !self.wire.allows(codec) {
            return Err(MigrateError::Unexpected {
                message: "Compressed (codec not agreed)",
                phase: PHASE,
                channel: self.name(),
            });
        }
        let at = ch.offset;
        // `len` is below the batch's raw size (checked by the decoder): at most 1 MiB.
        let mut packed = std::mem::take(&mut ch.unpacker.packed);
        packed.resize(len as usize, 0);
        let read = ch.read_exact(&mut packed);
        ch.unpacker.packed = packed;
        read.map_err(|e| self.read_error(ProtoError::Io(e)))?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        let corrupt = |why: String| MigrateError::CorruptBatch {
            channel: self.channel,
            offset: at,
            why,
        };
        ch.unpacker
            .unpack(codec, (pages * PAGE_SIZE) as usize)
            .map_err(corrupt)?;
        // Hashed from the copy that was compressed: any mismatch is corruption.
        let raw = &ch.unpacker.pages;
        if let Some(i) = sums
            .iter()
            .zip(raw.chunks(PAGE_SIZE as usize))
            .position(|(s, p)| page_sum(p) != *s)
        {
            return Err(corrupt(format!(
                "checksum mismatch on page {i} of the batch"
            )));
        }
        self.activity.touch();
        self.progress
            .bytes
            .fetch_add(u64::from(len), Ordering::Relaxed);
        self.activity
            .bytes
            .fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(pages)
    }

    /// Writes decompressed pages into guest memory, run by run.
    fn copy_in(&self, runs: &[PageRun], mut raw: &[u8]) -> Result<(), MigrateError> {
        for r in runs {
            let len = (u64::from(r.pages) * PAGE_SIZE) as usize;
            let (this, rest) = raw.split_at_checked(len).ok_or(MigrateError::OutsideRam {
                channel: self.name(),
                gpa: r.gpa,
                pages: r.pages,
            })?;
            for p in 0..u64::from(r.pages) {
                self.written.set(r.gpa + p * PAGE_SIZE);
            }
            self.slice_of(r)?.copy_from(this);
            raw = rest;
        }
        // Intact copies: no page of these runs is suspect any more.
        let mut suspects = self.activity.suspects();
        if !suspects.is_empty() {
            for r in runs {
                for p in 0..u64::from(r.pages) {
                    suspects.remove(&(r.gpa + p * PAGE_SIZE));
                }
            }
        }
        Ok(())
    }

    /// Clears the pages of a zero run that hold data; returns its page count.
    fn zero(&self, runs: &[PageRun]) -> Result<u64, MigrateError> {
        let _open = self.activity.open(self.channel)?;
        let mut total = 0;
        for r in runs {
            let slice = self.slice_of(r)?;
            for p in 0..u64::from(r.pages) {
                // Fresh destination memory is zero; only pages written earlier need
                // clearing.
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
            let mut suspects = self.activity.suspects();
            if !suspects.is_empty() {
                for p in 0..u64::from(r.pages) {
                    suspects.remove(&(r.gpa + p * PAGE_SIZE));
                }
            }
            total += u64::from(r.pages);
        }
        self.progress.pages_zero.fetch_add(total, Ordering::Relaxed);
        Ok(total)
    }
}

/// A data channel's stream, with the count of bytes read from it (to name where in the
/// stream a corrupted page was) and its buffers.
struct ChannelRx<'a> {
    stream: &'a mut Stream,
    offset: u64,
    unpacker: Unpacker,
}

impl Read for ChannelRx<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.offset += n as u64;
        Ok(n)
    }
}
