//! The `counter` scenario, a workload for live migration and snapshot/restore
//! tests: a 64-bit counter runs in a tight loop on the BSP while every vCPU
//! keeps rewriting its own slice of a memory region, and each CPU verifies
//! pages of its slice against what it last wrote. Once per period (BSP timer
//! ticks) the BSP prints one `counter seq=...` line, `seq` rising by exactly 1.
//!
//! Memory model: page `p` (4 KiB) of the region has a generation `gen[p]` (a
//! u32 in the metadata array placed just before the region); every word of
//! the page at address `a` and generation `g` holds `value(a, g)` (one value
//! per page, so pages are filled with `rep stosq` and checked with `repe
//! scasq`, single instructions even where every instruction is emulated).
//! Each CPU has a write cursor in its slice: each loop iteration writes the
//! next word of the cursor page with generation `gen + 1`; when the page is
//! complete its `gen` is incremented and the cursor moves to the next page of
//! the slice (cycling). So at any time every page is entirely at `gen[p]`,
//! except the cursor page whose words before the cursor are at `gen + 1`.
//! Each period a CPU completes exactly its share of `tg.counter_dirty_pages`
//! pages: the loop stops writing once the share is done, and a burst
//! (`rep stosq`) completes the rest if the loop did fewer; then the CPU
//! verifies `tg.counter_verify_pages` pages of its slice in full, rotating
//! through it. Only the owner touches a slice and its metadata, so nothing
//! races. On stop, every CPU verifies its whole slice
//! (`tg.counter_final_check=1`, the default).

use crate::bootinfo::{BootInfo, MEM_RAM};
use crate::mptable::MAX_CPUS;
use crate::paging::MAX_PHYS;
use crate::{cpu, entry, interrupts, lapic, memtest, mptable, outln, smp};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
const MIB: u64 = 1 << 20;
/// Multiplier spreading page addresses over all 64 bits.
const PHI: u64 = 0x9E37_79B9_7F4A_7C15;
/// Multiplier of the generation.
const GEN_MUL: u64 = 0xD6E8_FEB8_6659_FD93;
/// "outboard".
const SALT: u64 = 0x6472_616f_6274_756f;

/// Content of every word of the page at address `page` at generation `g`:
/// different for every generation of a page (odd multiplier) and for pages
/// at different addresses with the same generation.
#[inline(always)]
fn value(page: u64, g: u32) -> u64 {
    page.wrapping_mul(PHI) ^ (g as u64).wrapping_add(1).wrapping_mul(GEN_MUL) ^ SALT
}

// Layout and settings, published by the BSP before GO.
static GO: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static CPUS: AtomicU32 = AtomicU32::new(1);
static REGION: AtomicU64 = AtomicU64::new(0);
static META: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU32 = AtomicU32::new(100);
static DIRTY_SHARE: AtomicU64 = AtomicU64::new(0);
static VERIFY: AtomicU64 = AtomicU64::new(0);
static FINAL_CHECK: AtomicBool = AtomicBool::new(true);
/// `tg.counter_corrupt` on an AP: the CPU number asked to corrupt a page.
static CORRUPT: AtomicU32 = AtomicU32::new(u32::MAX);

// Reports from the CPUs.
/// Pages verified so far (all CPUs, rotation only).
static VERIFIED: AtomicU64 = AtomicU64::new(0);
/// Pages verified by the final check.
static FINAL_PAGES: AtomicU64 = AtomicU64::new(0);
/// APs that filled their slice.
static READY: AtomicU32 = AtomicU32::new(0);
/// APs that finished their final check.
static DONE: AtomicU32 = AtomicU32::new(0);
/// Progress of each CPU (loop iterations, plus pages filled or checked).
static PROGRESS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Set by an AP when it stops (finished, or found a mismatch).
static AP_DONE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

// First mismatch found by an AP (the BSP reports it).
static FAIL_CLAIM: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicBool = AtomicBool::new(false);
static FAIL_CPU: AtomicU64 = AtomicU64::new(0);
static FAIL_PAGE: AtomicU64 = AtomicU64::new(0);
static FAIL_WORD: AtomicU64 = AtomicU64::new(0);
static FAIL_EXP: AtomicU64 = AtomicU64::new(0);
static FAIL_GOT: AtomicU64 = AtomicU64::new(0);
static FAIL_BAD: AtomicU64 = AtomicU64::new(0);
static FAIL_GEN: AtomicU64 = AtomicU64::new(0);

/// A page that does not hold what its owner last wrote.
#[derive(Clone, Copy)]
struct Mismatch {
    cpu: u64,
    page: u64,
    word: u64,
    expected: u64,
    got: u64,
    bad_words: u64,
    gen: u64,
}

impl Mismatch {
    /// Records an AP's mismatch for the BSP (first one wins).
    fn publish(&self) {
        if FAIL_CLAIM
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        FAIL_CPU.store(self.cpu, Ordering::Relaxed);
        FAIL_PAGE.store(self.page, Ordering::Relaxed);
        FAIL_WORD.store(self.word, Ordering::Relaxed);
        FAIL_EXP.store(self.expected, Ordering::Relaxed);
        FAIL_GOT.store(self.got, Ordering::Relaxed);
        FAIL_BAD.store(self.bad_words, Ordering::Relaxed);
        FAIL_GEN.store(self.gen, Ordering::Relaxed);
        FAILED.store(true, Ordering::Release);
    }

    fn published() -> Mismatch {
        Mismatch {
            cpu: FAIL_CPU.load(Ordering::Relaxed),
            page: FAIL_PAGE.load(Ordering::Relaxed),
            word: FAIL_WORD.load(Ordering::Relaxed),
            expected: FAIL_EXP.load(Ordering::Relaxed),
            got: FAIL_GOT.load(Ordering::Relaxed),
            bad_words: FAIL_BAD.load(Ordering::Relaxed),
            gen: FAIL_GEN.load(Ordering::Relaxed),
        }
    }

    /// BSP: prints the failure and powers off with status 1.
    fn report(&self, lines: u64) -> ! {
        outln!(
            "counter mismatch cpu={} page={:#x} word={} bad-words={}/{} gen={} lines={}",
            self.cpu,
            self.page,
            self.word,
            self.bad_words,
            WORDS,
            self.gen,
            lines
        );
        outln!(
            "counter FAIL page {:#x} expected {:#018x} got {:#018x}",
            self.page,
            self.expected,
            self.got
        );
        outln!("result FAIL counter-memory");
        cpu::power_off(1)
    }
}

/// Fills words `[from, WORDS)` of the page at `page` with `v` (`rep stosq`:
/// one instruction, cheap even where every instruction is emulated).
fn fill(page: u64, from: u64, v: u64) {
    if from >= WORDS {
        return;
    }
    // SAFETY: the page lies in the region (RAM, identity mapped, in this
    // CPU's slice); DF is clear (entry code, interrupt stubs and the ABI).
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") page + from * 8 => _,
            inout("rcx") WORDS - from => _,
            in("rax") v,
            options(nostack, preserves_flags)
        )
    };
}

/// Checks words `[from, to)` of `page` against `v` (`repe scasq`): the
/// index of the first word that differs.
fn scan(page: u64, from: u64, to: u64, v: u64) -> Option<u64> {
    if from >= to {
        return None;
    }
    let end: u64;
    let ne: u8;
    // SAFETY: reads inside the page (see `fill`); DF is clear.
    unsafe {
        core::arch::asm!(
            "repe scasq",
            "setne {ne}",
            ne = out(reg_byte) ne,
            inout("rdi") page + from * 8 => end,
            inout("rcx") to - from => _,
            in("rax") v,
            options(nostack, readonly)
        )
    };
    // On a mismatch RDI points past the differing word.
    (ne != 0).then(|| (end - 8 - page) / 8)
}

/// One CPU's view of its slice.
struct Worker {
    cpu: usize,
    /// Address of the slice's first page.
    base: u64,
    /// Generation of the slice's first page.
    gens: *mut u32,
    /// Pages in the slice.
    n: u64,
    /// Cursor: page index, address of the next word, end of that page, and
    /// the page's value at its next generation.
    cur_page: u64,
    cur: u64,
    cur_end: u64,
    val: u64,
    /// Next page to verify.
    verify_next: u64,
    /// Pages completed in this period.
    done: u64,
    /// Loop iterations (the BSP's is the printed counter).
    iters: u64,
    /// Iterations plus pages filled or checked outside the loop (PROGRESS).
    progress: u64,
}

impl Worker {
    fn new(cpu: usize) -> Worker {
        let cpus = CPUS.load(Ordering::Acquire) as u64;
        let pages = PAGES.load(Ordering::Relaxed);
        let first = pages * cpu as u64 / cpus;
        let end = pages * (cpu as u64 + 1) / cpus;
        let base = REGION.load(Ordering::Relaxed) + first * PAGE;
        let gens = (META.load(Ordering::Relaxed) + first * 4) as *mut u32;
        Worker {
            cpu,
            base,
            gens,
            n: end - first,
            cur_page: 0,
            cur: base,
            cur_end: base + PAGE,
            val: 0,
            verify_next: 0,
            done: 0,
            iters: 0,
            progress: 0,
        }
    }

    fn page_addr(&self, i: u64) -> u64 {
        self.base + i * PAGE
    }

    fn gen(&self, i: u64) -> u32 {
        // SAFETY: i < n: the metadata entry of a page of this CPU's slice.
        unsafe { read_volatile(self.gens.add(i as usize)) }
    }

    fn set_gen(&self, i: u64, g: u32) {
        // SAFETY: as in `gen`.
        unsafe { write_volatile(self.gens.add(i as usize), g) }
    }

    /// Writes generation 0 to the whole slice and puts the cursor at page 0.
    fn init(&mut self) {
        for i in 0..self.n {
            fill(self.page_addr(i), 0, value(self.page_addr(i), 0));
            self.set_gen(i, 0);
            self.bump(1);
        }
        self.cur_page = 0;
        self.cur = self.base;
        self.cur_end = self.base + PAGE;
        self.val = value(self.base, 1);
    }

    /// Publishes progress (for the BSP's stall watch).
    fn bump(&mut self, n: u64) {
        self.progress += n;
        PROGRESS[self.cpu].store(self.progress, Ordering::Relaxed);
    }

    /// The cursor page is complete: bump its generation, move on.
    fn page_done(&mut self) {
        let g = self.gen(self.cur_page).wrapping_add(1);
        self.set_gen(self.cur_page, g);
        self.cur_page += 1;
        if self.cur_page == self.n {
            self.cur_page = 0;
        }
        self.cur = self.page_addr(self.cur_page);
        self.cur_end = self.cur + PAGE;
        self.val = value(self.cur, self.gen(self.cur_page).wrapping_add(1));
        self.done += 1;
        self.bump(0);
    }

    /// The tight loop: one counter increment per iteration and, until
    /// `share` pages were completed this period, one word written at the
    /// cursor; runs until `period` ticks of `apic`'s timer passed since
    /// `last` (the dirty rate is thus `share` pages per period on any host).
    /// Returns the tick count seen.
    fn spin(&mut self, apic: u8, last: u32, period: u32, share: u64) -> u32 {
        loop {
            self.iters += 1;
            self.progress += 1;
            if self.done < share {
                let a = self.cur;
                // SAFETY: the cursor is inside the cursor page of this CPU's slice.
                unsafe { write_volatile(a as *mut u64, self.val) };
                self.cur = a + 8;
                if self.cur == self.cur_end {
                    self.page_done();
                }
            }
            let t = interrupts::ticks(apic);
            if t.wrapping_sub(last) >= period {
                return t;
            }
        }
    }

    /// Completes pages until `share` pages were completed this period.
    fn burst(&mut self, share: u64) {
        while self.done < share {
            let page = self.cur_end - PAGE;
            fill(page, (self.cur - page) / 8, self.val);
            self.cur = self.cur_end;
            self.page_done();
        }
        self.done = 0;
    }

    /// Verifies page `i` in full.
    fn check(&self, i: u64) -> Result<(), Mismatch> {
        let page = self.page_addr(i);
        let g = self.gen(i);
        let split = if i == self.cur_page {
            (self.cur - page) / 8
        } else {
            0
        };
        let bad = scan(page, 0, split, value(page, g.wrapping_add(1)))
            .or_else(|| scan(page, split, WORDS, value(page, g)));
        let Some(word) = bad else {
            return Ok(());
        };
        let expect = |w: u64| value(page, if w < split { g.wrapping_add(1) } else { g });
        let mut bad_words = 0;
        for w in 0..WORDS {
            // SAFETY: as in `fill`.
            if unsafe { read_volatile((page + w * 8) as *const u64) } != expect(w) {
                bad_words += 1;
            }
        }
        // SAFETY: as in `fill`.
        let got = unsafe { read_volatile((page + word * 8) as *const u64) };
        Err(Mismatch {
            cpu: self.cpu as u64,
            page,
            word,
            expected: expect(word),
            got,
            bad_words,
            gen: g as u64,
        })
    }

    /// Verifies the next `count` pages of the rotation.
    fn verify(&mut self, count: u64) -> Result<(), Mismatch> {
        for _ in 0..count.min(self.n) {
            let i = self.verify_next;
            self.verify_next = if i + 1 == self.n { 0 } else { i + 1 };
            self.check(i)?;
            VERIFIED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Verifies the whole slice.
    fn verify_all(&mut self) -> Result<(), Mismatch> {
        for i in 0..self.n {
            self.check(i)?;
            self.bump(1);
        }
        FINAL_PAGES.fetch_add(self.n, Ordering::Relaxed);
        Ok(())
    }

    /// Test hook: zeroes the page written just before the cursor page (not
    /// rewritten for a whole cycle of the slice) and makes it the next one
    /// to verify, as if the migration had lost it.
    fn corrupt(&mut self) -> u64 {
        let i = if self.cur_page == 0 {
            self.n - 1
        } else {
            self.cur_page - 1
        };
        let page = self.page_addr(i);
        for w in 0..WORDS {
            // SAFETY: as in `fill`.
            unsafe { write_volatile((page + w * 8) as *mut u64, 0) };
        }
        self.verify_next = i;
        page
    }
}

/// Rust code of an AP in the `counter` scenario (called by `smp::ap_main`
/// after its timer check, with the timer stopped). Never returns.
pub fn ap_main(cpu_num: usize) -> ! {
    let apic = lapic::id();
    lapic::start_timer(lapic::TIMER_COUNT_1MS);
    while !GO.load(Ordering::Acquire) {
        cpu::sti_hlt();
    }
    if cpu_num >= CPUS.load(Ordering::Acquire) as usize {
        lapic::stop_timer();
        cpu::halt_forever();
    }
    let period = PERIOD.load(Ordering::Relaxed);
    let share = DIRTY_SHARE.load(Ordering::Relaxed);
    let verify = VERIFY.load(Ordering::Relaxed);
    let mut w = Worker::new(cpu_num);
    w.init();
    READY.fetch_add(1, Ordering::Release);
    let mut last = interrupts::ticks(apic);
    loop {
        last = w.spin(apic, last, period, share);
        w.burst(share);
        let r = w.verify(verify);
        w.bump(0);
        if let Err(m) = r {
            m.publish();
        }
        if FAILED.load(Ordering::Acquire) {
            break;
        }
        if CORRUPT.load(Ordering::Acquire) == cpu_num as u32 {
            CORRUPT.store(u32::MAX, Ordering::Relaxed);
            let page = w.corrupt();
            outln!("counter corrupting page {:#x} of cpu {} (tg.counter_corrupt)", page, cpu_num);
        }
        if STOP.load(Ordering::Acquire) {
            if FINAL_CHECK.load(Ordering::Relaxed) {
                if let Err(m) = w.verify_all() {
                    m.publish();
                    break;
                }
            }
            DONE.fetch_add(1, Ordering::Release);
            break;
        }
    }
    AP_DONE[cpu_num].store(true, Ordering::Release);
    lapic::stop_timer();
    cpu::halt_forever()
}

fn fail(reason: &str) -> ! {
    outln!("result FAIL {}", reason);
    cpu::power_off(1)
}

/// Watches the APs: each must make progress (loop iterations, pages filled
/// or checked) and see ticks of its own timer; `limit` BSP ticks without
/// either means stalled (0 = no watch). APs that finished are skipped.
struct Watch {
    aps: usize,
    limit: u32,
    progress: [u64; MAX_CPUS],
    ticks: [u32; MAX_CPUS],
    progress_since: [u32; MAX_CPUS],
    ticks_since: [u32; MAX_CPUS],
}

impl Watch {
    fn new(aps: usize, limit: u32, now: u32) -> Watch {
        let mut w = Watch {
            aps,
            limit,
            progress: [0; MAX_CPUS],
            ticks: [0; MAX_CPUS],
            progress_since: [now; MAX_CPUS],
            ticks_since: [now; MAX_CPUS],
        };
        for (c, p) in PROGRESS.iter().enumerate().take(aps + 1).skip(1) {
            w.progress[c] = p.load(Ordering::Relaxed);
            w.ticks[c] = interrupts::ticks(smp::cpu_apic(c));
        }
        w
    }

    /// Fails the scenario if an AP is stalled at BSP tick `now`.
    fn check(&mut self, now: u32) {
        if self.limit == 0 {
            return;
        }
        for c in 1..=self.aps {
            if AP_DONE[c].load(Ordering::Acquire) {
                continue;
            }
            let p = PROGRESS[c].load(Ordering::Relaxed);
            let t = interrupts::ticks(smp::cpu_apic(c));
            if p != self.progress[c] {
                self.progress[c] = p;
                self.progress_since[c] = now;
            }
            if t != self.ticks[c] {
                self.ticks[c] = t;
                self.ticks_since[c] = now;
            }
            let stuck = |since: u32| now.wrapping_sub(since) >= self.limit;
            if stuck(self.progress_since[c]) || stuck(self.ticks_since[c]) {
                outln!(
                    "counter FAIL cpu {} (apic {}) stalled: {} unchanged for {} ms (iterations={} timer-ticks={})",
                    c,
                    smp::cpu_apic(c),
                    if stuck(self.progress_since[c]) { "progress" } else { "timer" },
                    self.limit,
                    p,
                    t
                );
                fail("counter-ap-stalled");
            }
        }
    }
}

/// The `counter` scenario on the BSP.
pub fn run(bi: &BootInfo, cr3: u64) -> ! {
    let want_cpus = bi.param_u64("tg.cpus").unwrap_or(1);
    let region_mib = bi.param_u64("tg.counter_region_mib").unwrap_or(8);
    let period = bi.param_u64("tg.counter_ms").unwrap_or(100).clamp(1, 1 << 30) as u32;
    let stop = bi.param_u64("tg.counter_stop").unwrap_or(0);
    let dirty = bi.param_u64("tg.counter_dirty_pages").unwrap_or(64);
    let verify = bi.param_u64("tg.counter_verify_pages").unwrap_or(16);
    let final_check = bi.param_u64("tg.counter_final_check").unwrap_or(1) != 0;
    let stall_ms = bi.param_u64("tg.counter_stall_ms").unwrap_or(5000).min(1 << 30) as u32;
    let corrupt_at = bi.param_u64("tg.counter_corrupt").unwrap_or(0);
    let corrupt_cpu = bi.param_u64("tg.counter_corrupt_cpu").unwrap_or(0);

    if let Some(e) = bi.error {
        outln!("bootinfo error={}", e);
        fail("bootinfo");
    }
    if want_cpus == 0 || want_cpus > MAX_CPUS as u64 {
        outln!("counter bad tg.cpus={} (1..{})", want_cpus, MAX_CPUS);
        fail("counter-config");
    }
    if region_mib == 0 || region_mib > MAX_PHYS / MIB {
        outln!("counter bad tg.counter_region_mib={}", region_mib);
        fail("counter-config");
    }
    let map = bi.memmap();
    let mem = memtest::summary(map);
    if let Some(m) = bi.param_u64("tg.mem_mib") {
        let want = m.saturating_mul(MIB);
        if mem.ram > want || mem.ram.saturating_add(MIB) < want {
            outln!("counter mem ram={} tg.mem_mib={}", mem.ram, m);
            fail("mem_mib");
        }
    }

    // Metadata (one u32 per page, page aligned) then the region, in the first
    // RAM region above the image (and 1 MiB) where both fit.
    let bytes = region_mib * MIB;
    let pages = bytes / PAGE;
    let meta_bytes = (pages * 4).div_ceil(PAGE) * PAGE;
    let low = entry::image_end().max(MIB);
    let mut place = None;
    for r in map.iter().filter(|r| r.kind == MEM_RAM) {
        let start = r.addr.max(low).div_ceil(PAGE) * PAGE;
        let end = r.end().min(MAX_PHYS);
        if start
            .checked_add(meta_bytes + bytes)
            .is_some_and(|e| e <= end)
        {
            place = Some(start);
            break;
        }
    }
    let Some(meta) = place else {
        outln!(
            "counter region of {} MiB (+{} KiB metadata) does not fit in RAM above {:#x} (ram={})",
            region_mib,
            meta_bytes / 1024,
            low,
            mem.ram
        );
        fail("counter-region");
    };
    let region = meta + meta_bytes;

    // Timer on the BSP.
    lapic::enable();
    let bsp = lapic::id();
    smp::set_bsp(bsp);
    lapic::start_timer(lapic::TIMER_COUNT_1MS);
    cpu::sti();
    if let Err(e) = crate::scenario::check_timer(bsp) {
        outln!("timer error={}", e);
        fail("timer");
    }

    // Secondary CPUs, only if asked for.
    let mut aps = 0u32;
    if want_cpus > 1 {
        let mp = mptable::probe();
        if let Some(e) = mp.error {
            outln!("mptable error={}", e);
            fail("mptable");
        }
        outln!("cpu 0 (apic {}) online", bsp);
        smp::AP_COUNTER.store(true, Ordering::SeqCst);
        aps = smp::start_aps(&mp, cr3);
        let ok = smp::wait_ap_timers(aps);
        outln!("cpus expected={} online={}", want_cpus, 1 + aps);
        if 1 + aps as u64 != want_cpus {
            fail("cpus");
        }
        if ok != aps {
            outln!("ap-timers ok={}", ok);
            fail("ap-timers");
        }
    }
    let cpus = 1 + aps as u64;
    let share = dirty.div_ceil(cpus);
    if corrupt_cpu >= cpus {
        outln!("counter bad tg.counter_corrupt_cpu={} (cpus={})", corrupt_cpu, cpus);
        fail("counter-config");
    }

    outln!(
        "counter region={:#x} bytes={} pages={} meta={:#x} ram={} cpus={} period_ms={} dirty_pages={} verify_pages={} stop={}",
        region,
        bytes,
        pages,
        meta,
        mem.ram,
        cpus,
        period,
        dirty,
        verify,
        stop
    );

    CPUS.store(cpus as u32, Ordering::Relaxed);
    REGION.store(region, Ordering::Relaxed);
    META.store(meta, Ordering::Relaxed);
    PAGES.store(pages, Ordering::Relaxed);
    PERIOD.store(period, Ordering::Relaxed);
    DIRTY_SHARE.store(share, Ordering::Relaxed);
    VERIFY.store(verify, Ordering::Relaxed);
    FINAL_CHECK.store(final_check, Ordering::Relaxed);
    GO.store(true, Ordering::Release);

    let t0 = interrupts::ticks(bsp);
    let mut w = Worker::new(0);
    w.init();
    let mut watch = Watch::new(aps as usize, stall_ms, interrupts::ticks(bsp));
    while READY.load(Ordering::Acquire) < aps {
        watch.check(interrupts::ticks(bsp));
        cpu::sti_hlt();
    }
    outln!(
        "counter filled pages={} in {} ticks",
        pages,
        interrupts::ticks(bsp).wrapping_sub(t0)
    );

    let mut seq = 0u64;
    let mut last = interrupts::ticks(bsp);
    let mut watch = Watch::new(aps as usize, stall_ms, last);
    loop {
        last = w.spin(bsp, last, period, share);
        w.burst(share);
        if let Err(m) = w.verify(verify) {
            m.report(seq);
        }
        if FAILED.load(Ordering::Acquire) {
            Mismatch::published().report(seq);
        }
        watch.check(interrupts::ticks(bsp));
        outln!(
            "counter seq={} value={} ticks={} verified={} ok",
            seq,
            w.iters,
            last,
            VERIFIED.load(Ordering::Relaxed)
        );
        seq += 1;
        if corrupt_at != 0 && seq == corrupt_at {
            if corrupt_cpu == 0 {
                let page = w.corrupt();
                outln!("counter corrupting page {:#x} of cpu 0 (tg.counter_corrupt)", page);
            } else {
                CORRUPT.store(corrupt_cpu as u32, Ordering::Release);
            }
        }
        if stop != 0 && seq >= stop {
            break;
        }
    }

    // Stop: every CPU verifies its whole slice.
    STOP.store(true, Ordering::Release);
    if final_check {
        if let Err(m) = w.verify_all() {
            m.report(seq);
        }
    }
    let mut watch = Watch::new(aps as usize, stall_ms, interrupts::ticks(bsp));
    while DONE.load(Ordering::Acquire) < aps {
        if FAILED.load(Ordering::Acquire) {
            Mismatch::published().report(seq);
        }
        watch.check(interrupts::ticks(bsp));
        cpu::sti_hlt();
    }
    if FAILED.load(Ordering::Acquire) {
        Mismatch::published().report(seq);
    }
    outln!(
        "counter done lines={} value={} ticks={} verified={} final-verified={} ok",
        seq,
        w.iters,
        interrupts::ticks(bsp),
        VERIFIED.load(Ordering::Relaxed),
        FINAL_PAGES.load(Ordering::Relaxed)
    );
    outln!("result PASS");
    cpu::power_off(0)
}
