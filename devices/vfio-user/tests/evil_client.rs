//! A hand-rolled, misbehaving client against the server: every bad request
//! gets an error reply and the server keeps serving, or, when the framing
//! itself is broken, the server closes the connection cleanly. Never a
//! panic.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use common::raw::*;
use common::*;
use outboard_vfio_user::{ServerConfig, ServerError, TransportError};

const EINVAL: u32 = libc::EINVAL as u32;
const ENOTSUP: u32 = libc::ENOTSUP as u32;

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_INFO: u16 = 4;
const GET_REGION_INFO: u16 = 5;
const GET_IRQ_INFO: u16 = 7;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DMA_READ: u16 = 11;
const RESET: u16 = 13;
const FEATURE: u16 = 16;
const MIG_DATA_READ: u16 = 17;
const MIG_DATA_WRITE: u16 = 18;

fn version_body(json: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 1, 0];
    b.extend_from_slice(json);
    b.push(0);
    b
}

fn connect() -> (UnixStream, Running) {
    let (s, running) = spawn_server(ServerConfig::default());
    timeouts(&s);
    send(
        &s,
        &msg(
            1,
            VERSION,
            COMMAND,
            &version_body(br#"{"capabilities":{"max_msg_fds":8}}"#),
        ),
    );
    let (h, body) = recv(&s).unwrap();
    assert!(h.is_reply() && !h.is_error());
    assert_eq!(&body[..4], &[0, 0, 1, 0]);
    (s, running)
}

/// Sends `bytes` and expects an error reply with `errno` for message `id`.
fn expect_error(s: &UnixStream, bytes: &[u8], id: u16, errno: u32) {
    send(s, bytes);
    expect_error_reply(s, id, errno);
}

fn expect_error_reply(s: &UnixStream, id: u16, errno: u32) {
    let (h, body) = recv(s).expect("a reply");
    assert_eq!(h.msg_id, id);
    assert!(h.is_reply() && h.is_error(), "{h:?}");
    assert_eq!(h.error, errno, "{h:?}");
    assert!(body.is_empty());
}

/// A valid request still works: the server kept serving.
fn still_serving(s: &UnixStream) {
    send(s, &msg(0x7777, GET_INFO, COMMAND, &u32s(&[16, 0, 0, 0])));
    let (h, body) = recv(s).unwrap();
    assert_eq!(h.msg_id, 0x7777);
    assert!(h.is_reply() && !h.is_error());
    assert_eq!(body, u32s(&[16, 3, 9, 5]));
}

fn finish(s: UnixStream, running: Running) -> Result<(), ServerError> {
    drop(s);
    running.thread.join().unwrap().2
}

#[test]
fn first_message_must_be_version() {
    let (s, running) = spawn_server(ServerConfig::default());
    timeouts(&s);
    expect_error(
        &s,
        &msg(3, GET_INFO, COMMAND, &u32s(&[16, 0, 0, 0])),
        3,
        EINVAL,
    );
    assert!(at_eof(&s));
    assert!(matches!(finish(s, running), Err(ServerError::Handshake(_))));
}

#[test]
fn bad_version_data_refused_and_closed() {
    for json in [
        &b"{"[..],
        b"[1]",
        br#"{"capabilities":{"max_msg_fds":"x"}}"#,
    ] {
        let (s, running) = spawn_server(ServerConfig::default());
        timeouts(&s);
        expect_error(
            &s,
            &msg(1, VERSION, COMMAND, &version_body(json)),
            1,
            EINVAL,
        );
        assert!(at_eof(&s));
        assert!(matches!(finish(s, running), Err(ServerError::Handshake(_))));
    }
    // Truncated version body.
    let (s, running) = spawn_server(ServerConfig::default());
    timeouts(&s);
    expect_error(&s, &msg(1, VERSION, COMMAND, &[0, 0]), 1, EINVAL);
    assert!(matches!(finish(s, running), Err(ServerError::Handshake(_))));
}

#[test]
fn unsupported_major_closes_without_reply() {
    let (s, running) = spawn_server(ServerConfig::default());
    timeouts(&s);
    send(&s, &msg(1, VERSION, COMMAND, &[1, 0, 0, 0]));
    assert!(at_eof(&s));
    assert!(matches!(finish(s, running), Err(ServerError::Handshake(_))));
}

#[test]
fn truncated_header_then_close() {
    let (s, running) = connect();
    send(&s, &header(2, GET_INFO, 32, 0, 0)[..7]);
    assert!(matches!(
        finish(s, running),
        Err(ServerError::Transport(TransportError::Truncated))
    ));
}

#[test]
fn size_field_larger_than_payload_then_close() {
    let (s, running) = connect();
    let mut m = header(2, GET_INFO, 16 + 64, 0, 0);
    m.extend_from_slice(&u32s(&[16, 0, 0, 0]));
    send(&s, &m);
    assert!(matches!(
        finish(s, running),
        Err(ServerError::Transport(TransportError::Truncated))
    ));
}

#[test]
fn size_field_smaller_than_header_closes() {
    let (s, running) = connect();
    send(&s, &header(2, GET_INFO, 8, 0, 0));
    assert!(at_eof(&s));
    assert!(matches!(
        finish(s, running),
        Err(ServerError::Transport(TransportError::TooSmall(8)))
    ));
}

#[test]
fn oversized_message_closes() {
    let (s, running) = connect();
    send(&s, &header(2, REGION_WRITE, 0x7fff_ffff, 0, 0));
    assert!(at_eof(&s));
    assert!(matches!(
        finish(s, running),
        Err(ServerError::Transport(TransportError::TooLarge { .. }))
    ));
}

#[test]
fn size_field_smaller_than_payload() {
    // The size field says 8 body bytes; 16 follow. The first 8 are the
    // (short) GET_INFO body; the next 16 parse as a header whose size field
    // (0) is below 16: the framing is broken and the server closes.
    let (s, running) = connect();
    let mut m = header(2, GET_INFO, 24, 0, 0);
    m.extend_from_slice(&u32s(&[16, 0, 0, 0]));
    m.extend_from_slice(&[0u8; 8]);
    send(&s, &m);
    expect_error_reply(&s, 2, EINVAL);
    assert!(at_eof(&s));
    assert!(finish(s, running).is_err());
}

#[test]
fn fixed_size_bodies_checked() {
    let (s, running) = connect();
    // GET_INFO: short, long, argsz below 16.
    expect_error(&s, &msg(2, GET_INFO, COMMAND, &u32s(&[16, 0])), 2, EINVAL);
    expect_error(
        &s,
        &msg(3, GET_INFO, COMMAND, &u32s(&[16, 0, 0, 0, 0])),
        3,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(4, GET_INFO, COMMAND, &u32s(&[8, 0, 0, 0])),
        4,
        EINVAL,
    );
    // DMA_MAP: 31 bytes, bad argsz.
    expect_error(&s, &msg(5, DMA_MAP, COMMAND, &[0u8; 31]), 5, EINVAL);
    let mut map = u32s(&[33, 3]);
    map.extend_from_slice(&[0u8; 24]);
    expect_error(&s, &msg(6, DMA_MAP, COMMAND, &map), 6, EINVAL);
    // DMA_UNMAP of something never mapped; unknown flags.
    let mut unmap = u32s(&[24, 0]);
    unmap.extend_from_slice(&0x1000u64.to_le_bytes());
    unmap.extend_from_slice(&0x1000u64.to_le_bytes());
    expect_error(
        &s,
        &msg(7, DMA_UNMAP, COMMAND, &unmap),
        7,
        libc::ENOENT as u32,
    );
    unmap[4] = 8;
    expect_error(&s, &msg(8, DMA_UNMAP, COMMAND, &unmap), 8, EINVAL);
    // RESET with a body; IRQ info truncated.
    expect_error(&s, &msg(9, RESET, COMMAND, &[0]), 9, EINVAL);
    expect_error(
        &s,
        &msg(10, GET_IRQ_INFO, COMMAND, &u32s(&[16, 0, 2])),
        10,
        EINVAL,
    );
    still_serving(&s);
    finish(s, running).unwrap();
}

fn region_access(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&region.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn region_indexes_offsets_and_counts_checked() {
    let (s, running) = connect();
    // Index out of range.
    expect_error(
        &s,
        &msg(2, REGION_READ, COMMAND, &region_access(0, 9, 4, &[])),
        2,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(3, REGION_READ, COMMAND, &region_access(0, u32::MAX, 4, &[])),
        3,
        EINVAL,
    );
    // offset + count overflows, or passes the end.
    expect_error(
        &s,
        &msg(
            4,
            REGION_READ,
            COMMAND,
            &region_access(u64::MAX - 1, 7, 4, &[]),
        ),
        4,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(5, REGION_READ, COMMAND, &region_access(250, 7, 8, &[])),
        5,
        EINVAL,
    );
    // Count larger than max_data_xfer_size.
    expect_error(
        &s,
        &msg(6, REGION_READ, COMMAND, &region_access(0, 7, u32::MAX, &[])),
        6,
        EINVAL,
    );
    // Write count does not match the data.
    expect_error(
        &s,
        &msg(
            7,
            REGION_WRITE,
            COMMAND,
            &region_access(0, 7, 8, &[1, 2, 3, 4]),
        ),
        7,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(
            8,
            REGION_WRITE,
            COMMAND,
            &region_access(0, 7, 2, &[1, 2, 3, 4]),
        ),
        8,
        EINVAL,
    );
    // Read request carrying data; write to a read-only region.
    expect_error(
        &s,
        &msg(9, REGION_READ, COMMAND, &region_access(0, 7, 2, &[1, 2])),
        9,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(10, REGION_WRITE, COMMAND, &region_access(0, 2, 1, &[1])),
        10,
        EINVAL,
    );
    // Region info for an index out of range; argsz too small.
    let mut ri = u32s(&[32, 0, 0xffff_ffff, 0]);
    ri.extend_from_slice(&[0u8; 16]);
    expect_error(&s, &msg(11, GET_REGION_INFO, COMMAND, &ri), 11, EINVAL);
    ri[0] = 16;
    ri[8..12].copy_from_slice(&[0; 4]);
    expect_error(&s, &msg(12, GET_REGION_INFO, COMMAND, &ri), 12, EINVAL);
    // IRQ index, start + count overflow, bools with bad values.
    let set = |index: u32, start: u32, count: u32, flags: u32, data: &[u8]| {
        let mut b = u32s(&[20 + data.len() as u32, flags, index, start, count]);
        b.extend_from_slice(data);
        b
    };
    let trigger_none = (1 << 0) | (1 << 5);
    expect_error(
        &s,
        &msg(13, SET_IRQS, COMMAND, &set(99, 0, 1, trigger_none, &[])),
        13,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(
            14,
            SET_IRQS,
            COMMAND,
            &set(2, u32::MAX, 2, trigger_none, &[]),
        ),
        14,
        EINVAL,
    );
    let trigger_bool = (1 << 1) | (1 << 5);
    expect_error(
        &s,
        &msg(15, SET_IRQS, COMMAND, &set(2, 0, 2, trigger_bool, &[1])),
        15,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(16, SET_IRQS, COMMAND, &set(2, 0, 1, 0, &[])),
        16,
        EINVAL,
    );
    still_serving(&s);
    finish(s, running).unwrap();
}

#[test]
fn too_many_fds_refused_and_closed() {
    let (s, running) = connect();
    let (readers, writers) = pipes(20);
    let raw: Vec<_> = writers.iter().map(|w| w.as_raw_fd()).collect();
    send_fds(&s, &msg(2, GET_INFO, COMMAND, &u32s(&[16, 0, 0, 0])), &raw);
    drop(writers);
    expect_error_reply(&s, 2, EINVAL);
    for r in &readers {
        assert!(write_end_closed(r));
    }
    still_serving(&s);
    finish(s, running).unwrap();
}

#[test]
fn wrong_fd_counts_refused_and_closed() {
    let (s, running) = connect();
    // One fd with a command that takes none.
    let (r1, w1) = pipe();
    send_fds(
        &s,
        &msg(2, GET_INFO, COMMAND, &u32s(&[16, 0, 0, 0])),
        &[w1.as_raw_fd()],
    );
    drop(w1);
    expect_error_reply(&s, 2, EINVAL);
    assert!(write_end_closed(&r1));
    // Two fds with DMA_MAP.
    let guest = memfd(0x2000);
    let mut map = u32s(&[32, 3]);
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&0x1000u64.to_le_bytes());
    send_fds(
        &s,
        &msg(3, DMA_MAP, COMMAND, &map),
        &[guest.as_raw_fd(), guest.as_raw_fd()],
    );
    expect_error_reply(&s, 3, EINVAL);
    // An eventfd set for 4 vectors with 2 fds; DATA_NONE with a fd.
    let (readers, writers) = pipes(2);
    let raw: Vec<_> = writers.iter().map(|w| w.as_raw_fd()).collect();
    let eventfd_trigger = (1 << 2) | (1 << 5);
    send_fds(
        &s,
        &msg(4, SET_IRQS, COMMAND, &u32s(&[20, eventfd_trigger, 2, 0, 4])),
        &raw,
    );
    expect_error_reply(&s, 4, EINVAL);
    send_fds(
        &s,
        &msg(
            5,
            SET_IRQS,
            COMMAND,
            &u32s(&[20, (1 << 0) | (1 << 5), 2, 0, 1]),
        ),
        &raw[..1],
    );
    drop(writers);
    expect_error_reply(&s, 5, EINVAL);
    for r in &readers {
        assert!(write_end_closed(r));
    }
    // A descriptor that cannot be mapped (a pipe) for DMA_MAP.
    let (_r, w) = pipe();
    send_fds(&s, &msg(6, DMA_MAP, COMMAND, &map), &[w.as_raw_fd()]);
    expect_error_reply(&s, 6, EINVAL);
    still_serving(&s);
    finish(s, running).unwrap();
}

#[test]
fn unknown_and_misdirected_commands() {
    let (s, running) = connect();
    for (id, cmd) in [(2, 0u16), (3, 14), (4, 15), (5, 99), (6, 0xffff)] {
        expect_error(&s, &msg(id, cmd, COMMAND, &[1, 2, 3]), id, ENOTSUP);
    }
    // Server-to-client commands, and a second VERSION.
    expect_error(&s, &msg(7, DMA_READ, COMMAND, &[0u8; 16]), 7, EINVAL);
    expect_error(&s, &msg(8, VERSION, COMMAND, &[0, 0, 0, 0]), 8, EINVAL);
    still_serving(&s);
    finish(s, running).unwrap();
}

#[test]
fn stray_replies_and_no_reply_commands() {
    let (s, running) = connect();
    // A reply nobody asked for, and a message of an undefined type: ignored.
    send(&s, &msg(40, GET_INFO, REPLY, &u32s(&[16, 0, 0, 0])));
    send(&s, &msg(41, GET_INFO, 7, &u32s(&[16, 0, 0, 0])));
    // No reply wanted: neither on success nor on error.
    send(&s, &msg(42, RESET, COMMAND | NO_REPLY, &[]));
    send(&s, &msg(43, GET_INFO, COMMAND | NO_REPLY, &[1]));
    still_serving(&s);
    assert_eq!(running.obs.lock().unwrap().resets, 1);
    finish(s, running).unwrap();
}

fn feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut b = u32s(&[argsz, flags]);
    b.extend_from_slice(data);
    b
}

#[test]
fn bad_feature_and_migration_requests() {
    const GET: u32 = 1 << 16;
    const SET: u32 = 1 << 17;
    let (s, running) = connect();
    // GET and SET together, no operation, unknown bits, argsz below 8.
    expect_error(
        &s,
        &msg(2, FEATURE, COMMAND, &feature(16, GET | SET | 2, &[])),
        2,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(3, FEATURE, COMMAND, &feature(16, 2, &[])),
        3,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(4, FEATURE, COMMAND, &feature(16, GET | (1 << 20) | 2, &[])),
        4,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(5, FEATURE, COMMAND, &feature(4, GET | 2, &[])),
        5,
        EINVAL,
    );
    // Unknown feature, SET on a GET-only feature.
    expect_error(
        &s,
        &msg(6, FEATURE, COMMAND, &feature(16, GET | 9, &[])),
        6,
        ENOTSUP,
    );
    expect_error(
        &s,
        &msg(7, FEATURE, COMMAND, &feature(16, SET | 1, &[0; 8])),
        7,
        ENOTSUP,
    );
    // argsz too small for the reply; state data truncated.
    expect_error(
        &s,
        &msg(8, FEATURE, COMMAND, &feature(8, GET | 1, &[])),
        8,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(9, FEATURE, COMMAND, &feature(16, SET | 2, &[1, 0, 0, 0])),
        9,
        EINVAL,
    );
    // DMA logging: ranges count does not match; report without logging;
    // report whose bitmap exceeds the limit.
    let mut ctl = 4096u64.to_le_bytes().to_vec();
    ctl.extend_from_slice(&u32s(&[3, 0]));
    ctl.extend_from_slice(&[0u8; 16]);
    expect_error(
        &s,
        &msg(10, FEATURE, COMMAND, &feature(40, SET | 6, &ctl)),
        10,
        EINVAL,
    );
    let report = |len: u64| {
        let mut r = 0u64.to_le_bytes().to_vec();
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&4096u64.to_le_bytes());
        r
    };
    expect_error(
        &s,
        &msg(
            11,
            FEATURE,
            COMMAND,
            &feature(1 << 20, GET | 8, &report(0x10000)),
        ),
        11,
        EINVAL,
    );
    ctl[8] = 0;
    send(
        &s,
        &msg(12, FEATURE, COMMAND, &feature(24, SET | 6, &ctl[..16])),
    );
    assert!(!recv(&s).unwrap().0.is_error());
    expect_error(
        &s,
        &msg(
            13,
            FEATURE,
            COMMAND,
            &feature(u32::MAX, GET | 8, &report(!0xfffu64)),
        ),
        13,
        libc::E2BIG as u32,
    );
    expect_error(
        &s,
        &msg(
            14,
            FEATURE,
            COMMAND,
            &feature(16, GET | 8, &report(0x10000)),
        ),
        14,
        EINVAL,
    );
    // MIG_DATA_READ: argsz below 8 + size; MIG_DATA_WRITE: size mismatch.
    expect_error(
        &s,
        &msg(15, MIG_DATA_READ, COMMAND, &u32s(&[8, 100])),
        15,
        EINVAL,
    );
    expect_error(
        &s,
        &msg(16, MIG_DATA_WRITE, COMMAND, &u32s(&[8, 100, 0])),
        16,
        EINVAL,
    );
    still_serving(&s);
    finish(s, running).unwrap();
}

/// The server's own DMA_READ answered badly by the client: a reply with
/// another id is ignored, a mismatching one fails the device's access, and
/// the server keeps serving.
#[test]
fn bad_replies_to_server_dma() {
    let (s, running) = connect();
    // A window without descriptor: the device will use DMA_READ.
    let mut map = u32s(&[32, 3]);
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&0x10000u64.to_le_bytes());
    map.extend_from_slice(&0x1000u64.to_le_bytes());
    send(&s, &msg(2, DMA_MAP, COMMAND, &map));
    assert!(!recv(&s).unwrap().0.is_error());
    let write_ctrl = |id: u16, off: u64, v: &[u8]| {
        msg(
            id,
            REGION_WRITE,
            COMMAND,
            &region_access(off, 1, v.len() as u32, v),
        )
    };
    send(&s, &write_ctrl(3, CTRL_IOVA, &0x10000u64.to_le_bytes()));
    recv(&s).unwrap();
    send(&s, &write_ctrl(4, CTRL_LEN, &8u64.to_le_bytes()));
    recv(&s).unwrap();

    let status = |s: &UnixStream, id: u16| {
        send(
            s,
            &msg(
                id,
                REGION_READ,
                COMMAND,
                &region_access(CTRL_STATUS, 1, 4, &[]),
            ),
        );
        let (h, b) = recv(s).unwrap();
        assert_eq!(h.msg_id, id);
        u32::from_le_bytes(b[16..20].try_into().unwrap())
    };

    // Command 2: the device reads 8 bytes of guest memory.
    // 0: a reply with another id, then an error reply with the right id;
    // 1: the count does not match the data; 2: descriptors in the reply.
    for (round, bad) in [0u16, 1, 2].into_iter().enumerate() {
        let id = 10 + round as u16 * 10;
        send(&s, &write_ctrl(id, CTRL_CMD, &2u32.to_le_bytes()));
        let (h, body) = recv(&s).unwrap();
        assert!(h.is_command());
        assert_eq!(h.command, DMA_READ);
        assert_eq!(&body[..8], &0x10000u64.to_le_bytes());
        match bad {
            0 => {
                send(
                    &s,
                    &msg(h.msg_id.wrapping_add(1), DMA_READ, REPLY, &[0u8; 24]),
                );
                send(
                    &s,
                    &header(h.msg_id, DMA_READ, 16, REPLY | ERROR, libc::EFAULT as u32),
                );
            }
            1 => {
                let mut r = body.clone();
                r.extend_from_slice(&[0u8; 4]);
                send(&s, &msg(h.msg_id, DMA_READ, REPLY, &r));
            }
            _ => {
                let (rd, wr) = pipe();
                let mut r = body.clone();
                r.extend_from_slice(&[0u8; 8]);
                send_fds(&s, &msg(h.msg_id, DMA_READ, REPLY, &r), &[wr.as_raw_fd()]);
                drop(wr);
                let (h2, _) = recv(&s).unwrap();
                assert_eq!(h2.msg_id, id);
                assert!(write_end_closed(&rd));
                assert_ne!(status(&s, id + 1), 0);
                continue;
            }
        }
        let (h2, _) = recv(&s).unwrap();
        assert_eq!(h2.msg_id, id);
        assert!(!h2.is_error());
        assert_ne!(status(&s, id + 1), 0);
    }
    still_serving(&s);
    finish(s, running).unwrap();
}
