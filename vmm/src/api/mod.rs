//! The control API: HTTP/1.1 and JSON over a unix socket, as Firecracker
//! and Cloud Hypervisor serve theirs.
//!
//! ```text
//! GET  /vm                  -> 200 VmInfo
//! PUT  /vm/pause            -> 204            409 when already paused
//! PUT  /vm/resume           -> 204            409 when not paused
//! PUT  /vm/shutdown         -> 204
//! PUT  /vm/snapshot         SnapshotRequest  -> 200 SnapshotReport
//! PUT  /vm/migrate          MigrateRequest   -> 200 MigrationReport (blocks until done)
//! PUT  /vm/migrate/cancel   -> 204            409 when no migration runs
//! ```
//!
//! One request per connection (`Connection: close`). Bodies are JSON with
//! `Content-Length` (no chunked encoding), at most [`MAX_BODY`] bytes; the
//! request line and headers at most [`MAX_HEAD`]. Every error is the HTTP
//! status and `{"error": "<message>"}`: 400 bad JSON or unknown field (the
//! message names the field), 404 unknown path, 405 wrong method, 408 the
//! request took too long to arrive, 409 the VM is in the wrong state, 411
//! a body without `Content-Length`, 413 body too large, 431 headers too
//! large, 500 the operation failed, 501 not supported, 503 too many
//! connections. A bodiless `PUT` accepts no body or `{}`.
//!
//! `vmm/api/openapi.yaml` is the same contract in OpenAPI 3; the version
//! rule: fields are only ever added to responses, and a request field
//! that changes meaning gets a new name.
//!
//! [`VmControl`] is what the VM implements; [`serve`] runs the server
//! over one; [`client`] is `outboard api`.

use std::time::Instant;

use outboard_migration::Address;
use serde::{Deserialize, Serialize};

use crate::config::{TransportKind, VmConfig};

pub mod client;
mod http;
mod routes;
mod server;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use http::{MAX_BODY, MAX_HEAD};
pub use server::{serve, ApiServer};

/// What the control API asks of the running VM.
///
/// Calls come from one thread per connection, so they may overlap: an
/// `info` or `cancel_migration` must answer while `migrate` blocks.
/// Errors carry the HTTP status to answer with: 409 for the wrong state
/// (pause when paused, a second migration, cancel with none running), 400
/// for a request this VM cannot honour, 500 when the operation failed.
pub trait VmControl: Send + Sync {
    /// State, vCPUs, memory, devices and uptime.
    fn info(&self) -> VmInfo;
    /// Stops every vCPU; devices and RAM stay as they are.
    fn pause(&self) -> Result<(), ApiError>;
    /// Restarts the vCPUs after a pause.
    fn resume(&self) -> Result<(), ApiError>;
    /// Stops the VM as a guest power-off would; returns once it is asked.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Writes the VM's state to a file (the destination is always
    /// [`Address::File`]).
    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotReport, ApiError>;
    /// Migrates the VM (the destination is always [`Address::Tcp`] or
    /// [`Address::Unix`]); blocks until it is done, failed or cancelled.
    fn migrate(&self, req: MigrateRequest) -> Result<MigrationReport, ApiError>;
    /// Stops a running migration; the source VM carries on.
    fn cancel_migration(&self) -> Result<(), ApiError>;
}

/// An API error: the HTTP status and the message for `{"error": ...}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct ApiError {
    /// The HTTP status, 400 to 599.
    pub status: u16,
    /// What went wrong, one line.
    pub message: String,
}

impl ApiError {
    /// An error with this status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 409: the VM's state does not allow it (pause when paused).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 500: the operation failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// 501: this VMM cannot do that.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(501, message)
    }
}

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped ([`VmControl::pause`]).
    Paused,
    /// A snapshot is being written.
    Snapshotting,
    /// A migration is under way.
    Migrating,
    /// The VM is stopping.
    ShuttingDown,
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// What the VM is doing.
    pub state: VmState,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Devices served by device processes, in config order.
    pub devices: Vec<DeviceInfo>,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
}

/// One device in [`VmInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// Its name (`id` in the config, else `<kind><index>`).
    pub id: String,
    /// `vhost-user-blk` or `vfio-user`.
    pub kind: String,
    /// `mmio` or `pci`.
    pub transport: String,
}

impl DeviceInfo {
    /// The devices a config describes, named as the VM names them.
    pub fn from_config(config: &VmConfig) -> Vec<DeviceInfo> {
        config
            .devices
            .iter()
            .enumerate()
            .map(|(index, d)| DeviceInfo {
                id: d.name(index),
                kind: d.kind.to_string(),
                transport: match d.transport {
                    TransportKind::Mmio => "mmio",
                    TransportKind::Pci => "pci",
                }
                .to_string(),
            })
            .collect()
    }
}

/// `PUT /vm/snapshot`: `{"destination": "file:PATH"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where the snapshot goes; always [`Address::File`].
    #[serde(with = "address::file")]
    pub destination: Address,
}

/// The answer to a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReport {
    /// From the request to the snapshot on disk.
    pub total_ms: u64,
    /// How long the vCPUs were stopped.
    pub downtime_ms: u64,
    /// Size of the snapshot.
    pub bytes_written: u64,
}

/// Default for [`MigrateRequest::downtime_ms`].
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default for [`MigrateRequest::timeout_s`].
pub const DEFAULT_TIMEOUT_S: u64 = 600;

/// `PUT /vm/migrate`: `{"destination": "tcp:HOST:PORT" | "unix:PATH",
/// "downtime_ms": 300, "timeout_s": 600}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination VMM; always [`Address::Tcp`] or [`Address::Unix`].
    #[serde(with = "address::stream")]
    pub destination: Address,
    /// Largest acceptable stop-and-copy pause, at least 1.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Give up (and keep running here) after this long, at least 1.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

impl MigrateRequest {
    /// Checks what serde cannot: the figures are not zero.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.downtime_ms == 0 {
            return Err(ApiError::bad_request("downtime_ms: must be at least 1"));
        }
        if self.timeout_s == 0 {
            return Err(ApiError::bad_request("timeout_s: must be at least 1"));
        }
        Ok(())
    }
}

/// The answer to a migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReport {
    /// From the request to the destination's confirmation.
    pub total_ms: u64,
    /// How long the vCPUs were stopped (the stop-and-copy phase).
    pub downtime_ms: u64,
    /// Bytes written to the channel.
    pub bytes_sent: u64,
    /// Pre-copy rounds, the stop-and-copy round included.
    pub rounds: u32,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
}

/// Destinations on the wire: the `tcp:`/`unix:`/`file:` strings of
/// [`outboard_migration::channel`], restricted per request.
mod address {
    use outboard_migration::{Address, ChannelKind};
    use serde::{de, Deserialize, Deserializer, Serializer};

    fn parse<'de, D: Deserializer<'de>>(
        d: D,
        allowed: &[ChannelKind],
        expected: &str,
    ) -> Result<Address, D::Error> {
        let s = String::deserialize(d)?;
        let address: Address = s.parse().map_err(de::Error::custom)?;
        if allowed.contains(&address.kind()) {
            Ok(address)
        } else {
            Err(de::Error::custom(format!("{s:?}: expected {expected}")))
        }
    }

    fn put<S: Serializer>(a: &Address, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    pub mod file {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
            parse(d, &[ChannelKind::File], "file:PATH")
        }

        pub fn serialize<S: Serializer>(a: &Address, s: S) -> Result<S::Ok, S::Error> {
            put(a, s)
        }
    }

    pub mod stream {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
            parse(
                d,
                &[ChannelKind::Tcp, ChannelKind::Unix],
                "tcp:HOST:PORT or unix:PATH",
            )
        }

        pub fn serialize<S: Serializer>(a: &Address, s: S) -> Result<S::Ok, S::Error> {
            put(a, s)
        }
    }
}

/// A [`VmControl`] that knows only the config: `info` answers (state
/// `running`, uptime from [`ConfigOnly::new`]), everything else is 501.
/// The stand-in `outboard --api-socket` serves until the VM implements
/// [`VmControl`] itself.
pub struct ConfigOnly {
    vcpus: u8,
    memory_mib: u64,
    devices: Vec<DeviceInfo>,
    started: Instant,
}

impl ConfigOnly {
    /// The stand-in for the VM `config` describes, started now.
    pub fn new(config: &VmConfig) -> Self {
        ConfigOnly {
            vcpus: config.machine.vcpus,
            memory_mib: config.machine.memory_mib,
            devices: DeviceInfo::from_config(config),
            started: Instant::now(),
        }
    }

    fn unsupported<T>(what: &str) -> Result<T, ApiError> {
        Err(ApiError::not_implemented(format!(
            "{what} is not supported by this VMM yet"
        )))
    }
}

impl VmControl for ConfigOnly {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: VmState::Running,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            devices: self.devices.clone(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        Self::unsupported("pause")
    }

    fn resume(&self) -> Result<(), ApiError> {
        Self::unsupported("resume")
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        Self::unsupported("shutdown")
    }

    fn snapshot(&self, _req: SnapshotRequest) -> Result<SnapshotReport, ApiError> {
        Self::unsupported("snapshot")
    }

    fn migrate(&self, _req: MigrateRequest) -> Result<MigrationReport, ApiError> {
        Self::unsupported("migration")
    }

    fn cancel_migration(&self) -> Result<(), ApiError> {
        Self::unsupported("migration")
    }
}
