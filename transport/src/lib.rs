//! Transports: how a device's registers, queues and interrupts reach the
//! guest. Today: the virtio-mmio register model ([`virtio_mmio`]), generic
//! over the device behind it ([`VirtioDevice`]), and the vhost-user frontend
//! ([`vhost_user`]), a [`VirtioDevice`] whose data path is another process;
//! a general PCI bus with MSI-X ([`pci`]) and virtio-pci ([`virtio_pci`]).
//! [`common`] holds the virtio rules both virtio transports share.

pub mod common;
pub mod pci;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod virtio_pci;

/// A virtio device as a transport sees it: identity, features, config
/// space, and activation with the queues the driver set up. The device may
/// live in another process (vhost-user); this trait is the seam.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block, 1 = net, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64;
    /// Reads device config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset`; out-of-range writes are
    /// ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features` and the queues the
    /// driver made ready.
    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), ActivateError>;
    /// Stops the device and forgets the queues (the driver wrote 0 to
    /// status).
    fn reset(&mut self);
}

/// One virtqueue as the driver configured it (split ring addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Entries in the ring, chosen by the driver (<= the device maximum).
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest physical address of the used (device) ring.
    pub used_ring: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("device activation failed: {0}")]
pub struct ActivateError(pub String);
