//! A hand-rolled, misbehaving server against the client: bad version
//! replies, replies with wrong ids, short or inconsistent bodies, stray
//! descriptors, a close in the middle of a message, and abusive
//! `DMA_READ` / `DMA_WRITE` requests. The client fails the request (or
//! marks the connection broken) and never panics.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use common::raw::*;
use common::*;
use outboard_vfio_user::wire::Header;
use outboard_vfio_user::{Client, ClientConfig, ClientError, TransportError};

const GET_INFO: u16 = 4;
const GET_REGION_INFO: u16 = 5;
const GET_REGION_IO_FDS: u16 = 6;
const REGION_READ: u16 = 9;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;

const SERVER_VERSION: &[u8] =
    b"\x00\x00\x01\x00{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":65536}}\x00";

/// Runs `script` as the server on one end; returns the client's end.
fn evil<F>(script: F) -> (UnixStream, JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let (a, b) = UnixStream::pair().unwrap();
    timeouts(&a);
    timeouts(&b);
    (a, std::thread::spawn(move || script(b)))
}

/// Answers the client's VERSION with `body` (a reply) .
fn answer_version(s: &UnixStream, flags: u32, body: &[u8]) {
    let (h, _) = recv(s).unwrap();
    assert_eq!(h.command, 1);
    send(s, &msg(h.msg_id, 1, flags, body));
}

fn connected<F>(script: F) -> (Client, JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let (a, t) = evil(move |s| {
        answer_version(&s, REPLY, SERVER_VERSION);
        script(s)
    });
    (Client::connect(a).unwrap(), t)
}

fn info_body() -> Vec<u8> {
    u32s(&[16, 3, 9, 5])
}

fn handshake_fails(body: &'static [u8], flags: u32) -> ClientError {
    let (a, t) = evil(move |s| answer_version(&s, flags, body));
    let e = Client::connect(a).unwrap_err();
    t.join().unwrap();
    e
}

#[test]
fn bad_version_replies() {
    let cases: [(&[u8], u32); 6] = [
        (b"\x01\x00\x00\x00", REPLY),      // other major
        (b"\x00\x00\x09\x00", REPLY),      // minor above the proposal
        (b"\x00\x00\x01\x00{\x00", REPLY), // broken JSON
        (b"\x00\x00", REPLY),              // truncated
        (
            b"\x00\x00\x01\x00{\"capabilities\":{\"twin_socket\":{\"supported\":true}}}\x00",
            REPLY,
        ),
        (
            b"\x00\x00\x01\x00{\"capabilities\":{\"max_data_xfer_size\":0}}\x00",
            REPLY,
        ),
    ];
    for (body, flags) in cases {
        assert!(
            matches!(handshake_fails(body, flags), ClientError::Handshake(_)),
            "{body:?}"
        );
    }
    // An error reply.
    let (a, t) = evil(|s| {
        let (h, _) = recv(&s).unwrap();
        send(&s, &header(h.msg_id, 1, 16, REPLY | ERROR, 22));
    });
    assert!(matches!(Client::connect(a), Err(ClientError::Handshake(_))));
    t.join().unwrap();
    // The server closes instead of answering.
    let (a, t) = evil(|s| drop(recv(&s)));
    assert!(matches!(
        Client::connect(a),
        Err(ClientError::Transport(TransportError::Closed))
    ));
    t.join().unwrap();
}

#[test]
fn reply_with_wrong_id_breaks_the_connection() {
    let (mut c, t) = connected(|s| {
        let (h, _) = recv(&s).unwrap();
        send(
            &s,
            &msg(h.msg_id.wrapping_add(5), GET_INFO, REPLY, &info_body()),
        );
    });
    assert!(matches!(
        c.device_info(),
        Err(ClientError::WrongReply { .. })
    ));
    assert!(matches!(c.device_info(), Err(ClientError::Broken)));
    t.join().unwrap();
}

#[test]
fn reply_with_wrong_command_breaks_the_connection() {
    let (mut c, t) = connected(|s| {
        let (h, _) = recv(&s).unwrap();
        send(&s, &msg(h.msg_id, GET_REGION_INFO, REPLY, &info_body()));
    });
    assert!(matches!(
        c.device_info(),
        Err(ClientError::WrongReply { .. })
    ));
    t.join().unwrap();
}

#[test]
fn invalid_reply_bodies_fail_the_request_only() {
    let (mut c, t) = connected(|s| {
        // short GET_INFO reply
        let (h, _) = recv(&s).unwrap();
        send(&s, &msg(h.msg_id, GET_INFO, REPLY, &u32s(&[16, 3])));
        // long GET_INFO reply
        let (h, _) = recv(&s).unwrap();
        send(
            &s,
            &msg(h.msg_id, GET_INFO, REPLY, &u32s(&[16, 3, 9, 5, 0])),
        );
        // region read: count larger than the data
        let (h, body) = recv(&s).unwrap();
        let mut r = body[..12].to_vec();
        r.extend_from_slice(&8u32.to_le_bytes());
        r.extend_from_slice(&[0; 4]);
        send(&s, &msg(h.msg_id, REGION_READ, REPLY, &r));
        // region read: another offset echoed
        let (h, mut body) = recv(&s).unwrap();
        body[0] ^= 1;
        body.extend_from_slice(&[0; 4]);
        send(&s, &msg(h.msg_id, REGION_READ, REPLY, &body));
        // region info: MMAP flag without a descriptor
        let (h, _) = recv(&s).unwrap();
        let mut ri = u32s(&[32, 0b111, 0, 0]);
        ri.extend_from_slice(&[0u8; 16]);
        send(&s, &msg(h.msg_id, GET_REGION_INFO, REPLY, &ri));
        // region info: sparse area beyond the region
        let (h, _) = recv(&s).unwrap();
        let mut ri = u32s(&[64, 0b1011, 0, 32]);
        ri.extend_from_slice(&0x1000u64.to_le_bytes());
        ri.extend_from_slice(&0u64.to_le_bytes());
        ri.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0]);
        ri.extend_from_slice(&u32s(&[1, 0]));
        ri.extend_from_slice(&0x800u64.to_le_bytes());
        ri.extend_from_slice(&0x1000u64.to_le_bytes());
        send(&s, &msg(h.msg_id, GET_REGION_INFO, REPLY, &ri));
        // io fds: fd_index beyond the descriptors sent
        let (h, _) = recv(&s).unwrap();
        let mut io = u32s(&[56, 0, 1, 1]);
        io.extend_from_slice(&[0u8; 16]);
        io.extend_from_slice(&u32s(&[3, 0, 0, 0]));
        io.extend_from_slice(&[0u8; 8]);
        let efd = eventfd();
        send_fds(
            &s,
            &msg(h.msg_id, GET_REGION_IO_FDS, REPLY, &io),
            &[efd.as_raw_fd()],
        );
        // finally a good reply
        let (h, _) = recv(&s).unwrap();
        send(&s, &msg(h.msg_id, GET_INFO, REPLY, &info_body()));
    });
    assert!(matches!(c.device_info(), Err(ClientError::InvalidReply(_))));
    assert!(matches!(c.device_info(), Err(ClientError::InvalidReply(_))));
    let mut b = [0u8; 4];
    assert!(matches!(
        c.region_read(7, 0, &mut b),
        Err(ClientError::InvalidReply(_))
    ));
    assert!(matches!(
        c.region_read(7, 0, &mut b),
        Err(ClientError::InvalidReply(_))
    ));
    assert!(matches!(
        c.region_info(0),
        Err(ClientError::InvalidReply(_))
    ));
    assert!(matches!(
        c.region_info(0),
        Err(ClientError::InvalidReply(_))
    ));
    assert!(matches!(
        c.region_io_fds(1),
        Err(ClientError::InvalidReply(_))
    ));
    assert_eq!(c.device_info().unwrap().num_regions, 9);
    t.join().unwrap();
}

#[test]
fn stray_descriptors_in_replies_are_closed() {
    let (readers, writers) = pipes(20);
    let raw: Vec<_> = writers.iter().map(|w| w.as_raw_fd()).collect();
    let (mut c, t) = connected(move |s| {
        // one fd with GET_INFO
        let (h, _) = recv(&s).unwrap();
        send_fds(&s, &msg(h.msg_id, GET_INFO, REPLY, &info_body()), &raw[..1]);
        // more fds than the client accepts
        let (h, _) = recv(&s).unwrap();
        send_fds(&s, &msg(h.msg_id, GET_INFO, REPLY, &info_body()), &raw);
        drop(writers);
        let (h, _) = recv(&s).unwrap();
        send(&s, &msg(h.msg_id, GET_INFO, REPLY, &info_body()));
    });
    assert!(matches!(c.device_info(), Err(ClientError::InvalidReply(_))));
    assert!(matches!(c.device_info(), Err(ClientError::InvalidReply(_))));
    c.device_info().unwrap();
    t.join().unwrap();
    for r in &readers {
        assert!(write_end_closed(r));
    }
}

#[test]
fn server_closing_mid_message() {
    let (mut c, t) = connected(|s| {
        let (h, _) = recv(&s).unwrap();
        let mut m = header(h.msg_id, GET_INFO, 32, REPLY, 0);
        m.extend_from_slice(&[16, 0, 0, 0]);
        send(&s, &m);
    });
    assert!(matches!(
        c.device_info(),
        Err(ClientError::Transport(TransportError::Truncated))
    ));
    assert!(matches!(c.device_info(), Err(ClientError::Broken)));
    t.join().unwrap();

    let (mut c, t) = connected(|s| {
        let (_h, _) = recv(&s).unwrap();
        send(&s, &[1, 0, 4]);
    });
    assert!(matches!(
        c.device_info(),
        Err(ClientError::Transport(TransportError::Truncated))
    ));
    t.join().unwrap();
}

#[test]
fn bad_size_fields_in_replies() {
    for size in [0u32, 15, 0x7fff_ffff] {
        let (mut c, t) = connected(move |s| {
            let (h, _) = recv(&s).unwrap();
            send(&s, &header(h.msg_id, GET_INFO, size, REPLY, 0));
        });
        assert!(
            matches!(c.device_info(), Err(ClientError::Transport(_))),
            "{size}"
        );
        t.join().unwrap();
    }
}

fn dma_access(addr: u64, count: u64, data: &[u8]) -> Vec<u8> {
    let mut b = addr.to_le_bytes().to_vec();
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// While the client waits for a GET_INFO reply, the server sends DMA
/// requests; bad ones get error replies, good ones are served, and the
/// request completes.
#[test]
fn abusive_dma_requests_are_answered() {
    let mem = VecMemory::new(0x1000, 0x2000);
    mem.bytes.lock().unwrap()[0..4].copy_from_slice(b"gust");
    let (a, t) = evil(|s| {
        answer_version(&s, REPLY, SERVER_VERSION);
        // two windows: RW [0x1000, 0x2000), R [0x2000, 0x3000)
        for _ in 0..2 {
            let (h, _) = recv(&s).unwrap();
            send(&s, &msg(h.msg_id, 2, REPLY, &[]));
        }
        let (req, _) = recv(&s).unwrap();
        assert_eq!(req.command, GET_INFO);
        let ask = |id: u16, cmd: u16, body: &[u8]| {
            send(&s, &msg(id, cmd, COMMAND, body));
            recv(&s).unwrap()
        };
        let err = |(h, b): (Header, Vec<u8>), id: u16, errno: i32| {
            assert_eq!(h.msg_id, id);
            assert!(h.is_reply() && h.is_error(), "{h:?}");
            assert_eq!(h.error, errno as u32);
            assert!(b.is_empty());
        };
        // outside every window; crossing the end of the mapped space
        err(
            ask(100, DMA_READ, &dma_access(0x8000, 4, &[])),
            100,
            libc::EFAULT,
        );
        err(
            ask(101, DMA_READ, &dma_access(0x2ffe, 4, &[])),
            101,
            libc::EFAULT,
        );
        err(
            ask(102, DMA_READ, &dma_access(u64::MAX - 1, 4, &[])),
            102,
            libc::EFAULT,
        );
        // count above the client's max_data_xfer_size; count/data mismatch
        err(
            ask(103, DMA_READ, &dma_access(0x1000, 1 << 40, &[])),
            103,
            libc::EINVAL,
        );
        err(
            ask(104, DMA_WRITE, &dma_access(0x1000, 8, &[1, 2])),
            104,
            libc::EINVAL,
        );
        err(
            ask(105, DMA_READ, &dma_access(0x1000, 4, &[1])),
            105,
            libc::EINVAL,
        );
        // write into the read-only window
        err(
            ask(106, DMA_WRITE, &dma_access(0x2000, 1, &[1])),
            106,
            libc::EACCES,
        );
        // an unknown command, a reply-only command
        err(ask(107, 99, &[]), 107, libc::EINVAL);
        err(ask(108, GET_INFO, &u32s(&[16, 0, 0, 0])), 108, libc::EINVAL);
        // descriptors with a DMA request: refused and closed
        let (rd, wr) = pipe();
        send_fds(
            &s,
            &msg(109, DMA_READ, COMMAND, &dma_access(0x1000, 4, &[])),
            &[wr.as_raw_fd()],
        );
        drop(wr);
        err(recv(&s).unwrap(), 109, libc::EINVAL);
        assert!(write_end_closed(&rd));
        // a no-reply write is served silently
        send(
            &s,
            &msg(
                110,
                DMA_WRITE,
                COMMAND | NO_REPLY,
                &dma_access(0x1004, 2, b"!!"),
            ),
        );
        // good requests, across both windows
        let (h, b) = ask(111, DMA_READ, &dma_access(0x1ffe, 4, &[]));
        assert!(!h.is_error());
        assert_eq!(b.len(), 20);
        let (h, b) = ask(112, DMA_WRITE, &dma_access(0x1000, 4, b"GUES"));
        assert!(!h.is_error());
        assert_eq!(b, dma_access(0x1000, 4, &[]));
        let (h, b) = ask(113, DMA_READ, &dma_access(0x1000, 6, &[]));
        assert_eq!(h.msg_id, 113);
        assert_eq!(&b[16..], b"GUES!!");
        // then the reply the client waits for
        send(&s, &msg(req.msg_id, GET_INFO, REPLY, &info_body()));
        // an idle-time request
        let (h, _) = ask(114, DMA_WRITE, &dma_access(0x1100, 2, b"ok"));
        assert!(!h.is_error());
    });
    let mut c = Client::connect_with(
        a,
        ClientConfig {
            max_data_xfer_size: 4096,
            memory: Some(mem.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    c.dma_map(rw(0x1000, 0x1000), None).unwrap();
    c.dma_map(
        outboard_vfio_user::DmaRange {
            iova: 0x2000,
            size: 0x1000,
            readable: true,
            writable: false,
        },
        None,
    )
    .unwrap();
    assert_eq!(c.device_info().unwrap().num_irqs, 5);
    c.process_server_request().unwrap();
    t.join().unwrap();
    assert_eq!(&mem.bytes.lock().unwrap()[0x100..0x102], b"ok");
    // The client's socket stays usable for polling.
    let _ = c.as_fd();
}
