//! Local APIC in xAPIC mode at 0xFEE00000: enable, periodic timer, EOI, IPIs.

use crate::cpu;

const BASE: u64 = 0xfee0_0000;
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Vector of the LAPIC timer interrupt.
pub const TIMER_VECTOR: u8 = 0x40;
/// Spurious interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Initial count with divide-by-16: 1 ms per tick with the usual 1 GHz APIC
/// bus of KVM and QEMU.
pub const TIMER_COUNT_1MS: u32 = 62_500;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // Start-up IPI

fn read(reg: u32) -> u32 {
    // SAFETY: the LAPIC page is mapped uncached by paging::init; aligned 32-bit MMIO.
    unsafe { core::ptr::read_volatile((BASE + reg as u64) as *const u32) }
}

fn write(reg: u32, v: u32) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((BASE + reg as u64) as *mut u32, v) }
}

/// This CPU's APIC ID.
pub fn id() -> u8 {
    (read(REG_ID) >> 24) as u8
}

/// Enables this CPU's LAPIC (APIC base MSR enable bit, SVR, TPR = 0) and
/// masks LINT0/LINT1, so an 8259 PIC left programmed by firmware (vector 8 for
/// IRQ0 under SeaBIOS) cannot deliver through virtual-wire mode.
pub fn enable() {
    let base = cpu::rdmsr(MSR_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0 {
        cpu::wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
    }
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
}

/// Starts the periodic timer on `TIMER_VECTOR`.
pub fn start_timer(count: u32) {
    write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    write(REG_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, count);
}

/// Stops and masks the timer.
pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, 0);
}

/// Current count of the timer.
pub fn timer_current() -> u32 {
    read(REG_TIMER_CURRENT)
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn send_ipi(dest: u8, icr_low: u32) {
    write(REG_ICR_HIGH, (dest as u32) << 24);
    write(REG_ICR_LOW, icr_low);
    let mut n = 0;
    while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 && n < 100_000 {
        n += 1;
        cpu::pause();
    }
}

/// Sends INIT (level assert) to `dest`.
pub fn send_init(dest: u8) {
    send_ipi(dest, ICR_INIT);
}

/// Sends a start-up IPI to `dest`; the AP starts at `page << 12`.
pub fn send_startup(dest: u8, page: u8) {
    send_ipi(dest, ICR_STARTUP | page as u32);
}
