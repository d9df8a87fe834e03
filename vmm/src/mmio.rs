//! The MMIO bus: guest-physical ranges inside the MMIO hole, each owned by
//! one device. vCPU threads dispatch MMIO exits here; an address no device
//! owns reads as all ones and ignores writes.

use std::sync::{Arc, Mutex};

/// A device that answers MMIO accesses at offsets inside its range.
pub trait MmioDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the range's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` from the range's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioError {
    /// The range is empty or wraps around the address space.
    #[error("invalid MMIO range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("MMIO range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// The existing range's base.
        other_base: u64,
        /// The existing range's length.
        other_len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// The set of MMIO devices, sorted by base address.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `device` the range `base..base + len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), MmioError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(MmioError::InvalidRange { base, len })?;
        if let Some(r) = self
            .ranges
            .iter()
            .find(|r| base < r.base + r.len && r.base < end)
        {
            return Err(MmioError::Overlap {
                base,
                len,
                other_base: r.base,
                other_len: r.len,
            });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device owning `addr` and the offset of `addr` in its range, if
    /// the whole access of `size` bytes fits in that range.
    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = self.ranges.get(idx)?;
        let offset = addr - r.base;
        let last = offset.checked_add(size as u64)?;
        (last <= r.len).then_some((r, offset))
    }

    /// A guest read at `addr`; returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                if let Ok(mut d) = r.device.lock() {
                    d.read(offset, data);
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write at `addr`; returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                if let Ok(mut d) = r.device.lock() {
                    d.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl MmioDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn accesses_reach_the_owner_at_its_offset() {
        let mut bus = MmioBus::new();
        let a = probe();
        let b = probe();
        bus.insert(0xd000_1000, 0x1000, a.clone()).unwrap();
        bus.insert(0xd000_0000, 0x1000, b.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0xd000_1010, &mut d));
        assert_eq!(d, [0x10; 4]);
        assert!(bus.write(0xd000_0ffc, &[1, 2, 3, 4]));
        assert_eq!(
            b.lock().unwrap().last_write,
            Some((0xffc, vec![1, 2, 3, 4]))
        );
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unowned_and_straddling_accesses_float_high() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, probe()).unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xcfff_fffc, &mut d));
        assert_eq!(d, [0xff; 4]);
        // Starts inside, ends past the range.
        assert!(!bus.read(0xd000_0ffe, &mut d));
        assert!(!bus.write(0xd000_0ffe, &[0; 4]));
        assert!(!bus.read(u64::MAX - 1, &mut d));
    }

    #[test]
    fn overlapping_and_invalid_ranges_are_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, probe()).unwrap();
        assert!(matches!(
            bus.insert(0xd000_0800, 0x1000, probe()),
            Err(MmioError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xcfff_f800, 0x1000, probe()),
            Err(MmioError::Overlap { .. })
        ));
        assert!(bus.insert(0xd000_1000, 0, probe()).is_err());
        assert!(bus.insert(u64::MAX, 2, probe()).is_err());
        bus.insert(0xd000_1000, 0x1000, probe()).unwrap();
    }
}
