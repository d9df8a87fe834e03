//! MSI-X delivery: the eventfd the client gave for each vector, and which
//! vector each queue (and configuration changes) signals.
//!
//! The VMM emulates MSI-X itself (table, masking, pending bits): the
//! function signals a vector's eventfd whatever its own copy of the table
//! says. A vector raised while it has no eventfd is latched and signalled
//! as soon as one is set (a spurious interrupt is harmless for virtio, a
//! lost one hangs the driver).

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{PoisonError, RwLock};

use outboard_transport::virtio_pci::NO_VECTOR;
use vmm_sys_util::eventfd::EventFd;

/// A `set_msix_eventfds` range beyond the vectors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MSI-X vectors {start}..{start}+{count} are beyond the function's {vectors}")]
pub struct IrqRangeError {
    /// First vector.
    pub start: u16,
    /// Number of eventfds given.
    pub count: usize,
    /// Vectors the function has.
    pub vectors: u16,
}

/// Shared between the function (which sets routes) and the queue workers
/// (which signal).
pub(crate) struct Interrupts {
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    fds: RwLock<Vec<Option<EventFd>>>,
    latched: Vec<AtomicBool>,
}

impl Interrupts {
    /// `vectors` vectors, `queues` queues, nothing routed.
    pub(crate) fn new(vectors: u16, queues: usize) -> Self {
        Interrupts {
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            fds: RwLock::new((0..vectors).map(|_| None).collect()),
            latched: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Number of vectors.
    pub(crate) fn vectors(&self) -> u16 {
        self.latched.len() as u16
    }

    /// Routes queue `queue` to `vector` ([`NO_VECTOR`]: none).
    pub(crate) fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(queue) {
            v.store(vector, Ordering::Release);
        }
    }

    /// Routes configuration changes to `vector`.
    pub(crate) fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    /// Signals queue `queue`'s vector.
    pub(crate) fn signal_queue(&self, queue: usize) {
        if let Some(v) = self.queue_vectors.get(queue) {
            self.signal(v.load(Ordering::Acquire));
        }
    }

    /// Signals the configuration vector.
    pub(crate) fn signal_config(&self) {
        self.signal(self.config_vector.load(Ordering::Acquire));
    }

    fn signal(&self, vector: u16) {
        if vector == NO_VECTOR {
            return;
        }
        let fds = self.fds.read().unwrap_or_else(PoisonError::into_inner);
        match fds.get(usize::from(vector)) {
            Some(Some(fd)) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("MSI-X vector {vector}: cannot signal: {e}");
                }
            }
            Some(None) => {
                if let Some(l) = self.latched.get(usize::from(vector)) {
                    l.store(true, Ordering::Release);
                }
            }
            None => {}
        }
    }

    /// Sets (or with `None` clears) the eventfds of vectors `start..`;
    /// a vector latched meanwhile is signalled on its new eventfd.
    pub(crate) fn set_fds(
        &self,
        start: u16,
        new: Vec<Option<EventFd>>,
    ) -> Result<(), IrqRangeError> {
        let vectors = self.vectors();
        let err = IrqRangeError {
            start,
            count: new.len(),
            vectors,
        };
        if usize::from(start) + new.len() > usize::from(vectors) {
            return Err(err);
        }
        let mut fds = self.fds.write().unwrap_or_else(PoisonError::into_inner);
        for (i, fd) in new.into_iter().enumerate() {
            let v = usize::from(start) + i;
            if let (Some(fd), Some(l)) = (&fd, self.latched.get(v)) {
                if l.swap(false, Ordering::AcqRel) {
                    if let Err(e) = fd.write(1) {
                        log::warn!("MSI-X vector {v}: cannot signal: {e}");
                    }
                }
            }
            if let Some(slot) = fds.get_mut(v) {
                *slot = fd;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn routes_and_latches() {
        let irq = Interrupts::new(3, 2);
        assert!(irq.set_fds(2, vec![None, None]).is_err());
        irq.set_queue_vector(1, 2);
        irq.signal_queue(1);
        irq.signal_queue(0); // no vector: nothing
        irq.signal_queue(7); // no queue: nothing
        let fd = efd();
        irq.set_fds(2, vec![Some(fd.try_clone().unwrap())]).unwrap();
        assert_eq!(fd.read().unwrap(), 1, "latched signal delivered");
        irq.signal_queue(1);
        assert_eq!(fd.read().unwrap(), 1);
        irq.set_config_vector(0);
        let cfg = efd();
        irq.set_fds(0, vec![Some(cfg.try_clone().unwrap())])
            .unwrap();
        assert!(cfg.read().is_err(), "nothing latched on vector 0");
        irq.signal_config();
        assert_eq!(cfg.read().unwrap(), 1);
    }
}
