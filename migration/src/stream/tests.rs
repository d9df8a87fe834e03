use std::io::{self, Cursor, Read};

use super::*;
use crate::ram::PAGE_SIZE;
use crate::section::RamPages;
use crate::shape::{DeviceShape, StateFormat, VmShape};

const HEADER: [u8; 16] = [
    b'O', b'B', b'M', b'I', b'G', b'R', b'A', b'T', 1, 0, 0, 0, 0, 0, 0, 0,
];

fn stream_of(sections: &[Section]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    for s in sections {
        w.write(s).unwrap();
    }
    w.into_inner().unwrap()
}

/// A frame with correct checksums around any id, flags and payload.
fn raw_frame(id: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut fields = Vec::new();
    fields.extend_from_slice(&id.to_le_bytes());
    fields.extend_from_slice(&flags.to_le_bytes());
    fields.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut out = fields.clone();
    out.extend_from_slice(&crc32fast::hash(&fields).to_le_bytes());
    out.extend_from_slice(payload);
    let mut all = fields;
    all.extend_from_slice(payload);
    out.extend_from_slice(&crc32fast::hash(&all).to_le_bytes());
    out
}

fn with_header(frames: &[u8]) -> Vec<u8> {
    let mut v = HEADER.to_vec();
    v.extend_from_slice(frames);
    v
}

fn read_err(bytes: &[u8]) -> StreamError {
    let mut r = match StreamReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return e,
    };
    loop {
        if let Err(e) = r.read() {
            return e;
        }
    }
}

fn shape() -> VmShape {
    VmShape {
        memory_mib: 256,
        vcpus: 2,
        devices: vec![DeviceShape {
            id: "disk0".into(),
            kind: "vhost-user-blk".into(),
            transport: "mmio".into(),
            state_format: Some(StateFormat {
                uuid: [7; 16],
                version: 1,
            }),
        }],
    }
}

/// One section of each kind.
fn sample() -> Vec<Section> {
    let mut pages = RamPages::new();
    pages.push_zero(0x1000);
    let mut page = [0u8; PAGE_SIZE];
    page[17] = 0x5a;
    pages.push_data(0x2000, &page);
    vec![
        Section::Handshake(shape()),
        Section::RamPages(pages),
        Section::RoundEnd(crate::RamStats {
            round: 0,
            data_pages: 1,
            zero_pages: 1,
        }),
        Section::RamDone(crate::RamStats {
            round: 1,
            data_pages: 1,
            zero_pages: 1,
        }),
        Section::VcpuState {
            index: 0,
            state: vec![1; 40],
        },
        Section::Irqchip(vec![2; 8]),
        Section::Pit(vec![3; 8]),
        Section::Clock(vec![4; 8]),
        Section::DeviceState {
            id: "disk0".into(),
            blob: vec![5; 30],
        },
        Section::VmmDevice {
            name: "serial0".into(),
            state: vec![6; 10],
        },
        Section::End,
    ]
}

#[test]
fn byte_layout() {
    let bytes = stream_of(&[Section::Clock(vec![1, 2, 3]), Section::End]);
    #[rustfmt::skip]
    let expected: Vec<u8> = [
        &HEADER[..],
        // Clock: id 8, flags 0, length 3, header CRC, payload, CRC.
        &[8, 0, 0, 0,  0, 0, 0, 0,  3, 0, 0, 0, 0, 0, 0, 0],
        &[0xf9, 0xd3, 0x27, 0x11],
        &[1, 2, 3],
        &[0xe4, 0xeb, 0xb6, 0xe0],
        // End: id 11, empty; both CRCs cover the same 16 bytes.
        &[11, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0],
        &[0xe8, 0x60, 0x60, 0xb6],
        &[0xe8, 0x60, 0x60, 0xb6],
    ]
    .concat();
    assert_eq!(bytes, expected);
    assert_eq!(raw_frame(8, 0, &[1, 2, 3])[..], expected[16..43]);
}

#[test]
fn roundtrip_in_memory() {
    let sections = sample();
    let bytes = stream_of(&sections);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    for s in &sections {
        assert_eq!(&r.read().unwrap(), s);
    }
    assert!(matches!(r.read(), Err(StreamError::Eof { offset }) if offset == bytes.len() as u64));
    assert_eq!(r.bytes_read(), bytes.len() as u64);
}

#[test]
fn writer_counts_bytes() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    assert_eq!(w.bytes_written(), 16);
    w.write(&Section::Clock(vec![1, 2, 3])).unwrap();
    assert_eq!(w.bytes_written(), 16 + 24 + 3);
    assert_eq!(w.into_inner().unwrap().len(), 43);
}

/// A reader that returns one byte at a time and is interrupted between
/// bytes, as a slow socket might.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    interrupt: bool,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match (self.data.get(self.pos), buf.first_mut()) {
            (Some(&b), Some(dst)) => {
                *dst = b;
                self.pos += 1;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn short_and_interrupted_reads() {
    let sections = sample();
    let data = stream_of(&sections);
    let mut r = StreamReader::new(Trickle {
        data,
        pos: 0,
        interrupt: false,
    })
    .unwrap();
    for s in &sections {
        assert_eq!(&r.read().unwrap(), s);
    }
    assert!(matches!(r.read(), Err(StreamError::Eof { .. })));
}

#[test]
fn roundtrip_over_a_unix_socket_pair() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let sections = sample();
    let to_send = sections.clone();
    let writer = std::thread::spawn(move || {
        let mut w = StreamWriter::new(a).unwrap();
        for s in &to_send {
            w.write(s).unwrap();
        }
        // The reply comes back on the same socket.
        let mut replies = StreamReader::new(w.into_inner().unwrap()).unwrap();
        replies.read().unwrap()
    });
    let reply_side = b.try_clone().unwrap();
    let mut r = StreamReader::new(b).unwrap();
    let mut got = Vec::new();
    loop {
        let s = r.read().unwrap();
        let end = s == Section::End;
        got.push(s);
        if end {
            break;
        }
    }
    assert_eq!(got, sections);
    let mut reply = StreamWriter::new(reply_side).unwrap();
    reply.write(&Section::Confirm).unwrap();
    assert_eq!(writer.join().unwrap(), Section::Confirm);
}

#[test]
fn bad_magic_version_and_header_flags() {
    let mut bytes = stream_of(&[Section::End]);
    bytes[0] = b'X';
    let e = read_err(&bytes);
    assert!(
        matches!(e, StreamError::BadMagic { found } if found[0] == b'X'),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("not an Outboard migration stream"),
        "{e}"
    );

    let mut bytes = stream_of(&[Section::End]);
    bytes[8] = 2;
    let e = read_err(&bytes);
    assert!(
        matches!(e, StreamError::UnsupportedVersion { found: 2 }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "unsupported migration stream version 2 (this build reads version 1)"
    );

    let mut bytes = stream_of(&[Section::End]);
    bytes[15] = 0x80;
    assert!(matches!(
        read_err(&bytes),
        StreamError::HeaderFlags(0x8000_0000)
    ));
}

#[test]
fn eof_between_sections_and_truncation_inside() {
    // Nothing after the stream header: a clean end.
    assert!(matches!(read_err(&HEADER), StreamError::Eof { offset: 16 }));
    // Cut inside the stream header.
    assert!(matches!(
        read_err(&HEADER[..5]),
        StreamError::Truncated {
            what: "stream header",
            got: 5,
            expected: 16,
            ..
        }
    ));
    let full = stream_of(&[Section::Clock(vec![1, 2, 3])]);
    let e = read_err(&full[..16 + 7]);
    assert!(
        matches!(
            e,
            StreamError::Truncated {
                what: "section header",
                offset: 16,
                got: 7,
                expected: 20
            }
        ),
        "{e}"
    );
    let e = read_err(&full[..16 + 21]);
    assert!(
        matches!(
            e,
            StreamError::Truncated {
                what: "section payload",
                offset: 36,
                got: 1,
                expected: 3
            }
        ),
        "{e}"
    );
    let e = read_err(&full[..full.len() - 1]);
    assert!(
        matches!(
            e,
            StreamError::Truncated {
                what: "section checksum",
                got: 3,
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "migration stream truncated in the section checksum at byte 39: 3 of 4 bytes"
    );
}

#[test]
fn checksums() {
    let mut bytes = stream_of(&[Section::Clock(vec![1, 2, 3])]);
    bytes[16 + 20] ^= 1; // payload
    let e = read_err(&bytes);
    assert!(
        matches!(
            e,
            StreamError::ChecksumMismatch {
                section: SectionId::Clock,
                offset: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("section Clock (8) at byte 16: checksum"),
        "{e}"
    );

    let mut bytes = stream_of(&[Section::Clock(vec![1, 2, 3])]);
    bytes[16 + 8] ^= 1; // length
    assert!(matches!(
        read_err(&bytes),
        StreamError::HeaderChecksum { offset: 16, .. }
    ));
}

#[test]
fn unknown_section_is_refused_not_skipped() {
    let bytes = with_header(&[raw_frame(99, 0, b"??"), raw_frame(11, 0, b"")].concat());
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let e = r.read().unwrap_err();
    assert!(matches!(e, StreamError::UnknownSection(99)), "{e}");
    assert_eq!(e.to_string(), "unknown migration stream section id 99");
}

#[test]
fn unknown_section_flags() {
    let bytes = with_header(&raw_frame(11, 4, b""));
    let e = read_err(&bytes);
    assert!(
        matches!(
            e,
            StreamError::SectionFlags {
                section: SectionId::End,
                flags: 4,
                ..
            }
        ),
        "{e}"
    );
}

/// A reader that fails the test if more than `limit` bytes are asked for
/// in total.
struct Limited<'a> {
    inner: &'a [u8],
    limit: usize,
}

impl Read for Limited<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.limit = self.limit.checked_sub(n).expect("read past the limit");
        Ok(n)
    }
}

#[test]
fn oversized_payload_is_refused_before_reading_it() {
    // A header announcing 1 MiB + 1 against a 1 MiB limit, followed by
    // plenty of bytes that must not be read.
    let mut fields = Vec::new();
    fields.extend_from_slice(&2u32.to_le_bytes());
    fields.extend_from_slice(&0u32.to_le_bytes());
    fields.extend_from_slice(&((1u64 << 20) + 1).to_le_bytes());
    let mut bytes = with_header(&fields);
    bytes.extend_from_slice(&crc32fast::hash(&fields).to_le_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 4 << 20));
    let input = Limited {
        inner: &bytes,
        limit: 64 << 10, // the reader's buffer, not the payload
    };
    let mut r = StreamReader::with_max_payload(input, 1 << 20).unwrap();
    let e = r.read().unwrap_err();
    assert!(
        matches!(e, StreamError::Oversized { section: SectionId::RamPages, len, max, .. }
            if len == (1 << 20) + 1 && max == 1 << 20),
        "{e}"
    );
    // u64::MAX is refused the same way.
    let mut fields = fields.clone();
    fields[8..].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut bytes = with_header(&fields);
    bytes.extend_from_slice(&crc32fast::hash(&fields).to_le_bytes());
    assert!(matches!(
        read_err(&bytes),
        StreamError::Oversized { len: u64::MAX, .. }
    ));
}

#[test]
fn writer_refuses_what_the_reader_would() {
    let mut w = StreamWriter::with_max_payload(Vec::new(), 8).unwrap();
    w.write(&Section::Clock(vec![0; 8])).unwrap();
    let e = w.write(&Section::Clock(vec![0; 9])).unwrap_err();
    assert!(
        matches!(e, StreamError::Oversized { len: 9, max: 8, .. }),
        "{e}"
    );
    let e = w
        .write(&Section::VmmDevice {
            name: String::new(),
            state: vec![],
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::Encode {
                section: SectionId::VmmDevice,
                ..
            }
        ),
        "{e}"
    );
    // Nothing of the refused sections was written.
    let bytes = w.into_inner().unwrap();
    assert_eq!(bytes.len(), 16 + 24 + 8);
}

#[test]
fn malformed_payload_with_a_good_checksum() {
    let bytes = with_header(&raw_frame(SectionId::End.as_u32(), 0, b"x"));
    let e = read_err(&bytes);
    assert!(
        matches!(
            e,
            StreamError::Malformed {
                section: SectionId::End,
                offset: 16,
                ..
            }
        ),
        "{e}"
    );
    let bytes = with_header(&raw_frame(
        SectionId::Handshake.as_u32(),
        0,
        b"{\"memory_mib\":1}",
    ));
    let e = read_err(&bytes);
    assert!(e.to_string().contains("missing field `vcpus`"), "{e}");
}

struct Failing;

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "peer went away",
        ))
    }
}

impl io::Write for Failing {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn io_errors_carry_context() {
    let e = StreamReader::new(Failing).err().unwrap();
    assert_eq!(
        e.to_string(),
        "migration stream: reading the stream header at byte 0: peer went away"
    );
    let e = StreamWriter::new(Failing).err().unwrap();
    assert!(
        matches!(
            e,
            StreamError::Io {
                context: "writing the stream header",
                ..
            }
        ),
        "{e}"
    );
    let bytes = HEADER.to_vec();
    let mut r = StreamReader::new(Cursor::new(bytes).chain(Failing)).unwrap();
    let e = r.read().unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::Io {
                context: "reading a section header",
                offset: 16,
                ..
            }
        ),
        "{e}"
    );
}

/// Flipping any bit pattern of any byte of a stream is caught, by the
/// check responsible for that byte.
#[test]
fn every_corrupted_byte_is_detected() {
    let good = stream_of(&sample());
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bytes = good.clone();
            bytes[i] ^= mask;
            let e = read_err(&bytes);
            let expected = match i {
                0..8 => matches!(e, StreamError::BadMagic { .. }),
                8..12 => matches!(e, StreamError::UnsupportedVersion { .. }),
                12..16 => matches!(e, StreamError::HeaderFlags(_)),
                _ => matches!(
                    e,
                    StreamError::HeaderChecksum { .. } | StreamError::ChecksumMismatch { .. }
                ),
            };
            assert!(expected, "byte {i} ^ {mask:#x}: {e}");
        }
    }
}

/// Cutting a stream anywhere is refused cleanly: `Eof` exactly at section
/// boundaries, `Truncated` everywhere else.
#[test]
fn every_truncation_is_refused() {
    let sections = sample();
    let good = stream_of(&sections);
    let mut boundaries = vec![16u64];
    let mut r = StreamReader::new(&good[..]).unwrap();
    for _ in &sections {
        r.read().unwrap();
        boundaries.push(r.bytes_read());
    }
    for len in 0..good.len() {
        let e = read_err(&good[..len]);
        if boundaries.contains(&(len as u64)) {
            assert!(
                matches!(e, StreamError::Eof { offset } if offset == len as u64),
                "{len}: {e}"
            );
        } else {
            assert!(matches!(e, StreamError::Truncated { .. }), "{len}: {e}");
        }
    }
}
