//! A device without hardware, for engine tests: it streams some initial bytes in PRE_COPY
//! and its state (whatever a closure returns at the pause) in STOP_COPY, each framed with
//! its length and a CRC so a destination notices a damaged or cut stream; loading its final
//! state takes a set time (the firmware cost of a real device).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_migrate::{DeviceState, MigrationDevice, PrecopyInfo, VmError};

/// Why a fake device refuses its stream or a step.
#[derive(Debug, thiserror::Error)]
pub enum FakeDeviceError {
    /// A frame's CRC does not match: the stream was damaged.
    #[error("{0}: corrupt stream (a frame's checksum does not match)")]
    Corrupt(String),
    /// The stream ended inside a frame, or before any state.
    #[error("{0}: truncated stream")]
    Truncated(String),
    /// A failure the test asked for.
    #[error("{0}: injected failure")]
    Injected(String),
    /// The configuration bytes are not a fake device's.
    #[error("bad fake device configuration ({0} bytes)")]
    Config(usize),
}

type Saver = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

#[derive(Default)]
struct Inner {
    state: Option<DeviceState>,
    /// Source: the stream of the current state, and how much was read.
    out: Vec<u8>,
    pos: usize,
    /// Source: initial bytes not read yet.
    initial_left: usize,
    /// Destination: what arrived, and the state it loaded.
    received: Vec<u8>,
    initial: Option<Vec<u8>>,
    loaded: Option<Vec<u8>>,
    initial_at: Option<Instant>,
}

/// A fake device (see the module documentation).
pub struct FakeDevice {
    name: String,
    initial: Vec<u8>,
    save: Saver,
    load: Duration,
    inner: Mutex<Inner>,
    /// Source: flip a byte of the next stop-copy stream.
    pub corrupt: AtomicBool,
    /// Source: cut the last bytes off the next stop-copy stream.
    pub truncate: AtomicBool,
    /// Destination: fail the load.
    pub fail_load: AtomicBool,
    /// Destination: taking the initial bytes takes this long (told to the destination in
    /// the config, as the load time is).
    initial_delay: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Length, bytes, CRC.
fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out
}

/// The frames of `bytes`, in order.
fn unframe(name: &str, mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, FakeDeviceError> {
    let cut = || FakeDeviceError::Truncated(name.into());
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(cut)?;
        let len = u32::from_le_bytes(*len) as usize;
        let data = rest.get(..len).ok_or_else(cut)?;
        let crc = rest
            .get(len..len + 4)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .ok_or_else(cut)?;
        if crc32fast::hash(data) != u32::from_le_bytes(crc) {
            return Err(FakeDeviceError::Corrupt(name.into()));
        }
        frames.push(data.to_vec());
        bytes = &rest[len + 4..];
    }
    Ok(frames)
}

impl FakeDevice {
    /// A source device: `initial` initial bytes, its state from `save` at the pause.
    pub fn source(
        name: &str,
        initial: Vec<u8>,
        load: Duration,
        save: impl Fn() -> Vec<u8> + Send + Sync + 'static,
    ) -> Arc<FakeDevice> {
        Arc::new(FakeDevice {
            name: name.into(),
            initial,
            save: Box::new(save),
            load,
            inner: Mutex::new(Inner::default()),
            corrupt: AtomicBool::new(false),
            truncate: AtomicBool::new(false),
            fail_load: AtomicBool::new(false),
            initial_delay: Duration::ZERO,
        })
    }

    /// As [`FakeDevice::source`], for a device whose destination takes `delay` to load
    /// its initial bytes.
    pub fn slow_initial(
        name: &str,
        initial: Vec<u8>,
        delay: Duration,
        save: impl Fn() -> Vec<u8> + Send + Sync + 'static,
    ) -> Arc<FakeDevice> {
        let mut d = FakeDevice::source(name, initial, Duration::ZERO, save);
        if let Some(d) = Arc::get_mut(&mut d) {
            d.initial_delay = delay;
        }
        d
    }

    /// A destination device made from a source's description.
    pub fn target(name: &str, config: &[u8]) -> Result<Arc<FakeDevice>, FakeDeviceError> {
        let bad = || FakeDeviceError::Config(config.len());
        let c = <[u8; 8]>::try_from(config).map_err(|_| bad())?;
        let ms = |b: &[u8]| {
            <[u8; 4]>::try_from(b)
                .map(|b| Duration::from_millis(u32::from_le_bytes(b).into()))
                .map_err(|_| bad())
        };
        let mut d = FakeDevice::source(name, Vec::new(), ms(&c[..4])?, Vec::new);
        if let Some(d) = Arc::get_mut(&mut d) {
            d.initial_delay = ms(&c[4..])?;
        }
        Ok(d)
    }

    /// The state the engine last moved it to (`None`: never).
    pub fn state(&self) -> Option<DeviceState> {
        lock(&self.inner).state
    }

    /// Destination: the state it loaded last, if any.
    pub fn loaded(&self) -> Option<Vec<u8>> {
        lock(&self.inner).loaded.clone()
    }

    /// Destination: the initial bytes it took, and when it had them all.
    pub fn initial(&self) -> Option<(Vec<u8>, Instant)> {
        let g = lock(&self.inner);
        g.initial.clone().zip(g.initial_at)
    }

    /// Source: its state now, as the destination should load it.
    pub fn state_now(&self) -> Vec<u8> {
        (self.save)()
    }

    fn on_stop(&self, g: &mut Inner) -> Result<(), FakeDeviceError> {
        std::thread::sleep(self.load);
        if self.fail_load.load(Ordering::SeqCst) {
            return Err(FakeDeviceError::Injected(self.name.clone()));
        }
        let mut frames = unframe(&self.name, &std::mem::take(&mut g.received))?;
        let state = frames
            .pop()
            .ok_or_else(|| FakeDeviceError::Truncated(self.name.clone()))?;
        g.loaded = Some(state);
        Ok(())
    }

    /// Destination: a complete initial frame arrived (the first frame).
    fn note_initial(&self, g: &mut Inner) {
        if g.initial.is_some() || self.initial_expected(g).is_none() {
            return;
        }
        if let Ok(frames) = unframe(&self.name, &g.received) {
            if let Some(first) = frames.into_iter().next() {
                std::thread::sleep(self.initial_delay);
                g.initial = Some(first);
                g.initial_at = Some(Instant::now());
            }
        }
    }

    /// Whether a whole first frame is in `received`.
    fn initial_expected(&self, g: &Inner) -> Option<()> {
        let len = u32::from_le_bytes(*g.received.first_chunk::<4>()?) as usize;
        (g.received.len() >= len + 8).then_some(())
    }
}

impl MigrationDevice for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> Vec<u8> {
        let mut c = (self.load.as_millis() as u32).to_le_bytes().to_vec();
        c.extend_from_slice(&(self.initial_delay.as_millis() as u32).to_le_bytes());
        c
    }

    fn set_state(&self, to: DeviceState) -> Result<(), VmError> {
        let mut g = lock(&self.inner);
        match to {
            DeviceState::PreCopy => {
                g.out = frame(&self.initial);
                g.pos = 0;
                g.initial_left = g.out.len();
            }
            DeviceState::StopCopy => {
                let mut out = frame(&(self.save)());
                if self.corrupt.load(Ordering::SeqCst) {
                    if let Some(b) = out.get_mut(5) {
                        *b ^= 0x40;
                    }
                }
                if self.truncate.load(Ordering::SeqCst) {
                    out.truncate(out.len().saturating_sub(3));
                }
                // Whatever of the initial frame was not read goes first.
                let at = g.pos.min(g.out.len());
                let rest = g.out.split_off(at);
                g.out = rest;
                g.out.extend_from_slice(&out);
                g.pos = 0;
                g.initial_left = 0;
            }
            DeviceState::Resuming => {
                g.received.clear();
                g.initial = None;
                g.initial_at = None;
            }
            DeviceState::Stop => self.on_stop(&mut g).map_err(VmError::new)?,
            DeviceState::Running => {}
        }
        g.state = Some(to);
        Ok(())
    }

    fn read(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, VmError> {
        let mut g = lock(&self.inner);
        let n = g.out.len().saturating_sub(g.pos).min(max);
        let from = g.pos;
        out.extend_from_slice(&g.out[from..from + n]);
        g.pos += n;
        g.initial_left = g.initial_left.saturating_sub(n);
        Ok(n)
    }

    fn precopy_info(&self) -> PrecopyInfo {
        PrecopyInfo {
            initial_bytes: lock(&self.inner).initial_left as u64,
            dirty_bytes: 0,
        }
    }

    fn stop_copy_size(&self) -> u64 {
        64
    }

    fn load_cost(&self) -> Duration {
        self.load
    }

    fn write(&self, data: &[u8]) -> Result<(), VmError> {
        let mut g = lock(&self.inner);
        g.received.extend_from_slice(data);
        self.note_initial(&mut g);
        Ok(())
    }
}
