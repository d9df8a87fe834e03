//! A type 0 PCI configuration space (256 bytes): identity, command
//! register, BARs sized and placed by the VMM, and a capability list.
//!
//! Every guest write goes through per-bit write masks, so read-only fields
//! stay put, BAR sizing works the usual way (write all ones, read back
//! `!(size - 1)` and the type bits) and no access of any size or offset can
//! do more than change writable bits.

/// Bytes of configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
const REGS: usize = CONFIG_SPACE_SIZE / 4;
/// First configuration register of the BARs.
const BAR0_REG: usize = 4;
/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;
/// Command register: memory space decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list exists.
const STATUS_CAP_LIST: u32 = 1 << 4;
const CAP_START: usize = 0x40;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR (placed below 4 GiB).
    Memory32,
    /// 64-bit memory BAR, taking two BAR registers.
    Memory64,
}

/// A BAR's size and type; `size` 0 means unused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// Identity fields of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// Errors building a configuration space (VMM bugs, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    /// The BAR index is taken, out of range, or a 64-bit BAR has no room
    /// for its upper half.
    #[error("BAR {0} cannot be used")]
    BarSlot(usize),
    /// BAR sizes are powers of two of at least 16 bytes; the address must
    /// be aligned to it.
    #[error("BAR size {size:#x} at {addr:#x} is not a naturally aligned power of two")]
    BarSize {
        /// The size.
        size: u64,
        /// The address.
        addr: u64,
    },
    /// The capability does not fit in configuration space.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// A function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfigSpace {
    regs: [u32; REGS],
    wmask: [u32; REGS],
    bars: [Bar; NUM_BARS],
    next_cap: usize,
    last_cap_next: Option<usize>,
}

impl PciConfigSpace {
    /// A header for `id`, no BARs, no capabilities, no INTx pin.
    pub fn new(id: PciIdentity) -> Self {
        let mut c = PciConfigSpace {
            regs: [0; REGS],
            wmask: [0; REGS],
            bars: [Bar {
                size: 0,
                kind: BarKind::Memory32,
            }; NUM_BARS],
            next_cap: CAP_START,
            last_cap_next: None,
        };
        c.regs[0] = u32::from(id.vendor) | u32::from(id.device) << 16;
        c.regs[2] = u32::from(id.revision) | (id.class & 0xff_ffff) << 8;
        c.regs[11] = u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16;
        // Command: memory, bus master, parity, SERR, INTx disable.
        c.wmask[1] = 0x0000_0546;
        // Cache line size and latency timer.
        c.wmask[3] = 0x0000_ffff;
        // Interrupt line (pin 0: no INTx).
        c.wmask[15] = 0x0000_00ff;
        c
    }

    /// Declares BAR `index` of `size` bytes of `kind` at `addr`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
    ) -> Result<(), ConfigSpaceError> {
        let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
        let free = (index..index + slots)
            .all(|i| i < NUM_BARS && self.bars[i].size == 0 && !self.is_upper_half(i));
        if !free {
            return Err(ConfigSpaceError::BarSlot(index));
        }
        if size < 16 || !size.is_power_of_two() || addr % size != 0 {
            return Err(ConfigSpaceError::BarSize { size, addr });
        }
        if kind == BarKind::Memory32 && addr.checked_add(size).is_none_or(|e| e > 1 << 32) {
            return Err(ConfigSpaceError::BarSize { size, addr });
        }
        self.bars[index] = Bar { size, kind };
        let reg = BAR0_REG + index;
        let type_bits: u32 = if kind == BarKind::Memory64 { 0b100 } else { 0 };
        self.regs[reg] = (addr as u32 & !0xf) | type_bits;
        self.wmask[reg] = !((size - 1) as u32) & !0xf;
        if kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.wmask[reg + 1] = !((size - 1) >> 32) as u32;
        }
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && self.bars[index - 1].size != 0
            && self.bars[index - 1].kind == BarKind::Memory64
    }

    /// Appends a capability: `body` starts with its id byte and a
    /// placeholder next-pointer byte; `wmask` (same length, or empty) says
    /// which of its bits the guest may write. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigSpaceError> {
        let len = body.len().max(2).next_multiple_of(4);
        let offset = self.next_cap;
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilitySpace(body.len()));
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, *b, wmask.get(i).copied().unwrap_or(0));
        }
        self.set_byte(offset + 1, 0, 0);
        match self.last_cap_next {
            Some(prev) => self.set_byte(prev, offset as u8, 0),
            None => {
                self.set_byte(0x34, offset as u8, 0);
                self.regs[1] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_cap_next = Some(offset + 1);
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8, mask: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
        self.wmask[reg] = (self.wmask[reg] & !(0xff << shift)) | u32::from(mask) << shift;
    }

    /// The 32-bit register `reg` (0..64); out of range reads 0.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// `data.len()` bytes at byte `offset`; bytes past the end read 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.regs.get(o / 4).map(|r| (r >> ((o % 4) * 8)) as u8))
                .unwrap_or(0);
        }
    }

    /// A guest write of `data` at byte `offset`: only writable bits change;
    /// bytes past the end are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < CONFIG_SPACE_SIZE) else {
                return;
            };
            let (reg, shift) = (o / 4, (o % 4) * 8);
            let mask = (self.wmask[reg] >> shift) as u8;
            let old = (self.regs[reg] >> shift) as u8;
            let new = (old & !mask) | (*b & mask);
            self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(new) << shift;
        }
    }

    /// Sets bits of a capability byte the guest cannot write (device-side
    /// state, e.g. a value read back).
    pub fn set_device_byte(&mut self, offset: usize, value: u8) {
        if offset < CONFIG_SPACE_SIZE {
            let mask = (self.wmask[offset / 4] >> ((offset % 4) * 8)) as u8;
            self.set_byte(offset, value, mask);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// BAR `index`'s address and size if it is used (whether or not memory
    /// decode is on).
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).filter(|b| b.size != 0)?;
        let reg = BAR0_REG + index;
        let low = u64::from(self.regs[reg] & !0xf);
        let addr = match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.regs[reg + 1]) << 32,
        };
        Some((addr, bar.size))
    }

    /// The memory BARs the function decodes now (memory space enabled):
    /// `(index, address, size)`.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..NUM_BARS)
            .filter_map(|i| self.bar(i).map(|(a, s)| (i, a, s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> PciConfigSpace {
        let mut c = PciConfigSpace::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_8000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        c.add_bar(0, BarKind::Memory64, 0x8000, 0x40_0000_0000)
            .unwrap();
        c.add_bar(2, BarKind::Memory32, 0x1000, 0xc000_0000)
            .unwrap();
        c
    }

    #[test]
    fn identity_and_read_only_fields() {
        let mut c = space();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2) >> 8, 0x01_8000);
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = space();
        // Sizing: all ones, read back !(size-1) with the type bits.
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        // Move to 0x50_0000_0000.
        c.write(0x10, &0u32.to_le_bytes());
        c.write(0x14, &0x50u32.to_le_bytes());
        assert_eq!(c.bar(0), Some((0x50_0000_0000, 0x8000)));
        // The 32-bit BAR keeps its alignment whatever is written.
        c.write(0x18, &0xc000_0fffu32.to_le_bytes());
        assert_eq!(c.bar(2), Some((0xc000_0000, 0x1000)));
        // Unused BARs read 0 and stay 0.
        c.write(0x20, &[0xff; 4]);
        assert_eq!(c.read_reg(8), 0);
        assert!(c.decoded_bars().is_empty());
        c.write(4, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.decoded_bars().len(), 2);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = space();
        let a = c
            .add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        let b = c.add_capability(&[0x09, 0, 16, 1], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        let mut buf = [0u8; 2];
        c.read(0x34, &mut buf[..1]);
        assert_eq!(buf[0], 0x40);
        c.read(0x40, &mut buf);
        assert_eq!(buf, [0x11, 0x44]);
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        c.write(0x43, &[0xff]);
        c.read(0x43, &mut buf[..1]);
        assert_eq!(buf[0], 0xc0);
        c.write(0x44, &[0xff; 4]);
        assert_eq!(c.read_reg(0x44 / 4), 0x0110_0009);
    }

    #[test]
    fn any_access_is_safe() {
        let mut c = space();
        let mut buf = [0u8; 8];
        for off in [0usize, 3, 0xfd, 0xff, 0x100, usize::MAX - 2] {
            c.read(off, &mut buf);
            c.write(off, &buf);
        }
        assert_eq!(c.read_reg(64), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = space();
        assert!(c
            .add_bar(1, BarKind::Memory32, 0x1000, 0xc000_0000)
            .is_err());
        assert!(c.add_bar(5, BarKind::Memory64, 0x1000, 0).is_err());
        assert!(c.add_bar(4, BarKind::Memory32, 0x1800, 0).is_err());
        assert!(c
            .add_bar(4, BarKind::Memory32, 0x1000, 0xffff_f800)
            .is_err());
    }
}
