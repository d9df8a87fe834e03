//! Virtio 1.x "modern" virtio-pci transport (virtio spec 4.1): the vendor
//! capabilities (common, notify, ISR, device config; each a BAR, offset and
//! length), the common configuration registers, MSI-X (capability 0x11; the
//! table lives in a BAR) and the MSI-X interrupt handler. No legacy I/O BAR,
//! no INTx.

use crate::pci::{self, Bdf};
use crate::{lapic, paging};

pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern device ids are 0x1040 + virtio device type.
pub const DEVICE_MODERN_BASE: u16 = 0x1040;
/// Transitional virtio-blk (accepted only with the modern capabilities).
pub const DEVICE_TRANSITIONAL_BLK: u16 = 0x1001;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

// Common configuration layout (spec 4.1.4.3).
const C_DEVICE_FEATURE_SELECT: u64 = 0x00;
const C_DEVICE_FEATURE: u64 = 0x04;
const C_DRIVER_FEATURE_SELECT: u64 = 0x08;
const C_DRIVER_FEATURE: u64 = 0x0c;
const C_CONFIG_MSIX_VECTOR: u64 = 0x10;
const C_DEVICE_STATUS: u64 = 0x14;
const C_CONFIG_GENERATION: u64 = 0x15;
const C_QUEUE_SELECT: u64 = 0x16;
const C_QUEUE_SIZE: u64 = 0x18;
const C_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const C_QUEUE_ENABLE: u64 = 0x1c;
const C_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const C_QUEUE_DESC: u64 = 0x20;
const C_QUEUE_DRIVER: u64 = 0x28;
const C_QUEUE_DEVICE: u64 = 0x30;
/// Size of the common configuration structure we use.
const COMMON_LEN: u32 = 0x38;

/// "No vector" value of the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// First IDT vector of the MSI-X interrupts (entry i -> MSIX_VECTOR_BASE + i).
pub const MSIX_VECTOR_BASE: u8 = 0x60;
/// MSI-X table entries programmed at most (config + 8 queues).
pub const MAX_MSIX: u16 = 9;

/// Where a virtio structure lives: BAR index, offset, length.
#[derive(Clone, Copy, Default)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// What the capability lists of a function say.
#[derive(Clone, Copy, Default)]
pub struct Caps {
    pub common: Option<Region>,
    pub notify: Option<Region>,
    pub notify_mult: u32,
    pub isr: Option<Region>,
    pub device: Option<Region>,
    /// Config-space offset of the MSI-X capability.
    pub msix_cap: Option<u8>,
}

/// Parses the vendor (virtio) and MSI-X capabilities; the first of each
/// virtio structure type with a valid BAR index (0..5) wins.
pub fn read_caps(bdf: Bdf) -> Caps {
    let mut c = Caps::default();
    bdf.for_each_cap(|p, id| {
        if id == CAP_MSIX {
            // Control at +2, table offset/BIR at +4 must fit in config space.
            if c.msix_cap.is_none() && p <= 0xf8 {
                c.msix_cap = Some(p);
            }
            return;
        }
        if id != CAP_VENDOR || p > 0xff - 16 {
            return;
        }
        let cap_len = bdf.read8(p + 2);
        let cfg_type = bdf.read8(p + 3);
        let bar = bdf.read8(p + 4);
        if cap_len < 16 || bar > 5 {
            return;
        }
        let r = Region {
            bar,
            offset: bdf.read32(p + 8),
            length: bdf.read32(p + 12),
        };
        match cfg_type {
            CFG_COMMON if c.common.is_none() => c.common = Some(r),
            CFG_NOTIFY if c.notify.is_none() && cap_len >= 20 && p <= 0xff - 20 => {
                c.notify = Some(r);
                c.notify_mult = bdf.read32(p + 16);
            }
            CFG_ISR if c.isr.is_none() => c.isr = Some(r),
            CFG_DEVICE if c.device.is_none() => c.device = Some(r),
            _ => {}
        }
    });
    c
}

/// True for a virtio-blk function we can drive: modern id 0x1042, or
/// transitional 0x1001 with a common configuration capability.
pub fn is_blk(f: &pci::Func) -> bool {
    f.vendor == VENDOR_VIRTIO
        && (f.device == DEVICE_MODERN_BASE + 2
            || (f.device == DEVICE_TRANSITIONAL_BLK && read_caps(f.bdf).common.is_some()))
}

/// Why a function cannot be used (FAIL reason, explanation).
pub type Error = (&'static str, &'static str);

/// The MSI-X capability of a function, resolved.
#[derive(Clone, Copy)]
pub struct Msix {
    pub cap: u8,
    /// Table entries (control bits 10:0 + 1).
    pub size: u16,
    /// Address of the table (mapped uncached).
    pub table: u64,
}

/// A resolved modern virtio-pci function (addresses mapped uncached).
#[derive(Clone, Copy)]
pub struct VirtioPci {
    pub bdf: Bdf,
    /// Address of the BAR holding the common configuration.
    pub common_bar: u64,
    common: u64,
    notify: u64,
    notify_len: u32,
    notify_mult: u32,
    device: u64,
    device_len: u32,
    pub msix: Option<Msix>,
}

/// Address of region `r` of `bdf`, checking that `need` bytes fit in it, and
/// mapping its first `map` bytes (at least `need`) uncached. Returns (region
/// address, BAR address).
fn resolve(bdf: Bdf, r: &Region, need: u32, map: u32) -> Result<(u64, u64), Error> {
    if r.length < need {
        return Err(("blk-pci-caps", "a virtio structure is shorter than needed"));
    }
    let Some(b) = pci::bar(bdf, r.bar) else {
        return Err((
            "blk-pci-caps",
            "a capability names a BAR that does not exist (or the upper half of a 64-bit BAR)",
        ));
    };
    if b.io {
        return Err(("blk-pci-bar", "a capability names an I/O BAR"));
    }
    if b.addr == 0 {
        return Err((
            "blk-pci-bar",
            "a capability names an unassigned BAR (address 0)",
        ));
    }
    let Some(a) = b.addr.checked_add(r.offset as u64) else {
        return Err(("blk-pci-bar", "BAR address + offset overflows"));
    };
    // SAFETY: the blk scenario runs on the BSP only, no AP started.
    if !unsafe { paging::ensure_uncached(a, map.max(need).max(1) as u64) } {
        return Err((
            "blk-pci-bar",
            "a BAR region cannot be mapped uncached (overlaps RAM, or beyond 1 TiB or the CPU's physical address width)",
        ));
    }
    Ok((a, b.addr))
}

/// Most bytes of the notify structure used (and mapped).
const NOTIFY_MAP: u32 = 1 << 20;
/// Most bytes of the device configuration used (and mapped).
const DEVICE_MAP: u32 = 4096;

impl VirtioPci {
    /// Resolves the capabilities of `bdf` (BARs as currently programmed),
    /// enables memory decoding and bus mastering, disables INTx.
    pub fn new(bdf: Bdf) -> Result<VirtioPci, Error> {
        let c = read_caps(bdf);
        let (Some(common), Some(notify), Some(device)) = (c.common, c.notify, c.device) else {
            return Err((
                "blk-pci-caps",
                "missing virtio capability (common, notify and device configuration are required)",
            ));
        };
        let cmd = bdf.read16(pci::REG_COMMAND);
        bdf.write16(
            pci::REG_COMMAND,
            cmd | pci::CMD_MEMORY | pci::CMD_BUS_MASTER | pci::CMD_INTX_DISABLE,
        );
        let notify_len = notify.length.min(NOTIFY_MAP);
        let device_len = device.length.min(DEVICE_MAP);
        let (common_addr, common_bar) = resolve(bdf, &common, COMMON_LEN, COMMON_LEN)?;
        let (notify_addr, _) = resolve(bdf, &notify, 2, notify_len)?;
        let (device_addr, _) = resolve(bdf, &device, 8, device_len)?;
        let msix = match c.msix_cap {
            None => None,
            Some(cap) => {
                let size = (bdf.read16(cap + 2) & 0x7ff) + 1;
                let t = bdf.read32(cap + 4);
                let r = Region {
                    bar: (t & 7) as u8,
                    offset: t & !7,
                    length: size as u32 * 16,
                };
                if r.bar > 5 {
                    return Err(("blk-msix", "MSI-X table BIR is not 0..5"));
                }
                let (table, _) = match resolve(bdf, &r, r.length, r.length) {
                    Ok(v) => v,
                    Err((_, why)) => return Err(("blk-msix", why)),
                };
                Some(Msix { cap, size, table })
            }
        };
        Ok(VirtioPci {
            bdf,
            common_bar,
            common: common_addr,
            notify: notify_addr,
            notify_len,
            notify_mult: c.notify_mult,
            device: device_addr,
            device_len,
            msix,
        })
    }

    fn r8(&self, off: u64) -> u8 {
        // SAFETY: `common` is the common configuration structure (>= 0x38
        // bytes), mapped uncached by `resolve`; natural alignment.
        unsafe { core::ptr::read_volatile((self.common + off) as *const u8) }
    }
    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::read_volatile((self.common + off) as *const u16) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::read_volatile((self.common + off) as *const u32) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::write_volatile((self.common + off) as *mut u8, v) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::write_volatile((self.common + off) as *mut u16, v) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::write_volatile((self.common + off) as *mut u32, v) }
    }
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.r8(C_DEVICE_STATUS)
    }

    pub fn set_status(&self, s: u8) {
        self.w8(C_DEVICE_STATUS, s)
    }

    pub fn device_features(&self) -> u64 {
        self.w32(C_DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(C_DEVICE_FEATURE) as u64;
        self.w32(C_DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(C_DEVICE_FEATURE) as u64;
        (hi << 32) | lo
    }

    pub fn set_driver_features(&self, f: u64) {
        self.w32(C_DRIVER_FEATURE_SELECT, 0);
        self.w32(C_DRIVER_FEATURE, f as u32);
        self.w32(C_DRIVER_FEATURE_SELECT, 1);
        self.w32(C_DRIVER_FEATURE, (f >> 32) as u32);
    }

    /// 32-bit device config read at `off` (0 beyond the structure).
    fn dev32(&self, off: u32) -> u32 {
        if off as u64 + 4 > self.device_len as u64 {
            return 0;
        }
        // SAFETY: inside the device configuration structure, mapped uncached.
        unsafe { core::ptr::read_volatile((self.device + off as u64) as *const u32) }
    }

    /// 64-bit device config field as two 32-bit reads, retried (bounded)
    /// until config_generation is stable.
    pub fn config_u64(&self, off: u32) -> u64 {
        let mut v = 0;
        for _ in 0..8 {
            let g = self.r8(C_CONFIG_GENERATION);
            let lo = self.dev32(off) as u64;
            let hi = self.dev32(off + 4) as u64;
            v = (hi << 32) | lo;
            if self.r8(C_CONFIG_GENERATION) == g {
                break;
            }
        }
        v
    }

    /// 16-bit device config field (0 beyond the structure).
    pub fn config_u16(&self, off: u32) -> u16 {
        if off as u64 + 2 > self.device_len as u64 {
            return 0;
        }
        // SAFETY: inside the device configuration structure; 16-bit aligned.
        unsafe { core::ptr::read_volatile((self.device + off as u64) as *const u16) }
    }

    /// Writes config_msix_vector and returns what reads back.
    pub fn set_config_vector(&self, v: u16) -> u16 {
        self.w16(C_CONFIG_MSIX_VECTOR, v);
        self.r16(C_CONFIG_MSIX_VECTOR)
    }

    /// Selects queue `q`: Err(()) if it is already enabled, else its maximum size.
    pub fn queue_max(&self, q: u16) -> Result<u32, ()> {
        self.w16(C_QUEUE_SELECT, q);
        if self.r16(C_QUEUE_ENABLE) != 0 {
            return Err(());
        }
        Ok(self.r16(C_QUEUE_SIZE) as u32)
    }

    /// Programs the selected queue `q` and enables it. Returns the notify
    /// address, or Err(vector read back) / Err(None) for a notify offset
    /// outside the notify structure.
    pub fn queue_activate(
        &self,
        q: u16,
        size: u32,
        rings: (u64, u64, u64),
        vector: u16,
    ) -> Result<u64, Option<u16>> {
        self.w16(C_QUEUE_SELECT, q);
        self.w16(C_QUEUE_SIZE, size as u16);
        self.w64(C_QUEUE_DESC, rings.0);
        self.w64(C_QUEUE_DRIVER, rings.1);
        self.w64(C_QUEUE_DEVICE, rings.2);
        self.w16(C_QUEUE_MSIX_VECTOR, vector);
        let back = self.r16(C_QUEUE_MSIX_VECTOR);
        if back != vector {
            return Err(Some(back));
        }
        let off = self.r16(C_QUEUE_NOTIFY_OFF) as u64 * self.notify_mult as u64;
        if off + 2 > self.notify_len as u64 {
            return Err(None);
        }
        self.w16(C_QUEUE_ENABLE, 1);
        Ok(self.notify + off)
    }

    /// Notifies queue `q` at its notify address.
    pub fn notify(&self, q: u16, addr: u64) {
        // SAFETY: `addr` came from `queue_activate`: inside the notify
        // structure, mapped uncached; 16-bit aligned (2-aligned offset).
        unsafe { core::ptr::write_volatile(addr as *mut u16, q) }
    }

    /// Programs MSI-X table entries 0..n (entry i -> IDT vector
    /// MSIX_VECTOR_BASE + i on APIC `dest`, fixed, edge, unmasked), then
    /// sets enable and clears the function mask.
    pub fn msix_enable(&self, n: u16, dest: u8) {
        let Some(m) = self.msix else { return };
        for i in 0..n.min(m.size).min(MAX_MSIX) {
            let e = (m.table + 16 * i as u64) as *mut u32;
            // SAFETY: entry i < table size of the table mapped uncached by
            // `resolve`; dword accesses as the PCI spec requires.
            unsafe {
                core::ptr::write_volatile(e, 0xfee0_0000 | (dest as u32) << 12);
                core::ptr::write_volatile(e.add(1), 0);
                core::ptr::write_volatile(e.add(2), (MSIX_VECTOR_BASE as u32) + i as u32);
                core::ptr::write_volatile(e.add(3), 0);
            }
        }
        let ctl = self.bdf.read16(m.cap + 2);
        self.bdf.write16(m.cap + 2, (ctl | 1 << 15) & !(1 << 14));
    }
}

/// MSI-X interrupt handler (vectors MSIX_VECTOR_BASE..+MAX_MSIX): counts, EOIs.
pub fn msix_irq() {
    crate::transport::count_irq();
    lapic::eoi();
}

/// Moves the BAR holding the common configuration (memory decoding off
/// meanwhile): 64-bit BAR to current + 0x1000_0000 rounded up to its size,
/// 32-bit BAR to 0xC800_0000 (0xC400_0000 if already there). Returns (old,
/// new) as read back.
pub fn move_common_bar(bdf: Bdf) -> Result<(u64, u64), Error> {
    let Some(common) = read_caps(bdf).common else {
        return Err(("blk-pci-caps", "no common configuration capability"));
    };
    let Some(b) = pci::bar(bdf, common.bar) else {
        return Err((
            "blk-pci-caps",
            "the common configuration names a BAR that does not exist",
        ));
    };
    if b.io {
        return Err(("blk-pci-bar", "the common configuration names an I/O BAR"));
    }
    let size = pci::bar_size(bdf, &b);
    if size == 0 {
        return Err((
            "blk-bar-move",
            "the BAR does not size (reads back 0 after writing all-ones)",
        ));
    }
    let new = if b.is64 {
        let a = b.addr.wrapping_add(0x1000_0000);
        a.wrapping_add(size - 1) & !(size - 1)
    } else {
        let target = if b.addr == 0xc800_0000 {
            0xc400_0000
        } else {
            0xc800_0000
        };
        (target + size - 1) & !(size - 1)
    };
    let reg = pci::REG_BAR0 + 4 * b.index;
    let cmd = bdf.read16(pci::REG_COMMAND);
    bdf.write16(pci::REG_COMMAND, cmd & !pci::CMD_MEMORY);
    bdf.write32(reg, new as u32);
    if b.is64 {
        bdf.write32(reg + 4, (new >> 32) as u32);
    }
    bdf.write16(pci::REG_COMMAND, cmd | pci::CMD_MEMORY);
    let got = pci::bar(bdf, b.index).map_or(0, |x| x.addr);
    if got != new {
        crate::outln!(
            "blk bar move: BAR{} reads back {:#x} after writing {:#x}",
            b.index,
            got,
            new
        );
        return Err(("blk-bar-move", "the moved BAR does not read back"));
    }
    Ok((b.addr, got))
}
