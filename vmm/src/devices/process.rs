//! Device processes the VMM starts: each gets a private listening socket
//! (inherited as fd 3, `--listen-fd 3`) that the VMM has already connected
//! to, its own process group (terminal signals reach only the VMM, which
//! stops it in order), and dies with the VMM (`PR_SET_PDEATHSIG`).

use std::ffi::{CString, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{DeviceKind, SpawnConfig};

use super::DeviceError;

/// The descriptor number the child finds its listening socket at.
const LISTEN_FD: i32 = 3;

/// A device process started by the VMM.
pub struct DeviceProcess {
    name: String,
    child: Mutex<Child>,
    exited: Mutex<Option<ExitStatus>>,
}

impl DeviceProcess {
    /// Starts `spawn`'s program for device `name` and returns it with the
    /// VMM's end of the connection.
    pub fn start(
        name: &str,
        kind: DeviceKind,
        spawn: &SpawnConfig,
        extra_args: &[String],
    ) -> Result<(Self, UnixStream), DeviceError> {
        let program = find_program(name, kind, spawn)?;
        let dir = PrivateDir::new().map_err(|source| DeviceError::Socket {
            name: name.into(),
            what: "cannot create a private socket directory",
            source,
        })?;
        let path = dir.0.join("backend.sock");
        let sock_err = |what| {
            let name = name.to_string();
            move |source| DeviceError::Socket { name, what, source }
        };
        let listener = UnixListener::bind(&path).map_err(sock_err("cannot bind its socket"))?;
        // Queued in the backlog: the child accepts it first.
        let stream = UnixStream::connect(&path).map_err(sock_err("cannot connect its socket"))?;
        let listen_fd = listener.as_raw_fd();
        let mut cmd = Command::new(&program);
        cmd.args(&spawn.args)
            .args(extra_args)
            .arg("--listen-fd")
            .arg(LISTEN_FD.to_string())
            .stdin(Stdio::null());
        if !spawn.dir.as_os_str().is_empty() {
            cmd.current_dir(&spawn.dir);
        }
        // SAFETY: getpid has no preconditions.
        let vmm_pid = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (dup2, fcntl, close_range,
        // setpgid, prctl, getppid) on descriptors that are open in it.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if listen_fd != LISTEN_FD && libc::dup2(listen_fd, LISTEN_FD) < 0 {
                    return fail();
                }
                if libc::fcntl(LISTEN_FD, libc::F_SETFD, 0) < 0 {
                    return fail();
                }
                // Nothing else of the VMM's reaches the device process
                // (other devices' eventfds and sockets above all).
                libc::syscall(libc::SYS_close_range, LISTEN_FD + 1, u32::MAX, 0);
                if libc::setpgid(0, 0) < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0
                {
                    return fail();
                }
                // The VMM died before PDEATHSIG was armed: do not outlive it.
                if libc::getppid() != vmm_pid {
                    return Err(std::io::Error::other("the VMM exited"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DeviceError::Spawn {
            name: name.into(),
            program: program.clone(),
            source,
        })?;
        log::info!(
            "{name}: started {} (pid {}) {:?}",
            program.display(),
            child.id(),
            spawn.args
        );
        Ok((
            DeviceProcess {
                name: name.into(),
                child: Mutex::new(child),
                exited: Mutex::new(None),
            },
            stream,
        ))
    }

    /// How the process ended, waiting up to `wait` for it; `None` while it
    /// runs.
    pub fn exit_status(&self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(s) = *self.exited.lock().ok()? {
                return Some(s);
            }
            let status = self.child.lock().ok()?.try_wait().ok().flatten();
            if let Some(s) = status {
                if let Ok(mut e) = self.exited.lock() {
                    *e = Some(s);
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A phrase for the log: "outboard-blk exited with status 1".
    pub fn describe_exit(&self, wait: Duration) -> String {
        match self.exit_status(wait) {
            Some(s) => format!("its process {}", describe(s)),
            None => "its process is still running".into(),
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        if let Ok(mut c) = self.child.lock() {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill only sends a signal; under this lock the
                // child was just found running and nobody can reap it, so
                // the pid is still ours.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        if self.exit_status(grace).is_none() {
            log::warn!("{}: device process ignored SIGTERM; killing it", self.name);
            if let Ok(mut c) = self.child.lock() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({s})"),
    }
}

/// The program to run: the configured one, else the kind's in-tree
/// program next to the running `outboard` binary.
fn find_program(name: &str, kind: DeviceKind, spawn: &SpawnConfig) -> Result<PathBuf, DeviceError> {
    if let Some(p) = &spawn.program {
        return Ok(p.clone());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(kind.program())));
    match beside {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(DeviceError::ProgramNotFound {
            name: name.into(),
            program: kind.program(),
        }),
    }
}

/// A 0700 directory under the temp dir, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> std::io::Result<Self> {
        let template = std::env::temp_dir().join("outboard-XXXXXX");
        let template = CString::new(template.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::other("temp dir path contains NUL"))?;
        let mut buf = template.into_bytes_with_nul();
        // SAFETY: buf is a writable NUL-terminated template ending in
        // XXXXXX, as mkdtemp requires; it only rewrites those bytes.
        let p = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        buf.pop();
        Ok(PrivateDir(PathBuf::from(OsString::from_vec(buf))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // The connection is made; nobody needs the path any more.
        let _ = std::fs::remove_dir_all(Path::new(&self.0));
    }
}
