//! The server's end of a connection, shared between the request loop and
//! any thread that sends the client a command (`DMA_READ` / `DMA_WRITE`).
//!
//! The spec lets "unrelated messages ... appear in between a request/reply",
//! so incoming messages are demultiplexed: commands are queued for the
//! request loop, replies are handed to the thread waiting for that message
//! id. Whoever needs a message and finds nobody reading the socket reads it
//! (leader/followers), so a device thread waiting for a `DMA_READ` reply
//! makes progress while the request loop is busy inside a device callback,
//! and the request loop's own DMA (from within a callback) works too.
//!
//! Sends are serialised by a lock so that messages never interleave.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::socket::{recv_message, send_message, Limits, Message, TransportError};
use crate::wire::{Command, Header, FLAGS_ERROR};

/// A command from the peer, or one whose descriptors were refused.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// An intact command (or a message of an unknown type).
    Message(Message),
    /// A command that carried too many descriptors (they were closed).
    TooManyFds(Header),
}

#[derive(Default)]
struct State {
    reading: bool,
    incoming: VecDeque<Incoming>,
    /// Message ids of our commands awaiting replies; `Some` once arrived.
    waiting: HashMap<u16, Option<Message>>,
    closed: Option<TransportError>,
}

pub(crate) struct Endpoint {
    stream: UnixStream,
    limits: Limits,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    cond: Condvar,
    next_id: AtomicU16,
}

/// A copy of a terminal error for the threads that did not see it happen.
fn duplicate(e: &TransportError) -> TransportError {
    match e {
        TransportError::Closed => TransportError::Closed,
        TransportError::Truncated => TransportError::Truncated,
        TransportError::TooSmall(s) => TransportError::TooSmall(*s),
        TransportError::TooLarge { size, max } => TransportError::TooLarge {
            size: *size,
            max: *max,
        },
        TransportError::TooManyFds { header, max } => TransportError::TooManyFds {
            header: *header,
            max: *max,
        },
        TransportError::Oversized => TransportError::Oversized,
        TransportError::Io(io) => TransportError::Io(io::Error::new(io.kind(), io.to_string())),
    }
}

impl Endpoint {
    pub(crate) fn new(stream: UnixStream, limits: Limits) -> Self {
        Self {
            stream,
            limits,
            send_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            next_id: AtomicU16::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one message.
    pub(crate) fn send(
        &self,
        header: &Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let _g = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        send_message(&self.stream, header, body, fds)
    }

    /// The next command from the peer.
    pub(crate) fn next_incoming(&self) -> Result<Incoming, TransportError> {
        self.wait_for(|st| st.incoming.pop_front())
    }

    /// Sends a command and waits for its reply (replies with unexpected
    /// descriptors are turned into error replies).
    pub(crate) fn call(&self, command: Command, body: &[u8]) -> Result<Message, TransportError> {
        let id = {
            let mut st = self.lock();
            if let Some(e) = &st.closed {
                return Err(duplicate(e));
            }
            let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
            while st.waiting.contains_key(&id) {
                id = self.next_id.fetch_add(1, Ordering::Relaxed);
            }
            st.waiting.insert(id, None);
            id
        };
        let result = Header::command(id, command, body.len())
            .ok_or(TransportError::Oversized)
            .and_then(|h| self.send(&h, body, &[]))
            .and_then(|()| {
                self.wait_for(|st| match st.waiting.get_mut(&id) {
                    Some(slot) => slot.take(),
                    None => None,
                })
            });
        self.lock().waiting.remove(&id);
        result
    }

    /// Shuts the socket down, waking a blocked reader.
    pub(crate) fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn wait_for<T>(
        &self,
        mut pick: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<T, TransportError> {
        let mut st = self.lock();
        loop {
            if let Some(v) = pick(&mut st) {
                return Ok(v);
            }
            if let Some(e) = &st.closed {
                return Err(duplicate(e));
            }
            if st.reading {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.reading = true;
            drop(st);
            let received = recv_message(&self.stream, self.limits);
            st = self.lock();
            st.reading = false;
            self.cond.notify_all();
            match received {
                Ok(m) => Self::dispatch(&mut st, m),
                Err(TransportError::TooManyFds { header, .. }) => {
                    if header.is_reply() {
                        let m = Message {
                            header: Header {
                                flags: header.flags | FLAGS_ERROR,
                                error: libc::EBADMSG as u32,
                                ..header
                            },
                            body: Vec::new(),
                            fds: Vec::new(),
                        };
                        Self::dispatch(&mut st, m);
                    } else {
                        st.incoming.push_back(Incoming::TooManyFds(header));
                    }
                }
                Err(e) => {
                    st.closed = Some(duplicate(&e));
                    return Err(e);
                }
            }
        }
    }

    fn dispatch(st: &mut State, m: Message) {
        if m.header.is_reply() {
            match st.waiting.get_mut(&m.header.msg_id) {
                Some(slot @ None) => *slot = Some(m),
                _ => log::warn!(
                    "vfio-user: dropping unsolicited reply id {} command {}",
                    m.header.msg_id,
                    m.header.command
                ),
            }
        } else {
            st.incoming.push_back(Incoming::Message(m));
        }
    }
}
