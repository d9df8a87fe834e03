//! The vCPU thread: runs `KVM_RUN`, dispatches port and MMIO exits to the
//! buses, and turns the exits that end the guest into a [`StopReason`].
//!
//! Stopping: the VMM sets the shared stop flag and signals the thread with
//! [`kick_signal`]. The handler sets `kvm_run.immediate_exit`, so the kick
//! is not lost even when it lands between the flag check and the next
//! `KVM_RUN`: that `KVM_RUN` returns `EINTR` at once and the flag is read
//! again (Firecracker's scheme).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot;
use crate::cpu::state::VcpuState;
use crate::legacy::{PortBus, StopReason};
use crate::memory::GuestRam;
use crate::mmio::MmioBus;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run.immediate_exit` byte, null elsewhere.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the handler for [`kick_signal`]; call once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        IMMEDIATE_EXIT.with(|p| {
            let p = p.get();
            if !p.is_null() {
                // SAFETY: p points into this thread's kvm_run mapping, which
                // lives as long as the thread's VcpuFd; it is cleared before
                // the VcpuFd is dropped. A volatile byte store is
                // async-signal-safe.
                unsafe { std::ptr::write_volatile(p, 1) };
            }
        });
    }
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Pausing the vCPUs and, while they are paused, asking each for its
/// state (the thread that owns a vCPU saves it). The VMM requests a pause,
/// kicks every vCPU thread out of `KVM_RUN`, and waits until all are
/// parked.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
}

struct ControlState {
    pause: bool,
    parked: Vec<bool>,
    save_requested: Vec<bool>,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

impl VcpuControl {
    /// Control for `vcpus` vCPUs, running.
    pub fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                pause: false,
                parked: vec![false; vcpus],
                save_requested: vec![false; vcpus],
                saved: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks every vCPU to park at its next exit (kick them to make it
    /// soon).
    pub fn request_pause(&self) {
        self.lock().pause = true;
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.lock().pause
    }

    /// Waits until every vCPU is parked; false after `timeout`.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !s.parked.iter().all(|p| *p) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Asks every parked vCPU for its state and waits for all of them.
    pub fn save_all(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if !s.pause || !s.parked.iter().all(|p| *p) {
            return Err("the vCPUs are not paused".into());
        }
        s.save_requested.fill(true);
        s.saved.iter_mut().for_each(|r| *r = None);
        self.cv.notify_all();
        while s.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("a vCPU did not save its state in time".into());
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.saved
            .iter_mut()
            .map(|r| r.take().unwrap_or_else(|| Err("no state".into())))
            .collect()
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        self.cv.notify_all();
    }

    /// Wakes parked vCPUs so they notice a stop.
    pub fn wake(&self) {
        let _s = self.lock();
        self.cv.notify_all();
    }

    /// Called by vCPU thread `index`: parks until resumed or stopped,
    /// saving its state when asked.
    fn park(&self, index: usize, vcpu: &VcpuFd, msrs: &[u32], stop: &AtomicBool) {
        let mut s = self.lock();
        if let Some(p) = s.parked.get_mut(index) {
            *p = true;
        }
        self.cv.notify_all();
        while s.pause && !stop.load(Ordering::Acquire) {
            if s.save_requested.get(index).copied().unwrap_or(false) {
                if let Some(r) = s.save_requested.get_mut(index) {
                    *r = false;
                }
                let saved = VcpuState::save(vcpu, msrs).map_err(|e| format!("vCPU {index}: {e}"));
                if let Some(slot) = s.saved.get_mut(index) {
                    *slot = Some(saved);
                }
                self.cv.notify_all();
                continue;
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if let Some(p) = s.parked.get_mut(index) {
            *p = false;
        }
    }
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// Index (and APIC id) of the vCPU.
    pub index: u8,
    /// Legacy port devices.
    pub ports: Arc<PortBus>,
    /// MMIO devices.
    pub mmio: Arc<MmioBus>,
    /// Guest memory, for reading instruction bytes in error reports.
    pub ram: Arc<GuestRam>,
    /// Where to report why the guest stopped.
    pub stop_tx: Sender<StopReason>,
    /// Set by the VMM when every vCPU must leave.
    pub stop: Arc<AtomicBool>,
    /// Print the CLOCK_MONOTONIC time of the first `KVM_RUN` on stderr
    /// (`OUTBOARD_BOOT_TRACE`), for the boot-time benchmark.
    pub trace_first_run: bool,
    /// Pause and state requests.
    pub control: Arc<VcpuControl>,
    /// The MSRs to save.
    pub msrs: Arc<Vec<u32>>,
}

/// CLOCK_MONOTONIC in nanoseconds (the clock `std::time::Instant` uses).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `vcpu` until the VM stops or the guest ends; reports the end on
/// `ctx.stop_tx`.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    // If this thread dies by a panic, say so instead of leaving the VMM
    // waiting for a stop reason that never comes.
    struct PanicGuard<'a>(&'a VcpuContext);
    impl Drop for PanicGuard<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = self.0.stop_tx.send(StopReason::Failure(format!(
                    "vCPU {} thread panicked",
                    self.0.index
                )));
            }
        }
    }
    let _guard = PanicGuard(&ctx);
    // Lets the kick handler reach this vCPU's immediate_exit; cleared again
    // on every way out of this function, before `vcpu` is dropped.
    struct ImmediateExitRegistration;
    impl Drop for ImmediateExitRegistration {
        fn drop(&mut self) {
            IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        }
    }
    IMMEDIATE_EXIT.with(|p| p.set(&mut vcpu.get_kvm_run().immediate_exit as *mut u8));
    let _registration = ImmediateExitRegistration;
    if ctx.trace_first_run {
        eprintln!(
            "outboard: boot-trace first-kvm-run monotonic_ns={}",
            monotonic_ns()
        );
    }
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        if ctx.control.pause_requested() {
            ctx.control
                .park(usize::from(ctx.index), &vcpu, &ctx.msrs, &ctx.stop);
            continue;
        }
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(StopReason::Failure(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                ctx.index
            ))),
        };
        let Some(reason) = outcome else { continue };
        let reason = match reason {
            StopReason::Failure(msg) => {
                StopReason::Failure(describe_failure(&msg, &mut vcpu, &ctx))
            }
            r => r,
        };
        let _ = ctx.stop_tx.send(reason);
        return;
    }
}

/// Handles one exit; `Some` when the guest cannot go on.
fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.ports.read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            ctx.ports.write(port, data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt => {
            // With the in-kernel LAPIC a halt is handled by KVM; a halt that
            // reaches us means interrupts can never wake the vCPU.
            Some(StopReason::Failure(format!(
                "vCPU {} halted with no way to wake",
                ctx.index
            )))
        }
        VcpuExit::Shutdown => Some(StopReason::Failure(format!(
            "vCPU {}: guest triple fault (KVM_EXIT_SHUTDOWN)",
            ctx.index
        ))),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Some(StopReason::Reset),
            other => Some(StopReason::Failure(format!(
                "vCPU {}: unexpected KVM system event {other}",
                ctx.index
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(StopReason::Failure(format!(
            "vCPU {}: KVM entry failed (hardware reason {reason:#x} on host cpu {cpu})",
            ctx.index
        ))),
        VcpuExit::InternalError => Some(StopReason::Failure(format!(
            "vCPU {}: KVM internal error",
            ctx.index
        ))),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        other => Some(StopReason::Failure(format!(
            "vCPU {}: unexpected exit {other:?}",
            ctx.index
        ))),
    }
}

/// Adds what KVM can tell about the failure: the internal-error suberror,
/// RIP, and the instruction bytes there.
fn describe_failure(msg: &str, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> String {
    let mut out = msg.to_string();
    let run = vcpu.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: exit_reason says the `internal` member of the union is the
        // one KVM filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
            "instruction emulation failed".to_string()
        } else {
            format!("suberror {}", internal.suberror)
        };
        out.push_str(&format!(": {what}"));
    }
    if let Ok(regs) = vcpu.get_regs() {
        out.push_str(&format!(" at rip={:#x}", regs.rip));
        let gpa = vcpu
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
            .unwrap_or(regs.rip);
        if let Some(bytes) = boot::read_bytes(&ctx.ram, gpa, 15) {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!(" (instruction bytes: {})", hex.join(" ")));
        }
    }
    out
}
