//! The sections of a migration stream and their payloads.
//!
//! Every section is one [`Section`] value; its [`SectionId`] is the number
//! in the frame (see [`crate::stream`] for the frame). Payloads are
//! little-endian; the layouts below are format version 1.
//!
//! ```text
//! id      section       direction  payload
//! 1       Handshake     forward    VmShape as JSON (UTF-8)
//! 2       RamPages      forward    u32 count, u32 reserved (0),
//!                                  count x u64 descriptor (gpa | kind),
//!                                  4096 bytes per data page, in order
//! 3       RoundEnd      forward    RamStats (24 bytes)
//! 4       RamDone       forward    RamStats (24 bytes)
//! 5       VcpuState     forward    u32 vCPU index, opaque state
//! 6       Irqchip       forward    opaque state
//! 7       Pit           forward    opaque state
//! 8       Clock         forward    opaque state
//! 9       DeviceState   forward    name, opaque device blob
//! 10      VmmDevice     forward    name, opaque state
//! 11      End           forward    empty
//! 0x100   Confirm       reply      empty
//! 0x101   Abort         reply      reason (UTF-8)
//!
//! name:      u16 length (1 to 256), that many bytes of UTF-8
//! RamStats:  u32 round, u32 reserved (0), u64 data pages, u64 zero pages
//! descriptor: a 4 KiB-aligned guest physical address; bits 0..12 hold the
//!            kind: 0 = data (4096 bytes follow in the data area),
//!            1 = zero page (nothing follows); other kinds are refused
//! ```
//!
//! A RamPages payload keeps the descriptors apart from the page data so the
//! pages stay 4 KiB apart and are reached without any index arithmetic on
//! untrusted numbers.

use std::borrow::Cow;
use std::fmt;

use crate::ram::PAGE_SIZE;
use crate::shape::VmShape;

/// Longest device or VMM-device name in a section, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Descriptor kind: a data page follows.
const KIND_DATA: u64 = 0;
/// Descriptor kind: the page is all zeroes.
const KIND_ZERO: u64 = 1;
/// The bits of a descriptor that hold the kind.
const KIND_MASK: u64 = PAGE_SIZE as u64 - 1;
/// Bytes before the descriptors in a RamPages payload.
const RAM_PAGES_HEADER: usize = 8;
/// Size of a RamStats payload.
const RAM_STATS_LEN: usize = 24;

/// The section ids of format version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SectionId {
    /// The VM shape; the first section of every stream.
    Handshake = 1,
    /// A batch of guest pages.
    RamPages = 2,
    /// The end of one pre-copy round.
    RoundEnd = 3,
    /// All RAM sent (after the last, stopped round).
    RamDone = 4,
    /// One vCPU's state.
    VcpuState = 5,
    /// The in-kernel interrupt controllers' state.
    Irqchip = 6,
    /// The in-kernel PIT's state.
    Pit = 7,
    /// The KVM clock.
    Clock = 8,
    /// One device process's state blob.
    DeviceState = 9,
    /// The state of a device the VMM emulates itself.
    VmmDevice = 10,
    /// The end of the forward stream.
    End = 11,
    /// Reply: the guest runs on the destination.
    Confirm = 0x100,
    /// Reply: the destination gave up.
    Abort = 0x101,
}

impl SectionId {
    /// The id for `raw`, or `None` if this format version has no such
    /// section.
    pub fn from_u32(raw: u32) -> Option<Self> {
        use SectionId::*;
        Some(match raw {
            1 => Handshake,
            2 => RamPages,
            3 => RoundEnd,
            4 => RamDone,
            5 => VcpuState,
            6 => Irqchip,
            7 => Pit,
            8 => Clock,
            9 => DeviceState,
            10 => VmmDevice,
            11 => End,
            0x100 => Confirm,
            0x101 => Abort,
            _ => return None,
        })
    }

    /// The number on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for SectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} ({})", self.as_u32())
    }
}

/// Statistics that close a pre-copy round ([`Section::RoundEnd`]) or the
/// RAM phase ([`Section::RamDone`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Round number, 0 for the first (full) pass.
    pub round: u32,
    /// Pages sent with their data.
    pub data_pages: u64,
    /// Pages sent as zero-page markers.
    pub zero_pages: u64,
}

/// One page of a [`RamPages`] batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page<'a> {
    /// The page is all zeroes.
    Zero,
    /// The page's bytes.
    Data(&'a [u8; PAGE_SIZE]),
}

/// A batch of guest pages. Built by [`crate::ram::send_pages`] on the
/// source; on the destination it comes checked out of the stream (every
/// descriptor aligned and of a known kind, exactly one 4 KiB page of data
/// per data descriptor) and is applied by [`crate::ram::apply_pages`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamPages {
    descriptors: Vec<u64>,
    data: Vec<u8>,
}

impl RamPages {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        RamPages::default()
    }

    /// Adds the page at `gpa` (4 KiB aligned: the caller's invariant).
    pub(crate) fn push_data(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) {
        debug_assert_eq!(gpa & KIND_MASK, 0);
        self.descriptors.push((gpa & !KIND_MASK) | KIND_DATA);
        self.data.extend_from_slice(page);
    }

    /// Adds a zero-page marker for `gpa` (4 KiB aligned).
    pub(crate) fn push_zero(&mut self, gpa: u64) {
        debug_assert_eq!(gpa & KIND_MASK, 0);
        self.descriptors.push((gpa & !KIND_MASK) | KIND_ZERO);
    }

    /// Empties the batch, keeping its buffers.
    pub(crate) fn clear(&mut self) {
        self.descriptors.clear();
        self.data.clear();
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.descriptors.len()
    }

    /// Whether the batch has no page.
    pub fn is_empty(&self) -> bool {
        self.descriptors.is_empty()
    }

    /// The pages in order: guest physical address and contents.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Page<'_>)> + '_ {
        let mut data = self.data.chunks_exact(PAGE_SIZE);
        // Decoding checked one chunk per data descriptor, so `map_while`
        // never stops early.
        self.descriptors.iter().map_while(move |&d| {
            let gpa = d & !KIND_MASK;
            if d & KIND_MASK == KIND_ZERO {
                Some((gpa, Page::Zero))
            } else {
                let page = <&[u8; PAGE_SIZE]>::try_from(data.next()?).ok()?;
                Some((gpa, Page::Data(page)))
            }
        })
    }

    fn decode(payload: Vec<u8>) -> Result<Self, String> {
        let mut r = Cursor::new(&payload);
        let count = r.u32("page count")?;
        if r.u32("reserved")? != 0 {
            return Err("reserved field is not zero".into());
        }
        if count == 0 {
            return Err("empty page batch".into());
        }
        let mut descriptors = Vec::new();
        let mut data_pages: usize = 0;
        for i in 0..count {
            let d = r.u64("page descriptor")?;
            match d & KIND_MASK {
                KIND_DATA => data_pages = data_pages.saturating_add(1),
                KIND_ZERO => {}
                kind => {
                    return Err(format!(
                        "page {i} (gpa {:#x}): unknown kind {kind:#x}",
                        d & !KIND_MASK
                    ))
                }
            }
            descriptors.push(d);
        }
        let data = r.rest().len();
        let expected = data_pages.checked_mul(PAGE_SIZE);
        if expected != Some(data) {
            return Err(format!(
                "{data_pages} data pages need {} bytes of data, the payload has {data}",
                data_pages.saturating_mul(PAGE_SIZE),
            ));
        }
        Ok(RamPages {
            descriptors,
            data: tail(payload, data),
        })
    }

    fn header(&self) -> Result<Vec<u8>, String> {
        let count = u32::try_from(self.descriptors.len())
            .map_err(|_| format!("{} pages in one batch", self.descriptors.len()))?;
        let mut out = Vec::with_capacity(RAM_PAGES_HEADER + 8 * self.descriptors.len());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for d in &self.descriptors {
            out.extend_from_slice(&d.to_le_bytes());
        }
        Ok(out)
    }
}

/// One section of a migration stream, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Section {
    /// The source's VM shape, sent first.
    Handshake(VmShape),
    /// A batch of guest pages.
    RamPages(RamPages),
    /// The end of a pre-copy round, with what it sent.
    RoundEnd(RamStats),
    /// All RAM sent, with the totals.
    RamDone(RamStats),
    /// One vCPU's state, serialized by the VMM.
    VcpuState {
        /// The vCPU's index.
        index: u32,
        /// Its serialized state.
        state: Vec<u8>,
    },
    /// The irqchip state, serialized by the VMM.
    Irqchip(Vec<u8>),
    /// The PIT state, serialized by the VMM.
    Pit(Vec<u8>),
    /// The clock state, serialized by the VMM.
    Clock(Vec<u8>),
    /// A device process's state: a blob only the device reads.
    DeviceState {
        /// The device's id in the VM shape.
        id: String,
        /// The device's blob.
        blob: Vec<u8>,
    },
    /// The state of a device the VMM emulates (serial, transport, ...).
    VmmDevice {
        /// Which device.
        name: String,
        /// Its serialized state.
        state: Vec<u8>,
    },
    /// The end of the forward stream.
    End,
    /// Reply: the destination runs the guest; the source may let go.
    Confirm,
    /// Reply: the destination gave up, and why; the source resumes.
    Abort(String),
}

impl Section {
    /// This section's id.
    pub fn id(&self) -> SectionId {
        match self {
            Section::Handshake(_) => SectionId::Handshake,
            Section::RamPages(_) => SectionId::RamPages,
            Section::RoundEnd(_) => SectionId::RoundEnd,
            Section::RamDone(_) => SectionId::RamDone,
            Section::VcpuState { .. } => SectionId::VcpuState,
            Section::Irqchip(_) => SectionId::Irqchip,
            Section::Pit(_) => SectionId::Pit,
            Section::Clock(_) => SectionId::Clock,
            Section::DeviceState { .. } => SectionId::DeviceState,
            Section::VmmDevice { .. } => SectionId::VmmDevice,
            Section::End => SectionId::End,
            Section::Confirm => SectionId::Confirm,
            Section::Abort(_) => SectionId::Abort,
        }
    }

    /// The payload, in pieces that are written one after the other (large
    /// blobs and page data are borrowed, not copied).
    pub(crate) fn encode(&self) -> Result<Vec<Cow<'_, [u8]>>, String> {
        Ok(match self {
            Section::Handshake(shape) => vec![Cow::Owned(
                serde_json::to_vec(shape).map_err(|e| format!("VM shape: {e}"))?,
            )],
            Section::RamPages(pages) => {
                if pages.is_empty() {
                    return Err("empty page batch".into());
                }
                vec![Cow::Owned(pages.header()?), Cow::Borrowed(&pages.data[..])]
            }
            Section::RoundEnd(stats) | Section::RamDone(stats) => {
                let mut out = Vec::with_capacity(RAM_STATS_LEN);
                out.extend_from_slice(&stats.round.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&stats.data_pages.to_le_bytes());
                out.extend_from_slice(&stats.zero_pages.to_le_bytes());
                vec![Cow::Owned(out)]
            }
            Section::VcpuState { index, state } => vec![
                Cow::Owned(index.to_le_bytes().to_vec()),
                Cow::Borrowed(&state[..]),
            ],
            Section::Irqchip(state) | Section::Pit(state) | Section::Clock(state) => {
                vec![Cow::Borrowed(&state[..])]
            }
            Section::DeviceState {
                id: name,
                blob: state,
            }
            | Section::VmmDevice { name, state } => {
                vec![Cow::Owned(encode_name(name)?), Cow::Borrowed(&state[..])]
            }
            Section::End | Section::Confirm => Vec::new(),
            Section::Abort(reason) => vec![Cow::Borrowed(reason.as_bytes())],
        })
    }

    /// Decodes the payload of a section whose frame and checksum were
    /// already checked; the payload itself is still untrusted.
    pub(crate) fn decode(id: SectionId, payload: Vec<u8>) -> Result<Self, String> {
        Ok(match id {
            SectionId::Handshake => Section::Handshake(
                serde_json::from_slice(&payload).map_err(|e| format!("VM shape: {e}"))?,
            ),
            SectionId::RamPages => Section::RamPages(RamPages::decode(payload)?),
            SectionId::RoundEnd => Section::RoundEnd(decode_stats(&payload)?),
            SectionId::RamDone => Section::RamDone(decode_stats(&payload)?),
            SectionId::VcpuState => {
                let mut r = Cursor::new(&payload);
                let index = r.u32("vCPU index")?;
                let rest = r.rest().len();
                Section::VcpuState {
                    index,
                    state: tail(payload, rest),
                }
            }
            SectionId::Irqchip => Section::Irqchip(payload),
            SectionId::Pit => Section::Pit(payload),
            SectionId::Clock => Section::Clock(payload),
            SectionId::DeviceState => {
                let (id, blob) = decode_named(payload)?;
                Section::DeviceState { id, blob }
            }
            SectionId::VmmDevice => {
                let (name, state) = decode_named(payload)?;
                Section::VmmDevice { name, state }
            }
            SectionId::End | SectionId::Confirm => {
                if !payload.is_empty() {
                    return Err(format!("{} bytes where none belong", payload.len()));
                }
                if id == SectionId::End {
                    Section::End
                } else {
                    Section::Confirm
                }
            }
            SectionId::Abort => Section::Abort(
                String::from_utf8(payload).map_err(|e| format!("reason is not UTF-8: {e}"))?,
            ),
        })
    }
}

fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let len = name.len();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(format!(
            "name {name:?} is {len} bytes (1 to {MAX_NAME_LEN})"
        ));
    }
    let mut out = Vec::with_capacity(2 + len);
    // len <= MAX_NAME_LEN, which fits a u16.
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(out)
}

fn decode_named(payload: Vec<u8>) -> Result<(String, Vec<u8>), String> {
    let mut r = Cursor::new(&payload);
    let len = usize::from(r.u16("name length")?);
    if len == 0 || len > MAX_NAME_LEN {
        return Err(format!("name length {len} (1 to {MAX_NAME_LEN})"));
    }
    let name = r.take(len, "name")?;
    let name = std::str::from_utf8(name)
        .map_err(|e| format!("name is not UTF-8: {e}"))?
        .to_owned();
    let rest = r.rest().len();
    Ok((name, tail(payload, rest)))
}

/// The last `len` bytes of `payload`, in its own buffer (no copy of a
/// large blob or of page data).
fn tail(mut payload: Vec<u8>, len: usize) -> Vec<u8> {
    payload.drain(..payload.len().saturating_sub(len));
    payload
}

fn decode_stats(payload: &[u8]) -> Result<RamStats, String> {
    if payload.len() != RAM_STATS_LEN {
        return Err(format!("{} bytes, expected {RAM_STATS_LEN}", payload.len()));
    }
    let mut r = Cursor::new(payload);
    let round = r.u32("round")?;
    if r.u32("reserved")? != 0 {
        return Err("reserved field is not zero".into());
    }
    Ok(RamStats {
        round,
        data_pages: r.u64("data pages")?,
        zero_pages: r.u64("zero pages")?,
    })
}

/// Reads little-endian fields off an untrusted payload; running short is an
/// error naming the field.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { rest: buf }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or_else(|| format!("payload ends inside the {what}"))?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.take(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| format!("payload ends inside the {what}"))
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn rest(self) -> &'a [u8] {
        self.rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &Section) -> Section {
        let payload: Vec<u8> = s.encode().unwrap().concat();
        Section::decode(s.id(), payload).unwrap()
    }

    #[test]
    fn ids_roundtrip_and_unknown_are_none() {
        for raw in 0..0x200 {
            if let Some(id) = SectionId::from_u32(raw) {
                assert_eq!(id.as_u32(), raw);
            }
        }
        assert_eq!(SectionId::from_u32(0), None);
        assert_eq!(SectionId::from_u32(12), None);
        assert_eq!(SectionId::from_u32(u32::MAX), None);
        assert_eq!(SectionId::Confirm.to_string(), "Confirm (256)");
    }

    #[test]
    fn every_section_roundtrips() {
        let mut pages = RamPages::new();
        pages.push_data(0x1000, &[7; PAGE_SIZE]);
        pages.push_zero(0x2000);
        pages.push_data(0x3000, &[9; PAGE_SIZE]);
        let sections = [
            Section::Handshake(VmShape {
                memory_mib: 256,
                vcpus: 2,
                devices: vec![],
            }),
            Section::RamPages(pages),
            Section::RoundEnd(RamStats {
                round: 3,
                data_pages: 10,
                zero_pages: 20,
            }),
            Section::RamDone(RamStats::default()),
            Section::VcpuState {
                index: 1,
                state: vec![1, 2, 3],
            },
            Section::Irqchip(vec![4]),
            Section::Pit(vec![]),
            Section::Clock(vec![5, 6]),
            Section::DeviceState {
                id: "disk0".into(),
                blob: vec![0; 100],
            },
            Section::VmmDevice {
                name: "serial".into(),
                state: b"{}".to_vec(),
            },
            Section::End,
            Section::Confirm,
            Section::Abort("device disk0 refused its blob".into()),
        ];
        for s in &sections {
            assert_eq!(&roundtrip(s), s);
        }
    }

    #[test]
    fn ram_pages_iterate_in_order() {
        let mut pages = RamPages::new();
        pages.push_zero(0x5000);
        pages.push_data(0x1000, &[1; PAGE_SIZE]);
        pages.push_data(0x9000, &[2; PAGE_SIZE]);
        let got: Vec<_> = pages.iter().collect();
        assert_eq!(
            got,
            vec![
                (0x5000, Page::Zero),
                (0x1000, Page::Data(&[1; PAGE_SIZE])),
                (0x9000, Page::Data(&[2; PAGE_SIZE])),
            ]
        );
    }

    #[test]
    fn ram_pages_layout() {
        let mut pages = RamPages::new();
        pages.push_zero(0x7000);
        pages.push_data(0x1000, &[0xab; PAGE_SIZE]);
        let payload = Section::RamPages(pages).encode().unwrap().concat();
        let mut expected = vec![2, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&0x7001u64.to_le_bytes());
        expected.extend_from_slice(&0x1000u64.to_le_bytes());
        expected.extend_from_slice(&[0xab; PAGE_SIZE]);
        assert_eq!(payload, expected);
    }

    fn ram_payload(count: u32, descriptors: &[u64], data_pages: usize) -> Vec<u8> {
        let mut p = count.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        for d in descriptors {
            p.extend_from_slice(&d.to_le_bytes());
        }
        p.extend(std::iter::repeat_n(0u8, data_pages * PAGE_SIZE));
        p
    }

    #[test]
    fn malformed_ram_pages_are_refused() {
        let bad = |p: Vec<u8>| Section::decode(SectionId::RamPages, p).unwrap_err();
        assert!(bad(vec![]).contains("page count"));
        assert!(bad(ram_payload(0, &[], 0)).contains("empty"));
        // More descriptors announced than present.
        assert!(bad(ram_payload(u32::MAX, &[0x1000], 1)).contains("descriptor"));
        // Too little or too much data.
        assert!(bad(ram_payload(1, &[0x1000], 0)).contains("need 4096 bytes"));
        assert!(bad(ram_payload(1, &[0x1000], 2)).contains("need 4096 bytes"));
        assert!(bad(ram_payload(1, &[0x1001], 1)).contains("need 0 bytes"));
        // Unknown kind.
        assert!(bad(ram_payload(1, &[0x1002], 0)).contains("unknown kind 0x2"));
        // Reserved field.
        let mut p = ram_payload(1, &[0x1001], 0);
        p[4] = 1;
        assert!(bad(p).contains("reserved"));
        // The good one decodes.
        let ok = Section::decode(SectionId::RamPages, ram_payload(1, &[0x1001], 0)).unwrap();
        let Section::RamPages(pages) = ok else {
            panic!("not RamPages")
        };
        assert_eq!(pages.iter().collect::<Vec<_>>(), vec![(0x1000, Page::Zero)]);
    }

    #[test]
    fn malformed_small_payloads_are_refused() {
        let bad = |id, p: &[u8]| Section::decode(id, p.to_vec()).unwrap_err();
        assert!(bad(SectionId::RoundEnd, &[0; 23]).contains("expected 24"));
        assert!(bad(SectionId::RamDone, &[0; 25]).contains("expected 24"));
        let mut stats = [0u8; 24];
        stats[5] = 1;
        assert!(bad(SectionId::RamDone, &stats).contains("reserved"));
        assert!(bad(SectionId::VcpuState, &[1, 2, 3]).contains("vCPU index"));
        assert!(bad(SectionId::End, &[0]).contains("1 bytes where none"));
        assert!(bad(SectionId::Confirm, &[0]).contains("none belong"));
        assert!(bad(SectionId::Abort, &[0xff]).contains("UTF-8"));
        assert!(bad(SectionId::Handshake, b"{").contains("VM shape"));
        assert!(bad(
            SectionId::Handshake,
            br#"{"memory_mib":1,"vcpus":1,"devices":[],"x":1}"#
        )
        .contains("unknown field"));
        // Names: empty, too long, past the end, not UTF-8.
        assert!(bad(SectionId::DeviceState, &[0]).contains("name length"));
        assert!(bad(SectionId::DeviceState, &[0, 0]).contains("name length 0"));
        assert!(bad(SectionId::DeviceState, &[1, 1, b'a']).contains("name length 257"));
        assert!(bad(SectionId::VmmDevice, &[5, 0, b'a']).contains("inside the name"));
        assert!(bad(SectionId::VmmDevice, &[1, 0, 0xff]).contains("UTF-8"));
    }

    #[test]
    fn names_are_bounded_when_encoding() {
        let long = Section::DeviceState {
            id: "x".repeat(MAX_NAME_LEN + 1),
            blob: vec![],
        };
        assert!(long.encode().unwrap_err().contains("257 bytes"));
        let empty = Section::VmmDevice {
            name: String::new(),
            state: vec![],
        };
        assert!(empty.encode().is_err());
        let max = Section::DeviceState {
            id: "x".repeat(MAX_NAME_LEN),
            blob: vec![1],
        };
        assert_eq!(roundtrip(&max), max);
        assert!(Section::RamPages(RamPages::new()).encode().is_err());
    }
}
