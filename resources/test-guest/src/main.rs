//! Outboard's test guest: a tiny freestanding x86-64 kernel. It boots through
//! the Linux 64-bit boot protocol (ELF entry) or PVH (ELF note), reads a
//! scenario from its command line (`tg.scenario=...`), reports on COM1 with
//! lines starting `outboard-tg: ` and powers off through port 0xf4.
//!
//! It uses only general-purpose instructions that KVM's instruction emulator
//! handles (no SSE, popcnt, cmpxchg16b, xsave, int3, clac/stac), so it runs on
//! hosts where every guest instruction is emulated.

#![no_std]
#![no_main]

mod blk;
mod bootinfo;
mod counter;
mod cpu;
mod entry;
mod interrupts;
mod ioapic;
mod lapic;
mod memtest;
mod mptable;
mod paging;
mod pci;
mod pci_fuzz;
mod scenario;
mod serial;
mod smp;
mod transport;
mod virtio_mmio;
mod virtio_pci;
mod virtqueue;

use core::fmt::Write;

/// First Rust code on the BSP, called by both entry paths with the loader's
/// boot structure (`boot_params` or `hvm_start_info`) and the entry kind.
pub extern "C" fn rust_start(info: u64, kind: u32) -> ! {
    // SAFETY: first code on the BSP; no other CPU runs; the entry code set up
    // the identity map the parser relies on.
    let bi = unsafe { bootinfo::capture(info, kind) };
    scenario::run(bi)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cpu::cli();
    {
        let mut l = serial::Line::begin_forced();
        let _ = write!(l, "panic: {}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(l, " at {}:{}", loc.file(), loc.line());
        }
    }
    outln!("result FAIL panic");
    cpu::power_off(1)
}
