//! The device-process manager: for each configured device it starts the
//! device process (or connects to a running one), runs the vhost-user
//! handshake, puts the device on its transport, hands its kick and call
//! eventfds to KVM, and watches for a backend that goes away.
//!
//! The `i`-th virtio-mmio device sits at [`VIRTIO_MMIO_BASE`] + `i` × 4 KiB
//! on IOAPIC pin [`FIRST_DEVICE_IRQ`] + `i`, and is announced to the guest as
//! `virtio_mmio.device=4K@<base>:<irq>`. PCI devices take the next free
//! slot of bus 0, in config order, with BAR 0 in the 64-bit window above
//! RAM and one GSI per MSI-X vector ([`pci`]).

mod msix;
mod pci;
mod process;
mod vfio_user;

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use outboard_transport::pci::config::BarKind;
use outboard_transport::pci::{BarAllocator, PciBusError, PciRoot, Window};
use outboard_transport::vhost_user::{
    DeviceShape, SharedMemoryRegion, VhostUserDevice, VhostUserError,
};
use outboard_transport::virtio_mmio::{MmioTransport, MMIO_WINDOW_CMDLINE_SIZE, MMIO_WINDOW_SIZE};
use outboard_transport::virtio_pci::{self, VirtioPciError, VirtioPciTransport};
use outboard_vfio_user::{Client, ClientConfig};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceConfig, DeviceKind, TransportKind};
use crate::irq::{IrqError, IrqRouting};
use crate::memory::{GuestRam, PCI_MMIO32_SIZE, PCI_MMIO32_START, PCI_MMIO64_SIZE};
use crate::mmio::{MmioBus, MmioDevice, MmioError};

pub use pci::VirtioPciFunction;
pub use process::DeviceProcess;
pub use vfio_user::{VfioUserError, VfioUserFunction};

/// Where the first virtio-mmio window goes (inside the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// IOAPIC pin (GSI) of the first device; the ones below are ISA's.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Offset of QueueNotify in a virtio-mmio window.
const MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// virtio-blk's config space as Linux 6.1 and QEMU 7.2 read it.
const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;
/// How long the VMM waits for a vfio-user device's answer.
const VFIO_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping device process gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Errors setting devices up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The in-tree program is not where it should be.
    #[error("device {name}: cannot find `{program}` next to the outboard binary; build it (`cargo build --workspace --bins`) or set `spawn.program`")]
    ProgramNotFound {
        /// Device name.
        name: String,
        /// Program name.
        program: &'static str,
    },
    /// The device process could not be started.
    #[error("device {name}: cannot start {}: {source}", program.display())]
    Spawn {
        /// Device name.
        name: String,
        /// What we tried to run.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket to the device process could not be set up.
    #[error("device {name}: {what}: {source}")]
    Socket {
        /// Device name.
        name: String,
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Neither `spawn` nor `socket` was given.
    #[error("device {name}: neither `spawn` nor `socket` is set")]
    NoBackend {
        /// Device name.
        name: String,
    },
    /// A running backend's socket could not be reached.
    #[error("device {name}: cannot connect to {}: {source}", path.display())]
    Connect {
        /// Device name.
        name: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("device {name}: {source}{}", exit.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Handshake {
        /// Device name.
        name: String,
        /// What failed.
        source: VhostUserError,
        /// How the device process ended, when it did.
        exit: Option<String>,
    },
    /// A KVM call for the device failed.
    #[error("device {name}: {what}: {source}")]
    Kvm {
        /// Device name.
        name: String,
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The device's window could not be placed.
    #[error("device {name}: {source}")]
    Mmio {
        /// Device name.
        name: String,
        /// Why.
        source: MmioError,
    },
    /// Guest memory could not be described to the backend.
    #[error("device {name}: guest memory: {problem}")]
    Memory {
        /// Device name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The device could not be put on the PCI bus.
    #[error("device {name}: {source}")]
    Pci {
        /// Device name.
        name: String,
        /// Why.
        source: PciBusError,
    },
    /// The virtio-pci function could not be built.
    #[error("device {name}: {source}")]
    VirtioPci {
        /// Device name.
        name: String,
        /// Why.
        source: VirtioPciError,
    },
    /// The vfio-user device could not be set up.
    #[error("device {name}: {source}{}", exit.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    VfioUser {
        /// Device name.
        name: String,
        /// What failed.
        source: VfioUserError,
        /// How the device process ended, when it did.
        exit: Option<String>,
    },
    /// Interrupt routes could not be set up.
    #[error("device {name}: {source}")]
    Irq {
        /// Device name.
        name: String,
        /// Why.
        source: IrqError,
    },
    /// A host resource (eventfd, thread) could not be created.
    #[error("devices: {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// A virtio device on virtio-mmio, as the MMIO bus sees it.
pub struct VirtioMmioDevice {
    transport: MmioTransport<VhostUserDevice>,
    /// irqfd for interrupts the VMM raises itself (config change, needs
    /// reset); the backend raises used-buffer interrupts through its own.
    interrupt: EventFd,
}

impl VirtioMmioDevice {
    fn raise(&self) {
        if let Err(e) = self.interrupt.write(1) {
            log::warn!("cannot raise a device interrupt: {e}");
        }
    }

    /// The backend went away: DEVICE_NEEDS_RESET, and tell the driver.
    fn backend_lost(&mut self) {
        if self.transport.set_needs_reset() {
            self.raise();
        }
    }
}

/// A device whose backend can go away under it.
trait Supervised: Send {
    /// The backend hung up: DEVICE_NEEDS_RESET, tell the driver.
    fn backend_lost(&mut self);
    /// The backend sent something while the VMM was not waiting for a
    /// reply (vfio-user DMA requests).
    fn socket_readable(&mut self) {}
}

impl Supervised for VirtioMmioDevice {
    fn backend_lost(&mut self) {
        VirtioMmioDevice::backend_lost(self);
    }
}

impl Supervised for VirtioPciFunction {
    fn backend_lost(&mut self) {
        VirtioPciFunction::backend_lost(self);
    }
}

impl Supervised for VfioUserFunction {
    fn backend_lost(&mut self) {
        VfioUserFunction::backend_lost(self);
    }
    fn socket_readable(&mut self) {
        self.serve_server_request();
    }
}

/// PCI bus 0 while devices are added: the bus, where BARs go, and the
/// VM's interrupt routes.
pub struct PciSetup {
    /// The bus.
    pub root: PciRoot,
    /// The 64-bit BAR window above RAM.
    pub high: Window,
    low_bars: BarAllocator,
    high_bars: BarAllocator,
    routing: Arc<Mutex<IrqRouting>>,
}

impl PciSetup {
    /// An empty bus; 64-bit BARs go in `high`.
    pub fn new(high: Window, routing: Arc<Mutex<IrqRouting>>) -> Self {
        PciSetup {
            root: PciRoot::new(),
            high,
            low_bars: BarAllocator::new(Self::low(), "32-bit"),
            high_bars: BarAllocator::new(high, "64-bit"),
            routing,
        }
    }

    /// Places a BAR: 32-bit ones in the 32-bit window, 64-bit ones above
    /// RAM.
    pub fn allocate_bar(&mut self, kind: BarKind, size: u64) -> Result<u64, PciBusError> {
        match kind {
            BarKind::Memory32 => self.low_bars.allocate(size),
            BarKind::Memory64 => self.high_bars.allocate(size),
        }
    }

    /// The 32-bit BAR window.
    pub fn low() -> Window {
        Window {
            start: PCI_MMIO32_START,
            size: PCI_MMIO32_SIZE,
        }
    }

    /// The 64-bit window for `high_start`.
    pub fn high_window(high_start: u64) -> Window {
        Window {
            start: high_start,
            size: PCI_MMIO64_SIZE,
        }
    }
}

/// One PCI BAR window on the MMIO bus: accesses go to whichever BAR
/// decodes the address; nothing there reads all ones.
pub struct PciWindow {
    /// Where the window starts.
    pub base: u64,
    /// The bus.
    pub root: Arc<Mutex<PciRoot>>,
}

impl MmioDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base.saturating_add(offset);
        if !outboard_transport::pci::bus::mmio_read(&self.root, addr, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base.saturating_add(offset);
        outboard_transport::pci::bus::mmio_write(&self.root, addr, data);
    }
}

impl MmioDevice for VirtioMmioDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.transport.write(offset, data).interrupt {
            self.raise();
        }
    }
}

struct Slot {
    name: String,
    device: Arc<Mutex<dyn Supervised>>,
    socket_fd: RawFd,
    process: Option<Arc<DeviceProcess>>,
    /// The peer may send requests of its own (vfio-user).
    vfio: bool,
}

/// The VM's devices and their processes.
pub struct Devices {
    slots: Vec<Slot>,
    cmdline: Vec<String>,
    monitor: Option<(Arc<AtomicBool>, EventFd, JoinHandle<()>)>,
}

impl Devices {
    /// Sets up every configured device: process, handshake, window on
    /// `bus`, ioeventfds and irqfds on `vm`.
    pub fn new(
        configs: &[DeviceConfig],
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        bus: &mut MmioBus,
        pci: &mut PciSetup,
    ) -> Result<Self, DeviceError> {
        let mut devices = Devices {
            slots: Vec::new(),
            cmdline: Vec::new(),
            monitor: None,
        };
        for (index, config) in configs.iter().enumerate() {
            // On error, `devices` drops and stops the processes started.
            devices.add(index, config, vm, ram, bus, pci)?;
        }
        Ok(devices)
    }

    fn add(
        &mut self,
        index: usize,
        config: &DeviceConfig,
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        bus: &mut MmioBus,
        pci: &mut PciSetup,
    ) -> Result<(), DeviceError> {
        let name = config.name(index);
        let (process, stream) = match (&config.spawn, &config.socket) {
            (Some(spawn), _) => {
                let (p, s) =
                    DeviceProcess::start(&name, config.kind, spawn, &spawn_extra_args(config))?;
                (Some(Arc::new(p)), s)
            }
            (None, Some(path)) => {
                let s = UnixStream::connect(path).map_err(|source| DeviceError::Connect {
                    name: name.clone(),
                    path: path.clone(),
                    source,
                })?;
                (None, s)
            }
            (None, None) => return Err(DeviceError::NoBackend { name }),
        };
        let fail = |source: DeviceError| {
            if let Some(p) = &process {
                p.stop(STOP_GRACE);
            }
            source
        };
        let (supervised, socket_fd, vfio) = match config.kind {
            DeviceKind::VfioUser => {
                let f = self
                    .add_vfio_user(&name, stream, vm, ram, pci, process.as_deref())
                    .map_err(fail)?;
                (f.0, f.1, true)
            }
            DeviceKind::VhostUserBlk => {
                let shape = DeviceShape {
                    device_type: 2,
                    config_size: VIRTIO_BLK_CONFIG_SIZE,
                    queue_size: config.queue_size,
                };
                let (s, fd) = self.add_vhost_user(
                    &name,
                    config,
                    shape,
                    stream,
                    vm,
                    ram,
                    bus,
                    pci,
                    process.as_deref(),
                )?;
                (s, fd, false)
            }
        };
        self.slots.push(Slot {
            name,
            device: supervised,
            socket_fd,
            process,
            vfio,
        });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_vhost_user(
        &mut self,
        name: &str,
        config: &DeviceConfig,
        shape: DeviceShape,
        stream: UnixStream,
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        bus: &mut MmioBus,
        pci: &mut PciSetup,
        process: Option<&DeviceProcess>,
    ) -> Result<(Arc<Mutex<dyn Supervised>>, RawFd), DeviceError> {
        let name = name.to_string();
        let regions = shared_regions(&name, ram)?;
        let device = match VhostUserDevice::connect(&name, stream, shape, regions) {
            Ok(d) => d,
            Err(source) => {
                let exit = process.map(|p| p.describe_exit(Duration::from_millis(500)));
                if let Some(p) = process {
                    p.stop(STOP_GRACE);
                }
                return Err(DeviceError::Handshake { name, source, exit });
            }
        };
        let socket_fd = device.socket_fd();
        let supervised = match config.transport {
            TransportKind::Mmio => self.add_mmio(&name, config.kind, device, vm, bus)?,
            TransportKind::Pci => self.add_pci(&name, config.kind, device, vm, pci)?,
        };
        Ok((supervised, socket_fd))
    }

    fn add_vfio_user(
        &mut self,
        name: &str,
        stream: UnixStream,
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        pci: &mut PciSetup,
        process: Option<&DeviceProcess>,
    ) -> Result<(Arc<Mutex<dyn Supervised>>, RawFd), DeviceError> {
        let failed = |source: VfioUserError| DeviceError::VfioUser {
            name: name.to_string(),
            source,
            exit: process.map(|p| p.describe_exit(Duration::from_millis(500))),
        };
        let slot = pci.root.next_slot().ok_or(DeviceError::Pci {
            name: name.to_string(),
            source: PciBusError::Full,
        })?;
        // A device process that stops answering must not hold a vCPU (and
        // the bus) forever: every exchange has a deadline.
        stream
            .set_read_timeout(Some(VFIO_USER_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(VFIO_USER_TIMEOUT)))
            .map_err(|source| DeviceError::Socket {
                name: name.to_string(),
                what: "cannot set socket timeouts",
                source,
            })?;
        let client_config = ClientConfig {
            memory: Some(VfioUserFunction::dma_memory(ram)),
            ..ClientConfig::default()
        };
        let client = Client::connect_with(stream, client_config).map_err(|source| {
            failed(VfioUserError::Client {
                what: "VERSION",
                source,
            })
        })?;
        let routing = pci.routing.clone();
        let function = VfioUserFunction::new(
            name,
            client,
            vm.clone(),
            ram,
            routing.clone(),
            |kind, size| pci.allocate_bar(kind, size).ok(),
            |n| routing.lock().ok()?.allocate(n).ok(),
        )
        .map_err(failed)?;
        let socket_fd = function.socket_fd();
        let bars = function.decoded_bars_all();
        let function = Arc::new(Mutex::new(function));
        pci.root
            .add(function.clone())
            .map_err(|source| DeviceError::Pci {
                name: name.to_string(),
                source,
            })?;
        log::info!("{name}: vfio-user device on PCI 00:{slot:02x}.0, BARs {bars:x?}");
        Ok((function, socket_fd))
    }

    fn add_pci(
        &mut self,
        name: &str,
        kind: DeviceKind,
        device: VhostUserDevice,
        vm: &Arc<VmFd>,
        pci: &mut PciSetup,
    ) -> Result<Arc<Mutex<dyn Supervised>>, DeviceError> {
        let pci_err = |source| DeviceError::Pci {
            name: name.to_string(),
            source,
        };
        let slot = pci.root.next_slot().ok_or(pci_err(PciBusError::Full))?;
        let bar = pci
            .allocate_bar(virtio_pci::BAR_KIND, virtio_pci::BAR_SIZE)
            .map_err(pci_err)?;
        let queues = device.kick_fds().len();
        let transport =
            VirtioPciTransport::new(device, bar).map_err(|source| DeviceError::VirtioPci {
                name: name.to_string(),
                source,
            })?;
        let vectors = transport.vectors();
        let gsis = pci
            .routing
            .lock()
            .map_err(|_| DeviceError::Irq {
                name: name.to_string(),
                source: IrqError::Table("routing lock poisoned".into()),
            })?
            .allocate(u32::from(vectors))
            .map_err(|source| DeviceError::Irq {
                name: name.to_string(),
                source,
            })?;
        let function = VirtioPciFunction::new(
            name.to_string(),
            transport,
            vm.clone(),
            pci.routing.clone(),
            gsis,
        )
        .map_err(|source| DeviceError::Host {
            what: "cannot create an interrupt eventfd",
            source,
        })?;
        let function = Arc::new(Mutex::new(function));
        pci.root.add(function.clone()).map_err(pci_err)?;
        log::info!(
            "{name}: {kind} on PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}, {vectors} MSI-X vectors, {queues} queue(s)"
        );
        Ok(function)
    }

    fn add_mmio(
        &mut self,
        name: &str,
        kind: DeviceKind,
        device: VhostUserDevice,
        vm: &VmFd,
        bus: &mut MmioBus,
    ) -> Result<Arc<Mutex<dyn Supervised>>, DeviceError> {
        let name = name.to_string();
        let slot_index = u32::try_from(self.cmdline.len()).unwrap_or(u32::MAX);
        let base = VIRTIO_MMIO_BASE + u64::from(slot_index) * MMIO_WINDOW_SIZE;
        let irq = FIRST_DEVICE_IRQ + slot_index;
        let kvm_err = |what| {
            let name = name.clone();
            move |source| DeviceError::Kvm { name, what, source }
        };
        for (queue, kick) in device.kick_fds().iter().enumerate() {
            vm.register_ioevent(
                kick,
                &IoEventAddress::Mmio(base + MMIO_QUEUE_NOTIFY),
                queue as u32,
            )
            .map_err(kvm_err("KVM_IOEVENTFD (queue notify)"))?;
        }
        for call in device.call_fds() {
            vm.register_irqfd(call, irq)
                .map_err(kvm_err("KVM_IRQFD (queue interrupt)"))?;
        }
        let interrupt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            DeviceError::Host {
                what: "cannot create an interrupt eventfd",
                source,
            }
        })?;
        vm.register_irqfd(&interrupt, irq)
            .map_err(kvm_err("KVM_IRQFD (config interrupt)"))?;
        let queues = device.kick_fds().len();
        let device = Arc::new(Mutex::new(VirtioMmioDevice {
            // The backend writes its call eventfds itself, so the VMM
            // never sees a used buffer: keep INT_VRING set.
            transport: MmioTransport::new(device, true),
            interrupt,
        }));
        bus.insert(base, MMIO_WINDOW_SIZE, device.clone())
            .map_err(|source| DeviceError::Mmio {
                name: name.clone(),
                source,
            })?;
        self.cmdline.push(format!(
            "virtio_mmio.device={MMIO_WINDOW_CMDLINE_SIZE}@{base:#x}:{irq}"
        ));
        log::info!("{name}: {kind} on virtio-mmio at {base:#x}, IRQ {irq}, {queues} queue(s)");
        Ok(device)
    }

    /// What the kernel command line must say for the guest to find the
    /// devices.
    pub fn cmdline(&self) -> &[String] {
        &self.cmdline
    }

    /// Starts watching the backends: one that hangs up is logged and its
    /// device set to DEVICE_NEEDS_RESET; the guest and the VMM go on.
    pub fn start_monitor(&mut self) -> Result<(), DeviceError> {
        if self.slots.is_empty() || self.monitor.is_some() {
            return Ok(());
        }
        let host = |what| move |source| DeviceError::Host { what, source };
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(host("cannot create an eventfd"))?;
        let wake_fd = wake.try_clone().map_err(host("cannot clone an eventfd"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let watched: Vec<Watched> = self
            .slots
            .iter()
            .map(|s| Watched {
                name: s.name.clone(),
                fd: s.socket_fd,
                device: s.device.clone(),
                process: s.process.clone(),
                requests: s.vfio,
            })
            .collect();
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("device-monitor".into())
            .spawn(move || monitor(watched, wake_fd, stop_flag))
            .map_err(host("cannot spawn the device monitor thread"))?;
        self.monitor = Some((stop, wake, thread));
        Ok(())
    }

    /// Stops the monitor and the device processes the VMM started.
    pub fn shutdown(&mut self) {
        if let Some((stop, wake, thread)) = self.monitor.take() {
            stop.store(true, Ordering::Release);
            let _ = wake.write(1);
            let _ = thread.join();
        }
        for slot in &self.slots {
            if let Some(p) = &slot.process {
                p.stop(STOP_GRACE);
            }
        }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Arguments the VMM adds for its own in-tree programs, unless given: the
/// queue size it offers (the backend must accept rings that large), and
/// `--vfio-user` for a vfio-user device.
fn spawn_extra_args(config: &DeviceConfig) -> Vec<String> {
    let Some(spawn) = &config.spawn else {
        return Vec::new();
    };
    let in_tree = spawn.program.is_none();
    let has = |flag: &str| spawn.args.iter().any(|a| a.starts_with(flag));
    let mut extra = Vec::new();
    if in_tree && !has("--queue-size") {
        extra.extend(["--queue-size".into(), config.queue_size.to_string()]);
    }
    if in_tree && config.kind == DeviceKind::VfioUser && !has("--vfio-user") {
        extra.push("--vfio-user".into());
    }
    extra
}

/// Guest RAM as the backend maps it: the memfd at each range's offset.
fn shared_regions(name: &str, ram: &GuestRam) -> Result<Vec<SharedMemoryRegion>, DeviceError> {
    use std::os::fd::AsRawFd;
    ram.memory
        .iter()
        .zip(&ram.ranges)
        .map(|(region, range)| {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| DeviceError::Memory {
                    name: name.into(),
                    problem: e.to_string(),
                })?;
            Ok(SharedMemoryRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: host as u64,
                fd: ram.memfd.as_raw_fd(),
                fd_offset: range.file_offset,
            })
        })
        .collect()
}

struct Watched {
    name: String,
    fd: RawFd,
    device: Arc<Mutex<dyn Supervised>>,
    process: Option<Arc<DeviceProcess>>,
    requests: bool,
}

/// Polls the backends' sockets for a hang-up until `stop`.
fn monitor(mut watched: Vec<Watched>, wake: EventFd, stop: Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    while !stop.load(Ordering::Acquire) && !watched.is_empty() {
        let mut fds: Vec<libc::pollfd> = std::iter::once(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .chain(watched.iter().map(|w| libc::pollfd {
            fd: w.fd,
            // The hang-up; and requests from peers that send them (replies
            // are read by whoever made the request).
            events: libc::POLLRDHUP | if w.requests { libc::POLLIN } else { 0 },
            revents: 0,
        }))
        .collect();
        // SAFETY: fds is a valid array of pollfd of the given length; the
        // descriptors stay open while the devices (held here) live.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("device monitor: poll failed: {e}; backends are no longer watched");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        for (w, p) in watched.iter().zip(fds.iter().skip(1)) {
            if w.requests && p.revents & libc::POLLIN != 0 && p.revents & libc::POLLRDHUP == 0 {
                if let Ok(mut d) = w.device.lock() {
                    d.socket_readable();
                }
            }
        }
        let hung_up: Vec<bool> = fds
            .iter()
            .skip(1)
            .map(|p| p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
            .collect();
        let mut i = 0;
        watched.retain(|w| {
            let gone = hung_up.get(i).copied().unwrap_or(false);
            i += 1;
            if gone {
                let how = w
                    .process
                    .as_ref()
                    .map(|p| format!("; {}", p.describe_exit(Duration::from_millis(200))))
                    .unwrap_or_default();
                log::error!(
                    "device {}: the backend closed its connection{how}; the device needs a reset, the guest keeps running",
                    w.name
                );
                if let Ok(mut d) = w.device.lock() {
                    d.backend_lost();
                }
            }
            !gone
        });
    }
}
