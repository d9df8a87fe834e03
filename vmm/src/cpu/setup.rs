//! Initial register state of a vCPU: MSRs and LAPIC for every vCPU, and
//! general, segment and FPU registers for the boot vCPU, per entry protocol
//! (Linux 64-bit or PVH 32-bit). Secondary vCPUs wait in KVM for INIT/SIPI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::{
    gdt_for, BOOT_STACK_POINTER, GDT_START, IDT_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::config::EntryProtocol;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The MSR list could not be built.
    #[error("cannot build the list of {0} boot MSRs")]
    MsrList(usize),
    /// KVM took fewer MSRs than given.
    #[error("KVM_SET_MSRS set {set} of {total} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |source| SetupError::Kvm { what, source }
}

/// MSRs and LAPIC interrupt lines, for every vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| SetupError::MsrList(entries.len()))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(SetupError::Msrs {
            set,
            total: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: &mut [i8] = &mut lapic.regs[reg..reg + 4];
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *d = s as i8;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// General, segment and FPU registers of the boot vCPU for `protocol`,
/// entering at `entry`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    protocol: EntryProtocol,
    entry: u64,
) -> Result<(), SetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        EntryProtocol::Linux => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let gdt = gdt_for(protocol);
    let code = segment(gdt[2], 2);
    let data = segment(gdt[3], 3);
    let tss = segment(gdt[4], 4);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match protocol {
        EntryProtocol::Linux => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    Ok(())
}

/// Unpacks GDT entry `entry` at index `index` into a KVM segment register.
pub(crate) fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let mut limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::gdt_entry;

    #[test]
    fn code64_segment_is_long_mode() {
        let s = segment(gdt_entry(0xa09b, 0, 0xfffff), 2);
        assert_eq!(s.selector, 0x10);
        assert_eq!((s.l, s.db, s.present, s.s, s.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn code32_segment_is_protected_mode() {
        let s = segment(gdt_entry(0xc09b, 0, 0xfffff), 2);
        assert_eq!((s.l, s.db), (0, 1));
    }

    #[test]
    fn tss_segment_is_busy_type() {
        let s = segment(gdt_entry(0x808b, 0, 0xfffff), 4);
        assert_eq!((s.type_, s.s, s.selector), (0xb, 0, 0x20));
    }
}
