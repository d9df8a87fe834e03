//! The virtio-mmio transport's own state, saved and restored for
//! migration. Restored state is untrusted: it is checked against the device
//! it is restored for before it replaces anything.

use serde::{Deserialize, Serialize};

use super::{status, MmioTransport, INT_CONFIG, INT_VRING};
use crate::{QueueConfig, VirtioDevice};

/// Everything the transport itself holds between guest accesses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub(super) status: u8,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) queues: Vec<QueueConfig>,
    pub(super) interrupt_status: u32,
    pub(super) config_generation: u32,
    pub(super) sticky_vring_interrupt: bool,
}

/// Why saved transport state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The saved state has another number of queues than the device.
    #[error("saved virtio-mmio state has {saved} queues, the device has {device}")]
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
    /// Undefined bits in the status or interrupt registers.
    #[error("saved virtio-mmio {0} has undefined bits set")]
    Bits(&'static str),
}

impl MmioState {
    pub(super) fn new(queues: usize, sticky_vring_interrupt: bool) -> Self {
        MmioState {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueConfig::default(); queues],
            interrupt_status: 0,
            config_generation: 0,
            sticky_vring_interrupt,
        }
    }

    pub(super) fn reset(&mut self) {
        *self = MmioState::new(self.queues.len(), self.sticky_vring_interrupt);
    }

    pub(super) fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    pub(super) fn selected_queue_mut(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }
}

const KNOWN_STATUS: u8 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport state to carry in a migration or snapshot.
    pub fn save(&self) -> MmioState {
        self.state.clone()
    }

    /// Replaces the transport state with `saved` after checking it against
    /// the device; on error nothing changes. The device's own state (and
    /// its queues' progress) is restored by the device, not here.
    pub fn restore(&mut self, saved: MmioState) -> Result<(), RestoreError> {
        let maxes = self.device.queue_max_sizes();
        if saved.queues.len() != maxes.len() {
            return Err(RestoreError::QueueCount {
                saved: saved.queues.len(),
                device: maxes.len(),
            });
        }
        for (index, (q, max)) in saved.queues.iter().zip(maxes).enumerate() {
            let configured = q.size != 0 || q.ready;
            if configured && (q.size > *max || !q.size.is_power_of_two()) {
                return Err(RestoreError::QueueSize {
                    index,
                    size: q.size,
                    max: *max,
                });
            }
        }
        let offered = self.device.device_features();
        if saved.driver_features & !offered != 0 {
            return Err(RestoreError::Features {
                saved: saved.driver_features,
                offered,
            });
        }
        if saved.status & !KNOWN_STATUS != 0 {
            return Err(RestoreError::Bits("status"));
        }
        if saved.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(RestoreError::Bits("interrupt status"));
        }
        self.state = saved;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ActivateError;

    struct Dev;
    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[128]
        }
        fn device_features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: u64, _: &[QueueConfig]) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    fn running() -> MmioTransport<Dev> {
        let mut t = MmioTransport::new(Dev, true);
        t.state.status = 0xf;
        t.state.driver_features = super::super::VIRTIO_F_VERSION_1;
        t.state.queues[0] = QueueConfig {
            size: 64,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        t.state.config_generation = 3;
        t
    }

    #[test]
    fn save_then_restore_round_trips_through_json() {
        let saved = running().save();
        let json = serde_json::to_string(&saved).unwrap();
        let mut fresh = MmioTransport::new(Dev, true);
        fresh.restore(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(fresh.save(), saved);
        assert_eq!(fresh.status(), 0xf);
    }

    #[test]
    fn bad_saved_state_is_refused_and_changes_nothing() {
        let good = running().save();
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.queues.push(QueueConfig::default());
        cases.push(s);
        let mut s = good.clone();
        s.queues[0].size = 256;
        cases.push(s);
        let mut s = good.clone();
        s.queues[0].size = 48;
        cases.push(s);
        let mut s = good.clone();
        s.driver_features |= 1 << 40;
        cases.push(s);
        let mut s = good.clone();
        s.status |= 0x20;
        cases.push(s);
        let mut s = good;
        s.interrupt_status = 0x80;
        cases.push(s);
        for bad in cases {
            let mut t = MmioTransport::new(Dev, true);
            let before = t.save();
            assert!(t.restore(bad).is_err());
            assert_eq!(t.save(), before);
        }
    }
}
