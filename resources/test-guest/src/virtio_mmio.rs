//! Virtio 1.x "modern" virtio-mmio transport (virtio spec 4.2.2, version 2
//! register layout only, no legacy): device discovery from the kernel command
//! line (`virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, as Linux parses it),
//! register access, feature negotiation, config space reads and the
//! interrupt handler (InterruptStatus -> InterruptACK, LAPIC EOI). The
//! transport-neutral part (status, queues) is in transport.rs.

use crate::lapic;
use core::sync::atomic::{AtomicU64, Ordering};

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;

pub const REG_MAGIC: u32 = 0x000;
pub const REG_VERSION: u32 = 0x004;
pub const REG_DEVICE_ID: u32 = 0x008;
pub const REG_DEVICE_FEATURES: u32 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u32 = 0x014;
pub const REG_DRIVER_FEATURES: u32 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u32 = 0x024;
pub const REG_QUEUE_SEL: u32 = 0x030;
pub const REG_QUEUE_NUM_MAX: u32 = 0x034;
pub const REG_QUEUE_NUM: u32 = 0x038;
pub const REG_QUEUE_READY: u32 = 0x044;
pub const REG_QUEUE_NOTIFY: u32 = 0x050;
pub const REG_INTERRUPT_STATUS: u32 = 0x060;
pub const REG_INTERRUPT_ACK: u32 = 0x064;
pub const REG_STATUS: u32 = 0x070;
pub const REG_QUEUE_DESC_LOW: u32 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u32 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u32 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u32 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u32 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u32 = 0x0a4;
pub const REG_CONFIG_GENERATION: u32 = 0x0fc;
pub const REG_CONFIG: u32 = 0x100;

/// Most `virtio_mmio.device=` words remembered.
pub const MAX_DEVICES: usize = 8;

/// One `virtio_mmio.device=` entry of the command line.
#[derive(Clone, Copy, Default)]
pub struct MmioDesc {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

/// Parses a Linux `memparse`-style size: decimal or `0x` hex, optional K/M/G suffix.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = crate::bootinfo::parse_u64(num)?;
    v.checked_mul(1u64 << shift)
}

/// Parses the value of one `virtio_mmio.device=` word:
/// `<size>@<base>:<irq>[:<id>]`.
pub fn parse_desc(v: &[u8]) -> Option<MmioDesc> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_size(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = crate::bootinfo::parse_u64(&rest[..colon])?;
    let rest = &rest[colon + 1..];
    let irq_end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    let irq = crate::bootinfo::parse_u64(&rest[..irq_end])?;
    if size == 0 || irq > u32::MAX as u64 || base.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDesc {
        size,
        base,
        irq: irq as u32,
    })
}

/// Every well-formed `virtio_mmio.device=` word, in command-line order.
pub fn discover(cmdline: &[u8]) -> ([MmioDesc; MAX_DEVICES], usize) {
    const KEY: &[u8] = b"virtio_mmio.device=";
    let mut out = [MmioDesc::default(); MAX_DEVICES];
    let mut n = 0;
    for word in cmdline.split(|b| b.is_ascii_whitespace()) {
        if n < MAX_DEVICES && word.starts_with(KEY) {
            if let Some(d) = parse_desc(&word[KEY.len()..]) {
                out[n] = d;
                n += 1;
            }
        }
    }
    (out, n)
}

/// A virtio-mmio register window (mapped uncached by the caller).
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    /// 32-bit register read.
    pub fn read(self, reg: u32) -> u32 {
        // SAFETY: `base` is a virtio-mmio window the caller mapped uncached
        // (paging::ensure_uncached); aligned 32-bit access within its 4 KiB.
        unsafe { core::ptr::read_volatile((self.base + reg as u64) as *const u32) }
    }

    /// 32-bit register write.
    pub fn write(self, reg: u32, v: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + reg as u64) as *mut u32, v) }
    }

    /// The 64 device feature bits (DeviceFeaturesSel 0 and 1).
    pub fn device_features(self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(REG_DEVICE_FEATURES) as u64;
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(REG_DEVICE_FEATURES) as u64;
        (hi << 32) | lo
    }

    /// Writes the 64 driver feature bits (DriverFeaturesSel 0 and 1).
    pub fn set_driver_features(self, f: u64) {
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, f as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reads a 64-bit config field at `off` as two 32-bit reads, retried
    /// (bounded) until ConfigGeneration is stable.
    pub fn config_u64(self, off: u32) -> u64 {
        let mut v = 0;
        for _ in 0..8 {
            let g = self.read(REG_CONFIG_GENERATION);
            let lo = self.read(REG_CONFIG + off) as u64;
            let hi = self.read(REG_CONFIG + off + 4) as u64;
            v = (hi << 32) | lo;
            if self.read(REG_CONFIG_GENERATION) == g {
                break;
            }
        }
        v
    }

    /// Reads a 16-bit config field at `off` (16-bit aligned access).
    pub fn config_u16(self, off: u32) -> u16 {
        // SAFETY: as in `read`; 16-bit fields take 16-bit aligned accesses (spec 4.2.2.2).
        unsafe { core::ptr::read_volatile((self.base + (REG_CONFIG + off) as u64) as *const u16) }
    }
}

/// Window of the device whose interrupt `irq` handles (0: none).
static IRQ_BASE: AtomicU64 = AtomicU64::new(0);

/// Directs `irq` to acknowledge the device at `m`.
pub fn set_irq_device(m: Mmio) {
    IRQ_BASE.store(m.base, Ordering::Relaxed);
}

/// Interrupt handler: acknowledges every InterruptStatus bit, counts, EOIs.
pub fn irq() {
    let base = IRQ_BASE.load(Ordering::Relaxed);
    if base != 0 {
        let m = Mmio { base };
        let st = m.read(REG_INTERRUPT_STATUS);
        if st != 0 {
            m.write(REG_INTERRUPT_ACK, st);
        }
    }
    crate::transport::count_irq();
    lapic::eoi();
}
