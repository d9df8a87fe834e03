//! PCI configuration mechanism #1 (CONFIG_ADDRESS at port 0xCF8, CONFIG_DATA
//! at 0xCFC..0xCFF): 8/16/32-bit config accesses, a scan of bus 0 (devices
//! 0..31, functions 1..7 when the header's multi-function bit is set), BAR
//! decoding, BAR sizing and the capability list walk. Every value read back
//! is treated as untrusted (all-ones, loops in the capability list, ...).

use crate::cpu;

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;

pub const REG_VENDOR: u8 = 0x00;
pub const REG_DEVICE: u8 = 0x02;
pub const REG_COMMAND: u8 = 0x04;
pub const REG_STATUS: u8 = 0x06;
pub const REG_HEADER_TYPE: u8 = 0x0e;
pub const REG_BAR0: u8 = 0x10;
pub const REG_CAP_PTR: u8 = 0x34;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;

/// Most functions remembered by a scan.
pub const MAX_FUNCS: usize = 64;
/// Most capabilities followed in one list (a list is at most 48 entries long).
const MAX_CAPS: usize = 48;

/// A bus/device/function address.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    /// CONFIG_ADDRESS value for register `off` (enable bit set).
    pub fn address(self, off: u8) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | ((self.dev & 0x1f) as u32) << 11
            | ((self.func & 7) as u32) << 8
            | (off & 0xfc) as u32
    }

    pub fn read32(self, off: u8) -> u32 {
        cpu::outl(CONFIG_ADDRESS, self.address(off));
        cpu::inl(CONFIG_DATA)
    }

    pub fn read16(self, off: u8) -> u16 {
        cpu::outl(CONFIG_ADDRESS, self.address(off));
        cpu::inw(CONFIG_DATA + (off & 2) as u16)
    }

    pub fn read8(self, off: u8) -> u8 {
        cpu::outl(CONFIG_ADDRESS, self.address(off));
        cpu::inb(CONFIG_DATA + (off & 3) as u16)
    }

    pub fn write32(self, off: u8, v: u32) {
        cpu::outl(CONFIG_ADDRESS, self.address(off));
        cpu::outl(CONFIG_DATA, v);
    }

    pub fn write16(self, off: u8, v: u16) {
        cpu::outl(CONFIG_ADDRESS, self.address(off));
        cpu::outw(CONFIG_DATA + (off & 2) as u16, v);
    }

    /// Vendor and device id; None if no function answers (0xffff or 0).
    pub fn ids(self) -> Option<(u16, u16)> {
        let v = self.read16(REG_VENDOR);
        if v == 0xffff || v == 0 {
            return None;
        }
        Some((v, self.read16(REG_DEVICE)))
    }

    /// Header type without the multi-function bit (0: device, 1: bridge).
    pub fn header_type(self) -> u8 {
        self.read8(REG_HEADER_TYPE) & 0x7f
    }

    /// Number of BAR registers of this header type.
    pub fn bar_count(self) -> usize {
        match self.header_type() {
            0 => 6,
            1 => 2,
            _ => 0,
        }
    }

    /// Capability pointers in list order: calls `f(offset, id)` for each
    /// (at most MAX_CAPS, offsets >= 0x40, stops at a repeat or 0).
    pub fn for_each_cap(self, mut f: impl FnMut(u8, u8)) {
        if self.read16(REG_STATUS) & STATUS_CAP_LIST == 0 {
            return;
        }
        let mut seen = [0u64; 4];
        let mut p = self.read8(REG_CAP_PTR) & 0xfc;
        for _ in 0..MAX_CAPS {
            if p < 0x40 {
                return;
            }
            let bit = 1u64 << (p & 63);
            if seen[(p >> 6) as usize] & bit != 0 {
                return;
            }
            seen[(p >> 6) as usize] |= bit;
            let id = self.read8(p);
            f(p, id);
            p = self.read8(p + 1) & 0xfc;
        }
    }
}

/// One decoded BAR.
#[derive(Clone, Copy, Default)]
pub struct Bar {
    /// Register index (0..5).
    pub index: u8,
    /// Base address (type bits masked off).
    pub addr: u64,
    pub io: bool,
    /// 64-bit memory BAR (occupies `index` and `index + 1`).
    pub is64: bool,
}

/// Reads BAR `index`; None for an index past the header's BARs, the upper
/// half of a 64-bit BAR, or a 64-bit BAR in the last register.
pub fn bar(bdf: Bdf, index: u8) -> Option<Bar> {
    let n = bdf.bar_count();
    if index as usize >= n {
        return None;
    }
    // Walk from BAR 0 so that the upper half of a 64-bit BAR is recognized.
    let mut i = 0u8;
    while (i as usize) < n {
        let lo = bdf.read32(REG_BAR0 + 4 * i);
        let io = lo & 1 != 0;
        let is64 = !io && (lo >> 1) & 3 == 2;
        if i == index {
            if io {
                return Some(Bar {
                    index,
                    addr: (lo & !3) as u64,
                    io: true,
                    is64: false,
                });
            }
            if is64 && i as usize + 1 >= n {
                return None;
            }
            let hi = if is64 {
                bdf.read32(REG_BAR0 + 4 * (i + 1)) as u64
            } else {
                0
            };
            return Some(Bar {
                index,
                addr: (hi << 32) | (lo & !0xf) as u64,
                io: false,
                is64,
            });
        }
        i += if is64 { 2 } else { 1 };
    }
    None
}

/// Sizes `b` (writes all-ones, reads back, restores) with memory and I/O
/// decoding switched off meanwhile. 0 if the BAR is not implemented.
pub fn bar_size(bdf: Bdf, b: &Bar) -> u64 {
    let cmd = bdf.read16(REG_COMMAND);
    bdf.write16(REG_COMMAND, cmd & !(CMD_IO | CMD_MEMORY));
    let reg = REG_BAR0 + 4 * b.index;
    let lo = bdf.read32(reg);
    bdf.write32(reg, u32::MAX);
    let mlo = bdf.read32(reg);
    bdf.write32(reg, lo);
    let size = if b.io {
        let m = (mlo & !3) | 0xffff_0000;
        (!m).wrapping_add(1) as u64
    } else if b.is64 {
        let hi = bdf.read32(reg + 4);
        bdf.write32(reg + 4, u32::MAX);
        let mhi = bdf.read32(reg + 4);
        bdf.write32(reg + 4, hi);
        let m = ((mhi as u64) << 32) | (mlo & !0xf) as u64;
        (!m).wrapping_add(1)
    } else {
        let m = mlo & !0xf;
        (!m).wrapping_add(1) as u64
    };
    bdf.write16(REG_COMMAND, cmd);
    // Unimplemented BAR (reads 0) or nonsense (not a power of two).
    if (mlo == 0 && !b.is64) || size == 0 || size & (size - 1) != 0 {
        0
    } else {
        size
    }
}

/// A function found by `scan`.
#[derive(Clone, Copy, Default)]
pub struct Func {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
}

/// Every function on bus 0, in device/function order (at most MAX_FUNCS).
pub fn scan() -> ([Func; MAX_FUNCS], usize) {
    let mut out = [Func::default(); MAX_FUNCS];
    let mut n = 0;
    for dev in 0..32u8 {
        let f0 = Bdf {
            bus: 0,
            dev,
            func: 0,
        };
        if f0.ids().is_none() {
            continue;
        }
        let multi = f0.read8(REG_HEADER_TYPE) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let bdf = Bdf { bus: 0, dev, func };
            if let Some((vendor, device)) = bdf.ids() {
                if n < MAX_FUNCS {
                    out[n] = Func {
                        bdf,
                        vendor,
                        device,
                    };
                    n += 1;
                }
            }
        }
    }
    (out, n)
}
