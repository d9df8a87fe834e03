//! MSI-X (PCI local bus spec 6.8.2): the capability's control word, the
//! vector table (16 bytes per vector: address, data, vector control) and
//! the pending bit array, as the guest sees them in a BAR.
//!
//! Table accesses of any size and alignment work byte by byte; the spec
//! asks drivers for dword or qword accesses, and nothing else can do harm.

/// MSI-X capability id.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MAX_VECTORS: u16 = 2048;
/// Control word: MSI-X enabled.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Control word: all vectors masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: where the device writes and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Message address (the LAPIC window, with the destination).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// An MSI-X vector table and its control state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Msix {
    table: Vec<u8>,
    pending: Vec<bool>,
    control: u16,
}

impl Msix {
    /// A table of `vectors` entries (1 to [`MAX_VECTORS`]), all masked,
    /// MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        let mut table = vec![0u8; usize::from(n) * ENTRY_SIZE as usize];
        for entry in table.chunks_exact_mut(ENTRY_SIZE as usize) {
            entry[12] = VECTOR_MASKED as u8;
        }
        Msix {
            table,
            pending: vec![false; usize::from(n)],
            control: n - 1,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.pending.len() as u16
    }

    /// The capability body to put in configuration space (with the table
    /// and PBA in BAR `bar` at the given offsets) and its write mask.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = CAP_ID;
        body[2..4].copy_from_slice(&self.control.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[3] = 0xc0; // enable and function mask
        (body, mask)
    }

    /// The control word as the capability shows it.
    pub fn control(&self) -> u16 {
        self.control
    }

    /// The guest wrote the capability's control word; returns whether the
    /// enable or function-mask bit changed.
    pub fn set_control(&mut self, value: u16) -> bool {
        let bits = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        let new = (self.control & !bits) | (value & bits);
        let changed = new != self.control;
        self.control = new;
        changed
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn entry(&self, vector: u16) -> Option<&[u8]> {
        let start = usize::from(vector) * ENTRY_SIZE as usize;
        self.table.get(start..start + ENTRY_SIZE as usize)
    }

    /// Vector `vector`'s message, whether or not it may be delivered.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.entry(vector)?;
        let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        Some(MsiMessage {
            address: u64::from(word(0)) | u64::from(word(4)) << 32,
            data: word(8),
        })
    }

    /// Whether `vector` may be delivered now: MSI-X enabled, the function
    /// and the vector unmasked.
    pub fn deliverable(&self, vector: u16) -> bool {
        self.enabled()
            && self.control & CONTROL_FUNCTION_MASK == 0
            && self
                .entry(vector)
                .is_some_and(|e| u32::from(e[12]) & VECTOR_MASKED == 0)
    }

    /// A guest read of the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        read_bytes(&self.table, offset, data);
    }

    /// A guest write to the table at `offset`; returns the vectors it
    /// touched.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<u16> {
        let mut touched = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|o| *o < self.table.len())
            else {
                break;
            };
            // Vector control: only the mask bit is writable.
            let value = if o % ENTRY_SIZE as usize == 12 {
                *b & VECTOR_MASKED as u8
            } else if o % ENTRY_SIZE as usize > 12 {
                0
            } else {
                *b
            };
            self.table[o] = value;
            let v = (o / ENTRY_SIZE as usize) as u16;
            if touched.last() != Some(&v) {
                touched.push(v);
            }
        }
        touched
    }

    /// A guest read of the pending bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = vec![0u8; self.pending.len().div_ceil(64) * 8];
        for (v, p) in self.pending.iter().enumerate() {
            if *p {
                bytes[v / 8] |= 1 << (v % 8);
            }
        }
        read_bytes(&bytes, offset, data);
    }

    /// Marks `vector` pending (an interrupt raised while masked) or not.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if let Some(p) = self.pending.get_mut(usize::from(vector)) {
            *p = pending;
        }
    }

    /// Bytes of table for `vectors` entries.
    pub fn table_size(vectors: u16) -> u64 {
        u64::from(vectors) * ENTRY_SIZE
    }

    /// Bytes of pending bit array for `vectors` entries (whole qwords).
    pub fn pba_size(vectors: u16) -> u64 {
        u64::from(vectors).div_ceil(64) * 8
    }
}

fn read_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_start_masked_and_unmask_when_enabled() {
        let mut m = Msix::new(3);
        assert_eq!(m.control(), 2);
        assert!(!m.deliverable(0));
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        assert_eq!(m.write_table(12, &0u32.to_le_bytes()), vec![0]);
        assert!(!m.deliverable(0), "MSI-X still disabled");
        assert!(m.set_control(0x8000));
        assert!(m.deliverable(0));
        assert_eq!(
            m.message(0),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        m.set_control(0xc000);
        assert!(!m.deliverable(0), "function mask");
        // Table size bits are read-only.
        m.set_control(0xffff);
        assert_eq!(m.control() & 0x7ff, 2);
    }

    #[test]
    fn odd_accesses_stay_inside_the_table() {
        let mut m = Msix::new(2);
        assert_eq!(m.write_table(28, &[0xff; 8]), vec![1]);
        let mut buf = [0u8; 8];
        m.read_table(28, &mut buf);
        assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(m.write_table(u64::MAX, &[1; 4]).is_empty());
        m.read_table(u64::MAX - 1, &mut buf);
        assert_eq!(buf, [0; 8]);
        m.set_pending(1, true);
        m.set_pending(9, true);
        m.read_pba(0, &mut buf);
        assert_eq!(buf[0], 2);
        assert!(m.message(2).is_none());
    }
}
