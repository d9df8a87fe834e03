//! A [`VmControl`] test double with the state rules a real VM follows.
//!
//! Snapshots to a path starting `/fail` fail (500), to `/panic` panic.
//! A `unix:` migration finishes at once; a `tcp:` one blocks until
//! cancelled (409) or 10 s pass.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use outboard_migration::Address;

use super::{
    ApiError, DeviceInfo, MigrateRequest, MigrationReport, SnapshotReport, SnapshotRequest,
    VmControl, VmInfo, VmState,
};

#[derive(Default)]
pub(crate) struct Seen {
    pub snapshots: Vec<SnapshotRequest>,
    pub migrations: Vec<MigrateRequest>,
}

struct Inner {
    state: VmState,
    cancel: bool,
    seen: Seen,
}

pub(crate) struct FakeVm {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl FakeVm {
    pub fn new() -> Self {
        FakeVm {
            inner: Mutex::new(Inner {
                state: VmState::Running,
                cancel: false,
                seen: Seen::default(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, inner: &mut Inner, state: VmState) {
        inner.state = state;
        self.changed.notify_all();
    }

    /// Waits up to 5 s for `state`.
    pub fn wait_for(&self, state: VmState) -> bool {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, Duration::from_secs(5), |i| i.state != state)
            .unwrap_or_else(|e| e.into_inner());
        inner.state == state
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.lock().seen)
    }
}

impl VmControl for FakeVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: self.lock().state,
            vcpus: 2,
            memory_mib: 256,
            devices: vec![DeviceInfo {
                id: "disk0".into(),
                kind: "vhost-user-blk".into(),
                transport: "mmio".into(),
            }],
            uptime_ms: 1234,
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        match inner.state {
            VmState::Running => {
                self.set(&mut inner, VmState::Paused);
                Ok(())
            }
            VmState::Paused => Err(ApiError::conflict("the VM is already paused")),
            s => Err(ApiError::conflict(format!("cannot pause while {s:?}"))),
        }
    }

    fn resume(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.state != VmState::Paused {
            return Err(ApiError::conflict("the VM is not paused"));
        }
        self.set(&mut inner, VmState::Running);
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.state == VmState::ShuttingDown {
            return Err(ApiError::conflict("the VM is already shutting down"));
        }
        self.set(&mut inner, VmState::ShuttingDown);
        Ok(())
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotReport, ApiError> {
        let Address::File(path) = &req.destination else {
            return Err(ApiError::internal(
                "the API let a non-file snapshot through",
            ));
        };
        if path.starts_with("/panic") {
            panic!("fake VM told to panic");
        }
        if path.starts_with("/fail") {
            return Err(ApiError::internal(format!(
                "cannot create {}: Permission denied",
                path.display()
            )));
        }
        self.lock().seen.snapshots.push(req);
        Ok(SnapshotReport {
            total_ms: 12,
            downtime_ms: 12,
            bytes_written: 268_435_456,
        })
    }

    fn migrate(&self, req: MigrateRequest) -> Result<MigrationReport, ApiError> {
        let mut inner = self.lock();
        if inner.state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "cannot migrate while {:?}",
                inner.state
            )));
        }
        let blocks = matches!(req.destination, Address::Tcp(_));
        inner.seen.migrations.push(req);
        let report = MigrationReport {
            total_ms: 800,
            downtime_ms: 40,
            bytes_sent: 300_000_000,
            rounds: 4,
        };
        if !blocks {
            return Ok(report);
        }
        inner.cancel = false;
        self.set(&mut inner, VmState::Migrating);
        let (mut inner, _) = self
            .changed
            .wait_timeout_while(inner, Duration::from_secs(10), |i| !i.cancel)
            .unwrap_or_else(|e| e.into_inner());
        let cancelled = inner.cancel;
        self.set(&mut inner, VmState::Running);
        if cancelled {
            Err(ApiError::conflict("migration cancelled"))
        } else {
            Ok(report)
        }
    }

    fn cancel_migration(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.state != VmState::Migrating {
            return Err(ApiError::conflict("no migration is running"));
        }
        inner.cancel = true;
        self.changed.notify_all();
        Ok(())
    }
}
