//! The plumbing of a queue: one thread per running queue, waiting on the
//! queue's notify eventfd (the client's ioeventfd) and its own wake
//! eventfd, serving the queue ([`super::queue::serve`]) on each kick.
//!
//! A worker owns its [`Queue`] while it runs and hands it back when it is
//! stopped ([`QueueWorker::stop`]): the queue's indices are then exactly
//! what the guest sees (nothing in flight), ready to be saved or run again.
//! A worker starts by serving the queue once, so chains made available
//! while it was stopped (or before a migration) are not left waiting for a
//! kick.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::interrupts::Interrupts;
use super::memory::PciGuestMemory;
use super::queue::{self, QueueEnv};
use crate::engine::Disk;

const KICK: u64 = 0;
const WAKE: u64 = 1;

/// What every queue worker of one function shares.
pub(crate) struct Shared {
    pub(crate) disk: Arc<Disk>,
    pub(crate) mem: GuestMemoryAtomic<PciGuestMemory>,
    pub(crate) irq: Interrupts,
    /// Queue notify eventfds (the client registers them as ioeventfds).
    pub(crate) kicks: Vec<EventFd>,
    /// Held by a worker while it touches guest memory (one batch), so a
    /// DMA unmap can wait until no worker uses the old map.
    pub(crate) busy: Vec<Mutex<()>>,
}

impl Shared {
    /// Returns once no worker runs a batch that began before the call.
    pub(crate) fn quiesce_memory(&self) {
        for b in &self.busy {
            drop(b.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }
}

/// A queue's thread.
pub(crate) struct QueueWorker {
    thread: JoinHandle<Queue>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
}

struct Env<'a> {
    shared: &'a Shared,
    index: usize,
    stop: &'a AtomicBool,
}

impl QueueEnv for Env<'_> {
    type Mem = PciGuestMemory;

    fn with_memory<R>(&self, f: impl FnOnce(&PciGuestMemory) -> R) -> R {
        let _busy = self
            .shared
            .busy
            .get(self.index)
            .map(|b| b.lock().unwrap_or_else(PoisonError::into_inner));
        let mem = self.shared.mem.memory();
        f(&mem)
    }

    fn signal(&self) {
        self.shared.irq.signal_queue(self.index);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

impl QueueWorker {
    /// Starts serving `queue` (index `index`).
    pub(crate) fn spawn(shared: Arc<Shared>, index: usize, queue: Queue) -> io::Result<Self> {
        let kick = shared
            .kicks
            .get(index)
            .ok_or_else(|| io::Error::other(format!("no queue {index}")))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [(kick, KICK), (&wake, WAKE)] {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name(format!("blk-pci-q{index}"))
            .spawn(move || run(&shared, index, queue, &epoll, &thread_stop))?;
        Ok(QueueWorker { thread, stop, wake })
    }

    /// Stops the worker after the chain in hand and returns its queue
    /// (`None` if the thread panicked).
    pub(crate) fn stop(self) -> Option<Queue> {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake a queue worker: {e}");
        }
        self.thread.thread().unpark();
        match self.thread.join() {
            Ok(q) => Some(q),
            Err(_) => {
                log::error!("a queue worker panicked; its queue is lost");
                None
            }
        }
    }
}

fn run(shared: &Shared, index: usize, mut queue: Queue, epoll: &Epoll, stop: &AtomicBool) -> Queue {
    let env = Env {
        shared,
        index,
        stop,
    };
    let mut events = [EpollEvent::default(); 2];
    loop {
        queue::serve(&env, &shared.disk, &mut queue, index);
        if env.stopping() {
            return queue;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("queue {index}: epoll failed, the queue stops: {e}");
                // Wait for the stop request rather than spin.
                while !env.stopping() {
                    thread::park();
                }
                return queue;
            }
        };
        for ev in events.iter().take(n) {
            if ev.data() == KICK {
                if let Some(kick) = shared.kicks.get(index) {
                    // Non-blocking; EAGAIN only means already consumed.
                    let _ = kick.read();
                }
            }
        }
    }
}
