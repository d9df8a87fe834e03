//! The I/O APIC at 0xFEC00000 (IOREGSEL at +0, IOWIN at +0x10): routing one
//! pin to a vector on an APIC (edge, active high, fixed, physical
//! destination).

const BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_VERSION: u32 = 0x01;
const REG_REDIR: u32 = 0x10;
const REDIR_MASKED: u32 = 1 << 16;

fn read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC page lies in the 3..4 GiB hole, mapped uncached by
    // paging::init; aligned 32-bit MMIO. BSP only, so the select/window pair
    // is not raced.
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::read_volatile((BASE + IOWIN) as *const u32)
    }
}

fn write(reg: u32, v: u32) {
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::write_volatile((BASE + IOWIN) as *mut u32, v);
    }
}

/// Number of redirection entries (max redirection entry + 1); 0 if no IOAPIC
/// answers (all-ones reads).
pub fn pins() -> u32 {
    let v = read(REG_VERSION);
    if v == u32::MAX {
        0
    } else {
        ((v >> 16) & 0xff) + 1
    }
}

/// Routes `pin` to `vector` on APIC `dest`: fixed delivery, physical
/// destination, active high, edge triggered, unmasked.
pub fn route(pin: u32, vector: u8, dest: u8) {
    let reg = REG_REDIR + 2 * pin;
    write(reg, REDIR_MASKED | vector as u32);
    write(reg + 1, (dest as u32) << 24);
    write(reg, vector as u32);
}
