//! `outboard api --socket PATH <command>`: one request to a running
//! VMM's control API, the answer printed as pretty JSON (nothing for 204),
//! an error as `outboard: api: <status> <message>`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::http::parse_response;
use super::{ApiError, ErrorBody};

/// Largest response the client reads.
const MAX_RESPONSE: u64 = 1 << 20;
/// How long a quick request (everything but snapshot and migrate) may take.
const QUICK_TIMEOUT: Duration = Duration::from_secs(60);

/// `outboard api`: talk to a running VMM's control API.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ApiArgs {
    /// The VMM's API socket (`outboard --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// What to ask.
    #[command(subcommand)]
    pub command: ApiCommand,
}

/// The requests.
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum ApiCommand {
    /// Print the VM's state, vCPUs, memory, devices and uptime.
    Info,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Write a snapshot of the VM.
    Snapshot {
        /// Where: file:PATH.
        #[arg(value_name = "DEST")]
        destination: String,
    },
    /// Migrate the VM; waits until it is done or failed.
    Migrate {
        /// Where: tcp:HOST:PORT or unix:PATH.
        #[arg(value_name = "DEST")]
        destination: String,
        /// Largest acceptable pause, in ms [VMM default: 300].
        #[arg(long, value_name = "N")]
        downtime_ms: Option<u64>,
        /// Give up after this many seconds [VMM default: 600].
        #[arg(long, value_name = "N")]
        timeout_s: Option<u64>,
    },
    /// Cancel the running migration.
    Cancel,
}

/// Why a call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The exchange failed half-way.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The answer was not HTTP as the server speaks it.
    #[error("bad response: {0}")]
    BadResponse(&'static str),
    /// The VMM answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// An HTTP request: method, path and JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// The path.
    pub path: &'static str,
    /// The body, if any.
    pub body: Option<serde_json::Value>,
    /// How long to wait for the answer; `None` for operations the VMM
    /// bounds itself (snapshot, migrate).
    pub timeout: Option<Duration>,
}

impl ApiCommand {
    /// The request this command makes.
    pub fn call(&self) -> Call {
        let quick = |method, path| Call {
            method,
            path,
            body: None,
            timeout: Some(QUICK_TIMEOUT),
        };
        match self {
            ApiCommand::Info => quick("GET", "/vm"),
            ApiCommand::Pause => quick("PUT", "/vm/pause"),
            ApiCommand::Resume => quick("PUT", "/vm/resume"),
            ApiCommand::Shutdown => quick("PUT", "/vm/shutdown"),
            ApiCommand::Cancel => quick("PUT", "/vm/migrate/cancel"),
            ApiCommand::Snapshot { destination } => Call {
                method: "PUT",
                path: "/vm/snapshot",
                body: Some(serde_json::json!({ "destination": destination })),
                timeout: None,
            },
            ApiCommand::Migrate {
                destination,
                downtime_ms,
                timeout_s,
            } => {
                let mut body = serde_json::Map::new();
                body.insert("destination".into(), destination.clone().into());
                if let Some(d) = downtime_ms {
                    body.insert("downtime_ms".into(), (*d).into());
                }
                if let Some(t) = timeout_s {
                    body.insert("timeout_s".into(), (*t).into());
                }
                Call {
                    method: "PUT",
                    path: "/vm/migrate",
                    body: Some(body.into()),
                    timeout: None,
                }
            }
        }
    }
}

/// Sends `call` to the server at `socket`; the JSON answer (`None` for
/// 204), or the error it sent.
pub fn send(socket: &Path, call: &Call) -> Result<Option<serde_json::Value>, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(call.timeout)?;
    stream.set_write_timeout(Some(QUICK_TIMEOUT))?;
    let body = call
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\n",
        call.method, call.path
    );
    if call.body.is_some() {
        request.push_str("Content-Type: application/json\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("Connection: close\r\n\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    (&mut stream).take(MAX_RESPONSE).read_to_end(&mut answer)?;
    let response = parse_response(&answer).map_err(ClientError::BadResponse)?;
    if !(200..300).contains(&response.status) {
        let message = match serde_json::from_slice::<ErrorBody>(&response.body) {
            Ok(b) => b.error,
            Err(_) => String::from_utf8_lossy(&response.body).trim().to_string(),
        };
        return Err(ApiError::new(response.status, message).into());
    }
    if response.status == 204 || response.body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&response.body)
        .map(Some)
        .map_err(|_| ClientError::BadResponse("the body is not JSON"))
}

/// Runs `outboard api`: what to print on stdout, or the error line's text
/// (after `outboard: api: `).
pub fn run(args: &ApiArgs) -> Result<String, ClientError> {
    Ok(match send(&args.socket, &args.command.call())? {
        Some(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()),
        None => String::new(),
    })
}
