//! IDT (all 256 vectors go to the asm stubs in entry.rs), the common Rust
//! handler, per-CPU timer tick counters and the fatal-exception report.

use crate::{cpu, entry, lapic, serial};
use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering};

/// Register frame built by `isr_common` (lowest address first).
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

#[link_section = ".noinit.idt"]
static mut IDT: Idt = Idt([Gate {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    reserved: 0,
}; 256]);

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

/// Timer ticks per APIC ID.
static TICKS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];

/// Timer ticks counted so far on the CPU with `apic_id`.
pub fn ticks(apic_id: u8) -> u32 {
    TICKS[apic_id as usize].load(Ordering::Relaxed)
}

/// Fills the IDT. BSP only, once, before `load`.
///
/// # Safety
/// Must run before any CPU has loaded the IDT.
pub unsafe fn init() {
    // SAFETY: no CPU uses the IDT yet; only the BSP runs.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (v, g) in idt.0.iter_mut().enumerate() {
        let h = entry::isr_stub(v);
        *g = Gate {
            offset_lo: h as u16,
            selector: 0x10,
            ist: 0,
            type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (h >> 16) as u16,
            offset_hi: (h >> 32) as u32,
            reserved: 0,
        };
    }
}

/// Loads the IDT on this CPU.
pub fn load() {
    let p = DescPtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT was filled by `init` and lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) };
}

/// Loads an empty IDT and executes `ud2`: #UD, #GP and #DF cannot be
/// delivered, so the CPU triple-faults.
pub fn triple_fault() -> ! {
    let p = DescPtr { limit: 0, base: 0 };
    // SAFETY: deliberately ends the VM; nothing after this runs.
    unsafe { asm!("cli", "lidt [{}]", "ud2", in(reg) &p, options(noreturn, nostack)) };
}

/// Called by `isr_common` with the saved frame.
pub extern "C" fn isr_dispatch(frame: &mut Frame) {
    match frame.vector as u8 {
        v if v == lapic::TIMER_VECTOR => {
            TICKS[lapic::id() as usize].fetch_add(1, Ordering::Relaxed);
            lapic::eoi();
        }
        v if v == lapic::SPURIOUS_VECTOR => {}
        v if v == crate::blk::IRQ_VECTOR => crate::virtio_mmio::irq(),
        v if (crate::virtio_pci::MSIX_VECTOR_BASE
            ..crate::virtio_pci::MSIX_VECTOR_BASE + crate::virtio_pci::MAX_MSIX as u8)
            .contains(&v) =>
        {
            crate::virtio_pci::msix_irq()
        }
        v if crate::pci_fuzz::stray(v) => {}
        _ => fatal(frame),
    }
}

/// Reports an unexpected exception or interrupt and powers off with status 1.
fn fatal(frame: &Frame) -> ! {
    cpu::cli();
    {
        let mut l = serial::Line::begin_forced();
        let _ = write!(
            l,
            "exception vector={} rip={:#x} error={:#x}",
            frame.vector, frame.rip, frame.error
        );
    }
    crate::outln!("result FAIL exception");
    cpu::power_off(1)
}
