//! Live migration and snapshots, on the [`outboard_migration`] stream.
//!
//! **Source** ([`send`]): handshake with the VM shape; pre-copy with the
//! KVM dirty log (round 0 sends all RAM, later rounds what the guest
//! dirtied, until what is left fits the downtime target at the measured
//! rate, or the rounds run out); then stop-and-copy: vCPUs parked, the last
//! dirty pages, every vCPU's state, the irqchip/PIT/clock, the VMM's own
//! devices; then it waits for the destination's confirmation. Any error
//! before the confirmation leaves the guest running here.
//!
//! **Destination** ([`receive`]): checks the shape against its own config
//! (a mismatch is refused with an `Abort` naming the difference), loads the
//! pages and the state, and the caller confirms once the state is loaded.
//!
//! A snapshot is the same stream to a file (no reply direction).
//!
//! Device processes' state (vhost-user, vfio-user blobs) is not carried
//! yet: a VM with devices is refused with a clear error; the stream already
//! has `DeviceState` sections for it.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use outboard_migration::ram::{apply_pages, send_pages, PageSink, PageSource};
use outboard_migration::section::RamStats;
use outboard_migration::shape::{DeviceShape as ShapeDevice, VmShape};
use outboard_migration::{fits, Rate, Section, StreamReader, StreamWriter};
use outboard_migration::{DirtyBitmap, Page};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::cpu::state::{VcpuState, VmState};
use crate::memory::{GuestMemory, GuestRam};

/// Page size of the dirty log and the stream.
const PAGE: u64 = 4096;
/// Most pre-copy rounds before stopping the guest anyway.
pub const MAX_ROUNDS: u32 = 30;
/// How long the source waits for the destination's confirmation.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// KVM_MEM_LOG_DIRTY_PAGES.
const LOG_DIRTY_PAGES: u32 = 1;

/// Errors migrating or snapshotting.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream failed.
    #[error("migration stream: {0}")]
    Stream(#[from] outboard_migration::StreamError),
    /// RAM could not be sent or loaded.
    #[error("guest memory: {0}")]
    Ram(#[from] outboard_migration::ram::RamError),
    /// The channel could not be opened.
    #[error("{0}")]
    Channel(#[from] outboard_migration::channel::ChannelError),
    /// The two VMs differ.
    #[error("the destination's VM differs: {0}")]
    Shape(String),
    /// The destination gave up.
    #[error("the destination refused: {0}")]
    Aborted(String),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// vCPU or VM state could not be saved or loaded.
    #[error("{0}")]
    State(String),
    /// The stream is out of order or incomplete.
    #[error("unexpected {0}")]
    Protocol(String),
    /// Device processes would need their state carried.
    #[error("this VM has devices ({0}); their state is not migrated yet")]
    Devices(String),
    /// Cancelled through the API.
    #[error("migration cancelled")]
    Cancelled,
    /// Took longer than allowed.
    #[error("migration timed out after {0:?}")]
    Timeout(Duration),
    /// The guest powered off, reset or failed during the migration.
    #[error("the guest stopped during the migration")]
    GuestEnded,
}

/// The serial port's state in the stream (vm-superio's `SerialState`,
/// which has no serde of its own).
#[derive(Serialize, Deserialize)]
pub struct SerialSnapshot(#[serde(with = "SerialStateDef")] pub vm_superio::serial::SerialState);

#[derive(Serialize, Deserialize)]
#[serde(remote = "vm_superio::serial::SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The VM's shape as the handshake carries it.
pub fn shape(config: &VmConfig) -> VmShape {
    VmShape {
        memory_mib: config.machine.memory_mib,
        vcpus: u32::from(config.machine.vcpus),
        devices: config
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| ShapeDevice {
                id: d.name(i),
                kind: d.kind.to_string(),
                transport: format!("{:?}", d.transport).to_lowercase(),
                state_format: None,
            })
            .collect(),
    }
}

/// Refuses a VM whose devices would need their state carried.
pub fn check_migratable(config: &VmConfig) -> Result<(), MigrateError> {
    if config.devices.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = config
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| d.name(i))
        .collect();
    Err(MigrateError::Devices(names.join(", ")))
}

/// Guest memory as the stream reads and writes it (volatile accesses).
pub struct GuestPages<'a>(pub &'a GuestMemory);

impl PageSource for GuestPages<'_> {
    fn read_page(
        &self,
        gpa: u64,
        page: &mut [u8; outboard_migration::ram::PAGE_SIZE],
    ) -> Result<(), outboard_migration::ram::RamError> {
        self.0
            .read_slice(page, GuestAddress(gpa))
            .map_err(|_| outboard_migration::ram::RamError::OutsideRam { gpa })
    }
}

impl PageSink for GuestPages<'_> {
    fn write_page(
        &mut self,
        gpa: u64,
        page: Page<'_>,
    ) -> Result<(), outboard_migration::ram::RamError> {
        let zero = [0u8; outboard_migration::ram::PAGE_SIZE];
        let data: &[u8] = match page {
            Page::Zero => &zero,
            Page::Data(d) => d,
        };
        self.0
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| outboard_migration::ram::RamError::OutsideRam { gpa })
    }
}

/// Turns KVM's dirty logging on or off for every RAM slot.
pub fn set_dirty_logging(vm: &VmFd, ram: &GuestRam, on: bool) -> Result<(), MigrateError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MigrateError::State(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: if on { LOG_DIRTY_PAGES } else { 0 },
        };
        // SAFETY: the same live mapping the slot already has, owned by
        // `ram`; only the flags change.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| MigrateError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
            source,
        })?;
    }
    Ok(())
}

/// The pages dirtied since the last call, per slot, as bitmaps.
fn dirty_pages(vm: &VmFd, ram: &GuestRam) -> Result<Vec<DirtyBitmap>, MigrateError> {
    let mut out = Vec::new();
    for (slot, region) in ram.memory.iter().enumerate() {
        let size = usize::try_from(region.len())
            .map_err(|_| MigrateError::State("slot too large".into()))?;
        let words = vm
            .get_dirty_log(slot as u32, size)
            .map_err(|source| MigrateError::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        out.push(DirtyBitmap::from_words(
            region.start_addr().0,
            region.len(),
            &words,
        )?);
    }
    Ok(out)
}

/// The pages guest RAM has ever held data in: the memfd's data extents
/// (`SEEK_DATA`/`SEEK_HOLE`). The rest are holes, zero on both sides, and
/// neither read (which would allocate them) nor sent.
fn populated_pages(ram: &GuestRam) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let fd = ram.memfd.as_raw_fd();
    let mut pages = Vec::new();
    for r in &ram.ranges {
        let (start, end) = (r.file_offset, r.file_offset + r.size);
        let mut off = start;
        while off < end {
            let Ok(o) = libc::off_t::try_from(off) else {
                break;
            };
            // SAFETY: lseek on our own memfd; it only returns an offset.
            let data = unsafe { libc::lseek(fd, o, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data after `off`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let data = u64::try_from(data).unwrap_or(end).min(end);
            let hole = if hole < 0 {
                end
            } else {
                u64::try_from(hole).unwrap_or(end).min(end)
            };
            let mut p = data & !(PAGE - 1);
            while p < hole {
                pages.push(r.start + (p - start));
                p += PAGE;
            }
            off = hole.max(data + PAGE);
        }
    }
    pages
}

/// What the source needs from the running VM.
pub trait SourceVm {
    /// Parks every vCPU (they stay parked until [`SourceVm::resume`]).
    fn pause(&self) -> Result<(), MigrateError>;
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// Every vCPU's state (vCPUs parked).
    fn vcpu_states(&self) -> Result<Vec<VcpuState>, MigrateError>;
    /// The VMM's own devices' state (vCPUs parked).
    fn vmm_devices(&self) -> Vec<(String, Vec<u8>)>;
    /// Whether the guest ended (powered off, reset, failed) meanwhile.
    fn guest_ended(&self) -> bool;
}

/// Parameters of an outgoing migration.
#[derive(Clone, Copy, Debug)]
pub struct SendParams {
    /// How long the guest may be stopped.
    pub downtime: Duration,
    /// How long the whole migration may take.
    pub timeout: Duration,
    /// Pre-copy (live) or straight stop-and-copy (snapshots).
    pub live: bool,
}

/// What a finished migration or snapshot did.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Report {
    /// Start to confirmation (or to the end of the file).
    pub total_ms: u64,
    /// vCPUs paused here until confirmation.
    pub downtime_ms: u64,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Pre-copy rounds, the first full pass included.
    pub rounds: u32,
}

/// Sends the VM over `out`; for a live migration reads the destination's
/// reply on `reply`. On success the vCPUs stay parked (the guest now runs
/// elsewhere, or the caller resumes after a snapshot); on error they run.
#[allow(clippy::too_many_arguments)]
pub fn send<W: Write, R: Read>(
    out: W,
    reply: Option<R>,
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    source: &dyn SourceVm,
    params: SendParams,
    cancel: &AtomicBool,
) -> Result<Report, MigrateError> {
    check_migratable(config)?;
    let start = Instant::now();
    let mut paused = false;
    let result = send_inner(
        out,
        reply,
        vm,
        ram,
        config,
        source,
        params,
        cancel,
        start,
        &mut paused,
    );
    if params.live {
        let _ = set_dirty_logging(vm, ram, false);
    }
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            if paused {
                source.resume();
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_inner<W: Write, R: Read>(
    out: W,
    reply: Option<R>,
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    source: &dyn SourceVm,
    params: SendParams,
    cancel: &AtomicBool,
    start: Instant,
    paused: &mut bool,
) -> Result<Report, MigrateError> {
    let mut w = StreamWriter::new(out)?;
    w.write(&Section::Handshake(shape(config)))?;
    let pages = GuestPages(&ram.memory);
    let mut rate = Rate::new();
    let mut rounds = 0u32;
    let mut pending: Vec<DirtyBitmap> = Vec::new();
    if params.live {
        set_dirty_logging(vm, ram, true)?;
        // Round 0: everything. Later rounds: what the guest dirtied.
        let t = Instant::now();
        let before = w.bytes_written();
        let counts = send_pages(&mut w, &pages, populated_pages(ram))?;
        rate.record(w.bytes_written() - before, t.elapsed());
        w.write(&Section::RoundEnd(RamStats {
            round: 0,
            data_pages: counts.data_pages,
            zero_pages: counts.zero_pages,
        }))?;
        rounds = 1;
        progress(0, w.bytes_written(), &rate, 0, None);
        let mut last_fetch = t;
        loop {
            if cancel.load(Ordering::Acquire) {
                return Err(MigrateError::Cancelled);
            }
            if source.guest_ended() {
                return Err(MigrateError::GuestEnded);
            }
            if start.elapsed() > params.timeout {
                return Err(MigrateError::Timeout(params.timeout));
            }
            let t = Instant::now();
            let dirty = dirty_pages(vm, ram)?;
            let count: u64 = dirty.iter().map(DirtyBitmap::count).sum();
            let since = last_fetch.elapsed();
            last_fetch = t;
            let remaining = count * PAGE;
            if fits(remaining, &rate, params.downtime) || rounds >= MAX_ROUNDS {
                pending = dirty;
                break;
            }
            let before = w.bytes_written();
            let mut counts = outboard_migration::ram::PageCounts::default();
            for b in &dirty {
                let c = send_pages(&mut w, &pages, b.iter())?;
                counts.data_pages += c.data_pages;
                counts.zero_pages += c.zero_pages;
            }
            let elapsed = t.elapsed();
            rate.record(w.bytes_written() - before, elapsed);
            w.write(&Section::RoundEnd(RamStats {
                round: rounds,
                data_pages: counts.data_pages,
                zero_pages: counts.zero_pages,
            }))?;
            let dirty_rate = (count as f64 / since.as_secs_f64().max(1e-6)) as u64;
            progress(
                rounds,
                w.bytes_written(),
                &rate,
                dirty_rate,
                rate.time_for(remaining),
            );
            rounds += 1;
        }
    }
    // Stop and copy.
    if params.live {
        eprintln!("outboard: migration: stop-and-copy (the guest is paused)");
    }
    let downtime_start = Instant::now();
    source.pause()?;
    *paused = true;
    if source.guest_ended() {
        return Err(MigrateError::GuestEnded);
    }
    let mut counts = outboard_migration::ram::PageCounts::default();
    if params.live {
        let last = dirty_pages(vm, ram)?;
        for (mut a, b) in pending.into_iter().zip(last) {
            a.union(&b)?;
            let c = send_pages(&mut w, &pages, a.iter())?;
            counts.data_pages += c.data_pages;
            counts.zero_pages += c.zero_pages;
        }
    } else {
        counts = send_pages(&mut w, &pages, populated_pages(ram))?;
        rounds = 1;
    }
    w.write(&Section::RamDone(RamStats {
        round: rounds,
        data_pages: counts.data_pages,
        zero_pages: counts.zero_pages,
    }))?;
    for (index, s) in source.vcpu_states()?.iter().enumerate() {
        w.write(&Section::VcpuState {
            index: index as u32,
            state: json(s)?,
        })?;
    }
    let vm_state = VmState::save(vm).map_err(|e| MigrateError::State(e.to_string()))?;
    w.write(&Section::Irqchip(json(&vm_state)?))?;
    for (name, state) in source.vmm_devices() {
        w.write(&Section::VmmDevice { name, state })?;
    }
    w.write(&Section::End)?;
    let bytes_sent = w.bytes_written();
    drop(w);
    if let Some(reply) = reply {
        let mut r = StreamReader::new(reply)?;
        match r.read()? {
            Section::Confirm => {}
            Section::Abort(why) => return Err(MigrateError::Aborted(why)),
            other => return Err(MigrateError::Protocol(format!("reply {:?}", other.id()))),
        }
    }
    Ok(Report {
        total_ms: start.elapsed().as_millis() as u64,
        downtime_ms: downtime_start.elapsed().as_millis() as u64,
        bytes_sent,
        rounds,
    })
}

fn progress(
    round: u32,
    bytes: u64,
    rate: &Rate,
    dirty_pages_per_s: u64,
    downtime: Option<Duration>,
) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "outboard: migration: round {round}: {:.1} MiB sent, {:.1} MiB/s, dirty {} pages/s, expected downtime {}",
        mib(bytes),
        mib(rate.bytes_per_second().unwrap_or(0)),
        dirty_pages_per_s,
        downtime.map_or("unknown".into(), |d| format!("{} ms", d.as_millis()))
    );
}

/// State a destination received, to load before its vCPUs run.
pub struct Incoming {
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The irqchip, PIT and clock.
    pub vm: VmState,
    /// The VMM's own devices.
    pub vmm_devices: Vec<(String, Vec<u8>)>,
}

/// Reads a stream into this VM's memory; returns the rest of the state.
/// On a shape mismatch an `Abort` goes back on `reply` (when there is one).
pub fn receive<R: Read>(
    input: R,
    reply: Option<&mut dyn Write>,
    ram: &GuestRam,
    config: &VmConfig,
) -> Result<Incoming, MigrateError> {
    let mut r = StreamReader::new(input)?;
    let abort = |reply: Option<&mut dyn Write>, why: &str| {
        if let Some(out) = reply {
            if let Ok(mut w) = StreamWriter::new(out) {
                let _ = w.write(&Section::Abort(why.to_string()));
            }
        }
    };
    let theirs = match r.read()? {
        Section::Handshake(s) => s,
        other => {
            return Err(MigrateError::Protocol(format!(
                "first section {:?}",
                other.id()
            )))
        }
    };
    let ours = shape(config);
    if let Err(e) = outboard_migration::shape::check(&theirs, &ours) {
        let why = e.to_string();
        abort(reply, &why);
        return Err(MigrateError::Shape(why));
    }
    if let Err(e) = check_migratable(config) {
        abort(reply, &e.to_string());
        return Err(e);
    }
    let mut sink = GuestPages(&ram.memory);
    let mut vcpus: Vec<Option<VcpuState>> = (0..config.machine.vcpus).map(|_| None).collect();
    let mut vm_state = None;
    let mut vmm_devices = Vec::new();
    loop {
        match r.read()? {
            Section::RamPages(p) => {
                apply_pages(&mut sink, &p)?;
            }
            Section::RoundEnd(stats) => {
                if stats.round == 0
                    && std::env::var("OUTBOARD_TEST_FAULT").as_deref() == Ok("stall-in-pre-copy")
                {
                    // Fault injection for the tests: a destination that stops
                    // reading in the middle of pre-copy.
                    eprintln!("outboard: test fault: stalling in pre-copy");
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            Section::RamDone(_) => {}
            Section::VcpuState { index, state } => {
                let slot = vcpus
                    .get_mut(index as usize)
                    .ok_or_else(|| MigrateError::Protocol(format!("state for vCPU {index}")))?;
                *slot = Some(
                    serde_json::from_slice(&state)
                        .map_err(|e| MigrateError::State(format!("vCPU {index} state: {e}")))?,
                );
            }
            Section::Irqchip(s) => {
                vm_state = Some(
                    serde_json::from_slice(&s)
                        .map_err(|e| MigrateError::State(format!("irqchip state: {e}")))?,
                )
            }
            Section::VmmDevice { name, state } => vmm_devices.push((name, state)),
            Section::End => break,
            other => return Err(MigrateError::Protocol(format!("section {:?}", other.id()))),
        }
    }
    let vcpus = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.ok_or_else(|| MigrateError::Protocol(format!("stream without vCPU {i}'s state")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vm =
        vm_state.ok_or_else(|| MigrateError::Protocol("stream without irqchip state".into()))?;
    Ok(Incoming {
        vcpus,
        vm,
        vmm_devices,
    })
}

/// Sends the destination's confirmation.
pub fn confirm(out: &mut dyn Write) -> Result<(), MigrateError> {
    let mut w = StreamWriter::new(out)?;
    w.write(&Section::Confirm)?;
    Ok(())
}

/// Serializes state for a stream section.
fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, MigrateError> {
    serde_json::to_vec(v).map_err(|e| MigrateError::State(e.to_string()))
}
