//! Outboard's migration stream and its building blocks, for live migration
//! (source and destination) and snapshots (the same stream in a file).
//!
//! - [`stream`]: the wire format. A stream header, then framed sections
//!   (id, flags, length, checksums), written by [`StreamWriter`] and read,
//!   checked and decoded by [`StreamReader`].
//! - [`section`]: the sections and their payloads ([`Section`]).
//! - [`shape`]: the VM shape carried in the handshake and the check that the
//!   destination's own config matches it ([`check_shape`]).
//! - [`channel`]: what carries the stream: TCP, a unix socket or a file
//!   ([`Address`], [`connect`], [`Listener`]).
//! - [`ram`]: RAM pre-copy: dirty bitmaps, sending and applying pages, and
//!   the bandwidth / downtime estimate ([`Rate`], [`fits`]).
//!
//! Everything read from a stream is untrusted: lengths are checked before
//! anything is allocated, every section is checksummed, an unknown section
//! is an error (never skipped), and a page outside the destination's RAM is
//! refused with its address.
//!
//! ```
//! use outboard_migration::{Section, StreamReader, StreamWriter};
//!
//! let mut out = StreamWriter::new(Vec::new())?;
//! out.write(&Section::Clock(vec![1, 2, 3]))?;
//! out.write(&Section::End)?;
//! let bytes = out.into_inner()?;
//!
//! let mut input = StreamReader::new(&bytes[..])?;
//! assert_eq!(input.read()?, Section::Clock(vec![1, 2, 3]));
//! assert_eq!(input.read()?, Section::End);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod channel;
pub mod ram;
pub mod section;
pub mod shape;
pub mod stream;

pub use channel::{connect, listen_accept, Address, ChannelError, ChannelKind, Listener};
pub use channel::{DestinationChannel, SourceChannel};
pub use ram::{fits, DirtyBitmap, RamError, Rate, PAGE_SIZE};
pub use section::{Page, RamPages, RamStats, Section, SectionId};
pub use shape::{check as check_shape, DeviceShape, ShapeMismatch, StateFormat, VmShape};
pub use stream::{StreamError, StreamReader, StreamWriter};
