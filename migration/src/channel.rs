//! What carries a migration stream: a TCP connection, a unix socket
//! connection or a file (a snapshot).
//!
//! ```text
//! tcp:HOST:PORT    tcp:192.0.2.7:4444, tcp:[::1]:4444, tcp:dst-host:4444
//! unix:PATH        unix:/run/outboard/migrate.sock
//! file:PATH        file:/var/lib/outboard/vm0.snapshot
//! ```
//!
//! The source [`connect`]s; the destination [`Listener::bind`]s and
//! [`accept`](Listener::accept)s one connection ([`listen_accept`] does
//! both). A socket carries both directions: the stream forward, the
//! destination's `Confirm` or `Abort` back. A file has no way back
//! ([`SourceChannel::can_reply`] is false): a snapshot is never confirmed.
//! TCP connections have `TCP_NODELAY` set so the small sections of the
//! stop-and-copy phase and the reply are not held back.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Errors parsing an address or opening a channel; each names the address.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address does not parse.
    #[error("bad migration address {input:?}: {reason}")]
    BadAddress {
        /// What was given.
        input: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An operation on the channel failed.
    #[error("cannot {op} {address}: {source}")]
    Io {
        /// What was being done ("connect to", "listen on", ...).
        op: &'static str,
        /// The address.
        address: String,
        /// Why.
        source: io::Error,
    },
}

/// Where a migration stream goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A TCP endpoint, `HOST:PORT` (an IPv6 host in brackets).
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
    /// A file: written by the source, read by the destination.
    File(PathBuf),
}

impl Address {
    /// The kind of channel this address opens.
    pub fn kind(&self) -> ChannelKind {
        match self {
            Address::Tcp(_) => ChannelKind::Tcp,
            Address::Unix(_) => ChannelKind::Unix,
            Address::File(_) => ChannelKind::File,
        }
    }
}

impl FromStr for Address {
    type Err = ChannelError;

    fn from_str(input: &str) -> Result<Self, ChannelError> {
        let bad = |reason| ChannelError::BadAddress {
            input: input.to_string(),
            reason,
        };
        let (scheme, rest) = input
            .split_once(':')
            .ok_or_else(|| bad("expected tcp:HOST:PORT, unix:PATH or file:PATH"))?;
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
                    return Err(bad("an IPv6 host goes in brackets: tcp:[ADDR]:PORT"));
                }
                if port.parse::<u16>().is_err() {
                    return Err(bad("the port is not a number from 0 to 65535"));
                }
                Ok(Address::Tcp(rest.to_string()))
            }
            "unix" | "file" if rest.is_empty() => Err(bad("no path")),
            "unix" => Ok(Address::Unix(PathBuf::from(rest))),
            "file" => Ok(Address::File(PathBuf::from(rest))),
            _ => Err(bad("expected tcp:HOST:PORT, unix:PATH or file:PATH")),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => write!(f, "tcp:{hp}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// What a channel runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// A TCP connection: both directions.
    Tcp,
    /// A unix socket connection: both directions.
    Unix,
    /// A file: the stream only, no reply.
    File,
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelKind::Tcp => "tcp",
            ChannelKind::Unix => "unix",
            ChannelKind::File => "file",
        })
    }
}

/// One open end of a channel.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    File(File),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::File(f) => Conn::File(f.try_clone()?),
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::File(_) => Ok(()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::File(f) => f.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::File(f) => f.flush(),
        }
    }
}

/// Both ends' common part: the stream one way, maybe the reply the other.
struct Link {
    address: Address,
    stream: Conn,
    reply: Option<Conn>,
}

impl Link {
    /// Wraps an open connection; a socket is cloned for the reply side.
    fn new(address: Address, conn: Conn) -> Result<Self, ChannelError> {
        let reply = match conn {
            Conn::File(_) => None,
            ref socket => Some(
                socket
                    .try_clone()
                    .map_err(|e| io_error("set up", &address, e))?,
            ),
        };
        Ok(Link {
            address,
            stream: conn,
            reply,
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> Result<(), ChannelError> {
        // The reply side shares the socket, and so its timeouts.
        self.stream
            .set_timeout(t)
            .map_err(|e| io_error("set a timeout on", &self.address, e))
    }
}

fn io_error(op: &'static str, address: &Address, source: io::Error) -> ChannelError {
    ChannelError::Io {
        op,
        address: address.to_string(),
        source,
    }
}

/// The source's end: writes the stream, reads the reply (if any).
pub struct SourceChannel(Link);

impl SourceChannel {
    /// Where it goes.
    pub fn address(&self) -> &Address {
        &self.0.address
    }

    /// What it runs over.
    pub fn kind(&self) -> ChannelKind {
        self.0.address.kind()
    }

    /// Whether the destination can answer (false for a file).
    pub fn can_reply(&self) -> bool {
        self.0.reply.is_some()
    }

    /// Sets the read and write timeout of a socket (none for a file); a
    /// timed-out operation fails with `WouldBlock` or `TimedOut`.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.0.set_timeout(timeout)
    }

    /// The stream to write, and the replies to read if the channel has any.
    pub fn into_parts(self) -> (Box<dyn Write + Send>, Option<Box<dyn Read + Send>>) {
        let reply = self.0.reply.map(|r| Box::new(r) as Box<dyn Read + Send>);
        (Box::new(self.0.stream), reply)
    }
}

/// The destination's end: reads the stream, writes the reply (if any).
pub struct DestinationChannel(Link);

impl DestinationChannel {
    /// Where it comes from.
    pub fn address(&self) -> &Address {
        &self.0.address
    }

    /// What it runs over.
    pub fn kind(&self) -> ChannelKind {
        self.0.address.kind()
    }

    /// Whether there is a way back to the source (false for a file).
    pub fn can_reply(&self) -> bool {
        self.0.reply.is_some()
    }

    /// Sets the read and write timeout of a socket (none for a file).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.0.set_timeout(timeout)
    }

    /// The stream to read, and the reply to write if the channel has one.
    pub fn into_parts(self) -> (Box<dyn Read + Send>, Option<Box<dyn Write + Send>>) {
        let reply = self.0.reply.map(|r| Box::new(r) as Box<dyn Write + Send>);
        (Box::new(self.0.stream), reply)
    }
}

/// Opens the source's end: connects to a socket, or creates (truncates) a
/// file for writing.
pub fn connect(address: &Address) -> Result<SourceChannel, ChannelError> {
    let conn = match address {
        Address::Tcp(hp) => {
            let s =
                TcpStream::connect(hp.as_str()).map_err(|e| io_error("connect to", address, e))?;
            s.set_nodelay(true)
                .map_err(|e| io_error("set TCP_NODELAY on", address, e))?;
            Conn::Tcp(s)
        }
        Address::Unix(p) => {
            Conn::Unix(UnixStream::connect(p).map_err(|e| io_error("connect to", address, e))?)
        }
        Address::File(p) => {
            Conn::File(File::create(p).map_err(|e| io_error("create", address, e))?)
        }
    };
    log::debug!("migration: connected to {address}");
    Link::new(address.clone(), conn).map(SourceChannel)
}

/// Binds and accepts one connection (or opens the file for reading): the
/// destination's end.
pub fn listen_accept(address: &Address) -> Result<DestinationChannel, ChannelError> {
    Listener::bind(address)?.accept()
}

/// A bound destination address, waiting for its one source.
pub struct Listener {
    address: Address,
    inner: Bound,
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, SocketPath),
    File(File),
}

/// Removes the unix socket this process bound when dropped.
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::debug!("migration: removing {}: {e}", self.0.display());
        }
    }
}

impl Listener {
    /// Binds a socket (an existing unix socket path is an error, not
    /// replaced), or opens a file for reading.
    pub fn bind(address: &Address) -> Result<Self, ChannelError> {
        let (inner, address) = match address {
            Address::Tcp(hp) => {
                let l = TcpListener::bind(hp.as_str())
                    .map_err(|e| io_error("listen on", address, e))?;
                // With port 0 the kernel picked one: name it.
                let bound = l
                    .local_addr()
                    .map(|a| Address::Tcp(a.to_string()))
                    .map_err(|e| io_error("listen on", address, e))?;
                (Bound::Tcp(l), bound)
            }
            Address::Unix(p) => {
                let l = UnixListener::bind(p).map_err(|e| io_error("listen on", address, e))?;
                (Bound::Unix(l, SocketPath(p.clone())), address.clone())
            }
            Address::File(p) => (
                Bound::File(File::open(p).map_err(|e| io_error("open", address, e))?),
                address.clone(),
            ),
        };
        Ok(Listener { address, inner })
    }

    /// The bound address (for `tcp:HOST:0`, with the port picked).
    pub fn local_address(&self) -> &Address {
        &self.address
    }

    /// Waits for the source and returns the destination's end; a unix
    /// socket path is removed once the connection is taken.
    pub fn accept(self) -> Result<DestinationChannel, ChannelError> {
        let address = self.address;
        let conn = match self.inner {
            Bound::Tcp(l) => {
                let (s, peer) = l
                    .accept()
                    .map_err(|e| io_error("accept a connection on", &address, e))?;
                s.set_nodelay(true)
                    .map_err(|e| io_error("set TCP_NODELAY on", &address, e))?;
                log::info!("migration: accepted {peer} on {address}");
                Conn::Tcp(s)
            }
            Bound::Unix(l, _path) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| io_error("accept a connection on", &address, e))?;
                log::info!("migration: accepted a connection on {address}");
                Conn::Unix(s)
            }
            Bound::File(f) => Conn::File(f),
        };
        Link::new(address, conn).map(DestinationChannel)
    }
}

#[cfg(test)]
mod tests;
