//! Building a VM from its config and running it to the end: KVM VM with
//! in-kernel irqchip and PIT, memfd-backed RAM, the loaded kernel, the
//! legacy devices, one thread per vCPU, and a clean stop of all of them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::AtomicI32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::config::{ConsoleInput, ConsoleOutput, TransportKind, VmConfig};
use crate::cpu::{cpuid, setup, vcpu};
use crate::devices::{DeviceError, Devices, PciSetup, PciWindow};
use crate::irq::IrqRouting;
use crate::legacy::{IrqTrigger, PortBus, SerialConsole, StopReason, SERIAL_IRQ};
use crate::memory::{pci_mmio64_start, GuestRam, MemoryError};
use crate::migrate;
use crate::mmio::MmioBus;
use outboard_migration::Address;

/// Where KVM keeps the TSS it needs for real-mode emulation (3 pages,
/// inside the MMIO hole, below the IOAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM lacks a capability Outboard needs.
    #[error("this host's KVM lacks {0}, which Outboard needs")]
    MissingCapability(&'static str),
    /// A VM-level KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than this KVM allows.
    #[error("config field `machine.vcpus`: {asked} is more than this host's KVM allows ({max})")]
    TooManyVcpus {
        /// Asked for.
        asked: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A migration or restore failed.
    #[error("migration: {0}")]
    Migration(String),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU register set-up failed.
    #[error("vCPU {index}: {source}")]
    VcpuSetup {
        /// Which vCPU.
        index: u8,
        /// What failed.
        source: setup::SetupError,
    },
    /// The vCPU's CPUID could not be built.
    #[error("vCPU {index}: {source}")]
    Cpuid {
        /// Which vCPU.
        index: u8,
        /// What failed.
        source: cpuid::CpuidError,
    },
    /// The console output file could not be created.
    #[error("cannot create console output {path}: {source}")]
    Console {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A host thread or signal could not be set up.
    #[error("{what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl VmError {
    /// Whether the error is the config's fault (the binary exits 2).
    pub fn is_config_error(&self) -> bool {
        matches!(self, VmError::TooManyVcpus { .. })
    }
}

/// A VM built and ready to run.
pub struct Vm {
    // Dropped in this order: everything that holds the VmFd (devices, the
    // buses) before the guest RAM its memslots point into.
    devices: Devices,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    ports: Arc<PortBus>,
    mmio: Arc<MmioBus>,
    _vm: Arc<VmFd>,
    serial: Arc<Mutex<SerialConsole>>,
    stop_rx: Receiver<StopReason>,
    stop_tx: std::sync::mpsc::Sender<StopReason>,
    console_input: bool,
    config: VmConfig,
    msrs: Arc<Vec<u32>>,
    control: Arc<vcpu::VcpuControl>,
    commands: Option<Receiver<(Command, Sender<CommandResult>)>>,
    status: Arc<VmStatus>,
    ram: Arc<GuestRam>,
}

/// What the control API asks of the running VM (served by the main thread
/// between guest events).
#[derive(Clone, Debug)]
pub enum Command {
    /// Park every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Stop the VM (as on SIGTERM, exit status 0).
    Shutdown,
    /// Write a snapshot to this address (`file:PATH`); the guest runs on.
    Snapshot(Address),
    /// Migrate to this address; on success this VMM exits.
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        destination: Address,
        /// Downtime target.
        downtime: Duration,
        /// Give up after this long.
        timeout: Duration,
    },
}

/// Longest a migration source waits on its channel (a write, or the
/// confirmation) before it gives up and resumes the guest.
const MIGRATION_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a destination waits for the next bytes of the stream.
const INCOMING_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a [`Command`].
pub type CommandResult = Result<Option<migrate::Report>, String>;

/// What the API reads without waiting for the VM's main loop.
#[derive(Default)]
pub struct VmStatus {
    /// Set to cancel a migration in progress.
    pub cancel: AtomicBool,
    /// Whether the vCPUs are parked.
    pub paused: AtomicBool,
    /// Whether a migration is in progress.
    pub migrating: AtomicBool,
}

/// Sends [`Command`]s to a running VM; cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    tx: Sender<(Command, Sender<CommandResult>)>,
    /// The VM's status flags.
    pub status: Arc<VmStatus>,
}

impl VmHandle {
    /// Sends `cmd` and waits for its answer.
    pub fn call(&self, cmd: Command) -> CommandResult {
        let (tx, rx) = channel();
        self.tx
            .send((cmd, tx))
            .map_err(|_| "the VM is not running".to_string())?;
        rx.recv().map_err(|_| "the VM stopped".to_string())?
    }
}

impl Vm {
    /// Builds the VM described by `config`. Nothing runs yet.
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if let Some(cap) = missing_capability(&kvm) {
            return Err(VmError::MissingCapability(cap));
        }
        let max = kvm.get_max_vcpus();
        if usize::from(config.machine.vcpus) > max {
            return Err(VmError::TooManyVcpus {
                asked: config.machine.vcpus,
                max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Memory first: a memslot added after the irqchip and PIT exist
        // waits for a grace period (measured 5.5 ms on a PVM host, 0.15 ms
        // before), more than everything else up to the first KVM_RUN.
        let size = config
            .machine
            .memory_mib
            .checked_mul(1 << 20)
            .ok_or(MemoryError::Layout("memory size overflows".into()))?;
        let ram = GuestRam::new(size)?;
        register_memory(&vm, &ram)?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mut mmio = MmioBus::new();
        let routing = Arc::new(Mutex::new(IrqRouting::new(vm.clone())));
        let high = PciSetup::high_window(pci_mmio64_start(size));
        let mut pci = PciSetup::new(high, routing);
        let devices = Devices::new(&config.devices, &vm, &ram, &mut mmio, &mut pci)?;
        let mut pci_root = None;
        if config
            .devices
            .iter()
            .any(|d| d.transport == TransportKind::Pci)
        {
            let root = Arc::new(Mutex::new(pci.root));
            for window in [PciSetup::low(), high] {
                let dev = Arc::new(Mutex::new(PciWindow {
                    base: window.start,
                    root: root.clone(),
                }));
                mmio.insert(window.start, window.size, dev)
                    .map_err(|e| VmError::Host {
                        what: "cannot place the PCI windows",
                        source: io::Error::other(e.to_string()),
                    })?;
            }
            pci_root = Some(root);
        }
        let entry = boot::load(
            &ram,
            &config.kernel,
            config.machine.vcpus,
            devices.cmdline(),
        )?;
        boot::write_gdt_and_page_tables(&ram, entry.protocol)?;

        let (stop_tx, stop_rx) = channel();
        let serial_evt =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                VmError::Host {
                    what: "cannot create the serial interrupt eventfd",
                    source,
                }
            })?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(Serial::new(
            IrqTrigger(serial_evt),
            console_writer(config)?,
        )));
        let mut ports = PortBus::new(serial.clone(), stop_tx.clone());
        if let Some(root) = pci_root {
            ports = ports.with_pci(root);
        }
        let ports = Arc::new(ports);

        let msrs = Arc::new(
            crate::cpu::state::msr_list(&kvm).map_err(|e| VmError::Host {
                what: "cannot list the MSRs to migrate",
                source: io::Error::other(e.to_string()),
            })?,
        );
        let supported = kvm
            // Headroom for the topology subleaves for_vcpu adds.
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES - 8)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.machine.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpuid::for_vcpu(&supported, index, config.machine.vcpus)
                .map_err(|source| VmError::Cpuid { index, source })?;
            if log::log_enabled!(log::Level::Trace) {
                for e in cpuid.as_slice() {
                    log::trace!(
                        "vcpu{index} cpuid {:#x}.{:#x}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                        e.function,
                        e.index,
                        e.eax,
                        e.ebx,
                        e.ecx,
                        e.edx
                    );
                }
            }
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            setup::setup_common(&fd).map_err(|source| VmError::VcpuSetup { index, source })?;
            if index == 0 {
                setup::setup_boot_vcpu(&fd, entry.protocol, entry.addr)
                    .map_err(|source| VmError::VcpuSetup { index, source })?;
            }
            vcpus.push(fd);
        }

        let console_input = config.console.input == ConsoleInput::Auto
            // SAFETY: isatty only inspects the descriptor.
            && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        Ok(Vm {
            vcpus,
            ram: Arc::new(ram),
            ports,
            mmio: Arc::new(mmio),
            devices,
            serial,
            stop_rx,
            stop_tx,
            console_input,
            control: vcpu::VcpuControl::new(usize::from(config.machine.vcpus)),
            config: config.clone(),
            msrs,
            commands: None,
            status: Arc::new(VmStatus::default()),
            _vm: vm,
        })
    }

    /// A handle to send commands to this VM once it runs.
    pub fn handle(&mut self) -> VmHandle {
        let (tx, rx) = channel();
        self.commands = Some(rx);
        VmHandle {
            tx,
            status: self.status.clone(),
        }
    }

    /// Becomes the destination of a migration (or restores a snapshot):
    /// waits on `address`, loads the guest, and confirms. Call before
    /// [`Vm::run`]; the guest then continues where it was.
    pub fn incoming(&mut self, address: &Address) -> Result<migrate::Report, VmError> {
        let start = std::time::Instant::now();
        let mig = |e: migrate::MigrateError| VmError::Migration(e.to_string());
        eprintln!("outboard: waiting for the incoming guest on {address}");
        let channel = outboard_migration::listen_accept(address).map_err(|e| mig(e.into()))?;
        channel
            .set_timeout(Some(INCOMING_IO_TIMEOUT))
            .map_err(|e| mig(e.into()))?;
        let (input, reply) = channel.into_parts();
        let mut reply = reply;
        let incoming = migrate::receive(
            input,
            reply.as_mut().map(|r| r.as_mut() as &mut dyn Write),
            &self.ram,
            &self.config,
        )
        .map_err(mig)?;
        let load = || -> Result<(), String> {
            incoming.vm.restore(&self._vm).map_err(|e| e.to_string())?;
            for (fd, state) in self.vcpus.iter().zip(&incoming.vcpus) {
                state.restore(fd).map_err(|e| e.to_string())?;
            }
            for (name, state) in &incoming.vmm_devices {
                match name.as_str() {
                    "serial" => self.restore_serial(state)?,
                    other => return Err(format!("unknown VMM device {other:?} in the stream")),
                }
            }
            Ok(())
        };
        if let Err(e) = load() {
            if let Some(out) = reply.as_mut() {
                if let Ok(mut w) = outboard_migration::StreamWriter::new(out) {
                    let _ = w.write(&outboard_migration::Section::Abort(e.clone()));
                }
            }
            return Err(VmError::Migration(e));
        }
        if std::env::var("OUTBOARD_TEST_FAULT").as_deref() == Ok("hang-before-confirm") {
            // Fault injection for the tests: a destination that dies or
            // stalls in the stop-and-copy phase, after the whole stream and
            // before its confirmation.
            eprintln!("outboard: test fault: hanging before the confirmation");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        if let Some(out) = reply.as_mut() {
            migrate::confirm(out.as_mut()).map_err(mig)?;
        }
        let report = migrate::Report {
            total_ms: start.elapsed().as_millis() as u64,
            ..Default::default()
        };
        eprintln!(
            "outboard: guest received from {address} in {} ms; running",
            report.total_ms
        );
        Ok(report)
    }

    fn restore_serial(&self, state: &[u8]) -> Result<(), String> {
        let snap: migrate::SerialSnapshot =
            serde_json::from_slice(state).map_err(|e| format!("serial state: {e}"))?;
        let mut guard = self.serial.lock().map_err(|_| "serial lock poisoned")?;
        let evt = guard
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial: {e}"))?;
        let writer = std::mem::replace(guard.writer_mut(), Box::new(io::sink()));
        let restored = Serial::from_state(
            &snap.0,
            IrqTrigger(evt),
            vm_superio::serial::NoEvents,
            writer,
        )
        .map_err(|e| format!("serial state: {e:?}"))?;
        *guard = restored;
        Ok(())
    }

    /// Runs the guest until it powers off, resets or fails, then stops
    /// every vCPU thread. Returns why it stopped.
    pub fn run(self) -> Result<StopReason, VmError> {
        vcpu::install_kick_handler().map_err(|source| VmError::Host {
            what: "cannot install the vCPU kick signal handler",
            source,
        })?;
        install_stop_handlers().map_err(|source| VmError::Host {
            what: "cannot install the SIGINT/SIGTERM handlers",
            source,
        })?;
        let mut devices = self.devices;
        devices.start_monitor()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, fd) in self.vcpus.into_iter().enumerate() {
            let ctx = vcpu::VcpuContext {
                index: index as u8,
                ports: self.ports.clone(),
                mmio: self.mmio.clone(),
                ram: self.ram.clone(),
                stop_tx: self.stop_tx.clone(),
                stop: stop.clone(),
                trace_first_run: index == 0 && std::env::var_os("OUTBOARD_BOOT_TRACE").is_some(),
                control: self.control.clone(),
                msrs: self.msrs.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run(fd, ctx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    stop_threads(&stop, threads);
                    return Err(VmError::Host {
                        what: "cannot spawn a vCPU thread",
                        source,
                    });
                }
            }
        }
        let _terminal = if self.console_input {
            spawn_console_input(self.serial.clone())
        } else {
            None
        };
        // Only vCPU threads (and the devices they own) may hold senders now,
        // so recv() ends if every vCPU thread dies.
        drop(self.stop_tx);
        drop(self.ports);

        let running = Running {
            stop_rx: &self.stop_rx,
            ended: std::cell::RefCell::new(None),
            vm: &self._vm,
            ram: &self.ram,
            config: &self.config,
            control: &self.control,
            threads: &threads,
            serial: &self.serial,
            status: &self.status,
        };
        let reason = loop {
            if let Some(r) = running.ended.borrow_mut().take() {
                break r;
            }
            match self.stop_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Disconnected) => {
                    break StopReason::Failure("every vCPU thread ended".into())
                }
                Err(RecvTimeoutError::Timeout) => {
                    let sig = STOP_SIGNAL.load(Ordering::Relaxed);
                    if sig != 0 {
                        break StopReason::Signal(sig);
                    }
                }
            }
            if let Some(rx) = &self.commands {
                if let Ok((cmd, reply)) = rx.try_recv() {
                    let (result, end) = running.serve(cmd);
                    let _ = reply.send(result);
                    if let Some(r) = end {
                        break r;
                    }
                }
            }
        };
        self.control.resume();
        stop_threads(&stop, threads);
        devices.shutdown();
        if let Ok(mut s) = self.serial.lock() {
            let _ = s.writer_mut().flush();
        }
        Ok(reason)
    }
}

/// The running VM as the command loop sees it.
struct Running<'a> {
    stop_rx: &'a Receiver<StopReason>,
    ended: std::cell::RefCell<Option<StopReason>>,
    vm: &'a VmFd,
    ram: &'a GuestRam,
    config: &'a VmConfig,
    control: &'a vcpu::VcpuControl,
    threads: &'a [JoinHandle<()>],
    serial: &'a Mutex<SerialConsole>,
    status: &'a VmStatus,
}

impl Running<'_> {
    /// Serves one command; `Some` when the VM must stop.
    fn serve(&self, cmd: Command) -> (CommandResult, Option<StopReason>) {
        let VmStatus {
            cancel,
            paused,
            migrating,
        } = self.status;
        match cmd {
            Command::Pause => {
                if paused.load(Ordering::Acquire) {
                    return (Err("the VM is already paused".into()), None);
                }
                let r = migrate::SourceVm::pause(self).map_err(|e| e.to_string());
                if r.is_ok() {
                    paused.store(true, Ordering::Release);
                }
                (r.map(|()| None), None)
            }
            Command::Resume => {
                if !paused.load(Ordering::Acquire) {
                    return (Err("the VM is not paused".into()), None);
                }
                migrate::SourceVm::resume(self);
                paused.store(false, Ordering::Release);
                (Ok(None), None)
            }
            Command::Shutdown => (Ok(None), Some(StopReason::Reset)),
            Command::Snapshot(address) => {
                let was_paused = paused.load(Ordering::Acquire);
                let result = (|| {
                    let ch = outboard_migration::connect(&address).map_err(|e| e.to_string())?;
                    let (out, _) = ch.into_parts();
                    let params = migrate::SendParams {
                        downtime: Duration::ZERO,
                        timeout: Duration::from_secs(3600),
                        live: false,
                    };
                    let no_reply: Option<Box<dyn Read + Send>> = None;
                    migrate::send(
                        out,
                        no_reply,
                        self.vm,
                        self.ram,
                        self.config,
                        self,
                        params,
                        cancel,
                    )
                    .map_err(|e| e.to_string())
                })();
                // A snapshot leaves the guest as it was.
                if !was_paused && result.is_ok() {
                    migrate::SourceVm::resume(self);
                }
                (result.map(Some), None)
            }
            Command::Migrate {
                destination,
                downtime,
                timeout,
            } => {
                cancel.store(false, Ordering::Release);
                migrating.store(true, Ordering::Release);
                let result = (|| {
                    let ch =
                        outboard_migration::connect(&destination).map_err(|e| e.to_string())?;
                    // A peer that stops reading or answering (link cut,
                    // destination stopped) fails the migration, not hangs it.
                    ch.set_timeout(Some(MIGRATION_IO_TIMEOUT.min(timeout)))
                        .map_err(|e| e.to_string())?;
                    let (out, reply) = ch.into_parts();
                    if reply.is_none() {
                        return Err(format!(
                            "{destination} cannot confirm; use snapshot for files"
                        ));
                    }
                    let params = migrate::SendParams {
                        downtime,
                        timeout,
                        live: true,
                    };
                    migrate::send(
                        out,
                        reply,
                        self.vm,
                        self.ram,
                        self.config,
                        self,
                        params,
                        cancel,
                    )
                    .map_err(|e| e.to_string())
                })();
                migrating.store(false, Ordering::Release);
                match result {
                    Ok(report) => {
                        eprintln!(
                            "outboard: migrated to {destination}: {} ms in all, {} ms down, {} bytes, {} rounds",
                            report.total_ms, report.downtime_ms, report.bytes_sent, report.rounds
                        );
                        (Ok(Some(report)), Some(StopReason::MigratedAway))
                    }
                    Err(e) => {
                        eprintln!("outboard: migration to {destination} failed, the guest runs on here: {e}");
                        (Err(e), None)
                    }
                }
            }
        }
    }
}

impl migrate::SourceVm for Running<'_> {
    fn pause(&self) -> Result<(), migrate::MigrateError> {
        use std::os::unix::thread::JoinHandleExt;
        self.control.request_pause();
        for t in self.threads {
            // SAFETY: the pthread handles are valid while the threads are
            // joinable (they are joined only after the command loop).
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
        if self.control.wait_parked(Duration::from_secs(5)) {
            Ok(())
        } else {
            self.control.resume();
            Err(migrate::MigrateError::State(
                "the vCPUs did not stop within 5 s".into(),
            ))
        }
    }

    fn resume(&self) {
        self.control.resume();
    }

    fn vcpu_states(&self) -> Result<Vec<crate::cpu::state::VcpuState>, migrate::MigrateError> {
        self.control
            .save_all(Duration::from_secs(5))
            .map_err(migrate::MigrateError::State)
    }

    fn guest_ended(&self) -> bool {
        let mut ended = self.ended.borrow_mut();
        if ended.is_none() {
            if let Ok(r) = self.stop_rx.try_recv() {
                *ended = Some(r);
            }
        }
        ended.is_some()
    }

    fn vmm_devices(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        if let Ok(s) = self.serial.lock() {
            let snap = migrate::SerialSnapshot(s.state());
            if let Ok(bytes) = serde_json::to_vec(&snap) {
                out.push(("serial".to_string(), bytes));
            }
        }
        out
    }
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in ram.memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`. `Vm` drops
        // its VmFd before `ram`; on an error in `Vm::new` the VmFd may close
        // after the unmapping, but no vCPU has run, so nothing accesses it.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The signal that asked the VMM to stop, 0 while none has.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// SIGINT and SIGTERM stop the guest cleanly (threads joined, terminal
/// restored) instead of killing the process mid-way.
fn install_stop_handlers() -> io::Result<()> {
    extern "C" fn on_stop(sig: libc::c_int) {
        STOP_SIGNAL.store(sig, Ordering::Relaxed);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is plain data; the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Signals every vCPU thread until it has left `KVM_RUN`, then joins it.
fn stop_threads(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    stop.store(true, Ordering::Release);
    for t in threads {
        while !t.is_finished() {
            // SAFETY: the pthread handle is valid until the thread is
            // joined, which happens only below.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = t.join();
    }
}

fn console_writer(config: &VmConfig) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match config.console.output {
        ConsoleOutput::Stdout => Box::new(io::stdout()),
        ConsoleOutput::None => Box::new(io::sink()),
        ConsoleOutput::File => {
            let path = config.console.path.clone().unwrap_or_default();
            let file = File::create(&path).map_err(|source| VmError::Console {
                path: path.display().to_string(),
                source,
            })?;
            Box::new(file)
        }
    })
}

/// Puts the terminal in non-canonical, no-echo mode for as long as it lives
/// (signals still work, so Ctrl-C stops the VMM).
struct TerminalMode(libc::termios);

impl Drop for TerminalMode {
    fn drop(&mut self) {
        // SAFETY: restores attributes read from this same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

fn spawn_console_input(serial: Arc<Mutex<SerialConsole>>) -> Option<TerminalMode> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer to a termios we own.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
        return None;
    }
    let mut raw = saved;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: valid descriptor and pointer to a termios we own.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
    // Restores the terminal on every path from here on.
    let guard = TerminalMode(saved);
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .ok()
                        .and_then(|mut s| s.enqueue_raw_bytes(pending).ok())
                        .unwrap_or(0);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
    spawned.ok().map(|_| guard)
}

/// The first KVM capability Outboard needs that this KVM lacks.
fn missing_capability(kvm: &Kvm) -> Option<&'static str> {
    [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ]
    .into_iter()
    .find(|(c, _)| !kvm.check_extension(*c))
    .map(|(_, name)| name)
}

/// The control API's view of a running VM: each call becomes a
/// [`Command`] served by the VM's main loop; info and cancel answer at
/// once, even during a migration.
pub struct ApiControl {
    handle: VmHandle,
    config: VmConfig,
    started: std::time::Instant,
}

impl ApiControl {
    /// Control of the VM behind `handle`, built from `config`.
    pub fn new(handle: VmHandle, config: &VmConfig) -> Self {
        ApiControl {
            handle,
            config: config.clone(),
            started: std::time::Instant::now(),
        }
    }

    fn call(&self, cmd: Command) -> Result<Option<migrate::Report>, crate::api::ApiError> {
        self.handle.call(cmd).map_err(|e| {
            if e.contains("already paused") || e.contains("not paused") {
                crate::api::ApiError::conflict(e)
            } else {
                crate::api::ApiError::internal(e)
            }
        })
    }
}

impl crate::api::VmControl for ApiControl {
    fn info(&self) -> crate::api::VmInfo {
        use crate::api::VmState as S;
        let state = if self.handle.status.migrating.load(Ordering::Acquire) {
            S::Migrating
        } else if self.handle.status.paused.load(Ordering::Acquire) {
            S::Paused
        } else {
            S::Running
        };
        crate::api::VmInfo {
            state,
            vcpus: self.config.machine.vcpus,
            memory_mib: self.config.machine.memory_mib,
            devices: crate::api::DeviceInfo::from_config(&self.config),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    fn pause(&self) -> Result<(), crate::api::ApiError> {
        self.call(Command::Pause).map(|_| ())
    }

    fn resume(&self) -> Result<(), crate::api::ApiError> {
        self.call(Command::Resume).map(|_| ())
    }

    fn shutdown(&self) -> Result<(), crate::api::ApiError> {
        self.call(Command::Shutdown).map(|_| ())
    }

    fn snapshot(
        &self,
        req: crate::api::SnapshotRequest,
    ) -> Result<crate::api::SnapshotReport, crate::api::ApiError> {
        let r = self
            .call(Command::Snapshot(req.destination))?
            .unwrap_or_default();
        Ok(crate::api::SnapshotReport {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            bytes_written: r.bytes_sent,
        })
    }

    fn migrate(
        &self,
        req: crate::api::MigrateRequest,
    ) -> Result<crate::api::MigrationReport, crate::api::ApiError> {
        if self.handle.status.migrating.load(Ordering::Acquire) {
            return Err(crate::api::ApiError::conflict(
                "a migration is already running",
            ));
        }
        let r = self
            .call(Command::Migrate {
                destination: req.destination,
                downtime: Duration::from_millis(req.downtime_ms),
                timeout: Duration::from_secs(req.timeout_s),
            })?
            .unwrap_or_default();
        Ok(crate::api::MigrationReport {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            bytes_sent: r.bytes_sent,
            rounds: r.rounds,
        })
    }

    fn cancel_migration(&self) -> Result<(), crate::api::ApiError> {
        if !self.handle.status.migrating.load(Ordering::Acquire) {
            return Err(crate::api::ApiError::conflict("no migration is running"));
        }
        self.handle.status.cancel.store(true, Ordering::Release);
        Ok(())
    }
}
