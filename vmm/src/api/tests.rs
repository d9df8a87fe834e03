//! The API over a real unix socket, against [`FakeVm`].

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use outboard_migration::Address;

use super::client::{self, ApiArgs, ApiCommand, ClientError};
use super::fake::FakeVm;
use super::http::{parse_response, ParsedResponse, MAX_BODY, MAX_HEAD};
use super::server::{serve_with, Limits};
use super::*;

fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "outboard-api-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

struct Harness {
    vm: Arc<FakeVm>,
    server: ApiServer,
}

impl Harness {
    fn start() -> Self {
        Self::with(Limits::default())
    }

    fn with(limits: Limits) -> Self {
        let vm = Arc::new(FakeVm::new());
        let server = serve_with(&socket_path(), vm.clone(), limits).unwrap();
        Harness { vm, server }
    }

    fn path(&self) -> &Path {
        self.server.path()
    }

    /// Sends raw bytes, reads the whole answer.
    fn raw(&self, bytes: &[u8]) -> ParsedResponse {
        exchange(self.path(), bytes)
    }

    fn call(&self, method: &str, target: &str, body: Option<&str>) -> ParsedResponse {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\n");
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or_default());
        self.raw(req.as_bytes())
    }
}

fn exchange(path: &Path, bytes: &[u8]) -> ParsedResponse {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (413, 431) and close before taking it all.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse_response(&out).unwrap()
}

fn error(r: &ParsedResponse) -> String {
    serde_json::from_slice::<ErrorBody>(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
        .error
}

fn json<T: serde::de::DeserializeOwned>(r: &ParsedResponse) -> T {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn api_info_answers_with_the_vm() {
    let h = Harness::start();
    let r = h.call("GET", "/vm", None);
    let info: VmInfo = json(&r);
    assert_eq!(info.state, VmState::Running);
    assert_eq!(
        (info.vcpus, info.memory_mib, info.uptime_ms),
        (2, 256, 1234)
    );
    assert_eq!(info.devices[0].id, "disk0");
    assert!(r
        .headers
        .contains(&("content-type".into(), "application/json".into())));
    assert!(r.headers.contains(&("connection".into(), "close".into())));
    // The query string is ignored.
    assert_eq!(h.call("GET", "/vm?verbose=1", None).status, 200);
}

#[test]
fn api_pause_resume_and_their_conflicts() {
    let h = Harness::start();
    let r = h.call("PUT", "/vm/pause", None);
    assert_eq!((r.status, r.body.len()), (204, 0));
    assert_eq!(
        json::<VmInfo>(&h.call("GET", "/vm", None)).state,
        VmState::Paused
    );
    let r = h.call("PUT", "/vm/pause", None);
    assert_eq!(
        (r.status, error(&r).as_str()),
        (409, "the VM is already paused")
    );
    // An empty object counts as no body.
    assert_eq!(h.call("PUT", "/vm/resume", Some(" {} ")).status, 204);
    assert_eq!(h.call("PUT", "/vm/resume", None).status, 409);
    let r = h.call("PUT", "/vm/pause", Some(r#"{"now": true}"#));
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("now"), "{}", error(&r));
    assert_eq!(
        json::<VmInfo>(&h.call("GET", "/vm", None)).state,
        VmState::Running
    );
}

#[test]
fn api_shutdown_is_204_then_409() {
    let h = Harness::start();
    assert_eq!(h.call("PUT", "/vm/shutdown", None).status, 204);
    assert!(h.vm.wait_for(VmState::ShuttingDown));
    assert_eq!(h.call("PUT", "/vm/shutdown", None).status, 409);
}

#[test]
fn api_snapshot_reports_and_rejects_bad_bodies() {
    let h = Harness::start();
    let r = h.call(
        "PUT",
        "/vm/snapshot",
        Some(r#"{"destination": "file:/var/tmp/vm.snap"}"#),
    );
    let report: SnapshotReport = json(&r);
    assert_eq!(report.bytes_written, 268_435_456);
    h.vm.seen(|s| {
        assert_eq!(
            s.snapshots[0].destination,
            Address::File("/var/tmp/vm.snap".into())
        )
    });

    let cases = [
        (r#"{"destination": "tcp:h:1"}"#, "destination"),
        (r#"{"destination": "file:"}"#, "destination"),
        (r#"{"destination": 7}"#, "destination"),
        (
            r#"{"destination": "file:/x", "compress": true}"#,
            "compress",
        ),
        (r#"{}"#, "destination"),
        (r#"{"destination": "file:/x""#, "EOF"),
        (r#"{"destination": "file:/x"} {}"#, "trailing"),
        (r#""file:/x""#, "SnapshotRequest"),
        ("not json", "expected"),
        ("", "needs a JSON body"),
    ];
    for (body, named) in cases {
        let r = h.call("PUT", "/vm/snapshot", Some(body));
        assert_eq!(r.status, 400, "{body}");
        let message = error(&r);
        assert!(message.contains(named), "{body}: {message}");
    }
    let r = h.call(
        "PUT",
        "/vm/snapshot",
        Some(r#"{"destination": "file:/fail/x"}"#),
    );
    assert_eq!(
        (r.status, error(&r).as_str()),
        (500, "cannot create /fail/x: Permission denied")
    );
}

#[test]
fn api_migrate_applies_defaults_and_validates() {
    let h = Harness::start();
    let r = h.call(
        "PUT",
        "/vm/migrate",
        Some(r#"{"destination": "unix:/run/dst.sock"}"#),
    );
    let report: MigrationReport = json(&r);
    assert_eq!((report.rounds, report.bytes_sent), (4, 300_000_000));
    let r = h.call(
        "PUT",
        "/vm/migrate",
        Some(r#"{"destination": "unix:/d", "downtime_ms": 50, "timeout_s": 30}"#),
    );
    assert_eq!(r.status, 200);
    h.vm.seen(|s| {
        let first = &s.migrations[0];
        assert_eq!(first.destination, Address::Unix("/run/dst.sock".into()));
        assert_eq!((first.downtime_ms, first.timeout_s), (300, 600));
        assert_eq!(
            (s.migrations[1].downtime_ms, s.migrations[1].timeout_s),
            (50, 30)
        );
    });
    let cases = [
        (r#"{"destination": "file:/x"}"#, "destination"),
        (r#"{"destination": "tcp:host"}"#, "destination"),
        (
            r#"{"destination": "unix:/d", "downtime_ms": 0}"#,
            "downtime_ms",
        ),
        (r#"{"destination": "unix:/d", "timeout_s": 0}"#, "timeout_s"),
        (
            r#"{"destination": "unix:/d", "downtime_ms": -1}"#,
            "downtime_ms",
        ),
        (r#"{"destination": "unix:/d", "downtime": 5}"#, "downtime"),
    ];
    for (body, named) in cases {
        let r = h.call("PUT", "/vm/migrate", Some(body));
        assert_eq!(r.status, 400, "{body}");
        assert!(error(&r).contains(named), "{body}: {}", error(&r));
    }
    let r = h.call("PUT", "/vm/migrate/cancel", None);
    assert_eq!(
        (r.status, error(&r).as_str()),
        (409, "no migration is running")
    );
}

#[test]
fn api_info_and_cancel_answer_during_a_blocking_migration() {
    let h = Arc::new(Harness::start());
    let migrating = {
        let h = h.clone();
        std::thread::spawn(move || {
            h.call(
                "PUT",
                "/vm/migrate",
                Some(r#"{"destination": "tcp:[::1]:4444"}"#),
            )
        })
    };
    assert!(h.vm.wait_for(VmState::Migrating));
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            json::<VmInfo>(&h.call("GET", "/vm", None)).state,
            VmState::Migrating
        );
    }
    assert_eq!(h.call("PUT", "/vm/pause", None).status, 409);
    let r = h.call("PUT", "/vm/migrate", Some(r#"{"destination": "tcp:h:1"}"#));
    assert_eq!(r.status, 409);
    assert_eq!(h.call("PUT", "/vm/migrate/cancel", None).status, 204);
    let r = migrating.join().unwrap();
    assert_eq!((r.status, error(&r).as_str()), (409, "migration cancelled"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        json::<VmInfo>(&h.call("GET", "/vm", None)).state,
        VmState::Running
    );
}

#[test]
fn api_unknown_paths_are_404_and_wrong_methods_405() {
    let h = Harness::start();
    for path in ["/", "/vm/", "/vms", "/vm/pause/now", "/VM"] {
        let r = h.call("GET", path, None);
        assert_eq!(r.status, 404, "{path}");
        assert!(error(&r).contains("no such path"));
    }
    for (method, path, allow) in [
        ("PUT", "/vm", "GET"),
        ("POST", "/vm", "GET"),
        ("GET", "/vm/pause", "PUT"),
        ("DELETE", "/vm/migrate", "PUT"),
        ("GET", "/vm/migrate/cancel", "PUT"),
    ] {
        let r = h.call(method, path, None);
        assert_eq!(r.status, 405, "{method} {path}");
        assert!(r.headers.contains(&("allow".into(), allow.into())));
    }
}

#[test]
fn api_garbage_gets_a_status_not_a_dead_server() {
    let h = Harness::start();
    let huge_header = format!(
        "GET /vm HTTP/1.1\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    );
    let big_body = format!(
        "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
        MAX_BODY + 1,
        "a".repeat(MAX_BODY + 1)
    );
    let cases: [(&[u8], u16); 8] = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /vm HTTP/2.0\r\n\r\n", 505),
        (huge_header.as_bytes(), 431),
        (big_body.as_bytes(), 413),
        (
            b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
            413,
        ),
        (
            b"PUT /vm/snapshot HTTP/1.1\r\n\r\n{\"destination\": \"file:/x\"}",
            411,
        ),
        (
            b"PUT /vm/snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            501,
        ),
    ];
    for (bytes, status) in cases {
        let r = h.raw(bytes);
        assert_eq!(
            r.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
        );
        assert!(!error(&r).is_empty());
    }
    // Connecting and hanging up sends nothing back and breaks nothing.
    drop(UnixStream::connect(h.path()).unwrap());
    assert_eq!(h.call("GET", "/vm", None).status, 200);
}

#[test]
fn api_slow_requests_time_out_without_holding_others() {
    let h = Harness::with(Limits {
        request_time: Duration::from_millis(400),
        ..Limits::default()
    });
    let mut slow = UnixStream::connect(h.path()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
    // Trickling header bytes does not extend the deadline.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        if slow.write_all(b"X: y\r\n").is_err() {
            break;
        }
        if started.elapsed() < Duration::from_millis(300) {
            assert_eq!(h.call("GET", "/vm", None).status, 200);
        }
    }
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    let r = parse_response(&out).unwrap();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.call("GET", "/vm", None).status, 200);
}

#[test]
fn api_connections_beyond_the_limit_get_503() {
    let h = Harness::with(Limits {
        request_time: Duration::from_millis(500),
        max_connections: 1,
        ..Limits::default()
    });
    let idle = UnixStream::connect(h.path()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let r = h.call("GET", "/vm", None);
    assert_eq!(r.status, 503);
    drop(idle);
    // The idle connection's slot comes back once it ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.call("GET", "/vm", None).status != 200 {
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn api_a_panicking_handler_is_a_500_and_the_server_lives() {
    let h = Harness::start();
    let r = h.call(
        "PUT",
        "/vm/snapshot",
        Some(r#"{"destination": "file:/panic"}"#),
    );
    assert_eq!(r.status, 500);
    assert!(error(&r).contains("panicked"));
    assert_eq!(h.call("GET", "/vm", None).status, 200);
}

#[test]
fn api_socket_is_replaced_when_stale_refused_when_live_and_removed_on_drop() {
    let path = socket_path();
    // Stale: bound, then the listener is gone.
    drop(UnixListener::bind(&path).unwrap());
    let vm: Arc<dyn VmControl> = Arc::new(FakeVm::new());
    let server = serve(&path, vm.clone()).unwrap();
    assert_eq!(exchange(&path, b"GET /vm HTTP/1.1\r\n\r\n").status, 200);
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Live: another server on it.
    let e = serve(&path, vm.clone()).err().unwrap();
    assert_eq!(e.status, 500);
    assert!(e.message.contains("another process"), "{}", e.message);
    drop(server);
    assert!(!path.exists());

    // Not a socket: refused and left alone.
    std::fs::write(&path, b"precious").unwrap();
    let e = serve(&path, vm.clone()).err().unwrap();
    assert!(e.message.contains("not a socket"), "{}", e.message);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // Someone else's socket at the path by drop time stays.
    let server = serve(&path, vm).unwrap();
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(path.exists());
    drop(theirs);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn api_config_only_stand_in_answers_info_and_501() {
    let config: crate::config::VmConfig = serde_json::from_str(
        r#"{"machine": {"vcpus": 2, "memory_mib": 128},
            "kernel": {"path": "/k"},
            "devices": [{"kind": "vfio-user", "transport": "pci", "socket": "/s"},
                        {"id": "root", "kind": "vhost-user-blk", "socket": "/t"}]}"#,
    )
    .unwrap();
    let vm = Arc::new(ConfigOnly::new(&config));
    let server = serve(&socket_path(), vm).unwrap();
    let info: VmInfo = json(&exchange(server.path(), b"GET /vm HTTP/1.1\r\n\r\n"));
    assert_eq!((info.vcpus, info.memory_mib), (2, 128));
    let ids: Vec<_> = info
        .devices
        .iter()
        .map(|d| format!("{} {} {}", d.id, d.kind, d.transport))
        .collect();
    assert_eq!(
        ids,
        ["vfio-user0 vfio-user pci", "root vhost-user-blk mmio"]
    );
    let r = exchange(server.path(), b"PUT /vm/pause HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 501);
}

/// `outboard api ...` as main.rs nests it.
#[derive(Parser, Debug)]
struct Top {
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TopCommand {
    Api(ApiArgs),
}

fn parse(args: &[&str]) -> Result<ApiArgs, clap::Error> {
    let argv = ["outboard", "api"].iter().chain(args);
    Top::try_parse_from(argv).map(|t| match t.command {
        TopCommand::Api(a) => a,
    })
}

#[test]
fn api_client_parses_its_subcommands() {
    let a = parse(&["--socket", "/run/vm.sock", "info"]).unwrap();
    assert_eq!(a.socket, PathBuf::from("/run/vm.sock"));
    assert_eq!(a.command, ApiCommand::Info);
    for (word, command) in [
        ("pause", ApiCommand::Pause),
        ("resume", ApiCommand::Resume),
        ("shutdown", ApiCommand::Shutdown),
        ("cancel", ApiCommand::Cancel),
    ] {
        assert_eq!(parse(&["--socket", "s", word]).unwrap().command, command);
    }
    let a = parse(&["--socket", "s", "snapshot", "file:/tmp/x"]).unwrap();
    let call = a.command.call();
    assert_eq!((call.method, call.path), ("PUT", "/vm/snapshot"));
    assert_eq!(
        call.body.unwrap(),
        serde_json::json!({"destination": "file:/tmp/x"})
    );
    let a = parse(&["--socket", "s", "migrate", "tcp:h:1", "--downtime-ms", "50"]).unwrap();
    assert_eq!(
        a.command.call().body.unwrap(),
        serde_json::json!({"destination": "tcp:h:1", "downtime_ms": 50})
    );
    let a = parse(&["--socket", "s", "migrate", "unix:/d", "--timeout-s", "9"]).unwrap();
    assert_eq!(
        a.command.call().body.unwrap(),
        serde_json::json!({"destination": "unix:/d", "timeout_s": 9})
    );
    for bad in [
        &["info"][..],
        &["--socket", "s"],
        &["--socket", "s", "reboot"],
        &["--socket", "s", "snapshot"],
        &[
            "--socket",
            "s",
            "migrate",
            "tcp:h:1",
            "--downtime-ms",
            "soon",
        ],
        &["--socket", "s", "info", "extra"],
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn api_client_talks_to_the_server() {
    let h = Harness::start();
    let socket = h.path().to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        client::run(&parse(&all).unwrap())
    };
    let out = run(&["info"]).unwrap();
    assert!(out.contains("\n  \"state\": \"running\""), "{out}");
    assert_eq!(run(&["pause"]).unwrap(), "");
    let e = run(&["pause"]).unwrap_err();
    assert_eq!(e.to_string(), "409 the VM is already paused");
    assert_eq!(run(&["resume"]).unwrap(), "");
    let out = run(&["migrate", "unix:/d", "--downtime-ms", "20"]).unwrap();
    assert!(out.contains("\"rounds\": 4"), "{out}");
    h.vm.seen(|s| assert_eq!(s.migrations[0].downtime_ms, 20));
    let e = run(&["snapshot", "tcp:h:1"]).unwrap_err();
    assert!(e.to_string().starts_with("400 destination: "), "{e}");
    let e = run(&["cancel"]).unwrap_err();
    assert!(matches!(e, ClientError::Api(ApiError { status: 409, .. })));

    let gone = ApiArgs {
        socket: socket_path(),
        command: ApiCommand::Info,
    };
    let e = client::run(&gone).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }));
    assert!(e.to_string().starts_with("cannot connect to "), "{e}");
}

#[test]
fn api_openapi_yaml_names_every_route_schema_and_field() {
    let spec = include_str!("../../api/openapi.yaml");
    for path in [
        "/vm",
        "/vm/pause",
        "/vm/resume",
        "/vm/shutdown",
        "/vm/snapshot",
        "/vm/migrate",
        "/vm/migrate/cancel",
    ] {
        assert!(spec.contains(&format!("\n  {path}:\n")), "{path}");
    }
    let samples = [
        (
            "VmInfo",
            serde_json::to_value(FakeVm::new().info()).unwrap(),
        ),
        (
            "DeviceInfo",
            serde_json::to_value(&FakeVm::new().info().devices[0]).unwrap(),
        ),
        (
            "SnapshotRequest",
            serde_json::json!({"destination": "file:/x"}),
        ),
        (
            "SnapshotReport",
            serde_json::to_value(SnapshotReport {
                total_ms: 0,
                downtime_ms: 0,
                bytes_written: 0,
            })
            .unwrap(),
        ),
        (
            "MigrateRequest",
            serde_json::to_value(MigrateRequest {
                destination: Address::Unix("/d".into()),
                downtime_ms: 1,
                timeout_s: 1,
            })
            .unwrap(),
        ),
        (
            "MigrationReport",
            serde_json::to_value(MigrationReport {
                total_ms: 0,
                downtime_ms: 0,
                bytes_sent: 0,
                rounds: 1,
            })
            .unwrap(),
        ),
        ("Error", serde_json::json!({"error": ""})),
    ];
    for (schema, sample) in samples {
        let section = schema_section(spec, schema);
        for key in sample.as_object().unwrap().keys() {
            assert!(
                section.contains(&format!("\n        {key}:\n")),
                "{schema}.{key} is not in openapi.yaml"
            );
        }
    }
}

/// The lines of `components.schemas.<name>` (up to the next line indented
/// by exactly four spaces).
fn schema_section<'a>(spec: &'a str, name: &str) -> &'a str {
    let schemas = spec.find("\n  schemas:\n").expect("no components.schemas");
    let start = schemas
        + spec[schemas..]
            .find(&format!("\n    {name}:\n"))
            .unwrap_or_else(|| panic!("no schema {name} in openapi.yaml"))
        + 1;
    let rest = &spec[start..];
    let mut end = 0;
    for (i, line) in rest.split_inclusive('\n').enumerate() {
        if i > 0 && line.starts_with("    ") && !line.starts_with("     ") {
            break;
        }
        end += line.len();
    }
    &rest[..end]
}
