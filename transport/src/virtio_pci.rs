//! virtio-pci, modern (virtio spec 4.1): a PCI function whose BAR 0 holds
//! the common configuration, ISR, device configuration and notification
//! structures plus the MSI-X table and PBA, announced by vendor-specific
//! capabilities. Interrupts are MSI-X only: the function has no INTx pin,
//! and drivers that cannot use MSI-X are not supported.
//!
//! ```text
//! BAR 0 (64-bit, 32 KiB)
//! 0x0000 common config (0x38 bytes)   0x1000 ISR (1 byte)
//! 0x2000 device config                0x3000 notify: queue q at 0x3000 + 4q
//! 0x4000 MSI-X table                  0x5000 MSI-X PBA
//! ```
//!
//! Register accesses must have the register's natural size (64-bit queue
//! addresses may also be written as two 32-bit halves); anything else
//! reads 0 and is ignored.

use serde::{Deserialize, Serialize};

use crate::common::{status, CommonState, QueueAddress, RestoreError};
use crate::pci::config::{
    BarKind, ConfigSpaceError, PciConfigSpace, PciIdentity, CONFIG_SPACE_SIZE,
};
use crate::pci::msix::{MsiMessage, Msix};
use crate::VirtioDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// BAR 0's kind.
pub const BAR_KIND: BarKind = BarKind::Memory64;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_SIZE: u64 = 0x1000;
/// Offset of the notify structure in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most queues (the MSI-X table, one vector per queue plus one, must fit
/// in its 4 KiB).
pub const MAX_QUEUES: usize = 255;
/// "No vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const VIRTIO_VENDOR: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;
/// ISR bit: a queue interrupt.
const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
const ISR_CONFIG: u8 = 2;

/// What the VMM must do after a guest access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciEffects {
    /// The device was just activated with its queues.
    pub activated: bool,
    /// The device was just reset.
    pub reset: bool,
    /// MSI-X routing may have changed (table, control, vector
    /// assignments): recompute what is delivered where.
    pub interrupts_changed: bool,
    /// Raise the configuration-change vector.
    pub config_interrupt: bool,
    /// A notify write the ioeventfd did not catch: kick this queue.
    pub notify: Option<u16>,
}

/// Errors building the function (VMM bugs or impossible devices).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device has more queues than fit.
    #[error("{0} queues is more than virtio-pci here supports ({MAX_QUEUES})")]
    TooManyQueues(usize),
    /// Configuration space could not be built.
    #[error(transparent)]
    Config(#[from] ConfigSpaceError),
}

/// The transport state to carry in a migration or snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    common: CommonState,
    config_space: Vec<u8>,
    msix: Msix,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
}

/// A virtio device as a PCI function.
pub struct VirtioPciTransport<D: VirtioDevice> {
    device: D,
    config: PciConfigSpace,
    msix: Msix,
    msix_cap: usize,
    pci_cfg_cap: usize,
    common: CommonState,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
}

/// PCI class code for a virtio device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_0000, // network controller
        2 => 0x01_8000, // mass storage, other
        _ => 0xff_0000,
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut cap = vec![CAP_VENDOR, 0, len as u8, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl<D: VirtioDevice> VirtioPciTransport<D> {
    /// The function for `device`, its BAR 0 at `bar_address` (aligned to
    /// [`BAR_SIZE`]).
    pub fn new(device: D, bar_address: u64) -> Result<Self, VirtioPciError> {
        let queues = device.queue_max_sizes().len();
        if queues > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(queues));
        }
        let device_type = device.device_type();
        let mut config = PciConfigSpace::new(PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: 0x1040 + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.add_bar(0, BAR_KIND, BAR_SIZE, bar_address)?;
        let msix = Msix::new(queues as u16 + 1);
        let (body, mask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&body, &mask)?;
        config.add_capability(
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            &[],
        )?;
        config.add_capability(&virtio_cap(CFG_ISR, ISR_OFFSET, 1, &[]), &[])?;
        config.add_capability(
            &virtio_cap(CFG_DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE, &[]),
            &[],
        )?;
        let notify_len = (queues.max(1) as u64) * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and data writable.
        let mut pci_mask = vec![0u8; 20];
        pci_mask[4] = 0xff;
        pci_mask[8..20].fill(0xff);
        let pci_cfg_cap = config.add_capability(&virtio_cap(CFG_PCI, 0, 0, &[0; 4]), &pci_mask)?;
        Ok(VirtioPciTransport {
            common: CommonState::new(queues),
            queue_vectors: vec![NO_VECTOR; queues],
            device,
            config,
            msix,
            msix_cap,
            pci_cfg_cap,
            config_vector: NO_VECTOR,
            isr: 0,
        })
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
        self.common.status
    }

    /// BAR 0's address now.
    pub fn bar_address(&self) -> u64 {
        self.config.bar(0).map_or(0, |(a, _)| a)
    }

    /// The memory BARs decoded now.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        self.config.decoded_bars()
    }

    /// The vector queue `queue` signals ([`NO_VECTOR`] for none).
    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors.get(queue).copied().unwrap_or(NO_VECTOR)
    }

    /// The vector configuration changes signal.
    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    /// Number of MSI-X vectors.
    pub fn vectors(&self) -> u16 {
        self.msix.vectors()
    }

    /// The MSI-X table and control state.
    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Vector `v`'s message, if the table has it.
    pub fn vector_message(&self, v: u16) -> Option<MsiMessage> {
        self.msix.message(v)
    }

    /// Whether vector `v` may be delivered now.
    pub fn vector_deliverable(&self, v: u16) -> bool {
        self.msix.deliverable(v)
    }

    /// Marks vector `v` pending (raised while masked) or not.
    pub fn set_vector_pending(&mut self, v: u16, pending: bool) {
        self.msix.set_pending(v, pending);
    }

    /// The device broke: DEVICE_NEEDS_RESET; returns whether to raise the
    /// configuration vector.
    pub fn set_needs_reset(&mut self) -> bool {
        let tell = self.common.set_needs_reset();
        if tell {
            self.isr |= ISR_CONFIG;
        }
        tell
    }

    /// Reads configuration space.
    pub fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if overlaps(offset, data.len(), &window) {
            let mut value = [0u8; 4];
            if let Some((off, len)) = self.pci_cfg_target() {
                self.read_bar(0, off, &mut value[..len]);
            }
            for (i, b) in value.iter().enumerate() {
                self.config.set_device_byte(window.start + i, *b);
            }
        }
        self.config.read(offset, data);
    }

    /// Writes configuration space.
    pub fn write_config(&mut self, offset: usize, data: &[u8]) -> PciEffects {
        self.config.write(offset, data);
        let mut effects = PciEffects::default();
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if overlaps(offset, data.len(), &control) {
            let mut c = [0u8; 2];
            self.config.read(control.start, &mut c);
            effects.interrupts_changed = self.msix.set_control(u16::from_le_bytes(c));
        }
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if overlaps(offset, data.len(), &window) {
            if let Some((off, len)) = self.pci_cfg_target() {
                let mut value = [0u8; 4];
                self.config.read(window.start, &mut value);
                return self.write_bar(0, off, &value[..len]);
            }
        }
        effects
    }

    /// The BAR 0 access the PCI configuration access capability selects:
    /// `(offset, length)` when it is valid (BAR 0, length 1, 2 or 4,
    /// aligned).
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let mut b = [0u8; 12];
        self.config.read(c + 4, &mut b);
        let bar = b[0];
        let off = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        (bar == 0 && matches!(len, 1 | 2 | 4) && off % len == 0)
            .then_some((u64::from(off), len as usize))
    }

    /// A guest read inside BAR `bar`.
    pub fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o, data),
            ISR_OFFSET if data.len() == 1 => {
                data[0] = self.isr;
                self.isr = 0;
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    /// A guest write inside BAR `bar`.
    pub fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) -> PciEffects {
        let mut effects = PciEffects::default();
        if bar != 0 {
            return effects;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => return self.write_common(o, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE).contains(&o)
                && self.common.status & status::DRIVER != 0 =>
            {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if (q as usize) < self.queue_vectors.len() {
                    effects.notify = Some(q as u16);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                effects.interrupts_changed = !self
                    .msix
                    .write_table(o - MSIX_TABLE_OFFSET, data)
                    .is_empty();
            }
            _ => {}
        }
        effects
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let c = &self.common;
        let q = c.selected_queue();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(c.device_features_sel),
            (0x04, 4) => u64::from(c.device_features_word(&self.device)),
            (0x08, 4) => u64::from(c.driver_features_sel),
            (0x0c, 4) => u64::from(c.driver_features_word()),
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => self.queue_vectors.len() as u64,
            (0x14, 1) => u64::from(c.status),
            (0x15, 1) => u64::from(c.config_generation as u8),
            (0x16, 2) => u64::from(c.queue_sel as u16),
            (0x18, 2) => match q {
                Some(q) if q.size != 0 => u64::from(q.size),
                Some(_) => u64::from(c.queue_max(&self.device)),
                None => 0,
            },
            (0x1a, 2) => u64::from(self.queue_vector(c.queue_sel as usize)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(c.queue_sel as u16)),
            (0x20 | 0x28 | 0x30, 8) | (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) => {
                let Some(q) = q else { return };
                let full = match offset & !0x7 {
                    0x20 => q.desc_table,
                    0x28 => q.avail_ring,
                    _ => q.used_ring,
                };
                if data.len() == 8 {
                    full
                } else if offset & 4 != 0 {
                    full >> 32
                } else {
                    full & 0xffff_ffff
                }
            }
            _ => return,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) -> PciEffects {
        let mut effects = PciEffects::default();
        let mut bytes = [0u8; 8];
        let Some(dst) = bytes.get_mut(..data.len()) else {
            return effects;
        };
        dst.copy_from_slice(data);
        let v = u64::from_le_bytes(bytes);
        let vectors = self.msix.vectors();
        let valid_vector = |v: u16| if v < vectors { v } else { NO_VECTOR };
        let c = &mut self.common;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_sel = v as u32,
            (0x08, 4) => c.driver_features_sel = v as u32,
            (0x0c, 4) => c.write_driver_features(v as u32),
            (0x10, 2) => {
                self.config_vector = valid_vector(v as u16);
                effects.interrupts_changed = true;
            }
            (0x14, 1) => {
                let change = c.write_status(&mut self.device, v as u8);
                if change.reset {
                    self.isr = 0;
                    self.config_vector = NO_VECTOR;
                    self.queue_vectors.fill(NO_VECTOR);
                    effects.interrupts_changed = true;
                }
                if change.needs_reset {
                    self.isr |= ISR_CONFIG;
                }
                effects.activated = change.activated;
                effects.reset = change.reset;
                effects.config_interrupt = change.needs_reset;
            }
            (0x16, 2) => c.queue_sel = v as u32,
            (0x18, 2) => {
                let max = c.queue_max(&self.device);
                c.write_queue_size(max, v as u32);
            }
            (0x1a, 2) => {
                let sel = c.queue_sel as usize;
                if let Some(slot) = self.queue_vectors.get_mut(sel) {
                    *slot = valid_vector(v as u16);
                    effects.interrupts_changed = true;
                }
            }
            (0x1c, 2) => {
                if v == 1 {
                    c.write_queue_ready(true);
                }
            }
            (0x20 | 0x28 | 0x30, 8) => {
                let which = queue_address(offset);
                c.write_queue_address(which, false, v as u32);
                c.write_queue_address(which, true, (v >> 32) as u32);
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) => {
                c.write_queue_address(queue_address(offset), offset & 4 != 0, v as u32);
            }
            _ => log::debug!(
                "virtio-pci: ignored {}-byte write at {offset:#x}",
                data.len()
            ),
        }
        effects
    }

    /// Notes a queue interrupt in the ISR (for drivers polling it).
    pub fn note_queue_interrupt(&mut self) {
        self.isr |= ISR_QUEUE;
    }

    /// The transport state to carry in a migration or snapshot.
    pub fn save(&self) -> VirtioPciState {
        let mut config_space = vec![0u8; CONFIG_SPACE_SIZE];
        self.config.read(0, &mut config_space);
        VirtioPciState {
            common: self.common.clone(),
            config_space,
            msix: self.msix.clone(),
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
            isr: self.isr,
        }
    }

    /// Replaces the transport state with `saved` after checking it; on
    /// error nothing changes. Configuration space is restored through the
    /// write masks, so only what the guest could have written changes.
    pub fn restore(&mut self, saved: VirtioPciState) -> Result<(), RestoreError> {
        saved.common.check(&self.device)?;
        let vectors = self.msix.vectors();
        if saved.msix.vectors() != vectors || saved.queue_vectors.len() != self.queue_vectors.len()
        {
            return Err(RestoreError::Range("MSI-X vector count"));
        }
        let bad = |v: u16| v != NO_VECTOR && v >= vectors;
        if bad(saved.config_vector) || saved.queue_vectors.iter().any(|v| bad(*v)) {
            return Err(RestoreError::Range("MSI-X vector"));
        }
        if saved.config_space.len() != CONFIG_SPACE_SIZE {
            return Err(RestoreError::Range("configuration space"));
        }
        if saved.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(RestoreError::Bits("ISR"));
        }
        self.config.write(0, &saved.config_space);
        self.common = saved.common;
        self.msix = saved.msix;
        self.config_vector = saved.config_vector;
        self.queue_vectors = saved.queue_vectors;
        self.isr = saved.isr;
        Ok(())
    }
}

fn queue_address(offset: u64) -> QueueAddress {
    match offset & !0x7 {
        0x20 => QueueAddress::Desc,
        0x28 => QueueAddress::Avail,
        _ => QueueAddress::Used,
    }
}

fn overlaps(offset: usize, len: usize, range: &std::ops::Range<usize>) -> bool {
    offset < range.end && offset.saturating_add(len) > range.start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::VIRTIO_F_VERSION_1;
    use crate::{ActivateError, QueueConfig};

    #[derive(Default)]
    struct Blk {
        activated: Option<Vec<QueueConfig>>,
    }

    impl VirtioDevice for Blk {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill((offset as u8).wrapping_add(1));
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: u64, queues: &[QueueConfig]) -> Result<(), ActivateError> {
            self.activated = Some(queues.to_vec());
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
        }
    }

    fn t() -> VirtioPciTransport<Blk> {
        VirtioPciTransport::new(Blk::default(), 0x40_0000_0000).unwrap()
    }

    fn w(t: &mut VirtioPciTransport<Blk>, off: u64, v: u64, len: usize) -> PciEffects {
        t.write_bar(0, off, &v.to_le_bytes()[..len])
    }

    fn r(t: &mut VirtioPciTransport<Blk>, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Walks the capability list like a driver: virtio caps by type.
    fn caps(t: &mut VirtioPciTransport<Blk>) -> Vec<(u8, u8, u32, u32)> {
        let mut out = Vec::new();
        let mut p = [0u8; 1];
        t.read_config(0x34, &mut p);
        let mut at = p[0] as usize;
        while at != 0 {
            let mut c = [0u8; 16];
            t.read_config(at, &mut c);
            if c[0] == CAP_VENDOR {
                let off = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
                let len = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
                out.push((c[3], c[4], off, len));
            } else {
                out.push((c[0], 0, 0, 0));
            }
            at = c[1] as usize;
        }
        out
    }

    #[test]
    fn capabilities_describe_bar0() {
        let mut t = t();
        let c = caps(&mut t);
        assert_eq!(c[0].0, 0x11);
        assert!(c.contains(&(CFG_COMMON, 0, 0, 0x38)));
        assert!(c.contains(&(CFG_ISR, 0, 0x1000, 1)));
        assert!(c.contains(&(CFG_NOTIFY, 0, 0x3000, 8)));
        assert!(c.contains(&(CFG_DEVICE, 0, 0x2000, 0x1000)));
        assert!(c.iter().any(|x| x.0 == CFG_PCI));
        let mut id = [0u8; 4];
        t.read_config(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        assert_eq!(t.bar_address(), 0x40_0000_0000);
    }

    #[test]
    fn driver_bring_up_with_msix() {
        let mut t = t();
        w(&mut t, 0x14, 1 | 2, 1);
        w(&mut t, 0x08, 1, 4);
        w(&mut t, 0x0c, 1, 4);
        w(&mut t, 0x08, 0, 4);
        w(&mut t, 0x0c, 1 << 9, 4);
        w(&mut t, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&mut t, 0x14, 1), 0xb);
        assert_eq!(r(&mut t, 0x12, 2), 2);
        assert!(w(&mut t, 0x10, 0, 2).interrupts_changed);
        for q in 0..2u64 {
            w(&mut t, 0x16, q, 2);
            assert_eq!(r(&mut t, 0x18, 2), 256);
            w(&mut t, 0x18, 64, 2);
            w(&mut t, 0x1a, q + 1, 2);
            assert_eq!(r(&mut t, 0x1a, 2), q + 1);
            assert_eq!(r(&mut t, 0x1e, 2), q);
            w(&mut t, 0x20, 0x1000 * (q + 1), 4);
            w(&mut t, 0x24, 0, 4);
            w(&mut t, 0x28, 0x10_0000 + q, 8);
            w(&mut t, 0x30, 0x20_0000, 4);
            w(&mut t, 0x1c, 1, 2);
        }
        // A vector past the table is refused.
        w(&mut t, 0x16, 1, 2);
        w(&mut t, 0x1a, 7, 2);
        assert_eq!(r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
        w(&mut t, 0x1a, 2, 2);
        let e = w(&mut t, 0x14, 0xf, 1);
        assert!(e.activated);
        let qs = t.device().activated.clone().unwrap();
        assert_eq!(qs[1].desc_table, 0x2000);
        assert_eq!(qs[1].avail_ring, 0x10_0001);
        assert_eq!(t.queue_vector(1), 2);
        // MSI-X table entry 2, enable MSI-X through config space.
        w(&mut t, 0x4000 + 32, 0xfee0_0000, 4);
        w(&mut t, 0x4000 + 40, 0x45, 4);
        assert!(w(&mut t, 0x4000 + 44, 0, 4).interrupts_changed);
        assert!(!t.vector_deliverable(2));
        let e = t.write_config(0x42, &0x8000u16.to_le_bytes());
        assert!(e.interrupts_changed);
        assert!(t.vector_deliverable(2));
        assert_eq!(t.vector_message(2).unwrap().data, 0x45);
        // Reset clears the vectors.
        let e = w(&mut t, 0x14, 0, 1);
        assert!(e.reset);
        assert_eq!(t.queue_vector(1), NO_VECTOR);
        assert!(t.device().activated.is_none());
    }

    #[test]
    fn pci_cfg_capability_reaches_bar0() {
        let mut t = t();
        let cap = t.pci_cfg_cap;
        t.write_config(cap + 4, &[0]);
        t.write_config(cap + 8, &0x12u32.to_le_bytes());
        t.write_config(cap + 12, &2u32.to_le_bytes());
        let mut v = [0u8; 2];
        t.read_config(cap + 16, &mut v);
        assert_eq!(u16::from_le_bytes(v), 2, "num_queues through the window");
    }

    #[test]
    fn garbage_bar_and_config_accesses_are_harmless() {
        let mut t = t();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1usize, 2, 4, 8][(x & 3) as usize];
            let off = (x >> 8) % (BAR_SIZE + 16);
            let mut buf = [0u8; 8];
            if x & 4 == 0 {
                w(&mut t, off, x >> 3, len);
                t.write_config((x >> 20) as usize % 300, &(x >> 5).to_le_bytes()[..len]);
            } else {
                t.read_bar(0, off, &mut buf[..len]);
                t.read_config((x >> 20) as usize % 300, &mut buf[..len]);
            }
        }
        let mut id = [0u8; 4];
        t.read_config(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    }

    #[test]
    fn save_restore_round_trips_and_refuses_bad_vectors() {
        let mut t = t();
        w(&mut t, 0x14, 3, 1);
        w(&mut t, 0x10, 1, 2);
        let saved = t.save();
        let mut fresh = VirtioPciTransport::new(Blk::default(), 0x40_0000_0000).unwrap();
        fresh.restore(saved.clone()).unwrap();
        assert_eq!(fresh.save(), saved);
        let mut bad = saved;
        bad.config_vector = 9;
        let before = fresh.save();
        assert!(fresh.restore(bad).is_err());
        assert_eq!(fresh.save(), before);
    }
}
