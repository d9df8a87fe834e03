//! Memory check: writes a distinct pattern at the first and last 8 bytes of
//! every 2 MiB chunk of every RAM region above the image (and above 1 MiB),
//! then reads everything back. Cheap even for tens of GiB under emulation.

use crate::bootinfo::{MemRegion, MEM_RAM};
use crate::paging::MAX_PHYS;

const CHUNK: u64 = 2 << 20;

/// Memory summary from the map.
pub struct MemSummary {
    /// Sum of the RAM region sizes.
    pub ram: u64,
    /// Highest RAM address + 1.
    pub top: u64,
    /// Number of RAM regions.
    pub regions: usize,
}

/// Summarizes the RAM regions of `map`.
pub fn summary(map: &[MemRegion]) -> MemSummary {
    let mut s = MemSummary {
        ram: 0,
        top: 0,
        regions: 0,
    };
    for r in map.iter().filter(|r| r.kind == MEM_RAM) {
        s.ram = s.ram.saturating_add(r.size);
        s.top = s.top.max(r.end());
        s.regions += 1;
    }
    s
}

fn pattern(addr: u64) -> u64 {
    addr ^ 0x5a5a_a5a5_0f0f_f0f0
}

/// Calls `f(first, last)` with the two probe addresses of every chunk and
/// returns the bytes covered.
fn for_each_chunk(
    map: &[MemRegion],
    low: u64,
    mut f: impl FnMut(u64, u64) -> bool,
) -> Result<u64, u64> {
    let mut covered = 0u64;
    for r in map.iter().filter(|r| r.kind == MEM_RAM) {
        let start = r.addr.max(low);
        let end = r.end().min(MAX_PHYS);
        let mut a = start;
        while a < end {
            let next = ((a & !(CHUNK - 1)) + CHUNK).min(end);
            let first = (a + 7) & !7;
            let last = (next & !7).wrapping_sub(8);
            if next >= 8 && last >= first && !f(first, last) {
                return Err(first);
            }
            covered += next - a;
            a = next;
        }
    }
    Ok(covered)
}

/// Runs the check on RAM at or above `low`. Returns the bytes covered and
/// Ok, or Err with the first address that did not read back its pattern.
///
/// # Safety
/// Every RAM region of `map` must be identity mapped, and nothing the guest
/// still needs may live in RAM at or above `low`.
pub unsafe fn run(map: &[MemRegion], low: u64) -> (u64, Result<(), u64>) {
    let written = for_each_chunk(map, low, |first, last| {
        // SAFETY: RAM from the map, mapped by paging::init, not used (caller's contract).
        unsafe {
            core::ptr::write_volatile(first as *mut u64, pattern(first));
            core::ptr::write_volatile(last as *mut u64, pattern(last));
        }
        true
    });
    let covered = written.unwrap_or(0);
    let mut bad = 0;
    let r = for_each_chunk(map, low, |first, last| {
        // SAFETY: as above.
        let (a, b) = unsafe {
            (
                core::ptr::read_volatile(first as *const u64),
                core::ptr::read_volatile(last as *const u64),
            )
        };
        if a != pattern(first) {
            bad = first;
            return false;
        }
        if b != pattern(last) {
            bad = last;
            return false;
        }
        true
    });
    (covered, r.map(|_| ()).map_err(|_| bad))
}
