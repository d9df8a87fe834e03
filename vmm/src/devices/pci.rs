//! A vhost-user device as a virtio-pci function, with its KVM plumbing:
//! queue notify addresses in BAR 0 are ioeventfds (moved when the guest
//! moves the BAR), and each MSI-X vector is a GSI whose route carries the
//! vector's message. The backend's call eventfd for a queue, and the VMM's
//! own config-change eventfd, are irqfds on the GSI of the vector the
//! driver assigned them, registered only while that vector may be
//! delivered: KVM injects a signal that arrived while masked as soon as
//! the irqfd is registered again, so nothing is lost across a mask.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use outboard_transport::pci::PciFunction;
use outboard_transport::vhost_user::VhostUserDevice;
use outboard_transport::virtio_pci::{
    PciEffects, VirtioPciTransport, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, NO_VECTOR,
};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqRouting;

/// Which eventfd an irqfd registration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Notifier {
    /// The backend's call eventfd of a queue.
    Queue(usize),
    /// The VMM's configuration-change eventfd.
    Config,
}

/// A vhost-user device on the PCI bus.
pub struct VirtioPciFunction {
    name: String,
    transport: VirtioPciTransport<VhostUserDevice>,
    vm: Arc<VmFd>,
    routing: Arc<Mutex<IrqRouting>>,
    gsis: Vec<u32>,
    config_evt: EventFd,
    irqfds: Vec<(Notifier, u32)>,
    notify_base: Option<u64>,
    started: bool,
}

impl VirtioPciFunction {
    /// Wraps `transport`; `gsis` has one GSI per MSI-X vector.
    pub fn new(
        name: String,
        transport: VirtioPciTransport<VhostUserDevice>,
        vm: Arc<VmFd>,
        routing: Arc<Mutex<IrqRouting>>,
        gsis: Vec<u32>,
    ) -> std::io::Result<Self> {
        Ok(VirtioPciFunction {
            name,
            transport,
            vm,
            routing,
            gsis,
            config_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            irqfds: Vec::new(),
            notify_base: None,
            started: false,
        })
    }

    fn eventfd(&self, n: Notifier) -> Option<&EventFd> {
        match n {
            Notifier::Config => Some(&self.config_evt),
            Notifier::Queue(q) => self.transport.device().call_fds().get(q),
        }
    }

    fn gsi(&self, vector: u16) -> Option<u32> {
        self.gsis.get(usize::from(vector)).copied()
    }

    /// Brings KVM in line with the MSI-X state: routes for every vector,
    /// irqfds for the notifiers whose vector may be delivered.
    fn update_interrupts(&mut self) {
        let t = &self.transport;
        let routes: Vec<(u32, Option<_>)> = (0..t.vectors())
            .filter_map(|v| {
                let msg = t.vector_message(v).filter(|_| t.vector_deliverable(v));
                self.gsi(v).map(|g| (g, msg))
            })
            .collect();
        if let Ok(mut r) = self.routing.lock() {
            for (gsi, msg) in routes {
                if let Err(e) = r.set(gsi, msg) {
                    log::warn!("{}: {e}", self.name);
                }
            }
        }
        let mut wanted: Vec<(Notifier, u32)> = Vec::new();
        let mut want = |n: Notifier, v: u16| {
            if v != NO_VECTOR && t.vector_deliverable(v) {
                if let Some(g) = self.gsi(v) {
                    wanted.push((n, g));
                }
            }
        };
        want(Notifier::Config, t.config_vector());
        if self.started {
            for q in 0..t.device().call_fds().len() {
                want(Notifier::Queue(q), t.queue_vector(q));
            }
        }
        let stale: Vec<(Notifier, u32)> = self
            .irqfds
            .iter()
            .filter(|r| !wanted.contains(r))
            .copied()
            .collect();
        for (n, gsi) in stale {
            if let Some(fd) = self.eventfd(n) {
                if let Err(e) = self.vm.unregister_irqfd(fd, gsi) {
                    log::warn!("{}: KVM_IRQFD deassign {n:?}: {e}", self.name);
                }
            }
            self.irqfds.retain(|r| *r != (n, gsi));
        }
        let before = self.irqfds.len();
        for (n, gsi) in wanted {
            if self.irqfds.contains(&(n, gsi)) {
                continue;
            }
            let Some(fd) = self.eventfd(n) else { continue };
            match self.vm.register_irqfd(fd, gsi) {
                Ok(()) => self.irqfds.push((n, gsi)),
                Err(e) => log::warn!("{}: KVM_IRQFD {n:?} on GSI {gsi}: {e}", self.name),
            }
        }
        if self.irqfds.len() != before {
            let t = &self.transport;
            let list: Vec<String> = self
                .irqfds
                .iter()
                .map(|(n, gsi)| {
                    let v = match n {
                        Notifier::Config => t.config_vector(),
                        Notifier::Queue(q) => t.queue_vector(*q),
                    };
                    let vector = t.vector_message(v).map_or(0, |m| m.data & 0xff);
                    match n {
                        Notifier::Config => {
                            format!("config: MSI-X {v} (GSI {gsi}, vector {vector:#x})")
                        }
                        Notifier::Queue(q) => {
                            format!("queue {q}: MSI-X {v} (GSI {gsi}, vector {vector:#x})")
                        }
                    }
                })
                .collect();
            log::info!("{}: interrupts {}", self.name, list.join(", "));
        }
    }

    /// Keeps the queue notify ioeventfds where BAR 0 decodes now.
    fn update_notify(&mut self) {
        let decoded = self
            .transport
            .decoded_bars()
            .iter()
            .any(|(bar, _, _)| *bar == 0);
        let base = decoded.then(|| self.transport.bar_address() + NOTIFY_OFFSET);
        if base == self.notify_base {
            return;
        }
        let kicks = self.transport.device().kick_fds();
        let addr =
            |b: u64, q: usize| IoEventAddress::Mmio(b + q as u64 * u64::from(NOTIFY_MULTIPLIER));
        if let Some(old) = self.notify_base {
            for (q, kick) in kicks.iter().enumerate() {
                if let Err(e) = self.vm.unregister_ioevent(kick, &addr(old, q), NoDatamatch) {
                    log::warn!("{}: KVM_IOEVENTFD deassign queue {q}: {e}", self.name);
                }
            }
        }
        let mut registered = base;
        if let Some(new) = base {
            for (q, kick) in kicks.iter().enumerate() {
                if let Err(e) = self.vm.register_ioevent(kick, &addr(new, q), NoDatamatch) {
                    log::warn!("{}: KVM_IOEVENTFD queue {q} at {new:#x}: {e}", self.name);
                    registered = None;
                }
            }
        }
        self.notify_base = registered;
    }

    fn raise_config(&mut self) {
        let v = self.transport.config_vector();
        if v != NO_VECTOR && self.transport.vector_deliverable(v) {
            if let Err(e) = self.config_evt.write(1) {
                log::warn!("{}: cannot raise the config interrupt: {e}", self.name);
            }
        } else if v != NO_VECTOR {
            self.transport.set_vector_pending(v, true);
        }
    }

    fn apply(&mut self, e: PciEffects) {
        if e.activated {
            self.started = true;
        }
        if e.reset {
            self.started = false;
        }
        if e.interrupts_changed || e.activated || e.reset {
            self.update_interrupts();
        }
        if e.config_interrupt {
            self.raise_config();
        }
        if let Some(q) = e.notify {
            if let Some(kick) = self.transport.device().kick_fds().get(usize::from(q)) {
                let _ = kick.write(1);
            }
        }
    }

    /// The backend went away: DEVICE_NEEDS_RESET, and tell the driver.
    pub fn backend_lost(&mut self) {
        if self.transport.set_needs_reset() {
            self.raise_config();
        }
    }
}

impl PciFunction for VirtioPciFunction {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.transport.read_config(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let e = self.transport.write_config(offset, data);
        self.apply(e);
        self.update_notify();
    }

    fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        self.transport.decoded_bars()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.transport.read_bar(bar, offset, data);
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let e = self.transport.write_bar(bar, offset, data);
        self.apply(e);
    }
}
