//! The `pci-fuzz` scenario: random PCI configuration accesses (ports
//! 0xCF8/0xCFC..0xCFF) and random MMIO accesses inside the memory BARs found
//! at start (their original addresses, first MiB of each) and inside the
//! `virtio_mmio.device=` windows, driven by xorshift64, with interrupts off.
//! The VMM must survive; the guest must finish: every value read back is
//! ignored, a stray NMI (an MSI-X entry programmed with NMI delivery) is
//! counted and returns.
//!
//! Guards (off with `tg.fuzz_all=1`), so that the guest does not destroy
//! itself on a PC chipset (QEMU): no writes to the device-specific config
//! space (0x40..0xFF) of functions whose vendor is not virtio (0x1af4) (PAM,
//! SMRAM, PCIEXBAR, PMBASE, RCBA can unmap RAM or cover the serial and
//! power-off ports), no writes to I/O BARs (an I/O BAR moved over 0x3F8 or
//! 0xF4 hides them); and always: bit 2 of each byte cleared in 8/16-bit
//! writes covering port 0xCF9 (the reset control register of PC chipsets).

use crate::bootinfo::BootInfo;
use crate::pci::{self, Bdf};
use crate::{cpu, lapic, outln, paging, virtio_mmio};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Most MMIO ranges fuzzed.
const MAX_RANGES: usize = 64;
/// Bytes of a BAR or window fuzzed (from its start).
const RANGE_CAP: u64 = 1 << 20;
/// Capability offsets remembered per function.
const MAX_CAPS: usize = 8;

static FUZZING: AtomicBool = AtomicBool::new(false);
static NMIS: AtomicU32 = AtomicU32::new(0);
static STRAYS: AtomicU32 = AtomicU32::new(0);

/// Interrupt dispatch hook: during the fuzz, NMIs and external vectors are
/// counted and return (true) instead of being fatal.
pub fn stray(v: u8) -> bool {
    if !FUZZING.load(Ordering::Relaxed) {
        return false;
    }
    if v == 2 {
        NMIS.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    if v >= 0x20 {
        STRAYS.fetch_add(1, Ordering::Relaxed);
        lapic::eoi();
        return true;
    }
    false
}

/// xorshift64 (seeded through splitmix64 so that small seeds differ at once).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A function found at start.
#[derive(Clone, Copy, Default)]
struct FuncInfo {
    bdf: Bdf,
    /// Vendor is not virtio: device-specific config space is guarded.
    chipset: bool,
    /// Bit i: config dword 0x10 + 4i is an I/O BAR.
    io_bars: u8,
    caps: [u8; MAX_CAPS],
    ncaps: usize,
}

#[derive(Clone, Copy, Default)]
struct Range {
    base: u64,
    len: u64,
}

struct Fuzz {
    rng: Rng,
    funcs: [FuncInfo; pci::MAX_FUNCS],
    nfuncs: usize,
    bars: [Range; MAX_RANGES],
    nbars: usize,
    wins: [Range; MAX_RANGES],
    nwins: usize,
    guard: bool,
    verbose: bool,
    guarded: u32,
}

/// MMIO read of `size` (1, 2, 4, 8) bytes at any alignment.
fn mmio_read(addr: u64, size: u32) {
    // SAFETY: `addr..addr+size` lies in a device range mapped uncached by
    // `paging::ensure_uncached` (never RAM); the value is discarded.
    unsafe {
        match size {
            1 => {
                core::arch::asm!("mov {:l}, byte ptr [{}]", out(reg) _, in(reg) addr, options(nostack))
            }
            2 => {
                core::arch::asm!("mov {:x}, word ptr [{}]", out(reg) _, in(reg) addr, options(nostack))
            }
            4 => {
                core::arch::asm!("mov {:e}, dword ptr [{}]", out(reg) _, in(reg) addr, options(nostack))
            }
            _ => {
                core::arch::asm!("mov {}, qword ptr [{}]", out(reg) _, in(reg) addr, options(nostack))
            }
        }
    }
}

/// MMIO write of `size` (1, 2, 4, 8) bytes of `v` at any alignment.
fn mmio_write(addr: u64, size: u32, v: u64) {
    // SAFETY: as in `mmio_read`; device memory only.
    unsafe {
        match size {
            1 => {
                core::arch::asm!("mov byte ptr [{}], {:l}", in(reg) addr, in(reg) v, options(nostack))
            }
            2 => {
                core::arch::asm!("mov word ptr [{}], {:x}", in(reg) addr, in(reg) v, options(nostack))
            }
            4 => {
                core::arch::asm!("mov dword ptr [{}], {:e}", in(reg) addr, in(reg) v, options(nostack))
            }
            _ => {
                core::arch::asm!("mov qword ptr [{}], {}", in(reg) addr, in(reg) v, options(nostack))
            }
        }
    }
}

/// Port access of `size` (1, 2, 4) bytes; writes `v` if `write`.
fn port_access(port: u16, size: u32, write: bool, v: u32) {
    match (size, write) {
        (1, false) => {
            cpu::inb(port);
        }
        (2, false) => {
            cpu::inw(port);
        }
        (_, false) => {
            cpu::inl(port);
        }
        (1, true) => cpu::outb(port, v as u8),
        (2, true) => cpu::outw(port, v as u16),
        (_, true) => cpu::outl(port, v),
    }
}

/// Value `v` of an 8/16-bit write at `port` (0xCF8..0xCFB) with bit 2 of
/// every byte cleared if the write covers 0xCF9 (PC reset control register:
/// bit 2 resets; QEMU splits a 16-bit write into byte writes that all land
/// on it, whatever their offset).
fn mask_cf9(port: u16, size: u32, v: u32) -> u32 {
    if port <= 0xcf9 && 0xcf9 < port + size as u16 {
        v & 0xfbfb_fbfb
    } else {
        v
    }
}

/// Number of functions on bus 0 and the ids of 00:00.0.
fn census() -> (usize, u32) {
    let (_, n) = pci::scan();
    (n, Bdf::default().read32(0))
}

impl Fuzz {
    /// Records the functions of bus 0, their capabilities, I/O BARs and
    /// memory BAR ranges (sized with decoding off, mapped uncached).
    fn record_pci(&mut self) {
        let (funcs, nf) = pci::scan();
        for f in &funcs[..nf] {
            let mut fi = FuncInfo {
                bdf: f.bdf,
                chipset: f.vendor != crate::virtio_pci::VENDOR_VIRTIO,
                ..Default::default()
            };
            f.bdf.for_each_cap(|p, _| {
                if fi.ncaps < MAX_CAPS {
                    fi.caps[fi.ncaps] = p;
                    fi.ncaps += 1;
                }
            });
            for i in 0..f.bdf.bar_count() as u8 {
                let Some(b) = pci::bar(f.bdf, i) else {
                    continue;
                };
                if b.io {
                    fi.io_bars |= 1 << i;
                    continue;
                }
                if b.addr == 0 || self.nbars >= MAX_RANGES {
                    continue;
                }
                let size = pci::bar_size(f.bdf, &b);
                let len = size.min(RANGE_CAP);
                // SAFETY: BSP only, no AP started in this scenario.
                let mapped = len != 0 && unsafe { paging::ensure_uncached(b.addr, len) };
                outln!(
                    "pci-fuzz bar {} BAR{} addr={:#x} size={:#x}{}",
                    f.bdf,
                    i,
                    b.addr,
                    size,
                    if mapped { "" } else { " (skipped)" }
                );
                if mapped {
                    self.bars[self.nbars] = Range { base: b.addr, len };
                    self.nbars += 1;
                }
            }
            self.funcs[self.nfuncs] = fi;
            self.nfuncs += 1;
        }
    }

    fn record_windows(&mut self, bi: &BootInfo) {
        let (descs, n) = virtio_mmio::discover(bi.cmdline());
        for d in &descs[..n] {
            let len = d.size.min(RANGE_CAP);
            // SAFETY: BSP only, no AP started in this scenario.
            if self.nwins < MAX_RANGES && unsafe { paging::ensure_uncached(d.base, len) } {
                self.wins[self.nwins] = Range { base: d.base, len };
                self.nwins += 1;
            } else {
                outln!("pci-fuzz window {:#x} size={:#x} skipped", d.base, d.size);
            }
        }
    }

    /// True if a config write at `bdf`/`off` is guarded.
    fn guarded_write(&self, bdf: Bdf, off: u8) -> bool {
        if !self.guard {
            return false;
        }
        let Some(f) = self.funcs[..self.nfuncs].iter().find(|f| f.bdf == bdf) else {
            return false;
        };
        if f.chipset && off >= 0x40 {
            return true;
        }
        (0x10..0x28).contains(&off) && f.io_bars & (1 << ((off - 0x10) / 4)) != 0
    }

    fn config_op(&mut self, i: u32) {
        let r = self.rng.below(32);
        let write = self.rng.next() & 1 != 0;
        let val = self.rng.next() as u32;
        if r == 0 {
            // CONFIG_ADDRESS without the enable bit, then a data access.
            let a = val & 0x7fff_ffff;
            let size = [1u32, 2, 4][self.rng.below(3) as usize];
            let k = (self.rng.below(4) as u16) & !(size as u16 - 1);
            let v = self.rng.next() as u32;
            if self.verbose {
                outln!(
                    "pci-fuzz op={} cf8={:#x} cfc+{} size={} {} {:#x}",
                    i,
                    a,
                    k,
                    size,
                    if write { "w" } else { "r" },
                    v
                );
            }
            cpu::outl(pci::CONFIG_ADDRESS, a);
            port_access(pci::CONFIG_DATA + k, size, write, v);
            return;
        }
        if r == 1 {
            // 8/16-bit accesses to 0xCF8..0xCFB themselves.
            let size = 1 + self.rng.below(2) as u32;
            let port = pci::CONFIG_ADDRESS + self.rng.below(4) as u16;
            let v = mask_cf9(port, size, val);
            if self.verbose {
                outln!(
                    "pci-fuzz op={} port={:#x} size={} {} {:#x}",
                    i,
                    port,
                    size,
                    if write { "w" } else { "r" },
                    v
                );
            }
            port_access(port, size, write, v);
            return;
        }
        let (bdf, caps) = if self.nfuncs > 0 && self.rng.below(4) != 0 {
            let f = self.funcs[self.rng.below(self.nfuncs as u64) as usize];
            (f.bdf, Some(f))
        } else {
            let bus = if self.rng.below(8) == 0 {
                1 + self.rng.below(255) as u8
            } else {
                0
            };
            let b = Bdf {
                bus,
                dev: self.rng.below(32) as u8,
                func: self.rng.below(8) as u8,
            };
            (b, None)
        };
        let size = [1u32, 2, 4][self.rng.below(3) as usize];
        let off = match (self.rng.below(4), caps) {
            (0, _) => {
                [0x04u8, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30, 0x3c][self.rng.below(9) as usize]
                    + self.rng.below(4) as u8
            }
            (1, Some(f)) if f.ncaps > 0 => f.caps[self.rng.below(f.ncaps as u64) as usize]
                .saturating_add(self.rng.below(16) as u8),
            _ => self.rng.below(256) as u8,
        } & !(size as u8 - 1);
        let write = write
            && !{
                let g = self.guarded_write(bdf, off);
                if g {
                    self.guarded += 1;
                }
                g
            };
        if self.verbose {
            outln!(
                "pci-fuzz op={} cfg {} off={:#x} size={} {} {:#x}",
                i,
                bdf,
                off,
                size,
                if write { "w" } else { "r" },
                val
            );
        }
        cpu::outl(pci::CONFIG_ADDRESS, bdf.address(off));
        port_access(pci::CONFIG_DATA + (off & 3) as u16, size, write, val);
    }

    fn mmio_op(&mut self, i: u32, windows: bool) {
        let rg = if windows {
            self.wins[self.rng.below(self.nwins as u64) as usize]
        } else {
            self.bars[self.rng.below(self.nbars as u64) as usize]
        };
        let mut size = [1u32, 2, 4, 8][self.rng.below(4) as usize];
        if (size as u64) > rg.len {
            size = 1;
        }
        let span = match self.rng.below(4) {
            0 | 1 => 0x100,
            2 => 0x1000,
            _ => rg.len,
        }
        .min(rg.len);
        // span >= size here (span is rg.len or >= 0x100 >= 8).
        let off = self.rng.below(span.saturating_sub(size as u64) + 1);
        let addr = rg.base + off;
        let write = self.rng.next() & 1 != 0;
        let v = self.rng.next();
        if self.verbose {
            outln!(
                "pci-fuzz op={} mmio {:#x} size={} {} {:#x}",
                i,
                addr,
                size,
                if write { "w" } else { "r" },
                v
            );
        }
        if write {
            mmio_write(addr, size, v);
        } else {
            mmio_read(addr, size);
        }
    }
}

/// The `pci-fuzz` scenario (after paging, IDT and PIC setup).
pub fn run(bi: &BootInfo) -> ! {
    cpu::cli();
    FUZZING.store(true, Ordering::Relaxed);
    let seed = bi.param_u64("tg.fuzz_seed").unwrap_or(1);
    let iters = bi
        .param_u64("tg.fuzz_iters")
        .unwrap_or(20_000)
        .min(100_000_000) as u32;
    let mut f = Fuzz {
        rng: Rng::new(seed),
        funcs: [FuncInfo::default(); pci::MAX_FUNCS],
        nfuncs: 0,
        bars: [Range::default(); MAX_RANGES],
        nbars: 0,
        wins: [Range::default(); MAX_RANGES],
        nwins: 0,
        guard: bi.param_u64("tg.fuzz_all").unwrap_or(0) == 0,
        verbose: bi.param_u64("tg.fuzz_verbose").unwrap_or(0) != 0,
        guarded: 0,
    };
    f.record_pci();
    f.record_windows(bi);
    let functions = f.nfuncs;
    outln!(
        "pci-fuzz seed={:#x} iters={} functions={} bars={} windows={} guards={}",
        seed,
        iters,
        functions,
        f.nbars,
        f.nwins,
        if f.guard { "on" } else { "off" }
    );
    for i in 0..iters {
        let k = f.rng.below(16);
        if k >= 13 && f.nwins > 0 {
            f.mmio_op(i, true);
        } else if k >= 8 && f.nbars > 0 {
            f.mmio_op(i, false);
        } else {
            f.config_op(i);
        }
        if (i + 1) % 5000 == 0 && i + 1 < iters {
            outln!("pci-fuzz progress iters={}", i + 1);
        }
    }
    let (after, hb) = census();
    outln!(
        "pci-fuzz nmis={} stray-interrupts={} guarded-writes={}",
        NMIS.load(Ordering::Relaxed),
        STRAYS.load(Ordering::Relaxed),
        f.guarded
    );
    outln!(
        "pci-fuzz iters={} functions={} after={} host-bridge={:04x}:{:04x}",
        iters,
        functions,
        after,
        hb & 0xffff,
        hb >> 16
    );
    outln!("result PASS");
    cpu::power_off(0)
}
