//! Ferry's test VMM: runs multiboot guests on KVM with the in-kernel irqchip and PIT, a
//! COM1 UART and a test DMA device; saves and restores the complete machine; snapshots;
//! a JSON control API; and the glue that lets the migration engine move it.

pub mod api;
pub mod devices;
pub mod migration;
pub mod multiboot;
pub mod owner;
pub mod runner;
pub mod testdev;
pub mod update;
pub mod vcpu;
pub mod vm;
