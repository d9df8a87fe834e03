//! The `blk` scenario: a small virtio-blk driver on the virtio-mmio or the
//! modern virtio-pci transport (`transport.rs`). Devices: the virtio-mmio
//! windows of the command line, then the virtio-blk functions of PCI bus 0.
//! It negotiates VIRTIO_F_VERSION_1
//! (plus FLUSH, and MQ when more than one queue is asked for), sets up N
//! split virtqueues, then writes a pattern over the disk in chunks spread
//! round-robin over the queues (one request in flight per queue), flushes,
//! reads everything back and verifies it. Completions are interrupt driven
//! (virtio-mmio: IOAPIC pin = the device's irq, vector `IRQ_VECTOR`; PCI:
//! MSI-X, vectors `MSIX_VECTOR_BASE + i`) or polled (`tg.blk_poll=1`); every
//! wait is bounded by LAPIC timer ticks.
//!
//! Pattern: 8-byte little-endian word `i` (0..64) of sector `s` is
//! `(s << 32) ^ (i * 0x9E3779B97F4A7C15 mod 2^64) ^ seed`.

use crate::bootinfo::BootInfo;
use crate::pci::{self, Bdf};
use crate::transport::{self as tp, Transport};
use crate::virtio_mmio::{self as vm, Mmio, MmioDesc};
use crate::virtio_pci::{self as vp, VirtioPci};
use crate::virtqueue::{Buf, QueueError, Virtqueue, MAX_QUEUES};
use crate::{cpu, interrupts, ioapic, lapic, outln, paging};
use core::fmt;

/// Vector the device's IOAPIC pin is routed to.
pub const IRQ_VECTOR: u8 = 0x50;

const DEVICE_ID_BLOCK: u32 = 2;
const SECTOR: usize = 512;
const WORDS: usize = SECTOR / 8;
/// Largest chunk (sectors per request).
const MAX_CHUNK: u64 = 16;
/// Multiplier of the pattern (2^64 / golden ratio).
const PATTERN_K: u64 = 0x9E37_79B9_7F4A_7C15;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
/// Offset of `num_queues` (u16) in the virtio-blk config space.
const CONFIG_NUM_QUEUES: u32 = 34;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_IOERR: u8 = 1;
/// Status byte value before the device writes it.
const S_UNSET: u8 = 0xff;
const ID_LEN: usize = 20;

/// Per-queue request memory: header at 0 (16 bytes), status at 16, GET_ID buffer at 32.
#[repr(C, align(64))]
struct Slot([u8; 64]);

#[link_section = ".noinit.blk_slots"]
static mut SLOTS: [Slot; MAX_QUEUES] = [const { Slot([0; 64]) }; MAX_QUEUES];

/// Per-queue data buffers (one chunk each), reused for every request.
#[repr(C, align(4096))]
struct Data([u8; MAX_CHUNK as usize * SECTOR]);

#[link_section = ".noinit.blk_data"]
static mut DATA: [Data; MAX_QUEUES] =
    [const { Data([0; MAX_CHUNK as usize * SECTOR]) }; MAX_QUEUES];

fn slot_addr(q: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of!(SLOTS[q]) as u64 }
}

fn data_addr(q: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of!(DATA[q]) as u64 }
}

/// Fills `n` sectors starting at `sector` into queue `q`'s buffer.
fn fill(q: usize, sector: u64, n: u64, seed: u64) {
    let p = data_addr(q) as *mut u64;
    for k in 0..n {
        let hi = ((sector + k) << 32) ^ seed;
        let mut m = 0u64;
        for i in 0..WORDS {
            // SAFETY: k < n <= MAX_CHUNK, so the word lies in DATA[q]; no
            // request is in flight on queue q.
            unsafe { core::ptr::write_volatile(p.add(k as usize * WORDS + i), hi ^ m) };
            m = m.wrapping_add(PATTERN_K);
        }
    }
}

/// First sector of the `n` at `sector` in queue `q`'s buffer that does not match.
fn check(q: usize, sector: u64, n: u64, seed: u64) -> Option<u64> {
    let p = data_addr(q) as *const u64;
    for k in 0..n {
        let hi = ((sector + k) << 32) ^ seed;
        let mut m = 0u64;
        for i in 0..WORDS {
            // SAFETY: as in `fill`; the device finished writing (used ring seen).
            let w = unsafe { core::ptr::read_volatile(p.add(k as usize * WORDS + i)) };
            if w != hi ^ m {
                return Some(sector + k);
            }
            m = m.wrapping_add(PATTERN_K);
        }
    }
    None
}

/// Displays bytes up to the first NUL as ASCII (`?` for anything else).
struct Id<'a>(&'a [u8]);

impl fmt::Display for Id<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

/// A request in flight on one queue.
#[derive(Clone, Copy)]
struct Pending {
    typ: u32,
    sector: u64,
}

/// An initialized device.
struct Blk {
    t: Transport,
    poll: bool,
    timeout_ticks: u32,
    apic: u8,
    queues: [Option<Virtqueue>; MAX_QUEUES],
    nq: usize,
    pending: [Option<Pending>; MAX_QUEUES],
}

/// Why a batch failed.
enum IoError {
    /// No completion within the timeout (queue, request).
    Timeout(usize, Pending),
    /// Completed with a status other than OK (request, status).
    Status(Pending, u8),
}

impl Blk {
    /// Starts request `typ` at `sector` on queue `q`; `data`: buffer address,
    /// length, whether the device writes it.
    fn start(&mut self, q: usize, typ: u32, sector: u64, data: Option<(u64, u32, bool)>) {
        let s = slot_addr(q);
        let hdr = s as *mut u32;
        // SAFETY: the slot is queue q's (no request in flight on it): header
        // {type u32, reserved u32, sector u64} at 0, status byte at 16.
        unsafe {
            core::ptr::write_volatile(hdr, typ);
            core::ptr::write_volatile(hdr.add(1), 0);
            core::ptr::write_volatile((s + 8) as *mut u64, sector);
            core::ptr::write_volatile((s + 16) as *mut u8, S_UNSET);
        }
        let hdr_buf = Buf {
            addr: s,
            len: 16,
            write: false,
        };
        let st_buf = Buf {
            addr: s + 16,
            len: 1,
            write: true,
        };
        let vq = self.queues[q].as_mut().expect("queue set up");
        match data {
            Some((addr, len, write)) => {
                vq.submit(&self.t, &[hdr_buf, Buf { addr, len, write }, st_buf])
            }
            None => vq.submit(&self.t, &[hdr_buf, st_buf]),
        }
        self.pending[q] = Some(Pending { typ, sector });
    }

    /// Waits (bounded) for every pending request, then checks their status bytes.
    fn wait(&mut self) -> Result<(), IoError> {
        let start = interrupts::ticks(self.apic);
        loop {
            cpu::cli();
            let mut busy = None;
            for q in 0..self.nq {
                if let Some(vq) = self.queues[q].as_mut() {
                    vq.poll();
                    if vq.busy() && busy.is_none() {
                        busy = Some(q);
                    }
                }
            }
            let Some(q) = busy else {
                cpu::sti();
                break;
            };
            if interrupts::ticks(self.apic).wrapping_sub(start) >= self.timeout_ticks {
                cpu::sti();
                let p = self.pending[q].unwrap_or(Pending { typ: 0, sector: 0 });
                return Err(IoError::Timeout(q, p));
            }
            if self.poll {
                cpu::sti();
                cpu::pause();
            } else {
                cpu::sti_hlt();
            }
        }
        let mut res = Ok(());
        for q in 0..self.nq {
            if let Some(p) = self.pending[q].take() {
                // SAFETY: status byte of queue q's slot; the device completed the request.
                let st = unsafe { core::ptr::read_volatile((slot_addr(q) + 16) as *const u8) };
                if st != 0 && res.is_ok() {
                    res = Err(IoError::Status(p, st));
                }
            }
        }
        res
    }

    /// Runs one request on queue 0 and waits for it.
    fn one(
        &mut self,
        typ: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> Result<(), IoError> {
        self.start(0, typ, sector, data);
        self.wait()
    }
}

/// Prints the interrupt count and the result line, then powers off.
fn finish(fail: Option<&str>) -> ! {
    outln!("blk interrupts={}", tp::irq_count());
    match fail {
        None => {
            outln!("result PASS");
            cpu::power_off(0)
        }
        Some(r) => {
            outln!("result FAIL {}", r);
            cpu::power_off(1)
        }
    }
}

/// Fails before the device is usable (no interrupts line).
fn fail_early(reason: &str) -> ! {
    outln!("result FAIL {}", reason);
    cpu::power_off(1)
}

/// Reports an I/O error and ends the scenario.
fn io_fail(t: &Transport, e: IoError, timeout_ms: u32) -> ! {
    match e {
        IoError::Timeout(q, p) => {
            outln!(
                "blk timeout: request {} sector {} queue {} not completed after {} ms",
                p.typ,
                p.sector,
                q,
                timeout_ms
            );
            // DEVICE_NEEDS_RESET (0x40) here says the device broke.
            outln!("blk device status={:#x}", t.status());
            finish(Some("blk-timeout"))
        }
        IoError::Status(p, s) => {
            outln!("blk request {} sector {} status {}", p.typ, p.sector, s);
            finish(Some("blk-io"))
        }
    }
}

/// Maps a window and reads its identity registers: Some((magic, version,
/// device id)), None if it cannot be mapped uncached or is too small.
fn probe(d: &MmioDesc) -> Option<(u32, u32, u32)> {
    // SAFETY: BSP only, no AP was started in this scenario.
    if d.size < 0x108 || !unsafe { paging::ensure_uncached(d.base, d.size) } {
        return None;
    }
    let m = Mmio { base: d.base };
    Some((
        m.read(vm::REG_MAGIC),
        m.read(vm::REG_VERSION),
        m.read(vm::REG_DEVICE_ID),
    ))
}

/// The device picked by `select`.
enum Chosen {
    Mmio(MmioDesc),
    Pci(Bdf),
}

/// Picks the device: the `virtio_mmio.device=` windows first (index = the
/// word's position), then the virtio-blk functions of PCI bus 0 (index =
/// windows + k). `tg.blk_device=N` picks one; by default the first
/// virtio-blk. Bus 0 is only scanned when no window was picked.
fn select(bi: &BootInfo) -> (usize, Chosen) {
    let (descs, ndesc) = vm::discover(bi.cmdline());
    let want_dev = bi.param_u64("tg.blk_device");
    for (i, d) in descs[..ndesc].iter().enumerate() {
        if want_dev.is_some_and(|w| w != i as u64) {
            continue;
        }
        match probe(d) {
            Some((vm::MAGIC_VALUE, 2, DEVICE_ID_BLOCK)) => return (i, Chosen::Mmio(*d)),
            // Not ours, or not a modern (version 2) virtio-mmio device.
            Some((magic, version, id)) => outln!(
                "blk skip device={} base={:#x} magic={:#x} version={} id={}",
                i,
                d.base,
                magic,
                version,
                id
            ),
            None => outln!(
                "blk skip device={} base={:#x} size={:#x}: not mappable",
                i,
                d.base,
                d.size
            ),
        }
    }
    let mut npci = 0;
    if want_dev.is_none_or(|w| w >= ndesc as u64) {
        let (funcs, nf) = pci::scan();
        for f in funcs[..nf].iter().filter(|f| vp::is_blk(f)) {
            let idx = ndesc + npci;
            if want_dev.is_none_or(|w| w == idx as u64) {
                return (idx, Chosen::Pci(f.bdf));
            }
            npci += 1;
        }
    }
    outln!(
        "blk no virtio-blk device (virtio_mmio.device entries={}, pci virtio-blk functions={})",
        ndesc,
        npci
    );
    fail_early("blk-no-device")
}

/// Marks the device FAILED, prints `blk init: <why>` and fails with `reason`.
fn init_fail(t: &Transport, status: u8, reason: &str, why: fmt::Arguments) -> ! {
    t.set_status(status | tp::STATUS_FAILED);
    outln!("blk init: {}", why);
    fail_early(reason)
}

/// The `blk` scenario (after paging, IDT and PIC setup).
pub fn run(bi: &BootInfo) -> ! {
    let (dev, chosen) = select(bi);

    let mode = bi.param("tg.blk_mode").unwrap_or(b"readwrite");
    let (do_write, do_read) = match mode {
        b"readwrite" => (true, true),
        b"write" => (true, false),
        b"read" => (false, true),
        _ => {
            outln!("blk unknown tg.blk_mode");
            fail_early("blk-mode")
        }
    };
    let poll = bi.param_u64("tg.blk_poll").unwrap_or(0) != 0;
    let want_q = bi
        .param_u64("tg.blk_queues")
        .unwrap_or(1)
        .clamp(1, MAX_QUEUES as u64) as usize;
    let chunk = bi
        .param_u64("tg.blk_chunk")
        .unwrap_or(8)
        .clamp(1, MAX_CHUNK);
    let seed = bi.param_u64("tg.blk_seed").unwrap_or(1);
    let expect_ro = bi.param_u64("tg.blk_expect_ro").unwrap_or(0) != 0;
    let timeout_ms = bi
        .param_u64("tg.blk_timeout_ms")
        .unwrap_or(10_000)
        .clamp(1, 600_000) as u32;
    let move_bar = bi.param_u64("tg.blk_move_bar").unwrap_or(0) != 0;

    // Timer first: every wait below is bounded by its ticks.
    lapic::enable();
    let apic = lapic::id();
    lapic::start_timer(lapic::TIMER_COUNT_1MS);
    cpu::sti();

    let t = match chosen {
        Chosen::Mmio(d) => Transport::Mmio(Mmio { base: d.base }),
        Chosen::Pci(bdf) => {
            if move_bar {
                match vp::move_common_bar(bdf) {
                    Ok((old, new)) => outln!("blk bar moved {:#x} -> {:#x}", old, new),
                    Err((reason, why)) => {
                        outln!("blk init: pci {}: {}", bdf, why);
                        fail_early(reason)
                    }
                }
            }
            match VirtioPci::new(bdf) {
                Ok(p) => Transport::Pci(p),
                Err((reason, why)) => {
                    outln!("blk init: pci {}: {}", bdf, why);
                    fail_early(reason)
                }
            }
        }
    };

    // Reset, ACKNOWLEDGE, DRIVER.
    t.reset();
    let mut status = tp::STATUS_ACKNOWLEDGE;
    t.set_status(status);
    status |= tp::STATUS_DRIVER;
    t.set_status(status);

    // Features.
    let offered = t.device_features();
    if offered & tp::F_VERSION_1 == 0 {
        init_fail(
            &t,
            status,
            "blk-init",
            format_args!(
                "device does not offer VIRTIO_F_VERSION_1 (features={:#x})",
                offered
            ),
        )
    }
    let mut accepted = tp::F_VERSION_1 | (offered & F_FLUSH);
    if want_q > 1 {
        accepted |= offered & F_MQ;
    }
    t.set_driver_features(accepted);
    status |= tp::STATUS_FEATURES_OK;
    t.set_status(status);
    if t.status() & tp::STATUS_FEATURES_OK == 0 {
        init_fail(
            &t,
            status,
            "blk-init",
            format_args!("FEATURES_OK not accepted (driver features={:#x})", accepted),
        )
    }
    let capacity = t.config_u64(0);
    let max_q = if accepted & F_MQ != 0 {
        (t.config_u16(CONFIG_NUM_QUEUES) as usize).clamp(1, MAX_QUEUES)
    } else {
        MAX_QUEUES
    };
    let nq_max = want_q.min(max_q);

    // PCI: MSI-X (entry 0: configuration changes, 1 + q: queue q; shared
    // when the table is smaller), before the queues take their vectors.
    let mut msix_size = 0u16;
    if let Transport::Pci(p) = &t {
        if let Some(m) = p.msix {
            msix_size = m.size;
        }
        if !poll {
            if msix_size == 0 {
                init_fail(
                    &t,
                    status,
                    "blk-msix",
                    format_args!("pci {}: no MSI-X capability (INTx is not used)", p.bdf),
                )
            }
            p.msix_enable((1 + nq_max) as u16, apic);
            let back = p.set_config_vector(0);
            if back != 0 {
                init_fail(
                    &t,
                    status,
                    "blk-msix",
                    format_args!("config_msix_vector reads back {:#x} after writing 0", back),
                )
            }
        } else {
            p.set_config_vector(vp::NO_VECTOR);
        }
    }
    let queue_vector = |q: usize| -> u16 {
        if poll || msix_size == 0 {
            vp::NO_VECTOR
        } else {
            ((1 + q) as u16).min(msix_size - 1).min(vp::MAX_MSIX - 1)
        }
    };

    // Queues.
    let mut blk = Blk {
        t,
        poll,
        timeout_ticks: timeout_ms,
        apic,
        queues: [const { None }; MAX_QUEUES],
        nq: 0,
        pending: [None; MAX_QUEUES],
    };
    for q in 0..nq_max {
        let vector = queue_vector(q);
        match Virtqueue::setup(&t, q as u16, poll, vector) {
            Ok(vq) => {
                blk.queues[q] = Some(vq);
                blk.nq += 1;
            }
            Err(QueueError::Absent) => break,
            Err(QueueError::Unusable) => init_fail(
                &t,
                status,
                "blk-init",
                format_args!(
                    "queue {} unusable (ready already set or QueueNumMax < 4)",
                    q
                ),
            ),
            Err(QueueError::Vector(v)) => init_fail(
                &t,
                status,
                "blk-msix",
                format_args!(
                    "queue {} queue_msix_vector reads back {:#x} after writing {}",
                    q, v, vector
                ),
            ),
            Err(QueueError::Notify) => init_fail(
                &t,
                status,
                "blk-pci-caps",
                format_args!("queue {} notify address outside the notify structure", q),
            ),
        }
    }
    if blk.nq == 0 {
        init_fail(
            &t,
            status,
            "blk-init",
            format_args!("queue 0 absent (QueueNumMax=0)"),
        )
    }

    // virtio-mmio interrupt routing.
    if let (false, Transport::Mmio(m), Chosen::Mmio(d)) = (poll, &t, &chosen) {
        let pins = ioapic::pins();
        if d.irq >= pins {
            init_fail(
                &t,
                status,
                "blk-irq",
                format_args!("irq {} beyond the IOAPIC's {} pins", d.irq, pins),
            )
        }
        vm::set_irq_device(*m);
        ioapic::route(d.irq, IRQ_VECTOR, apic);
    }
    status |= tp::STATUS_DRIVER_OK;
    t.set_status(status);

    match (&t, &chosen) {
        (Transport::Pci(p), _) => outln!(
            "blk device={} pci={} bar={:#x} msix={} capacity={} queues={} features={:#x}",
            dev,
            p.bdf,
            p.common_bar,
            msix_size,
            capacity,
            blk.nq,
            offered
        ),
        (_, Chosen::Mmio(d)) => outln!(
            "blk device={} base={:#x} irq={} capacity={} queues={} features={:#x}",
            dev,
            d.base,
            d.irq,
            capacity,
            blk.nq,
            offered
        ),
        _ => {}
    }

    // GET_ID.
    let id_addr = slot_addr(0) + 32;
    // SAFETY: the GET_ID buffer of queue 0's slot; nothing is in flight.
    unsafe { core::ptr::write_bytes(id_addr as *mut u8, 0, ID_LEN) };
    if let Err(e) = blk.one(T_GET_ID, 0, Some((id_addr, ID_LEN as u32, true))) {
        io_fail(&blk.t, e, timeout_ms)
    }
    let mut id = [0u8; ID_LEN];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: within the 20-byte GET_ID buffer, completed by the device.
        *b = unsafe { core::ptr::read_volatile((id_addr + i as u64) as *const u8) };
    }
    outln!("blk id=\"{}\"", Id(&id));

    let total = bi
        .param_u64("tg.blk_sectors")
        .map_or(capacity, |s| s.min(capacity));
    let nq = blk.nq;
    let mut wrote = 0u64;
    if do_write {
        let ro = offered & F_RO != 0;
        let mut s = 0;
        while s < total {
            for q in 0..nq {
                if s >= total {
                    break;
                }
                let n = chunk.min(total - s);
                fill(q, s, n, seed);
                blk.start(
                    q,
                    T_OUT,
                    s,
                    Some((data_addr(q), (n as usize * SECTOR) as u32, false)),
                );
                s += n;
            }
            match blk.wait() {
                Ok(()) => {}
                Err(IoError::Status(p, S_IOERR)) if expect_ro && ro && p.typ == T_OUT => {
                    outln!("blk read-only: write refused");
                    finish(None)
                }
                Err(e) => io_fail(&blk.t, e, timeout_ms),
            }
            wrote = s;
        }
        if expect_ro {
            outln!(
                "blk wrote={} to a device expected to be read-only (ro offered={})",
                wrote,
                ro
            );
            finish(Some("blk-ro-write-accepted"))
        }
        if accepted & F_FLUSH != 0 {
            if let Err(e) = blk.one(T_FLUSH, 0, None) {
                io_fail(&blk.t, e, timeout_ms)
            }
        }
    }

    let mut read = 0u64;
    if do_read {
        let mut s = 0;
        while s < total {
            let mut batch = [(0u64, 0u64); MAX_QUEUES];
            for (q, b) in batch.iter_mut().enumerate().take(nq) {
                if s >= total {
                    break;
                }
                let n = chunk.min(total - s);
                // SAFETY: queue q's buffer, no request in flight on it; poisoned
                // so that data the device never wrote cannot pass the check.
                unsafe {
                    core::ptr::write_bytes(data_addr(q) as *mut u8, 0xa5, n as usize * SECTOR)
                };
                blk.start(
                    q,
                    T_IN,
                    s,
                    Some((data_addr(q), (n as usize * SECTOR) as u32, true)),
                );
                *b = (s, n);
                s += n;
            }
            if let Err(e) = blk.wait() {
                io_fail(&blk.t, e, timeout_ms)
            }
            for (q, &(bs, bn)) in batch.iter().enumerate().take(nq) {
                if bn == 0 {
                    continue;
                }
                if let Some(bad) = check(q, bs, bn, seed) {
                    outln!("blk wrote={} read={} FAIL at sector {}", wrote, read, bad);
                    finish(Some("blk-verify"))
                }
                read += bn;
            }
        }
    }
    outln!("blk wrote={} read={} verified ok", wrote, read);
    finish(None)
}
