//! Secondary CPUs: copies the real-mode trampoline to 0x8000, starts the APs
//! listed in the MP table with INIT / SIPI / SIPI, and runs each AP: own stack,
//! our GDT / page tables / IDT, LAPIC on, check-in, one timer tick of its own.
//! Waits are counted in BSP timer ticks (1 ms each), not busy-loop constants.

use crate::mptable::{MpInfo, MAX_CPUS};
use crate::{cpu, entry, interrupts, lapic, outln};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

/// Most APs.
pub const MAX_APS: usize = MAX_CPUS - 1;
/// Stack size of each AP.
pub const AP_STACK_SIZE: usize = 16 * 1024;

/// CR3 for the APs (read by the 32-bit trampoline code; below 4 GiB).
pub static AP_CR3: AtomicU32 = AtomicU32::new(0);
/// Next AP index; each AP takes one with `lock xadd` to pick its stack.
pub static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(4096))]
pub struct ApStacks(pub [[u8; AP_STACK_SIZE]; MAX_APS]);

/// AP stacks (not zeroed; index i's stack top is at (i + 1) * AP_STACK_SIZE).
#[link_section = ".noinit.ap_stacks"]
pub static mut AP_STACKS: ApStacks = ApStacks([[0; AP_STACK_SIZE]; MAX_APS]);

/// Set by the `counter` scenario before `start_aps`: after their timer
/// check, the APs run `counter::ap_main` instead of halting.
pub static AP_COUNTER: AtomicBool = AtomicBool::new(false);

/// Set by each AP (indexed by APIC ID) as soon as it runs Rust code.
static STARTED: [AtomicBool; 256] = [const { AtomicBool::new(false) }; 256];
/// APs that checked in.
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// APs that saw a tick of their own LAPIC timer.
static AP_TIMER_OK: AtomicU32 = AtomicU32::new(0);
/// APIC ID of each online CPU by CPU number (0 = BSP).
static CPU_APIC: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];
/// APIC ID of the BSP.
static BSP_APIC: AtomicU8 = AtomicU8::new(0);

/// Waits (halting between ticks) until `cond` holds or `max_ticks` BSP timer
/// ticks passed. Needs the BSP timer running and interrupts enabled.
pub fn wait_ticks_until(max_ticks: u32, cond: impl Fn() -> bool) -> bool {
    let me = BSP_APIC.load(Ordering::Relaxed);
    let start = interrupts::ticks(me);
    loop {
        if cond() {
            return true;
        }
        if interrupts::ticks(me).wrapping_sub(start) >= max_ticks {
            return cond();
        }
        cpu::sti_hlt();
    }
}

/// Records the BSP's APIC ID (CPU 0).
pub fn set_bsp(apic: u8) {
    BSP_APIC.store(apic, Ordering::Relaxed);
    CPU_APIC[0].store(apic, Ordering::Relaxed);
}

/// Starts every enabled AP of the MP table except the BSP; returns how many
/// checked in. The BSP timer must be running, interrupts enabled.
pub fn start_aps(mp: &MpInfo, cr3: u64) -> u32 {
    let bsp = BSP_APIC.load(Ordering::Relaxed);
    let aps = || {
        mp.apic_ids[..mp.count]
            .iter()
            .copied()
            .filter(move |&a| a != bsp)
    };
    let n = aps().count().min(MAX_APS) as u32;
    if n == 0 {
        return 0;
    }
    let tramp = entry::trampoline();
    // SAFETY: 0x8000.. is low RAM, identity mapped by paging::init, not used by the
    // image; the boot information there was copied to BSS by bootinfo::capture.
    unsafe {
        core::ptr::copy_nonoverlapping(
            tramp.as_ptr(),
            entry::TRAMPOLINE_ADDR as *mut u8,
            tramp.len(),
        );
    }
    AP_CR3.store(cr3 as u32, Ordering::SeqCst);
    AP_NEXT_INDEX.store(0, Ordering::SeqCst);

    for a in aps() {
        lapic::send_init(a);
    }
    wait_ticks_until(2, || false);
    let page = (entry::TRAMPOLINE_ADDR >> 12) as u8;
    for a in aps() {
        lapic::send_startup(a, page);
    }
    let all_started = || aps().all(|a| STARTED[a as usize].load(Ordering::Acquire));
    if !wait_ticks_until(5, all_started) {
        for a in aps().filter(|&a| !STARTED[a as usize].load(Ordering::Acquire)) {
            lapic::send_startup(a, page);
        }
    }
    wait_ticks_until(1000, || ONLINE.load(Ordering::Acquire) >= n);
    ONLINE.load(Ordering::Acquire)
}

/// Waits until every online AP counted a tick of its own timer; returns the count.
pub fn wait_ap_timers(online_aps: u32) -> u32 {
    wait_ticks_until(1000, || AP_TIMER_OK.load(Ordering::Acquire) >= online_aps);
    AP_TIMER_OK.load(Ordering::Acquire)
}

/// APIC ID of CPU number `cpu` (0 = BSP), if online.
pub fn cpu_apic(cpu: usize) -> u8 {
    CPU_APIC[cpu.min(MAX_CPUS - 1)].load(Ordering::Relaxed)
}

/// Rust entry of an AP, called by `ap_start64` on its own stack.
pub extern "C" fn ap_main(index: u32) -> ! {
    interrupts::load();
    let apic = lapic::id();
    STARTED[apic as usize].store(true, Ordering::Release);
    lapic::enable();
    let cpu_num = index as usize + 1;
    CPU_APIC[cpu_num.min(MAX_CPUS - 1)].store(apic, Ordering::Relaxed);
    outln!("cpu {} (apic {}) online", cpu_num, apic);
    ONLINE.fetch_add(1, Ordering::Release);

    lapic::start_timer(lapic::TIMER_COUNT_1MS);
    while interrupts::ticks(apic) == 0 {
        cpu::sti_hlt();
    }
    lapic::stop_timer();
    AP_TIMER_OK.fetch_add(1, Ordering::Release);
    if AP_COUNTER.load(Ordering::Acquire) {
        crate::counter::ap_main(cpu_num);
    }
    loop {
        cpu::sti_hlt();
    }
}
