//! What KVM holds for a vCPU and for the VM's in-kernel devices, saved and
//! restored for live migration and snapshots: registers, special
//! registers, FPU/SSE/AVX state (xsave), XCRs, every MSR KVM lists, the
//! local APIC, pending events, the multiprocessing state and the debug
//! registers; the PIC pair and the IOAPIC, the PIT, and the KVM clock.
//!
//! The structures are KVM's own (kvm-bindings serializes them as their
//! bytes). Saved state is untrusted on restore: KVM checks each structure
//! and refuses what it cannot load; sizes are checked here.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Most MSRs saved per vCPU (KVM lists a few hundred at most).
pub const MAX_MSRS: usize = 1024;

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("KVM {op} {done} of {asked} MSRs (first refused: {first:#x})")]
    Msrs {
        /// "read" or "wrote".
        op: &'static str,
        /// How many it did.
        done: usize,
        /// How many were asked.
        asked: usize,
        /// The first MSR it refused.
        first: u32,
    },
    /// Saved state that cannot be right.
    #[error("saved state: {0}")]
    Invalid(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists that it could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
}

/// The MSRs to save: what KVM lists, minus what it cannot read here.
pub fn msr_list(system: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = system
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().iter().copied().take(MAX_MSRS).collect())
}

/// Reads the MSRs in `indices` that this vCPU can give (KVM stops at the
/// first it refuses; those are skipped and the rest read again).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let got = msrs.as_slice();
        out.extend_from_slice(got.get(..n).unwrap_or(got));
        // Skip the one KVM refused and go on after it.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

impl VcpuState {
    /// Saves `vcpu` (which must not be running), reading the MSRs `msrs`.
    pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, StateError> {
        // Events and mp_state first: reading them may flush state KVM
        // still holds for a halted or waiting vCPU.
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            msrs: read_msrs(vcpu, msrs)?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            events,
            mp_state,
            debug_regs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads the state into `vcpu` (created with the same CPUID), in the
    /// order KVM needs: special registers before MSRs (EFER), the LAPIC
    /// before events, mp_state last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(StateError::Invalid(format!(
                "{} MSRs, more than {MAX_MSRS}",
                self.msrs.len()
            )));
        }
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave (4 KiB), what KVM reads
        // for KVM_SET_XSAVE without XSAVE2 sizes.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(StateError::Msrs {
                op: "wrote",
                done: n,
                asked: self.msrs.len(),
                first: self.msrs.get(n).map_or(0, |e| e.index),
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

/// The VM's in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Saves the irqchip, PIT and clock of `vm` (vCPUs stopped).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads the state into `vm`. The clock goes first, so timers restored
    /// after it count from the right time.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        let ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        if ids != IRQCHIPS {
            return Err(StateError::Invalid(format!(
                "irqchips {ids:?}, expected PIC master, PIC slave, IOAPIC"
            )));
        }
        let mut clock = self.clock;
        // Only the clock value; KVM refuses flags it did not hand out here.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_pit_config;

    fn vm() -> (Kvm, VmFd) {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("create_vm");
        vm.create_irq_chip().expect("irqchip");
        vm.create_pit2(kvm_pit_config::default()).expect("pit");
        (kvm, vm)
    }

    #[test]
    fn vcpu_state_survives_a_round_trip_into_a_fresh_vcpu() {
        let (kvm, vm) = vm();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("cpuid");
        let a = vm.create_vcpu(0).expect("vcpu");
        a.set_cpuid2(&cpuid).expect("cpuid");
        let mut regs = a.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x10_0000;
        regs.rflags = 2;
        a.set_regs(&regs).unwrap();
        let msrs = msr_list(&kvm).unwrap();
        let saved = VcpuState::save(&a, &msrs).unwrap();
        assert!(!saved.msrs.is_empty());
        let json = serde_json::to_string(&saved).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();

        let (_kvm2, vm2) = super::tests::vm();
        let b = vm2.create_vcpu(0).expect("vcpu");
        b.set_cpuid2(&cpuid).expect("cpuid");
        back.restore(&b).unwrap();
        let r = b.get_regs().unwrap();
        assert_eq!((r.rax, r.rip), (0x1234_5678, 0x10_0000));
        assert_eq!(b.get_sregs().unwrap().cr0, saved.sregs.cr0);
        assert_eq!(
            VcpuState::save(&b, &msrs).unwrap().msrs.len(),
            saved.msrs.len()
        );
    }

    #[test]
    fn vm_state_round_trips_and_bad_state_is_refused() {
        let (_kvm, vm) = vm();
        let saved = VmState::save(&vm).unwrap();
        let (_kvm2, vm2) = super::tests::vm();
        saved.restore(&vm2).unwrap();
        let again = VmState::save(&vm2).unwrap();
        assert_eq!(again.irqchips.len(), 3);
        let mut bad = saved;
        bad.irqchips.pop();
        assert!(bad.restore(&vm2).is_err());
    }
}
