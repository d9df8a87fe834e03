//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! finds its CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! Layout written at [`crate::memory::MPTABLE_START`] (the BIOS area that
//! Linux searches, reserved in the E820 map):
//!
//! ```text
//! floating pointer (16 bytes, "_MP_") -> configuration table ("PCMP"):
//!   header (44 bytes)
//!   processor entry x vcpus (20 bytes each; APIC id = vCPU index)
//!   bus entry: ISA (8 bytes)
//!   IOAPIC entry: id = vcpus, 0xfec00000 (8 bytes)
//!   I/O interrupt entries (8 bytes each): ISA IRQ n on pin n, for every
//!     pin: KVM's default GSI routing sends GSI n (the PIT's is 0) to
//!     IOAPIC pin n, so the table must say the same
//!   local interrupt entries: ExtINT on LINT0, NMI on LINT1
//! ```

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, HIGH_MEMORY_START, IOAPIC_START, LAPIC_START, MPTABLE_START};

/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The table would not fit in the BIOS area.
    #[error("MP table for {0} vCPUs does not fit below 1 MiB")]
    TooLarge(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs,
/// as the bytes to place at `base`.
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        let mut e = [0u8; CPU_ENTRY_LEN];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = flags;
        e[4..8].copy_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&((1u32 << 0) | (1 << 9)).to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC.
    let mut e = [0u8; SMALL_ENTRY_LEN];
    e[0] = 2;
    e[1] = ioapic_id;
    e[2] = 0x11;
    e[3] = 1; // usable
    e[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // I/O interrupts: (type, source IRQ, destination pin). Type 0 = INT;
    // flags 0 = conforms to the bus (ISA: edge, active high).
    let mut io_int = |kind: u8, src: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, src, ioapic_id, pin]);
        count += 1;
    };
    for irq in 0..IOAPIC_PINS {
        io_int(0, irq, irq);
    }
    // Local interrupts to every LAPIC (0xff): ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_LEN as u64;
    let table_len = HEADER_LEN + entries.len();
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"OUTBOARD");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_START as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4; // spec revision
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `vcpus` CPUs into the BIOS area.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus, MPTABLE_START);
    if bytes.len() as u64 > HIGH_MEMORY_START - MPTABLE_START {
        return Err(MptableError::TooLarge(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_hold() {
        for vcpus in [1u8, 4, 254] {
            let t = build(vcpus, MPTABLE_START);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
            let count = u16::from_le_bytes([t[50], t[51]]) as usize;
            // cpus + bus + ioapic + 24 io ints + 2 local ints
            assert_eq!(count, vcpus as usize + 1 + 1 + 24 + 2);
            let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
        }
    }

    #[test]
    fn largest_table_fits_the_bios_area() {
        assert!(build(254, MPTABLE_START).len() as u64 <= HIGH_MEMORY_START - MPTABLE_START);
    }

    #[test]
    fn isa_irqs_map_to_the_same_ioapic_pin() {
        let vcpus = 2;
        let t = build(vcpus, MPTABLE_START);
        let io_ints = 16 + HEADER_LEN + vcpus as usize * CPU_ENTRY_LEN + 2 * SMALL_ENTRY_LEN;
        for irq in 0..IOAPIC_PINS as usize {
            let e = &t[io_ints + irq * SMALL_ENTRY_LEN..][..SMALL_ENTRY_LEN];
            assert_eq!(
                (e[0], e[1], e[5], e[6], e[7]),
                (3, 0, irq as u8, vcpus, irq as u8)
            );
        }
    }

    #[test]
    fn only_the_first_cpu_is_bsp() {
        let t = build(3, MPTABLE_START);
        let cpu = |i: usize| &t[16 + HEADER_LEN + i * CPU_ENTRY_LEN..];
        assert_eq!(cpu(0)[3], 3);
        assert_eq!(cpu(1)[3], 1);
        assert_eq!(cpu(2)[1], 2);
    }
}
