//! The guest's own page tables: an identity map with 2 MiB pages of every RAM
//! region in the memory map (up to 64 GiB), the low 4 MiB and the image, and
//! the 3..4 GiB MMIO hole uncached; device windows elsewhere below 1 TiB are
//! added uncached on demand (`ensure_uncached`). One PML4, two PDPTs (0..512
//! GiB, 512 GiB..1 TiB) and page directories taken in order from a static pool.

use crate::bootinfo::{MemRegion, MEM_RAM};
use crate::cpu;

/// Highest physical address of RAM mapped (exclusive).
pub const MAX_PHYS: u64 = 64 << 30;
/// Highest physical address a device window may be mapped at (exclusive).
pub const MAX_MMIO_PHYS: u64 = 1 << 40;
const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const PDPTS: usize = (MAX_MMIO_PHYS / (512 * GIB)) as usize;
/// Page directories: one per GiB of RAM, plus some for device windows.
const MAX_PDS: usize = (MAX_PHYS / GIB) as usize + 8;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const FLAGS_WB: u64 = PRESENT | WRITABLE | HUGE;
const FLAGS_UC: u64 = PRESENT | WRITABLE | HUGE | PWT | PCD;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Start and end of the MMIO hole (3 GiB .. 4 GiB).
pub const HOLE_START: u64 = 3 << 30;
pub const HOLE_END: u64 = 4 << 30;

#[repr(C, align(4096))]
struct Table([u64; 512]);

struct Tables {
    pml4: Table,
    pdpts: [Table; PDPTS],
    pds: [Table; MAX_PDS],
    /// Page directories taken from `pds`.
    npds: usize,
}

/// Page-table pool; not zeroed by the entry code, cleared here as needed.
#[link_section = ".noinit.page_tables"]
static mut TABLES: Tables = Tables {
    pml4: Table([0; 512]),
    pdpts: [const { Table([0; 512]) }; PDPTS],
    pds: [const { Table([0; 512]) }; MAX_PDS],
    npds: 0,
};

/// Index of the page directory mapping GiB `gi`, if there is one.
fn pd_index(t: &Tables, gi: usize) -> Option<usize> {
    let e = t.pdpts[gi / 512].0[gi % 512];
    if e & PRESENT == 0 {
        return None;
    }
    let base = core::ptr::addr_of!(t.pds) as u64;
    Some((((e & ADDR_MASK) - base) / 4096) as usize)
}

/// The page directory entry mapping `addr` (0 if none); `addr` < MAX_MMIO_PHYS.
fn pde(t: &Tables, addr: u64) -> u64 {
    match pd_index(t, (addr / GIB) as usize) {
        Some(i) => t.pds[i].0[((addr / PAGE_2M) % 512) as usize],
        None => 0,
    }
}

/// Builder over the tables.
struct Builder {
    t: &'static mut Tables,
}

impl Builder {
    /// Maps the 2 MiB page containing `addr` with `flags`; false if `addr` is
    /// out of range or the page-directory pool is exhausted.
    fn map_2m(&mut self, addr: u64, flags: u64) -> bool {
        if addr >= MAX_MMIO_PHYS {
            return false;
        }
        let gi = (addr / GIB) as usize;
        let pi = match pd_index(self.t, gi) {
            Some(i) => i,
            None => {
                let i = self.t.npds;
                if i >= MAX_PDS {
                    return false;
                }
                self.t.npds += 1;
                self.t.pds[i].0.fill(0);
                let pd = core::ptr::addr_of!(self.t.pds[i]) as u64;
                self.t.pdpts[gi / 512].0[gi % 512] = pd | PRESENT | WRITABLE;
                i
            }
        };
        let base = addr & !(PAGE_2M - 1);
        self.t.pds[pi].0[((addr / PAGE_2M) % 512) as usize] = base | flags;
        true
    }

    /// Maps every 2 MiB page overlapping `[start, end)` (RAM: below MAX_PHYS).
    fn map_range(&mut self, start: u64, end: u64, flags: u64) -> bool {
        let end = end.min(MAX_PHYS);
        let mut a = start & !(PAGE_2M - 1);
        while a < end {
            if !self.map_2m(a, flags) {
                return false;
            }
            a += PAGE_2M;
        }
        true
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
    t.npds = 0;
    for i in 0..PDPTS {
        t.pdpts[i].0.fill(0);
        let pdpt = core::ptr::addr_of!(t.pdpts[i]) as u64;
        t.pml4.0[i] = pdpt | PRESENT | WRITABLE;
    }
    let mut b = Builder { t };

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
    if len == 0 || end > MAX_MMIO_PHYS {
        return false;
    }
    // SAFETY: read-only access; the tables only change on the BSP with no AP running.
    let t = unsafe { &*core::ptr::addr_of!(TABLES) };
    let mut a = addr & !(PAGE_2M - 1);
    while a < end {
        if pde(t, a) & PRESENT == 0 {
            return false;
        }
        a += PAGE_2M;
    }
    true
}

/// Makes sure `[addr, addr + len)` (a device's MMIO window) is mapped
/// uncached: 2 MiB pages already mapped uncached (the 3..4 GiB hole, earlier
/// windows) are kept, unmapped ones are added uncached and the TLB flushed.
/// False if any page is mapped write-back (RAM, the image), or the window
/// reaches beyond 1 TiB or the CPU's physical address width, or the pool of
/// page directories runs out.
///
/// # Safety
/// BSP only, with no AP running (the tables are shared and not locked).
pub unsafe fn ensure_uncached(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let phys_end = 1u64 << cpu::phys_bits().min(52);
    if len == 0 || end > MAX_MMIO_PHYS || end > phys_end {
        return false;
    }
    // SAFETY: the caller guarantees exclusive access (BSP, no APs).
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    let first = addr & !(PAGE_2M - 1);
    let mut a = first;
    let mut missing = false;
    while a < end {
        let e = pde(t, a);
        if e & PRESENT != 0 && e & PCD == 0 {
            return false;
        }
        missing |= e & PRESENT == 0;
        a += PAGE_2M;
    }
    if !missing {
        return true;
    }
    let mut b = Builder { t };
    let mut a = first;
    let mut ok = true;
    while a < end && ok {
        if pde(b.t, a) & PRESENT == 0 {
            ok = b.map_2m(a, FLAGS_UC);
        }
        a += PAGE_2M;
    }
    let cr3 = core::ptr::addr_of!(b.t.pml4) as u64;
    // SAFETY: same tables, only new entries added: reloading CR3 flushes the TLB.
    unsafe { cpu::write_cr3(cr3) };
    ok
}
