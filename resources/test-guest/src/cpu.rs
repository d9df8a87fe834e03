//! Thin wrappers around privileged x86 instructions: port I/O, MSRs, control
//! registers, interrupt flag, halting, power off and reset.

use core::arch::asm;

/// I/O port the VMM (or QEMU's isa-debug-exit) treats as "power off with status".
pub const POWER_OFF_PORT: u16 = 0xf4;
/// i8042 command port; writing 0xFE pulses the reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port input has no memory effects; the guest owns all ports it uses.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port output has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 16-bit word from an I/O port.
#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as in `inb`.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a 16-bit word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit dword from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a 32-bit dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// CPUID leaf `leaf` (subleaf 0): (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only writes the four registers; rbx is reserved by LLVM,
    // so it is saved in another register around the instruction.
    unsafe {
        asm!(
            "mov {t:r}, rbx",
            "cpuid",
            "xchg {t:r}, rbx",
            t = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags)
        )
    };
    (a, b, c, d)
}

/// Physical address width (CPUID 0x80000008 EAX[7:0]; 36 if not reported).
pub fn phys_bits() -> u32 {
    if cpuid(0x8000_0000).0 < 0x8000_0008 {
        return 36;
    }
    match cpuid(0x8000_0008).0 & 0xff {
        0 => 36,
        n => n,
    }
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called with architectural MSRs that exist on x86-64 (APIC base).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only called with architectural MSRs and values derived from their reads.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Loads CR3 (switches page tables).
///
/// # Safety
/// `cr3` must point to valid page tables that map the running code, stack and data.
pub unsafe fn write_cr3(cr3: u64) {
    // SAFETY: the caller guarantees the new tables map everything in use.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
}

/// Enables interrupts.
#[inline(always)]
pub fn sti() {
    // SAFETY: the IDT is loaded before any caller enables interrupts.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
#[inline(always)]
pub fn cli() {
    // SAFETY: disabling interrupts is always sound.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Enables interrupts and halts until the next one (atomically: `sti; hlt`).
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: the IDT is loaded; `sti` delays interrupts by one instruction so no
    // wake-up is lost between the two. Memory clobber: handlers update counters.
    unsafe { asm!("sti", "hlt", options(nostack)) };
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt just stops the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Powers the VM off with `status` (port 0xf4), then halts if that did nothing.
pub fn power_off(status: u8) -> ! {
    outb(POWER_OFF_PORT, status);
    halt_forever()
}

/// Masks every line of both 8259 PICs, which firmware may have left
/// programmed (SeaBIOS: IRQ0 on vector 8). Harmless if there is no PIC.
pub fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Asks the i8042 to pulse the reset line.
pub fn i8042_reset() {
    outb(I8042_COMMAND_PORT, 0xfe);
}
