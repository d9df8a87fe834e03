//! PCI bus 0: a host bridge at 00:00.0 and up to 31 single-function
//! devices, reached through configuration mechanism #1 (ports 0xCF8 and
//! 0xCFC..0xCFF, the path Linux takes without ACPI), and the MMIO windows
//! their memory BARs live in.

use std::sync::{Arc, Mutex};

use super::config::{PciConfigSpace, PciIdentity};

/// First configuration port (CONFIG_ADDRESS); CONFIG_DATA is 4 above.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports the configuration mechanism takes (0xCF8..0xCFF).
pub const CONFIG_PORTS: u16 = 8;
/// Slots on the bus, the host bridge's included.
pub const SLOTS: usize = 32;

/// A PCI function the bus dispatches to. Offsets and sizes come from the
/// guest: implementations take any of them without panicking.
pub trait PciFunction: Send {
    /// Reads `data.len()` bytes of configuration space at `offset` (0..256).
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The memory BARs decoded now: `(bar, address, size)`.
    fn decoded_bars(&self) -> Vec<(usize, u64, u64)>;
    /// A read inside BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Errors adding a function.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    /// Every slot is taken.
    #[error("the PCI bus is full ({} slots)", SLOTS - 1)]
    Full,
    /// No room left in a BAR window.
    #[error("no room for a {size:#x}-byte BAR in the {window} window")]
    NoBarSpace {
        /// The BAR size.
        size: u64,
        /// Which window.
        window: &'static str,
    },
}

/// A range of guest physical addresses BARs are placed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First address.
    pub start: u64,
    /// Length.
    pub size: u64,
}

impl Window {
    /// Whether `addr..addr+len` is inside.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.start + self.size)
    }
}

/// Hands out naturally aligned BAR addresses from a window, bottom up.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    window: Window,
    next: u64,
    name: &'static str,
}

impl BarAllocator {
    /// An allocator over `window`, named in errors.
    pub fn new(window: Window, name: &'static str) -> Self {
        BarAllocator {
            window,
            next: window.start,
            name,
        }
    }

    /// A `size`-byte (power of two) range aligned to its size.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciBusError> {
        let err = PciBusError::NoBarSpace {
            size,
            window: self.name,
        };
        if !size.is_power_of_two() {
            return Err(err);
        }
        let addr = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(err.clone())?;
        let end = addr.checked_add(size).ok_or(err.clone())?;
        if end > self.window.start + self.window.size {
            return Err(err);
        }
        self.next = end;
        Ok(addr)
    }
}

/// The host bridge at 00:00.0 (what Linux's type 1 probe looks for).
struct HostBridge(PciConfigSpace);

impl PciFunction for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A function shared between the bus and the VMM.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

struct Mapping {
    start: u64,
    size: u64,
    slot: usize,
    bar: usize,
}

// Every access looks its target up under the bus lock and calls the
// function outside it: a function may block (a vfio-user function waits for
// its device process), and other vCPUs must still reach the rest of the bus.

/// The function and config offset a CONFIG_DATA access of `len` bytes at
/// port 0xCF8 + `offset` reaches, if any.
fn data_target(root: &Mutex<PciRoot>, offset: u16, len: usize) -> Option<(SharedFunction, usize)> {
    let byte = usize::from(offset.checked_sub(4)?);
    if byte + len > 4 {
        return None;
    }
    let (f, reg) = root.lock().ok()?.selected()?;
    Some((f, reg + byte))
}

/// A guest read of ports 0xCF8 + `offset` (0..8).
pub fn config_port_read(root: &Mutex<PciRoot>, offset: u16, data: &mut [u8]) {
    data.fill(0xff);
    if offset == 0 {
        if let (Ok(r), Ok(out)) = (root.lock(), <&mut [u8; 4]>::try_from(&mut *data)) {
            *out = r.config_address.to_le_bytes();
        }
        return;
    }
    if let Some((f, at)) = data_target(root, offset, data.len()) {
        if let Ok(mut f) = f.lock() {
            f.read_config(at, data);
        }
    }
}

/// A guest write of ports 0xCF8 + `offset` (0..8).
pub fn config_port_write(root: &Mutex<PciRoot>, offset: u16, data: &[u8]) {
    if offset == 0 {
        if let (Ok(mut r), Ok(word)) = (root.lock(), <[u8; 4]>::try_from(data)) {
            r.config_address = u32::from_le_bytes(word);
        }
        return;
    }
    if let Some((f, at)) = data_target(root, offset, data.len()) {
        if let Ok(mut f) = f.lock() {
            f.write_config(at, data);
        }
        // The write may have moved a BAR or switched decoding.
        if let Ok(mut r) = root.lock() {
            r.refresh_mappings();
        }
    }
}

/// A BAR read at `addr`; false when nothing decodes it.
pub fn mmio_read(root: &Mutex<PciRoot>, addr: u64, data: &mut [u8]) -> bool {
    let target = root.lock().ok().and_then(|r| r.find(addr, data.len()));
    let Some((f, bar, offset)) = target else {
        return false;
    };
    if let Ok(mut f) = f.lock() {
        f.read_bar(bar, offset, data);
    }
    true
}

/// A BAR write at `addr`; false when nothing decodes it.
pub fn mmio_write(root: &Mutex<PciRoot>, addr: u64, data: &[u8]) -> bool {
    let target = root.lock().ok().and_then(|r| r.find(addr, data.len()));
    let Some((f, bar, offset)) = target else {
        return false;
    };
    if let Ok(mut f) = f.lock() {
        f.write_bar(bar, offset, data);
    }
    true
}

/// PCI bus 0.
pub struct PciRoot {
    slots: Vec<Option<SharedFunction>>,
    config_address: u32,
    mappings: Vec<Mapping>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let bridge = PciConfigSpace::new(PciIdentity {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: 0x06_0000,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let mut slots: Vec<Option<SharedFunction>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge(bridge))));
        PciRoot {
            slots,
            config_address: 0,
            mappings: Vec::new(),
        }
    }

    /// The next free slot, without taking it.
    pub fn next_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Puts `function` in the next free slot; returns the slot.
    pub fn add(&mut self, function: SharedFunction) -> Result<usize, PciBusError> {
        let slot = self.next_slot().ok_or(PciBusError::Full)?;
        self.slots[slot] = Some(function);
        self.refresh_mappings();
        Ok(slot)
    }

    /// Re-reads every function's decoded BARs (after a config write that
    /// may have moved one or switched decoding).
    fn refresh_mappings(&mut self) {
        let mut mappings = Vec::new();
        for (slot, f) in self.slots.iter().enumerate() {
            let Some(f) = f else { continue };
            let Ok(f) = f.lock() else { continue };
            for (bar, start, size) in f.decoded_bars() {
                mappings.push(Mapping {
                    start,
                    size,
                    slot,
                    bar,
                });
            }
        }
        self.mappings = mappings;
    }

    /// The function and register CONFIG_ADDRESS selects now, if any.
    fn selected(&self) -> Option<(SharedFunction, usize)> {
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let device = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        let f = self.slots.get(device)?.as_ref()?.clone();
        Some((f, (a & 0xfc) as usize))
    }

    /// The function, BAR and offset that decode `len` bytes at `addr`.
    fn find(&self, addr: u64, len: usize) -> Option<(SharedFunction, usize, u64)> {
        let m = self.mappings.iter().find(|m| {
            addr >= m.start
                && addr
                    .checked_add(len as u64)
                    .zip(m.start.checked_add(m.size))
                    .is_some_and(|(end, bar_end)| end <= bar_end)
        })?;
        let f = self.slots.get(m.slot)?.as_ref()?.clone();
        Some((f, m.bar, addr - m.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BarKind, COMMAND_MEMORY};

    struct Dev {
        config: PciConfigSpace,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciFunction for Dev {
        fn read_config(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
            self.config.decoded_bars()
        }
        fn read_bar(&mut self, _: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn bus() -> (Mutex<PciRoot>, Arc<Mutex<Dev>>) {
        let mut config = PciConfigSpace::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_8000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config
            .add_bar(0, BarKind::Memory32, 0x1000, 0xc000_0000)
            .unwrap();
        let dev = Arc::new(Mutex::new(Dev {
            config,
            last_write: None,
        }));
        let mut root = PciRoot::new();
        assert_eq!(root.add(dev.clone()).unwrap(), 1);
        (Mutex::new(root), dev)
    }

    fn cfg_read(root: &Mutex<PciRoot>, slot: u32, reg: u32) -> u32 {
        config_port_write(root, 0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
        let mut b = [0u8; 4];
        config_port_read(root, 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn linux_type1_probe_finds_the_host_bridge() {
        let (root, _) = bus();
        config_port_write(&root, 0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        config_port_read(&root, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        assert_eq!(cfg_read(&root, 0, 8) >> 8, 0x06_0000);
        assert_eq!(cfg_read(&root, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read(&root, 2, 0), 0xffff_ffff);
        // Function 1, bus 1 and a disabled address read as all ones.
        config_port_write(&root, 0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
        config_port_read(&root, 4, &mut b);
        assert_eq!(b, [0xff; 4]);
        config_port_write(&root, 0, &(0x8001_0000u32 | 1 << 11).to_le_bytes());
        config_port_read(&root, 4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // 16-bit read of the device id at 0xCFE.
        config_port_write(&root, 0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        let mut w = [0u8; 2];
        config_port_read(&root, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
    }

    #[test]
    fn bars_decode_only_with_memory_enabled_and_follow_moves() {
        let (root, dev) = bus();
        let mut b = [0u8; 4];
        assert!(!mmio_read(&root, 0xc000_0010, &mut b));
        config_port_write(&root, 0, &(0x8000_0004u32 | 1 << 11).to_le_bytes());
        config_port_write(&root, 4, &COMMAND_MEMORY.to_le_bytes());
        assert!(mmio_read(&root, 0xc000_0010, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(mmio_write(&root, 0xc000_0ffc, &[1, 2, 3, 4]));
        assert_eq!(
            dev.lock().unwrap().last_write,
            Some((0, 0xffc, vec![1, 2, 3, 4]))
        );
        // An access crossing the end of the BAR is not the BAR's.
        assert!(!mmio_write(&root, 0xc000_0ffe, &[1, 2, 3, 4]));
        // Move the BAR.
        config_port_write(&root, 0, &(0x8000_0010u32 | 1 << 11).to_le_bytes());
        config_port_write(&root, 4, &0xc010_0000u32.to_le_bytes());
        assert!(!mmio_read(&root, 0xc000_0010, &mut b));
        assert!(mmio_read(&root, 0xc010_0010, &mut b));
    }

    #[test]
    fn allocator_aligns_and_runs_out() {
        let mut a = BarAllocator::new(
            Window {
                start: 0xc000_0000,
                size: 0x10000,
            },
            "test",
        );
        assert_eq!(a.allocate(0x1000).unwrap(), 0xc000_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc000_8000);
        assert!(a.allocate(0x8000).is_err());
        assert!(a.allocate(0x3000).is_err());
    }

    /// Random config and MMIO accesses of every size never panic.
    #[test]
    fn garbage_accesses_are_harmless() {
        let (root, _) = bus();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let len = [1usize, 2, 4, 8][(r & 3) as usize];
            let mut buf = vec![0u8; len];
            let value = next().to_le_bytes();
            match (r >> 2) % 4 {
                0 => config_port_write(&root, ((r >> 8) % 8) as u16, &value[..len]),
                1 => config_port_read(&root, ((r >> 8) % 8) as u16, &mut buf),
                2 => {
                    mmio_write(&root, 0xc000_0000 + (r >> 8) % 0x2000, &value[..len]);
                }
                _ => {
                    mmio_read(&root, 0xc000_0000 + (r >> 8) % 0x2000, &mut buf);
                }
            }
        }
        // The host bridge is still there.
        assert_eq!(cfg_read(&root, 0, 0), 0x0d57_8086);
    }
}
