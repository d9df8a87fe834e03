//! The vfio-user protocol, with migration v2: wire format, transport, a
//! server that drives a [`Device`], and a client for the VMM.
//!
//! The protocol is QEMU's `docs/interop/vfio-user.rst` (the revision with
//! `VFIO_USER_DEVICE_FEATURE`, `VFIO_USER_MIG_DATA_READ/WRITE` and DMA
//! logging); the layouts it borrows are those of `<linux/vfio.h>`.
//!
//! - [`wire`]: every message's layout, encoded and decoded field by field.
//! - [`Server`] + [`Device`]: the device process side. The server keeps the
//!   DMA table ([`Dma`]), the migration state machine and the dirty log; the
//!   device implements regions, interrupts, reset and state save/restore.
//! - [`Client`]: the VMM side, one method per request, serving the
//!   server's DMA requests from [`ClientMemory`].
//!
//! ```no_run
//! # use outboard_vfio_user::*;
//! # fn device(dma: Dma) -> Box<dyn Device + Send> { unimplemented!() }
//! let (vmm, dev) = std::os::unix::net::UnixStream::pair()?;
//! let dma = Dma::new();
//! let mut device = device(dma.clone());
//! std::thread::spawn(move || {
//!     Server::new(dma, ServerConfig::default()).serve(dev, &mut *device)
//! });
//! let mut client = Client::connect(vmm)?;
//! let info = client.device_info()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Not implemented: twin-socket mode (never granted), `REGION_WRITE_MULTI`
//! (refused with `ENOTSUP`), the P2P migration states (refused), pre-copy
//! data (the `PRE_COPY` state is offered but streams nothing).

#![warn(missing_docs)]

mod client;
mod device;
mod dma;
mod endpoint;
mod migration;
mod server;
mod socket;
pub mod wire;

pub use client::{Client, ClientConfig, ClientError, ClientMemory, IrqSetData, RegionIoFds};
pub use device::{Device, DeviceInfo, IoFdArea, IrqAction, IrqData, IrqInfo, IrqSet, RegionInfo};
pub use dma::{Dma, DmaRange};
pub use migration::MigrationState;
pub use server::{Server, ServerConfig, ServerError};
pub use socket::TransportError;
