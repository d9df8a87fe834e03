//! Parsing one virtio-blk request (virtio 1.2, section 5.2.6) out of its
//! descriptor chain. Pure logic: it reads the request header and the
//! discard/write-zeroes segment from guest memory, but does no host I/O.
//!
//! A request is a byte stream split over the chain's descriptors in any
//! framing (VERSION_1 implies ANY_LAYOUT). Device-readable descriptors all
//! come first, device-writable ones after:
//!
//! ```text
//! device-readable  | struct virtio_blk_outhdr    16 bytes:
//!                  |   le32 type, le32 ioprio, le64 sector
//!                  | data                        OUT: N * 512 bytes
//!                  |                             DISCARD / WRITE_ZEROES:
//!                  |                             one 16-byte segment
//!                  |                             (le64 sector, le32 num_sectors,
//!                  |                              le32 flags)
//! device-writable  | data                        IN: N * 512 bytes, GET_ID: >= 20 bytes
//!                  | u8 status                   the last byte of the last descriptor
//! ```
//!
//! Everything here comes from the guest and is checked: a chain that is
//! cut short (a loop, an out-of-table `next`, an unreadable descriptor),
//! buffers outside guest memory, a short header, data in the wrong
//! direction or of a length that is not whole sectors all give a
//! [`Malformed`] that says where the status byte is, if there is one.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per virtio-blk sector; offsets and lengths are counted in these.
pub const SECTOR_SIZE: u64 = 512;

/// Bytes of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

/// Bytes of the device ID a GET_ID request returns.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Bytes of one discard / write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;

/// A guest buffer: `len` bytes at `addr`, already checked to lie in guest
/// memory when it is part of a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// The segment's `flags` word (bit 0: unmap).
    pub flags: u32,
}

impl SectorRange {
    /// Whether the unmap flag is set.
    pub fn unmap(&self) -> bool {
        self.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }

    /// Whether a flag other than unmap is set.
    pub fn unknown_flags(&self) -> bool {
        self.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }
}

/// What a well-formed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read whole sectors into `data` (device-writable).
    Read {
        /// First sector.
        sector: u64,
        /// Guest buffers, in stream order; their total is a multiple of 512.
        data: Vec<Buffer>,
    },
    /// VIRTIO_BLK_T_OUT: write whole sectors from `data` (device-readable).
    Write {
        /// First sector.
        sector: u64,
        /// Guest buffers, in stream order; their total is a multiple of 512.
        data: Vec<Buffer>,
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: write the 20-byte ID into `data`
    /// (device-writable, at least 20 bytes).
    GetId {
        /// Guest buffers, in stream order.
        data: Vec<Buffer>,
    },
    /// VIRTIO_BLK_T_DISCARD.
    Discard(SectorRange),
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes(SectorRange),
    /// Any other request type; answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

/// A well-formed request and where its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub kind: RequestKind,
    /// Guest address of the status byte (writable, in guest memory).
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The chain has no descriptor at all (e.g. a bad indirect table at its head).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain stops at a descriptor that still has NEXT set: a loop,
    /// more descriptors than the table holds, a `next` outside the table,
    /// or a descriptor (or indirect table) that cannot be read.
    #[error("descriptor chain is cut short (loop, too long, or bad next/indirect descriptor)")]
    Truncated,
    /// The last descriptor is not device-writable, or has length 0.
    #[error("no status byte: the last descriptor is not device-writable or is empty")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor's buffer is not inside guest memory.
    #[error("buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Fewer than 16 device-readable bytes.
    #[error("request header is {len} bytes, expected {HEADER_LEN}")]
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        len: u64,
    },
    /// Guest memory could not be read (the header or a segment).
    #[error("cannot read the request from guest memory")]
    MemoryRead,
    /// Data in a direction the request type does not use.
    #[error("{request} request carries {len} bytes of {direction} data")]
    WrongDirection {
        /// The request type.
        request: &'static str,
        /// "device-readable" or "device-writable".
        direction: &'static str,
        /// How many bytes.
        len: u64,
    },
    /// IN/OUT data that is not whole sectors.
    #[error("{request} data length {len} is not a multiple of 512")]
    PartialSector {
        /// The request type.
        request: &'static str,
        /// The data length.
        len: u64,
    },
    /// A GET_ID buffer shorter than 20 bytes.
    #[error("GET_ID buffer is {len} bytes, expected at least {ID_LEN}")]
    IdBufferTooSmall {
        /// The buffer length.
        len: u64,
    },
    /// DISCARD/WRITE_ZEROES data that is not exactly one 16-byte segment.
    #[error("{request} carries {len} bytes of segments, expected exactly one of {SEGMENT_LEN}")]
    BadSegments {
        /// The request type.
        request: &'static str,
        /// Device-readable bytes after the header.
        len: u64,
    },
}

/// A chain that is not a valid request, and where to report it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{error}")]
pub struct Malformed {
    /// Guest address of a usable status byte, if the chain has one:
    /// write VIRTIO_BLK_S_IOERR there (used length 1); with none, put the
    /// chain on the used ring with length 0.
    pub status: Option<GuestAddress>,
    /// What is wrong.
    pub error: ParseError,
}

/// Parses the descriptors of one chain (as yielded by
/// [`virtio_queue::DescriptorChain`], which bounds the walk and follows
/// indirect tables) into a [`Request`].
///
/// Range checks against the disk's capacity and the read-only check are
/// the engine's: they need the disk.
pub fn parse<M, I>(mem: &M, descriptors: I) -> Result<Request, Malformed>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut misordered = false;
    let mut last = None;
    for desc in descriptors {
        let buf = Buffer {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(buf);
        } else {
            misordered |= !writable.is_empty();
            readable.push(buf);
        }
        last = Some(desc);
    }
    let Some(last) = last else {
        return Err(Malformed {
            status: None,
            error: ParseError::EmptyChain,
        });
    };

    // The status byte: the last byte of the last descriptor, if that one
    // truly ends the chain, is device-writable and lies in guest memory.
    let status = (!last.has_next() && last.is_write_only() && last.len() > 0)
        .then(|| last.addr().checked_add(u64::from(last.len()) - 1))
        .flatten()
        .filter(|addr| mem.check_range(*addr, 1, Permissions::Write));
    let fail = |error| Err(Malformed { status, error });

    if last.has_next() {
        return fail(ParseError::Truncated);
    }
    let Some(status) = status else {
        return fail(ParseError::NoStatus);
    };
    if misordered {
        return fail(ParseError::ReadableAfterWritable);
    }
    // The status byte is not data.
    if let Some(tail) = writable.last_mut() {
        tail.len -= 1;
    }
    readable.retain(|b| b.len > 0);
    writable.retain(|b| b.len > 0);
    for (bufs, access) in [
        (&readable, Permissions::Read),
        (&writable, Permissions::Write),
    ] {
        if let Some(bad) = bufs
            .iter()
            .find(|b| !mem.check_range(b.addr, b.len as usize, access))
        {
            return fail(ParseError::OutsideMemory {
                addr: bad.addr.0,
                len: bad.len,
            });
        }
    }

    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN as u64 {
        return fail(ParseError::HeaderTooShort { len: readable_len });
    }
    let mut header = [0u8; HEADER_LEN];
    if read_stream(mem, &readable, &mut header).is_err() {
        return fail(ParseError::MemoryRead);
    }
    let (type_bytes, rest) = header.split_at(4);
    let request_type = u32::from_le_bytes(le_array(type_bytes));
    let sector = u64::from_le_bytes(le_array(rest.get(4..).unwrap_or_default()));
    let out_data = skip(&readable, HEADER_LEN as u64);
    let out_len = readable_len - HEADER_LEN as u64;
    let in_len = total_len(&writable);

    let kind = match request_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return fail(wrong_direction("IN", "device-readable", out_len));
            }
            if in_len % SECTOR_SIZE != 0 {
                return fail(ParseError::PartialSector {
                    request: "IN",
                    len: in_len,
                });
            }
            RequestKind::Read {
                sector,
                data: writable,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return fail(wrong_direction("OUT", "device-writable", in_len));
            }
            if out_len % SECTOR_SIZE != 0 {
                return fail(ParseError::PartialSector {
                    request: "OUT",
                    len: out_len,
                });
            }
            RequestKind::Write {
                sector,
                data: out_data,
            }
        }
        // A flush has no data; like QEMU, any that comes along is ignored.
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return fail(wrong_direction("GET_ID", "device-readable", out_len));
            }
            if in_len < ID_LEN as u64 {
                return fail(ParseError::IdBufferTooSmall { len: in_len });
            }
            RequestKind::GetId { data: writable }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let name = if request_type == VIRTIO_BLK_T_DISCARD {
                "DISCARD"
            } else {
                "WRITE_ZEROES"
            };
            if in_len != 0 {
                return fail(wrong_direction(name, "device-writable", in_len));
            }
            if out_len != SEGMENT_LEN as u64 {
                return fail(ParseError::BadSegments {
                    request: name,
                    len: out_len,
                });
            }
            let mut seg = [0u8; SEGMENT_LEN];
            if read_stream(mem, &out_data, &mut seg).is_err() {
                return fail(ParseError::MemoryRead);
            }
            let (sector_bytes, rest) = seg.split_at(8);
            let (num_bytes, flag_bytes) = rest.split_at(4);
            let range = SectorRange {
                sector: u64::from_le_bytes(le_array(sector_bytes)),
                num_sectors: u32::from_le_bytes(le_array(num_bytes)),
                flags: u32::from_le_bytes(le_array(flag_bytes)),
            };
            if request_type == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard(range)
            } else {
                RequestKind::WriteZeroes(range)
            }
        }
        other => RequestKind::Unsupported(other),
    };
    Ok(Request { kind, status })
}

fn wrong_direction(request: &'static str, direction: &'static str, len: u64) -> ParseError {
    ParseError::WrongDirection {
        request,
        direction,
        len,
    }
}

/// Copies a byte slice into a fixed array, zero-filling what is missing
/// (the callers always pass exactly N bytes).
fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

/// Total bytes of `bufs`.
pub fn total_len(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// The buffers that remain after dropping the first `n` bytes.
fn skip(bufs: &[Buffer], mut n: u64) -> Vec<Buffer> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        let len = u64::from(b.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX, and addr + len was checked to be in memory.
        out.push(Buffer {
            addr: GuestAddress(b.addr.0 + n),
            len: b.len - n as u32,
        });
        n = 0;
    }
    out
}

/// Fills `dst` from the start of the stream `bufs`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    bufs: &[Buffer],
    dst: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for b in bufs {
        let Some(rest) = dst.get_mut(done..) else {
            break;
        };
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(b.len as usize);
        let chunk = rest.get_mut(..n).unwrap_or_default();
        mem.read_slice(chunk, b.addr)?;
        done += n;
    }
    Ok(())
}
