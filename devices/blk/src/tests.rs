//! Tests of request parsing and the engine: hand-built descriptor lists
//! in a `GuestMemoryMmap`, and real chains through virtio-queue's
//! `MockSplitQueue` (loops, indirect tables), against temporary images.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::engine::{Completion, Disk, DiskOptions, OpenError};
use crate::request::{self, ParseError, RequestKind};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const MEM_SIZE: usize = 0x10_0000;

/// A temporary image, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(name: &str, sectors: u64) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outboard-blk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        // A recognizable pattern: every byte of sector s is s as u8 + 1.
        let mut content = Vec::new();
        for s in 0..sectors {
            content.extend(std::iter::repeat_n(s as u8 + 1, 512));
        }
        std::fs::write(&path, content).unwrap();
        TempImage(path)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }

    fn sector(&self, s: usize) -> Vec<u8> {
        self.bytes()[s * 512..(s + 1) * 512].to_vec()
    }

    fn options(&self) -> DiskOptions {
        DiskOptions {
            image: self.0.clone(),
            readonly: false,
            direct: false,
            serial: None,
        }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// (addr, len, device-writable) buffers chained in order.
fn chain(bufs: &[(u64, u32, bool)]) -> Vec<Descriptor> {
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            Descriptor::new(addr, len, flags, (i + 1) as u16)
        })
        .collect()
}

fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn done(status: u8, used_len: u32) -> Completion {
    Completion { status, used_len }
}

/// Runs a request and checks the completion against the status byte in memory.
fn run(disk: &Disk, mem: &GuestMemoryMmap, descs: Vec<Descriptor>) -> Completion {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let c = disk.process_request(mem, descs);
    if c.used_len > 0 {
        assert_eq!(status(mem), c.status);
    }
    c
}

fn std_read(len: u32) -> Vec<Descriptor> {
    chain(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)])
}

fn std_write(len: u32) -> Vec<Descriptor> {
    chain(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
}

#[test]
fn write_then_read() {
    let img = TempImage::new("d.img", 16);
    let disk = Disk::open(&img.options()).unwrap();
    assert_eq!(disk.capacity_sectors(), 16);
    let mem = memory();

    mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 3);
    assert_eq!(run(&disk, &mem, std_write(1024)), done(OK, 1));
    assert_eq!(img.sector(2), vec![3u8; 512]);
    assert_eq!(img.sector(3), vec![0xab; 512]);
    assert_eq!(img.sector(4), vec![0xab; 512]);
    assert_eq!(img.sector(5), vec![6u8; 512]);

    header(&mem, VIRTIO_BLK_T_IN, 4);
    mem.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&disk, &mem, std_read(1536)), done(OK, 1537));
    let mut back = vec![0u8; 1536];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back[..512], &[0xab; 512][..]);
    assert_eq!(&back[512..1024], &[6u8; 512][..]);
    assert_eq!(&back[1024..], &[7u8; 512][..]);

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let flush = chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, flush), done(OK, 1));
}

#[test]
fn any_layout() {
    // Header split over two descriptors, read data split over three (one
    // of them empty), the status byte sharing the last data descriptor.
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 1);
    let descs = chain(&[
        (HDR, 5, false),
        (HDR + 5, 11, false),
        (DATA, 100, true),
        (DATA + 100, 0, true),
        (DATA + 100, 412, true),
        (STATUS - 512, 513, true),
    ]);
    assert_eq!(run(&disk, &mem, descs), done(OK, 1025));
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![2u8; 512]);
    mem.read_slice(&mut back, GuestAddress(STATUS - 512))
        .unwrap();
    assert_eq!(back, vec![3u8; 512]);
}

#[test]
fn malformed_requests_fail_alone() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let outside = MEM_SIZE as u64 + 0x1000;

    // Header shorter than 16 bytes.
    let short = chain(&[(HDR, 15, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, short), done(IOERR, 1));
    // Data buffer outside guest memory.
    let out = chain(&[(HDR, 16, false), (outside, 512, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, out), done(IOERR, 1));
    // Data buffer straddling the end of guest memory.
    let straddle = chain(&[
        (HDR, 16, false),
        (MEM_SIZE as u64 - 256, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(run(&disk, &mem, straddle), done(IOERR, 1));
    // Header outside guest memory.
    let hdr_out = chain(&[(outside, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, hdr_out), done(IOERR, 1));
    // Read with device-readable data.
    let wrong_dir = chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, wrong_dir), done(IOERR, 1));
    // Partial sector.
    let partial = chain(&[(HDR, 16, false), (DATA, 511, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, partial), done(IOERR, 1));
    // Readable after writable.
    let order = chain(&[(DATA, 512, true), (HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, order), done(IOERR, 1));

    // Write with device-writable data.
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let wrong_dir = chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, wrong_dir), done(IOERR, 1));
    let partial = chain(&[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, partial), done(IOERR, 1));

    // No usable status byte: used length 0, nothing written.
    for descs in [
        chain(&[(HDR, 16, false), (DATA, 512, false)]),
        chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 0, true)]),
        chain(&[(HDR, 16, false), (DATA, 512, false), (outside, 1, true)]),
        chain(&[(HDR, 16, false), (u64::MAX, 1, true)]),
        Vec::new(),
    ] {
        assert_eq!(run(&disk, &mem, descs), done(IOERR, 0));
        assert_eq!(status(&mem), 0xff);
    }

    // The image is untouched and the disk still works.
    assert_eq!(img.sector(0), vec![1u8; 512]);
    header(&mem, VIRTIO_BLK_T_IN, 7);
    assert_eq!(run(&disk, &mem, std_read(512)), done(OK, 513));
}

#[test]
fn parse_errors_are_precise() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let parse = |d: Vec<Descriptor>| request::parse(&mem, d).map(|r| r.kind).map_err(|m| m.error);
    assert_eq!(
        parse(chain(&[(HDR, 8, false), (STATUS, 1, true)])),
        Err(ParseError::HeaderTooShort { len: 8 })
    );
    assert_eq!(
        parse(chain(&[(HDR, 16, false), (DATA, 512, false)])),
        Err(ParseError::NoStatus)
    );
    assert_eq!(parse(Vec::new()), Err(ParseError::EmptyChain));
    // A chain whose last descriptor still says NEXT was cut short.
    let mut cut = chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    cut[1] = Descriptor::new(
        STATUS,
        1,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        7,
    );
    assert_eq!(parse(cut), Err(ParseError::Truncated));
    assert_eq!(
        parse(chain(&[
            (HDR, 16, false),
            (DATA, 1000, true),
            (STATUS, 1, true)
        ])),
        Err(ParseError::PartialSector {
            request: "IN",
            len: 1000
        })
    );
    assert_eq!(
        parse(chain(&[
            (HDR, 16, false),
            (DATA, 1024, true),
            (STATUS, 1, true)
        ])),
        Ok(RequestKind::Read {
            sector: 0,
            data: vec![request::Buffer {
                addr: GuestAddress(DATA),
                len: 1024
            }]
        })
    );
    header(&mem, 1234, 0);
    assert_eq!(
        parse(chain(&[(HDR, 16, false), (STATUS, 1, true)])),
        Ok(RequestKind::Unsupported(1234))
    );
}

#[test]
fn unsupported_type() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    header(&mem, 99, 0);
    let descs = chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, descs), done(UNSUPP, 1));
}

#[test]
fn out_of_range() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    for (t, sector, len) in [
        (VIRTIO_BLK_T_IN, 8, 512),
        (VIRTIO_BLK_T_IN, 7, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512, 512),
        (VIRTIO_BLK_T_OUT, 8, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512),
    ] {
        header(&mem, t, sector);
        let write = t == VIRTIO_BLK_T_IN;
        let descs = chain(&[(HDR, 16, false), (DATA, len, write), (STATUS, 1, true)]);
        assert_eq!(run(&disk, &mem, descs), done(IOERR, 1), "{t} {sector}");
    }
    // Zero-length read at the end is fine.
    header(&mem, VIRTIO_BLK_T_IN, 8);
    let descs = chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, descs), done(OK, 1));
    assert_eq!(img.bytes().len(), 8 * 512);
}

#[test]
fn readonly_refuses_writes() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&DiskOptions {
        readonly: true,
        ..img.options()
    })
    .unwrap();
    assert!(disk.readonly());
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&disk, &mem, std_write(512)), done(IOERR, 1));
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, t, 0);
        segment(&mem, 0, 1, 0);
        assert_eq!(run(&disk, &mem, segment_chain(16)), done(IOERR, 1));
    }
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let flush = chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, flush), done(OK, 1));
    header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&disk, &mem, std_read(512)), done(OK, 513));
    assert_eq!(img.sector(0), vec![1u8; 512]);
}

#[test]
fn get_id() {
    let img = TempImage::new("a-rather-long-image-name.img", 1);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let descs = chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, descs), done(OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"a-rather-long-image-");

    let too_small = chain(&[(HDR, 16, false), (DATA, 19, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, too_small), done(IOERR, 1));

    let disk = Disk::open(&DiskOptions {
        serial: Some("disk0".into()),
        ..img.options()
    })
    .unwrap();
    // A larger buffer, split in two: 20 bytes written, NUL-padded.
    mem.write_slice(&[0xee; 64], GuestAddress(DATA)).unwrap();
    let descs = chain(&[
        (HDR, 16, false),
        (DATA, 3, true),
        (DATA + 3, 61, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(run(&disk, &mem, descs), done(OK, 21));
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..20], b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(id[20], 0xee);

    let long = Disk::open(&DiskOptions {
        serial: Some("x".repeat(21)),
        ..img.options()
    });
    assert!(matches!(
        long,
        Err(OpenError::SerialTooLong { len: 21, .. })
    ));
}

fn segment(mem: &GuestMemoryMmap, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(DATA)).unwrap();
}

fn segment_chain(len: u32) -> Vec<Descriptor> {
    chain(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
}

#[test]
fn discard_and_write_zeroes() {
    let img = TempImage::new("d.img", 64);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();

    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, 2, 3, 0);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(OK, 1));
    assert_eq!(img.sector(1), vec![2u8; 512]);
    for s in 2..5 {
        assert_eq!(img.sector(s), vec![0u8; 512]);
    }
    assert_eq!(img.sector(5), vec![6u8; 512]);

    // With unmap: may punch a hole, still reads as zeros.
    segment(&mem, 8, 16, 1);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(OK, 1));
    assert_eq!(img.sector(7), vec![8u8; 512]);
    assert_eq!(img.sector(8), vec![0u8; 512]);
    assert_eq!(img.sector(23), vec![0u8; 512]);
    assert_eq!(img.sector(24), vec![25u8; 512]);

    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, 32, 8, 0);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(OK, 1));
    assert_eq!(img.sector(31), vec![32u8; 512]);
    assert_eq!(img.sector(40), vec![41u8; 512]);
    assert_eq!(img.bytes().len(), 64 * 512);

    // Discard with the unmap flag, or any unknown flag: UNSUPP.
    segment(&mem, 0, 1, 1);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(UNSUPP, 1));
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, 0, 1, 2);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(UNSUPP, 1));

    // Malformed segments: none, two, half of one, out of range.
    for len in [0, 32, 8] {
        segment(&mem, 0, 1, 0);
        assert_eq!(run(&disk, &mem, segment_chain(len)), done(IOERR, 1));
    }
    let descs = chain(&[(HDR, 16, false), (DATA, 16, true), (STATUS, 1, true)]);
    assert_eq!(run(&disk, &mem, descs), done(IOERR, 1));
    segment(&mem, 60, 5, 0);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(IOERR, 1));
    segment(&mem, u64::MAX, 1, 0);
    assert_eq!(run(&disk, &mem, segment_chain(16)), done(IOERR, 1));
    assert_eq!(img.sector(0), vec![1u8; 512]);
    assert_eq!(img.sector(63), vec![64u8; 512]);
}

#[test]
fn bounce_path_with_4k_alignment() {
    // The O_DIRECT code path (bounce buffers, read-modify-write of edge
    // blocks), run on a buffered file so it works on any filesystem.
    let img = TempImage::new("d.img", 32);
    let disk = Disk::open_bounced(&img.options(), 4096).unwrap();
    let mem = memory();

    // 3 sectors at sector 7: crosses a 4 KiB block boundary, neither edge aligned.
    mem.write_slice(&[0x5au8; 1536], GuestAddress(DATA))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 7);
    assert_eq!(run(&disk, &mem, std_write(1536)), done(OK, 1));
    assert_eq!(img.sector(6), vec![7u8; 512]);
    for s in 7..10 {
        assert_eq!(img.sector(s), vec![0x5a; 512]);
    }
    assert_eq!(img.sector(10), vec![11u8; 512]);

    // Unaligned read across the same boundary, split buffers.
    header(&mem, VIRTIO_BLK_T_IN, 6);
    let descs = chain(&[
        (HDR, 16, false),
        (DATA, 700, true),
        (DATA + 700, 1348, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(run(&disk, &mem, descs), done(OK, 2049));
    let mut back = vec![0u8; 2048];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back[..512], &[7u8; 512][..]);
    assert_eq!(&back[512..2048], &[0x5a; 1536][..]);

    // Aligned write of 8 sectors, and write-zeroes of one sector through
    // the fallback writer.
    mem.write_slice(&[0x11u8; 4096], GuestAddress(DATA))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 16);
    assert_eq!(run(&disk, &mem, std_write(4096)), done(OK, 1));
    assert_eq!(img.sector(16), vec![0x11; 512]);
    assert_eq!(img.sector(23), vec![0x11; 512]);
    assert_eq!(img.sector(24), vec![25u8; 512]);
}

#[test]
fn open_errors() {
    let missing = Disk::open(&DiskOptions {
        image: "/nonexistent/outboard.img".into(),
        readonly: false,
        direct: false,
        serial: None,
    });
    let e = missing.err().unwrap();
    assert!(matches!(e, OpenError::Open { .. }));
    assert!(e
        .to_string()
        .starts_with("cannot open image /nonexistent/outboard.img: "));

    let img = TempImage::new("odd.img", 1);
    std::fs::write(&img.0, [0u8; 700]).unwrap();
    let e = Disk::open(&img.options()).err().unwrap();
    assert!(matches!(e, OpenError::PartialSector { size: 700, .. }));

    let dir = TempImage::new("x.img", 1);
    let e = Disk::open(&DiskOptions {
        image: dir.0.parent().unwrap().to_owned(),
        ..dir.options()
    })
    .err()
    .unwrap();
    assert!(matches!(
        e,
        OpenError::NotAFile { .. } | OpenError::Open { .. }
    ));
}

/// Lays `descs` out in a mock split queue's table and pops the first chain.
fn mock_chain<'a>(
    mem: &'a GuestMemoryMmap,
    queue: &MockSplitQueue<'a, GuestMemoryMmap>,
    descs: &[Descriptor],
) -> virtio_queue::DescriptorChain<&'a GuestMemoryMmap> {
    let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
    queue.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = queue.create_queue().unwrap();
    q.iter(mem).unwrap().next().unwrap()
}

#[test]
fn looping_chain_fails_with_no_status() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let queue = MockSplitQueue::new(&mem, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    let descs = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 512, write | next, 2),
        Descriptor::new(STATUS, 1, write | next, 1),
    ];
    let c = mock_chain(&mem, &queue, &descs);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(disk.process_request(&mem, c), done(IOERR, 0));
    assert_eq!(status(&mem), 0xff);

    // `next` beyond the table.
    let queue = MockSplitQueue::new(&mem, 16);
    let descs = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(STATUS, 1, write | next, 200),
    ];
    let c = mock_chain(&mem, &queue, &descs);
    assert_eq!(disk.process_request(&mem, c), done(IOERR, 0));
}

#[test]
fn real_chain_and_indirect_table() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    let mem = memory();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;

    header(&mem, VIRTIO_BLK_T_IN, 2);
    let queue = MockSplitQueue::new(&mem, 16);
    let descs = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 512, write | next, 2),
        Descriptor::new(STATUS, 1, write, 0),
    ];
    let c = mock_chain(&mem, &queue, &descs);
    assert_eq!(disk.process_request(&mem, c), done(OK, 513));
    assert_eq!(status(&mem), OK);

    // The same request through an indirect table at 0x4_0000.
    let table: u64 = 0x4_0000;
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    header(&mem, VIRTIO_BLK_T_IN, 3);
    let queue = MockSplitQueue::new(&mem, 16);
    let head = [Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0)];
    let c = mock_chain(&mem, &queue, &head);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(disk.process_request(&mem, c), done(OK, 513));
    assert_eq!(status(&mem), OK);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![4u8; 512]);

    // A malformed indirect table (length not a multiple of 16): empty chain.
    let queue = MockSplitQueue::new(&mem, 16);
    let head = [Descriptor::new(table, 40, VRING_DESC_F_INDIRECT as u16, 0)];
    let c = mock_chain(&mem, &queue, &head);
    assert_eq!(disk.process_request(&mem, c), done(IOERR, 0));
}

#[test]
fn buffers_across_memory_regions() {
    let img = TempImage::new("d.img", 8);
    let disk = Disk::open(&img.options()).unwrap();
    // Two adjacent regions; the data buffer straddles them.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .unwrap();
    header(&mem, VIRTIO_BLK_T_IN, 5);
    let at = 0x8_0000 - 100;
    let descs = chain(&[(HDR, 16, false), (at, 512, true), (STATUS, 1, true)]);
    assert_eq!(disk.process_request(&mem, descs), done(OK, 513));
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert_eq!(back, vec![6u8; 512]);
}
