//! The virtio-blk PCI function driven in-process, the test playing the
//! client: a memfd as guest RAM DMA-mapped, a driver bringing the device
//! up through the common configuration, requests on a queue with kicks
//! and MSI-X eventfds; then stop, save, restore into a second function on
//! the same image and memory, and carry on; refused blobs; dirty logging.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use outboard_blk::pci::{LoadError, SaveError, STATE_UUID};
use outboard_blk::{BlkPciFunction, Disk, DiskOptions, QueueOptions};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const PAGE: u64 = 0x1000;
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("outboard-blk-pci-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A 16-sector image, sector s filled with s + 1.
    fn image(&self) -> PathBuf {
        let image = self.0.join("disk.img");
        let content: Vec<u8> = (0..16u8).flat_map(|s| [s + 1; 512]).collect();
        std::fs::write(&image, content).unwrap();
        image
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn memfd(len: usize) -> File {
    const NAME: &CStr = c"guest-ram";
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags;
    // the result is checked.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    file
}

fn function(image: &Path) -> BlkPciFunction {
    let disk = Disk::open(&DiskOptions {
        image: image.to_path_buf(),
        readonly: false,
        direct: false,
        serial: None,
    })
    .unwrap();
    BlkPciFunction::new(
        Arc::new(disk),
        QueueOptions {
            queues: 2,
            queue_size: QSIZE,
            event_idx: true,
        },
    )
    .unwrap()
}

fn efd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn w(f: &mut BlkPciFunction, off: u64, v: u64, len: usize) {
    f.write_bar0(off, &v.to_le_bytes()[..len]);
}

fn r(f: &mut BlkPciFunction, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.read_bar0(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn cfg(f: &mut BlkPciFunction, off: usize, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.read_config(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// Walks the capability list: (id, virtio cfg_type, offset) per cap.
fn caps(f: &mut BlkPciFunction) -> Vec<(u8, u8, u32)> {
    let mut out = Vec::new();
    let mut at = cfg(f, 0x34, 1) as usize;
    while at != 0 {
        let id = cfg(f, at, 1) as u8;
        let (kind, off) = match id {
            0x09 => (cfg(f, at + 3, 1) as u8, cfg(f, at + 8, 4) as u32),
            0x11 => (0, cfg(f, at + 4, 4) as u32),
            _ => (0, 0),
        };
        out.push((id, kind, off));
        at = cfg(f, at + 1, 1) as usize;
    }
    out
}

/// The driver side: rings in the client's view of the memfd.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn new(ram: &File) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(ram.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Driver { mem, avail_idx: 0 }
    }

    /// Brings the device up like Linux's virtio-pci: features, queue 0 on
    /// our rings with vector 1, config vector 0, DRIVER_OK.
    fn bring_up(&self, f: &mut BlkPciFunction) {
        w(f, 0x14, 1 | 2, 1);
        w(f, 0x00, 0, 4);
        let mut offered = r(f, 0x04, 4);
        w(f, 0x00, 1, 4);
        offered |= r(f, 0x04, 4) << 32;
        assert_ne!(offered & VERSION_1, 0);
        assert_ne!(offered & EVENT_IDX, 0);
        for (sel, v) in [(0u64, EVENT_IDX), (1, VERSION_1 >> 32)] {
            w(f, 0x08, sel, 4);
            w(f, 0x0c, v, 4);
        }
        w(f, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(f, 0x14, 1), 0xb, "FEATURES_OK accepted");
        w(f, 0x10, 0, 2);
        w(f, 0x16, 0, 2);
        assert_eq!(r(f, 0x18, 2), u64::from(QSIZE));
        w(f, 0x18, u64::from(QSIZE), 2);
        w(f, 0x1a, 1, 2);
        assert_eq!(r(f, 0x1a, 2), 1);
        w(f, 0x20, DESC, 8);
        w(f, 0x28, AVAIL, 8);
        w(f, 0x30, USED, 8);
        w(f, 0x1c, 1, 2);
        w(f, 0x14, 0xf, 1);
        assert_eq!(r(f, 0x14, 1), 0xf, "DRIVER_OK without NEEDS_RESET");
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Request `k`: header, one sector of data, status, each in its own
    /// page; descriptors 3k..3k+2. Writes `fill` as the data of a write.
    fn submit(&mut self, k: u16, read: bool, sector: u64, fill: u8) {
        let (hdr, data, st) = (page_of(HDR, k), page_of(DATA, k), page_of(STATUS, k));
        let kind = if read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem
            .write_slice(&[fill; 512], GuestAddress(data))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let head = 3 * k;
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        self.desc(head, hdr, 16, next, head + 1);
        let data_flags = if read { next | write } else { next };
        self.desc(head + 1, data, 512, data_flags, head + 2);
        self.desc(head + 2, st, 1, write, 0);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // used_event: interrupt once the device passes what we have seen.
        let seen = self.used_idx();
        self.mem
            .write_obj(seen, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn status(&self, k: u16) -> u8 {
        self.mem.read_obj(GuestAddress(page_of(STATUS, k))).unwrap()
    }

    fn data(&self, k: u16) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        self.mem
            .read_slice(&mut b, GuestAddress(page_of(DATA, k)))
            .unwrap();
        b
    }

    /// Waits for `vector` to fire and the used index to reach `idx`.
    fn wait(&self, vector: &EventFd, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fired = false;
        while !fired || self.used_idx() != idx {
            fired |= vector.read().is_ok();
            assert!(
                Instant::now() < deadline,
                "used idx {} (want {idx}), interrupt {fired}",
                self.used_idx()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Driver {
    /// Waits until the worker has re-enabled notifications (avail_event
    /// caught up: its last write), and a little more for the dirty bit.
    fn settle(&self) {
        let at = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mem.read_obj::<u16>(at).unwrap() != self.avail_idx {
            assert!(Instant::now() < deadline, "avail_event never caught up");
            thread::sleep(Duration::from_millis(2));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn page_of(base: u64, k: u16) -> u64 {
    base + u64::from(k) * PAGE
}

fn sector(image: &Path, s: usize) -> Vec<u8> {
    std::fs::read(image).unwrap()[s * 512..(s + 1) * 512].to_vec()
}

fn kick(f: &BlkPciFunction) {
    let fds = f.notify_fds();
    assert_eq!((fds[0].0, fds[0].1), (0x3000, 2));
    assert_eq!(fds[1].0, 0x3004);
    fds[0].2.write(1).unwrap();
}

/// The payload of `blob` edited as JSON.
fn edit(blob: &[u8], change: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&blob[20..]).unwrap();
    change(&mut v);
    let mut out = blob[..20].to_vec();
    out.extend(serde_json::to_vec(&v).unwrap());
    out
}

#[test]
fn the_function_can_move_to_a_server_thread() {
    fn send<T: Send>() {}
    send::<BlkPciFunction>();
}

#[test]
fn requests_migration_and_dirty_log() {
    let dir = TempDir::new("flow");
    let image = dir.image();
    let ram = memfd(MEM_SIZE);
    let mut drv = Driver::new(&ram);

    let mut f = function(&image);
    assert_eq!(cfg(&mut f, 0, 4), 0x1042_1af4);
    let c = caps(&mut f);
    assert!(
        c.contains(&(0x11, 0, 0x4000)),
        "MSI-X table in BAR 0 at 0x4000"
    );
    assert!(c.contains(&(0x09, 1, 0)), "common config at 0");
    assert!(c.contains(&(0x09, 2, 0x3000)), "notify at 0x3000");
    assert_eq!(f.bar0_size(), 0x8000);
    assert_eq!(f.msix_vectors(), 3);
    assert_eq!(r(&mut f, 0x2000, 8), 16, "capacity in device config");

    f.dma_map(0, MEM_SIZE as u64, ram.try_clone().unwrap(), 0, true)
        .unwrap();
    drv.bring_up(&mut f);
    let (cfg_irq, q0_irq) = (efd(), efd());
    f.set_msix_eventfds(
        0,
        vec![
            Some(cfg_irq.try_clone().unwrap()),
            Some(q0_irq.try_clone().unwrap()),
        ],
    )
    .unwrap();
    assert!(f.set_msix_eventfds(2, vec![None, None]).is_err());

    // Phase 1, logging DMA writes: write sector 2, read it back.
    f.dirty_logging_start(PAGE).unwrap();
    drv.submit(0, false, 2, 0xab);
    drv.submit(1, true, 2, 0);
    kick(&f);
    drv.wait(&q0_irq, 2);
    assert_eq!(drv.used(0), (0, 1));
    assert_eq!(drv.used(1), (3, 513));
    assert_eq!((drv.status(0), drv.status(1)), (0, 0));
    assert_eq!(drv.data(1), vec![0xab; 512]);
    assert_eq!(sector(&image, 2), vec![0xab; 512]);
    assert!(cfg_irq.read().is_err(), "no config interrupt");

    // Exactly: the used ring, the read's data, both status bytes (once
    // the worker is done re-enabling notifications).
    drv.settle();
    let bitmap = f.dirty_logging_report(0, MEM_SIZE as u64, PAGE).unwrap();
    let dirty: Vec<u64> = (0..(MEM_SIZE as u64 / PAGE))
        .filter(|p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .map(|p| p * PAGE)
        .collect();
    assert_eq!(
        dirty,
        vec![
            USED,
            page_of(DATA, 1),
            page_of(STATUS, 0),
            page_of(STATUS, 1)
        ]
    );
    let again = f.dirty_logging_report(0, MEM_SIZE as u64, PAGE).unwrap();
    assert!(again.iter().all(|b| *b == 0), "report clears");
    f.dirty_logging_stop();
    assert!(f.dirty_logging_report(0, PAGE, PAGE).is_err());

    // Stop: a request made available now is not taken.
    assert_eq!(f.save_state(), Err(SaveError::Running));
    f.stop();
    drv.submit(2, false, 5, 0xcd);
    kick(&f);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(drv.status(2), 0xff);
    assert!(q0_irq.read().is_err(), "no interrupt while stopped");
    assert_eq!(sector(&image, 5), vec![6u8; 512]);
    let blob = f.save_state().unwrap();
    assert_eq!(blob[..16], STATE_UUID);
    assert_eq!(blob[16..20], 1u32.to_le_bytes());

    // The destination: same image and memory.
    let mut g = function(&image);
    g.dma_map(0, MEM_SIZE as u64, ram.try_clone().unwrap(), 0, true)
        .unwrap();
    g.stop();
    let pristine = g.save_state().unwrap();
    let mut pristine_cfg = [0u8; 256];
    g.read_config(0, &mut pristine_cfg);

    let mut bad_uuid = blob.clone();
    bad_uuid[3] ^= 0x40;
    let mut bad_version = blob.clone();
    bad_version[16..20].copy_from_slice(&2u32.to_le_bytes());
    let mut garbage = blob[..20].to_vec();
    garbage.extend_from_slice(b"{\"shape\": 7 garbage");
    let rejects: Vec<(&str, Vec<u8>)> = vec![
        ("uuid", bad_uuid),
        ("version", bad_version),
        ("garbage", garbage),
        ("empty", Vec::new()),
        ("header only", blob[..19].to_vec()),
        ("no payload", blob[..20].to_vec()),
        ("truncated", blob[..blob.len() / 2].to_vec()),
        ("cut short", blob[..blob.len() - 1].to_vec()),
        (
            "capacity",
            edit(&blob, |v| v["shape"]["capacity"] = 17.into()),
        ),
        ("unknown field", edit(&blob, |v| v["extra"] = true.into())),
        (
            "state for an idle queue",
            edit(&blob, |v| {
                v["queues"][1] = serde_json::json!({"next_avail": 0, "next_used": 0})
            }),
        ),
        (
            "no state for a running queue",
            edit(&blob, |v| v["queues"][0] = serde_json::Value::Null),
        ),
        (
            "too many queues",
            edit(&blob, |v| {
                v["queues"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::Value::Null)
            }),
        ),
        (
            "short MSI-X table",
            edit(&blob, |v| {
                v["transport"]["msix"]["table"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
        ),
        (
            "bad vector",
            edit(&blob, |v| v["transport"]["queue_vectors"][0] = 9.into()),
        ),
        (
            "features not offered",
            edit(&blob, |v| {
                v["transport"]["common"]["driver_features"] = u64::MAX.into()
            }),
        ),
        (
            "unaligned ring",
            edit(&blob, |v| {
                v["transport"]["common"]["queues"][0]["used_ring"] = (USED + 2).into()
            }),
        ),
    ];
    for (what, bad) in &rejects {
        let e = g.load_state(bad).expect_err(what);
        match *what {
            "uuid" => assert!(matches!(e, LoadError::Format(_)), "{e}"),
            "too many queues" => assert!(matches!(e, LoadError::QueueCount { .. }), "{e}"),
            "short MSI-X table" => assert!(matches!(e, LoadError::MsixTable(3)), "{e}"),
            "version" => assert!(matches!(e, LoadError::Version { found: 2 }), "{e}"),
            _ => {}
        }
        assert_eq!(g.save_state().unwrap(), pristine, "{what} changed state");
        let mut now = [0u8; 256];
        g.read_config(0, &mut now);
        assert_eq!(now, pristine_cfg, "{what} changed config space");
    }
    g.run().unwrap();
    assert!(matches!(g.load_state(&blob), Err(LoadError::Running)));
    g.stop();

    g.load_state(&blob).unwrap();
    assert_eq!(r(&mut g, 0x14, 1), 0xf);
    w(&mut g, 0x16, 0, 2);
    assert_eq!(r(&mut g, 0x1a, 2), 1, "queue 0 on vector 1");
    assert_eq!(r(&mut g, 0x30, 8), USED);
    let q0_irq2 = efd();
    g.set_msix_eventfds(1, vec![Some(q0_irq2.try_clone().unwrap())])
        .unwrap();
    g.run().unwrap();
    // The request left in the avail ring is served on resume.
    drv.wait(&q0_irq2, 3);
    assert_eq!(drv.used(2), (6, 1));
    assert_eq!(drv.status(2), 0);
    assert_eq!(sector(&image, 5), vec![0xcd; 512]);
    // And the queue carries on.
    drv.submit(3, true, 5, 0);
    kick(&g);
    drv.wait(&q0_irq2, 4);
    assert_eq!(drv.used(3), (9, 513));
    assert_eq!(drv.data(3), vec![0xcd; 512]);
    assert!(q0_irq.read().is_err(), "the source stayed quiet");

    // Reset: the driver sees status 0, the queue no longer runs.
    g.reset();
    assert_eq!(r(&mut g, 0x14, 1), 0);
    assert!(g.running());
    drv.submit(4, false, 7, 0xee);
    kick(&g);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(drv.used_idx(), 4);
    drop(f);
}

#[test]
fn dma_windows_change_while_running() {
    let dir = TempDir::new("remap");
    let image = dir.image();
    let ram = memfd(MEM_SIZE);
    let mut drv = Driver::new(&ram);
    let mut f = function(&image);
    // Rings and headers below 128 KiB, data and status above, in another
    // window.
    let split = 0x2_0000u64;
    f.dma_map(0, split, ram.try_clone().unwrap(), 0, true)
        .unwrap();
    f.dma_map(
        split,
        MEM_SIZE as u64 - split,
        ram.try_clone().unwrap(),
        split,
        true,
    )
    .unwrap();
    drv.bring_up(&mut f);
    let irq = efd();
    f.set_msix_eventfds(1, vec![Some(irq.try_clone().unwrap())])
        .unwrap();
    drv.submit(0, true, 1, 0);
    kick(&f);
    drv.wait(&irq, 1);
    assert_eq!(drv.data(0), vec![2u8; 512]);
    // Unmap and remap the upper window while the queue runs.
    assert!(f.dma_unmap(split, 0x1000).is_err());
    f.dma_unmap(split, MEM_SIZE as u64 - split).unwrap();
    f.dma_map(
        split,
        MEM_SIZE as u64 - split,
        ram.try_clone().unwrap(),
        split,
        true,
    )
    .unwrap();
    drv.submit(1, true, 3, 0);
    kick(&f);
    drv.wait(&irq, 2);
    assert_eq!(drv.data(1), vec![4u8; 512]);
}

#[test]
fn garbage_from_the_client_is_harmless() {
    let dir = TempDir::new("garbage");
    let image = dir.image();
    let mut f = function(&image);
    let ram = memfd(MEM_SIZE);
    f.dma_map(0, MEM_SIZE as u64, ram.try_clone().unwrap(), 0, true)
        .unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8, 3, 16][(x % 6) as usize];
        let off = match x >> 60 {
            0 => u64::MAX - (x & 7),
            _ => (x >> 8) % 0x9000,
        };
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&x.to_le_bytes());
        if x & 0x100 == 0 {
            f.write_bar0(off, &buf[..len]);
            f.write_config((x >> 24) as usize % 300, &buf[..len]);
        } else {
            f.read_bar0(off, &mut buf[..len]);
            f.read_config((x >> 24) as usize % 300, &mut buf[..len]);
        }
    }
    assert_eq!(cfg(&mut f, 0, 4), 0x1042_1af4);
    for (iova, size, off) in [
        (0x123, 0x1000, 0),
        (!0xfffu64, 0x2000, 0),
        (0x20_0000, 0x1000, !0xfffu64),
        (0x20_0000, 0x20_0000, 0),
        (0x8_0000, 0x1000, 0),
    ] {
        assert!(f
            .dma_map(iova, size, ram.try_clone().unwrap(), off, true)
            .is_err());
    }
    assert!(f.dma_unmap(0, 0x1000).is_err());
    assert!(f.dirty_logging_start(3).is_err());
    f.dirty_logging_start(PAGE).unwrap();
    assert!(f.dirty_logging_report(0, u64::MAX, PAGE).is_err());
    assert!(f.dirty_logging_report(1, PAGE, PAGE).is_err());
    f.stop();
    let blob = f.save_state().unwrap();
    f.load_state(&blob).unwrap();
    f.run().unwrap();
}
