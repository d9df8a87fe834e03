//! PCI: bus 0 with a host bridge and configuration mechanism #1
//! ([`bus`]), type 0 configuration spaces with BARs and capabilities
//! ([`config`]), and MSI-X ([`msix`]). General, not virtio-only: virtio-pci
//! functions and (later) vfio-user functions sit on the same bus.
//!
//! INTx is not offered: functions have interrupt pin 0, so drivers must use
//! MSI-X (Linux's virtio-pci and vfio-pci do).

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{BarAllocator, PciBusError, PciFunction, PciRoot, Window};
pub use msix::MsiMessage;
