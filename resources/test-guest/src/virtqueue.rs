//! Split virtqueues (virtio spec 2.7), transport-neutral: static,
//! 4 KiB-aligned rings in guest RAM (one page each for the descriptor table,
//! the available ring and the used ring), one descriptor chain in flight per
//! queue (descriptors 0, 1, 2, ...), completion seen through the used index.

use crate::transport::{ActivateError, QueueProbe, Transport};
use core::sync::atomic::{compiler_fence, Ordering};

/// Most queues set up on one device.
pub const MAX_QUEUES: usize = 8;
/// Queue size used (the largest power of two <= min(QueueNumMax, this)).
pub const QUEUE_SIZE: u16 = 16;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Available ring flag: no interrupts wanted (polling mode).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Ring pages: descriptor table, available ring, used ring per queue.
#[link_section = ".noinit.virtqueues"]
static mut RINGS: [[Page; 3]; MAX_QUEUES] = [const { [const { Page([0; 4096]) }; 3] }; MAX_QUEUES];

/// A descriptor as the device sees it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Driver state of one split virtqueue.
pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u8,
    /// Transport's notification cookie (PCI: notify address).
    notify: u64,
    next_avail: u16,
    last_used: u16,
    in_flight: bool,
}

/// Why a queue could not be set up.
pub enum QueueError {
    /// QueueNumMax is 0: the queue does not exist.
    Absent,
    /// QueueReady was already 1, or QueueNumMax < 4.
    Unusable,
    /// The device refused the MSI-X vector (the value read back).
    Vector(u16),
    /// The queue's notify address is outside the notify structure.
    Notify,
}

impl Virtqueue {
    /// Sets up queue `index` of `t` (size, ring addresses, MSI-X `vector`
    /// on PCI, enable). `poll`: ask the device not to interrupt.
    pub fn setup(
        t: &Transport,
        index: u16,
        poll: bool,
        vector: u16,
    ) -> Result<Virtqueue, QueueError> {
        if index as usize >= MAX_QUEUES {
            return Err(QueueError::Absent);
        }
        let max = match t.queue_max(index) {
            QueueProbe::Enabled => return Err(QueueError::Unusable),
            QueueProbe::Max(m) => m,
        };
        if max == 0 {
            return Err(QueueError::Absent);
        }
        let mut size = QUEUE_SIZE as u32;
        while size > max {
            size /= 2;
        }
        if size < 4 {
            return Err(QueueError::Unusable);
        }
        // SAFETY: BSP only; each queue index owns its own three pages and the
        // device does not touch them before QueueReady below.
        let pages = unsafe { &mut (*core::ptr::addr_of_mut!(RINGS))[index as usize] };
        for p in pages.iter_mut() {
            p.0.fill(0);
        }
        let desc = pages[0].0.as_mut_ptr();
        let avail = pages[1].0.as_mut_ptr();
        let used = pages[2].0.as_mut_ptr();
        if poll {
            // SAFETY: avail points at its zeroed page; flags is the first u16.
            unsafe { core::ptr::write_volatile(avail as *mut u16, AVAIL_F_NO_INTERRUPT) };
        }
        compiler_fence(Ordering::SeqCst);
        let rings = (desc as u64, avail as u64, used as u64);
        let notify = match t.queue_activate(index, size, rings, vector) {
            Ok(n) => n,
            Err(ActivateError::Vector(v)) => return Err(QueueError::Vector(v)),
            Err(ActivateError::Notify) => return Err(QueueError::Notify),
        };
        Ok(Virtqueue {
            index,
            size: size as u16,
            desc: desc as *mut Desc,
            avail: avail as *mut u16,
            used,
            notify,
            next_avail: 0,
            last_used: 0,
            in_flight: false,
        })
    }

    /// Makes a chain of `bufs` (at most 4) available and notifies the device.
    /// One chain at a time: the previous one must have completed.
    pub fn submit(&mut self, t: &Transport, bufs: &[Buf]) {
        let n = bufs.len().min(4);
        for (i, b) in bufs[..n].iter().enumerate() {
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= DESC_F_NEXT;
            }
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags,
                next: (i + 1) as u16,
            };
            // SAFETY: `desc` is this queue's descriptor page (>= 4 entries);
            // the device owns no descriptor while nothing is in flight.
            unsafe { core::ptr::write_volatile(self.desc.add(i), d) };
        }
        let slot = 2 + (self.next_avail % self.size) as usize;
        // SAFETY: avail ring layout {flags, idx, ring[size]}; slot < 2 + size.
        unsafe { core::ptr::write_volatile(self.avail.add(slot), 0) };
        // Descriptors and ring entry before the index (x86 keeps store order;
        // this stops the compiler from reordering).
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: avail->idx is the second u16 of the page.
        unsafe { core::ptr::write_volatile(self.avail.add(1), self.next_avail) };
        compiler_fence(Ordering::SeqCst);
        self.in_flight = true;
        t.notify(self.index, self.notify);
    }

    /// If the chain in flight has completed, returns (id, written length).
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        if !self.in_flight {
            return None;
        }
        // SAFETY: used ring layout {flags u16, idx u16, ring[size] {id u32, len u32}};
        // idx is written by the device, hence the volatile read.
        let idx = unsafe { core::ptr::read_volatile(self.used.add(2) as *const u16) };
        if idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let off = 4 + 8 * (self.last_used % self.size) as usize;
        // SAFETY: off + 8 <= 4 + 8 * size <= 4096.
        let (id, len) = unsafe {
            (
                core::ptr::read_volatile(self.used.add(off) as *const u32),
                core::ptr::read_volatile(self.used.add(off + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight = false;
        Some((id, len))
    }

    /// True while a chain is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight
    }
}
