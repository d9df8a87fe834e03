//! Scenarios selected by `tg.scenario=NAME` (default `boot`): hello, boot,
//! demo, exit, reset, triple-fault, bad-insn, exception, hang, blk, pci-fuzz,
//! counter.

use crate::bootinfo::BootInfo;
use crate::{cpu, entry, interrupts, lapic, memtest, mptable, outln, paging, smp};
use core::fmt;

/// Displays bytes as ASCII, `?` for anything else.
struct Bytes<'a>(&'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            fmt::Write::write_char(
                f,
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '?'
                },
            )?;
        }
        Ok(())
    }
}

const MIB: u64 = 1 << 20;

/// Failure reasons collected by `boot`/`demo`, printed comma-separated.
struct Fails {
    list: [&'static str; 8],
    n: usize,
}

impl Fails {
    fn add(&mut self, reason: &'static str) {
        if self.n < self.list.len() && !self.list[..self.n].contains(&reason) {
            self.list[self.n] = reason;
            self.n += 1;
        }
    }
}

impl fmt::Display for Fails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.list[..self.n].iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(r)?;
        }
        Ok(())
    }
}

/// Runs the scenario named on the command line.
pub fn run(bi: &'static BootInfo) -> ! {
    let name = bi.param("tg.scenario").unwrap_or(b"boot");
    // Scenarios that must be fast run before any setup.
    match name {
        b"hello" => {
            outln!("hello");
            cpu::power_off(0)
        }
        b"exit" => {
            let status = (bi.param_u64("tg.status").unwrap_or(0) & 0xff) as u8;
            outln!("exit status={}", status);
            cpu::power_off(status)
        }
        _ => {}
    }

    // SAFETY: BSP, once, before any AP runs; the image lies below image_end.
    let cr3 = unsafe { paging::init(bi.memmap(), entry::image_end()) };
    // SAFETY: no CPU has loaded the IDT yet.
    unsafe { interrupts::init() };
    interrupts::load();
    cpu::mask_pic();

    match name {
        b"boot" => checks(bi, cr3, false),
        b"demo" => checks(bi, cr3, true),
        b"blk" => crate::blk::run(bi),
        b"pci-fuzz" => crate::pci_fuzz::run(bi),
        b"counter" => crate::counter::run(bi, cr3),
        b"reset" => {
            outln!("reset: pulsing the i8042 reset line (port 0x64, 0xfe)");
            cpu::i8042_reset();
            // A VMM acts on the port write before resuming the vCPU; QEMU soon
            // after. Getting past this short wait means the reset was ignored.
            for _ in 0..100_000 {
                cpu::pause();
            }
            outln!("result FAIL reset-ignored");
            cpu::power_off(1)
        }
        b"triple-fault" => {
            outln!("triple-fault: empty IDT, then ud2");
            interrupts::triple_fault()
        }
        b"bad-insn" => {
            outln!("bad-insn: popcnt rax, rcx (KVM's emulator cannot run it)");
            // SAFETY: popcnt rax, rcx (F3 48 0F B8 C1), encoded by hand because the
            // target has no popcnt feature; it only clobbers rax and flags.
            unsafe {
                core::arch::asm!(".byte 0xf3, 0x48, 0x0f, 0xb8, 0xc1", out("rax") _, in("rcx") 0x5au64, options(nomem, nostack))
            };
            outln!("result FAIL bad-insn-executed");
            cpu::power_off(1)
        }
        b"exception" => {
            outln!("exception: ud2 with the normal IDT (expect vector=6)");
            // SAFETY: raises #UD, which the IDT reports as a fatal exception.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
        }
        b"hang" => {
            outln!("hang: halting forever with interrupts on");
            loop {
                cpu::sti_hlt();
            }
        }
        other => {
            outln!("unknown scenario \"{}\"", Bytes(other));
            outln!("result FAIL unknown-scenario");
            cpu::power_off(1)
        }
    }
}

/// Spins until the first BSP timer tick; detects a timer that does not count
/// or whose interrupt never arrives (watching the current-count register).
pub(crate) fn check_timer(apic: u8) -> Result<(), &'static str> {
    let start = interrupts::ticks(apic);
    let mut last = lapic::timer_current();
    let (mut reloads, mut still) = (0u32, 0u32);
    loop {
        if interrupts::ticks(apic) != start {
            return Ok(());
        }
        let c = lapic::timer_current();
        if c > last {
            reloads += 1;
            if reloads >= 50 {
                return Err("no-interrupt");
            }
        }
        if c == last {
            still += 1;
            if still >= 1_000_000 {
                return Err("not-counting");
            }
        } else {
            still = 0;
        }
        last = c;
        cpu::pause();
    }
}

fn finish(fails: &Fails, human: bool) -> ! {
    if fails.n == 0 {
        if human {
            outln!("all checks passed, powering off");
        }
        outln!("result PASS");
        cpu::power_off(0)
    }
    outln!("result FAIL {}", fails);
    cpu::power_off(1)
}

/// The `boot` scenario (`human` = false) and its friendlier twin `demo`.
fn checks(bi: &BootInfo, cr3: u64, human: bool) -> ! {
    let mut fails = Fails {
        list: [""; 8],
        n: 0,
    };
    let map = bi.memmap();
    let mem = memtest::summary(map);

    if human {
        outln!("------------------------------------------------------------");
        outln!("Outboard test guest: a tiny x86-64 kernel, no Linux inside");
        outln!("------------------------------------------------------------");
        let how = match bi.entry {
            crate::bootinfo::Entry::Linux64 => "the Linux 64-bit boot protocol",
            crate::bootinfo::Entry::Pvh => "the PVH entry point",
        };
        outln!("booted through {}", how);
        outln!("command line: \"{}\"", Bytes(bi.cmdline()));
        outln!(
            "memory: {} MiB of RAM in {} region(s), top at {:#x}",
            mem.ram / MIB,
            mem.regions,
            mem.top
        );
    } else {
        outln!(
            "boot entry={} cmdline=\"{}\"",
            bi.entry.name(),
            Bytes(bi.cmdline())
        );
        outln!(
            "mem ram={} top={:#x} regions={}",
            mem.ram,
            mem.top,
            mem.regions
        );
    }
    if let Some(e) = bi.error {
        outln!("bootinfo error={}", e);
        fails.add("bootinfo");
    }
    if let Some(m) = bi.param_u64("tg.mem_mib") {
        let want = m.saturating_mul(MIB);
        if mem.ram > want || mem.ram.saturating_add(MIB) < want {
            fails.add("mem_mib");
        }
    }

    let low = entry::image_end().max(MIB);
    // SAFETY: RAM is mapped by paging::init; below `low` are the image, low memory
    // and the (already copied) boot structures; nothing above is in use.
    let (covered, res) = unsafe { memtest::run(map, low) };
    match res {
        Ok(()) if human => outln!("memory: checked {} MiB (2 MiB stride): ok", covered / MIB),
        Ok(()) => outln!("mem checked={} ok", covered),
        Err(a) => {
            outln!("mem checked={} FAIL at {:#x}", covered, a);
            fails.add("memory");
        }
    }

    // Timer on the BSP; needed by every wait below.
    lapic::enable();
    let bsp = lapic::id();
    smp::set_bsp(bsp);
    lapic::start_timer(lapic::TIMER_COUNT_1MS);
    cpu::sti();
    if let Err(e) = check_timer(bsp) {
        outln!("timer error={}", e);
        fails.add("timer");
        finish(&fails, human);
    }

    // Secondary CPUs.
    let mp = mptable::probe();
    if let Some(e) = mp.error {
        outln!("mptable error={}", e);
        fails.add("mptable");
    }
    let expected = if mp.found && mp.count > 0 {
        mp.count as u32
    } else {
        1
    };
    outln!("cpu 0 (apic {}) online", bsp);
    let aps = smp::start_aps(&mp, cr3);
    let online = 1 + aps;
    if human {
        outln!("cpus: {} of {} online", online, expected);
    } else {
        outln!("cpus expected={} online={}", expected, online);
    }
    if online != expected {
        fails.add("cpus");
    }
    if let Some(n) = bi.param_u64("tg.cpus") {
        if online as u64 != n {
            fails.add("cpus");
        }
    }

    // BSP timer ticks.
    let want = bi.param_u64("tg.ticks").unwrap_or(10).min(100_000) as u32;
    let start = interrupts::ticks(bsp);
    smp::wait_ticks_until(want, || false);
    let got = interrupts::ticks(bsp).wrapping_sub(start);
    if human {
        outln!("timer: {} local APIC timer ticks (about {} ms)", got, got);
    } else {
        outln!("timer ticks={}", got);
    }
    if got < want {
        fails.add("timer");
    }

    // Each AP saw a tick of its own timer.
    let ok = smp::wait_ap_timers(aps);
    if human {
        outln!(
            "timer: {} of {} secondary CPUs saw their own timer tick",
            ok,
            aps
        );
        if online > 1 {
            outln!(
                "cpu 0 is apic {}, cpu {} is apic {}",
                smp::cpu_apic(0),
                online - 1,
                smp::cpu_apic(online as usize - 1)
            );
        }
    } else {
        outln!("ap-timers ok={}", ok);
    }
    if ok != aps {
        fails.add("ap-timers");
    }
    if human {
        outln!("------------------------------------------------------------");
    }
    finish(&fails, human)
}
