use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use super::*;
use crate::section::Section;
use crate::stream::{StreamReader, StreamWriter};

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "outboard-migration-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

fn bad(s: &str) -> String {
    s.parse::<Address>().unwrap_err().to_string()
}

#[test]
fn parse_addresses() {
    assert_eq!(
        addr("tcp:127.0.0.1:4444"),
        Address::Tcp("127.0.0.1:4444".into())
    );
    assert_eq!(addr("tcp:[::1]:0"), Address::Tcp("[::1]:0".into()));
    assert_eq!(
        addr("tcp:dst-host:65535"),
        Address::Tcp("dst-host:65535".into())
    );
    assert_eq!(
        addr("unix:/run/m.sock"),
        Address::Unix("/run/m.sock".into())
    );
    assert_eq!(addr("file:snap:1"), Address::File("snap:1".into()));
    assert_eq!(addr("unix:/run/m.sock").kind(), ChannelKind::Unix);
    for s in ["tcp:[::1]:4444", "unix:/a/b", "file:x"] {
        assert_eq!(addr(s).to_string(), s);
    }

    assert_eq!(
        bad("/tmp/x"),
        "bad migration address \"/tmp/x\": expected tcp:HOST:PORT, unix:PATH or file:PATH"
    );
    assert!(bad("udp:1.2.3.4:5").contains("expected tcp:HOST:PORT, unix:PATH or file:PATH"));
    assert!(bad("tcp:host").contains("expected tcp:HOST:PORT"));
    assert!(bad("tcp::4444").contains("no host"));
    assert!(bad("tcp:host:65536").contains("the port is not a number"));
    assert!(bad("tcp:host:").contains("the port is not a number"));
    assert!(bad("tcp:::1:4444").contains("brackets"));
    assert!(bad("unix:").contains("no path"));
    assert!(bad("file:").contains("no path"));
}

/// Source sends a short stream, destination reads it and confirms.
fn exchange(source: SourceChannel, destination: thread::JoinHandle<DestinationChannel>) {
    assert!(source.can_reply());
    source.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let (out, replies) = source.into_parts();
    let mut w = StreamWriter::new(out).unwrap();
    w.write(&Section::Clock(vec![9; 1000])).unwrap();
    w.write(&Section::End).unwrap();

    let dest = destination.join().unwrap();
    assert!(dest.can_reply());
    dest.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let (input, reply) = dest.into_parts();
    let mut r = StreamReader::new(input).unwrap();
    assert_eq!(r.read().unwrap(), Section::Clock(vec![9; 1000]));
    assert_eq!(r.read().unwrap(), Section::End);
    let mut reply = StreamWriter::new(reply.unwrap()).unwrap();
    reply.write(&Section::Confirm).unwrap();

    let mut back = StreamReader::new(replies.unwrap()).unwrap();
    assert_eq!(back.read().unwrap(), Section::Confirm);
}

#[test]
fn tcp_loopback() {
    let listener = Listener::bind(&addr("tcp:127.0.0.1:0")).unwrap();
    let bound = listener.local_address().clone();
    let Address::Tcp(hp) = &bound else {
        panic!("{bound}")
    };
    assert!(!hp.ends_with(":0"), "{hp}");
    let accept = thread::spawn(move || listener.accept().unwrap());
    let source = connect(&bound).unwrap();
    assert_eq!(source.kind(), ChannelKind::Tcp);
    assert_eq!(source.address(), &bound);
    exchange(source, accept);
}

#[test]
fn unix_socket() {
    let dir = TempDir::new();
    let a = Address::Unix(dir.path("m.sock"));
    let listener = Listener::bind(&a).unwrap();
    // The path is taken while bound.
    let e = Listener::bind(&a).err().unwrap().to_string();
    assert!(e.starts_with(&format!("cannot listen on {a}: ")), "{e}");
    let accept = thread::spawn(move || listener.accept().unwrap());
    let source = connect(&a).unwrap();
    exchange(source, accept);
    // The socket file is gone once accepted.
    assert!(!Path::new(&dir.path("m.sock")).exists());
}

#[test]
fn file_snapshot() {
    let dir = TempDir::new();
    let a = Address::File(dir.path("vm.snap"));
    std::fs::write(dir.path("vm.snap"), vec![0xff; 10_000]).unwrap();
    let source = connect(&a).unwrap();
    assert!(!source.can_reply());
    assert_eq!(source.kind(), ChannelKind::File);
    source.set_timeout(Some(Duration::from_secs(1))).unwrap();
    let (out, replies) = source.into_parts();
    assert!(replies.is_none());
    let mut w = StreamWriter::new(out).unwrap();
    w.write(&Section::Pit(vec![1, 2])).unwrap();
    w.write(&Section::End).unwrap();
    drop(w);

    // The old, longer contents were truncated away.
    let dest = listen_accept(&a).unwrap();
    assert!(!dest.can_reply());
    let (input, reply) = dest.into_parts();
    assert!(reply.is_none());
    let mut r = StreamReader::new(input).unwrap();
    assert_eq!(r.read().unwrap(), Section::Pit(vec![1, 2]));
    assert_eq!(r.read().unwrap(), Section::End);
    assert!(matches!(r.read(), Err(crate::StreamError::Eof { .. })));
}

#[test]
fn errors_name_the_address() {
    let dir = TempDir::new();
    let missing = Address::File(dir.path("nope"));
    let e = listen_accept(&missing).err().unwrap().to_string();
    assert!(e.starts_with(&format!("cannot open {missing}: ")), "{e}");
    let e = connect(&Address::File(dir.path("no/such/dir")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("cannot create file:"), "{e}");
    let sock = Address::Unix(dir.path("nobody.sock"));
    let e = connect(&sock).err().unwrap().to_string();
    assert!(e.starts_with(&format!("cannot connect to {sock}: ")), "{e}");

    // A port nobody listens on: bind one, learn it, close it.
    let port = {
        let l = Listener::bind(&addr("tcp:127.0.0.1:0")).unwrap();
        l.local_address().clone()
    };
    let e = connect(&port).err().unwrap();
    assert!(
        matches!(&e, ChannelError::Io { op: "connect to", address, .. } if *address == port.to_string()),
        "{e}"
    );
}
