//! The virtio transport a driver talks through: virtio-mmio (version 2) or
//! modern virtio-pci. Status, features, device config, queue setup and
//! notification, with the same meaning on both; plus the device interrupt
//! counter both interrupt handlers bump.

use crate::cpu;
use crate::virtio_mmio::{self as vm, Mmio};
use crate::virtio_pci::VirtioPci;
use core::sync::atomic::{AtomicU32, Ordering};

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_FAILED: u8 = 128;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device interrupts taken so far (any transport).
static IRQ_COUNT: AtomicU32 = AtomicU32::new(0);

/// Counts one device interrupt.
pub fn count_irq() {
    IRQ_COUNT.fetch_add(1, Ordering::Relaxed);
}

/// Device interrupts handled so far.
pub fn irq_count() -> u32 {
    IRQ_COUNT.load(Ordering::Relaxed)
}

/// A device's transport.
#[derive(Clone, Copy)]
pub enum Transport {
    Mmio(Mmio),
    Pci(VirtioPci),
}

/// What `queue_max` found.
pub enum QueueProbe {
    /// Largest queue size the device takes (0: the queue does not exist).
    Max(u32),
    /// Already enabled (QueueReady / queue_enable reads 1).
    Enabled,
}

/// Why `queue_activate` failed.
pub enum ActivateError {
    /// queue_msix_vector read back something else (the value read).
    Vector(u16),
    /// queue_notify_off * notify_off_multiplier is outside the notify structure.
    Notify,
}

impl Transport {
    pub fn status(&self) -> u8 {
        match self {
            Transport::Mmio(m) => m.read(vm::REG_STATUS) as u8,
            Transport::Pci(p) => p.status(),
        }
    }

    pub fn set_status(&self, s: u8) {
        match self {
            Transport::Mmio(m) => m.write(vm::REG_STATUS, s as u32),
            Transport::Pci(p) => p.set_status(s),
        }
    }

    /// Writes status 0 and waits (bounded) until it reads back 0.
    pub fn reset(&self) {
        self.set_status(0);
        let mut n = 0;
        while self.status() != 0 && n < 1000 {
            n += 1;
            cpu::pause();
        }
    }

    pub fn device_features(&self) -> u64 {
        match self {
            Transport::Mmio(m) => m.device_features(),
            Transport::Pci(p) => p.device_features(),
        }
    }

    pub fn set_driver_features(&self, f: u64) {
        match self {
            Transport::Mmio(m) => m.set_driver_features(f),
            Transport::Pci(p) => p.set_driver_features(f),
        }
    }

    /// 64-bit device config field at `off` (generation-checked).
    pub fn config_u64(&self, off: u32) -> u64 {
        match self {
            Transport::Mmio(m) => m.config_u64(off),
            Transport::Pci(p) => p.config_u64(off),
        }
    }

    /// 16-bit device config field at `off`.
    pub fn config_u16(&self, off: u32) -> u16 {
        match self {
            Transport::Mmio(m) => m.config_u16(off),
            Transport::Pci(p) => p.config_u16(off),
        }
    }

    /// Selects queue `q` and reads its maximum size.
    pub fn queue_max(&self, q: u16) -> QueueProbe {
        match self {
            Transport::Mmio(m) => {
                m.write(vm::REG_QUEUE_SEL, q as u32);
                if m.read(vm::REG_QUEUE_READY) != 0 {
                    return QueueProbe::Enabled;
                }
                QueueProbe::Max(m.read(vm::REG_QUEUE_NUM_MAX))
            }
            Transport::Pci(p) => match p.queue_max(q) {
                Ok(n) => QueueProbe::Max(n),
                Err(()) => QueueProbe::Enabled,
            },
        }
    }

    /// Sets queue `q`'s size and ring addresses (descriptor table, driver
    /// and device rings), its MSI-X vector (PCI; `NO_VECTOR` for none) and
    /// enables it. Returns the value to pass to `notify`.
    pub fn queue_activate(
        &self,
        q: u16,
        size: u32,
        rings: (u64, u64, u64),
        vector: u16,
    ) -> Result<u64, ActivateError> {
        match self {
            Transport::Mmio(m) => {
                let (d, a, u) = rings;
                m.write(vm::REG_QUEUE_SEL, q as u32);
                m.write(vm::REG_QUEUE_NUM, size);
                m.write(vm::REG_QUEUE_DESC_LOW, d as u32);
                m.write(vm::REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
                m.write(vm::REG_QUEUE_DRIVER_LOW, a as u32);
                m.write(vm::REG_QUEUE_DRIVER_HIGH, (a >> 32) as u32);
                m.write(vm::REG_QUEUE_DEVICE_LOW, u as u32);
                m.write(vm::REG_QUEUE_DEVICE_HIGH, (u >> 32) as u32);
                m.write(vm::REG_QUEUE_READY, 1);
                Ok(0)
            }
            Transport::Pci(p) => p
                .queue_activate(q, size, rings, vector)
                .map_err(|e| match e {
                    Some(v) => ActivateError::Vector(v),
                    None => ActivateError::Notify,
                }),
        }
    }

    /// Tells the device queue `q` has new buffers (`cookie` from `queue_activate`).
    pub fn notify(&self, q: u16, cookie: u64) {
        match self {
            Transport::Mmio(m) => m.write(vm::REG_QUEUE_NOTIFY, q as u32),
            Transport::Pci(p) => p.notify(q, cookie),
        }
    }
}
