//! KVM's GSI routing table: the in-kernel PIC and IOAPIC pins (KVM's
//! default table, which any `KVM_SET_GSI_ROUTING` replaces, so it is
//! rebuilt here) plus one MSI route per MSI-X vector of the PCI functions.
//! A vector's GSI is fixed when its function is created; the guest
//! programming the vector only changes the route's message.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use outboard_transport::pci::MsiMessage;

/// IOAPIC pins (GSIs 0..24 are theirs).
pub const IOAPIC_PINS: u32 = 24;
/// Most MSI routes (KVM allows 4096 routes in all).
pub const MAX_MSI_ROUTES: u32 = 2048;

/// Errors changing the routing table.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// No GSIs left.
    #[error("out of interrupt routes ({MAX_MSI_ROUTES} MSI vectors in all)")]
    Exhausted,
    /// KVM refused the table.
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Kvm(kvm_ioctls::Error),
    /// The table could not be built.
    #[error("cannot build the routing table: {0}")]
    Table(String),
}

/// The VM's interrupt routes.
pub struct IrqRouting {
    vm: Arc<VmFd>,
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl IrqRouting {
    /// KVM's default routes only.
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouting {
            vm,
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
        }
    }

    /// `n` fresh GSIs for MSI vectors (routed nowhere until set).
    pub fn allocate(&mut self, n: u32) -> Result<Vec<u32>, IrqError> {
        let end = self
            .next_gsi
            .checked_add(n)
            .filter(|e| *e <= IOAPIC_PINS + MAX_MSI_ROUTES)
            .ok_or(IrqError::Exhausted)?;
        let gsis = (self.next_gsi..end).collect();
        self.next_gsi = end;
        Ok(gsis)
    }

    /// Routes `gsi` to `message`, or removes its route (`None`), and hands
    /// KVM the new table when something changed.
    pub fn set(&mut self, gsi: u32, message: Option<MsiMessage>) -> Result<(), IrqError> {
        let old = match message {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        };
        if old == message {
            return Ok(());
        }
        let result = self.commit();
        if result.is_err() {
            // KVM kept the old table: so does this map.
            match old {
                Some(m) => self.msi.insert(gsi, m),
                None => self.msi.remove(&gsi),
            };
        }
        result
    }

    fn commit(&self) -> Result<(), IrqError> {
        let entries = default_routes()
            .into_iter()
            .chain(self.msi.iter().map(|(gsi, m)| msi_route(*gsi, m)))
            .collect::<Vec<_>>();
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|e| IrqError::Table(format!("{e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(IrqError::Kvm)
    }
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default table: GSI n to IOAPIC pin n, and GSIs 0..16 also to the
/// PICs.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            routes.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

fn msi_route(gsi: u32, m: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_kvm() {
        let r = default_routes();
        // 16 PIC routes and 24 IOAPIC routes.
        assert_eq!(r.len(), 40);
        let pins: Vec<(u32, u32)> = r
            .iter()
            .filter(|e| e.gsi == 9)
            .map(|e| {
                // SAFETY: the entries were built as irqchip routes.
                unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        assert_eq!(
            pins,
            vec![(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]
        );
    }

    #[test]
    fn gsis_run_out() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create_vm"));
        let mut r = IrqRouting::new(vm);
        assert_eq!(r.allocate(3).unwrap(), vec![24, 25, 26]);
        assert!(r.allocate(MAX_MSI_ROUTES).is_err());
    }
}
