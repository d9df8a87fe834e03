//! The server's view of client memory: the table of DMA windows the client
//! mapped, the device's handle to read and write through them, and DMA
//! write logging for migration.
//!
//! A window mapped with a file descriptor is `mmap`ed and accessed
//! directly; one mapped without is accessed with `VFIO_USER_DMA_READ` /
//! `VFIO_USER_DMA_WRITE` messages to the client, in chunks of at most the
//! client's `max_data_xfer_size`. Every write through [`Dma`] is recorded
//! in the dirty log while DMA logging is on, so devices get
//! `DMA_LOGGING_*` support without doing anything.
//!
//! Table rules: windows are page-aligned (4 KiB), non-empty, readable or
//! writable, within the 64-bit space, never overlap (`EEXIST`), at most
//! `max_dma_maps` of them (`ENOSPC`); a descriptor must be a regular file
//! (memfd, shm, hugetlbfs) at least `offset + size` long. Unmap must name
//! a window exactly (`ENOENT` otherwise) and waits for direct accesses in
//! flight.
//!
//! Limits: a message access waits for the client's reply without a
//! timeout; a client that shrinks a mapped file afterwards can still make a
//! direct access fault (`SIGBUS`): mapping client memory means trusting the
//! client that far, as the spec notes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::endpoint::Endpoint;
use crate::wire::{Command, DmaAccess, DmaLoggingRange, DMA_FLAG_READ, DMA_FLAG_WRITE};

/// Page size of DMA windows and the smallest logging granularity.
pub(crate) const DMA_PAGE_SIZE: u64 = 4096;

/// An errno for an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Errno(pub i32);

/// One DMA window, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRange {
    /// DMA (IOVA) base address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// The device may read it.
    pub readable: bool,
    /// The device may write it.
    pub writable: bool,
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory owned by this struct until Drop; it
// is only accessed by byte copies under the table lock, from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only allow those copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(
        fd: &OwnedFd,
        offset: u64,
        size: u64,
        readable: bool,
        writable: bool,
    ) -> Result<Self, Errno> {
        // SAFETY: fstat writes into a zeroed stat struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a valid open descriptor; st is valid for writes.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(Errno(libc::EBADF));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno(libc::EINVAL));
        }
        let end = offset.checked_add(size).ok_or(Errno(libc::EINVAL))?;
        if end > u64::try_from(st.st_size).unwrap_or(0) {
            return Err(Errno(libc::EINVAL));
        }
        let len = usize::try_from(size).map_err(|_| Errno(libc::EINVAL))?;
        let off = libc::off_t::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
        let mut prot = 0;
        if readable {
            prot |= libc::PROT_READ;
        }
        if writable {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a new shared mapping of `len` bytes of a regular file at a
        // page-aligned offset checked to lie within the file; it aliases no
        // Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno(
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::ENOMEM),
            ));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no access can be in
        // flight (accesses hold the table lock, drop happens under the write
        // lock or when the table is gone).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Window {
    range: DmaRange,
    mapping: Option<Mapping>,
}

impl Window {
    fn end(&self) -> u64 {
        // Cannot overflow: checked when the window was added.
        self.range.iova.saturating_add(self.range.size)
    }
}

#[derive(Default)]
struct DirtyLog {
    page_size: u64,
    /// Dirty page numbers (address / page_size).
    pages: BTreeSet<u64>,
}

impl DirtyLog {
    fn mark(&mut self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = iova / self.page_size;
        let last = iova.saturating_add(len - 1) / self.page_size;
        for p in first..=last {
            self.pages.insert(p);
        }
    }
}

struct Link {
    endpoint: Arc<Endpoint>,
    max_xfer: usize,
}

#[derive(Default)]
struct Inner {
    windows: RwLock<BTreeMap<u64, Window>>,
    log: Mutex<Option<DirtyLog>>,
    link: RwLock<Option<Arc<Link>>>,
}

/// Access to client (guest) memory for a device, through the DMA windows
/// the client mapped. Cheap to clone; usable from any thread.
///
/// Writes are recorded for DMA logging. A device must reach guest memory
/// only through this handle, so that unmap and logging stay correct.
#[derive(Clone, Default)]
pub struct Dma {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma").finish_non_exhaustive()
    }
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The part of a transfer that one window covers.
enum Segment {
    /// Done (copied through the mapping).
    Done(usize),
    /// Needs messages: this many bytes.
    Remote(usize),
}

impl Dma {
    /// A handle with no windows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `buf.len()` bytes of client memory at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let addr = iova
                .checked_add(done as u64)
                .ok_or_else(|| errno(libc::EFAULT))?;
            let rest = &mut buf[done..];
            match self.direct(addr, rest.len(), false, |src, len| {
                // SAFETY: `src` points at `len` mapped bytes (checked by
                // `direct`), `rest` has at least `len` bytes; the regions
                // cannot overlap (one is ours, one is the client's mapping).
                // Guest memory may change concurrently: a plain byte copy, as
                // VMMs do.
                unsafe { std::ptr::copy_nonoverlapping(src, rest.as_mut_ptr(), len) };
            })? {
                Segment::Done(n) => done += n,
                Segment::Remote(n) => {
                    self.remote_read(addr, &mut rest[..n])?;
                    done += n;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` to client memory at `iova` (logged if DMA logging is
    /// on).
    pub fn write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let addr = iova
                .checked_add(done as u64)
                .ok_or_else(|| errno(libc::EFAULT))?;
            let rest = &data[done..];
            let n = match self.direct(addr, rest.len(), true, |dst, len| {
                // SAFETY: `dst` points at `len` mapped writable bytes
                // (checked by `direct`), `rest` has at least `len`; no
                // overlap (see `read`).
                unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), dst, len) };
            })? {
                Segment::Done(n) => n,
                Segment::Remote(n) => {
                    self.remote_write(addr, &rest[..n])?;
                    n
                }
            };
            if let Some(log) = lock(&self.inner.log).as_mut() {
                log.mark(addr, n as u64);
            }
            done += n;
        }
        Ok(())
    }

    /// Records that the device wrote `[iova, iova + len)` through a mapping
    /// of its own (not through [`Dma::write`]); a no-op unless DMA logging
    /// is on.
    pub fn mark_dirty(&self, iova: u64, len: u64) {
        if let Some(log) = lock(&self.inner.log).as_mut() {
            log.mark(iova, len);
        }
    }

    /// Finds the window holding `addr`, copies through its mapping if it has
    /// one (under the table lock), else says how much must go by message.
    fn direct(
        &self,
        addr: u64,
        want: usize,
        write: bool,
        copy: impl FnOnce(*mut u8, usize),
    ) -> io::Result<Segment> {
        let windows = read_lock(&self.inner.windows);
        let (start, w) = windows
            .range(..=addr)
            .next_back()
            .ok_or_else(|| errno(libc::EFAULT))?;
        if addr >= w.end() {
            return Err(errno(libc::EFAULT));
        }
        if (write && !w.range.writable) || (!write && !w.range.readable) {
            return Err(errno(libc::EACCES));
        }
        let off = addr - start;
        let avail = w.end() - addr;
        let n = usize::try_from(avail).map_or(want, |a| a.min(want));
        match &w.mapping {
            Some(m) => {
                let off = usize::try_from(off).map_err(|_| errno(libc::EFAULT))?;
                if off.checked_add(n).is_none_or(|e| e > m.len) {
                    return Err(errno(libc::EFAULT));
                }
                // SAFETY: off + n <= m.len, checked just above.
                copy(unsafe { m.ptr.add(off) }, n);
                Ok(Segment::Done(n))
            }
            None => Ok(Segment::Remote(n)),
        }
    }

    fn link(&self) -> io::Result<Arc<Link>> {
        read_lock(&self.inner.link)
            .clone()
            .ok_or_else(|| errno(libc::ENOTCONN))
    }

    fn remote_read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let link = self.link()?;
        for (i, chunk) in buf.chunks_mut(link.max_xfer.max(1)).enumerate() {
            let a = addr.wrapping_add((i * link.max_xfer.max(1)) as u64);
            let req = DmaAccess {
                address: a,
                count: chunk.len() as u64,
            };
            let reply = link
                .endpoint
                .call(Command::DmaRead, &req.encode(&[]))
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
            check_reply(&reply.header, Command::DmaRead, reply.fds.len())?;
            let (got, data) = DmaAccess::decode_with_data(&reply.body).map_err(bad_reply)?;
            if got != req {
                return Err(bad_reply("DMA_READ reply does not match the request"));
            }
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    fn remote_write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        let link = self.link()?;
        for (i, chunk) in data.chunks(link.max_xfer.max(1)).enumerate() {
            let a = addr.wrapping_add((i * link.max_xfer.max(1)) as u64);
            let req = DmaAccess {
                address: a,
                count: chunk.len() as u64,
            };
            let reply = link
                .endpoint
                .call(Command::DmaWrite, &req.encode(chunk))
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
            check_reply(&reply.header, Command::DmaWrite, reply.fds.len())?;
            let got = DmaAccess::decode_write_reply(&reply.body).map_err(bad_reply)?;
            if got != req {
                return Err(bad_reply("DMA_WRITE reply does not match the request"));
            }
        }
        Ok(())
    }

    // ---- used by the server ----

    pub(crate) fn attach(&self, endpoint: Arc<Endpoint>, max_xfer: u32) {
        *write_lock(&self.inner.link) = Some(Arc::new(Link {
            endpoint,
            max_xfer: max_xfer as usize,
        }));
    }

    pub(crate) fn detach(&self) {
        *write_lock(&self.inner.link) = None;
    }

    /// Adds a window (flags already known to be READ/WRITE bits only).
    pub(crate) fn map(
        &self,
        iova: u64,
        size: u64,
        flags: u32,
        fd: Option<(OwnedFd, u64)>,
        max_maps: usize,
    ) -> Result<DmaRange, Errno> {
        let aligned = |v: u64| v % DMA_PAGE_SIZE == 0;
        let readable = flags & DMA_FLAG_READ != 0;
        let writable = flags & DMA_FLAG_WRITE != 0;
        if size == 0 || !aligned(iova) || !aligned(size) || !(readable || writable) {
            return Err(Errno(libc::EINVAL));
        }
        if flags & !(DMA_FLAG_READ | DMA_FLAG_WRITE) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        let end = iova.checked_add(size).ok_or(Errno(libc::EINVAL))?;
        let range = DmaRange {
            iova,
            size,
            readable,
            writable,
        };
        // Check before mapping, again under the write lock after.
        let check = |w: &BTreeMap<u64, Window>| -> Result<(), Errno> {
            if w.range(..end)
                .next_back()
                .is_some_and(|(_, p)| p.end() > iova)
            {
                return Err(Errno(libc::EEXIST));
            }
            if w.len() >= max_maps {
                return Err(Errno(libc::ENOSPC));
            }
            Ok(())
        };
        check(&read_lock(&self.inner.windows))?;
        let mapping = match fd {
            Some((fd, offset)) => {
                if !aligned(offset) {
                    return Err(Errno(libc::EINVAL));
                }
                Some(Mapping::new(&fd, offset, size, readable, writable)?)
            }
            None => None,
        };
        let mut windows = write_lock(&self.inner.windows);
        check(&windows)?;
        windows.insert(iova, Window { range, mapping });
        Ok(range)
    }

    /// Removes the window `[iova, iova + size)` exactly.
    pub(crate) fn unmap(&self, iova: u64, size: u64) -> Result<DmaRange, Errno> {
        let mut windows = write_lock(&self.inner.windows);
        match windows.get(&iova) {
            Some(w) if w.range.size == size => {}
            _ => return Err(Errno(libc::ENOENT)),
        }
        let w = windows.remove(&iova).ok_or(Errno(libc::ENOENT))?;
        Ok(w.range)
    }

    /// Removes every window.
    pub(crate) fn unmap_all(&self) -> Vec<DmaRange> {
        let old = std::mem::take(&mut *write_lock(&self.inner.windows));
        old.into_values().map(|w| w.range).collect()
    }

    /// Starts logging with granularity `page_size` (at least 4 KiB); returns
    /// the granularity chosen.
    pub(crate) fn log_start(
        &self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> Result<u64, Errno> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Errno(libc::EINVAL));
        }
        for r in ranges {
            if r.length == 0 || r.iova.checked_add(r.length).is_none() {
                return Err(Errno(libc::EINVAL));
            }
        }
        let mut log = lock(&self.inner.log);
        if log.is_some() {
            return Err(Errno(libc::EBUSY));
        }
        let page_size = page_size.max(DMA_PAGE_SIZE);
        // All writes are logged whatever the ranges: a report of any range
        // is then exact.
        *log = Some(DirtyLog {
            page_size,
            pages: BTreeSet::new(),
        });
        Ok(page_size)
    }

    pub(crate) fn log_stop(&self) {
        *lock(&self.inner.log) = None;
    }

    pub(crate) fn logging(&self) -> bool {
        lock(&self.inner.log).is_some()
    }

    /// Reports (and clears) the dirty pages of `[iova, iova + length)` as a
    /// bitmap of `page_size` units.
    pub(crate) fn log_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, Errno> {
        if length == 0 || !page_size.is_power_of_two() || iova % page_size != 0 {
            return Err(Errno(libc::EINVAL));
        }
        let end = iova.checked_add(length).ok_or(Errno(libc::EINVAL))?;
        let bits = length.div_ceil(page_size);
        let words = usize::try_from(bits.div_ceil(64)).map_err(|_| Errno(libc::EINVAL))?;
        let mut guard = lock(&self.inner.log);
        let log = guard.as_mut().ok_or(Errno(libc::EINVAL))?;
        let mut bitmap = vec![0u64; words];
        let lps = log.page_size;
        let first = iova / lps;
        let last = (end - 1) / lps;
        let mut clear = Vec::new();
        for &p in log.pages.range(first..=last) {
            let span_start = p.saturating_mul(lps).max(iova);
            let span_end = p.saturating_add(1).saturating_mul(lps).min(end);
            if span_start >= span_end {
                continue;
            }
            let b0 = (span_start - iova) / page_size;
            let b1 = (span_end - 1 - iova) / page_size;
            for b in b0..=b1 {
                if let Some(w) = bitmap.get_mut((b / 64) as usize) {
                    *w |= 1u64 << (b % 64);
                }
            }
            if p.saturating_mul(lps) >= iova && p.saturating_add(1).saturating_mul(lps) <= end {
                clear.push(p);
            }
        }
        for p in clear {
            log.pages.remove(&p);
        }
        Ok(bitmap)
    }
}

fn bad_reply(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn check_reply(h: &crate::wire::Header, command: Command, nfds: usize) -> io::Result<()> {
    if h.command != command as u16 {
        return Err(bad_reply("reply to another command"));
    }
    if h.is_error() {
        let e = i32::try_from(h.error).unwrap_or(libc::EIO);
        return Err(errno(if e == 0 { libc::EIO } else { e }));
    }
    if nfds != 0 {
        return Err(bad_reply("unexpected file descriptors in a DMA reply"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    pub(crate) fn memfd(size: u64) -> OwnedFd {
        // SAFETY: a valid NUL-terminated name; flags are valid.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fd is a valid descriptor we own.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0);
        fd
    }

    #[test]
    fn map_validation() {
        let dma = Dma::new();
        let rw = DMA_FLAG_READ | DMA_FLAG_WRITE;
        assert_eq!(dma.map(0x1000, 0, rw, None, 10), Err(Errno(libc::EINVAL)));
        assert_eq!(
            dma.map(0x1001, 0x1000, rw, None, 10),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(
            dma.map(0x1000, 0x1000, 0, None, 10),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(
            dma.map(0x1000, 0x1000, 4, None, 10),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(
            dma.map(u64::MAX - 0xfff, 0x2000, rw, None, 10),
            Err(Errno(libc::EINVAL))
        );
        dma.map(0x10000, 0x4000, rw, None, 10).unwrap();
        // overlaps: inside, straddling both ends, covering
        for (a, s) in [
            (0x11000, 0x1000),
            (0xf000, 0x2000),
            (0x13000, 0x2000),
            (0, 0x100000),
        ] {
            assert_eq!(
                dma.map(a, s, rw, None, 10),
                Err(Errno(libc::EEXIST)),
                "{a:#x}"
            );
        }
        // adjacent is fine
        dma.map(0x14000, 0x1000, rw, None, 10).unwrap();
        dma.map(0xf000, 0x1000, rw, None, 10).unwrap();
        assert_eq!(
            dma.map(0x20000, 0x1000, rw, None, 3),
            Err(Errno(libc::ENOSPC))
        );
        // unmap must match exactly
        assert_eq!(dma.unmap(0x10000, 0x1000), Err(Errno(libc::ENOENT)));
        assert_eq!(dma.unmap(0x11000, 0x1000), Err(Errno(libc::ENOENT)));
        dma.unmap(0x10000, 0x4000).unwrap();
        assert_eq!(dma.unmap(0x10000, 0x4000), Err(Errno(libc::ENOENT)));
        assert_eq!(dma.unmap_all().len(), 2);
    }

    #[test]
    fn mapped_access_and_bounds() {
        let dma = Dma::new();
        let fd = memfd(0x3000);
        // fd too small for the window
        assert_eq!(
            dma.map(0, 0x2000, DMA_FLAG_READ, Some((memfd(0x1000), 0)), 8),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(
            dma.map(0, 0x2000, DMA_FLAG_READ, Some((memfd(0x3000), 0x2000)), 8),
            Err(Errno(libc::EINVAL))
        );
        dma.map(
            0x1000,
            0x2000,
            DMA_FLAG_READ | DMA_FLAG_WRITE,
            Some((fd, 0x1000)),
            8,
        )
        .unwrap();
        dma.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        dma.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // out of the window, before it, across its end
        assert_eq!(
            dma.read(0x3000, &mut b).unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
        assert_eq!(
            dma.read(0, &mut b).unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
        assert!(dma.read(0x2ffe, &mut b).is_err());
        assert!(dma.read(u64::MAX - 1, &mut b).is_err());
        // read-only window refuses writes
        dma.map(0x10000, 0x1000, DMA_FLAG_READ, Some((memfd(0x1000), 0)), 8)
            .unwrap();
        assert_eq!(
            dma.write(0x10000, &[1]).unwrap_err().raw_os_error(),
            Some(libc::EACCES)
        );
        // a window without fd and no connection
        dma.map(0x20000, 0x1000, DMA_FLAG_READ, None, 8).unwrap();
        assert_eq!(
            dma.read(0x20000, &mut b).unwrap_err().raw_os_error(),
            Some(libc::ENOTCONN)
        );
    }

    #[test]
    fn dirty_log() {
        let dma = Dma::new();
        dma.map(
            0,
            0x10000,
            DMA_FLAG_READ | DMA_FLAG_WRITE,
            Some((memfd(0x10000), 0)),
            8,
        )
        .unwrap();
        assert_eq!(dma.log_report(0, 0x10000, 4096), Err(Errno(libc::EINVAL)));
        assert_eq!(dma.log_start(0, &[]), Err(Errno(libc::EINVAL)));
        assert_eq!(dma.log_start(3000, &[]), Err(Errno(libc::EINVAL)));
        assert_eq!(dma.log_start(512, &[]), Ok(4096));
        assert_eq!(dma.log_start(4096, &[]), Err(Errno(libc::EBUSY)));
        dma.write(0x1fff, &[1, 2]).unwrap(); // pages 1 and 2
        dma.write(0x9000, &[1]).unwrap(); // page 9
        let mut b = [0u8; 1];
        dma.read(0x5000, &mut b).unwrap(); // reads are not logged
        assert_eq!(dma.log_report(0, 0x10000, 4096), Ok(vec![0b10_0000_0110]));
        // cleared by the report
        assert_eq!(dma.log_report(0, 0x10000, 4096), Ok(vec![0]));
        // coarser and finer report pages
        dma.write(0x3000, &[1]).unwrap();
        assert_eq!(dma.log_report(0, 0x10000, 0x2000), Ok(vec![0b10]));
        dma.write(0x3000, &[1]).unwrap();
        assert_eq!(dma.log_report(0x2000, 0x2000, 0x800), Ok(vec![0b1100]));
        // bad arguments
        assert_eq!(
            dma.log_report(0x800, 0x1000, 0x1000),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(dma.log_report(0, 0, 0x1000), Err(Errno(libc::EINVAL)));
        assert_eq!(dma.log_report(0, 0x1000, 0x1001), Err(Errno(libc::EINVAL)));
        assert_eq!(
            dma.log_report(!0xfffu64, 0x2000, 0x1000),
            Err(Errno(libc::EINVAL))
        );
        dma.log_stop();
        assert_eq!(dma.log_report(0, 0x10000, 4096), Err(Errno(libc::EINVAL)));
    }
}
