//! What every virtio transport shares, whatever the bus: the device status
//! byte and its rules (virtio spec 2.1, 3.1), feature negotiation (2.2),
//! and queue set-up (checked sizes and addresses, only while the driver is
//! setting up). virtio-mmio and virtio-pci each lay these out in their own
//! registers and call in here.

use serde::{Deserialize, Serialize};

use crate::{QueueConfig, VirtioDevice};

/// Status bits (virtio spec 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and must be reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// `VIRTIO_F_VERSION_1`: the modern interface; required.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const KNOWN_STATUS: u8 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// What a status write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusChange {
    /// The device was activated with its queues.
    pub activated: bool,
    /// The device was reset (status 0).
    pub reset: bool,
    /// Activation failed: DEVICE_NEEDS_RESET is set and the driver must be
    /// told (a config interrupt).
    pub needs_reset: bool,
}

/// Which queue address register a driver writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueAddress {
    /// The descriptor table.
    Desc,
    /// The available (driver) ring.
    Avail,
    /// The used (device) ring.
    Used,
}

/// The transport-independent virtio state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonState {
    pub(crate) status: u8,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) queues: Vec<QueueConfig>,
    pub(crate) config_generation: u32,
}

/// Why saved virtio state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The saved state has another number of queues than the device.
    #[error("saved virtio state has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the saved state.
        saved: usize,
        /// On this device.
        device: usize,
    },
    /// A queue size is not valid for this device.
    #[error("saved queue {index} has size {size}, the device allows at most {max} (power of two)")]
    QueueSize {
        /// Which queue.
        index: usize,
        /// Its saved size.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// The saved features include some the device does not offer.
    #[error("saved driver features {saved:#x} are not offered by the device ({offered:#x})")]
    Features {
        /// Saved.
        saved: u64,
        /// Offered.
        offered: u64,
    },
    /// Undefined bits in a register.
    #[error("saved virtio {0} has undefined bits set")]
    Bits(&'static str),
    /// A value out of its range.
    #[error("saved virtio {0} is out of range")]
    Range(&'static str),
}

impl CommonState {
    /// Reset state for a device with `queues` queues.
    pub(crate) fn new(queues: usize) -> Self {
        CommonState {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueConfig::default(); queues],
            config_generation: 0,
        }
    }

    /// Back to reset state.
    pub(crate) fn reset(&mut self) {
        *self = CommonState::new(self.queues.len());
    }

    pub(crate) fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The driver is negotiating features (DRIVER set, FEATURES_OK not).
    fn negotiating(&self) -> bool {
        self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0
    }

    /// The driver is setting queues up (FEATURES_OK set, DRIVER_OK not).
    fn queue_setup(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// The 32 device feature bits selected by `device_features_sel`.
    pub(crate) fn device_features_word<D: VirtioDevice>(&self, device: &D) -> u32 {
        match self.device_features_sel {
            0 => device.device_features() as u32,
            1 => (device.device_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 driver feature bits selected by `driver_features_sel`.
    pub(crate) fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// A driver feature write, honoured only while negotiating.
    pub(crate) fn write_driver_features(&mut self, v: u32) {
        if !self.negotiating() {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(v) << shift);
    }

    /// The selected queue's maximum size on `device` (0: no such queue).
    pub(crate) fn queue_max<D: VirtioDevice>(&self, device: &D) -> u16 {
        device
            .queue_max_sizes()
            .get(self.queue_sel as usize)
            .copied()
            .unwrap_or(0)
    }

    /// A queue size write: a power of two up to the maximum, before the
    /// queue is ready, during set-up.
    pub(crate) fn write_queue_size(&mut self, max: u16, v: u32) {
        if !self.queue_setup() {
            return;
        }
        let ok = v != 0 && v <= u32::from(max) && v.is_power_of_two();
        if let Some(q) = self.selected_queue_mut() {
            if !q.ready && ok {
                q.size = v as u16;
            }
        }
    }

    /// A queue ready/enable write during set-up.
    pub(crate) fn write_queue_ready(&mut self, ready: bool) {
        if !self.queue_setup() {
            return;
        }
        if let Some(q) = self.selected_queue_mut() {
            q.ready = ready;
        }
    }

    /// Writes 32 bits (`high` half or low half) of a queue address, before
    /// the queue is ready, during set-up.
    pub(crate) fn write_queue_address(&mut self, which: QueueAddress, high: bool, v: u32) {
        if !self.queue_setup() {
            return;
        }
        if let Some(q) = self.selected_queue_mut().filter(|q| !q.ready) {
            let field = match which {
                QueueAddress::Desc => &mut q.desc_table,
                QueueAddress::Avail => &mut q.avail_ring,
                QueueAddress::Used => &mut q.used_ring,
            };
            *field = if high {
                (*field & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*field & !0xffff_ffff) | u64::from(v)
            };
        }
    }

    /// Sets DEVICE_NEEDS_RESET; returns whether the driver runs and must be
    /// told through a config interrupt.
    pub(crate) fn set_needs_reset(&mut self) -> bool {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK == 0 {
            return false;
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        true
    }

    /// A status write: 0 resets, otherwise bits may only be added;
    /// FEATURES_OK is refused for features the device does not offer or
    /// without VERSION_1; DRIVER_OK activates the device.
    pub(crate) fn write_status<D: VirtioDevice>(&mut self, device: &mut D, v: u8) -> StatusChange {
        if v == 0 {
            device.reset();
            self.reset();
            return StatusChange {
                reset: true,
                ..StatusChange::default()
            };
        }
        let old = self.status;
        if v & old != old {
            log::debug!("virtio: status {old:#x} -> {v:#x} clears bits; ignored");
            return StatusChange::default();
        }
        let added = v & !old;
        let mut new = v;
        if added & status::FEATURES_OK != 0 {
            let offered = device.device_features();
            let wanted = self.driver_features;
            if wanted & !offered != 0 || wanted & VIRTIO_F_VERSION_1 == 0 {
                log::debug!("virtio: refused features {wanted:#x} (offered {offered:#x})");
                new &= !status::FEATURES_OK;
            }
        }
        let mut change = StatusChange::default();
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
            match device.activate(self.driver_features, &self.queues) {
                Ok(()) => change.activated = true,
                Err(e) => {
                    log::warn!("virtio: {e}");
                    self.status = new;
                    change.needs_reset = self.set_needs_reset();
                    return change;
                }
            }
        }
        self.status = new;
        change
    }

    /// Checks saved state against `device` before it is used.
    pub(crate) fn check<D: VirtioDevice>(&self, device: &D) -> Result<(), RestoreError> {
        let maxes = device.queue_max_sizes();
        if self.queues.len() != maxes.len() {
            return Err(RestoreError::QueueCount {
                saved: self.queues.len(),
                device: maxes.len(),
            });
        }
        for (index, (q, max)) in self.queues.iter().zip(maxes).enumerate() {
            let configured = q.size != 0 || q.ready;
            if configured && (q.size > *max || !q.size.is_power_of_two()) {
                return Err(RestoreError::QueueSize {
                    index,
                    size: q.size,
                    max: *max,
                });
            }
        }
        let offered = device.device_features();
        if self.driver_features & !offered != 0 {
            return Err(RestoreError::Features {
                saved: self.driver_features,
                offered,
            });
        }
        if self.status & !KNOWN_STATUS != 0 {
            return Err(RestoreError::Bits("status"));
        }
        Ok(())
    }
}
