//! Sending and receiving whole vfio-user messages, with file descriptors as
//! `SCM_RIGHTS` ancillary data, over a connected `AF_UNIX` stream socket.
//!
//! A message goes out in one `sendmsg` (more if the kernel takes it in
//! parts, the descriptors riding with the first byte). A message comes in by
//! reading the 16-byte header, checking its size field against the limit,
//! then reading exactly the body; partial reads are continued, and
//! descriptors are collected from every read of the message. A peer that
//! closes between messages is [`TransportError::Closed`]; one that closes
//! inside a message is [`TransportError::Truncated`].
//!
//! Descriptors beyond the receive limit are never kept: the kernel closes
//! the ones that do not fit the control buffer (`MSG_CTRUNC`), and this
//! module closes the rest; the message is then reported as
//! [`TransportError::TooManyFds`] with its header, so that the receiver can
//! answer it with an error and carry on (the framing is intact).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::wire::{Header, HEADER_SIZE};

/// A failure to send or receive a message.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection between two messages.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// The header's size field is smaller than the header.
    #[error("message size {0} is smaller than the header")]
    TooSmall(u32),
    /// The header's size field exceeds the receive limit.
    #[error("message size {size} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The size field.
        size: u32,
        /// The limit.
        max: usize,
    },
    /// The message came with more descriptors than allowed; they were closed.
    #[error("message {} carried more than {max} file descriptors", .header.msg_id)]
    TooManyFds {
        /// The (otherwise intact) message's header.
        header: Header,
        /// The limit.
        max: usize,
    },
    /// A message to send is larger than the protocol can describe.
    #[error("message too large to send")]
    Oversized,
    /// A socket call failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receive limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest message (header included).
    pub max_msg_size: usize,
    /// Most descriptors in one message.
    pub max_fds: usize,
}

/// Sends `header` + `body` with `fds` attached.
pub(crate) fn send_message(
    stream: &UnixStream,
    header: &Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), TransportError> {
    if header.msg_size as usize != HEADER_SIZE + body.len() {
        return Err(TransportError::Oversized);
    }
    let mut buf = Vec::with_capacity(HEADER_SIZE + body.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(body);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < buf.len() {
        let fds_now = if sent == 0 { &raw[..] } else { &[][..] };
        match sendmsg(stream, &buf[sent..], fds_now) {
            Ok(0) => return Err(TransportError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one whole message.
pub(crate) fn recv_message(stream: &UnixStream, limits: Limits) -> Result<Message, TransportError> {
    let mut fds = Vec::new();
    let mut truncated_fds = false;
    let mut hbuf = [0u8; HEADER_SIZE];
    recv_exact(
        stream,
        &mut hbuf,
        true,
        limits.max_fds,
        &mut fds,
        &mut truncated_fds,
    )?;
    let header = Header::decode(&hbuf);
    let body_len = header
        .body_len()
        .ok_or(TransportError::TooSmall(header.msg_size))?;
    if header.msg_size as usize > limits.max_msg_size {
        return Err(TransportError::TooLarge {
            size: header.msg_size,
            max: limits.max_msg_size,
        });
    }
    let mut body = vec![0u8; body_len];
    recv_exact(
        stream,
        &mut body,
        false,
        limits.max_fds,
        &mut fds,
        &mut truncated_fds,
    )?;
    if truncated_fds || fds.len() > limits.max_fds {
        drop(fds);
        return Err(TransportError::TooManyFds {
            header,
            max: limits.max_fds,
        });
    }
    Ok(Message { header, body, fds })
}

fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    at_message_start: bool,
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
    truncated_fds: &mut bool,
) -> Result<(), TransportError> {
    let mut got = 0;
    while got < buf.len() {
        match recvmsg(stream, &mut buf[got..], max_fds, fds) {
            Ok((0, _)) if got == 0 && at_message_start => return Err(TransportError::Closed),
            Ok((0, _)) => return Err(TransportError::Truncated),
            Ok((n, ctrunc)) => {
                got += n;
                *truncated_fds |= ctrunc;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(if got == 0 && at_message_start {
                    TransportError::Closed
                } else {
                    TransportError::Truncated
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Control buffer able to hold `n` descriptors, aligned for `cmsghdr`.
fn cmsg_buffer(n: usize) -> Vec<u64> {
    let bytes = cmsg_space(n);
    vec![0u64; bytes.div_ceil(8)]
}

fn cmsg_space(n: usize) -> usize {
    let payload = u32::try_from(n.saturating_mul(std::mem::size_of::<RawFd>())).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE only computes an aligned size from its argument.
    unsafe { libc::CMSG_SPACE(payload) as usize }
}

fn sendmsg(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = if fds.is_empty() {
        Vec::new()
    } else {
        cmsg_buffer(fds.len())
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, aligned
        // for cmsghdr, and msg points at it, so CMSG_FIRSTHDR returns a
        // pointer to its start, valid for a header and `payload` data bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: msg describes one iovec over `data` and (optionally) the
    // control buffer, all alive for the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `recvmsg`; appends received descriptors to `fds` (owned, so closed
/// if dropped) and returns the byte count and whether control data was
/// truncated.
fn recvmsg(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for at least one descriptor, so that a message that should have
    // none is seen (and its descriptors closed) rather than truncated away.
    let room = max_fds.max(1);
    let mut control = cmsg_buffer(room);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(room) as _;
    // SAFETY: msg describes one iovec over `buf` and the control buffer, both
    // writable and alive for the call; the kernel writes at most their
    // lengths.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let ctrunc = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: after a successful recvmsg, msg.msg_control/msg_controllen
    // describe the control messages the kernel wrote into our buffer;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk them within that length. SCM_RIGHTS
    // data is an array of ints, read unaligned; each is a new descriptor
    // installed for this process that nothing else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header_len = data.offset_from(cmsg.cast::<u8>()) as usize;
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(header_len);
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, ctrunc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Command;
    use std::io::Write;
    use std::os::fd::AsFd;

    const LIMITS: Limits = Limits {
        max_msg_size: 4096,
        max_fds: 2,
    };

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: pipe2 succeeded, so both are new descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Whether the write end of the pipe whose read end is `r` is closed
    /// everywhere (read returns EOF rather than blocking).
    fn write_end_closed(r: &OwnedFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        n == 1 && pfd.revents & libc::POLLHUP != 0
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe();
        let h = Header::command(3, Command::DmaMap, 4).unwrap();
        send_message(&a, &h, &[1, 2, 3, 4], &[w.as_fd()]).unwrap();
        drop(w);
        let m = recv_message(&b, LIMITS).unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.body, vec![1, 2, 3, 4]);
        assert_eq!(m.fds.len(), 1);
        assert!(!write_end_closed(&r));
        drop(m);
        assert!(write_end_closed(&r));
    }

    #[test]
    fn too_many_fds_are_closed_and_framing_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
        let ws: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        let h = Header::command(9, Command::DeviceGetInfo, 0).unwrap();
        send_message(&a, &h, &[], &ws).unwrap();
        drop(ws);
        let h2 = Header::command(10, Command::DeviceReset, 0).unwrap();
        send_message(&a, &h2, &[], &[]).unwrap();
        let readers: Vec<_> = pipes.into_iter().map(|(r, _)| r).collect();
        match recv_message(&b, LIMITS) {
            Err(TransportError::TooManyFds { header, max: 2 }) => assert_eq!(header, h),
            other => panic!("{other:?}"),
        }
        for r in &readers {
            assert!(write_end_closed(r));
        }
        assert_eq!(recv_message(&b, LIMITS).unwrap().header, h2);
    }

    #[test]
    fn partial_reads_are_continued() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = Header::command(1, Command::RegionWrite, 5).unwrap();
        let bytes: Vec<u8> = h.encode().iter().copied().chain([9u8; 5]).collect();
        let t = std::thread::spawn(move || {
            for chunk in bytes.chunks(3) {
                a.write_all(chunk).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            a
        });
        let m = recv_message(&b, LIMITS).unwrap();
        assert_eq!(m.body, vec![9; 5]);
        drop(t.join().unwrap());
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::Closed)
        ));
    }

    #[test]
    fn framing_errors() {
        // closed mid-header
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 0, 4, 0]).unwrap();
        drop(a);
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::Truncated)
        ));

        // size field beyond the body sent, then close
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut h = Header::command(1, Command::DeviceGetInfo, 16).unwrap();
        h.msg_size = 100;
        a.write_all(&h.encode()).unwrap();
        a.write_all(&[0; 16]).unwrap();
        drop(a);
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::Truncated)
        ));

        // size field below the header
        let (mut a, b) = UnixStream::pair().unwrap();
        h.msg_size = 8;
        a.write_all(&h.encode()).unwrap();
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::TooSmall(8))
        ));

        // size field beyond the limit
        let (mut a, b) = UnixStream::pair().unwrap();
        h.msg_size = u32::MAX;
        a.write_all(&h.encode()).unwrap();
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::TooLarge { .. })
        ));
    }

    #[test]
    fn fds_sent_with_a_later_chunk_are_counted() {
        // A peer that sends the header, then the body with 3 descriptors.
        let (a, b) = UnixStream::pair().unwrap();
        let h = Header::command(1, Command::DmaMap, 4).unwrap();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
        sendmsg(&a, &h.encode(), &[]).unwrap();
        sendmsg(&a, &[0; 4], &raw).unwrap();
        let readers: Vec<OwnedFd> = pipes.into_iter().map(|(r, _)| r).collect();
        assert!(matches!(
            recv_message(&b, LIMITS),
            Err(TransportError::TooManyFds { .. })
        ));
        for r in &readers {
            assert!(write_end_closed(r));
        }
    }
}
