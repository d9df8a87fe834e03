//! The vfio-user server's migration v2 state machine, driven from a client
//! with no guest and no VMM: this test is both, through
//! [`outboard_tests::vfio_driver`], against `outboard-blk --vfio-user`
//! processes on a raw image.
//!
//! - A device moves from process A to process B with requests still in
//!   the avail ring; they complete on B, whose used ring continues A's.
//! - Blobs of another format, another version, or cut short are refused,
//!   and the device keeps its state until the client resets it.
//! - Transitions outside the state machine are refused.
//! - DMA logging reports exactly the pages the device wrote.
//!
//! `outboard-blk` is found next to the test executable's directory
//! (`cargo build -p outboard-blk` first), or at `OUTBOARD_BLK_BIN`.

use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

use outboard_blk::pci::{STATE_UUID, STATE_VERSION};
use outboard_tests::bench::{outboard_blk_bin, Process};
use outboard_tests::vfio_driver::{
    poll_in, reg, Done, GuestRam, Kind, Tag, VfioBlk, QUEUE_VECTOR, USED_RING, VIRTIO_BLK_S_OK,
};
use outboard_tests::{blk_pattern_word, raw_image, TempDir};
use outboard_vfio_user::wire::{
    self, DmaLoggingRange, DEVICE_FEATURE_SET, FEATURE_DMA_LOGGING_START, FEATURE_MIG_DEVICE_STATE,
    MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use outboard_vfio_user::{ClientError, MigrationState};

/// Image size in sectors (1 MiB).
const SECTORS: u64 = 2048;
/// The guest's RAM.
const RAM: usize = 16 << 20;
/// Sectors per request (4 KiB).
const REQ: u64 = 8;
const SEED: u64 = 0x519_2a7e;
/// Largest blob accepted from the source.
const BLOB_LIMIT: usize = 1 << 20;

/// `sectors` sectors of the test guest's `blk` pattern from `sector`.
fn pattern(sector: u64, sectors: u64) -> Vec<u8> {
    (sector..sector + sectors)
        .flat_map(|s| (0..64).flat_map(move |i| blk_pattern_word(s, i, SEED).to_le_bytes()))
        .collect()
}

/// Whether the image holds `pattern(sector, sectors)`.
fn image_holds_pattern(image: &Path, sector: u64, sectors: u64) -> bool {
    let data = std::fs::read(image).expect("read the image");
    let at = (sector * 512) as usize;
    data.get(at..at + (sectors * 512) as usize) == Some(&pattern(sector, sectors)[..])
}

/// Starts `outboard-blk --vfio-user` on `image` and connects the driver
/// (DMA map of `ram`, MSI-X eventfds, the kick ioeventfd).
fn start(dir: &Path, image: &Path, name: &str, ram: &Rc<GuestRam>) -> (Process, VfioBlk) {
    let bin = outboard_blk_bin().expect("outboard-blk: run `cargo build -p outboard-blk` first");
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(bin);
    cmd.args(["--vfio-user", "--image"])
        .arg(image)
        .arg("--socket")
        .arg(&socket);
    let mut process =
        Process::spawn(name, cmd, dir.join(format!("{name}.log"))).expect("start outboard-blk");
    let stream = process.connect(&socket).expect("connect");
    let driver = VfioBlk::connect(stream, ram.clone())
        .unwrap_or_else(|e| panic!("{name}: connect: {e}; {}", process.log_tail()));
    (process, driver)
}

fn state(d: &mut VfioBlk) -> MigrationState {
    d.client().migration_state().expect("migration state")
}

fn set_state(d: &mut VfioBlk, s: MigrationState) {
    d.client()
        .set_migration_state(s)
        .unwrap_or_else(|e| panic!("-> {s:?}: {e}"));
    assert_eq!(state(d), s);
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) {
    assert!(
        matches!(r, Err(ClientError::Refused(_))),
        "{what}: expected an error reply, got {r:?}"
    );
}

/// Writes the pattern at `sector` and waits.
fn write_pattern(d: &mut VfioBlk, sector: u64) {
    let done = d
        .io(Kind::Write, sector, &pattern(sector, REQ))
        .expect("write");
    assert_eq!(done.status, VIRTIO_BLK_S_OK, "write at {sector}");
}

/// Reads `REQ` sectors at `sector` into a poisoned buffer and checks the
/// pattern.
fn check_pattern(d: &mut VfioBlk, sector: u64) {
    let done = d
        .io(Kind::Read, sector, &vec![0xa5; (REQ * 512) as usize])
        .expect("read");
    assert_eq!(done.status, VIRTIO_BLK_S_OK, "read at {sector}");
    assert_eq!(done.used_len, (REQ * 512) as u32 + 1, "read at {sector}");
    assert!(
        done.data == pattern(sector, REQ),
        "read at {sector}: wrong data"
    );
}

/// Reaps whatever is on the used ring now.
fn reap_now(d: &mut VfioBlk) -> Vec<Done> {
    d.wait_any_for(Duration::ZERO).expect("reap")
}

/// Brings a device up on `ram`, writes the pattern at sectors 0..32 and
/// saves it: STOP, STOP_COPY, the whole blob. Returns the blob and the
/// guest's queue; the source process is killed.
fn saved_device(dir: &Path, image: &Path, ram: &Rc<GuestRam>) -> (Vec<u8>, VfioBlk, Process) {
    let (process, mut a) = start(dir, image, "a", ram);
    assert_eq!(a.bring_up().expect("bring-up"), SECTORS);
    for k in 0..4 {
        write_pattern(&mut a, k * REQ);
    }
    set_state(&mut a, MigrationState::StopCopy);
    let blob = a
        .client()
        .read_migration_data(BLOB_LIMIT)
        .expect("read the blob");
    (blob, a, process)
}

#[test]
fn requests_queued_before_the_move_complete_on_the_destination() {
    let dir = TempDir::new("vfio-mig");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS * 512);
    let ram = Rc::new(GuestRam::new(RAM).expect("guest RAM"));

    // Process A: the device works.
    let (mut a_proc, mut a) = start(&dir.0, &img, "a", &ram);
    assert_eq!(a.bring_up().expect("bring-up"), SECTORS);
    assert_eq!(state(&mut a), MigrationState::Running);
    let flags = a.client().migration_flags().expect("migration flags");
    assert_eq!(flags & MIGRATION_STOP_COPY, MIGRATION_STOP_COPY);
    for k in 0..4 {
        write_pattern(&mut a, k * REQ);
    }
    for k in 0..4 {
        check_pattern(&mut a, k * REQ);
    }

    // Four writes kicked and not waited for, then STOP at once: the
    // device finishes whatever it took off the ring before STOP returns.
    let kicked: Vec<u64> = (0..4).map(|k| 64 + k * REQ).collect();
    for &s in &kicked {
        a.submit(Kind::Write, s, &pattern(s, REQ)).expect("submit");
    }
    set_state(&mut a, MigrationState::Stop);
    // Four more published (and kicked) while stopped: they stay in the
    // avail ring.
    let parked: Vec<u64> = (0..4).map(|k| 128 + k * REQ).collect();
    for &s in &parked {
        a.submit(Kind::Write, s, &pattern(s, REQ)).expect("submit");
    }
    let queue = a.queue().expect("queue");
    let used_at_stop = queue.used_idx();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        queue.used_idx(),
        used_at_stop,
        "a stopped device completed requests"
    );
    assert_eq!(queue.avail_idx(), 16);
    assert!(
        (8..=12).contains(&used_at_stop),
        "used index {used_at_stop} at STOP"
    );
    let on_a = reap_now(&mut a);
    assert_eq!(on_a.len(), usize::from(used_at_stop - 8));
    for d in &on_a {
        assert_eq!(d.status, VIRTIO_BLK_S_OK);
        assert!(kicked.contains(&d.sector));
    }
    let left = 16 - used_at_stop;
    assert_eq!(a.queue().expect("queue").in_flight(), usize::from(left));

    // STOP_COPY: the blob starts with the format UUID and version.
    set_state(&mut a, MigrationState::StopCopy);
    let blob = a
        .client()
        .read_migration_data(BLOB_LIMIT)
        .expect("read the blob");
    assert!(blob.len() > 20, "blob of {} bytes", blob.len());
    assert_eq!(blob[..16], STATE_UUID);
    assert_eq!(blob[16..20], STATE_VERSION.to_le_bytes());
    assert!(
        a.client().mig_data_read(4096).expect("read").is_empty(),
        "data past the end of the blob"
    );
    let queue = a.into_queue().expect("queue");
    a_proc.kill();

    // Process B, same image, same guest RAM: the VMM maps DMA and sets
    // the interrupts up first, then loads the state.
    let (b_proc, mut b) = start(&dir.0, &img, "b", &ram);
    set_state(&mut b, MigrationState::Resuming);
    b.client().mig_data_write(&blob).expect("write the blob");
    set_state(&mut b, MigrationState::Stop);
    let st = b.status().expect("status");
    assert_eq!(st & 0xf, 0xf, "restored status {st:#x}");
    b.adopt(queue);
    set_state(&mut b, MigrationState::Running);

    // Without a kick, the requests left in the avail ring complete on B,
    // signalled on B's eventfd, at the used ring positions after A's.
    let irq = b.irq(QUEUE_VECTOR).expect("queue vector");
    assert!(
        poll_in(irq, Duration::from_secs(10)).expect("poll"),
        "no interrupt from B; {}",
        b_proc.log_tail()
    );
    let mut on_b: Vec<Done> = Vec::new();
    while b.queue().expect("queue").in_flight() > 0 {
        on_b.extend(b.wait_any().expect("completions on B"));
    }
    assert_eq!(on_b.len(), usize::from(left));
    for (i, d) in on_b.iter().enumerate() {
        assert_eq!(d.used_index, used_at_stop + i as u16, "used ring position");
        assert_eq!(d.status, VIRTIO_BLK_S_OK);
        assert_eq!(d.kind, Kind::Write);
    }
    assert!(on_b
        .iter()
        .all(|d| kicked.contains(&d.sector) || parked.contains(&d.sector)));
    for p in &parked {
        assert!(
            on_b.iter().any(|d| d.sector == *p),
            "sector {p} not written"
        );
    }
    assert_eq!(b.queue().expect("queue").used_idx(), 16);
    for s in kicked.iter().chain(&parked) {
        assert!(image_holds_pattern(&img, *s, REQ), "image at sector {s}");
    }

    // New requests on B, and what A wrote reads back through B.
    for k in 0..4 {
        check_pattern(&mut b, k * REQ);
    }
    // Kicked through a REGION_WRITE of the notify address this time.
    let tag = b
        .publish(Kind::Write, 512, &pattern(512, REQ))
        .expect("publish");
    b.kick_by_region_write().expect("kick");
    assert_eq!(b.wait(tag).expect("write").status, VIRTIO_BLK_S_OK);
    check_pattern(&mut b, 512);
    assert!(image_holds_pattern(&img, 512, REQ));
    drop(b);
    drop(b_proc);
}

#[test]
fn bad_blobs_are_refused_and_leave_the_device_unchanged() {
    let dir = TempDir::new("vfio-mig-bad");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS * 512);
    let ram = Rc::new(GuestRam::new(RAM).expect("guest RAM"));
    let (blob, a, mut a_proc) = saved_device(&dir.0, &img, &ram);
    let queue = a.into_queue().expect("queue");
    a_proc.kill();

    let mut other_uuid = blob.clone();
    other_uuid[0] ^= 0xff;
    let mut other_version = blob.clone();
    other_version[16..20].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
    let cases: [(&str, &[u8]); 4] = [
        ("unknown format UUID", &other_uuid),
        ("another version", &other_version),
        ("payload cut short", &blob[..blob.len() - 8]),
        ("header cut short", &blob[..10]),
    ];

    let (b_proc, mut b) = start(&dir.0, &img, "b", &ram);
    // B's own state, to tell it from A's: a driver half-way through
    // initialisation.
    let own_status = 3;
    for (what, bad) in cases {
        b.write_bar0(reg::DEVICE_STATUS, own_status, 1)
            .expect("status");
        set_state(&mut b, MigrationState::Resuming);
        b.client().mig_data_write(bad).expect("write the blob");
        let r = b.client().set_migration_state(MigrationState::Stop);
        assert_refused(r, what);
        // The failed arc leaves the state machine in ERROR; the device
        // still answers register accesses, and kept its state.
        assert_eq!(state(&mut b), MigrationState::Error, "{what}");
        assert_eq!(b.status().expect("status"), own_status as u8, "{what}");
        // Only a reset leaves ERROR.
        for s in [
            MigrationState::Running,
            MigrationState::Stop,
            MigrationState::Resuming,
        ] {
            let r = b.client().set_migration_state(s);
            assert_refused(r, &format!("{what}: ERROR -> {s:?}"));
        }
        assert_refused(
            b.client().mig_data_write(&blob),
            &format!("{what}: data in ERROR"),
        );
        assert_eq!(state(&mut b), MigrationState::Error, "{what}");
        b.client().reset().expect("reset");
        assert_eq!(
            state(&mut b),
            MigrationState::Running,
            "{what}: after reset"
        );
        assert_eq!(b.status().expect("status"), 0, "{what}: after reset");
    }

    // The good blob then loads, and the device is A's.
    set_state(&mut b, MigrationState::Resuming);
    b.client().mig_data_write(&blob).expect("write the blob");
    set_state(&mut b, MigrationState::Stop);
    assert_eq!(b.status().expect("status") & 0xf, 0xf);
    b.adopt(queue);
    set_state(&mut b, MigrationState::Running);
    for k in 0..4 {
        check_pattern(&mut b, k * REQ);
    }
    write_pattern(&mut b, 256);
    check_pattern(&mut b, 256);
    drop(b);
    drop(b_proc);
}

#[test]
fn transitions_outside_the_state_machine_are_refused() {
    let dir = TempDir::new("vfio-mig-fsm");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS * 512);
    let ram = Rc::new(GuestRam::new(RAM).expect("guest RAM"));
    let (_p, mut d) = start(&dir.0, &img, "a", &ram);
    d.bring_up().expect("bring-up");
    let flags = d.client().migration_flags().expect("flags");
    assert_eq!(
        flags & (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY),
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    );
    assert_eq!(state(&mut d), MigrationState::Running);

    // Never a target: ERROR and the P2P states (not used in vfio-user),
    // nor a value that is no state at all.
    for s in [
        MigrationState::Error,
        MigrationState::RunningP2p,
        MigrationState::PreCopyP2p,
    ] {
        assert_refused(d.client().set_migration_state(s), &format!("-> {s:?}"));
        assert_eq!(state(&mut d), MigrationState::Running);
    }
    let raw = wire::MigStateFeature {
        device_state: 8,
        data_fd: u32::MAX,
    };
    let r = d.client().device_feature(
        u32::from(FEATURE_MIG_DEVICE_STATE) | DEVICE_FEATURE_SET,
        &raw.encode(),
        wire::MigStateFeature::SIZE,
    );
    assert_refused(r, "-> state 8");
    // No data outside its states.
    assert_refused(d.client().mig_data_read(64), "MIG_DATA_READ in RUNNING");
    assert_refused(
        d.client().mig_data_write(&[0; 64]),
        "MIG_DATA_WRITE in RUNNING",
    );
    assert_eq!(state(&mut d), MigrationState::Running);

    // STOP_COPY -> PRE_COPY is refused explicitly.
    set_state(&mut d, MigrationState::StopCopy);
    assert_refused(
        d.client().set_migration_state(MigrationState::PreCopy),
        "STOP_COPY -> PRE_COPY",
    );
    assert_eq!(state(&mut d), MigrationState::StopCopy);
    assert_refused(
        d.client().mig_data_write(&[0; 64]),
        "MIG_DATA_WRITE in STOP_COPY",
    );

    // Combination transitions go through STOP, as in Linux's
    // vfio_mig_get_next_state(): RUNNING -> RESUMING is one of them.
    set_state(&mut d, MigrationState::Running);
    set_state(&mut d, MigrationState::Resuming);
    assert_refused(d.client().mig_data_read(64), "MIG_DATA_READ in RESUMING");
    // RESUMING -> PRE_COPY (via STOP and RUNNING) loads the blob on the
    // way; nothing was written, so the load fails: ERROR, then reset.
    assert_refused(
        d.client().set_migration_state(MigrationState::PreCopy),
        "RESUMING -> PRE_COPY with no data",
    );
    assert_eq!(state(&mut d), MigrationState::Error);
    d.client().reset().expect("reset");
    assert_eq!(state(&mut d), MigrationState::Running);

    // The device still works after all this.
    d.bring_up().expect("bring-up after reset");
    write_pattern(&mut d, 0);
    check_pattern(&mut d, 0);
}

/// Waits until the device re-enabled kicks: its last write (the used
/// ring's flags) after a batch of requests, which may follow the
/// completion's interrupt.
fn settle(d: &VfioBlk) {
    let q = d.queue().expect("queue");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !q.needs_kick() {
        assert!(std::time::Instant::now() < deadline, "device never idle");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pages set in `bitmap` (one bit per 4 KiB page from address 0).
fn dirty_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, word) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push(w as u64 * 64 + b);
            }
        }
    }
    out
}

#[test]
fn dma_logging_reports_exactly_the_pages_the_device_wrote() {
    const PAGE: u64 = 4096;
    let dir = TempDir::new("vfio-mig-log");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS * 512);
    let ram = Rc::new(GuestRam::new(RAM).expect("guest RAM"));
    let (_p, mut d) = start(&dir.0, &img, "a", &ram);
    d.bring_up().expect("bring-up");
    // Writes before logging starts are not reported.
    write_pattern(&mut d, 0);
    check_pattern(&mut d, 0);
    settle(&d);

    assert!(d
        .client()
        .probe_feature(FEATURE_DMA_LOGGING_START, DEVICE_FEATURE_SET)
        .expect("probe"));
    let range = DmaLoggingRange {
        iova: 0,
        length: RAM as u64,
    };
    let page = d
        .client()
        .dma_logging_start(PAGE, &[range])
        .expect("logging start");
    assert_eq!(page, PAGE);
    let report = |d: &mut VfioBlk| {
        let bitmap = d
            .client()
            .dma_logging_report(0, RAM as u64, PAGE)
            .expect("report");
        assert_eq!(bitmap.len(), RAM / PAGE as usize / 64);
        dirty_pages(&bitmap)
    };
    assert_eq!(report(&mut d), Vec::<u64>::new(), "nothing written yet");

    let pages_of = |t: Tag, data_pages: u64| {
        let mut p = vec![USED_RING / PAGE, t.status_addr() / PAGE];
        p.extend((0..data_pages).map(|i| t.data_addr() / PAGE + i));
        p.sort_unstable();
        p
    };

    // A read: the data page, the used ring, the status byte.
    let done = d.io(Kind::Read, 0, &[0xa5; PAGE as usize]).expect("read");
    assert_eq!(done.status, VIRTIO_BLK_S_OK);
    assert!(done.data == pattern(0, REQ));
    settle(&d);
    assert_eq!(report(&mut d), pages_of(done.tag, 1), "after a read");
    assert_eq!(report(&mut d), Vec::<u64>::new(), "a report clears");

    // A write: the device only reads the data.
    let done = d.io(Kind::Write, 64, &pattern(64, REQ)).expect("write");
    assert_eq!(done.status, VIRTIO_BLK_S_OK);
    settle(&d);
    assert_eq!(report(&mut d), pages_of(done.tag, 0), "after a write");

    // A 16 KiB read: four data pages.
    let done = d.io(Kind::Read, 64, &[0; 4 * PAGE as usize]).expect("read");
    assert_eq!(done.status, VIRTIO_BLK_S_OK);
    settle(&d);
    assert_eq!(report(&mut d), pages_of(done.tag, 4), "after a 16 KiB read");

    d.client().dma_logging_stop().expect("logging stop");
    assert_refused(
        d.client().dma_logging_report(0, RAM as u64, PAGE),
        "report after stop",
    );
}
