//! The disk as a PCI function over vfio-user: [`BlkPciFunction`] behind
//! the vfio-user [`Server`]. Regions: BAR 0 (the virtio-pci registers) and
//! configuration space; interrupts: MSI-X, one eventfd per vector; queue
//! notifications: ioeventfds offered with `GET_REGION_IO_FDS`; DMA: windows
//! the client maps by fd; migration: the function's own blob, and DMA
//! logging from the function's dirty tracking.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use outboard_vfio_user::wire::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IO_FD_TYPE_IOEVENTFD, IRQ_INFO_EVENTFD,
    IRQ_INFO_NORESIZE, PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX,
    PCI_NUM_IRQS, PCI_NUM_REGIONS, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use outboard_vfio_user::{
    Device, DeviceInfo, Dma, DmaRange, IoFdArea, IrqAction, IrqData, IrqInfo, IrqSet, RegionInfo,
    Server, ServerConfig,
};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::{BlkPciFunction, NOTIFY_WRITE_LEN};

/// Size of PCI configuration space.
const CONFIG_SIZE: u64 = 256;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The block PCI function as a vfio-user device.
pub struct BlkVfioDevice {
    function: BlkPciFunction,
    windows: Vec<(u64, u64)>,
    log_page: Option<u64>,
}

impl BlkVfioDevice {
    /// Wraps `function`.
    pub fn new(function: BlkPciFunction) -> Self {
        BlkVfioDevice {
            function,
            windows: Vec::new(),
            log_page: None,
        }
    }
}

impl Device for BlkVfioDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
            num_regions: PCI_NUM_REGIONS,
            num_irqs: PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo {
        let size = match index {
            PCI_BAR0_REGION_INDEX => self.function.bar0_size(),
            PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
            _ => 0,
        };
        RegionInfo {
            flags: if size > 0 {
                REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
            } else {
                0
            },
            size,
            offset: 0,
            sparse_areas: Vec::new(),
        }
    }

    fn region_io_fds(&self, index: u32) -> io::Result<Vec<IoFdArea<'_>>> {
        if index != PCI_BAR0_REGION_INDEX {
            return Ok(Vec::new());
        }
        Ok(self
            .function
            .notify_fds()
            .into_iter()
            .map(|(offset, _len, fd)| IoFdArea {
                offset,
                size: NOTIFY_WRITE_LEN,
                kind: IO_FD_TYPE_IOEVENTFD,
                flags: 0,
                data: 0,
                // SAFETY: the eventfd lives in the function, which outlives
                // the returned areas (they borrow `self`).
                fd: unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) },
            })
            .collect())
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match index {
            PCI_BAR0_REGION_INDEX => self.function.read_bar0(offset, data),
            PCI_CONFIG_REGION_INDEX => {
                let o = usize::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
                self.function.read_config(o, data);
            }
            _ => return Err(errno(libc::EINVAL)),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match index {
            PCI_BAR0_REGION_INDEX => self.function.write_bar0(offset, data),
            PCI_CONFIG_REGION_INDEX => {
                let o = usize::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
                self.function.write_config(o, data);
            }
            _ => return Err(errno(libc::EINVAL)),
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        match index {
            PCI_MSIX_IRQ_INDEX => IrqInfo {
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
                count: u32::from(self.function.msix_vectors()),
            },
            _ => IrqInfo { flags: 0, count: 0 },
        }
    }

    fn set_irqs(&mut self, irqs: IrqSet) -> io::Result<()> {
        if irqs.index != PCI_MSIX_IRQ_INDEX {
            return Err(errno(libc::EINVAL));
        }
        let start = u16::try_from(irqs.start).map_err(|_| errno(libc::EINVAL))?;
        let count = usize::try_from(irqs.count).map_err(|_| errno(libc::EINVAL))?;
        let fds: Vec<Option<EventFd>> = match (irqs.action, irqs.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) if fds.is_empty() => {
                (0..count).map(|_| None).collect()
            }
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => fds
                .into_iter()
                // SAFETY: each descriptor is an owned eventfd from the
                // client; ownership moves into the EventFd.
                .map(|fd| Some(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }))
                .collect(),
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                let n = usize::from(self.function.msix_vectors());
                return self
                    .function
                    .set_msix_eventfds(0, (0..n).map(|_| None).collect())
                    .map_err(other);
            }
            // Masking is the VMM's: it emulates MSI-X.
            (IrqAction::Mask | IrqAction::Unmask, _) => return Ok(()),
            _ => return Err(errno(libc::ENOTSUP)),
        };
        self.function.set_msix_eventfds(start, fds).map_err(other)
    }

    fn dma_map(&mut self, range: DmaRange, fd: Option<(OwnedFd, u64)>) -> io::Result<()> {
        // Guest memory is mapped here, not reached by message.
        let Some((fd, offset)) = fd else {
            log::warn!(
                "DMA window {:#x}+{:#x} without a descriptor: not supported",
                range.iova,
                range.size
            );
            return Err(errno(libc::ENOTSUP));
        };
        self.function
            .dma_map(
                range.iova,
                range.size,
                File::from(fd),
                offset,
                range.writable,
            )
            .map_err(other)?;
        self.windows.push((range.iova, range.size));
        Ok(())
    }

    fn dma_unmap(&mut self, range: DmaRange) {
        if self.windows.contains(&(range.iova, range.size)) {
            if let Err(e) = self.function.dma_unmap(range.iova, range.size) {
                log::warn!("DMA unmap {:#x}+{:#x}: {e}", range.iova, range.size);
            }
            self.windows.retain(|w| *w != (range.iova, range.size));
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        self.function.reset();
        Ok(())
    }

    fn pause(&mut self) -> io::Result<()> {
        self.function.stop();
        Ok(())
    }

    fn resume(&mut self) -> io::Result<()> {
        self.function.run()
    }

    fn save_state(&mut self) -> io::Result<Vec<u8>> {
        self.function.save_state().map_err(other)
    }

    fn restore_state(&mut self, state: &[u8]) -> io::Result<()> {
        self.function.load_state(state).map_err(|e| {
            log::warn!("refused a migration blob: {e}");
            errno(libc::EINVAL)
        })
    }

    fn dma_logging(&mut self, page_size: Option<u64>) -> io::Result<()> {
        match page_size {
            Some(p) => {
                self.function.dirty_logging_start(p).map_err(other)?;
                self.log_page = Some(p);
            }
            None => {
                self.function.dirty_logging_stop();
                self.log_page = None;
            }
        }
        Ok(())
    }

    fn dma_logging_sync(&mut self, dma: &Dma) -> io::Result<()> {
        let Some(page) = self.log_page else {
            return Ok(());
        };
        for &(iova, size) in &self.windows {
            let bitmap = self
                .function
                .dirty_logging_report(iova, size, page)
                .map_err(other)?;
            for (byte_index, byte) in bitmap.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let pageno = (byte_index * 8 + bit) as u64;
                        dma.mark_dirty(iova.saturating_add(pageno.saturating_mul(page)), page);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Serves one client on `stream` until it disconnects.
pub fn serve(device: &mut BlkVfioDevice, stream: UnixStream) -> Result<(), String> {
    let mut server = Server::new(Dma::new(), ServerConfig::default());
    let fd = stream.as_fd().as_raw_fd();
    log::info!("vfio-user client connected (fd {fd})");
    server.serve(stream, device).map_err(|e| e.to_string())
}
