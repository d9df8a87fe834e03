//! Outboard's block device process: a raw image served as a virtio-blk
//! device.
//!
//! - [`engine`]: the transport-neutral block engine ([`Disk`]): open an
//!   image, run a request chain against it.
//! - [`request`]: parsing and validating one request chain (pure logic).
//! - [`config`]: feature bits and the `virtio_blk_config` space.
//! - [`vhost`]: the vhost-user backend driving the engine.
//! - [`pci`]: the disk as a virtio-pci function the process implements
//!   itself (for vfio-user), driving the same engine.
//! - [`daemon`]: the command's plumbing (socket, signals, serving).

#![warn(missing_docs)]

mod hostio;

pub mod config;
pub mod daemon;
pub mod engine;
pub mod logger;
pub mod pci;
pub mod request;
pub mod vfio_user;
pub mod vhost;

#[cfg(test)]
mod tests;

pub use engine::{Completion, Disk, DiskOptions, OpenError};
pub use pci::BlkPciFunction;
pub use vhost::{BlkBackend, QueueOptions};
