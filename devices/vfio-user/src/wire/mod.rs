//! The vfio-user wire format: the message header, every command's request
//! and reply body, and the constants the protocol borrows from
//! `<linux/vfio.h>`.
//!
//! Source: QEMU `docs/interop/vfio-user.rst` (the revision with migration v2:
//! `VFIO_USER_DEVICE_FEATURE`, `VFIO_USER_MIG_DATA_READ/WRITE`, DMA logging),
//! the C layouts of libvfio-user `include/vfio-user.h`, and Linux
//! `include/uapi/linux/vfio.h` for the reused structures and numbers.
//!
//! # Byte order and version rule
//!
//! The spec says "the endianness of the host system". Outboard only runs on
//! little-endian hosts, so every field here is encoded and decoded explicitly
//! as little-endian: nothing is ever transmuted from peer bytes. Every decoder
//! checks the length of what it reads and returns [`WireError`] instead of
//! panicking.
//!
//! The protocol version is major [`VERSION_MAJOR`], minor [`VERSION_MINOR`]:
//! a peer proposing another major is refused; the minor in a reply is at most
//! the one proposed.
//!
//! # Message layout
//!
//! ```text
//!  0       2       4               8               12              16
//! +-------+-------+---------------+---------------+---------------+----------
//! | msg id|command| message size  |    flags      |    error      | body ...
//! +-------+-------+---------------+---------------+---------------+----------
//!                  (header + body)  bits 0-3 type (0 command, 1 reply),
//!                                   bit 4 no_reply, bit 5 error
//! ```
//!
//! File descriptors travel beside the bytes, as `SCM_RIGHTS` ancillary data
//! attached to the message.
//!
//! A request and its reply:
//!
//! ```text
//! client                                server
//!   | -- header{id, cmd, type=0} + body --> |
//!   | <-- header{id, cmd, type=1} + body -- |   (error: type=1, error bit,
//!   |                                       |    errno, no body)
//! ```
//!
//! The server may send its own commands (`DMA_READ`, `DMA_WRITE`) on the same
//! socket at any time, also between a client's request and its reply.

mod device;
mod dma;
mod feature;
mod version;

pub use device::*;
pub use dma::*;
pub use feature::*;
pub use version::*;

/// Size of the message header, in bytes.
pub const HEADER_SIZE: usize = 16;

/// The protocol major version this crate speaks.
pub const VERSION_MAJOR: u16 = 0;
/// The highest protocol minor version this crate speaks.
pub const VERSION_MINOR: u16 = 1;

/// Default `max_data_xfer_size` (spec: 1048576 bytes).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default `max_msg_fds` (spec: 1).
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_dma_maps` (spec: 65535).
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes` (spec: 4 KiB pages only).
pub const DEFAULT_PGSIZES: u64 = 4096;

/// Flags: the message type field (bits 0-3).
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const FLAGS_TYPE_COMMAND: u32 = 0;
/// Message type: a reply.
pub const FLAGS_TYPE_REPLY: u32 = 1;
/// Flags: the sender wants no reply to this command.
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// Flags: the reply reports an error; the header's error field is valid.
pub const FLAGS_ERROR: u32 = 1 << 5;

/// The command numbers of the spec's "Commands" table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// `VFIO_USER_VERSION`, client -> server.
    Version = 1,
    /// `VFIO_USER_DMA_MAP`, client -> server.
    DmaMap = 2,
    /// `VFIO_USER_DMA_UNMAP`, client -> server.
    DmaUnmap = 3,
    /// `VFIO_USER_DEVICE_GET_INFO`, client -> server.
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`, client -> server.
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`, client -> server.
    DeviceGetRegionIoFds = 6,
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`, client -> server.
    DeviceGetIrqInfo = 7,
    /// `VFIO_USER_DEVICE_SET_IRQS`, client -> server.
    DeviceSetIrqs = 8,
    /// `VFIO_USER_REGION_READ`, client -> server.
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE`, client -> server.
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ`, server -> client.
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE`, server -> client.
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET`, client -> server.
    DeviceReset = 13,
    /// `VFIO_USER_REGION_WRITE_MULTI`, client -> server (not implemented).
    RegionWriteMulti = 15,
    /// `VFIO_USER_DEVICE_FEATURE`, client -> server.
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ`, client -> server.
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE`, client -> server.
    MigDataWrite = 18,
}

impl Command {
    /// The command with this number, if the spec defines one.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Version,
            2 => Self::DmaMap,
            3 => Self::DmaUnmap,
            4 => Self::DeviceGetInfo,
            5 => Self::DeviceGetRegionInfo,
            6 => Self::DeviceGetRegionIoFds,
            7 => Self::DeviceGetIrqInfo,
            8 => Self::DeviceSetIrqs,
            9 => Self::RegionRead,
            10 => Self::RegionWrite,
            11 => Self::DmaRead,
            12 => Self::DmaWrite,
            13 => Self::DeviceReset,
            15 => Self::RegionWriteMulti,
            16 => Self::DeviceFeature,
            17 => Self::MigDataRead,
            18 => Self::MigDataWrite,
            _ => return None,
        })
    }
}

/// A decoding failure: the bytes do not form the message they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The body is shorter than the fixed part of the message.
    #[error("{what}: body too short ({have} bytes, need {need})")]
    Truncated {
        /// The message or field being decoded.
        what: &'static str,
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The body has bytes the message does not account for.
    #[error("{what}: {extra} trailing bytes")]
    Trailing {
        /// The message being decoded.
        what: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// A field has a value the spec does not allow.
    #[error("{what}: invalid {field} ({value:#x})")]
    Invalid {
        /// The message being decoded.
        what: &'static str,
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The version data is not the JSON the spec describes.
    #[error("version data: {0}")]
    Json(String),
}

impl WireError {
    pub(crate) fn invalid(what: &'static str, field: &'static str, value: impl Into<u64>) -> Self {
        Self::Invalid {
            what,
            field,
            value: value.into(),
        }
    }
}

/// The 16-byte header in front of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id, chosen by the sender of a command and echoed in the reply.
    pub msg_id: u16,
    /// The raw command number (see [`Command`]); raw so that an unknown
    /// command can still be answered.
    pub command: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// `FLAGS_*` bits.
    pub flags: u32,
    /// Errno of a failed command (replies with [`FLAGS_ERROR`] only).
    pub error: u32,
}

impl Header {
    /// A command header for a body of `body_len` bytes. `None` if the message
    /// would not fit the 32-bit size field.
    pub fn command(msg_id: u16, command: Command, body_len: usize) -> Option<Self> {
        Some(Self {
            msg_id,
            command: command as u16,
            msg_size: total_size(body_len)?,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        })
    }

    /// A successful reply to `request` carrying `body_len` bytes.
    pub fn reply(request: &Header, body_len: usize) -> Option<Self> {
        Some(Self {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: total_size(body_len)?,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        })
    }

    /// An error reply to `request`: the header alone, with `errno`.
    pub fn error_reply(request: &Header, errno: i32) -> Self {
        Self {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno.unsigned_abs(),
        }
    }

    /// The command, if it is one the spec defines.
    pub fn known_command(&self) -> Option<Command> {
        Command::from_raw(self.command)
    }

    /// The type field (`FLAGS_TYPE_*`).
    pub fn message_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// Whether this is a command message.
    pub fn is_command(&self) -> bool {
        self.message_type() == FLAGS_TYPE_COMMAND
    }

    /// Whether this is a reply message.
    pub fn is_reply(&self) -> bool {
        self.message_type() == FLAGS_TYPE_REPLY
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// Whether this reply reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }

    /// Size of the body that follows the header; `None` if the size field is
    /// smaller than the header itself.
    pub fn body_len(&self) -> Option<usize> {
        (self.msg_size as usize).checked_sub(HEADER_SIZE)
    }

    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Decodes the 16 header bytes (any bit pattern is a header; what it
    /// means is checked by the receiver).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            msg_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

fn total_size(body_len: usize) -> Option<u32> {
    u32::try_from(body_len.checked_add(HEADER_SIZE)?).ok()
}

/// Bounds-checked little-endian reader over a message body.
pub(crate) struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Self { what, buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                have: self.buf.len(),
                need: n,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails if anything is left.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// Little-endian writer building a message body.
#[derive(Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// `u32` length of a body part we build ourselves (bounded by the message
/// size limit long before it could overflow).
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes() {
        let h = Header {
            msg_id: 0x1234,
            command: Command::DeviceGetInfo as u16,
            msg_size: 32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: 22,
        };
        let expect = [
            0x34, 0x12, // msg id
            0x04, 0x00, // command
            0x20, 0x00, 0x00, 0x00, // size
            0x21, 0x00, 0x00, 0x00, // flags: reply | error
            0x16, 0x00, 0x00, 0x00, // errno EINVAL
        ];
        assert_eq!(h.encode(), expect);
        assert_eq!(Header::decode(&expect), h);
        assert!(h.is_reply() && h.is_error() && !h.no_reply());
        assert_eq!(h.body_len(), Some(16));
    }

    #[test]
    fn header_no_reply_bit() {
        let h = Header {
            flags: FLAGS_NO_REPLY,
            msg_size: 16,
            ..Default::default()
        };
        assert_eq!(h.encode()[8], 0x10);
        assert!(h.is_command() && h.no_reply());
        let bad = Header {
            msg_size: 15,
            ..Default::default()
        };
        assert_eq!(bad.body_len(), None);
    }

    #[test]
    fn error_reply_header() {
        let req = Header::command(7, Command::DmaMap, 32).unwrap();
        assert_eq!(req.msg_size, 48);
        let r = Header::error_reply(&req, libc::EEXIST);
        assert_eq!(
            r.encode(),
            [7, 0, 2, 0, 16, 0, 0, 0, 0x21, 0, 0, 0, 17, 0, 0, 0]
        );
    }

    #[test]
    fn command_numbers() {
        for raw in 0..=20u16 {
            if let Some(c) = Command::from_raw(raw) {
                assert_eq!(c as u16, raw);
            }
        }
        assert_eq!(Command::from_raw(14), None);
        assert_eq!(Command::from_raw(18), Some(Command::MigDataWrite));
    }

    #[test]
    fn reader_bounds() {
        let mut r = Reader::new("t", &[1, 2, 3]);
        assert_eq!(r.u16().unwrap(), 0x0201);
        assert!(matches!(r.u32(), Err(WireError::Truncated { .. })));
        assert_eq!(r.remaining(), 1);
        assert!(matches!(r.finish(), Err(WireError::Trailing { .. })));
    }
}
