//! A client and a server (with a fake device) over a socketpair: every
//! command, DMA both ways, migration, DMA logging, disconnect.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::*;
use outboard_vfio_user::wire::{self, DmaLoggingRange};
use outboard_vfio_user::{
    Client, ClientConfig, ClientError, IrqAction, IrqSetData, MigrationState, ServerConfig,
};

fn refused(r: Result<impl std::fmt::Debug, ClientError>, errno: i32) {
    match r {
        Err(ClientError::Refused(e)) => assert_eq!(e, errno),
        other => panic!("expected errno {errno}, got {other:?}"),
    }
}

fn write_ctrl(c: &mut Client, iova: u64, len: u64, cmd: u32) -> u32 {
    c.region_write(1, CTRL_IOVA, &iova.to_le_bytes()).unwrap();
    c.region_write(1, CTRL_LEN, &len.to_le_bytes()).unwrap();
    c.region_write(1, CTRL_CMD, &cmd.to_le_bytes()).unwrap();
    let mut s = [0u8; 4];
    c.region_read(1, CTRL_STATUS, &mut s).unwrap();
    u32::from_le_bytes(s)
}

#[test]
fn every_command_round_trips() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    assert_eq!(c.minor_version(), wire::VERSION_MINOR);
    assert_eq!(c.server_capabilities().max_msg_fds, 16);

    let info = c.device_info().unwrap();
    assert_eq!(info.num_regions, 9);
    assert_eq!(info.num_irqs, 5);
    assert_eq!(
        info.flags,
        wire::DEVICE_FLAGS_PCI | wire::DEVICE_FLAGS_RESET
    );

    // BAR0: mmap-able with a sparse area and a descriptor that maps it.
    let (bar0, fd) = c.region_info(0).unwrap();
    assert_eq!(bar0.size, BAR0_SIZE);
    assert_ne!(bar0.flags & wire::REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(bar0.sparse_areas.len(), 1);
    assert_eq!(bar0.sparse_areas[0].offset, 0x800);
    let bar_file = std::fs::File::from(fd.expect("bar0 fd"));
    bar_file.write_all_at(b"through the fd", 0x10).unwrap();
    let mut b = [0u8; 14];
    c.region_read(0, 0x10, &mut b).unwrap();
    assert_eq!(&b, b"through the fd");

    let (cfg, fd) = c.region_info(wire::PCI_CONFIG_REGION_INDEX).unwrap();
    assert!(fd.is_none());
    assert_eq!(cfg.size, CONFIG_SIZE);
    assert_eq!(cfg.flags & wire::REGION_INFO_FLAG_CAPS, 0);
    refused(c.region_info(9), libc::EINVAL);

    // Config space read/write.
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).unwrap();
    assert_eq!(id, [0xf4, 0x1a, 0x42, 0x10]);
    c.region_write(7, 0x40, &[1, 2, 3, 4, 5]).unwrap();
    let mut back = [0u8; 5];
    c.region_read(7, 0x40, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5]);
    refused(c.region_read(7, 250, &mut [0u8; 8]), libc::EINVAL);
    refused(c.region_write(2, 0, &[1]), libc::EINVAL); // read-only region
    c.region_read(2, 0, &mut back).unwrap();
    assert_eq!(back, [0x5a; 5]);

    // Region io fds: two sub-regions sharing one eventfd.
    let io = c.region_io_fds(1).unwrap();
    assert_eq!(io.sub_regions.len(), 2);
    assert_eq!(io.fds.len(), 1);
    assert_eq!(io.sub_regions[1].data, 7);
    assert_eq!(io.sub_regions[1].flags, wire::KVM_IOEVENTFD_FLAG_DATAMATCH);
    assert!(c.region_io_fds(0).unwrap().sub_regions.is_empty());

    // IRQs.
    let msix = c.irq_info(wire::PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(msix.count, MSIX_COUNT);
    refused(c.irq_info(5), libc::EINVAL);
    let efds: Vec<_> = (0..4).map(|_| eventfd()).collect();
    let borrowed: Vec<_> = efds.iter().map(|e| e.as_fd()).collect();
    c.set_irqs(2, 0, 4, IrqAction::Trigger, IrqSetData::Eventfds(&borrowed))
        .unwrap();
    // The client triggers vector 2 itself; the device signals its eventfd.
    c.set_irqs(2, 2, 1, IrqAction::Trigger, IrqSetData::None)
        .unwrap();
    assert_eq!(eventfd_read(&efds[2]), Some(1));
    assert_eq!(eventfd_read(&efds[1]), None);
    c.set_irqs(
        2,
        0,
        2,
        IrqAction::Trigger,
        IrqSetData::Bool(&[false, true]),
    )
    .unwrap();
    assert_eq!(eventfd_read(&efds[1]), Some(1));
    // Out of range, mask on a non-maskable type, wrong eventfd count.
    refused(
        c.set_irqs(2, 3, 2, IrqAction::Trigger, IrqSetData::None),
        libc::EINVAL,
    );
    refused(
        c.set_irqs(2, 0, 1, IrqAction::Mask, IrqSetData::None),
        libc::EINVAL,
    );
    c.set_irqs(0, 0, 1, IrqAction::Mask, IrqSetData::None)
        .unwrap();
    assert!(matches!(
        c.set_irqs(
            2,
            0,
            4,
            IrqAction::Trigger,
            IrqSetData::Eventfds(&borrowed[..2])
        ),
        Err(ClientError::InvalidArgument(_))
    ));

    // DMA map/unmap without descriptor.
    c.dma_map(rw(0x10_0000, 0x2000), None).unwrap();
    refused(c.dma_map(rw(0x20_0000, 0x1800), None), libc::EINVAL);
    refused(c.dma_unmap(0x10_0000, 0x1000), libc::ENOENT);
    c.dma_unmap(0x10_0000, 0x2000).unwrap();
    c.dma_map(rw(0x30_0000, 0x1000), None).unwrap();
    c.dma_map(rw(0x40_0000, 0x1000), None).unwrap();
    c.dma_unmap_all().unwrap();
    {
        let obs = running.obs.lock().unwrap();
        assert_eq!(obs.maps.len(), 3);
        assert_eq!(obs.unmaps.len(), 3);
    }

    // Features.
    assert!(c
        .probe_feature(wire::FEATURE_MIGRATION, wire::DEVICE_FEATURE_GET)
        .unwrap());
    assert!(!c
        .probe_feature(wire::FEATURE_MIGRATION, wire::DEVICE_FEATURE_SET)
        .unwrap());
    assert!(c
        .probe_feature(
            wire::FEATURE_MIG_DEVICE_STATE,
            wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET
        )
        .unwrap());
    assert!(!c.probe_feature(3, wire::DEVICE_FEATURE_GET).unwrap());
    assert_eq!(
        c.migration_flags().unwrap(),
        wire::MIGRATION_STOP_COPY | wire::MIGRATION_PRE_COPY
    );
    assert_eq!(c.migration_state().unwrap(), MigrationState::Running);

    // Reset.
    c.reset().unwrap();
    c.region_read(7, 0x40, &mut back).unwrap();
    assert_eq!(back, [0; 5]);
    assert_eq!(running.obs.lock().unwrap().resets, 1);

    drop(c);
    let (_, _, r) = running.thread.join().unwrap();
    r.unwrap();
    // Disconnect disabled every IRQ type.
    let obs = running.obs.lock().unwrap();
    assert!(obs.msix_fds.iter().all(Option::is_none));
    assert_eq!(
        obs.irq_sets
            .iter()
            .filter(|(_, s, n, a, _)| *s == 0 && *n == 0 && *a == IrqAction::Trigger)
            .count(),
        5
    );
}

#[test]
fn dma_through_fd() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    let guest = memfd(0x10000);
    // Window at IOVA 0x8000_0000 = file offset 0x4000, 0x8000 bytes.
    c.dma_map(rw(0x8000_0000, 0x8000), Some((guest.as_fd(), 0x4000)))
        .unwrap();
    guest.write_all_at(b"hello from guest", 0x5000).unwrap();
    // Device reads guest memory into BAR0.
    assert_eq!(write_ctrl(&mut c, 0x8000_1000, 16, 2), 0);
    let mut b = [0u8; 16];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"hello from guest");
    // Device writes BAR0 into guest memory, across a page boundary.
    c.region_write(0, 0, b"written by the device").unwrap();
    assert_eq!(write_ctrl(&mut c, 0x8000_0ff8, 21, 1), 0);
    let mut g = [0u8; 21];
    guest.read_exact_at(&mut g, 0x4ff8).unwrap();
    assert_eq!(&g, b"written by the device");
    // Outside the window: the device sees EFAULT.
    assert_eq!(write_ctrl(&mut c, 0x8000_7ff8, 16, 1), libc::EFAULT as u32);
    // Overlap refused; descriptor smaller than the window refused.
    refused(
        c.dma_map(rw(0x9000_0000, 0x1000), Some((guest.as_fd(), 0x10000))),
        libc::EINVAL,
    );
    drop(c);
    running.thread.join().unwrap().2.unwrap();
}

#[test]
fn dma_through_messages() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mem = VecMemory::new(0x100_0000, 0x4000);
    let mut c = Client::connect_with(
        sock,
        ClientConfig {
            // Small transfers: the server must split its DMA into messages.
            max_data_xfer_size: 7,
            memory: Some(mem.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    c.dma_map(rw(0x100_0000, 0x2000), None).unwrap();
    c.dma_map(
        outboard_vfio_user::DmaRange {
            iova: 0x100_2000,
            size: 0x1000,
            readable: true,
            writable: false,
        },
        None,
    )
    .unwrap();
    mem.bytes.lock().unwrap()[0x1ff0..0x2010].copy_from_slice(&[0xab; 0x20]);
    // A read spanning two adjacent windows, served while the client waits
    // for its REGION_WRITE reply.
    assert_eq!(write_ctrl(&mut c, 0x100_1ff0, 0x20, 2), 0);
    let mut b = [0u8; 0x20];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0xab; 0x20]);
    // Device writes to guest memory.
    c.region_write(0, 0, b"by message").unwrap();
    assert_eq!(write_ctrl(&mut c, 0x100_0100, 10, 1), 0);
    assert_eq!(&mem.bytes.lock().unwrap()[0x100..0x10a], b"by message");
    // The read-only window refuses the device's write (EACCES on the
    // server's side; the client would also refuse it).
    assert_eq!(write_ctrl(&mut c, 0x100_2000, 4, 1), libc::EACCES as u32);

    // A device thread doing DMA while the client is idle: the client
    // serves it from its event loop.
    let dma = running.dma.clone();
    let t = std::thread::spawn(move || {
        dma.write(0x100_0200, b"async").unwrap();
        let mut r = [0u8; 3];
        dma.read(0x100_0200, &mut r).unwrap();
        r
    });
    while !t.is_finished() {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&c.as_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 50) } == 1 {
            c.process_server_request().unwrap();
        }
    }
    assert_eq!(&t.join().unwrap(), b"asy");
    assert_eq!(&mem.bytes.lock().unwrap()[0x200..0x205], b"async");
    drop(c);
    running.thread.join().unwrap().2.unwrap();
}

/// Saves the device on one server and restores it on a second.
#[test]
fn migration_between_two_servers() {
    let (sock, src) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    c.region_write(0, 0x100, b"device memory").unwrap();
    c.region_write(7, 0x80, &[9, 8, 7]).unwrap();
    c.region_write(1, CTRL_LEN, &77u64.to_le_bytes()).unwrap();

    // RUNNING -> STOP -> STOP_COPY, reading the blob in small chunks.
    c.set_migration_state(MigrationState::Stop).unwrap();
    assert!(src.obs.lock().unwrap().paused);
    c.set_migration_state(MigrationState::StopCopy).unwrap();
    let mut blob = Vec::new();
    loop {
        let chunk = c.mig_data_read(1000).unwrap();
        blob.extend_from_slice(&chunk);
        if chunk.len() < 1000 {
            break;
        }
    }
    assert_eq!(blob.len(), 4 + 4096 + 64 + 256);
    // Reading past the end keeps returning nothing.
    assert!(c.mig_data_read(1000).unwrap().is_empty());
    c.set_migration_state(MigrationState::Stop).unwrap();
    refused(c.mig_data_read(16), libc::EINVAL);
    drop(c);
    let (src_dev, src_server, r) = src.thread.join().unwrap();
    r.unwrap();
    assert_eq!(src_server.migration_state(), MigrationState::Stop);

    // Destination: STOP -> RESUMING, write, -> STOP -> RUNNING.
    let (sock, dst) = spawn_server(ServerConfig::default());
    let mut d = Client::connect_with(
        sock,
        ClientConfig {
            max_data_xfer_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    d.set_migration_state(MigrationState::Resuming).unwrap();
    assert_eq!(d.migration_state().unwrap(), MigrationState::Resuming);
    d.mig_data_write(&blob).unwrap();
    d.set_migration_state(MigrationState::Running).unwrap();
    assert!(!dst.obs.lock().unwrap().paused);
    let mut b = [0u8; 13];
    d.region_read(0, 0x100, &mut b).unwrap();
    assert_eq!(&b, b"device memory");
    drop(d);
    let (dst_dev, _, r) = dst.thread.join().unwrap();
    r.unwrap();
    assert_eq!(dst_dev.bar0_bytes(), src_dev.bar0_bytes());
    assert_eq!(dst_dev.config, src_dev.config);
    assert_eq!(dst_dev.ctrl, src_dev.ctrl);
}

#[test]
fn pre_copy_then_stop_copy() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    c.set_migration_state(MigrationState::PreCopy).unwrap();
    assert!(!running.obs.lock().unwrap().paused);
    assert!(c.read_migration_data(1 << 20).unwrap().is_empty());
    c.set_migration_state(MigrationState::StopCopy).unwrap();
    assert!(running.obs.lock().unwrap().paused);
    let blob = c.read_migration_data(1 << 20).unwrap();
    assert_eq!(&blob[..4], b"FAKE");
    // STOP_COPY -> RUNNING is STOP_COPY -> STOP -> RUNNING.
    c.set_migration_state(MigrationState::Running).unwrap();
    assert!(!running.obs.lock().unwrap().paused);

    // Without PRE_COPY offered, the state is refused.
    let (sock, _r2) = spawn_server(ServerConfig {
        pre_copy: false,
        ..Default::default()
    });
    let mut c2 = Client::connect(sock).unwrap();
    assert_eq!(c2.migration_flags().unwrap(), wire::MIGRATION_STOP_COPY);
    refused(
        c2.set_migration_state(MigrationState::PreCopy),
        libc::EINVAL,
    );
}

#[test]
fn bad_transitions_refused() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    refused(c.set_migration_state(MigrationState::Error), libc::EINVAL);
    refused(
        c.set_migration_state(MigrationState::RunningP2p),
        libc::EINVAL,
    );
    refused(
        c.set_migration_state(MigrationState::PreCopyP2p),
        libc::EINVAL,
    );
    // An undefined state number.
    let flags = u32::from(wire::FEATURE_MIG_DEVICE_STATE) | wire::DEVICE_FEATURE_SET;
    let bad = wire::MigStateFeature {
        device_state: 99,
        data_fd: 0,
    };
    refused(c.device_feature(flags, &bad.encode(), 8), libc::EINVAL);
    // Migration data outside the saving / resuming states.
    refused(c.mig_data_read(16), libc::EINVAL);
    refused(c.mig_data_write(&[1, 2, 3]), libc::EINVAL);
    // STOP_COPY -> PRE_COPY is explicitly not allowed.
    c.set_migration_state(MigrationState::StopCopy).unwrap();
    refused(c.set_migration_state(MigrationState::PreCopy), libc::EINVAL);
    refused(c.mig_data_write(&[1]), libc::EINVAL);
    assert_eq!(c.migration_state().unwrap(), MigrationState::StopCopy);
    // A corrupt blob fails RESUMING -> STOP and leaves ERROR.
    c.set_migration_state(MigrationState::Resuming).unwrap();
    refused(c.mig_data_read(16), libc::EINVAL);
    c.mig_data_write(b"not a device state").unwrap();
    refused(c.set_migration_state(MigrationState::Stop), libc::EINVAL);
    assert_eq!(c.migration_state().unwrap(), MigrationState::Error);
    refused(c.set_migration_state(MigrationState::Running), libc::EINVAL);
    // Only a reset leaves ERROR.
    c.reset().unwrap();
    assert_eq!(c.migration_state().unwrap(), MigrationState::Running);
    assert!(!running.obs.lock().unwrap().paused);

    // A blob larger than the server accepts.
    let (sock, _r) = spawn_server(ServerConfig {
        max_state_size: 10,
        ..Default::default()
    });
    let mut c = Client::connect(sock).unwrap();
    c.set_migration_state(MigrationState::Resuming).unwrap();
    c.mig_data_write(&[0; 10]).unwrap();
    refused(c.mig_data_write(&[0]), libc::EFBIG);
}

#[test]
fn dma_logging_reports_device_writes() {
    let (sock, _running) = spawn_server(ServerConfig::default());
    let mem = VecMemory::new(0x20_0000, 0x4000);
    let mut c = Client::connect_with(
        sock,
        ClientConfig {
            memory: Some(mem.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let guest = memfd(0x10000);
    c.dma_map(rw(0, 0x10000), Some((guest.as_fd(), 0))).unwrap();
    c.dma_map(rw(0x20_0000, 0x4000), None).unwrap();

    refused(c.dma_logging_report(0, 0x10000, 4096), libc::EINVAL);
    assert!(c
        .probe_feature(wire::FEATURE_DMA_LOGGING_START, wire::DEVICE_FEATURE_SET)
        .unwrap());
    assert_eq!(
        c.dma_logging_start(
            4096,
            &[DmaLoggingRange {
                iova: 0,
                length: 0x10000
            }]
        )
        .unwrap(),
        4096
    );
    refused(c.dma_logging_start(4096, &[]), libc::EBUSY);
    // Device writes: pages 2-3 (through the mapping), and 0x20_1000 (by
    // message); a device read is not logged.
    assert_eq!(write_ctrl(&mut c, 0x2ffc, 8, 1), 0);
    assert_eq!(write_ctrl(&mut c, 0x20_1000, 16, 1), 0);
    assert_eq!(write_ctrl(&mut c, 0x8000, 16, 2), 0);
    assert_eq!(
        c.dma_logging_report(0, 0x10000, 4096).unwrap(),
        vec![0b1100]
    );
    assert_eq!(
        c.dma_logging_report(0x20_0000, 0x4000, 4096).unwrap(),
        vec![0b10]
    );
    // Reported pages are cleared.
    assert_eq!(c.dma_logging_report(0, 0x10000, 4096).unwrap(), vec![0]);
    // A coarser report page.
    assert_eq!(write_ctrl(&mut c, 0x5000, 1, 1), 0);
    assert_eq!(
        c.dma_logging_report(0, 0x10000, 0x4000).unwrap(),
        vec![0b10]
    );
    // Bad report arguments.
    refused(c.dma_logging_report(0x800, 0x1000, 4096), libc::EINVAL);
    c.dma_logging_stop().unwrap();
    refused(c.dma_logging_report(0, 0x10000, 4096), libc::EINVAL);
}

#[test]
fn large_reports_are_split() {
    let (sock, _running) = spawn_server(ServerConfig {
        max_data_xfer_size: 16,
        ..Default::default()
    });
    let mut c = Client::connect(sock).unwrap();
    let guest = memfd(0x100_0000);
    c.dma_map(rw(0, 0x100_0000), Some((guest.as_fd(), 0)))
        .unwrap();
    c.dma_logging_start(4096, &[]).unwrap();
    assert_eq!(write_ctrl(&mut c, 0xff_f000, 1, 1), 0);
    // 4096 pages = 64 words; at most 2 words per reply.
    let bm = c.dma_logging_report(0, 0x100_0000, 4096).unwrap();
    assert_eq!(bm.len(), 64);
    assert_eq!(bm[63], 1 << 63);
    assert!(bm[..63].iter().all(|w| *w == 0));
}

#[test]
fn reconnect_keeps_device_and_migration_state() {
    let (sock, running) = spawn_server(ServerConfig::default());
    let mut c = Client::connect(sock).unwrap();
    let guest = memfd(0x1000);
    c.dma_map(rw(0, 0x1000), Some((guest.as_fd(), 0))).unwrap();
    c.region_write(7, 0x10, &[42]).unwrap();
    c.set_migration_state(MigrationState::Stop).unwrap();
    drop(c);
    let (device, server, r) = running.thread.join().unwrap();
    r.unwrap();
    assert_eq!(running.obs.lock().unwrap().unmaps.len(), 1);

    let dma = running.dma.clone();
    let (sock, running) = spawn_with(device, server, dma);
    let mut c = Client::connect(sock).unwrap();
    assert_eq!(c.migration_state().unwrap(), MigrationState::Stop);
    let mut b = [0u8; 1];
    c.region_read(7, 0x10, &mut b).unwrap();
    assert_eq!(b, [42]);
    // The old window is gone.
    assert_eq!(write_ctrl(&mut c, 0, 1, 1), libc::EBUSY as u32);
    c.set_migration_state(MigrationState::Running).unwrap();
    assert_eq!(write_ctrl(&mut c, 0, 1, 1), libc::EFAULT as u32);
    drop(c);
    running.thread.join().unwrap().2.unwrap();
}
