//! Loading the kernel and writing what it expects to find at entry: the
//! command line, the initrd, the E820 map (in a Linux `boot_params` zero page
//! or a PVH `hvm_start_info`), the MP table, and the GDT and page tables
//! for a direct 64-bit entry.
//!
//! Low-memory layout of the boot structures:
//!
//! ```text
//! 0x0500  GDT (6 entries: the 64-bit TSS descriptor takes two)
//! 0x0530  IDT (empty)
//! 0x6000  hvm_start_info, 0x6040 module list, 0x6100 PVH memory map
//! 0x7000  boot_params (zero page)
//! 0x8ff0  boot stack (grows down)
//! 0x9000  PML4, 0xa000 PDPT, 0xb000 PD: identity map of the first GiB
//! 0x20000 kernel command line
//! 0x100000 kernel; initrd at the top of low RAM
//! ```

pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::config::{EntryProtocol, KernelConfig, MAX_CMDLINE_LEN};
use crate::memory::{GuestRam, EBDA_START, HIGH_MEMORY_START, MMIO_HOLE_END};

/// Address of the GDT.
pub const GDT_START: u64 = 0x500;
/// Address of the (empty) IDT, right after the GDT.
pub const IDT_START: u64 = GDT_START + 8 * GDT_ENTRIES as u64;
/// Entries in the boot GDT.
pub const GDT_ENTRIES: usize = 6;
/// Address of the PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
const PVH_MODLIST_START: u64 = 0x6040;
const PVH_MEMMAP_START: u64 = 0x6100;
/// Address of the Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Address of the top-level page table.
pub const PML4_START: u64 = 0x9000;
const PDPT_START: u64 = 0xa000;
const PD_START: u64 = 0xb000;
/// Address of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `xloadflags` bit: the bzImage has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Where a bzImage's decompressor places the kernel at the least
/// (`LOAD_PHYSICAL_ADDR`), when its header asks for less.
const BZIMAGE_MIN_LOAD: u64 = 0x100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading the kernel and writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel image is neither a loadable ELF nor a bzImage.
    #[error("cannot load kernel {path}: as ELF: {elf}; as bzImage: {bzimage}")]
    Kernel {
        /// The path.
        path: String,
        /// The ELF loader's complaint.
        elf: linux_loader::loader::Error,
        /// The bzImage loader's complaint.
        bzimage: linux_loader::loader::Error,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("kernel {0} is a bzImage without a 64-bit entry (XLF_KERNEL_64 not set)")]
    No64BitEntry(String),
    /// `entry: pvh` was asked for but the kernel has no PVH note.
    #[error(
        "kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use \"entry\": \"linux\""
    )]
    NoPvhEntry(String),
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({size} bytes) does not fit in low guest memory above the kernel")]
    InitrdTooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read initrd {path} into guest memory: {source}")]
    Initrd {
        /// The path.
        path: String,
        /// Why.
        source: Cause,
    },
    /// The command line is invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] Cause),
    /// Writing a boot structure failed.
    #[error("cannot write {what} to guest memory: {source}")]
    Write {
        /// The structure.
        what: &'static str,
        /// Why.
        source: Cause,
    },
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// The underlying error of a [`BootError`], whichever crate it came from.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest physical address of the first instruction.
    pub addr: u64,
    /// The protocol, which decides the register state.
    pub protocol: EntryProtocol,
}

/// Loads the kernel (and initrd, command line, boot tables) described by
/// `kernel` into `ram`, for `vcpus` CPUs. `extra_cmdline` is appended (the
/// VMM's own parameters, e.g. device announcements).
pub fn load(
    ram: &GuestRam,
    kernel: &KernelConfig,
    vcpus: u8,
    extra_cmdline: &[String],
) -> Result<EntryPoint, BootError> {
    let mem = &ram.memory;
    let kpath = kernel.path.display().to_string();
    let mut kfile = open("kernel", &kernel.path)?;
    let (loaded, is_elf) =
        match Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIGH_MEMORY_START))) {
            Ok(r) => (r, true),
            Err(elf) => {
                match BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIGH_MEMORY_START))) {
                    Ok(r) => (r, false),
                    Err(bzimage) => {
                        return Err(BootError::Kernel {
                            path: kpath,
                            elf,
                            bzimage,
                        })
                    }
                }
            }
        };

    let entry = match kernel.entry {
        EntryProtocol::Linux if is_elf => EntryPoint {
            addr: loaded.kernel_load.raw_value(),
            protocol: EntryProtocol::Linux,
        },
        EntryProtocol::Linux => {
            let xloadflags = loaded.setup_header.map_or(0, |h| h.xloadflags);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(kpath));
            }
            EntryPoint {
                addr: loaded.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                protocol: EntryProtocol::Linux,
            }
        }
        EntryProtocol::Pvh => match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) if is_elf => EntryPoint {
                addr: addr.raw_value(),
                protocol: EntryProtocol::Pvh,
            },
            _ => return Err(BootError::NoPvhEntry(kpath)),
        },
    };

    let cmdline = build_cmdline(&kernel.cmdline, extra_cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.into()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.into()))?
        .as_bytes()
        .len() as u32;

    // A bzImage decompresses to its preferred address and needs `init_size`
    // bytes there: the initrd must stay above that too.
    let kernel_end = match loaded.setup_header {
        Some(h) => loaded.kernel_end.max(
            h.pref_address
                .max(BZIMAGE_MIN_LOAD)
                .saturating_add(u64::from(h.init_size)),
        ),
        None => loaded.kernel_end,
    };
    let initrd = match &kernel.initrd {
        Some(path) => Some(load_initrd(ram, path, kernel_end)?),
        None => None,
    };

    mptable::write(mem, vcpus)?;
    let e820 = e820_map(ram);
    match entry.protocol {
        EntryProtocol::Linux => {
            write_zero_page(ram, loaded.setup_header, cmdline_len, initrd, &e820)?
        }
        EntryProtocol::Pvh => write_pvh_info(ram, initrd, &e820)?,
    }
    Ok(entry)
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let err = |e: linux_loader::cmdline::Error| BootError::Cmdline(e.into());
    let mut cmdline = Cmdline::new(MAX_CMDLINE_LEN).map_err(err)?;
    if !base.trim().is_empty() {
        cmdline.insert_str(base.trim()).map_err(err)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(err)?;
    }
    Ok(cmdline)
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug)]
struct Initrd {
    addr: u64,
    size: u64,
}

fn load_initrd(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<Initrd, BootError> {
    let spath = path.display().to_string();
    let mut file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initrd",
            path: spath.clone(),
            source,
        })?
        .len();
    // Top of low RAM, page aligned, and below 4 GiB for the 32-bit fields.
    let top = ram.low_end();
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && *a >= HIGH_MEMORY_START)
        .ok_or(BootError::InitrdTooLarge {
            path: spath.clone(),
            size,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        path: spath.clone(),
        size,
    })?;
    let slice = ram
        .memory
        .get_slice(GuestAddress(addr), len)
        .map_err(|e| BootError::Initrd {
            path: spath.clone(),
            source: e.into(),
        })?;
    file.read_exact_volatile(&mut slice.clone())
        .map_err(|e| BootError::Initrd {
            path: spath,
            source: e.into(),
        })?;
    Ok(Initrd { addr, size })
}

/// One E820 entry: start, size, type.
type E820Entry = (u64, u64, u32);

fn e820_map(ram: &GuestRam) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for r in &ram.ranges {
        let start = r.start.max(HIGH_MEMORY_START);
        let end = r.start + r.size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    debug_assert!(ram
        .ranges
        .iter()
        .all(|r| r.start == 0 || r.start >= MMIO_HOLE_END));
    map
}

fn write_zero_page(
    ram: &GuestRam,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: u32,
    initrd: Option<Initrd>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_image = (i.addr >> 32) as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::Write {
            what: "the E820 map",
            source: format!("{} entries is too many", e820.len()).into(),
        });
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *type_;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<crate::memory::GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        &ram.memory,
    )
    .map_err(|e| BootError::Write {
        what: "the zero page",
        source: e.into(),
    })
}

fn write_pvh_info(
    ram: &GuestRam,
    initrd: Option<Initrd>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: i.addr,
                size: i.size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<crate::memory::GuestMemory>(&params, &ram.memory)
        .map_err(|e| BootError::Write {
            what: "the PVH start info",
            source: e.into(),
        })
}

/// Writes the GDT for the chosen entry and the identity-mapped page tables
/// (first GiB, 2 MiB pages) for a 64-bit entry.
pub fn write_gdt_and_page_tables(ram: &GuestRam, protocol: EntryProtocol) -> Result<(), BootError> {
    let mem = &ram.memory;
    let gdt = gdt_for(protocol);
    let werr = |what: &'static str| {
        move |e: vm_memory::GuestMemoryError| BootError::Write {
            what,
            source: e.into(),
        }
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(werr("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(werr("the IDT"))?;
    if protocol == EntryProtocol::Linux {
        mem.write_obj(PDPT_START | 0x03, GuestAddress(PML4_START))
            .map_err(werr("the page tables"))?;
        mem.write_obj(PD_START | 0x03, GuestAddress(PDPT_START))
            .map_err(werr("the page tables"))?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_START + i * 8))
                .map_err(werr("the page tables"))?;
        }
    }
    Ok(())
}

/// GDT layout, Linux's boot selectors: 0x10 code, 0x18 data, 0x20 TSS
/// (16 bytes in long mode: the last entry is its upper half).
pub(crate) fn gdt_for(protocol: EntryProtocol) -> [u64; GDT_ENTRIES] {
    let code = match protocol {
        EntryProtocol::Linux => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        EntryProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),   // 32-bit code
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
        0,                             // TSS, upper half
    ]
}

/// Packs a GDT descriptor from flags (access byte and granularity nibble,
/// as Linux's `GDT_ENTRY` macro), base and limit.
pub(crate) fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Reads guest memory at `addr`, for error reports (instruction bytes).
pub(crate) fn read_bytes(ram: &GuestRam, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    ram.memory.read_slice(&mut buf, GuestAddress(addr)).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_linux() {
        // Values Linux's GDT_ENTRY(0xa09b, 0, 0xfffff) etc. produce.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn gdt_and_idt_do_not_overlap_in_memory() {
        let ram = GuestRam::new(16 << 20).unwrap();
        write_gdt_and_page_tables(&ram, EntryProtocol::Linux).unwrap();
        let gdt = gdt_for(EntryProtocol::Linux);
        for (i, e) in gdt.iter().enumerate() {
            let got: u64 = ram
                .memory
                .read_obj(GuestAddress(GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *e, "GDT entry {i}");
        }
        assert!(IDT_START >= GDT_START + 8 * GDT_ENTRIES as u64);
        let idt: u64 = ram.memory.read_obj(GuestAddress(IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn e820_reserves_the_bios_area_and_skips_the_hole() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = e820_map(&ram);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIGH_MEMORY_START, (64 << 20) - HIGH_MEMORY_START, E820_RAM)
        );
    }

    #[test]
    fn cmdline_joins_user_and_vmm_parts() {
        let c = build_cmdline(
            " console=ttyS0 ",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
