//! virtio-mmio, virtio 1.x "modern" register layout (virtio spec 4.2.2),
//! as a register model: the VMM's MMIO bus calls [`MmioTransport::read`]
//! and [`MmioTransport::write`] with the offset inside the device's window.
//!
//! ```text
//! 0x000 MagicValue "virt"   0x004 Version = 2   0x008 DeviceID  0x00c VendorID
//! 0x010 DeviceFeatures      0x014 DeviceFeaturesSel
//! 0x020 DriverFeatures      0x024 DriverFeaturesSel
//! 0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum  0x044 QueueReady
//! 0x050 QueueNotify (an ioeventfd in the VMM; a write here is a no-op)
//! 0x060 InterruptStatus     0x064 InterruptACK       0x070 Status
//! 0x080/0x084 QueueDesc  0x090/0x094 QueueDriver  0x0a0/0x0a4 QueueDevice
//! 0x0ac SHMSel  0x0b0/0x0b4 SHMLen  0x0b8/0x0bc SHMBase (no regions: len = -1)
//! 0x0fc ConfigGeneration    0x100.. device config space
//! ```
//!
//! Everything the guest writes is checked: registers are 32-bit aligned
//! words (other accesses read 0 and are ignored), queue setup is accepted
//! only before the queue is ready and the driver is running, a queue size
//! must be a power of two no larger than the device's maximum, features
//! only while they are being negotiated, and the status byte only grows
//! (0 resets). A device that fails to start sets DEVICE_NEEDS_RESET. The
//! rules themselves live in [`crate::common`], shared with virtio-pci.

mod persist;

pub use persist::MmioState;

use crate::common::{status, QueueAddress};
use crate::{QueueConfig, VirtioDevice};

/// Size of a virtio-mmio device window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// The `virtio_mmio.device=` size string for the window.
pub const MMIO_WINDOW_CMDLINE_SIZE: &str = "4K";

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION_MODERN: u32 = 2;
/// Outboard's vendor id, ASCII "OBRD" (QEMU's is "QEMU", 0x554d4551).
const VENDOR_ID: u32 = 0x4f42_5244;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// InterruptStatus bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// What the VMM must do after a guest access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Raise the device's interrupt line.
    pub interrupt: bool,
    /// The device was just activated with its queues.
    pub activated: bool,
    /// The device was just reset.
    pub reset: bool,
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    state: MmioState,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport in reset state for `device`.
    ///
    /// `sticky_vring_interrupt`: the device signals the guest without the
    /// VMM seeing it (a vhost-user backend writing the irqfd itself), so
    /// the VMM cannot set INT_VRING; with this set, InterruptStatus always
    /// shows INT_VRING once the driver runs and the driver polls every
    /// queue on each interrupt.
    pub fn new(device: D, sticky_vring_interrupt: bool) -> Self {
        let queues = device.queue_max_sizes().len();
        MmioTransport {
            device,
            state: MmioState::new(queues, sticky_vring_interrupt),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The current status byte.
    pub fn status(&self) -> u8 {
        self.state.common.status
    }

    /// The queues as the driver configured them.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.state.common.queues
    }

    /// Marks used buffers on a queue; returns whether to raise the line.
    pub fn signal_used_queue(&mut self) -> bool {
        self.state.interrupt_status |= INT_VRING;
        true
    }

    /// Announces a config change; returns whether to raise the line.
    pub fn signal_config_change(&mut self) -> bool {
        let c = &mut self.state.common;
        c.config_generation = c.config_generation.wrapping_add(1);
        self.state.interrupt_status |= INT_CONFIG;
        true
    }

    /// The device broke (its process died): set DEVICE_NEEDS_RESET and tell
    /// the driver. Returns whether to raise the line.
    pub fn set_needs_reset(&mut self) -> bool {
        let tell = self.state.common.set_needs_reset();
        if tell {
            self.state.interrupt_status |= INT_CONFIG;
        }
        tell
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: ignored {}-byte read at {offset:#x}",
                data.len()
            );
            return;
        }
        let s = &self.state;
        let c = &s.common;
        let value: u32 = match offset {
            0x000 => MAGIC_VALUE,
            0x004 => VERSION_MODERN,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => c.device_features_word(&self.device),
            0x034 => u32::from(c.queue_max(&self.device)),
            0x038 => c.selected_queue().map_or(0, |q| u32::from(q.size)),
            0x044 => c.selected_queue().map_or(0, |q| u32::from(q.ready)),
            0x060 => {
                if s.sticky_vring_interrupt && c.status & status::DRIVER_OK != 0 {
                    s.interrupt_status | INT_VRING
                } else {
                    s.interrupt_status
                }
            }
            0x070 => u32::from(c.status),
            0x080 => c.selected_queue().map_or(0, |q| q.desc_table as u32),
            0x084 => c
                .selected_queue()
                .map_or(0, |q| (q.desc_table >> 32) as u32),
            0x090 => c.selected_queue().map_or(0, |q| q.avail_ring as u32),
            0x094 => c
                .selected_queue()
                .map_or(0, |q| (q.avail_ring >> 32) as u32),
            0x0a0 => c.selected_queue().map_or(0, |q| q.used_ring as u32),
            0x0a4 => c.selected_queue().map_or(0, |q| (q.used_ring >> 32) as u32),
            // No shared memory regions: length -1.
            0x0b0 | 0x0b4 => u32::MAX,
            0x0fc => c.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effects {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.state.common.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return Effects::default();
        }
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return Effects::default();
        };
        if offset % 4 != 0 {
            return Effects::default();
        }
        let v = u32::from_le_bytes(word);
        let c = &mut self.state.common;
        match offset {
            0x014 => c.device_features_sel = v,
            0x020 => c.write_driver_features(v),
            0x024 => c.driver_features_sel = v,
            0x030 => c.queue_sel = v,
            0x038 => {
                let max = c.queue_max(&self.device);
                c.write_queue_size(max, v);
            }
            0x044 => c.write_queue_ready(v == 1),
            0x050 => {} // handled by an ioeventfd; nothing to do here
            0x064 => self.state.interrupt_status &= !v,
            0x070 => {
                let change = c.write_status(&mut self.device, v as u8);
                if change.reset {
                    self.state.interrupt_status = 0;
                }
                let interrupt = change.needs_reset;
                if interrupt {
                    self.state.interrupt_status |= INT_CONFIG;
                }
                return Effects {
                    interrupt,
                    activated: change.activated,
                    reset: change.reset,
                };
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let which = match offset & !0x7 {
                    0x080 => QueueAddress::Desc,
                    0x090 => QueueAddress::Avail,
                    _ => QueueAddress::Used,
                };
                c.write_queue_address(which, offset & 0x4 != 0, v);
            }
            _ => log::debug!("virtio-mmio: ignored write {v:#x} at {offset:#x}"),
        }
        Effects::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::VIRTIO_F_VERSION_1;
    use crate::ActivateError;

    #[derive(Default)]
    struct FakeBlk {
        config: [u8; 8],
        activated: Option<(u64, Vec<QueueConfig>)>,
        resets: u32,
        fail_activation: bool,
    }

    impl VirtioDevice for FakeBlk {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 128]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError("backend gone".into()));
            }
            self.activated = Some((features, queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    fn rd(t: &mut MmioTransport<FakeBlk>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<FakeBlk>, off: u64, v: u32) -> Effects {
        t.write(off, &v.to_le_bytes())
    }

    /// The Linux virtio_mmio driver's sequence, up to DRIVER_OK.
    fn bring_up(t: &mut MmioTransport<FakeBlk>, features: u64) {
        wr(t, 0x070, 0);
        wr(t, 0x070, u32::from(status::ACKNOWLEDGE));
        wr(t, 0x070, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        wr(t, 0x024, 0);
        wr(t, 0x020, features as u32);
        wr(t, 0x024, 1);
        wr(t, 0x020, (features >> 32) as u32);
        wr(
            t,
            0x070,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        for (q, base) in [(0u32, 0x10_0000u64), (1, 0x20_0000)] {
            wr(t, 0x030, q);
            wr(t, 0x038, 64);
            wr(t, 0x080, base as u32);
            wr(t, 0x084, 0);
            wr(t, 0x090, (base + 0x400) as u32);
            wr(t, 0x0a0, (base + 0x800) as u32);
            wr(t, 0x0a4, 1);
            wr(t, 0x044, 1);
        }
    }

    const ALL_OK: u32 =
        (status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK) as u32;

    #[test]
    fn identity_registers() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        assert_eq!(rd(&mut t, 0x000), 0x7472_6976);
        assert_eq!(rd(&mut t, 0x004), 2);
        assert_eq!(rd(&mut t, 0x008), 2);
        wr(&mut t, 0x014, 1);
        assert_eq!(rd(&mut t, 0x010), 1);
        wr(&mut t, 0x030, 1);
        assert_eq!(rd(&mut t, 0x034), 128);
        wr(&mut t, 0x030, 7);
        assert_eq!(rd(&mut t, 0x034), 0);
        assert_eq!(rd(&mut t, 0x0b0), u32::MAX);
    }

    #[test]
    fn linux_bring_up_activates_with_the_queues() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        bring_up(&mut t, VIRTIO_F_VERSION_1 | 1 << 9);
        let e = wr(&mut t, 0x070, ALL_OK);
        assert!(e.activated);
        assert_eq!(rd(&mut t, 0x070), ALL_OK);
        let (features, queues) = t.device().activated.clone().unwrap();
        assert_eq!(features, VIRTIO_F_VERSION_1 | 1 << 9);
        assert_eq!(queues[1].size, 64);
        assert_eq!(queues[1].desc_table, 0x20_0000);
        assert_eq!(queues[1].avail_ring, 0x20_0400);
        assert_eq!(queues[1].used_ring, 0x1_0020_0800);
        assert!(queues.iter().all(|q| q.ready));
    }

    #[test]
    fn features_the_device_lacks_or_legacy_are_refused() {
        for bad in [1u64 << 9, VIRTIO_F_VERSION_1 | 1 << 5] {
            let mut t = MmioTransport::new(FakeBlk::default(), false);
            bring_up(&mut t, bad);
            assert_eq!(rd(&mut t, 0x070) & u32::from(status::FEATURES_OK), 0);
            assert!(!wr(&mut t, 0x070, ALL_OK).activated);
            assert!(t.device().activated.is_none());
        }
    }

    #[test]
    fn queue_setup_is_checked() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        // Before FEATURES_OK nothing sticks.
        wr(&mut t, 0x030, 0);
        wr(&mut t, 0x038, 64);
        assert_eq!(rd(&mut t, 0x038), 0);
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, 0x030, 0);
        // Ready queues cannot be resized or moved.
        wr(&mut t, 0x038, 32);
        wr(&mut t, 0x080, 0xdead_0000);
        assert_eq!(rd(&mut t, 0x038), 64);
        assert_eq!(rd(&mut t, 0x080), 0x10_0000);
        wr(&mut t, 0x044, 0);
        for bad in [0u32, 100, 512, 0xffff_ffff] {
            wr(&mut t, 0x038, bad);
            assert_eq!(rd(&mut t, 0x038), 64, "size {bad}");
        }
        wr(&mut t, 0x038, 256);
        assert_eq!(rd(&mut t, 0x038), 256);
        // A queue that does not exist.
        wr(&mut t, 0x030, 9);
        wr(&mut t, 0x038, 16);
        wr(&mut t, 0x044, 1);
        assert_eq!(rd(&mut t, 0x044), 0);
    }

    #[test]
    fn status_only_grows_and_zero_resets() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, 0x070, ALL_OK);
        wr(&mut t, 0x070, u32::from(status::ACKNOWLEDGE));
        assert_eq!(rd(&mut t, 0x070), ALL_OK);
        let resets = t.device().resets;
        let e = wr(&mut t, 0x070, 0);
        assert!(e.reset);
        assert_eq!(t.device().resets, resets + 1);
        assert!(t.device().activated.is_none());
        assert_eq!(rd(&mut t, 0x070), 0);
        wr(&mut t, 0x030, 0);
        assert_eq!(rd(&mut t, 0x038), 0);
        assert_eq!(rd(&mut t, 0x080), 0);
    }

    #[test]
    fn failed_activation_needs_reset() {
        let mut t = MmioTransport::new(
            FakeBlk {
                fail_activation: true,
                ..FakeBlk::default()
            },
            false,
        );
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        let e = wr(&mut t, 0x070, ALL_OK);
        assert!(!e.activated);
        assert!(e.interrupt);
        assert_ne!(rd(&mut t, 0x070) & u32::from(status::DEVICE_NEEDS_RESET), 0);
        assert_eq!(rd(&mut t, 0x060), INT_CONFIG);
        assert_eq!(rd(&mut t, 0x0fc), 1);
    }

    #[test]
    fn interrupts_ack_and_sticky_vring() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        assert!(t.signal_used_queue());
        assert_eq!(rd(&mut t, 0x060), INT_VRING);
        wr(&mut t, 0x064, INT_VRING);
        assert_eq!(rd(&mut t, 0x060), 0);

        let mut t = MmioTransport::new(FakeBlk::default(), true);
        assert_eq!(rd(&mut t, 0x060), 0);
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, 0x070, ALL_OK);
        wr(&mut t, 0x064, INT_VRING);
        assert_eq!(rd(&mut t, 0x060), INT_VRING);
    }

    #[test]
    fn config_space_any_size_and_odd_accesses_are_harmless() {
        let mut t = MmioTransport::new(FakeBlk::default(), false);
        wr(
            &mut t,
            0x070,
            u32::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        t.write(0x102, &[0xaa, 0xbb]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 0xaa, 0xbb, 0, 0, 0, 0]);
        let mut far = [0xffu8; 4];
        t.read(0xffc, &mut far);
        assert_eq!(far, [0; 4]);
        // Every offset, every size, read and write: nothing panics.
        for off in 0..0x110u64 {
            for len in [1usize, 2, 3, 4, 8] {
                let mut d = vec![0xa5u8; len];
                t.read(off, &mut d);
                t.write(off, &d);
            }
        }
        t.read(u64::MAX - 3, &mut [0u8; 4]);
        t.write(u64::MAX - 3, &[1, 2, 3, 4]);
    }
}
