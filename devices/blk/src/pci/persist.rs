//! Saving and restoring a [`BlkPciFunction`](super::BlkPciFunction) for
//! migration: the opaque blob the vfio-user server streams.
//!
//! ```text
//! offset  size  field
//! 0       16    format UUID: STATE_UUID (this layout, virtio-blk PCI function)
//! 16      4     version, little-endian: STATE_VERSION
//! 20      ...   payload: UTF-8 JSON of `SavedFunction` (below), to the end
//! ```
//!
//! Version rule: any change a version-1 loader would misread (a field
//! added, removed or reinterpreted) takes a new version; loaders refuse
//! versions they do not know, and a blob of another UUID outright.
//!
//! The payload holds the device shape (checked equal on load: capacity,
//! queues, queue size, read-only, EVENT_IDX offered), the virtio-pci
//! transport state (status, negotiated features, queue configuration,
//! MSI-X table and vector assignments, ISR, configuration space), and per
//! queue set up the device's ring indices (`next_avail`, `next_used`).
//! Nothing is in flight in a saved function: state is only saved while it
//! is stopped, and stopping finishes every chain taken off a ring (see
//! [`super::queue`]); chains still in the avail ring are simply after
//! `next_avail`. EVENT_IDX bookkeeping beyond the indices (the chains
//! added since the last notification check) is not saved: the first
//! batch after a restore decides afresh.
//!
//! Loading is untrusted input: the blob is parsed and checked completely,
//! the transport state in a scratch transport and each queue through
//! virtio-queue's `TryFrom<QueueState>`, before anything changes.

use outboard_transport::common::{status, RestoreError};
use outboard_transport::virtio_pci::{VirtioPciError, VirtioPciState, VirtioPciTransport};
use outboard_transport::{ActivateError, QueueConfig, VirtioDevice};
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::device::{build_queue, has_event_idx};
use crate::config::DeviceShape;

/// Format UUID of the blob (`9b3c6f0e-5d1a-4c7b-a2e4-0f8d6c1b3a57`).
pub const STATE_UUID: [u8; 16] = [
    0x9b, 0x3c, 0x6f, 0x0e, 0x5d, 0x1a, 0x4c, 0x7b, 0xa2, 0xe4, 0x0f, 0x8d, 0x6c, 0x1b, 0x3a, 0x57,
];

/// The payload version this code writes and reads.
pub const STATE_VERSION: u32 = 1;

const HEADER_LEN: usize = 20;

/// Why state could not be saved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaveError {
    /// The function runs: requests may be in flight.
    #[error("cannot save a running function: stop it first")]
    Running,
    /// A queue set up by the driver has no state (its worker died).
    #[error("queue {0} is set up but its state was lost")]
    QueueLost(usize),
    /// Serialization failed (cannot happen for this payload).
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

/// Why a blob was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The function runs.
    #[error("cannot load state into a running function: stop it first")]
    Running,
    /// Shorter than the header.
    #[error("state blob of {0} bytes is shorter than its 20-byte header")]
    Short(usize),
    /// Another format.
    #[error("state blob has format UUID {0}, not a virtio-blk PCI function's")]
    Format(String),
    /// A version this code does not know.
    #[error("state blob version {found} is not supported (only {STATE_VERSION})")]
    Version {
        /// The blob's version.
        found: u32,
    },
    /// The payload does not parse.
    #[error("state blob payload is invalid: {0}")]
    Payload(#[from] serde_json::Error),
    /// The saved device differs from this one.
    #[error("saved device has {what} {saved}, this one {here}")]
    Shape {
        /// Which property.
        what: &'static str,
        /// Saved value.
        saved: u64,
        /// This device's value.
        here: u64,
    },
    /// The transport state is invalid.
    #[error("saved virtio-pci state is invalid: {0}")]
    Transport(#[from] RestoreError),
    /// Another number of queue states than queues.
    #[error("state blob has {saved} queue states, the device has {device} queues")]
    QueueCount {
        /// In the blob.
        saved: usize,
        /// On this device.
        device: usize,
    },
    /// The saved MSI-X table does not fit the vector count.
    #[error("saved MSI-X table does not describe {0} vectors")]
    MsixTable(u16),
    /// The queue states do not match the queues set up.
    #[error("saved queue {index}: {reason}")]
    Queue {
        /// Which queue.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The scratch transport could not be built (cannot happen).
    #[error("cannot check the state: {0}")]
    Scratch(#[from] VirtioPciError),
}

/// The device's shape as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedShape {
    capacity: u64,
    queues: u16,
    queue_size: u16,
    readonly: bool,
    event_idx: bool,
}

impl From<&DeviceShape> for SavedShape {
    fn from(s: &DeviceShape) -> Self {
        SavedShape {
            capacity: s.capacity,
            queues: s.queues,
            queue_size: s.queue_size,
            readonly: s.readonly,
            event_idx: s.event_idx,
        }
    }
}

/// A queue's ring position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedQueue {
    pub(crate) next_avail: u16,
    pub(crate) next_used: u16,
}

/// The payload, version 1.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFunction {
    shape: SavedShape,
    transport: VirtioPciState,
    /// One per queue: `Some` exactly for the queues the device runs
    /// (driver OK, queue ready).
    queues: Vec<Option<SavedQueue>>,
}

/// Encodes the blob.
pub(crate) fn encode(
    shape: &DeviceShape,
    transport: VirtioPciState,
    queues: Vec<Option<SavedQueue>>,
) -> Result<Vec<u8>, SaveError> {
    let payload = SavedFunction {
        shape: shape.into(),
        transport,
        queues,
    };
    let mut blob = Vec::with_capacity(1024);
    blob.extend_from_slice(&STATE_UUID);
    blob.extend_from_slice(&STATE_VERSION.to_le_bytes());
    serde_json::to_writer(&mut blob, &payload).map_err(|e| SaveError::Encode(e.to_string()))?;
    Ok(blob)
}

/// A checked blob, ready to install.
pub(crate) struct Restored {
    pub(crate) transport: VirtioPciState,
    pub(crate) queues: Vec<Option<Queue>>,
}

/// Parses and checks `blob` for a device of `shape`.
pub(crate) fn decode(blob: &[u8], shape: &DeviceShape) -> Result<Restored, LoadError> {
    let (uuid, rest) = blob
        .split_first_chunk::<16>()
        .ok_or(LoadError::Short(blob.len()))?;
    let (version, payload) = rest
        .split_first_chunk::<4>()
        .ok_or(LoadError::Short(blob.len()))?;
    debug_assert_eq!(blob.len() - payload.len(), HEADER_LEN);
    if *uuid != STATE_UUID {
        return Err(LoadError::Format(uuid_string(uuid)));
    }
    let found = u32::from_le_bytes(*version);
    if found != STATE_VERSION {
        return Err(LoadError::Version { found });
    }
    let value: serde_json::Value = serde_json::from_slice(payload)?;
    check_msix_table(&value, shape.queues + 1)?;
    let saved: SavedFunction = serde_json::from_value(value)?;
    check_shape(&saved.shape, shape)?;

    // The transport state is opaque: check it in a scratch transport and
    // read the configuration back through its registers, as a driver
    // would see it.
    let mut scratch = VirtioPciTransport::new(Probe::new(*shape), 0)?;
    scratch.restore(saved.transport.clone())?;
    let features = read_driver_features(&mut scratch);
    let st = scratch.status();
    let active = st & status::DRIVER_OK != 0 && st & status::DEVICE_NEEDS_RESET == 0;
    let n = usize::from(shape.queues);
    if saved.queues.len() != n {
        return Err(LoadError::QueueCount {
            saved: saved.queues.len(),
            device: n,
        });
    }
    let mut queues = Vec::with_capacity(n);
    for (index, q) in saved.queues.iter().enumerate() {
        let cfg = read_queue_config(&mut scratch, index as u16);
        let err = |reason: String| LoadError::Queue { index, reason };
        match (active && cfg.ready, q) {
            (false, None) => queues.push(None),
            (false, Some(_)) => return Err(err("has state but is not running".into())),
            (true, None) => return Err(err("is running but has no state".into())),
            (true, Some(q)) => {
                let queue = build_queue(
                    &cfg,
                    shape.queue_size,
                    has_event_idx(features),
                    q.next_avail,
                    q.next_used,
                )
                .map_err(|e| err(e.to_string()))?;
                queues.push(Some(queue));
            }
        }
    }
    Ok(Restored {
        transport: saved.transport,
        queues,
    })
}

/// The transport checks the MSI-X vector count of saved state but not
/// that the table and control word agree with it; check that here.
fn check_msix_table(payload: &serde_json::Value, vectors: u16) -> Result<(), LoadError> {
    let msix = &payload["transport"]["msix"];
    let table_ok = msix["table"]
        .as_array()
        .is_some_and(|t| t.len() == usize::from(vectors) * 16);
    let control_ok = msix["control"]
        .as_u64()
        .is_some_and(|c| c & 0x7ff == u64::from(vectors) - 1);
    if table_ok && control_ok {
        Ok(())
    } else {
        Err(LoadError::MsixTable(vectors))
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn check_shape(saved: &SavedShape, here: &DeviceShape) -> Result<(), LoadError> {
    let here = SavedShape::from(here);
    let fields: [(&'static str, u64, u64); 5] = [
        ("capacity (sectors)", saved.capacity, here.capacity),
        ("queue count", saved.queues.into(), here.queues.into()),
        (
            "queue size",
            saved.queue_size.into(),
            here.queue_size.into(),
        ),
        ("read-only", saved.readonly.into(), here.readonly.into()),
        (
            "EVENT_IDX offered",
            saved.event_idx.into(),
            here.event_idx.into(),
        ),
    ];
    for (what, saved, here) in fields {
        if saved != here {
            return Err(LoadError::Shape { what, saved, here });
        }
    }
    Ok(())
}

fn write_reg(t: &mut VirtioPciTransport<Probe>, offset: u64, value: u64, len: usize) {
    t.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

fn read_reg(t: &mut VirtioPciTransport<Probe>, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.read_bar(0, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn read_driver_features(t: &mut VirtioPciTransport<Probe>) -> u64 {
    write_reg(t, 0x08, 0, 4);
    let low = read_reg(t, 0x0c, 4);
    write_reg(t, 0x08, 1, 4);
    low | read_reg(t, 0x0c, 4) << 32
}

fn read_queue_config(t: &mut VirtioPciTransport<Probe>, queue: u16) -> QueueConfig {
    write_reg(t, 0x16, queue.into(), 2);
    QueueConfig {
        size: read_reg(t, 0x18, 2) as u16,
        ready: read_reg(t, 0x1c, 2) == 1,
        desc_table: read_reg(t, 0x20, 8),
        avail_ring: read_reg(t, 0x28, 8),
        used_ring: read_reg(t, 0x30, 8),
    }
}

/// A device with the shape's identity and nothing else, for checking
/// saved transport state.
struct Probe {
    shape: DeviceShape,
    sizes: Vec<u16>,
}

impl Probe {
    fn new(shape: DeviceShape) -> Self {
        Probe {
            shape,
            sizes: vec![shape.queue_size; usize::from(shape.queues)],
        }
    }
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        self.shape.features()
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: u64, _: &[QueueConfig]) -> Result<(), ActivateError> {
        Err(ActivateError("probe".into()))
    }
    fn reset(&mut self) {}
}
