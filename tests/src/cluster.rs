//! A cluster of real `sluice-broker` processes on loopback, with a fault-injecting
//! proxy on every node-to-node link.
//!
//! Node `i` listens for peers on a port of its own, but the `--peers` list every
//! node is started with names a proxy port for it instead. The proxy reads the
//! `Hello` each connection starts with, so it knows which node dials which, and
//! [`Cluster::isolate`] / [`Cluster::heal`] cut or restore any pair's links (the
//! network partition tests). Every process and proxy thread stops when the
//! [`Cluster`] is dropped.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{free_port, scratch, Broker};

/// A proxied connection: (from node, to node), the dialler's side, the node's side.
type Proxied = ((u32, u32), TcpStream, TcpStream);

/// Which (from, to) node pairs may talk, and every live proxied connection.
#[derive(Default)]
struct Links {
    blocked: Mutex<HashSet<(u32, u32)>>,
    open: Mutex<Vec<Proxied>>,
    stop: AtomicBool,
}

impl Links {
    fn is_blocked(&self, pair: (u32, u32)) -> bool {
        self.blocked.lock().unwrap().contains(&pair)
    }

    /// Closes the open connections of blocked pairs.
    fn cut(&self) {
        let blocked = self.blocked.lock().unwrap().clone();
        let mut open = self.open.lock().unwrap();
        open.retain(|(pair, a, b)| {
            if blocked.contains(pair) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
    }
}

/// A cluster of `n` nodes (ids 1..=n).
pub struct Cluster {
    /// Node `i` is `nodes[i - 1]` (None while stopped).
    pub nodes: Vec<Option<Broker>>,
    dirs: Vec<PathBuf>,
    client_ports: Vec<u16>,
    extra: Vec<Vec<String>>,
    links: Arc<Links>,
}

impl Cluster {
    /// Starts `n` nodes with `extra` broker flags and waits for a controller.
    pub fn start(name: &str, n: u32, extra: &[&str]) -> Cluster {
        let dir = scratch(name);
        let links = Arc::new(Links::default());
        let mut proxy_ports = Vec::new();
        let mut peer_ports = Vec::new();
        for node in 1..=n {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            proxy_ports.push(listener.local_addr().unwrap().port());
            let real = free_port();
            peer_ports.push(real);
            let links = links.clone();
            std::thread::spawn(move || proxy(listener, node, real, links));
        }
        let peers: Vec<String> = proxy_ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1))
            .collect();
        let peers = peers.join(",");
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        let mut extras = Vec::new();
        for node in 1..=n {
            let data = dir.join(format!("node-{node}"));
            let mut args: Vec<String> = vec![
                "--node-id".into(),
                node.to_string(),
                "--peer-listen".into(),
                format!("127.0.0.1:{}", peer_ports[node as usize - 1]),
                "--peers".into(),
                peers.clone(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            dirs.push(data.clone());
            extras.push(args);
        }
        // Start them all before waiting: a node is ready only once it listens,
        // and the controller needs a majority.
        for node in 1..=n {
            let args: Vec<&str> = extras[node as usize - 1]
                .iter()
                .map(String::as_str)
                .collect();
            nodes.push(Some(Broker::start_in_background(
                &dirs[node as usize - 1],
                client_ports[node as usize - 1],
                &args,
            )));
        }
        let cluster = Cluster {
            nodes,
            dirs,
            client_ports,
            extra: extras,
            links,
        };
        for broker in cluster.nodes.iter().flatten() {
            broker.wait_until_ready();
        }
        cluster.wait_for(Duration::from_secs(30), "a controller", |c| {
            c.controller().is_some()
        });
        cluster
    }

    /// `--brokers` naming every node (running or not).
    pub fn brokers(&self) -> String {
        self.client_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `--brokers` naming the running nodes.
    pub fn live_brokers(&self) -> String {
        self.nodes
            .iter()
            .flatten()
            .map(Broker::brokers)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s client address.
    pub fn address(&self, id: u32) -> String {
        format!("127.0.0.1:{}", self.client_ports[id as usize - 1])
    }

    /// Node `id` (running).
    pub fn node(&self, id: u32) -> &Broker {
        self.nodes[id as usize - 1]
            .as_ref()
            .expect("node is running")
    }

    /// Node `id`'s data dir.
    pub fn data_dir(&self, id: u32) -> &Path {
        &self.dirs[id as usize - 1]
    }

    /// Kills node `id` with SIGKILL.
    pub fn kill9(&mut self, id: u32) {
        if let Some(mut broker) = self.nodes[id as usize - 1].take() {
            broker.kill9();
        }
    }

    /// Stops node `id` with SIGTERM.
    pub fn stop(&mut self, id: u32) {
        if let Some(mut broker) = self.nodes[id as usize - 1].take() {
            assert!(broker.terminate(), "node {id} did not stop cleanly");
        }
    }

    /// Starts node `id` again on its data dir and ports.
    pub fn restart(&mut self, id: u32) {
        assert!(
            self.nodes[id as usize - 1].is_none(),
            "stop node {id} first"
        );
        let args: Vec<&str> = self.extra[id as usize - 1]
            .iter()
            .map(String::as_str)
            .collect();
        let broker = Broker::start_in(
            &self.dirs[id as usize - 1],
            self.client_ports[id as usize - 1],
            &args,
        );
        self.nodes[id as usize - 1] = Some(broker);
    }

    /// Runs the CLI with `--brokers` naming the running nodes.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        crate::run_cli(&self.live_brokers(), args, stdin)
    }

    /// Runs the CLI against one node only.
    pub fn cli_on(&self, id: u32, args: &[&str], stdin: Option<&str>) -> Output {
        crate::run_cli(&self.address(id), args, stdin)
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

    /// `topic describe --format json` as node `via` sees it.
    pub fn describe_on(&self, via: u32, topic: &str) -> Option<serde_json::Value> {
        let output = self.cli_on(via, &["topic", "describe", topic, "--format", "json"], None);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// `cluster status --format json` as node `via` sees it.
    pub fn status_on(&self, via: u32) -> Option<serde_json::Value> {
        let output = self.cli_on(via, &["cluster", "status", "--format", "json"], None);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// The running nodes' ids.
    pub fn running(&self) -> Vec<u32> {
        (1..=self.nodes.len() as u32)
            .filter(|id| self.nodes[*id as usize - 1].is_some())
            .collect()
    }

    /// The controller leader as some running node reports it.
    pub fn controller(&self) -> Option<u32> {
        self.running().into_iter().find_map(|id| {
            let status = self.status_on(id)?;
            let controller = status["controller"].as_u64()? as u32;
            (controller != 0 && self.running().contains(&controller)).then_some(controller)
        })
    }

    /// The leader of `topic`/`partition` as the running nodes agree on it (the
    /// leader itself must be running and say so).
    pub fn leader_of(&self, topic: &str, partition: u32) -> Option<u32> {
        let running = self.running();
        let leader = running.iter().find_map(|id| {
            let description = self.describe_on(*id, topic)?;
            let leader = description["partitions"][partition as usize]["leader"].as_u64()? as u32;
            (leader != 0).then_some(leader)
        })?;
        if !running.contains(&leader) {
            return None;
        }
        let own = self.describe_on(leader, topic)?;
        (own["partitions"][partition as usize]["leader"].as_u64()? as u32 == leader)
            .then_some(leader)
    }

    /// Waits until `test` holds (polling), or fails the test saying `what`.
    pub fn wait_for(&self, within: Duration, what: &str, test: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if test(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {what} within {within:?}");
    }

    /// Waits for a leader of `topic`/`partition` and returns it and how long it took.
    pub fn wait_for_leader(
        &self,
        topic: &str,
        partition: u32,
        within: Duration,
    ) -> (u32, Duration) {
        let started = Instant::now();
        let deadline = started + within;
        while Instant::now() < deadline {
            if let Some(leader) = self.leader_of(topic, partition) {
                return (leader, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{topic}/{partition} had no leader within {within:?}");
    }

    /// Cuts every link between node `id` and the others (both ways).
    pub fn isolate(&self, id: u32) {
        let count = self.nodes.len() as u32;
        {
            let mut blocked = self.links.blocked.lock().unwrap();
            for other in (1..=count).filter(|o| *o != id) {
                blocked.insert((id, other));
                blocked.insert((other, id));
            }
        }
        self.links.cut();
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.links.blocked.lock().unwrap().clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.links.stop.store(true, Ordering::SeqCst);
        for node in &mut self.nodes {
            node.take();
        }
        let open = std::mem::take(&mut *self.links.open.lock().unwrap());
        for (_, a, b) in open {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// Forwards connections to node `to`'s peer port, unless their pair is blocked.
fn proxy(listener: TcpListener, to: u32, real: u16, links: Arc<Links>) {
    listener.set_nonblocking(true).unwrap();
    while !links.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((inbound, _)) => {
                let links = links.clone();
                std::thread::spawn(move || forward(inbound, to, real, links));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn forward(mut inbound: TcpStream, to: u32, real: u16, links: Arc<Links>) {
    inbound.set_nonblocking(false).unwrap();
    let _ = inbound.set_read_timeout(Some(Duration::from_secs(5)));
    // The first frame is the dialler's Hello: it says who dials.
    let Some((hello, from)) = read_hello(&mut inbound) else {
        return;
    };
    if links.is_blocked((from, to)) {
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", real)) else {
        return;
    };
    if outbound.write_all(&hello).is_err() {
        return;
    }
    let _ = inbound.set_read_timeout(Some(Duration::from_millis(200)));
    links.open.lock().unwrap().push((
        (from, to),
        inbound.try_clone().unwrap(),
        outbound.try_clone().unwrap(),
    ));
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        if links.stop.load(Ordering::SeqCst) || links.is_blocked((from, to)) {
            break;
        }
        match inbound.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if outbound.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = inbound.shutdown(Shutdown::Both);
    let _ = outbound.shutdown(Shutdown::Both);
}

/// Reads one whole frame and the sender's node id from its `PeerFrame`.
fn read_hello(stream: &mut TcpStream) -> Option<(Vec<u8>, u32)> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let length = u32::from_le_bytes(prefix) as usize;
    if length > 1 << 20 {
        return None;
    }
    let mut rest = vec![0u8; length];
    stream.read_exact(&mut rest).ok()?;
    let envelope_bytes = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let envelope = rest.get(4..4 + envelope_bytes)?;
    let frame = flatbuffers::root::<sluice_schema::peer::PeerFrame>(envelope).ok()?;
    let mut whole = prefix.to_vec();
    whole.extend_from_slice(&rest);
    Some((whole, frame.from_node()))
}

/// One data entry of a replica's log, as its WAL holds it after recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedBatch {
    /// First offset.
    pub base_offset: u64,
    /// One past the last offset.
    pub end_offset: u64,
    /// Leader epoch (Raft term) it was written in.
    pub epoch: u32,
    /// CRC of the records.
    pub payload_crc: u32,
}

/// The logical log of `topic`/`partition` in a stopped node's data dir (truncated
/// entries excluded: this is what recovery rebuilds), and its high watermark.
pub fn replica_log(data_dir: &Path, topic: &str, partition: u32) -> (Vec<LoggedBatch>, u64) {
    use sluice_broker::storage::{format, Wal, WalConfig};
    use sluice_broker::types::{LogId, ShardId};
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("meta/node.json")).unwrap()).unwrap();
    let placement = &meta["topics"][topic]["partitions"][partition as usize];
    let shard = placement["shard"].as_u64().unwrap() as u16;
    let log = LogId(placement["log_id"].as_u64().unwrap() as u32);
    let config = WalConfig {
        dir: data_dir.join(format!("shard-{shard}")).join("wal"),
        shard: ShardId(shard),
        segment_bytes: 16 << 20,
        tail_cache_bytes: 1 << 20,
    };
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (wal, _) = Wal::open(config).await.unwrap();
            let view = wal.replicated_view(log).unwrap();
            let frames = wal
                .read_entries(log, view.first_index, view.end_index, usize::MAX)
                .await
                .unwrap();
            let batches = frames
                .iter()
                .filter_map(|(_, frame)| {
                    let header = format::header(frame).unwrap();
                    (header.record_count.get() > 0).then(|| LoggedBatch {
                        base_offset: header.base_offset.get(),
                        end_offset: header.base_offset.get() + u64::from(header.record_count.get()),
                        epoch: header.leader_epoch.get(),
                        payload_crc: header.payload_crc.get(),
                    })
                })
                .collect();
            wal.close().await;
            (batches, view.commit_offset)
        })
        .unwrap()
        .join()
        .unwrap()
}
