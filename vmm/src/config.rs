//! The VM configuration: a JSON document, parsed strictly and validated
//! before any guest state is created.
//!
//! ```json
//! {
//!   "machine": { "vcpus": 2, "memory_mib": 256 },
//!   "kernel": {
//!     "path": "vmlinux",
//!     "initrd": "initramfs.cpio.gz",
//!     "cmdline": "console=ttyS0 reboot=k",
//!     "entry": "linux"
//!   },
//!   "console": { "output": "stdout", "input": "auto" },
//!   "devices": [
//!     { "id": "disk0", "kind": "vhost-user-blk", "transport": "mmio",
//!       "spawn": { "args": ["--image", "disk.img", "--queues", "2"] } },
//!     { "id": "disk1", "kind": "vhost-user-blk", "socket": "/run/qsd.sock" }
//!   ]
//! }
//! ```
//!
//! Relative paths are resolved against the directory of the config file.
//! Unknown fields are errors, so a typo never silently falls back to a
//! default.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Smallest guest memory we accept: room for the boot structures, a small
/// kernel and its stack.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest vCPU count: APIC ids must fit the MP table's 8-bit field, and one
/// id is kept for the IOAPIC.
pub const MAX_VCPUS: u8 = 254;
/// Largest guest memory: 1 TiB (4 levels of paging reach far more; this
/// keeps `memory_mib << 20` and the address map well inside u64).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most devices: virtio-mmio ones take an IOAPIC pin each (5 to 23), PCI
/// ones a slot each (1 to 31).
pub const MAX_DEVICES: usize = 50;
/// Most virtio-mmio devices: one per IOAPIC pin from 5 to 23.
pub const MAX_MMIO_DEVICES: usize = 19;
/// Most PCI devices: slots 1 to 31 of bus 0.
pub const MAX_PCI_DEVICES: usize = 31;
/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 32;
/// Largest virtqueue size (virtio spec: split rings up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Longest kernel command line (Linux x86 `COMMAND_LINE_SIZE`, with its NUL).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// A configuration error: which field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is malformed or does not fit the schema.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's description, with line and column.
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("config field `{field}`: {problem}")]
    Invalid {
        /// Dotted field name, e.g. `machine.vcpus`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// The whole VM description.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// What to boot.
    pub kernel: KernelConfig,
    /// The serial console.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Devices served by device processes.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

/// One device served by a device process.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Name in logs and errors; unique. Default: `<kind><index>`.
    #[serde(default)]
    pub id: Option<String>,
    /// What the device is and which protocol reaches it.
    pub kind: DeviceKind,
    /// How the guest sees it.
    #[serde(default)]
    pub transport: TransportKind,
    /// Start the in-tree device process (exclusive with `socket`).
    #[serde(default)]
    pub spawn: Option<SpawnConfig>,
    /// Connect to a backend someone else started, listening on this unix
    /// socket (exclusive with `spawn`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Largest virtqueue size offered to the driver (a power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

fn default_queue_size() -> u16 {
    256
}

impl DeviceConfig {
    /// The device's name: its `id`, or `<kind><index>`.
    pub fn name(&self, index: usize) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}{index}", self.kind))
    }
}

/// Device kinds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk over vhost-user (`outboard-blk` when spawned).
    #[serde(rename = "vhost-user-blk")]
    VhostUserBlk,
    /// A PCI function served over vfio-user (`outboard-blk --vfio-user`
    /// when spawned); its transport must be `pci`.
    #[serde(rename = "vfio-user")]
    VfioUser,
}

impl DeviceKind {
    /// The in-tree program that serves this kind when spawned.
    pub fn program(&self) -> &'static str {
        match self {
            DeviceKind::VhostUserBlk | DeviceKind::VfioUser => "outboard-blk",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::VhostUserBlk => "vhost-user-blk",
            DeviceKind::VfioUser => "vfio-user",
        })
    }
}

/// How a device is shown to the guest.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// virtio-mmio, announced on the kernel command line.
    #[default]
    Mmio,
    /// virtio-pci (modern) with MSI-X, on PCI bus 0.
    Pci,
}

/// A device process the VMM starts and supervises.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpawnConfig {
    /// The program; default: the kind's in-tree program next to the
    /// `outboard` binary.
    #[serde(default)]
    pub program: Option<PathBuf>,
    /// Its arguments; the VMM adds the socket (`--listen-fd`). The process
    /// runs in the config file's directory, so relative paths work.
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory (the config file's directory).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// vCPU count and memory size.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB, at least [`MIN_MEMORY_MIB`].
    pub memory_mib: u64,
}

/// The kernel image and how to enter it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// ELF vmlinux or bzImage.
    pub path: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Entry protocol.
    #[serde(default)]
    pub entry: EntryProtocol,
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryProtocol {
    /// Linux x86-64 boot protocol: 64-bit mode, paging on, RSI = boot_params.
    #[default]
    Linux,
    /// PVH: 32-bit protected mode at the ELF's `XEN_ELFNOTE_PHYS32_ENTRY`,
    /// RBX = hvm_start_info.
    Pvh,
}

impl fmt::Display for EntryProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryProtocol::Linux => "linux",
            EntryProtocol::Pvh => "pvh",
        })
    }
}

/// Where the serial console's output goes and whether it takes input.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Output sink.
    #[serde(default)]
    pub output: ConsoleOutput,
    /// Output file, required when `output` is `file`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Input source.
    #[serde(default)]
    pub input: ConsoleInput,
}

/// Serial output sink.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file (`console.path`), created or truncated.
    File,
    /// Discarded.
    None,
}

/// Serial input source.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleInput {
    /// Standard input, when it is a terminal.
    #[default]
    Auto,
    /// No input.
    None,
}

impl VmConfig {
    /// Reads, parses and validates a config file. Relative paths in it are
    /// resolved against the file's directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_json(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates a JSON config; relative paths are resolved
    /// against `base`.
    pub fn from_json(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let mut config: VmConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            // Name the field for type and value errors; syntax errors and
            // unknown/missing fields already say what they are about.
            let message = if field.is_empty() || field == "." || !inner.is_data() {
                inner.to_string()
            } else {
                format!("field `{field}`: {inner}")
            };
            ConfigError::Parse {
                path: PathBuf::from("<json>"),
                message,
            }
        })?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.kernel.path);
        if let Some(p) = self.kernel.initrd.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.console.path.as_mut() {
            resolve(p);
        }
        for d in &mut self.devices {
            if let Some(p) = d.socket.as_mut() {
                resolve(p);
            }
            if let Some(s) = d.spawn.as_mut() {
                if let Some(p) = s.program.as_mut() {
                    // A bare name is looked up in $PATH, a path is relative
                    // to the config file.
                    if p.components().count() > 1 {
                        resolve(p);
                    }
                }
                s.dir = base.to_path_buf();
            }
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
            return invalid(
                "machine.vcpus",
                format!("{} is out of range (1 to {MAX_VCPUS})", m.vcpus),
            );
        }
        if m.memory_mib < MIN_MEMORY_MIB {
            return invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is too small (at least {MIN_MEMORY_MIB} MiB)",
                    m.memory_mib
                ),
            );
        }
        if m.memory_mib > MAX_MEMORY_MIB {
            return invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is more than the largest guest ({MAX_MEMORY_MIB} MiB)",
                    m.memory_mib
                ),
            );
        }
        if let Some(avail) = host_available_mib() {
            if m.memory_mib > avail {
                return invalid(
                    "machine.memory_mib",
                    format!(
                        "{} MiB is more than this host can give ({avail} MiB available)",
                        m.memory_mib
                    ),
                );
            }
        }
        check_file("kernel.path", &self.kernel.path)?;
        if let Some(initrd) = &self.kernel.initrd {
            check_file("kernel.initrd", initrd)?;
        }
        if self.kernel.cmdline.len() >= MAX_CMDLINE_LEN {
            return invalid(
                "kernel.cmdline",
                format!(
                    "{} bytes is too long (at most {} bytes)",
                    self.kernel.cmdline.len(),
                    MAX_CMDLINE_LEN - 1
                ),
            );
        }
        if let Some(c) = self
            .kernel
            .cmdline
            .chars()
            .find(|c| !(' '..='~').contains(c))
        {
            return invalid(
                "kernel.cmdline",
                format!("contains the character {c:?}; only printable ASCII is allowed"),
            );
        }
        match (self.console.output, &self.console.path) {
            (ConsoleOutput::File, None) => {
                return invalid(
                    "console.path",
                    "is required when console.output is \"file\"".into(),
                )
            }
            (ConsoleOutput::File, Some(_)) => {}
            (_, Some(_)) => {
                return invalid(
                    "console.path",
                    "is only allowed when console.output is \"file\"".into(),
                )
            }
            _ => {}
        }
        self.validate_devices()
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if self.devices.len() > MAX_DEVICES {
            return invalid(
                "devices",
                format!(
                    "{} devices is more than the {MAX_DEVICES} allowed",
                    self.devices.len()
                ),
            );
        }
        let count = |t: TransportKind| self.devices.iter().filter(|d| d.transport == t).count();
        if count(TransportKind::Mmio) > MAX_MMIO_DEVICES {
            return invalid(
                "devices[].transport",
                format!("more than {MAX_MMIO_DEVICES} devices on mmio"),
            );
        }
        if count(TransportKind::Pci) > MAX_PCI_DEVICES {
            return invalid(
                "devices[].transport",
                format!("more than {MAX_PCI_DEVICES} devices on pci"),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let name = d.name(i);
            if let Some(id) = &d.id {
                let ok = !id.is_empty()
                    && id.len() <= MAX_DEVICE_ID_LEN
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !ok {
                    return invalid(
                        "devices[].id",
                        format!("{id:?} must be 1 to {MAX_DEVICE_ID_LEN} characters of A-Z, a-z, 0-9, '-' and '_'"),
                    );
                }
            }
            if !names.insert(name.clone()) {
                return invalid("devices[].id", format!("{name:?} is used twice"));
            }
            match (&d.spawn, &d.socket) {
                (Some(_), Some(_)) => {
                    return invalid(
                        "devices[].spawn",
                        format!("device {name:?} has both `spawn` and `socket`; give one"),
                    )
                }
                (None, None) => {
                    return invalid(
                        "devices[].spawn",
                        format!("device {name:?} needs `spawn` (start the device process) or `socket` (connect to a running one)"),
                    )
                }
                (None, Some(p)) if p.as_os_str().is_empty() => {
                    return invalid("devices[].socket", format!("device {name:?}: is empty"))
                }
                _ => {}
            }
            if d.kind == DeviceKind::VfioUser && d.transport != TransportKind::Pci {
                return invalid(
                    "devices[].transport",
                    format!("device {name:?}: a vfio-user device is a PCI function; set \"transport\": \"pci\""),
                );
            }
            if d.queue_size == 0 || !d.queue_size.is_power_of_two() || d.queue_size > MAX_QUEUE_SIZE
            {
                return invalid(
                    "devices[].queue_size",
                    format!(
                        "device {name:?}: {} is not a power of two from 1 to {MAX_QUEUE_SIZE}",
                        d.queue_size
                    ),
                );
            }
        }
        Ok(())
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Invalid {
            field,
            problem: "is empty".into(),
        });
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::Invalid {
            field,
            problem: format!("{} is not a regular file", path.display()),
        }),
        Err(e) => Err(ConfigError::Invalid {
            field,
            problem: format!("{}: {e}", path.display()),
        }),
    }
}

/// What the host can give right now: available memory plus free swap, in MiB.
fn host_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let kib = field("MemAvailable:")? + field("SwapFree:").unwrap_or(0);
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile_like::TempFile {
        tempfile_like::TempFile::new()
    }

    /// A tiny self-cleaning temp file, to avoid a dependency for tests.
    mod tempfile_like {
        use std::path::PathBuf;
        pub struct TempFile(pub PathBuf);
        impl TempFile {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "outboard-cfg-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, b"kernel").unwrap();
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn json(kernel: &Path, machine: &str) -> String {
        format!(
            r#"{{"machine": {machine}, "kernel": {{"path": "{}"}}}}"#,
            kernel.display()
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let k = kernel_file();
        let c = VmConfig::from_json(
            &json(&k.0, r#"{"vcpus":2,"memory_mib":64}"#),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.machine.vcpus, 2);
        assert_eq!(c.kernel.entry, EntryProtocol::Linux);
        assert_eq!(c.console.output, ConsoleOutput::Stdout);
        assert_eq!(c.console.input, ConsoleInput::Auto);
    }

    #[test]
    fn unknown_field_is_named() {
        let k = kernel_file();
        let err = VmConfig::from_json(
            &json(&k.0, r#"{"vcpus":1,"memory_mib":64,"vcpu":3}"#),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let k = kernel_file();
        for (machine, field) in [
            (r#"{"vcpus":0,"memory_mib":64}"#, "machine.vcpus"),
            (r#"{"vcpus":255,"memory_mib":64}"#, "machine.vcpus"),
            (r#"{"vcpus":1,"memory_mib":1}"#, "machine.memory_mib"),
            (
                r#"{"vcpus":1,"memory_mib":1099511627776}"#,
                "machine.memory_mib",
            ),
        ] {
            let err = VmConfig::from_json(&json(&k.0, machine), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{machine}: {err}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let k = kernel_file();
        let err = VmConfig::from_json(
            &json(&k.0, r#"{"vcpus":300,"memory_mib":64}"#),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("field `machine.vcpus`"), "{err}");
        let err = VmConfig::from_json(
            &json(&k.0, r#"{"vcpus":1,"memory_mib":"lots"}"#),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("field `machine.memory_mib`"), "{err}");
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = VmConfig::from_json(
            &json(
                Path::new("/nonexistent/vmlinux"),
                r#"{"vcpus":1,"memory_mib":64}"#,
            ),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kernel.path"), "{err}");
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let k = kernel_file();
        let dir = k.0.parent().unwrap();
        let name = k.0.file_name().unwrap().to_str().unwrap();
        let c = VmConfig::from_json(
            &format!(r#"{{"machine":{{"vcpus":1,"memory_mib":64}},"kernel":{{"path":"{name}"}}}}"#),
            dir,
        )
        .unwrap();
        assert_eq!(c.kernel.path, k.0);
    }

    #[test]
    fn console_file_needs_path() {
        let k = kernel_file();
        let text = format!(
            r#"{{"machine":{{"vcpus":1,"memory_mib":64}},"kernel":{{"path":"{}"}},"console":{{"output":"file"}}}}"#,
            k.0.display()
        );
        let err = VmConfig::from_json(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("console.path"), "{err}");
    }

    #[test]
    fn cmdline_must_be_printable_and_short() {
        let k = kernel_file();
        let long = "x".repeat(MAX_CMDLINE_LEN);
        for cmdline in [long.as_str(), "a\\nb"] {
            let text = format!(
                r#"{{"machine":{{"vcpus":1,"memory_mib":64}},"kernel":{{"path":"{}","cmdline":"{cmdline}"}}}}"#,
                k.0.display()
            );
            let err = VmConfig::from_json(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("kernel.cmdline"), "{err}");
        }
    }
}
