//! RAM pre-copy: dirty bitmaps, sending pages as [`Section::RamPages`]
//! batches, applying them on the destination, and the estimate of whether
//! what is left fits the downtime target.
//!
//! Guest memory is reached through two small traits, [`PageSource`] and
//! [`PageSink`], so the VMM can plug in its own guest memory (e.g. through
//! vm-memory's volatile accessors while vCPUs run); [`RamSlices`] and
//! [`RamSlicesMut`] implement them over plain host slices, one per RAM
//! range.
//!
//! The source copies each page out of guest memory once, into the batch,
//! then decides zero or data and checksums that copy: a vCPU writing the
//! page meanwhile cannot make the checksum disagree with what is sent (the
//! dirty log sends such a page again in the next round).

use std::io::Write;
use std::time::Duration;

use crate::section::{Page, RamPages, Section};
use crate::stream::{StreamError, StreamWriter};

/// Size of a guest page, the unit of dirty tracking and of RAM sections.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;
/// Pages per [`Section::RamPages`] batch written by [`send_pages`] (about
/// 1 MiB of payload).
pub const PAGES_PER_SECTION: usize = 256;
/// Shortest measurement [`Rate`] trusts; shorter rounds are added up.
pub const MIN_SAMPLE: Duration = Duration::from_millis(10);

/// Errors of dirty bitmaps, RAM layouts and page transfer.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// An address or length that must be a multiple of 4 KiB is not.
    #[error("{what} {value:#x} is not a multiple of 4 KiB")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A range that runs past the end of the address space, or too large
    /// for this host.
    #[error("RAM range at {start:#x} of {len:#x} bytes is too large")]
    TooLarge {
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A dirty log whose size does not fit its range.
    #[error(
        "dirty log of {got} words for {pages} pages at {start:#x} (expected {expected} words)"
    )]
    LogSize {
        /// Start of the range.
        start: u64,
        /// Pages in the range.
        pages: u64,
        /// Words expected.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// Two bitmaps over different ranges.
    #[error("dirty bitmaps over different ranges: {a_start:#x} ({a_pages} pages) and {b_start:#x} ({b_pages} pages)")]
    RangeMismatch {
        /// First bitmap's start.
        a_start: u64,
        /// First bitmap's page count.
        a_pages: u64,
        /// Second bitmap's start.
        b_start: u64,
        /// Second bitmap's page count.
        b_pages: u64,
    },
    /// A page outside the bitmap's range.
    #[error("gpa {gpa:#x} is outside the dirty bitmap ({start:#x}, {pages} pages)")]
    OutsideBitmap {
        /// The address.
        gpa: u64,
        /// The bitmap's start.
        start: u64,
        /// Its page count.
        pages: u64,
    },
    /// Two RAM ranges overlap.
    #[error("RAM ranges at {first:#x} and {second:#x} overlap")]
    Overlap {
        /// The lower range's start.
        first: u64,
        /// The other range's start.
        second: u64,
    },
    /// A page outside guest RAM (on the destination: the stream names a
    /// page this VM does not have).
    #[error("page at gpa {gpa:#x} is outside guest RAM")]
    OutsideRam {
        /// The page's guest physical address.
        gpa: u64,
    },
    /// Writing the stream failed.
    #[error("sending RAM pages: {0}")]
    Stream(#[from] StreamError),
}

/// Which pages of one guest physical range were written: one bit per 4 KiB
/// page, bit `n` of word `n / 64` for page `n` of the range, the layout of
/// `KVM_GET_DIRTY_LOG` for a memory slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    start: u64,
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// A clean bitmap for the `len` bytes at `start_gpa` (both 4 KiB
    /// aligned).
    pub fn new(start_gpa: u64, len: u64) -> Result<Self, RamError> {
        check_range(start_gpa, len)?;
        let pages = len / PAGE;
        let words = usize::try_from(pages.div_ceil(64)).map_err(|_| RamError::TooLarge {
            start: start_gpa,
            len,
        })?;
        let mut v = Vec::new();
        v.try_reserve_exact(words).map_err(|_| RamError::TooLarge {
            start: start_gpa,
            len,
        })?;
        v.resize(words, 0);
        Ok(DirtyBitmap {
            start: start_gpa,
            pages,
            words: v,
        })
    }

    /// The bitmap KVM (or any log in the same layout) returned for the
    /// `len` bytes at `start_gpa`: exactly `ceil(pages / 64)` words; bits
    /// past the last page are ignored.
    pub fn from_words(start_gpa: u64, len: u64, words: &[u64]) -> Result<Self, RamError> {
        let mut map = Self::new(start_gpa, len)?;
        if words.len() != map.words.len() {
            return Err(RamError::LogSize {
                start: start_gpa,
                pages: map.pages,
                expected: map.words.len(),
                got: words.len(),
            });
        }
        map.words.copy_from_slice(words);
        map.trim();
        Ok(map)
    }

    /// First guest physical address covered.
    pub fn start_gpa(&self) -> u64 {
        self.start
    }

    /// Bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.pages * PAGE
    }

    /// Marks the page holding `gpa`.
    pub fn set(&mut self, gpa: u64) -> Result<(), RamError> {
        let (word, bit) = self.locate(gpa)?;
        if let Some(w) = self.words.get_mut(word) {
            *w |= 1 << bit;
        }
        Ok(())
    }

    /// Whether the page holding `gpa` is marked (false outside the range).
    pub fn is_set(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .ok()
            .and_then(|(word, bit)| self.words.get(word).map(|w| w & (1 << bit) != 0))
            .unwrap_or(false)
    }

    /// Marks every page (the first pre-copy round sends all of RAM).
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.trim();
    }

    /// Unmarks every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds the pages marked in `other` (same range) to this bitmap.
    pub fn union(&mut self, other: &DirtyBitmap) -> Result<(), RamError> {
        if self.start != other.start || self.pages != other.pages {
            return Err(RamError::RangeMismatch {
                a_start: self.start,
                a_pages: self.pages,
                b_start: other.start,
                b_pages: other.pages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is marked.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The guest physical addresses of the marked pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let start = self.start;
        self.words.iter().enumerate().flat_map(move |(i, &word)| {
            // i * 64 < pages, and start + pages * 4 KiB was checked.
            let base = start + (i as u64) * 64 * PAGE;
            Bits(word).map(move |bit| base + u64::from(bit) * PAGE)
        })
    }

    fn locate(&self, gpa: u64) -> Result<(usize, u32), RamError> {
        let page = gpa
            .checked_sub(self.start)
            .map(|off| off / PAGE)
            .filter(|&p| p < self.pages)
            .ok_or(RamError::OutsideBitmap {
                gpa,
                start: self.start,
                pages: self.pages,
            })?;
        // page < pages, whose word count fits usize.
        Ok(((page / 64) as usize, (page % 64) as u32))
    }

    /// Clears the bits past the last page.
    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }
}

/// The set bits of a word, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

fn check_range(start: u64, len: u64) -> Result<(), RamError> {
    if start % PAGE != 0 {
        return Err(RamError::Unaligned {
            what: "range start",
            value: start,
        });
    }
    if len % PAGE != 0 {
        return Err(RamError::Unaligned {
            what: "range length",
            value: len,
        });
    }
    if start.checked_add(len).is_none() {
        return Err(RamError::TooLarge { start, len });
    }
    Ok(())
}

/// Where the source reads guest pages from.
pub trait PageSource {
    /// Copies the page at `gpa` (4 KiB aligned) into `page`.
    fn read_page(&self, gpa: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), RamError>;
}

/// Where the destination writes guest pages to.
pub trait PageSink {
    /// Writes the page at `gpa` (4 KiB aligned); [`Page::Zero`] fills it
    /// with zeroes. A page outside RAM is [`RamError::OutsideRam`].
    fn write_page(&mut self, gpa: u64, page: Page<'_>) -> Result<(), RamError>;
}

/// Guest RAM as host slices, one per RAM range: `(start gpa, bytes)`.
pub struct RamSlices<'a> {
    regions: Vec<(u64, &'a [u8])>,
}

impl<'a> RamSlices<'a> {
    /// Checks the ranges (4 KiB aligned, not overlapping).
    pub fn new(mut regions: Vec<(u64, &'a [u8])>) -> Result<Self, RamError> {
        regions.sort_by_key(|r| r.0);
        check_regions(regions.iter().map(|(s, b)| (*s, b.len())))?;
        Ok(RamSlices { regions })
    }
}

impl PageSource for RamSlices<'_> {
    fn read_page(&self, gpa: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), RamError> {
        let src = self
            .regions
            .iter()
            .find_map(|(start, bytes)| page_in(*start, bytes, gpa))
            .ok_or(RamError::OutsideRam { gpa })?;
        page.copy_from_slice(src);
        Ok(())
    }
}

/// Destination guest RAM as host slices, one per RAM range.
pub struct RamSlicesMut<'a> {
    regions: Vec<(u64, &'a mut [u8])>,
}

impl<'a> RamSlicesMut<'a> {
    /// Checks the ranges (4 KiB aligned, not overlapping).
    pub fn new(mut regions: Vec<(u64, &'a mut [u8])>) -> Result<Self, RamError> {
        regions.sort_by_key(|r| r.0);
        check_regions(regions.iter().map(|(s, b)| (*s, b.len())))?;
        Ok(RamSlicesMut { regions })
    }
}

impl PageSink for RamSlicesMut<'_> {
    fn write_page(&mut self, gpa: u64, page: Page<'_>) -> Result<(), RamError> {
        let dst = self
            .regions
            .iter_mut()
            .find_map(|(start, bytes)| page_in_mut(*start, bytes, gpa))
            .ok_or(RamError::OutsideRam { gpa })?;
        match page {
            Page::Zero => dst.fill(0),
            Page::Data(data) => dst.copy_from_slice(data),
        }
        Ok(())
    }
}

fn check_regions(regions: impl Iterator<Item = (u64, usize)>) -> Result<(), RamError> {
    let mut prev: Option<(u64, u64)> = None;
    for (start, len) in regions {
        let len = len as u64;
        check_range(start, len)?;
        if let Some((p_start, p_end)) = prev {
            if start < p_end {
                return Err(RamError::Overlap {
                    first: p_start,
                    second: start,
                });
            }
        }
        prev = Some((start, start + len));
    }
    Ok(())
}

/// The 4 KiB at `gpa` if the region at `start` holds them all.
fn page_in(start: u64, bytes: &[u8], gpa: u64) -> Option<&[u8]> {
    let off = usize::try_from(gpa.checked_sub(start)?).ok()?;
    bytes.get(off..off.checked_add(PAGE_SIZE)?)
}

fn page_in_mut(start: u64, bytes: &mut [u8], gpa: u64) -> Option<&mut [u8]> {
    let off = usize::try_from(gpa.checked_sub(start)?).ok()?;
    bytes.get_mut(off..off.checked_add(PAGE_SIZE)?)
}

/// How many pages went as data and as zero-page markers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages sent (or applied) with their 4 KiB.
    pub data_pages: u64,
    /// Pages sent (or applied) as zero-page markers.
    pub zero_pages: u64,
}

/// Sends the pages at `pages` (4 KiB-aligned guest physical addresses,
/// e.g. [`DirtyBitmap::iter`]) from `ram` as [`Section::RamPages`]
/// batches of up to [`PAGES_PER_SECTION`], all-zero pages as markers.
pub fn send_pages<W, S>(
    out: &mut StreamWriter<W>,
    ram: &S,
    pages: impl IntoIterator<Item = u64>,
) -> Result<PageCounts, RamError>
where
    W: Write,
    S: PageSource + ?Sized,
{
    let mut counts = PageCounts::default();
    let mut batch = RamPages::new();
    let mut buf = [0u8; PAGE_SIZE];
    for gpa in pages {
        if gpa % PAGE != 0 {
            return Err(RamError::Unaligned {
                what: "page address",
                value: gpa,
            });
        }
        ram.read_page(gpa, &mut buf)?;
        if is_zero(&buf) {
            batch.push_zero(gpa);
            counts.zero_pages += 1;
        } else {
            batch.push_data(gpa, &buf);
            counts.data_pages += 1;
        }
        if batch.len() >= PAGES_PER_SECTION {
            batch = flush(out, batch)?;
        }
    }
    if !batch.is_empty() {
        flush(out, batch)?;
    }
    Ok(counts)
}

/// Writes `batch` and hands back its (emptied) buffers.
fn flush<W: Write>(out: &mut StreamWriter<W>, batch: RamPages) -> Result<RamPages, RamError> {
    let section = Section::RamPages(batch);
    out.write(&section)?;
    Ok(match section {
        Section::RamPages(mut b) => {
            b.clear();
            b
        }
        _ => RamPages::new(),
    })
}

fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    // OR-folding fixed chunks vectorizes; `iter().all` does not.
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Applies a received batch to destination RAM. Every page is checked
/// against the RAM ranges; the first one outside them is an error naming
/// its address (pages before it are written: the migration is to be
/// abandoned then anyway).
pub fn apply_pages<S: PageSink + ?Sized>(
    ram: &mut S,
    pages: &RamPages,
) -> Result<PageCounts, RamError> {
    let mut counts = PageCounts::default();
    for (gpa, page) in pages.iter() {
        ram.write_page(gpa, page)?;
        match page {
            Page::Zero => counts.zero_pages += 1,
            Page::Data(_) => counts.data_pages += 1,
        }
    }
    Ok(counts)
}

/// Measured transfer rate: bytes per second of the latest rounds that
/// together lasted at least [`MIN_SAMPLE`]. Older rounds are forgotten:
/// the link and the guest's load change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    pending_bytes: u64,
    pending_nanos: u64,
    sample: Option<(u64, u64)>,
}

impl Rate {
    /// No measurement yet.
    pub fn new() -> Self {
        Rate::default()
    }

    /// Records a round that sent `bytes` in `elapsed`.
    pub fn record(&mut self, bytes: u64, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.pending_bytes = self.pending_bytes.saturating_add(bytes);
        self.pending_nanos = self.pending_nanos.saturating_add(nanos);
        if u128::from(self.pending_nanos) >= MIN_SAMPLE.as_nanos() {
            self.sample = Some((self.pending_bytes, self.pending_nanos));
            self.pending_bytes = 0;
            self.pending_nanos = 0;
        }
    }

    /// Bytes per second, once measured.
    pub fn bytes_per_second(&self) -> Option<u64> {
        let (bytes, nanos) = self.sample?;
        let bps = u128::from(bytes) * 1_000_000_000 / u128::from(nanos.max(1));
        Some(u64::try_from(bps).unwrap_or(u64::MAX))
    }

    /// How long `bytes` take at the measured rate; `None` before any
    /// measurement or at a rate of zero.
    pub fn time_for(&self, bytes: u64) -> Option<Duration> {
        let (sample_bytes, nanos) = self.sample?;
        if sample_bytes == 0 {
            return None;
        }
        let t = u128::from(bytes) * u128::from(nanos) / u128::from(sample_bytes);
        Some(Duration::from_nanos(u64::try_from(t).unwrap_or(u64::MAX)))
    }
}

/// Whether `remaining_bytes` can be sent within `downtime_target` at the
/// measured `rate` (never, before a measurement, unless nothing remains).
pub fn fits(remaining_bytes: u64, rate: &Rate, downtime_target: Duration) -> bool {
    if remaining_bytes == 0 {
        return true;
    }
    let Some((bytes, nanos)) = rate.sample else {
        return false;
    };
    // remaining / (bytes / nanos) <= target, without division.
    let need = u128::from(remaining_bytes) * u128::from(nanos);
    downtime_target
        .as_nanos()
        .checked_mul(u128::from(bytes))
        .is_none_or(|have| need <= have)
}

#[cfg(test)]
mod tests;
