//! The VMM's own legacy port-I/O devices: the 16550 serial console on 0x3f8
//! (IRQ 4), the i8042 controller's reset line on 0x60/0x64, and the
//! debug-exit port 0xf4 through which a guest powers off with a status.
//! Unclaimed ports read as all ones and ignore writes.

use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use outboard_transport::pci::bus::{CONFIG_ADDRESS_PORT, CONFIG_PORTS};
use outboard_transport::pci::PciRoot;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's ISA IRQ (and GSI).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command/status port is 4 above.
pub const I8042_PORT: u16 = 0x60;
/// Debug-exit port: a write of value `v` powers the VM off with status `v`
/// (the port QEMU's `isa-debug-exit` uses, with the status passed as is).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Why the guest stopped, as a device or vCPU reports it to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off with this status (debug-exit port).
    PowerOff(u8),
    /// The guest asked for a reset (i8042, or a KVM system event): its way
    /// of shutting down on a microVM.
    Reset,
    /// The guest or a vCPU failed; the message says how.
    Failure(String),
    /// The VMM received this signal (SIGINT, SIGTERM) and stopped the guest.
    Signal(i32),
    /// The guest was migrated and runs on the destination now.
    MigratedAway,
}

/// Sends a [`StopReason`] when triggered (the i8042 reset line).
pub(crate) struct StopTrigger {
    tx: Mutex<Sender<StopReason>>,
    reason: StopReason,
}

impl StopTrigger {
    /// A trigger that sends `reason` on `tx`.
    pub(crate) fn new(tx: Sender<StopReason>, reason: StopReason) -> Self {
        StopTrigger {
            tx: Mutex::new(tx),
            reason,
        }
    }
}

impl Trigger for StopTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        let tx = self
            .tx
            .lock()
            .map_err(|_| io::Error::other("stop channel lock poisoned"))?;
        // The receiver may be gone while the VMM is already stopping.
        let _ = tx.send(self.reason.clone());
        Ok(())
    }
}

/// An EventFd that raises an interrupt through KVM's irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console: a 16550 whose interrupt is an irqfd.
pub type SerialConsole = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The port-I/O bus of the legacy devices. vCPU threads call it on every
/// port exit; each device has its own lock.
pub struct PortBus {
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Mutex<I8042Device<StopTrigger>>,
    stop: Mutex<Sender<StopReason>>,
    serial_error_logged: std::sync::atomic::AtomicBool,
    pci: Option<Arc<Mutex<PciRoot>>>,
}

impl PortBus {
    /// A bus with `serial` on COM1 and stop events sent on `stop`.
    pub fn new(serial: Arc<Mutex<SerialConsole>>, stop: Sender<StopReason>) -> Self {
        PortBus {
            serial,
            i8042: Mutex::new(I8042Device::new(StopTrigger::new(
                stop.clone(),
                StopReason::Reset,
            ))),
            stop: Mutex::new(stop),
            serial_error_logged: std::sync::atomic::AtomicBool::new(false),
            pci: None,
        }
    }

    /// Adds PCI configuration mechanism #1 (ports 0xCF8..0xCFF) for `root`.
    pub fn with_pci(mut self, root: Arc<Mutex<PciRoot>>) -> Self {
        self.pci = Some(root);
        self
    }

    fn pci_port(&self, port: u16) -> Option<(&Arc<Mutex<PciRoot>>, u16)> {
        let offset = port
            .checked_sub(CONFIG_ADDRESS_PORT)
            .filter(|o| *o < CONFIG_PORTS)?;
        self.pci.as_ref().map(|r| (r, offset))
    }

    /// Handles an `in` of `data.len()` bytes from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((root, offset)) = self.pci_port(port) {
            outboard_transport::pci::bus::config_port_read(root, offset, data);
            return;
        }
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                if let (Ok(mut s), Some(first)) = (self.serial.lock(), data.first_mut()) {
                    *first = s.read((p - SERIAL_PORT) as u8);
                }
            }
            p if p == I8042_PORT || p == I8042_PORT + 4 => {
                if let (Ok(mut k), Some(first)) = (self.i8042.lock(), data.first_mut()) {
                    *first = k.read((p - I8042_PORT) as u8);
                }
            }
            _ => {}
        }
    }

    /// Handles an `out` of `data` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((root, offset)) = self.pci_port(port) {
            outboard_transport::pci::bus::config_port_write(root, offset, data);
            return;
        }
        let Some(&value) = data.first() else { return };
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    if let Err(e) = s.write((p - SERIAL_PORT) as u8, value) {
                        // Once: a closed stdout must not turn every guest
                        // byte into a log line.
                        use std::sync::atomic::Ordering;
                        if !self.serial_error_logged.swap(true, Ordering::Relaxed) {
                            log::warn!("serial console output failed, output is lost: {e:?}");
                        }
                    }
                }
            }
            p if p == I8042_PORT || p == I8042_PORT + 4 => {
                if let Ok(mut k) = self.i8042.lock() {
                    if let Err(e) = k.write((p - I8042_PORT) as u8, value) {
                        log::warn!("i8042: {e}");
                    }
                }
            }
            DEBUG_EXIT_PORT => {
                if let Ok(tx) = self.stop.lock() {
                    let _ = tx.send(StopReason::PowerOff(value));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn bus() -> (
        PortBus,
        Arc<Mutex<Vec<u8>>>,
        std::sync::mpsc::Receiver<StopReason>,
    ) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let serial = Serial::new(
            IrqTrigger(EventFd::new(0).unwrap()),
            Box::new(Shared(out.clone())) as Box<dyn Write + Send>,
        );
        let (tx, rx) = channel();
        (PortBus::new(Arc::new(Mutex::new(serial)), tx), out, rx)
    }

    #[test]
    fn serial_output_reaches_the_sink() {
        let (bus, out, _rx) = bus();
        for b in b"hi" {
            bus.write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(&*out.lock().unwrap(), b"hi");
    }

    #[test]
    fn debug_exit_and_reset_stop_the_vm() {
        let (bus, _out, rx) = bus();
        bus.write(DEBUG_EXIT_PORT, &[7]);
        assert_eq!(rx.try_recv().unwrap(), StopReason::PowerOff(7));
        bus.write(I8042_PORT + 4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), StopReason::Reset);
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_empty_accesses_are_harmless() {
        let (bus, _out, rx) = bus();
        let mut d = [0u8; 4];
        bus.read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.write(DEBUG_EXIT_PORT, &[]);
        bus.read(SERIAL_PORT, &mut []);
        assert!(rx.try_recv().is_err());
    }
}
