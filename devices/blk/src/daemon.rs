//! Process plumbing of the `outboard-blk` command: the listening socket,
//! SIGTERM/SIGINT, and serving one vhost-user frontend until it leaves.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};

use crate::vhost::BlkBackend;

/// Where the frontend connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Bind and listen on this path (a stale socket there is removed).
    Socket(PathBuf),
    /// An inherited socket, already bound and listening.
    Fd(RawFd),
}

/// Errors setting up or serving the connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket is in the way of `--socket`.
    #[error("--socket {0}: the path exists and is not a socket")]
    PathInTheWay(PathBuf),
    /// A stale socket could not be removed.
    #[error("--socket {path}: cannot remove the stale socket: {source}")]
    Unlink {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// bind/listen failed.
    #[error("--socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the vhost crate reported.
        source: VhostUserError,
    },
    /// The inherited fd is unusable.
    #[error("--listen-fd {fd}: {reason}")]
    ListenFd {
        /// The fd number.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// The vhost-user daemon failed (message kept as text: the crate's
    /// error type is not `std::error::Error`).
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Opens the listening socket.
pub fn listener(listen: &Listen) -> Result<Listener, ServeError> {
    match listen {
        Listen::Socket(path) => socket_listener(path),
        Listen::Fd(fd) => fd_listener(*fd),
    }
}

fn socket_listener(path: &Path) -> Result<Listener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServeError::Unlink {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ServeError::PathInTheWay(path.to_owned())),
        Err(_) => {}
    }
    Listener::new(path, false).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn fd_listener(fd: RawFd) -> Result<Listener, ServeError> {
    let bad = |reason: String| ServeError::ListenFd { fd, reason };
    if fd < 0 {
        return Err(bad("not a valid file descriptor".into()));
    }
    // SAFETY: fstat only writes into `st`, a plain-data buffer we own; a
    // bad fd makes it fail with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(format!("{}", io::Error::last_os_error())));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`,
    // which we own and which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(bad(format!("{}", io::Error::last_os_error())));
    }
    if accepting == 0 {
        return Err(bad("the socket is not listening".into()));
    }
    // SAFETY: the fd is open (fstat succeeded) and was handed to this
    // process to own; nothing else in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an fd we own; FD_CLOEXEC only affects exec.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Listener::from(UnixListener::from(owned)))
}

/// What a termination signal should stop: the connection once there is
/// one, else the whole process (cleaning up the socket path).
pub struct Stopper {
    handle: Mutex<Option<ShutdownHandle>>,
    stream: Mutex<Option<std::os::unix::net::UnixStream>>,
    socket_path: Option<PathBuf>,
}

impl Stopper {
    /// A stopper with nothing to stop yet and no signal handling (see
    /// [`Stopper::handle_signals`]).
    pub fn new(listen: &Listen) -> Arc<Self> {
        Arc::new(Stopper {
            handle: Mutex::new(None),
            stream: Mutex::new(None),
            socket_path: match listen {
                Listen::Socket(p) => Some(p.clone()),
                Listen::Fd(_) => None,
            },
        })
    }

    /// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns
    /// later) and starts a thread that waits for them. Call before any
    /// other thread starts.
    pub fn handle_signals(self: &Arc<Self>) -> Result<(), ServeError> {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t we own; these calls only write
        // into it and into this thread's signal mask.
        let r = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(ServeError::Signals(io::Error::from_raw_os_error(r)));
        }
        let s = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || s.wait_signals(set))
            .map_err(ServeError::Signals)?;
        Ok(())
    }

    fn wait_signals(&self, set: libc::sigset_t) {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid and owned by this frame.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            let stream = self
                .stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(s) = stream {
                log::info!("{name}: closing the connection");
                let _ = s.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let handle = self
                .handle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match handle {
                Some(h) => {
                    log::info!("{name}: closing the connection");
                    h.shutdown();
                }
                None => {
                    log::info!("{name}: exiting");
                    if let Some(p) = &self.socket_path {
                        let _ = std::fs::remove_file(p);
                    }
                    std::process::exit(0);
                }
            }
        }
    }

    /// The vfio-user connection a signal should close.
    pub fn set_stream(&self, stream: Option<std::os::unix::net::UnixStream>) {
        *self.stream.lock().unwrap_or_else(PoisonError::into_inner) = stream;
    }

    fn set(&self, handle: Option<ShutdownHandle>) {
        *self.handle.lock().unwrap_or_else(PoisonError::into_inner) = handle;
    }
}

/// Accepts one frontend on `listener` and serves it until it disconnects
/// (or a signal closes the connection).
pub fn serve(
    backend: Arc<BlkBackend>,
    listener: &mut Listener,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let mem = backend.guest_memory();
    let mut daemon = VhostUserDaemon::new("outboard-blk".into(), backend, mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    daemon
        .start(listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    log::info!("frontend connected");
    stopper.set(daemon.shutdown_handle());
    let result = daemon.wait();
    stopper.set(None);
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ServeError::Daemon(e.to_string())),
    }
}
