//! Everything KVM holds for a VM and its vCPUs, plus the test VMM's device state, in a
//! versioned, serializable form; and the snapshot file format.
//!
//! # Save and restore order
//! Per vCPU, saving goes: MP state first (`KVM_GET_MP_STATE` runs
//! `kvm_apic_accept_events`, which can change LAPIC and vCPU state), then regs, sregs,
//! XSAVE (which includes the legacy FPU/SSE state), XCRs, debug registers, LAPIC, TSC
//! frequency, MSRs, and vCPU events last (the other GETs may change pending events).
//! Restoring goes: TSC frequency, CPUID, MSRs, sregs, regs, XSAVE, XCRs, debug registers,
//! LAPIC, MP state, vCPU events (they depend on the LAPIC and MP state being in place).
//! VM-wide state (PIC, IOAPIC, PIT, KVM clock) is saved after every vCPU is paused and
//! restored after the vCPUs; the KVM clock last so guest time resumes from the saved value.
//! All vCPUs must be stopped for both (`KVM_{GET,SET}_VCPU_EVENTS` is unsafe otherwise).

pub mod snapshot;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the [`MachineState`] encoding; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;
const STATE_MAGIC: [u8; 8] = *b"FERRYVMS";
/// Magic of one vCPU's state streamed on its own ([`encode_part`]).
pub const VCPU_MAGIC: [u8; 8] = *b"FERRYCPU";
/// Magic of the VM-wide state streamed on its own ([`PlatformState`]).
pub const PLATFORM_MAGIC: [u8; 8] = *b"FERRYPLT";
/// Largest encoded state accepted (1024 vCPUs at ~20 KiB each fit well within it).
pub const MAX_STATE_LEN: usize = 256 << 20;

/// Errors encoding or decoding state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a Ferry state blob.
    #[error("VM state: bad magic (not a Ferry VM state)")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("VM state: version {found} is not supported (this build reads version {expected})")]
    Version {
        /// Version found.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// Too short or too long.
    #[error("VM state: {0}")]
    Length(String),
    /// The body does not decode.
    #[error("VM state: corrupt encoding: {0}")]
    Decode(String),
    /// Encoding failed.
    #[error("VM state: cannot encode: {0}")]
    Encode(String),
}

/// Everything KVM holds for one vCPU. (Not `Clone`: kvm-bindings' XSAVE area is not.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC ID).
    pub id: u32,
    /// CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM reports as saveable and that reads back.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// TSC frequency in kHz, when the host reports it.
    pub tsc_khz: Option<u32>,
}

/// KVM's VM-wide state: in-kernel irqchips, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// Slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// KVM clock.
    pub clock: kvm_clock_data,
}

/// 16550 UART registers the guest can observe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Interrupt enable register.
    pub ier: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Divisor latch low.
    pub dll: u8,
    /// Divisor latch high.
    pub dlm: u8,
    /// FIFO control register (write-only, kept for completeness).
    pub fcr: u8,
}

/// The test DMA device's latched registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaState {
    /// Value latched for the next write (low and high halves).
    pub value: u64,
    /// Writes performed so far.
    pub writes: u64,
}

/// State of the test VMM's emulated devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1.
    pub serial: SerialState,
    /// Test DMA device.
    pub dma: DmaState,
}

/// A RAM region as recorded in the state (layout check on restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What is VM-wide (not per vCPU), as a migration streams it beside the vCPUs.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlatformState {
    /// RAM layout.
    pub memory: Vec<RegionLayout>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Emulated devices.
    pub devices: DeviceState,
}

/// Encodes a state part with its magic and the state version.
pub fn encode_part<T: Serialize>(magic: &[u8; 8], v: &T) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::with_capacity(16 * 1024);
    out.extend_from_slice(magic);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    let body = postcard::to_allocvec(v).map_err(|e| StateError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes what [`encode_part`] wrote with `magic`, refusing other versions and trailing
/// bytes.
pub fn decode_part<T: DeserializeOwned>(magic: &[u8; 8], bytes: &[u8]) -> Result<T, StateError> {
    if bytes.len() > MAX_STATE_LEN {
        return Err(StateError::Length(format!(
            "{} bytes exceeds the limit of {MAX_STATE_LEN}",
            bytes.len()
        )));
    }
    let (m, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| StateError::Length(format!("only {} bytes", bytes.len())))?;
    if m != magic {
        return Err(StateError::BadMagic);
    }
    let (version, body) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| StateError::Length("truncated before the version".into()))?;
    let version = u32::from_le_bytes(*version);
    if version != STATE_VERSION {
        return Err(StateError::Version {
            found: version,
            expected: STATE_VERSION,
        });
    }
    let (state, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| StateError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(StateError::Decode(format!(
            "{} trailing bytes after the state",
            rest.len()
        )));
    }
    Ok(state)
}

/// The whole machine except RAM contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// RAM layout.
    pub memory: Vec<RegionLayout>,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Emulated devices.
    pub devices: DeviceState,
}

fn field_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

macro_rules! diff_fields {
    ($out:ident, $prefix:expr, $a:expr, $b:expr, [$($f:ident),*]) => {
        $(
            if field_bytes(&$a.$f) != field_bytes(&$b.$f) {
                $out.push(format!("{}{}", $prefix, stringify!($f)));
            }
        )*
    };
}

impl VcpuState {
    /// Names of the fields that differ from `other` (compared by their exact bytes).
    pub fn diff(&self, other: &VcpuState) -> Vec<String> {
        let mut out = Vec::new();
        let p = format!("vcpu{}.", self.id);
        diff_fields!(
            out,
            p,
            self,
            other,
            [id, cpuid, regs, sregs, xsave, xcrs, lapic, mp_state, events, debugregs, tsc_khz]
        );
        // MSRs one by one so a mismatch names the MSR.
        if self.msrs.len() != other.msrs.len() {
            out.push(format!(
                "{p}msrs (count {} vs {})",
                self.msrs.len(),
                other.msrs.len()
            ));
        } else {
            for (a, b) in self.msrs.iter().zip(&other.msrs) {
                if a.index != b.index || a.data != b.data {
                    out.push(format!("{p}msr[{:#x}]", a.index));
                }
            }
        }
        out
    }
}

impl MachineState {
    /// Names of the fields that differ from `other`, field by field.
    pub fn diff(&self, other: &MachineState) -> Vec<String> {
        let mut out = Vec::new();
        if self.memory != other.memory {
            out.push("memory layout".to_string());
        }
        if self.vcpus.len() != other.vcpus.len() {
            out.push(format!(
                "vcpu count {} vs {}",
                self.vcpus.len(),
                other.vcpus.len()
            ));
        }
        for (a, b) in self.vcpus.iter().zip(&other.vcpus) {
            out.extend(a.diff(b));
        }
        diff_fields!(
            out,
            "vm.",
            self.vm,
            other.vm,
            [pic_master, pic_slave, ioapic, pit, clock]
        );
        diff_fields!(out, "devices.", self.devices, other.devices, [serial, dma]);
        out
    }

    /// Encodes with magic and version.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        encode_part(&STATE_MAGIC, self)
    }

    /// Decodes what [`MachineState::encode`] wrote, refusing other versions.
    pub fn decode(bytes: &[u8]) -> Result<MachineState, StateError> {
        decode_part(&STATE_MAGIC, bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> MachineState {
        let regs = kvm_regs {
            rip: 0x100000,
            rax: 0x2BAD_B002,
            ..Default::default()
        };
        let vcpu = VcpuState {
            id: 0,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            regs,
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            tsc_khz: Some(2_600_000),
        };
        MachineState {
            memory: vec![RegionLayout {
                gpa: 0,
                size: 64 << 20,
            }],
            vcpus: vec![vcpu],
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
            },
            devices: DeviceState::default(),
        }
    }

    #[test]
    fn round_trip_and_diff() {
        let s = sample();
        let bytes = s.encode().unwrap();
        let back = MachineState::decode(&bytes).unwrap();
        assert!(s.diff(&back).is_empty());
        let mut other = MachineState::decode(&bytes).unwrap();
        other.vcpus[0].regs.rip += 1;
        other.vcpus[0].msrs[0].data += 1;
        other.devices.serial.lcr = 3;
        assert_eq!(
            s.diff(&other),
            vec!["vcpu0.regs", "vcpu0.msr[0x10]", "devices.serial"]
        );
    }

    #[test]
    fn refuses_bad_input() {
        let bytes = sample().encode().unwrap();
        assert!(matches!(
            MachineState::decode(&bytes[..5]),
            Err(StateError::Length(_))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            MachineState::decode(&bad),
            Err(StateError::BadMagic)
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let err = MachineState::decode(&v2).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        for cut in [13, bytes.len() / 2, bytes.len() - 1] {
            assert!(MachineState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(MachineState::decode(&long).is_err());
    }
}
