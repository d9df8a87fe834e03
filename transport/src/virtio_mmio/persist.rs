//! The virtio-mmio transport's own state, saved and restored for
//! migration. Restored state is untrusted: it is checked against the device
//! it is restored for before it replaces anything.

use serde::{Deserialize, Serialize};

use super::{MmioTransport, INT_CONFIG, INT_VRING};
use crate::common::{CommonState, RestoreError};
use crate::VirtioDevice;

/// Everything the transport itself holds between guest accesses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub(super) common: CommonState,
    pub(super) interrupt_status: u32,
    pub(super) sticky_vring_interrupt: bool,
}

impl MmioState {
    pub(super) fn new(queues: usize, sticky_vring_interrupt: bool) -> Self {
        MmioState {
            common: CommonState::new(queues),
            interrupt_status: 0,
            sticky_vring_interrupt,
        }
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport state to carry in a migration or snapshot.
    pub fn save(&self) -> MmioState {
        self.state.clone()
    }

    /// Replaces the transport state with `saved` after checking it against
    /// the device; on error nothing changes. The device's own state (and
    /// its queues' progress) is restored by the device, not here.
    pub fn restore(&mut self, saved: MmioState) -> Result<(), RestoreError> {
        saved.common.check(&self.device)?;
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
    use crate::{ActivateError, QueueConfig};

    struct Dev;
    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[128]
        }
        fn device_features(&self) -> u64 {
            crate::common::VIRTIO_F_VERSION_1
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
        t.state.common.status = 0xf;
        t.state.common.driver_features = crate::common::VIRTIO_F_VERSION_1;
        t.state.common.queues[0] = QueueConfig {
            size: 64,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        t.state.common.config_generation = 3;
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
        s.common.queues.push(QueueConfig::default());
        cases.push(s);
        let mut s = good.clone();
        s.common.queues[0].size = 256;
        cases.push(s);
        let mut s = good.clone();
        s.common.queues[0].size = 48;
        cases.push(s);
        let mut s = good.clone();
        s.common.driver_features |= 1 << 40;
        cases.push(s);
        let mut s = good.clone();
        s.common.status |= 0x20;
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
