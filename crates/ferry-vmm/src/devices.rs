//! The test VMM's emulated devices: a 16550 UART on COM1 for guest output and a tiny "DMA"
//! device through which the guest asks the VMM to write guest memory (so migration of pages
//! dirtied by the VMM, not the guest, is exercised), plus the fallbacks for unclaimed ports.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ferry_migrate::{DeviceState as MigState, MigrationDevice};

use ferry_memory::ram::GuestRam;
use ferry_state::{DeviceState, DmaState, SerialState};

use crate::testdev::{self, TestDev, TestDevConfig, TestDevError};
use vm_memory::{Bytes, GuestAddress};

/// COM1 base port.
pub const COM1: u16 = 0x3F8;
/// DMA device: writing a guest physical address here makes the VMM store the latched value.
pub const DMA_PORT_GPA: u16 = 0xFE0;
/// DMA device: low 32 bits of the value to store.
pub const DMA_PORT_LO: u16 = 0xFE4;
/// DMA device: high 32 bits of the value to store.
pub const DMA_PORT_HI: u16 = 0xFE8;

/// Where guest serial output goes.
pub enum SerialSink {
    /// A file descriptor written byte by byte as the guest writes (stdout or a file).
    Fd(File),
    /// Discarded.
    Null,
}

impl SerialSink {
    /// The process's stdout, unbuffered (each byte leaves when the guest writes it).
    pub fn stdout() -> std::io::Result<SerialSink> {
        use std::os::fd::AsFd;
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Ok(SerialSink::Fd(File::from(fd)))
    }
}

struct Serial {
    regs: SerialState,
    sink: SerialSink,
}

const LCR_DLAB: u8 = 0x80;

impl Serial {
    fn write(&mut self, offset: u16, val: u8) {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.regs.dll = val,
            0 => {
                if let SerialSink::Fd(f) = &mut self.sink {
                    // Output is best effort: a closed stdout must not stop the guest.
                    let _ = f.write_all(&[val]);
                }
            }
            1 if dlab => self.regs.dlm = val,
            1 => self.regs.ier = val & 0x0F,
            2 => self.regs.fcr = val,
            3 => self.regs.lcr = val,
            4 => self.regs.mcr = val & 0x1F,
            7 => self.regs.scr = val,
            _ => {}
        }
    }

    fn read(&self, offset: u16) -> u8 {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.regs.dll,
            0 => 0, // no input
            1 if dlab => self.regs.dlm,
            1 => self.regs.ier,
            2 => {
                // No interrupt pending; FIFO bits when enabled.
                if self.regs.fcr & 1 != 0 {
                    0xC1
                } else {
                    0x01
                }
            }
            3 => self.regs.lcr,
            4 => self.regs.mcr,
            5 => 0x60, // transmitter empty: output never blocks
            6 => 0xB0, // DCD, DSR, CTS
            7 => self.regs.scr,
            _ => 0xFF,
        }
    }
}

/// All emulated devices of a VM.
pub struct Devices {
    serial: Mutex<Serial>,
    dma: Mutex<DmaState>,
    ram: Arc<GuestRam>,
    /// Test devices with their own memory, by index (stand-ins for VFIO devices).
    testdevs: RwLock<Vec<Arc<TestDev>>>,
    /// Indexes of the test devices created from an incoming migration's description
    /// rather than configured: a later attempt may replace or drop them.
    adopted: Mutex<Vec<usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device state stays consistent even if another vCPU thread panicked mid-access.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl Devices {
    /// Devices writing serial output to `sink`.
    pub fn new(ram: Arc<GuestRam>, sink: SerialSink) -> Self {
        Devices {
            serial: Mutex::new(Serial {
                regs: SerialState::default(),
                sink,
            }),
            dma: Mutex::new(DmaState::default()),
            ram,
            testdevs: RwLock::new(Vec::new()),
            adopted: Mutex::new(Vec::new()),
        }
    }

    /// Creates test device `index` as an incoming migration describes it, in place of one
    /// an earlier attempt created.
    pub fn adopt_testdev(
        &self,
        index: usize,
        config: TestDevConfig,
    ) -> Result<Arc<TestDev>, TestDevError> {
        self.drop_adopted(|i| i == index);
        let dev = self.add_testdev(index, config)?;
        lock(&self.adopted).push(index);
        Ok(dev)
    }

    /// Removes the test devices an earlier incoming attempt created that `unwanted` picks
    /// (the guest never ran with them).
    pub fn drop_adopted(&self, unwanted: impl Fn(usize) -> bool) {
        let mut adopted = lock(&self.adopted);
        let mut list = self.testdevs.write().unwrap_or_else(|e| e.into_inner());
        list.retain(|d| !(adopted.contains(&d.index()) && unwanted(d.index())));
        adopted.retain(|i| !unwanted(*i));
    }

    /// Whether test device `index` came from an incoming migration's description.
    pub fn is_adopted(&self, index: usize) -> bool {
        lock(&self.adopted).contains(&index)
    }

    /// Adds test device `index` and starts it; an index in use is refused.
    pub fn add_testdev(
        &self,
        index: usize,
        config: TestDevConfig,
    ) -> Result<Arc<TestDev>, TestDevError> {
        let mut list = self.testdevs.write().unwrap_or_else(|e| e.into_inner());
        if list.iter().any(|d| d.index() == index) {
            return Err(TestDevError::Index {
                dev: format!("testdev{index}"),
            });
        }
        let dev = TestDev::new(index, config)?;
        dev.start()?;
        list.push(dev.clone());
        list.sort_by_key(|d| d.index());
        Ok(dev)
    }

    /// The test devices, by index.
    pub fn testdevs(&self) -> Vec<Arc<TestDev>> {
        self.testdevs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The guest runs (again): every test device works, whatever a migration left it in.
    pub fn run_testdevs(&self) {
        for d in self.testdevs() {
            if d.state() != MigState::Running {
                if let Err(e) = d.set_state(MigState::Running) {
                    tracing::error!("{}: cannot run: {e}", d.name());
                }
            }
        }
    }

    fn testdev_at(&self, gpa: u64) -> Option<(Arc<TestDev>, u64)> {
        let (index, offset) = testdev::mmio_slot(gpa)?;
        let list = self.testdevs.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|d| d.index() == index)
            .map(|d| (d.clone(), offset))
    }

    /// A port write by the guest.
    pub fn pio_out(&self, port: u16, data: &[u8]) {
        match port {
            COM1..=0x3FF => {
                if let Some(&b) = data.first() {
                    lock(&self.serial).write(port - COM1, b);
                }
            }
            DMA_PORT_LO => {
                let mut d = lock(&self.dma);
                d.value = (d.value & !0xFFFF_FFFF) | u64::from(le_u32(data));
            }
            DMA_PORT_HI => {
                let mut d = lock(&self.dma);
                d.value = (d.value & 0xFFFF_FFFF) | u64::from(le_u32(data)) << 32;
            }
            DMA_PORT_GPA => {
                let gpa = u64::from(le_u32(data));
                let mut d = lock(&self.dma);
                // Through vm-memory, so the page lands in the VMM's dirty bitmap.
                if self.ram.mem().write_obj(d.value, GuestAddress(gpa)).is_ok() {
                    d.writes += 1;
                } else {
                    tracing::warn!("DMA device: guest address {gpa:#x} is not RAM; ignored");
                }
            }
            _ => tracing::trace!("write to unclaimed port {port:#x}"),
        }
    }

    /// A port read by the guest.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3FF => {
                let v = lock(&self.serial).read(port - COM1);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            DMA_PORT_GPA => {
                let writes = lock(&self.dma).writes as u32;
                for (d, s) in data.iter_mut().zip(writes.to_le_bytes()) {
                    *d = s;
                }
            }
            // Unclaimed ports (including PCI config space) float high, as on a PC.
            _ => data.fill(0xFF),
        }
    }

    /// A guest MMIO read: a test device's window, or an address no device claims.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        if let Some((d, offset)) = self.testdev_at(gpa) {
            return d.mmio_read(offset, data);
        }
        tracing::trace!("read from unclaimed MMIO {gpa:#x}");
        data.fill(0xFF);
    }

    /// A guest MMIO write: a test device's window, or an address no device claims.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        if let Some((d, offset)) = self.testdev_at(gpa) {
            return d.mmio_write(offset, data);
        }
        tracing::trace!("write to unclaimed MMIO {gpa:#x}");
    }

    /// Device state for save/migration.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            serial: lock(&self.serial).regs,
            dma: *lock(&self.dma),
        }
    }

    /// Restores device state.
    pub fn set_state(&self, s: &DeviceState) {
        lock(&self.serial).regs = s.serial;
        *lock(&self.dma) = s.dma;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_memory::ram::{Backend, MemoryConfig};

    fn devices() -> (Devices, Arc<GuestRam>) {
        let ram = Arc::new(
            GuestRam::new(MemoryConfig {
                size: 2 << 20,
                backend: Backend::Anonymous,
                thp: false,
            })
            .unwrap(),
        );
        (Devices::new(ram.clone(), SerialSink::Null), ram)
    }

    #[test]
    fn dma_writes_are_vmm_dirty() {
        let (d, ram) = devices();
        ram.take_vmm_dirty(0);
        d.pio_out(DMA_PORT_LO, &0xdead_beefu32.to_le_bytes());
        d.pio_out(DMA_PORT_HI, &0x1234u32.to_le_bytes());
        d.pio_out(DMA_PORT_GPA, &0x3000u32.to_le_bytes());
        let v: u64 = ram.mem().read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(v, 0x1234_dead_beef);
        assert_eq!(ram.take_vmm_dirty(0)[0], 1 << 3);
        assert_eq!(d.state().dma.writes, 1);
        // Out of RAM: ignored, no panic.
        d.pio_out(DMA_PORT_GPA, &0xF000_0000u32.to_le_bytes());
        assert_eq!(d.state().dma.writes, 1);
    }

    #[test]
    fn uart_registers_and_state() {
        let (d, _) = devices();
        let mut b = [0u8];
        d.pio_in(COM1 + 5, &mut b);
        assert_eq!(b[0] & 0x20, 0x20, "THR empty");
        d.pio_out(COM1 + 3, &[0x83]); // DLAB
        d.pio_out(COM1, &[0x01]);
        d.pio_out(COM1 + 3, &[0x03]);
        d.pio_out(COM1 + 7, &[0x5A]);
        let s = d.state();
        assert_eq!((s.serial.dll, s.serial.lcr, s.serial.scr), (1, 3, 0x5A));
        let (d2, _) = devices();
        d2.set_state(&s);
        d2.pio_in(COM1 + 7, &mut b);
        assert_eq!(b[0], 0x5A);
        let mut w = [0u8; 4];
        d.pio_in(0xCFC, &mut w);
        assert_eq!(w, [0xFF; 4]);
    }
}
