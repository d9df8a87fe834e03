//! Intel MultiProcessor table: finds the "_MP_" floating pointer (EBDA,
//! 0x9FC00..0xA0000, 0xF0000..0x100000) and lists the enabled processors of
//! the "PCMP" configuration table. Every read is bounds- and map-checked.

use crate::paging;

/// Most CPUs the guest handles (BSP included).
pub const MAX_CPUS: usize = 64;

/// What the MP table says.
pub struct MpInfo {
    /// True if a floating pointer was found.
    pub found: bool,
    /// APIC IDs of the enabled processors, in table order.
    pub apic_ids: [u8; MAX_CPUS],
    pub count: usize,
    /// Set when a table was found but is malformed.
    pub error: Option<&'static str>,
}

fn read_u8(a: u64) -> u8 {
    // SAFETY: callers check `paging::is_mapped` for the whole structure first.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

fn read_u16(a: u64) -> u16 {
    read_u8(a) as u16 | (read_u8(a + 1) as u16) << 8
}

fn read_u32(a: u64) -> u32 {
    read_u16(a) as u32 | (read_u16(a + 2) as u32) << 16
}

fn checksum_ok(a: u64, len: u64) -> bool {
    let mut sum: u8 = 0;
    for i in 0..len {
        sum = sum.wrapping_add(read_u8(a + i));
    }
    sum == 0
}

/// Scans `[start, end)` on 16-byte boundaries for a valid floating pointer.
fn scan(start: u64, end: u64) -> Option<u64> {
    if end <= start || !paging::is_mapped(start, end - start) {
        return None;
    }
    const SIG: u32 = u32::from_le_bytes(*b"_MP_");
    let mut a = start;
    while a + 16 <= end {
        // SAFETY: the range was checked to be mapped; `a` is 16-byte aligned.
        let w = unsafe { core::ptr::read_volatile(a as *const u32) };
        if w == SIG && read_u8(a + 8) == 1 && checksum_ok(a, 16) {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn find_floating() -> Option<u64> {
    // The EBDA segment is in the BIOS data area at 0x40E.
    let ebda = (read_u16(0x40e) as u64) << 4;
    if (0x8_0000..0xa_0000).contains(&ebda) {
        if let Some(a) = scan(ebda, (ebda + 1024).min(0xa_0000)) {
            return Some(a);
        }
    }
    scan(0x9_fc00, 0xa_0000).or_else(|| scan(0xf_0000, 0x10_0000))
}

/// Looks for the MP table. If there is none, `found` is false.
pub fn probe() -> MpInfo {
    let mut info = MpInfo {
        found: false,
        apic_ids: [0; MAX_CPUS],
        count: 0,
        error: None,
    };
    let Some(fp) = find_floating() else {
        return info;
    };
    info.found = true;
    let feature1 = read_u8(fp + 11);
    if feature1 != 0 {
        // A default configuration: two processors, APIC IDs 0 and 1.
        info.apic_ids[0] = 0;
        info.apic_ids[1] = 1;
        info.count = 2;
        return info;
    }
    let cfg = read_u32(fp + 4) as u64;
    if cfg == 0 || !paging::is_mapped(cfg, 44) {
        info.error = Some("mptable-pointer");
        return info;
    }
    if read_u32(cfg) != u32::from_le_bytes(*b"PCMP") {
        info.error = Some("mptable-signature");
        return info;
    }
    let len = read_u16(cfg + 4) as u64;
    if len < 44 || !paging::is_mapped(cfg, len) {
        info.error = Some("mptable-length");
        return info;
    }
    if !checksum_ok(cfg, len) {
        info.error = Some("mptable-checksum");
        return info;
    }
    // Walk the entries by the table length, like Linux: some firmware (qboot)
    // leaves the entry count at offset 34 zero.
    let end = cfg + len;
    let mut p = cfg + 44;
    while p < end {
        let size = match read_u8(p) {
            0 => 20,
            1..=4 => 8,
            _ => {
                info.error = Some("mptable-entry-type");
                break;
            }
        };
        if p + size > end {
            info.error = Some("mptable-entries");
            break;
        }
        if read_u8(p) == 0 && read_u8(p + 3) & 1 != 0 && info.count < MAX_CPUS {
            info.apic_ids[info.count] = read_u8(p + 1);
            info.count += 1;
        }
        p += size;
    }
    info
}
