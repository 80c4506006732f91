//! Support for black-box tests: start real `sluice-broker` processes on free ports
//! with data dirs on a real filesystem, run the `sluice` CLI, and speak the raw
//! protocol to send bad input.
//!
//! Every broker a test starts is stopped when its [`Broker`] is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod cluster;
pub mod http;
pub mod proto;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sluice_client::frame::FrameDecoder;
use sluice_client::request::{encode_request_frame, RequestBody};
use sluice_schema::wire;

/// The workspace's target profile directory (where the binaries are).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary. The first call in a test process runs `cargo build`
/// for the broker and CLI binaries (a no-op when they are current), so tests never
/// run stale binaries.
///
/// `SLUICE_TEST_BIN_DIR` runs the tests against the binaries in another directory
/// (a release build, or an older build to show a test fails there), unbuilt.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    if let Some(dir) = std::env::var_os("SLUICE_TEST_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let path = bin_dir().join(name);
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile = bin_dir()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let mut command = Command::new(cargo);
        command.args([
            "build",
            "--quiet",
            "-p",
            "sluice-broker",
            "-p",
            "sluice-tools",
            "--bins",
        ]);
        if profile == "release" {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo build");
        assert!(
            status.success(),
            "building the broker and CLI binaries failed"
        );
    });
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// A fresh directory under the target dir (a real filesystem, not tmpfs).
pub fn scratch(name: &str) -> PathBuf {
    let dir = bin_dir()
        .join("..")
        .join("tmp")
        .join("black-box")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The broker's command line: data dir, listen address, 16 MiB segments and an
/// admin server on any free port (tests run in parallel) unless `extra` sets
/// them, then `extra`.
fn broker_args(data_dir: &Path, addr: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--data-dir".to_string(),
        data_dir.display().to_string(),
        "--listen".to_string(),
        addr.to_string(),
    ];
    if !extra.contains(&"--segment-mib") {
        args.extend(["--segment-mib".to_string(), "16".to_string()]);
    }
    if !extra.contains(&"--admin-listen") {
        args.extend(["--admin-listen".to_string(), "127.0.0.1:0".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A port nobody listens on right now, and that the kernel will not hand out on
/// its own: it is below the ephemeral range that `bind(…:0)` listeners (the admin
/// listeners of other brokers) and outgoing connections draw from. A test that
/// kills a broker and starts it again on the same port can then rely on the
/// port still being free; with an ephemeral port, another test's listener could
/// take it in between (seen once: a restarted node's port answered HTTP). Ports
/// are handed out in turn from a per-process starting point, never twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_start.clamp(10_001, 65_535));
    let span = high - low;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range {low}..{high}");
}

/// A running `sluice-broker` process.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Broker {
    /// Starts a broker on a free port with a fresh data dir.
    pub fn start(name: &str, extra: &[&str]) -> Broker {
        let dir = scratch(name);
        Broker::start_in(&dir.join("data"), free_port(), extra)
    }

    /// Starts a broker on `data_dir` and `port` without waiting for it to listen
    /// (see [`Broker::wait_until_ready`]).
    pub fn start_in_background(data_dir: &Path, port: u16, extra: &[&str]) -> Broker {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let args = broker_args(data_dir, addr, extra);
        Broker::spawn(data_dir, addr, args)
    }

    /// Waits until the broker answers a handshake (fails the test after 60 s).
    pub fn wait_until_ready(&self) {
        self.wait_ready();
    }

    /// Starts a broker on `data_dir` and `port`.
    pub fn start_in(data_dir: &Path, port: u16, extra: &[&str]) -> Broker {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let args = broker_args(data_dir, addr, extra);
        let broker = Broker::spawn(data_dir, addr, args);
        broker.wait_ready();
        broker
    }

    fn spawn(data_dir: &Path, addr: SocketAddr, args: Vec<String>) -> Broker {
        std::fs::create_dir_all(data_dir.parent().unwrap_or(data_dir)).unwrap();
        let log = data_dir.with_extension(format!("{}.log", addr.port()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin("sluice-broker"))
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start sluice-broker");
        Broker {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            log,
            args,
        }
    }

    /// Runs the broker binary with these args and returns its output (for start-up errors).
    pub fn run_expecting_failure(args: &[&str]) -> Output {
        Command::new(bin("sluice-broker"))
            .args(args)
            .output()
            .unwrap()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // A real handshake: the port alone may be a start-up probe.
            if handshakes(self.addr) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "broker at {} did not start; log:\n{}",
            self.addr,
            self.log_text()
        );
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `--brokers` value for the CLI.
    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        status.is_some_and(|s| s.success())
    }

    /// SIGKILL (a crash) and wait.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same data dir and port with the same arguments.
    pub fn restart(mut self) -> Broker {
        self.terminate();
        self.start_again()
    }

    /// Starts again after a kill or terminate.
    pub fn start_again(mut self) -> Broker {
        assert!(self.child.is_none(), "stop the broker first");
        let args = std::mem::take(&mut self.args);
        let broker = Broker::spawn(&self.data_dir, self.addr, args);
        broker.wait_ready();
        broker
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("broker running")
    }

    /// CPU seconds (user + system) the broker process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.pid())
    }

    /// The broker's resident memory, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        process_rss_bytes(self.pid())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Runs the `sluice` CLI against this broker.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_cli(&self.brokers(), args, stdin)
    }

    /// Runs the CLI and returns stdout, failing the test on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.cli(args, stdin);
        assert!(
            output.status.success(),
            "sluice {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

/// A current-thread tokio runtime for a test's client code.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the `sluice` CLI with `--brokers brokers` and returns its output.
pub fn run_cli(brokers: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(bin("sluice"));
    command.arg("--brokers").arg(brokers).args(args);
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(text) = stdin {
        // A CLI that refuses its arguments exits without reading its input;
        // the broken pipe that leaves is not the test's failure (the exit
        // status and stderr say what happened).
        match child.stdin.take().unwrap().write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.unwrap(),
        }
    }
    child.wait_with_output().unwrap()
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True if a handshake on `addr` succeeds.
fn handshakes(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut raw = Raw {
        stream,
        decoder: FrameDecoder::default(),
        next_id: 1,
        shard: 0,
        shard_count: 0,
    };
    let body = RequestBody::Handshake {
        version_min: 1,
        version_max: 1,
        client_software: None,
    };
    raw.request(&body, &[])
        .is_some_and(|reply| reply.response().error() == wire::ErrorCode::None)
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok();
    None
}

/// A raw protocol connection, for sending exactly the bytes a test wants.
pub struct Raw {
    pub stream: TcpStream,
    decoder: FrameDecoder,
    next_id: u32,
    /// The shard this connection landed on (after `handshake`).
    pub shard: u16,
    pub shard_count: u16,
}

/// A decoded response frame.
pub struct Reply {
    pub envelope: Bytes,
    pub payload: Bytes,
}

impl Reply {
    pub fn response(&self) -> wire::Response<'_> {
        flatbuffers::root::<wire::Response>(&self.envelope).expect("broker sends valid envelopes")
    }
}

impl Raw {
    /// Connects (no handshake).
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            decoder: FrameDecoder::default(),
            next_id: 1,
            shard: 0,
            shard_count: 0,
        }
    }

    /// Connects and handshakes.
    pub fn open(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        raw.handshake();
        raw
    }

    /// Connects and handshakes; `None` when the broker refuses (e.g. at its
    /// connection limit) or closes.
    pub fn try_open(addr: SocketAddr) -> Option<Raw> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .ok()?;
        let _ = stream.set_nodelay(true);
        let mut raw = Raw {
            stream,
            decoder: FrameDecoder::default(),
            next_id: 1,
            shard: 0,
            shard_count: 0,
        };
        let body = RequestBody::Handshake {
            version_min: 1,
            version_max: 1,
            client_software: Some("black-box-test".into()),
        };
        let reply = raw.request(&body, &[])?;
        let response = reply.response();
        if response.error() != wire::ErrorCode::None {
            return None;
        }
        let handshake = response.body_as_handshake_response()?;
        raw.shard = handshake.shard();
        raw.shard_count = handshake.shard_count();
        Some(raw)
    }

    /// Opens connections until one lands on `shard`.
    pub fn open_on_shard(addr: SocketAddr, shard: u16) -> Raw {
        for _ in 0..200 {
            let raw = Raw::open(addr);
            if raw.shard == shard {
                return raw;
            }
        }
        panic!("no connection landed on shard {shard}");
    }

    /// Like [`Raw::open_on_shard`], `None` if the broker refuses.
    pub fn try_open_on_shard(addr: SocketAddr, shard: u16) -> Option<Raw> {
        for _ in 0..200 {
            let raw = Raw::try_open(addr)?;
            if raw.shard == shard {
                return Some(raw);
            }
        }
        None
    }

    pub fn handshake(&mut self) {
        let reply = self
            .request(
                &RequestBody::Handshake {
                    version_min: 1,
                    version_max: 1,
                    client_software: Some("black-box-test".into()),
                },
                &[],
            )
            .expect("handshake reply");
        let response = reply.response();
        assert_eq!(response.error(), wire::ErrorCode::None);
        let handshake = response.body_as_handshake_response().unwrap();
        self.shard = handshake.shard();
        self.shard_count = handshake.shard_count();
    }

    /// Encodes a request frame (head + payload) without sending it.
    pub fn encode(&mut self, body: &RequestBody, payload: &[u8]) -> Vec<u8> {
        let mut head = BytesMut::new();
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let id = self.next_id;
        self.next_id += 1;
        encode_request_frame(&mut head, &mut fbb, id, "black-box", body, payload.len()).unwrap();
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Sends a request and reads one reply (`None` if the broker closed).
    pub fn request(&mut self, body: &RequestBody, payload: &[u8]) -> Option<Reply> {
        let bytes = self.encode(body, payload);
        self.send_raw(&bytes);
        self.read_reply()
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads one reply frame; `None` when the connection closed.
    pub fn read_reply(&mut self) -> Option<Reply> {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("broker frames are valid") {
                return Some(Reply {
                    envelope: frame.envelope,
                    payload: frame.payload,
                });
            }
            match self.stream.read(&mut buffer) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&buffer[..n]),
            }
        }
    }

    /// True if the broker closed the connection (reads EOF within the timeout).
    pub fn is_closed_by_broker(&mut self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(error) => return error.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields[11].parse().unwrap();
    let stime: f64 = fields[12].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (utime + stime) / ticks
}

/// Resident memory of a process, in bytes, from `/proc/<pid>/status`.
pub fn process_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// TCP sockets of process `pid` in CLOSE-WAIT (the peer closed, the process did not).
pub fn close_wait_sockets(pid: u32) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|target| {
                    let text = target.to_string_lossy().to_string();
                    text.strip_prefix("socket:[")
                        .and_then(|s| s.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st = 08 is CLOSE_WAIT; field 9 is the inode.
            if fields.len() > 9 && fields[3] == "08" && inodes.contains(fields[9]) {
                count += 1;
            }
        }
    }
    count
}
