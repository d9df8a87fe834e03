//! The migration stream's framing: a stream header, then sections.
//!
//! ```text
//! stream header (16 bytes)
//!   0   8  magic "OBMIGRAT"
//!   8   4  format version (u32 LE), FORMAT_VERSION = 1
//!  12   4  flags (u32 LE), none defined: must be 0
//!
//! section (24 bytes + payload), repeated
//!   0   4  section id (u32 LE), see crate::section
//!   4   4  flags (u32 LE), none defined: must be 0
//!   8   8  payload length (u64 LE), at most the reader's max_payload
//!  16   4  header CRC-32 of bytes 0..16
//!  20   n  payload
//!  20+n 4  section CRC-32 of bytes 0..16 and the payload
//! ```
//!
//! CRC-32 is the IEEE polynomial (zlib's `crc32`). The header has its own
//! checksum so that a corrupt length or id is caught before the length is
//! trusted (and before waiting on a socket for bytes that will never come);
//! the section checksum covers the header fields again and the payload.
//!
//! ```text
//! source                                  destination
//!   | stream header                            |
//!   | Handshake (VM shape)                     |  check_shape against
//!   | RamPages ... RoundEnd   (round 0, 1, ...) |  its own config
//!   | RamPages ... RamDone    (vCPUs stopped)   |
//!   | VcpuState, Irqchip, Pit, Clock,          |
//!   | DeviceState, VmmDevice ..., End          |
//!   |                 <------- stream header   |  (reply direction,
//!   |                 <------- Confirm / Abort |   not for a file)
//! ```
//!
//! Version rule: any change to a frame, a payload layout or the set of
//! section ids makes a new format version; a reader accepts only the
//! versions it implements (today exactly [`FORMAT_VERSION`]). A section id
//! the reader does not know is an error, never skipped.
//!
//! Reading tells apart a stream that ends cleanly between two sections
//! ([`StreamError::Eof`]: the caller decides whether `End` was due) from
//! one cut inside a header, payload or checksum ([`StreamError::Truncated`]).

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::section::{Section, SectionId};

/// The first bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"OBMIGRAT";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Default largest payload a reader accepts (and a writer writes): 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: u64 = 64 << 20;

const STREAM_HEADER_LEN: usize = 16;
const SECTION_HEADER_LEN: usize = 20;
const CRC_LEN: usize = 4;
/// How much a reader reserves ahead of the payload bytes that arrived.
const READ_CHUNK: u64 = 1 << 20;
/// Buffer size of the writer and the reader.
const BUFFER: usize = 64 << 10;

/// Errors writing or reading a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The channel failed.
    #[error("migration stream: {context} at byte {offset}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Stream offset where it failed.
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// The stream does not start with [`MAGIC`].
    #[error("not an Outboard migration stream: magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// The stream has a format version this build cannot read.
    #[error(
        "unsupported migration stream version {found} (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version in the stream header.
        found: u32,
    },
    /// The stream header has flags this version does not define.
    #[error("migration stream header has unknown flags {0:#x}")]
    HeaderFlags(u32),
    /// The stream ended cleanly between two sections.
    #[error("migration stream ended at byte {offset}, between sections")]
    Eof {
        /// Stream offset of the end.
        offset: u64,
    },
    /// The stream ended inside a header, a payload or a checksum.
    #[error(
        "migration stream truncated in the {what} at byte {offset}: {got} of {expected} bytes"
    )]
    Truncated {
        /// Which part was cut.
        what: &'static str,
        /// Stream offset where that part starts.
        offset: u64,
        /// Bytes of it that arrived.
        got: u64,
        /// Bytes it should have.
        expected: u64,
    },
    /// A section header's checksum does not match: its id, flags or length
    /// cannot be trusted.
    #[error("section header at byte {offset}: checksum {found:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Stream offset of the section.
        offset: u64,
        /// The checksum in the stream.
        found: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A section's checksum does not match its header and payload.
    #[error(
        "section {section} at byte {offset}: checksum {found:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch {
        /// The section.
        section: SectionId,
        /// Stream offset of the section.
        offset: u64,
        /// The checksum in the stream.
        found: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A section id this format version does not define.
    #[error("unknown migration stream section id {0}")]
    UnknownSection(u32),
    /// A section with flags this format version does not define.
    #[error("section {section} at byte {offset}: unknown flags {flags:#x}")]
    SectionFlags {
        /// The section.
        section: SectionId,
        /// Stream offset of the section.
        offset: u64,
        /// The flags.
        flags: u32,
    },
    /// A payload longer than the limit (refused before reading it).
    #[error(
        "section {section} at byte {offset}: payload of {len} bytes exceeds the limit of {max}"
    )]
    Oversized {
        /// The section.
        section: SectionId,
        /// Stream offset of the section.
        offset: u64,
        /// The announced (or, writing, the actual) payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A payload whose checksum matched but whose contents are invalid.
    #[error("section {section} at byte {offset}: malformed payload: {reason}")]
    Malformed {
        /// The section.
        section: SectionId,
        /// Stream offset of the section.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A section that cannot be written (e.g. a name too long).
    #[error("cannot write section {section}: {reason}")]
    Encode {
        /// The section.
        section: SectionId,
        /// What is wrong.
        reason: String,
    },
}

/// Writes a migration stream: the stream header on creation, then one
/// framed section per [`write`](Self::write). Each section is flushed to
/// the channel when written, so a peer never waits on bytes held back here.
pub struct StreamWriter<W: Write> {
    out: BufWriter<W>,
    max_payload: u64,
    offset: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream on `out` with the default payload limit.
    pub fn new(out: W) -> Result<Self, StreamError> {
        Self::with_max_payload(out, DEFAULT_MAX_PAYLOAD)
    }

    /// Starts a stream on `out`; a section whose payload exceeds
    /// `max_payload` is refused (the reader would refuse it too).
    pub fn with_max_payload(out: W, max_payload: u64) -> Result<Self, StreamError> {
        let mut w = StreamWriter {
            out: BufWriter::with_capacity(BUFFER, out),
            max_payload,
            offset: 0,
        };
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        w.put(&header, "writing the stream header")?;
        w.flush("writing the stream header")?;
        Ok(w)
    }

    /// Writes `section`, framed and checksummed, and flushes it.
    pub fn write(&mut self, section: &Section) -> Result<(), StreamError> {
        let id = section.id();
        let parts = section.encode().map_err(|reason| StreamError::Encode {
            section: id,
            reason,
        })?;
        let len = parts
            .iter()
            .try_fold(0u64, |sum, p| sum.checked_add(p.len() as u64))
            .unwrap_or(u64::MAX);
        if len > self.max_payload {
            return Err(StreamError::Oversized {
                section: id,
                offset: self.offset,
                len,
                max: self.max_payload,
            });
        }
        let mut fields = [0u8; 16];
        fields[..4].copy_from_slice(&id.as_u32().to_le_bytes());
        fields[8..].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fields);
        let header_crc = crc.clone().finalize();
        for p in &parts {
            crc.update(p);
        }
        self.put(&fields, "writing a section header")?;
        self.put(&header_crc.to_le_bytes(), "writing a section header")?;
        for p in &parts {
            self.put(p, "writing a section payload")?;
        }
        self.put(&crc.finalize().to_le_bytes(), "writing a section checksum")?;
        self.flush("flushing a section")
    }

    /// Bytes written so far, the stream header included.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flushes and returns the channel.
    pub fn into_inner(self) -> Result<W, StreamError> {
        let offset = self.offset;
        self.out.into_inner().map_err(|e| StreamError::Io {
            context: "flushing the stream",
            offset,
            source: e.into_error(),
        })
    }

    fn put(&mut self, bytes: &[u8], context: &'static str) -> Result<(), StreamError> {
        self.out
            .write_all(bytes)
            .map_err(|source| StreamError::Io {
                context,
                offset: self.offset,
                source,
            })?;
        self.offset = self.offset.saturating_add(bytes.len() as u64);
        Ok(())
    }

    fn flush(&mut self, context: &'static str) -> Result<(), StreamError> {
        self.out.flush().map_err(|source| StreamError::Io {
            context,
            offset: self.offset,
            source,
        })
    }
}

/// Reads a migration stream: checks the stream header on creation, then
/// returns one checked, decoded section per [`read`](Self::read).
pub struct StreamReader<R: Read> {
    input: BufReader<R>,
    max_payload: u64,
    offset: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header from `input`, with the default
    /// payload limit.
    pub fn new(input: R) -> Result<Self, StreamError> {
        Self::with_max_payload(input, DEFAULT_MAX_PAYLOAD)
    }

    /// Reads and checks the stream header from `input`; a section that
    /// announces a payload over `max_payload` is refused before any of it
    /// is read.
    pub fn with_max_payload(input: R, max_payload: u64) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            input: BufReader::with_capacity(BUFFER, input),
            max_payload,
            offset: 0,
        };
        let mut header = [0u8; STREAM_HEADER_LEN];
        r.fill_exact(&mut header, "stream header", "reading the stream header")?;
        let (magic, rest) = split::<8>(&header);
        let (version, rest) = split::<4>(rest);
        let (flags, _) = split::<4>(rest);
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(version);
        if version != FORMAT_VERSION {
            return Err(StreamError::UnsupportedVersion { found: version });
        }
        let flags = u32::from_le_bytes(flags);
        if flags != 0 {
            return Err(StreamError::HeaderFlags(flags));
        }
        Ok(r)
    }

    /// Reads the next section. [`StreamError::Eof`] if the stream ended
    /// cleanly before it.
    pub fn read(&mut self) -> Result<Section, StreamError> {
        let start = self.offset;
        let mut header = [0u8; SECTION_HEADER_LEN];
        let got = self.fill(&mut header, "reading a section header")?;
        if got == 0 {
            return Err(StreamError::Eof { offset: start });
        }
        if got < header.len() {
            return Err(StreamError::Truncated {
                what: "section header",
                offset: start,
                got: got as u64,
                expected: SECTION_HEADER_LEN as u64,
            });
        }
        let (fields, header_crc) = split::<16>(&header);
        let (id, rest) = split::<4>(&fields);
        let (flags, len) = split::<4>(rest);
        let (len, _) = split::<8>(len);
        let found = u32::from_le_bytes(split::<4>(header_crc).0);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fields);
        let computed = crc.clone().finalize();
        if found != computed {
            return Err(StreamError::HeaderChecksum {
                offset: start,
                found,
                computed,
            });
        }
        let raw_id = u32::from_le_bytes(id);
        let id = SectionId::from_u32(raw_id).ok_or(StreamError::UnknownSection(raw_id))?;
        let flags = u32::from_le_bytes(flags);
        if flags != 0 {
            return Err(StreamError::SectionFlags {
                section: id,
                offset: start,
                flags,
            });
        }
        let len = u64::from_le_bytes(len);
        if len > self.max_payload {
            return Err(StreamError::Oversized {
                section: id,
                offset: start,
                len,
                max: self.max_payload,
            });
        }

        let payload = self.payload(len)?;
        crc.update(&payload);
        let computed = crc.finalize();
        let mut trailer = [0u8; CRC_LEN];
        self.fill_exact(
            &mut trailer,
            "section checksum",
            "reading a section checksum",
        )?;
        let found = u32::from_le_bytes(trailer);
        if found != computed {
            return Err(StreamError::ChecksumMismatch {
                section: id,
                offset: start,
                found,
                computed,
            });
        }
        Section::decode(id, payload).map_err(|reason| StreamError::Malformed {
            section: id,
            offset: start,
            reason,
        })
    }

    /// Bytes read so far, the stream header included.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// Reads a payload of `len` bytes (already checked against the limit),
    /// growing the buffer as bytes arrive rather than trusting `len`.
    fn payload(&mut self, len: u64) -> Result<Vec<u8>, StreamError> {
        let start = self.offset;
        let mut payload = Vec::new();
        payload
            .try_reserve(usize::try_from(len.min(READ_CHUNK)).unwrap_or(0))
            .map_err(|e| StreamError::Io {
                context: "allocating a payload buffer",
                offset: start,
                source: io::Error::new(io::ErrorKind::OutOfMemory, e),
            })?;
        // `read_to_end` retries `Interrupted` itself.
        let result = (&mut self.input).take(len).read_to_end(&mut payload);
        let got = payload.len() as u64;
        if let Err(source) = result {
            return Err(StreamError::Io {
                context: "reading a section payload",
                offset: start.saturating_add(got),
                source,
            });
        }
        self.offset = self.offset.saturating_add(got);
        if got < len {
            return Err(StreamError::Truncated {
                what: "section payload",
                offset: start,
                got,
                expected: len,
            });
        }
        Ok(payload)
    }

    /// Reads until `buf` is full or the stream ends; returns the count.
    fn fill(&mut self, buf: &mut [u8], context: &'static str) -> Result<usize, StreamError> {
        let mut got = 0;
        while let Some(rest) = buf.get_mut(got..) {
            if rest.is_empty() {
                break;
            }
            match self.input.read(rest) {
                Ok(0) => break,
                Ok(n) => got += n.min(rest.len()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Io {
                        context,
                        offset: self.offset.saturating_add(got as u64),
                        source,
                    })
                }
            }
        }
        self.offset = self.offset.saturating_add(got as u64);
        Ok(got)
    }

    /// Like [`fill`](Self::fill), a short read being [`StreamError::Truncated`].
    fn fill_exact(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
        context: &'static str,
    ) -> Result<(), StreamError> {
        let start = self.offset;
        let got = self.fill(buf, context)?;
        if got < buf.len() {
            return Err(StreamError::Truncated {
                what,
                offset: start,
                got: got as u64,
                expected: buf.len() as u64,
            });
        }
        Ok(())
    }
}

/// Splits a fixed-size head off `bytes`, zero-filled if `bytes` is shorter
/// (only called on buffers of known, sufficient size).
fn split<const N: usize>(bytes: &[u8]) -> ([u8; N], &[u8]) {
    let (head, tail) = bytes.split_at(N.min(bytes.len()));
    let mut out = [0u8; N];
    if let Some(dst) = out.get_mut(..head.len()) {
        dst.copy_from_slice(head);
    }
    (out, tail)
}

#[cfg(test)]
mod tests;
