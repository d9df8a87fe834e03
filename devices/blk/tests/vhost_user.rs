//! The backend against a real vhost-user frontend (the `vhost` crate's),
//! over a unix socket: handshake, config space, and a queue served by the
//! worker thread, where a malformed chain fails alone.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use outboard_blk::daemon::{self, Listen, Stopper};
use outboard_blk::{BlkBackend, Disk, DiskOptions, QueueOptions};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x10_0000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("outboard-blk-it-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a backend on `dir/blk.sock` serving `dir/disk.img` (16 sectors,
/// sector s filled with s + 1) in a thread.
fn start(dir: &TempDir, queues: u16) -> (PathBuf, thread::JoinHandle<()>) {
    let image = dir.0.join("disk.img");
    let content: Vec<u8> = (0..16u8).flat_map(|s| [s + 1; 512]).collect();
    std::fs::write(&image, content).unwrap();
    let disk = Disk::open(&DiskOptions {
        image,
        readonly: false,
        direct: false,
        serial: Some("it".into()),
    })
    .unwrap();
    let backend = Arc::new(
        BlkBackend::new(
            Arc::new(disk),
            QueueOptions {
                queues,
                queue_size: 16,
                event_idx: true,
            },
        )
        .unwrap(),
    );
    let sock = dir.0.join("blk.sock");
    let listen = Listen::Socket(sock.clone());
    let mut listener = daemon::listener(&listen).unwrap();
    let stopper = Stopper::new(&listen);
    let t = thread::spawn(move || {
        daemon::serve(backend, &mut listener, &stopper).unwrap();
    });
    (sock, t)
}

fn handshake(sock: &PathBuf, queues: u64) -> Frontend {
    let mut fe = Frontend::connect(sock, queues).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    fe.set_protocol_features(
        proto & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
    )
    .unwrap();
    fe
}

#[test]
fn config_space() {
    let dir = TempDir::new("config");
    let (sock, t) = start(&dir, 2);
    let mut fe = handshake(&sock, 2);
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let flags = VhostUserConfigFlags::WRITABLE;
    let (_, cfg) = fe.get_config(0, 60, flags, &[0u8; 60]).unwrap();
    assert_eq!(&cfg[..8], &16u64.to_le_bytes());
    assert_eq!(&cfg[20..24], &512u32.to_le_bytes());
    assert_eq!(&cfg[34..36], &2u16.to_le_bytes());
    // Past the end of the structure: zeros, as many as asked.
    let (_, tail) = fe.get_config(90, 100, flags, &[0u8; 100]).unwrap();
    assert_eq!(tail.len(), 100);
    assert!(tail.iter().all(|b| *b == 0));
    let (_, far) = fe.get_config(4000, 96, flags, &[0u8; 96]).unwrap();
    assert_eq!(far, vec![0u8; 96]);
    // The config space is read-only: writes are ignored.
    fe.set_config(0, flags, &[1u8; 8]).unwrap();
    let (_, again) = fe.get_config(0, 60, flags, &[0u8; 60]).unwrap();
    assert_eq!(again, cfg);

    drop(fe);
    t.join().unwrap();
}

#[test]
fn queue_survives_malformed_chain() {
    let dir = TempDir::new("queue");
    let (sock, t) = start(&dir, 1);
    let mut fe = handshake(&sock, 1);

    let backing = dir.0.join("ram");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&backing)
        .unwrap();
    file.set_len(MEM_SIZE as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    fe.set_mem_table(&[info]).unwrap();
    let host = info.userspace_addr;

    let queue = MockSplitQueue::new(&mem, 16);
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: host + queue.desc_table_addr().0,
            used_ring_addr: host + queue.used_addr().0,
            avail_ring_addr: host + queue.avail_addr().0,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // Request headers at 0x1_0000 (8-byte bogus one) and 0x1_1000 (IN, sector 2).
    let (hdr_bad, hdr, data, st_bad, st) = (0x1_0000, 0x1_1000, 0x2_0000, 0x3_0000, 0x3_1000);
    mem.write_slice(&[0u8; 16], GuestAddress(hdr_bad)).unwrap();
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&2u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st_bad)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let descs: Vec<RawDescriptor> = [
        // Chain 0: header too short.
        Descriptor::new(hdr_bad, 8, next, 1),
        Descriptor::new(st_bad, 1, write, 0),
        // Chain 2: a good read of one sector.
        Descriptor::new(hdr, 16, next, 3),
        Descriptor::new(data, 512, write | next, 4),
        Descriptor::new(st, 1, write, 0),
    ]
    .iter()
    .map(|d| RawDescriptor::from(*d))
    .collect();
    queue.add_desc_chains(&descs, 0).unwrap();
    kick.write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.used().idx().load() < 2 {
        assert!(Instant::now() < deadline, "requests not completed");
        thread::sleep(Duration::from_millis(5));
    }
    let used = queue.used().ring();
    let (e0, e1) = (
        used.ref_at(0).unwrap().load(),
        used.ref_at(1).unwrap().load(),
    );
    assert_eq!((e0.id(), e0.len()), (0, 1));
    assert_eq!((e1.id(), e1.len()), (2, 513));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st_bad)).unwrap(), 1); // IOERR
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0); // OK
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(data)).unwrap();
    assert_eq!(back, [3u8; 512]);

    drop(fe);
    t.join().unwrap();
}
