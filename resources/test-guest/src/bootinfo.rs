//! Boot information from either entry, normalized: the command line and the
//! memory map are copied into the guest's own BSS before anything else runs,
//! so the loader's structures (zero page at 0x7000, command line at 0x20000,
//! PVH start info) may be overwritten afterwards. Parsing is bounded: odd
//! counts or pointers outside the boot-time identity map are clipped or
//! ignored, never followed.

use crate::entry::ENTRY_PVH;

/// Longest command line kept (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE: usize = 2048;
/// Most memory map entries kept (the zero page's e820_table size).
pub const MAX_MEMMAP: usize = 128;
/// Memory map type for usable RAM.
pub const MEM_RAM: u32 = 1;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Linux path: the loader maps at least the first 1 GiB.
const LINUX_MAPPED_LIMIT: u64 = 1 << 30;
/// PVH path: our boot page tables map the first 4 GiB.
const PVH_MAPPED_LIMIT: u64 = 1 << 32;

/// How the guest was entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux x86-64 64-bit boot protocol (ELF entry point).
    Linux64,
    /// PVH (XEN_ELFNOTE_PHYS32_ENTRY).
    Pvh,
}

impl Entry {
    /// Name used on the `boot` line.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Linux64 => "linux64",
            Entry::Pvh => "pvh",
        }
    }
}

/// One memory map entry.
#[derive(Clone, Copy)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemRegion {
    const EMPTY: MemRegion = MemRegion {
        addr: 0,
        size: 0,
        kind: 0,
    };

    /// End address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The normalized boot information.
pub struct BootInfo {
    pub entry: Entry,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    memmap: [MemRegion; MAX_MEMMAP],
    memmap_len: usize,
    /// Set when the boot structures were unusable; reported by `boot`.
    pub error: Option<&'static str>,
}

static mut BOOT_INFO: BootInfo = BootInfo {
    entry: Entry::Linux64,
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
    memmap: [MemRegion::EMPTY; MAX_MEMMAP],
    memmap_len: 0,
    error: None,
};

/// Bounded reader of physical memory below `limit` (identity mapped).
#[derive(Clone, Copy)]
struct Phys {
    limit: u64,
}

impl Phys {
    /// # Safety
    /// Everything below `limit` must be identity mapped and readable for as
    /// long as the reader is used.
    unsafe fn new(limit: u64) -> Phys {
        Phys { limit }
    }

    /// Reads a `T` at `addr` if `[addr, addr + size_of T)` lies below the limit
    /// and `addr` is not 0.
    fn read<T: Copy>(self, addr: u64) -> Option<T> {
        let len = core::mem::size_of::<T>() as u64;
        let end = addr.checked_add(len)?;
        if addr == 0 || end > self.limit {
            return None;
        }
        // SAFETY: the range is below `limit`, which `Phys::new`'s caller
        // guaranteed is identity mapped; read_unaligned has no alignment needs.
        Some(unsafe { core::ptr::read_unaligned(addr as *const T) })
    }
}

impl BootInfo {
    /// The command line (without the terminating NUL).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The memory map as given by the loader (possibly clipped to MAX_MEMMAP).
    pub fn memmap(&self) -> &[MemRegion] {
        &self.memmap[..self.memmap_len]
    }

    /// Copies a NUL-terminated command line from physical memory.
    fn copy_cmdline(&mut self, mem: Phys, addr: u64) {
        let mut n = 0;
        while n < MAX_CMDLINE - 1 {
            match mem.read::<u8>(addr.wrapping_add(n as u64)) {
                Some(0) | None => break,
                Some(b) => {
                    self.cmdline[n] = b;
                    n += 1;
                }
            }
        }
        self.cmdline_len = n;
    }

    fn push_region(&mut self, addr: u64, size: u64, kind: u32) {
        if self.memmap_len < MAX_MEMMAP && size != 0 {
            self.memmap[self.memmap_len] = MemRegion { addr, size, kind };
            self.memmap_len += 1;
        }
    }

    /// Parses a Linux `boot_params` zero page.
    fn parse_linux(&mut self, mem: Phys, zp: u64) {
        let lo: Option<u32> = mem.read(zp + 0x228);
        let Some(lo) = lo else {
            self.error = Some("bootinfo");
            return;
        };
        let hi: u32 = mem.read(zp + 0x0c8).unwrap_or(0);
        let cmd = ((hi as u64) << 32) | lo as u64;
        if cmd != 0 {
            self.copy_cmdline(mem, cmd);
        }
        let count: u8 = mem.read(zp + 0x1e8).unwrap_or(0);
        let count = (count as usize).min(MAX_MEMMAP);
        for i in 0..count {
            let e = zp + 0x2d0 + 20 * i as u64;
            let addr: Option<u64> = mem.read(e);
            let size: Option<u64> = mem.read(e + 8);
            let kind: Option<u32> = mem.read(e + 16);
            if let (Some(a), Some(s), Some(k)) = (addr, size, kind) {
                self.push_region(a, s, k);
            }
        }
    }

    /// Parses a PVH `hvm_start_info`.
    fn parse_pvh(&mut self, mem: Phys, si: u64) {
        let magic: Option<u32> = mem.read(si);
        if magic != Some(PVH_MAGIC) {
            self.error = Some("pvh-magic");
            return;
        }
        let version: u32 = mem.read(si + 4).unwrap_or(0);
        let cmd: u64 = mem.read(si + 24).unwrap_or(0);
        if cmd != 0 {
            self.copy_cmdline(mem, cmd);
        }
        if version >= 1 {
            let map: u64 = mem.read(si + 40).unwrap_or(0);
            let n: u32 = mem.read(si + 48).unwrap_or(0);
            let n = (n as usize).min(MAX_MEMMAP);
            for i in 0..n {
                let e = map.wrapping_add(24 * i as u64);
                let addr: Option<u64> = mem.read(e);
                let size: Option<u64> = mem.read(e.wrapping_add(8));
                let kind: Option<u32> = mem.read(e.wrapping_add(16));
                if let (Some(a), Some(s), Some(k)) = (addr, size, kind) {
                    self.push_region(a, s, k);
                }
            }
        }
        if self.memmap_len == 0 {
            self.error = Some("no-memory-map");
        }
    }

    /// Value of the last `key=value` word on the command line.
    pub fn param(&self, key: &str) -> Option<&[u8]> {
        let key = key.as_bytes();
        let mut found = None;
        for word in self.cmdline().split(|b| b.is_ascii_whitespace()) {
            if word.len() > key.len() && word.starts_with(key) && word[key.len()] == b'=' {
                found = Some(&word[key.len() + 1..]);
            }
        }
        found
    }

    /// Numeric value of `key=N` (decimal or 0x-hex); None if absent or malformed.
    pub fn param_u64(&self, key: &str) -> Option<u64> {
        parse_u64(self.param(key)?)
    }
}

/// Parses a decimal or `0x` hexadecimal number, rejecting overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// Copies the loader's boot information into BSS. Called once, first thing.
///
/// # Safety
/// Must be called once by the BSP before any other CPU runs, with the pointer
/// and entry kind the entry code received.
pub unsafe fn capture(ptr: u64, kind: u32) -> &'static BootInfo {
    // SAFETY: single-threaded at this point; nothing else references BOOT_INFO.
    let bi = unsafe { &mut *core::ptr::addr_of_mut!(BOOT_INFO) };
    match kind {
        ENTRY_PVH => {
            bi.entry = Entry::Pvh;
            // SAFETY: the PVH entry code installed the 4 GiB boot identity map.
            let mem = unsafe { Phys::new(PVH_MAPPED_LIMIT) };
            bi.parse_pvh(mem, ptr);
        }
        _ => {
            // ENTRY_LINUX64 (and anything unexpected).
            bi.entry = Entry::Linux64;
            // SAFETY: the Linux boot protocol maps at least the first 1 GiB.
            let mem = unsafe { Phys::new(LINUX_MAPPED_LIMIT) };
            bi.parse_linux(mem, ptr);
        }
    }
    bi
}
