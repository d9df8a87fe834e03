//! The plumbing around [`routes::handle`]: the unix socket, an accept
//! thread, one thread per connection (bounded, so a blocking migration
//! leaves room for `info` and `cancel`), and deadlines so a slow or
//! broken client holds a thread for seconds at most and never the VMM.

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Response};
use super::{routes, ApiError, VmControl};

/// How long and how many.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// From accepting a connection to the whole request read.
    pub request_time: Duration,
    /// For writing the response.
    pub write_time: Duration,
    /// For draining what the client sent after the response.
    pub linger_time: Duration,
    /// Connections served at once; more get 503.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_time: Duration::from_secs(10),
            write_time: Duration::from_secs(10),
            linger_time: Duration::from_millis(200),
            max_connections: 16,
        }
    }
}

/// A running API server. Dropping it stops accepting, waits for the
/// accept thread and removes the socket (connections being served finish
/// on their own threads).
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket bound, so drop removes only ours.
    ident: (u64, u64),
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Serves the control API for `vm` on a unix socket at `path` until the
/// returned [`ApiServer`] is dropped. A stale socket at `path` (nobody
/// listening) is replaced; a live one, or any other kind of file, is an
/// error. The socket is made owner-only (0600).
pub fn serve(path: &Path, vm: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
    serve_with(path, vm, Limits::default())
}

pub(crate) fn serve_with(
    path: &Path,
    vm: Arc<dyn VmControl>,
    limits: Limits,
) -> Result<ApiServer, ApiError> {
    let fail = |e: io::Error| {
        ApiError::internal(format!("cannot serve the API on {}: {e}", path.display()))
    };
    let listener = bind(path).map_err(fail)?;
    let ident = fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(fail)?;
    let cleanup = |e: io::Error| {
        let _ = fs::remove_file(path);
        fail(e)
    };
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
    listener.set_nonblocking(true).map_err(cleanup)?;
    let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(cleanup)?;
    let thread_stop = stop.try_clone().map_err(cleanup)?;
    let thread = std::thread::Builder::new()
        .name("api-server".into())
        .spawn(move || accept_loop(listener, thread_stop, vm, limits))
        .map_err(cleanup)?;
    log::info!("control API on {}", path.display());
    Ok(ApiServer {
        path: path.to_path_buf(),
        ident,
        stop,
        thread: Some(thread),
    })
}

/// Binds `path`, replacing a socket nobody listens on.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving on this socket",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale API socket {}", path.display());
                fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not replacing it",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Waits until the listener has a connection (false) or `stop` fires
/// (true).
fn wait(listener: &UnixListener, stop: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is an array of two initialised pollfds that outlives
    // the call, and its length is passed with it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(fds[1].revents != 0)
}

/// Gives a connection slot back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: UnixListener, stop: EventFd, vm: Arc<dyn VmControl>, limits: Limits) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match wait(&listener, &stop) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                log::warn!("API server: poll: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                log::warn!("API server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        if active.load(Ordering::Acquire) >= limits.max_connections {
            let busy = Response::error(503, "too many API connections; try again");
            let _ = stream.set_write_timeout(Some(limits.write_time));
            finish(
                &stream,
                &busy,
                limits.linger_time.min(Duration::from_millis(50)),
            );
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(active.clone());
        let vm = vm.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(&stream, &*vm, &limits);
            });
        if let Err(e) = spawned {
            log::warn!("API server: cannot spawn a connection thread: {e}");
        }
    }
}

/// A connection read against a deadline: each read waits at most until
/// then, so trickling bytes (slowloris) does not extend it.
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn serve_connection(stream: &UnixStream, vm: &dyn VmControl, limits: &Limits) {
    if stream.set_write_timeout(Some(limits.write_time)).is_err() {
        return;
    }
    let mut conn = Deadline {
        stream,
        until: Instant::now() + limits.request_time,
    };
    let response = match http::read_request(&mut conn) {
        Ok(req) => {
            let response = dispatch(&req, vm);
            log::debug!("api: {} {} -> {}", req.method, req.path, response.status);
            response
        }
        Err(e) => match e.status() {
            Some(status) => {
                log::debug!("api: bad request: {e}");
                Response::error(status, &e.to_string())
            }
            None => return,
        },
    };
    finish(stream, &response, limits.linger_time);
}

/// Runs the handler; a panic in it (a `VmControl` bug) is a 500 for this
/// request, not a dead server. (Release builds abort on panic.)
fn dispatch(req: &http::Request, vm: &dyn VmControl) -> Response {
    panic::catch_unwind(AssertUnwindSafe(|| routes::handle(req, vm))).unwrap_or_else(|_| {
        log::error!("api: the handler for {} {} panicked", req.method, req.path);
        Response::error(500, "internal error: the request handler panicked")
    })
}

/// Writes the response, then closes our side and drains what the client
/// still sends for a moment, so unread request bytes do not turn the close
/// into a reset that loses the response.
fn finish(stream: &UnixStream, response: &Response, linger: Duration) {
    let mut out = stream;
    if out.write_all(&response.to_bytes()).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_read_timeout(Some(linger)).is_err() {
        return;
    }
    let until = Instant::now() + linger;
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while Instant::now() < until && drained < 4 * http::MAX_BODY {
        match (&*stream).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
