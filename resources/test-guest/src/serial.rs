//! Polled 16550 output on COM1 (0x3f8) and the `outln!` macro: every line is
//! prefixed with `outboard-tg: ` and ends with `\r\n`. A spinlock keeps lines
//! from different CPUs whole.

use crate::cpu;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;
/// Upper bound on LSR polls per byte, so a missing UART cannot hang the guest.
const MAX_POLLS: u32 = 100_000;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes one byte, waiting (bounded) for the transmitter holding register.
fn put_byte(b: u8) {
    let mut polls = 0;
    while cpu::inb(LSR) & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
        polls += 1;
        cpu::pause();
    }
    cpu::outb(COM1, b);
}

/// Holds the output lock for one line; the line ends when it is dropped.
pub struct Line(());

impl Line {
    /// Takes the lock and writes the `outboard-tg: ` prefix.
    pub fn begin() -> Line {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            cpu::pause();
        }
        let mut l = Line(());
        l.raw(b"outboard-tg: ");
        l
    }

    /// Like `begin`, but takes the lock by force after a bounded wait (used by
    /// the exception path, which may interrupt a line in progress).
    pub fn begin_forced() -> Line {
        let mut tries = 0u32;
        let mut forced = false;
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            tries += 1;
            if tries > 200_000 {
                forced = true;
                break;
            }
            cpu::pause();
        }
        let mut l = Line(());
        if forced {
            // End whatever line was cut off.
            l.raw(b"\r\n");
        }
        l.raw(b"outboard-tg: ");
        l
    }

    /// Writes bytes as they are.
    pub fn raw(&mut self, s: &[u8]) {
        for &b in s {
            put_byte(b);
        }
    }

    /// Writes bytes, replacing control and non-ASCII bytes with `?`.
    pub fn sanitized(&mut self, s: &[u8]) {
        for &b in s {
            put_byte(if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.sanitized(s.as_bytes());
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.raw(b"\r\n");
        LOCK.store(false, Ordering::Release);
    }
}

/// Prints one `outboard-tg: ...` line.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::serial::Line::begin();
        let _ = write!(line, $($arg)*);
    }};
}
