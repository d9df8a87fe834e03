//! A PCI function served by a vfio-user device process.
//!
//! The device owns its configuration space and BARs; the VMM keeps what a
//! VMM must own:
//! - **BAR placement**: the BAR registers are emulated here (sizes from
//!   `GET_REGION_INFO`, addresses from the VMM's allocator or the guest);
//!   the device never sees them.
//! - **MSI-X**: the capability's control word, the vector table and the PBA
//!   are emulated here; the device gets one eventfd per vector at set-up
//!   (`SET_IRQS`) and signals it, and each eventfd is an irqfd on its
//!   vector's GSI while the vector is deliverable ([`MsixIrqs`]).
//! - **BAR accesses**: areas the device offers to mmap are mapped into the
//!   guest as KVM memslots (no exits); `GET_REGION_IO_FDS` areas become
//!   ioeventfds; everything else is forwarded as `REGION_READ/WRITE`.
//! - **DMA**: all guest RAM is `DMA_MAP`ped by fd (the memfd); the server's
//!   `DMA_READ/WRITE` requests are served from guest memory too.
//!
//! Everything else in configuration space is forwarded.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use outboard_transport::pci::config::{BarKind, PciConfigSpace, PciIdentity, NUM_BARS};
use outboard_transport::pci::msix::{Msix, CAP_ID as MSIX_CAP_ID};
use outboard_transport::pci::PciFunction;
use outboard_vfio_user::wire::{
    DEVICE_FLAGS_PCI, KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_PIO,
    PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX, REGION_INFO_FLAG_MMAP,
};
use outboard_vfio_user::{Client, ClientMemory, DmaRange, IrqAction, IrqSetData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{MsixIrqs, Notifier};
use crate::irq::IrqRouting;
use crate::memory::{GuestMemory, GuestRam};

/// BAR registers in configuration space.
const BAR_REGS: std::ops::Range<usize> = 0x10..0x28;
/// The expansion ROM register (no ROM is offered).
const ROM_REG: std::ops::Range<usize> = 0x30..0x34;

/// Errors setting a function up.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    /// A request to the device failed.
    #[error("vfio-user {what}: {source}")]
    Client {
        /// Which request.
        what: &'static str,
        /// Why.
        source: outboard_vfio_user::ClientError,
    },
    /// The device is not something the VMM can put on its bus.
    #[error("the device {0}")]
    Unsupported(String),
    /// A host call failed.
    #[error("{what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn client_err(what: &'static str) -> impl FnOnce(outboard_vfio_user::ClientError) -> VfioUserError {
    move |source| VfioUserError::Client { what, source }
}

/// Guest memory for the server's `DMA_READ` / `DMA_WRITE`.
struct GuestDma(GuestMemory);

impl ClientMemory for GuestDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
    fn write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// One area of a BAR the device lets the VMM map.
struct MappedArea {
    /// Offset in the BAR.
    offset: u64,
    size: u64,
    host: *mut libc::c_void,
    slot: u32,
    /// Guest address it is registered at, if any.
    at: Option<u64>,
}

// SAFETY: `host` is a MAP_SHARED mapping owned by this struct; it is only
// handed to KVM, never dereferenced here.
unsafe impl Send for MappedArea {}

impl Drop for MappedArea {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` are exactly the mapping made in `map_area`
        // (the KVM memslot using it is removed before the area drops).
        unsafe { libc::munmap(self.host, self.size as usize) };
    }
}

struct IoFd {
    bar: usize,
    offset: u64,
    size: u64,
    datamatch: Option<u64>,
    fd: EventFd,
}

/// The MSI-X capability as the device declared it, emulated here.
struct MsixEmulation {
    cap: usize,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    msix: Msix,
}

/// Memslot numbers for mapped BAR areas (RAM takes the first few).
static NEXT_SLOT: AtomicU32 = AtomicU32::new(32);

/// A vfio-user device on the PCI bus.
pub struct VfioUserFunction {
    name: String,
    client: Client,
    vm: Arc<VmFd>,
    /// BAR registers and the command register, emulated.
    local: PciConfigSpace,
    bar_sizes: [u64; NUM_BARS],
    msix: Option<MsixEmulation>,
    vector_fds: Vec<EventFd>,
    irqs: MsixIrqs,
    areas: Vec<(usize, MappedArea)>,
    io_fds: Vec<IoFd>,
    /// Where each BAR's ioeventfds are registered now.
    io_at: [Option<u64>; NUM_BARS],
    broken: bool,
}

impl VfioUserFunction {
    /// Sets the device up: identity, BARs placed by `place_bar`, MSI-X,
    /// DMA mappings of all guest RAM, interrupts.
    pub fn new(
        name: &str,
        mut client: Client,
        vm: Arc<VmFd>,
        ram: &GuestRam,
        routing: Arc<Mutex<IrqRouting>>,
        mut place_bar: impl FnMut(BarKind, u64) -> Option<u64>,
        allocate_gsis: impl FnOnce(u32) -> Option<Vec<u32>>,
    ) -> Result<Self, VfioUserError> {
        let info = client
            .device_info()
            .map_err(client_err("DEVICE_GET_INFO"))?;
        if info.flags & DEVICE_FLAGS_PCI == 0 || info.num_regions <= PCI_CONFIG_REGION_INDEX {
            return Err(VfioUserError::Unsupported("is not a PCI device".into()));
        }
        let mut config = [0u8; 256];
        client
            .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut config)
            .map_err(client_err("REGION_READ (config space)"))?;
        let word =
            |o: usize| u32::from_le_bytes([config[o], config[o + 1], config[o + 2], config[o + 3]]);
        let id = word(0);
        let class = word(8);
        let sub = word(0x2c);
        let mut local = PciConfigSpace::new(PciIdentity {
            vendor: id as u16,
            device: (id >> 16) as u16,
            revision: class as u8,
            class: class >> 8,
            subsystem_vendor: sub as u16,
            subsystem: (sub >> 16) as u16,
        });
        let mut bar_sizes = [0u64; NUM_BARS];
        let mut skip_next = false;
        #[allow(clippy::needless_range_loop)] // BAR numbers, not just indexes
        for bar in 0..NUM_BARS {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            let (region, _) = client
                .region_info(bar as u32)
                .map_err(client_err("DEVICE_GET_REGION_INFO"))?;
            if region.size == 0 {
                continue;
            }
            let reg = word(0x10 + bar * 4);
            if reg & 1 != 0 {
                log::warn!("{name}: BAR {bar} is an I/O BAR; not supported, left out");
                continue;
            }
            let kind = if reg & 0b110 == 0b100 && bar + 1 < NUM_BARS {
                skip_next = true;
                BarKind::Memory64
            } else {
                BarKind::Memory32
            };
            let size = region
                .size
                .max(16)
                .checked_next_power_of_two()
                .filter(|s| kind == BarKind::Memory64 || *s <= 1 << 31)
                .ok_or_else(|| {
                    VfioUserError::Unsupported(format!(
                        "BAR {bar} of {:#x} bytes is too large",
                        region.size
                    ))
                })?;
            let addr = place_bar(kind, size).ok_or_else(|| {
                VfioUserError::Unsupported(format!("BAR {bar} ({size:#x} bytes) does not fit"))
            })?;
            local
                .add_bar(bar, kind, size, addr)
                .map_err(|e| VfioUserError::Unsupported(e.to_string()))?;
            bar_sizes[bar] = size;
        }
        let msix = find_msix(&config)?;
        let vectors = match &msix {
            Some(m) => m.msix.vectors(),
            None => 0,
        };
        let mut vector_fds = Vec::new();
        for _ in 0..vectors {
            vector_fds.push(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                    VfioUserError::Host {
                        what: "cannot create an eventfd",
                        source,
                    }
                })?,
            );
        }
        if vectors > 0 {
            let irq = client
                .irq_info(PCI_MSIX_IRQ_INDEX)
                .map_err(client_err("DEVICE_GET_IRQ_INFO (MSI-X)"))?;
            if irq.count < u32::from(vectors) {
                return Err(VfioUserError::Unsupported(format!(
                    "has {} MSI-X interrupts but its capability says {vectors}",
                    irq.count
                )));
            }
            let fds: Vec<_> = vector_fds
                .iter()
                // SAFETY: the EventFds outlive the borrowed descriptors,
                // which only live for this call.
                .map(|e| unsafe { std::os::fd::BorrowedFd::borrow_raw(e.as_raw_fd()) })
                .collect();
            client
                .set_irqs(
                    PCI_MSIX_IRQ_INDEX,
                    0,
                    u32::from(vectors),
                    IrqAction::Trigger,
                    IrqSetData::Eventfds(&fds),
                )
                .map_err(client_err("DEVICE_SET_IRQS (MSI-X)"))?;
        }
        let gsis = allocate_gsis(u32::from(vectors)).ok_or_else(|| {
            VfioUserError::Unsupported("needs more interrupt routes than are left".into())
        })?;
        for r in &ram.ranges {
            let range = DmaRange {
                iova: r.start,
                size: r.size,
                readable: true,
                writable: true,
            };
            client
                .dma_map(range, Some((ram.memfd.as_fd(), r.file_offset)))
                .map_err(client_err("DMA_MAP"))?;
        }
        let mut f = VfioUserFunction {
            irqs: MsixIrqs::new(name, vm.clone(), routing, gsis),
            name: name.to_string(),
            client,
            vm,
            local,
            bar_sizes,
            msix,
            vector_fds,
            areas: Vec::new(),
            io_fds: Vec::new(),
            io_at: [None; NUM_BARS],
            broken: false,
        };
        f.set_up_bar_access()?;
        Ok(f)
    }

    /// Guest memory for the client's DMA service.
    pub fn dma_memory(ram: &GuestRam) -> Arc<dyn ClientMemory> {
        Arc::new(GuestDma(ram.memory.clone()))
    }

    /// Every BAR as placed: `(index, address, size)`, decoded or not.
    pub fn decoded_bars_all(&self) -> Vec<(usize, u64, u64)> {
        (0..NUM_BARS)
            .filter_map(|i| self.local.bar(i).map(|(a, s)| (i, a, s)))
            .collect()
    }

    /// The client connection's descriptor (for the monitor).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.client.as_fd().as_raw_fd()
    }

    fn set_up_bar_access(&mut self) -> Result<(), VfioUserError> {
        for bar in 0..NUM_BARS {
            if self.bar_sizes[bar] == 0 {
                continue;
            }
            let (region, fd) = self
                .client
                .region_info(bar as u32)
                .map_err(client_err("DEVICE_GET_REGION_INFO"))?;
            if region.flags & REGION_INFO_FLAG_MMAP != 0 {
                if let Some(fd) = fd {
                    let areas = if region.sparse_areas.is_empty() {
                        vec![(0, region.size)]
                    } else {
                        region
                            .sparse_areas
                            .iter()
                            .map(|a| (a.offset, a.size))
                            .collect()
                    };
                    for (offset, size) in areas {
                        if self.covers_msix(bar, offset, size) {
                            log::warn!(
                                "{}: BAR {bar} area {offset:#x}+{size:#x} covers the MSI-X table or PBA; accesses are forwarded",
                                self.name
                            );
                            continue;
                        }
                        match map_area(&fd, region.offset, offset, size) {
                            Ok(area) => self.areas.push((bar, area)),
                            Err(e) => log::warn!(
                                "{}: BAR {bar} area {offset:#x}+{size:#x} not mapped ({e}); accesses are forwarded",
                                self.name
                            ),
                        }
                    }
                }
            }
            match self.client.region_io_fds(bar as u32) {
                Ok(io) => {
                    let mut fds: Vec<Option<OwnedFd>> = io.fds.into_iter().map(Some).collect();
                    for s in io.sub_regions {
                        let inside = s
                            .offset
                            .checked_add(s.size)
                            .is_some_and(|end| end <= region.size);
                        let size_ok = matches!(s.size, 1 | 2 | 4 | 8)
                            || (s.size == 0 && s.flags & KVM_IOEVENTFD_FLAG_DATAMATCH == 0);
                        if s.flags & KVM_IOEVENTFD_FLAG_PIO != 0 || !inside || !size_ok {
                            log::warn!(
                                "{}: BAR {bar}: ignored io fd area {:#x}+{:#x} (flags {:#x})",
                                self.name,
                                s.offset,
                                s.size,
                                s.flags
                            );
                            continue;
                        }
                        let Some(fd) = fds.get_mut(s.fd_index as usize).and_then(Option::take)
                        else {
                            continue;
                        };
                        // SAFETY: `fd` is an owned descriptor received from
                        // the device; ownership moves into the EventFd.
                        let fd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
                        self.io_fds.push(IoFd {
                            bar,
                            offset: s.offset,
                            size: s.size,
                            datamatch: (s.flags & KVM_IOEVENTFD_FLAG_DATAMATCH != 0)
                                .then_some(s.data),
                            fd,
                        });
                    }
                }
                Err(e) => log::debug!("{}: no io fds for BAR {bar}: {e}", self.name),
            }
        }
        Ok(())
    }

    /// Moves memslots and ioeventfds to where the BARs decode now.
    fn update_bar_mappings(&mut self) {
        let decoded: Vec<(usize, u64, u64)> = self.local.decoded_bars();
        let addr_of = |bar: usize| {
            decoded
                .iter()
                .find(|(b, _, _)| *b == bar)
                .map(|(_, a, _)| *a)
        };
        for (bar, area) in &mut self.areas {
            let want = addr_of(*bar).map(|a| a + area.offset);
            if want == area.at {
                continue;
            }
            if area.at.is_some() {
                if !set_slot(&self.vm, area.slot, 0, 0, area.host) {
                    // Still in KVM: keep it recorded (and the mapping).
                    continue;
                }
                area.at = None;
            }
            if let Some(gpa) = want {
                if set_slot(&self.vm, area.slot, gpa, area.size, area.host) {
                    area.at = Some(gpa);
                }
            }
        }
        for bar in 0..NUM_BARS {
            let want = addr_of(bar);
            if want == self.io_at[bar] {
                continue;
            }
            for io in self.io_fds.iter().filter(|i| i.bar == bar) {
                if let Some(old) = self.io_at[bar] {
                    let _ = ioevent(&self.vm, io, old, false);
                }
                if let Some(new) = want {
                    if let Err(e) = ioevent(&self.vm, io, new, true) {
                        log::warn!("{}: KVM_IOEVENTFD in BAR {bar}: {e}", self.name);
                    }
                }
            }
            self.io_at[bar] = want;
        }
    }

    fn update_interrupts(&mut self) {
        let Some(m) = &self.msix else { return };
        let notifiers: Vec<Notifier<'_>> = self
            .vector_fds
            .iter()
            .enumerate()
            .map(|(v, fd)| Notifier {
                label: format!("vector {v}"),
                fd,
                vector: v as u16,
            })
            .collect();
        self.irqs.update(&m.msix, &notifiers);
    }

    fn gone(&mut self, what: &str, e: outboard_vfio_user::ClientError) {
        if !self.broken {
            log::error!(
                "device {}: {what} failed: {e}; the device no longer answers",
                self.name
            );
            self.broken = true;
        }
    }

    /// Serves a `DMA_READ`/`DMA_WRITE` the server sent while no request of
    /// ours was in flight (called by the monitor when the socket is
    /// readable).
    pub fn serve_server_request(&mut self) {
        if self.broken {
            return;
        }
        let mut p = libc::pollfd {
            fd: self.socket_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a zero timeout does not block.
        let ready = unsafe { libc::poll(&mut p, 1, 0) } == 1 && p.revents & libc::POLLIN != 0;
        if ready {
            if let Err(e) = self.client.process_server_request() {
                self.gone("serving a DMA request", e);
            }
        }
    }

    /// The device went away: it reads as all ones from now on.
    pub fn backend_lost(&mut self) {
        self.broken = true;
    }

    /// Whether `offset..offset+size` of BAR `bar` touches the MSI-X table
    /// or PBA pages (which the VMM must see).
    fn covers_msix(&self, bar: usize, offset: u64, size: u64) -> bool {
        let Some(m) = &self.msix else { return false };
        let v = m.msix.vectors();
        let page = |a: u64| a & !0xfff;
        let overlaps = |start: u64, len: u64| {
            let (s, e) = (
                page(start),
                page(start.saturating_add(len).saturating_add(0xfff)),
            );
            offset < e && s < offset.saturating_add(size)
        };
        (bar == m.table_bar && overlaps(m.table_offset, Msix::table_size(v)))
            || (bar == m.pba_bar && overlaps(m.pba_offset, Msix::pba_size(v)))
    }

    fn emulated(&self, offset: usize) -> bool {
        BAR_REGS.contains(&offset)
            || ROM_REG.contains(&offset)
            || self
                .msix
                .as_ref()
                .is_some_and(|m| (m.cap + 2..m.cap + 4).contains(&offset))
    }

    fn msix_area(&self, bar: usize, offset: u64) -> Option<MsixArea> {
        let m = self.msix.as_ref()?;
        let vectors = m.msix.vectors();
        if bar == m.table_bar
            && offset >= m.table_offset
            && offset - m.table_offset < Msix::table_size(vectors)
        {
            return Some(MsixArea::Table(offset - m.table_offset));
        }
        if bar == m.pba_bar
            && offset >= m.pba_offset
            && offset - m.pba_offset < Msix::pba_size(vectors)
        {
            return Some(MsixArea::Pba(offset - m.pba_offset));
        }
        None
    }
}

enum MsixArea {
    Table(u64),
    Pba(u64),
}

impl PciFunction for VfioUserFunction {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        if !self.broken {
            if let Err(e) = self
                .client
                .region_read(PCI_CONFIG_REGION_INDEX, offset as u64, data)
            {
                self.gone("REGION_READ (config space)", e);
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i);
            if let Some(m) = self
                .msix
                .as_ref()
                .filter(|m| (m.cap + 2..m.cap + 4).contains(&o))
            {
                *b = m.msix.control().to_le_bytes()[o - m.cap - 2];
            } else if BAR_REGS.contains(&o) || ROM_REG.contains(&o) {
                let mut one = [0u8];
                self.local.read(o, &mut one);
                *b = one[0];
            }
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        // Runs of bytes the device owns are forwarded; the rest is ours.
        let mut i = 0;
        while i < data.len() {
            let o = offset.saturating_add(i);
            let ours = self.emulated(o);
            let mut j = i + 1;
            while j < data.len() && self.emulated(offset.saturating_add(j)) == ours {
                j += 1;
            }
            let run = &data[i..j];
            if ours {
                self.local.write(o, run);
                if let Some(m) = &mut self.msix {
                    if (m.cap + 2..m.cap + 4).contains(&o)
                        || (m.cap + 2..m.cap + 4).contains(&(o + run.len() - 1))
                    {
                        let mut c = m.msix.control().to_le_bytes();
                        for (k, b) in run.iter().enumerate() {
                            if let Some(idx) = (o + k).checked_sub(m.cap + 2).filter(|x| *x < 2) {
                                c[idx] = *b;
                            }
                        }
                        m.msix.set_control(u16::from_le_bytes(c));
                    }
                }
            } else if !self.broken {
                if (4..6).contains(&o) || (4..6).contains(&(o + run.len() - 1)) {
                    // The command register: decode is ours too.
                    self.local.write(o, run);
                }
                if let Err(e) = self
                    .client
                    .region_write(PCI_CONFIG_REGION_INDEX, o as u64, run)
                {
                    self.gone("REGION_WRITE (config space)", e);
                }
            }
            i = j;
        }
        self.update_bar_mappings();
        self.update_interrupts();
    }

    fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        self.local.decoded_bars()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_area(bar, offset) {
            Some(MsixArea::Table(o)) => self
                .msix
                .as_ref()
                .map_or((), |m| m.msix.read_table(o, data)),
            Some(MsixArea::Pba(o)) => self.msix.as_ref().map_or((), |m| m.msix.read_pba(o, data)),
            None => {
                data.fill(0xff);
                if !self.broken {
                    if let Err(e) = self.client.region_read(bar as u32, offset, data) {
                        self.gone("REGION_READ", e);
                    }
                }
            }
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_area(bar, offset) {
            Some(MsixArea::Table(o)) => {
                if let Some(m) = &mut self.msix {
                    m.msix.write_table(o, data);
                }
                self.update_interrupts();
            }
            Some(MsixArea::Pba(_)) => {}
            None => {
                if !self.broken {
                    if let Err(e) = self.client.region_write(bar as u32, offset, data) {
                        self.gone("REGION_WRITE", e);
                    }
                }
            }
        }
    }
}

/// Finds the device's MSI-X capability in its configuration space.
fn find_msix(config: &[u8; 256]) -> Result<Option<MsixEmulation>, VfioUserError> {
    if config[6] & 0x10 == 0 {
        return Ok(None);
    }
    let mut at = usize::from(config[0x34] & 0xfc);
    let mut hops = 0;
    while at >= 0x40 && at + 12 <= 256 && hops < 48 {
        if config[at] == MSIX_CAP_ID {
            let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
            let table = u32::from_le_bytes([
                config[at + 4],
                config[at + 5],
                config[at + 6],
                config[at + 7],
            ]);
            let pba = u32::from_le_bytes([
                config[at + 8],
                config[at + 9],
                config[at + 10],
                config[at + 11],
            ]);
            let vectors = (control & 0x7ff) + 1;
            return Ok(Some(MsixEmulation {
                cap: at,
                table_bar: (table & 7) as usize,
                table_offset: u64::from(table & !7),
                pba_bar: (pba & 7) as usize,
                pba_offset: u64::from(pba & !7),
                msix: Msix::new(vectors),
            }));
        }
        at = usize::from(config[at + 1] & 0xfc);
        hops += 1;
    }
    Ok(None)
}

/// Maps `size` bytes of the device's region fd at `region_offset + offset`.
fn map_area(
    fd: &OwnedFd,
    region_offset: u64,
    offset: u64,
    size: u64,
) -> std::io::Result<MappedArea> {
    let len = usize::try_from(size).map_err(|_| std::io::Error::other("area too large"))?;
    let file_offset = region_offset
        .checked_add(offset)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| std::io::Error::other("area offset out of range"))?;
    if len == 0 || len % 4096 != 0 || offset % 4096 != 0 {
        return Err(std::io::Error::other("area not page aligned"));
    }
    // Only a sealed regular file (a memfd that cannot shrink) is mapped
    // into the guest: anything else could turn guest accesses into faults
    // that stop the vCPU.
    let file = std::fs::File::from(fd.try_clone()?);
    let meta = file.metadata()?;
    // SAFETY: F_GET_SEALS on a descriptor we hold; it returns flags or -1.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let end = u64::try_from(file_offset)
        .unwrap_or(u64::MAX)
        .saturating_add(size);
    if !meta.is_file() || meta.len() < end || seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(std::io::Error::other(
            "not a shrink-sealed regular file long enough",
        ));
    }
    // SAFETY: a fresh shared mapping of a descriptor we hold; the kernel
    // picks the address; the result is checked.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_offset,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(MappedArea {
        offset,
        size,
        host,
        slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
        at: None,
    })
}

/// Sets (size > 0) or deletes (size 0) memslot `slot`.
fn set_slot(vm: &VmFd, slot: u32, gpa: u64, size: u64, host: *mut libc::c_void) -> bool {
    let region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `host` is a live mapping of at least `size` bytes owned by a
    // MappedArea, which deletes the slot before it unmaps.
    match unsafe { vm.set_user_memory_region(region) } {
        Ok(()) => true,
        Err(e) => {
            log::warn!("KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}: {e}");
            false
        }
    }
}

fn ioevent(vm: &VmFd, io: &IoFd, bar_addr: u64, register: bool) -> Result<(), kvm_ioctls::Error> {
    let addr = IoEventAddress::Mmio(bar_addr + io.offset);
    let fd = &io.fd;
    macro_rules! go {
        ($m:expr) => {
            if register {
                vm.register_ioevent(fd, &addr, $m)
            } else {
                vm.unregister_ioevent(fd, &addr, $m)
            }
        };
    }
    match (io.datamatch, io.size) {
        (None, _) => go!(NoDatamatch),
        (Some(d), 1) => go!(d as u8),
        (Some(d), 2) => go!(d as u16),
        (Some(d), 4) => go!(d as u32),
        (Some(d), _) => go!(d),
    }
}

impl Drop for VfioUserFunction {
    fn drop(&mut self) {
        for (_, area) in &mut self.areas {
            if area.at.take().is_some() {
                set_slot(&self.vm, area.slot, 0, 0, area.host);
            }
        }
    }
}
