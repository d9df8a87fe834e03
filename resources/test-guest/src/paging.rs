//! The guest's own page tables: an identity map with 2 MiB pages of every RAM
//! region in the memory map (up to 64 GiB), the low 4 MiB and the image, and
//! the 3..4 GiB MMIO hole uncached. One PML4, one PDPT and up to 64 page
//! directories, allocated on demand from a static pool.

use crate::bootinfo::{MemRegion, MEM_RAM};
use crate::cpu;

/// Highest physical address mapped (exclusive).
pub const MAX_PHYS: u64 = 64 << 30;
const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const MAX_PDS: usize = (MAX_PHYS / GIB) as usize;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const FLAGS_WB: u64 = PRESENT | WRITABLE | HUGE;
const FLAGS_UC: u64 = PRESENT | WRITABLE | HUGE | PWT | PCD;

/// Start and end of the MMIO hole (3 GiB .. 4 GiB).
pub const HOLE_START: u64 = 3 << 30;
pub const HOLE_END: u64 = 4 << 30;

#[repr(C, align(4096))]
struct Table([u64; 512]);

struct Tables {
    pml4: Table,
    pdpt: Table,
    pds: [Table; MAX_PDS],
}

/// Page-table pool; not zeroed by the entry code, cleared here as needed.
#[link_section = ".noinit.page_tables"]
static mut TABLES: Tables = Tables {
    pml4: Table([0; 512]),
    pdpt: Table([0; 512]),
    pds: [const { Table([0; 512]) }; MAX_PDS],
};

/// Builder state: which page directories are in use.
struct Builder {
    t: &'static mut Tables,
    used: u64,
}

impl Builder {
    /// Maps the 2 MiB page containing `addr` with `flags`.
    fn map_2m(&mut self, addr: u64, flags: u64) {
        if addr >= MAX_PHYS {
            return;
        }
        let gi = (addr / GIB) as usize;
        if self.used & (1 << gi) == 0 {
            self.t.pds[gi].0.fill(0);
            let pd = core::ptr::addr_of!(self.t.pds[gi]) as u64;
            self.t.pdpt.0[gi] = pd | PRESENT | WRITABLE;
            self.used |= 1 << gi;
        }
        let base = addr & !(PAGE_2M - 1);
        self.t.pds[gi].0[((addr / PAGE_2M) % 512) as usize] = base | flags;
    }

    /// Maps every 2 MiB page overlapping `[start, end)`.
    fn map_range(&mut self, start: u64, end: u64, flags: u64) {
        let end = end.min(MAX_PHYS);
        let mut a = start & !(PAGE_2M - 1);
        while a < end {
            self.map_2m(a, flags);
            a += PAGE_2M;
        }
    }
}

/// Builds the tables and loads CR3. Returns the CR3 value (for the APs).
///
/// # Safety
/// BSP only, once, before the APs start; `image_end` must cover the running
/// code, data and stacks.
pub unsafe fn init(map: &[MemRegion], image_end: u64) -> u64 {
    // SAFETY: called once on the BSP before any AP runs; nothing else refers to TABLES.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    t.pml4.0.fill(0);
    t.pdpt.0.fill(0);
    let pdpt = core::ptr::addr_of!(t.pdpt) as u64;
    t.pml4.0[0] = pdpt | PRESENT | WRITABLE;
    let mut b = Builder { t, used: 0 };

    b.map_range(HOLE_START, HOLE_END, FLAGS_UC);
    b.map_range(0, image_end.max(4 << 20), FLAGS_WB);
    for r in map.iter().filter(|r| r.kind == MEM_RAM) {
        b.map_range(r.addr, r.end(), FLAGS_WB);
    }
    let cr3 = core::ptr::addr_of!(b.t.pml4) as u64;
    // SAFETY: the new tables identity-map the image (code, data, stacks) and low memory.
    unsafe { cpu::write_cr3(cr3) };
    cr3
}

/// True if every byte of `[addr, addr + len)` is mapped by our tables.
pub fn is_mapped(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if len == 0 || end > MAX_PHYS {
        return false;
    }
    // SAFETY: read-only access to tables that are no longer modified after init.
    let t = unsafe { &*core::ptr::addr_of!(TABLES) };
    let mut a = addr & !(PAGE_2M - 1);
    while a < end {
        let gi = (a / GIB) as usize;
        if t.pdpt.0[gi] & PRESENT == 0 || t.pds[gi].0[((a / PAGE_2M) % 512) as usize] & PRESENT == 0
        {
            return false;
        }
        a += PAGE_2M;
    }
    true
}

/// Makes sure `[addr, addr + len)` (a device's MMIO window) is mapped
/// uncached: true if it lies in the 3..4 GiB hole (mapped UC by `init`);
/// otherwise unmapped 2 MiB pages are added uncached and the TLB flushed.
/// False if any page is already mapped (as RAM) or lies beyond `MAX_PHYS`.
///
/// # Safety
/// BSP only, with no AP running (the tables are shared and not locked).
pub unsafe fn ensure_uncached(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if len == 0 || end > MAX_PHYS {
        return false;
    }
    if addr >= HOLE_START && end <= HOLE_END {
        return true;
    }
    // SAFETY: the caller guarantees exclusive access (BSP, no APs).
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    let mut used = 0u64;
    for gi in 0..MAX_PDS {
        if t.pdpt.0[gi] & PRESENT != 0 {
            used |= 1 << gi;
        }
    }
    let mut b = Builder { t, used };
    let mut a = addr & !(PAGE_2M - 1);
    while a < end {
        let gi = (a / GIB) as usize;
        if b.used & (1 << gi) != 0 && b.t.pds[gi].0[((a / PAGE_2M) % 512) as usize] & PRESENT != 0 {
            return false;
        }
        a += PAGE_2M;
    }
    b.map_range(addr, end, FLAGS_UC);
    let cr3 = core::ptr::addr_of!(b.t.pml4) as u64;
    // SAFETY: same tables, only new entries added: reloading CR3 flushes the TLB.
    unsafe { cpu::write_cr3(cr3) };
    true
}
