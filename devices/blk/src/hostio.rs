//! Host side of the block engine: the image file and how bytes move
//! between it and guest memory.
//!
//! All I/O is positional (`preadv`/`pwritev`/`pread`/`pwrite` at an
//! offset), never through the shared file cursor, so every queue's worker
//! can run at once on the same file.
//!
//! Two strategies:
//! - buffered: `preadv`/`pwritev` straight between the page cache and the
//!   guest's buffers (no copy);
//! - direct (`O_DIRECT`): through a 4 KiB-aligned bounce buffer, in chunks
//!   aligned to what the filesystem needs. A write that is not aligned to
//!   that (only when it is above 512, e.g. a 4 KiB-sector disk) is a
//!   read-modify-write of the edge blocks, serialized by a lock so two
//!   queues writing neighbouring sectors of one block do not undo each
//!   other's write.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Bytes moved per bounce-buffer round trip.
const BOUNCE_LEN: usize = 256 * 1024;

/// Memory alignment of bounce buffers (enough for any `O_DIRECT`).
const BOUNCE_ALIGN: usize = 4096;

/// Most iovecs per `preadv`/`pwritev` call (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// A zero-filled buffer of `len` bytes at a `BOUNCE_ALIGN`-aligned address,
/// carved out of a slightly larger `Vec` (no unsafe allocation).
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + BOUNCE_ALIGN];
        let offset = storage.as_ptr().align_offset(BOUNCE_ALIGN);
        // align_offset may in theory give up (usize::MAX); then take the
        // unaligned start: O_DIRECT fails with EINVAL and the request with
        // IOERR, nothing worse.
        let offset = if offset < BOUNCE_ALIGN { offset } else { 0 };
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let end = self.offset + self.len;
        self.storage.get_mut(self.offset..end).unwrap_or_default()
    }
}

/// How the image is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// Page cache, zero-copy vectored I/O.
    Buffered,
    /// `O_DIRECT`: offsets and lengths aligned to `align` bytes (a power
    /// of two, 512 or more), through bounce buffers.
    Direct {
        /// Offset/length alignment the filesystem needs.
        align: usize,
    },
}

/// The image file and its I/O strategy.
pub(crate) struct Image {
    file: File,
    mode: IoMode,
    /// Free bounce buffers (the direct path and the write-zeroes fallback).
    pool: Mutex<Vec<AlignedBuf>>,
    /// Serializes read-modify-write cycles.
    rmw: Mutex<()>,
}

impl Image {
    pub(crate) fn new(file: File, mode: IoMode) -> Self {
        Image {
            file,
            mode,
            pool: Mutex::new(Vec::new()),
            rmw: Mutex::new(()),
        }
    }

    fn take_buf(&self) -> AlignedBuf {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(BOUNCE_LEN))
    }

    fn give_buf(&self, buf: AlignedBuf) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
    }

    /// Reads `Σ dst.len()` bytes at `offset` into the guest slices.
    pub(crate) fn read_to_guest<B: BitmapSlice>(
        &self,
        offset: u64,
        dst: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        let result = match self.mode {
            IoMode::Buffered => vectored(&self.file, offset, dst, Direction::Read),
            IoMode::Direct { align } => {
                let mut cursor = Cursor::new(dst);
                let len = cursor.remaining();
                let mut buf = self.take_buf();
                let r = self.bounce_read(offset, len, align, buf.as_mut_slice(), |chunk| {
                    cursor.copy_into_guest(chunk)
                });
                self.give_buf(buf);
                r
            }
        };
        // preadv writes guest memory behind the bitmap's back; mark it all
        // dirty (too much on a failed read is harmless).
        for s in dst {
            s.bitmap().mark_dirty(0, s.len());
        }
        result
    }

    /// Writes the guest slices at `offset`.
    pub(crate) fn write_from_guest<B: BitmapSlice>(
        &self,
        offset: u64,
        src: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        match self.mode {
            IoMode::Buffered => vectored(&self.file, offset, src, Direction::Write),
            IoMode::Direct { align } => {
                let mut cursor = Cursor::new(src);
                let len = cursor.remaining();
                self.bounce_write(offset, len, align, |chunk| {
                    cursor.copy_from_guest(chunk);
                })
            }
        }
    }

    /// Writes `len` zero bytes at `offset` (the write-zeroes fallback when
    /// `fallocate` cannot).
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let align = match self.mode {
            IoMode::Buffered => 1,
            IoMode::Direct { align } => align,
        };
        self.bounce_write(offset, len, align, |chunk| chunk.fill(0))
    }

    /// Reads `[offset, offset + len)` through the bounce buffer, handing
    /// each piece of the wanted bytes to `sink` in order.
    fn bounce_read(
        &self,
        offset: u64,
        len: u64,
        align: usize,
        buf: &mut [u8],
        mut sink: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let end = checked_end(offset, len)?;
        let (start_a, end_a) = align_out(offset, end, align as u64)?;
        let mut pos = start_a;
        while pos < end_a {
            let n = chunk_len(end_a - pos, buf.len());
            let chunk = buf.get_mut(..n).ok_or_else(bad_chunk)?;
            self.file.read_exact_at(chunk, pos)?;
            // The part of this chunk inside [offset, end).
            let lo = offset.max(pos) - pos;
            let hi = end.min(pos + n as u64) - pos;
            sink(chunk.get(lo as usize..hi as usize).ok_or_else(bad_chunk)?);
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes `[offset, offset + len)` through a bounce buffer, `source`
    /// filling each piece of the new bytes in order; edge blocks not fully
    /// covered are read first (read-modify-write, under the lock).
    fn bounce_write(
        &self,
        offset: u64,
        len: u64,
        align: usize,
        mut source: impl FnMut(&mut [u8]),
    ) -> io::Result<()> {
        let end = checked_end(offset, len)?;
        let (start_a, end_a) = align_out(offset, end, align as u64)?;
        let unaligned = start_a != offset || end_a != end;
        let _rmw = unaligned.then(|| self.rmw.lock().unwrap_or_else(PoisonError::into_inner));
        let mut buf = self.take_buf();
        let result = (|| {
            let buf = buf.as_mut_slice();
            let mut pos = start_a;
            while pos < end_a {
                let n = chunk_len(end_a - pos, buf.len());
                let chunk = buf.get_mut(..n).ok_or_else(bad_chunk)?;
                let lo = offset.max(pos) - pos;
                let hi = end.min(pos + n as u64) - pos;
                if lo != 0 || hi != n as u64 {
                    self.file.read_exact_at(chunk, pos)?;
                }
                source(
                    chunk
                        .get_mut(lo as usize..hi as usize)
                        .ok_or_else(bad_chunk)?,
                );
                self.file.write_all_at(chunk, pos)?;
                pos += n as u64;
            }
            Ok(())
        })();
        self.give_buf(buf);
        result
    }

    /// `fallocate(2)` on the image.
    pub(crate) fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(|_| too_big())?;
        let len = i64::try_from(len).map_err(|_| too_big())?;
        // With O_DIRECT a concurrent read-modify-write of a neighbouring
        // block could write stale bytes back over the range: exclude it.
        let _rmw = matches!(self.mode, IoMode::Direct { .. })
            .then(|| self.rmw.lock().unwrap_or_else(PoisonError::into_inner));
        loop {
            // SAFETY: fallocate only acts on the file behind the fd, which
            // `self.file` keeps open; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// `fdatasync(2)`.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Length of the next chunk: what is left, at most the buffer.
fn chunk_len(left: u64, buf_len: usize) -> usize {
    usize::try_from(left).map_or(buf_len, |l| l.min(buf_len))
}

fn checked_end(offset: u64, len: u64) -> io::Result<u64> {
    offset.checked_add(len).ok_or_else(too_big)
}

/// `[start, end)` widened to multiples of `align` (a power of two).
fn align_out(start: u64, end: u64, align: u64) -> io::Result<(u64, u64)> {
    let mask = align.saturating_sub(1);
    let end_a = end.checked_add(mask).ok_or_else(too_big)? & !mask;
    Ok((start & !mask, end_a))
}

fn too_big() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset or length too large")
}

fn bad_chunk() -> io::Error {
    io::Error::other("internal: bounce chunk out of range")
}

#[derive(Clone, Copy)]
enum Direction {
    /// File to guest.
    Read,
    /// Guest to file.
    Write,
}

/// `preadv`/`pwritev` between the file at `offset` and the guest slices,
/// at most `IOV_MAX` at a time, resuming after short transfers.
fn vectored<B: BitmapSlice>(
    file: &File,
    mut offset: u64,
    slices: &[VolatileSlice<'_, B>],
    dir: Direction,
) -> io::Result<()> {
    let mut cursor = Cursor::new(slices);
    while cursor.remaining() > 0 {
        // Guards keep the mappings alive (and, for Xen, mapped) across the call.
        let mut guards = Vec::with_capacity(IOV_MAX);
        let mut iovs = Vec::with_capacity(IOV_MAX);
        for s in cursor.pending().take(IOV_MAX) {
            let guard = s.ptr_guard_mut();
            iovs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: s.len(),
            });
            guards.push(guard);
        }
        let off = i64::try_from(offset).map_err(|_| too_big())?;
        let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
        let n = match dir {
            // SAFETY: every iovec points into a guest-memory mapping that
            // `slices` borrows and `guards` keeps mapped for this call, and
            // is valid for `iov_len` bytes; the kernel writes only there.
            Direction::Read => unsafe { libc::preadv(file.as_raw_fd(), iovs.as_ptr(), count, off) },
            // SAFETY: as above; the kernel only reads the buffers.
            Direction::Write => unsafe {
                libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), count, off)
            },
        };
        drop(guards);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as u64;
        if n == 0 {
            return Err(match dir {
                Direction::Read => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image ended before the requested sectors",
                ),
                Direction::Write => io::Error::from(io::ErrorKind::WriteZero),
            });
        }
        cursor.advance(n);
        offset += n;
    }
    Ok(())
}

/// A position in a list of guest slices, read or written in order.
struct Cursor<'s, 'a, B: BitmapSlice> {
    slices: &'s [VolatileSlice<'a, B>],
    index: usize,
    /// Bytes already consumed of `slices[index]`.
    skip: usize,
}

impl<'s, 'a, B: BitmapSlice> Cursor<'s, 'a, B> {
    fn new(slices: &'s [VolatileSlice<'a, B>]) -> Self {
        Cursor {
            slices,
            index: 0,
            skip: 0,
        }
    }

    /// Bytes not consumed yet.
    fn remaining(&self) -> u64 {
        let rest: u64 = self
            .slices
            .get(self.index..)
            .unwrap_or_default()
            .iter()
            .map(|s| s.len() as u64)
            .sum();
        rest - self.skip as u64
    }

    /// The slices not consumed yet, the first one trimmed.
    fn pending(&self) -> impl Iterator<Item = VolatileSlice<'a, B>> + '_ {
        let rest = self.slices.get(self.index..).unwrap_or_default();
        rest.iter().enumerate().filter_map(move |(i, s)| {
            let s = if i == 0 {
                s.offset(self.skip).ok()?
            } else {
                s.clone()
            };
            (!s.is_empty()).then_some(s)
        })
    }

    fn advance(&mut self, mut n: u64) {
        while let Some(s) = self.slices.get(self.index) {
            let left = (s.len() - self.skip) as u64;
            if n < left {
                self.skip += n as usize;
                return;
            }
            n -= left;
            self.index += 1;
            self.skip = 0;
        }
    }

    /// Copies `src` into the guest at the cursor (as much as fits).
    fn copy_into_guest(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            let Some(s) = self.pending().next() else {
                return;
            };
            let n = src.len().min(s.len());
            let (head, tail) = src.split_at(n);
            s.copy_from(head);
            self.advance(n as u64);
            src = tail;
        }
    }

    /// Fills `dst` from the guest at the cursor (zeros past the end).
    fn copy_from_guest(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() {
            let Some(s) = self.pending().next() else {
                dst.fill(0);
                return;
            };
            let n = s.copy_to(dst);
            if n == 0 {
                dst.fill(0);
                return;
            }
            self.advance(n as u64);
            dst = dst.get_mut(n..).unwrap_or_default();
        }
    }
}

/// What `O_DIRECT` on this file needs: `Ok(Some(align))` (offset/length
/// alignment in bytes), `Ok(None)` when the filesystem does not support
/// it.
pub(crate) fn direct_io_alignment(file: &File) -> io::Result<Option<usize>> {
    if let Some(align) = statx_dio_align(file) {
        return Ok((align != 0).then_some(align.max(512)));
    }
    // No STATX_DIOALIGN answer: probe with aligned reads.
    let mut buf = AlignedBuf::new(BOUNCE_ALIGN);
    for align in [512usize, BOUNCE_ALIGN] {
        let probe = buf.as_mut_slice().get_mut(..align).unwrap_or_default();
        match file.read_at(probe, 0) {
            Ok(_) => return Ok(Some(align)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// `stx_dio_offset_align` from `statx(STATX_DIOALIGN)`, if the kernel and
/// filesystem report it (0: no O_DIRECT).
fn statx_dio_align(file: &File) -> Option<usize> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty: &CStr = c"";
    // SAFETY: the path is a valid NUL-terminated string, `stx` is a valid
    // statx buffer we own, and AT_EMPTY_PATH makes the call act on the fd.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    usize::try_from(stx.stx_dio_offset_align).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_out_widens() {
        assert_eq!(align_out(512, 1024, 4096).ok(), Some((0, 4096)));
        assert_eq!(align_out(4096, 8192, 4096).ok(), Some((4096, 8192)));
        assert_eq!(align_out(5, 7, 1).ok(), Some((5, 7)));
        assert!(align_out(0, u64::MAX, 4096).is_err());
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(8192);
        let s = b.as_mut_slice();
        assert_eq!(s.len(), 8192);
        assert_eq!(s.as_ptr() as usize % BOUNCE_ALIGN, 0);
    }
}
