//! Serving one virtqueue: pure logic over a small environment trait (its
//! memory, its interrupt, its stop flag); threads and eventfds are in
//! [`super::worker`].
//!
//! The usual rust-vmm loop: disable guest kicks, take chains off the avail
//! ring, hand each to the [`Disk`] engine, put the completion on the used
//! ring, signal when `needs_notification` (EVENT_IDX) says so, re-enable
//! kicks and look again. Chains are taken in batches; each batch runs on
//! one memory snapshot, inside [`QueueEnv::with_memory`].
//!
//! Stopping: the flag is checked before each chain. A chain taken is
//! always finished (processed, on the used ring, signalled): after the
//! worker returns there is nothing in flight, and the queue's
//! `next_avail` / `next_used` describe the guest-visible state exactly.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::engine::Disk;

/// Chains per batch (per memory snapshot).
const BATCH: usize = 64;

/// A guest whose avail index runs ahead of what can be popped (a corrupt
/// ring) would make the re-enable check loop forever; give up after this
/// many empty rounds, the next kick retries.
const MAX_EMPTY_ROUNDS: u32 = 2;

/// What serving a queue needs from its surroundings.
pub(crate) trait QueueEnv {
    /// The guest memory type.
    type Mem: GuestMemory;
    /// Runs `f` on a snapshot of guest memory; a memory update waits for
    /// it to return.
    fn with_memory<R>(&self, f: impl FnOnce(&Self::Mem) -> R) -> R;
    /// Interrupts the driver (the queue's MSI-X vector).
    fn signal(&self);
    /// Whether to stop taking chains.
    fn stopping(&self) -> bool;
}

/// How a batch ended.
struct Batch {
    done: usize,
    /// The avail ring looked empty (or broken): time to re-enable kicks.
    drained: bool,
}

/// Serves `queue` until its avail ring is empty with kicks re-enabled, or
/// until the environment says stop.
pub(crate) fn serve<E: QueueEnv>(env: &E, disk: &Disk, queue: &mut Queue, index: usize) {
    let mut empty_rounds = 0;
    loop {
        if env.stopping() {
            return;
        }
        let again = env.with_memory(|mem| {
            let batch = run_batch(env, disk, queue, index, mem);
            if !batch.drained {
                return true;
            }
            if batch.done == 0 {
                empty_rounds += 1;
            }
            match queue.enable_notification(mem) {
                Ok(more) => more && empty_rounds < MAX_EMPTY_ROUNDS,
                Err(e) => {
                    log::warn!("queue {index}: cannot enable notifications: {e}");
                    false
                }
            }
        });
        if !again {
            return;
        }
    }
}

fn run_batch<E: QueueEnv>(
    env: &E,
    disk: &Disk,
    queue: &mut Queue,
    index: usize,
    mem: &E::Mem,
) -> Batch {
    if let Err(e) = queue.disable_notification(mem) {
        log::warn!("queue {index}: cannot disable notifications: {e}");
    }
    let mut batch = Batch {
        done: 0,
        drained: false,
    };
    while batch.done < BATCH && !env.stopping() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            batch.drained = true;
            break;
        };
        let head = chain.head_index();
        let completion = disk.process_request(mem, chain);
        if let Err(e) = queue.add_used(mem, head, completion.used_len) {
            log::warn!("queue {index}: cannot add descriptor {head} to the used ring: {e}");
            batch.drained = true;
            break;
        }
        batch.done += 1;
    }
    if batch.done > 0 {
        match queue.needs_notification(mem) {
            Ok(true) => env.signal(),
            Ok(false) => {}
            Err(e) => {
                log::warn!("queue {index}: cannot read the used event: {e}");
                env.signal();
            }
        }
    }
    batch
}
