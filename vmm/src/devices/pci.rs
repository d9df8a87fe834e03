//! A vhost-user device as a virtio-pci function, with its KVM plumbing:
//! queue notify addresses in BAR 0 are ioeventfds (moved when the guest
//! moves the BAR); the backend's call eventfd for a queue and the VMM's own
//! config-change eventfd are irqfds on the GSI of the MSI-X vector the
//! driver assigned them ([`MsixIrqs`]).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use outboard_transport::pci::PciFunction;
use outboard_transport::vhost_user::VhostUserDevice;
use outboard_transport::virtio_pci::{
    PciEffects, VirtioPciTransport, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, NO_VECTOR,
};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{MsixIrqs, Notifier};
use crate::irq::IrqRouting;

/// A vhost-user device on the PCI bus.
pub struct VirtioPciFunction {
    name: String,
    transport: VirtioPciTransport<VhostUserDevice>,
    vm: Arc<VmFd>,
    irqs: MsixIrqs,
    config_evt: EventFd,
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
            irqs: MsixIrqs::new(&name, vm.clone(), routing, gsis),
            name,
            transport,
            vm,
            config_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            notify_base: None,
            started: false,
        })
    }

    /// Brings KVM in line with the MSI-X state.
    fn update_interrupts(&mut self) {
        let t = &self.transport;
        let calls = t.device().call_fds();
        let mut notifiers = vec![Notifier {
            label: "config".into(),
            fd: &self.config_evt,
            vector: t.config_vector(),
        }];
        for (q, fd) in calls.iter().enumerate() {
            notifiers.push(Notifier {
                label: format!("queue {q}"),
                fd,
                vector: if self.started {
                    t.queue_vector(q)
                } else {
                    NO_VECTOR
                },
            });
        }
        self.irqs.update(t.msix(), &notifiers);
        let v = self.transport.config_vector();
        if v != NO_VECTOR && self.irqs.deliverable(self.transport.msix(), v) {
            self.transport.set_vector_pending(v, false);
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
                    log::warn!(
                        "{}: KVM_IOEVENTFD queue {q} at {new:#x}: {e}; notifications go through the VMM",
                        self.name
                    );
                    // Undo this pass: all or none, so nothing is left behind.
                    for (p, k) in kicks.iter().enumerate().take(q) {
                        let _ = self.vm.unregister_ioevent(k, &addr(new, p), NoDatamatch);
                    }
                    registered = None;
                    break;
                }
            }
        }
        self.notify_base = registered;
    }

    /// Signals the config eventfd: KVM delivers it now, or when the
    /// vector's irqfd is registered again (unmasked); the PBA shows it
    /// pending meanwhile.
    fn raise_config(&mut self) {
        let v = self.transport.config_vector();
        if v == NO_VECTOR {
            return;
        }
        if let Err(e) = self.config_evt.write(1) {
            log::warn!("{}: cannot raise the config interrupt: {e}", self.name);
        }
        if !self.irqs.deliverable(self.transport.msix(), v) {
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
