//! Keeps KVM in line with one PCI function's MSI-X state, whoever emulates
//! the table (virtio-pci here, the VMM for a vfio-user function): every
//! vector has a fixed GSI whose route carries the vector's message while it
//! may be delivered, and each notifier eventfd (a queue's call eventfd, a
//! config eventfd, a vfio-user vector's eventfd) is an irqfd on its
//! vector's GSI only while that vector is deliverable. KVM injects a signal
//! that arrived while the irqfd was away as soon as it is registered again,
//! so masking loses nothing.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use outboard_transport::pci::msix::Msix;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqRouting;

/// "No vector" as virtio-pci says it.
const NO_VECTOR: u16 = 0xffff;

/// An eventfd that signals one vector.
pub struct Notifier<'a> {
    /// Stable name in logs ("config", "queue 0", "vector 3").
    pub label: String,
    /// The eventfd.
    pub fd: &'a EventFd,
    /// Its vector; [`u16::MAX`] (or any vector past the table) for none.
    pub vector: u16,
}

/// One function's vectors in KVM.
pub struct MsixIrqs {
    name: String,
    vm: Arc<VmFd>,
    routing: Arc<Mutex<IrqRouting>>,
    gsis: Vec<u32>,
    irqfds: Vec<(String, u32)>,
}

impl MsixIrqs {
    /// `gsis` has one GSI per vector.
    pub fn new(name: &str, vm: Arc<VmFd>, routing: Arc<Mutex<IrqRouting>>, gsis: Vec<u32>) -> Self {
        MsixIrqs {
            name: name.to_string(),
            vm,
            routing,
            gsis,
            irqfds: Vec::new(),
        }
    }

    fn gsi(&self, vector: u16) -> Option<u32> {
        self.gsis.get(usize::from(vector)).copied()
    }

    /// Routes every vector per `msix` and registers exactly the notifiers
    /// whose vector is deliverable. `notifiers` must always list every
    /// notifier (with no vector when inactive) so stale ones can be
    /// unregistered.
    pub fn update(&mut self, msix: &Msix, notifiers: &[Notifier<'_>]) {
        let wanted: Vec<(String, u32)> = notifiers
            .iter()
            .filter(|n| n.vector != NO_VECTOR && msix.deliverable(n.vector))
            .filter_map(|n| self.gsi(n.vector).map(|g| (n.label.clone(), g)))
            .collect();
        let fd_of = |label: &str| notifiers.iter().find(|n| n.label == label).map(|n| n.fd);
        let stale: Vec<(String, u32)> = self
            .irqfds
            .iter()
            .filter(|r| !wanted.contains(r))
            .cloned()
            .collect();
        for (label, gsi) in stale {
            if let Some(fd) = fd_of(&label) {
                if let Err(e) = self.vm.unregister_irqfd(fd, gsi) {
                    log::warn!("{}: KVM_IRQFD deassign {label}: {e}", self.name);
                }
            }
            self.irqfds.retain(|r| *r != (label.clone(), gsi));
        }
        let routes: Vec<(u32, Option<_>)> = (0..msix.vectors())
            .filter_map(|v| {
                // The last message stays routed while the vector is
                // masked (its irqfd is away then): a signal KVM took just
                // before the deassign still lands.
                let msg = msix.message(v).filter(|_| msix.enabled());
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
        let mut changed = false;
        for (label, gsi) in wanted {
            if self.irqfds.contains(&(label.clone(), gsi)) {
                continue;
            }
            let Some(fd) = fd_of(&label) else { continue };
            match self.vm.register_irqfd(fd, gsi) {
                Ok(()) => {
                    self.irqfds.push((label, gsi));
                    changed = true;
                }
                Err(e) => log::warn!("{}: KVM_IRQFD {label} on GSI {gsi}: {e}", self.name),
            }
        }
        if changed {
            let list: Vec<String> = self
                .irqfds
                .iter()
                .map(|(label, gsi)| {
                    let n = notifiers.iter().find(|n| &n.label == label);
                    let v = n.map_or(NO_VECTOR, |n| n.vector);
                    let vector = msix.message(v).map_or(0, |m| m.data & 0xff);
                    format!("{label}: MSI-X {v} (GSI {gsi}, vector {vector:#x})")
                })
                .collect();
            log::info!("{}: interrupts {}", self.name, list.join(", "));
        }
    }

    /// Whether `vector` may be delivered and has a GSI.
    pub fn deliverable(&self, msix: &Msix, vector: u16) -> bool {
        vector != NO_VECTOR && msix.deliverable(vector) && self.gsi(vector).is_some()
    }
}
