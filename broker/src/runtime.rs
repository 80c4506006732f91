//! Builds the executor pool (one pinned shard per core), wires the layers, and
//! shuts down gracefully. Used by the `sluice-broker` binary and, in-process, by
//! tests and `sluice-bench`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use arc_swap::ArcSwap;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

use crate::cluster::controller::CONTROLLER_LOG;
use crate::cluster::{ClusterConfig, ClusterView, NodeAddress};
use crate::mesh::{Mesh, MeshBuilders};
use crate::metadata::{parse_provision, NodeMetadata, TopicConfig};
use crate::replication::host::ReplicaHost;
use crate::replication::transport::PeerTransport;
use crate::shard::{Shard, ShardSettings};
use crate::shard_cluster::{ShardCluster, ShardInbound};
use crate::storage::{Wal, WalConfig};
use crate::types::{NodeId, ShardId};

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Client listen address.
    pub listen: SocketAddr,
    /// Shards (executors); default: one per online CPU.
    pub shards: usize,
    /// Pin shard i to `cpus[i]`; default: spread over online CPUs.
    pub cpus: Option<Vec<usize>>,
    /// This node's id.
    pub node_id: u32,
    /// WAL segment size.
    pub segment_bytes: u64,
    /// Tail cache per shard.
    pub tail_cache_bytes: usize,
    /// Provisioning file (topics created at start if missing).
    pub provision: Option<PathBuf>,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
    /// Connections per shard, at most.
    pub connections_max: usize,
    /// A frame must arrive within this long of its first byte (plus time for its size).
    pub frame_timeout: Duration,
    /// Retention runs this often.
    pub retention_check: Duration,
    /// Host to advertise in Metadata (default: the listen address's IP).
    pub advertised_host: Option<String>,
    /// Port to advertise in Metadata (default: the listen port), e.g. behind a
    /// proxy or a NAT.
    pub advertised_port: Option<u16>,
    /// Registered I/O memory per shard (glommio `io_memory`).
    pub io_memory_bytes: usize,
    /// In a cluster: this node's id, peer port and every node's peer address.
    pub cluster: Option<ClusterConfig>,
    /// Consumer groups: offsets partitions, session bounds, heartbeat interval.
    pub groups: crate::groups::GroupSettings,
    /// Metrics to fill (created by `start` when absent).
    pub metrics: Option<crate::metrics::NodeMetrics>,
}

impl BrokerConfig {
    /// Defaults for a data dir and listen address.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        BrokerConfig {
            data_dir: data_dir.into(),
            listen,
            shards: online_cpus(),
            cpus: None,
            node_id: 1,
            segment_bytes: crate::limits::SEGMENT_BYTES_DEFAULT,
            tail_cache_bytes: crate::limits::TAIL_CACHE_BYTES_DEFAULT,
            provision: None,
            idle_timeout: Duration::from_secs(600),
            connections_max: crate::limits::CONNECTIONS_PER_SHARD_MAX,
            frame_timeout: Duration::from_secs(crate::limits::FRAME_TIMEOUT_SECS_DEFAULT),
            retention_check: Duration::from_secs(5),
            advertised_host: None,
            advertised_port: None,
            io_memory_bytes: 4 << 20,
            cluster: None,
            groups: crate::groups::GroupSettings::default(),
            metrics: None,
        }
    }
}

/// CPUs online.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A running broker.
pub struct BrokerHandle {
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// Every shard's metrics (for the admin server).
    pub metrics: crate::metrics::NodeMetrics,
    shutdown: Arc<AtomicBool>,
    pool: Option<glommio::PoolThreadHandles<Result<(), String>>>,
}

impl BrokerHandle {
    /// The shutdown flag (set it to stop the broker).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Stops accepting, finishes in-flight requests, syncs and closes; waits.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.shutdown.store(true, Ordering::SeqCst);
        self.join_inner()
    }

    /// Waits until the broker stops (after the shutdown flag is set).
    pub fn join(mut self) -> Result<(), String> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), String> {
        let Some(pool) = self.pool.take() else {
            return Ok(());
        };
        let mut first_error = None;
        for result in pool.join_all() {
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(error) => format!("shard failed: {error}"),
            };
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        if self.pool.is_some() {
            self.shutdown.store(true, Ordering::SeqCst);
            let _ = self.join_inner();
        }
    }
}

/// Starts a broker; returns once every shard listens (or with the first error).
pub fn start(config: BrokerConfig) -> Result<BrokerHandle, String> {
    preflight(&config)?;
    let metadata = prepare_metadata(&config)?;
    let shards = config.shards;
    let listen = resolve_listen(config.listen)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let metrics = match &config.metrics {
        Some(metrics) if metrics.shards.len() == shards => metrics.clone(),
        _ => crate::metrics::NodeMetrics::new(shards),
    };
    let settings = Arc::new(ShardSettings {
        node_id: NodeId(config.node_id),
        data_dir: config.data_dir.clone(),
        advertised_host: config
            .advertised_host
            .clone()
            .unwrap_or_else(|| listen.ip().to_string()),
        advertised_port: config.advertised_port.unwrap_or(listen.port()),
        retention_check: config.retention_check,
        idle_timeout: config.idle_timeout,
        connections_max: config.connections_max,
        frame_timeout: config.frame_timeout,
        groups: config.groups.clone(),
        metrics: metrics.clone(),
    });
    let view = config.cluster.clone().map(|cluster| {
        Arc::new(ClusterView::new(
            cluster,
            NodeAddress {
                host: settings.advertised_host.clone(),
                port: settings.advertised_port,
                shard_count: shards as u16,
            },
        ))
    });
    let metadata = Arc::new(ArcSwap::from_pointee(metadata));
    let meshes = MeshBuilders::new(shards);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let placement = placement(&config)?;
    let shard_config = config.clone();
    let flag = shutdown.clone();
    let pool = LocalExecutorPoolBuilder::new(placement)
        .name("sluice-shard")
        .io_memory(config.io_memory_bytes)
        .on_all_shards(move || {
            let ready = ready_tx.clone();
            async move {
                let result = run_shard(
                    shard_config,
                    settings,
                    metadata,
                    meshes,
                    flag,
                    listen,
                    view.clone(),
                    ready.clone(),
                )
                .await;
                if let Err(error) = &result {
                    let _ = ready.send(Err(error.clone()));
                }
                result
            }
        })
        .map_err(|e| format!("cannot start the shard executors: {e} (Sluice needs io_uring: Linux >= 5.8, not disabled by kernel.io_uring_disabled or a container's seccomp profile)"))?;
    let mut handle = BrokerHandle {
        metrics: metrics.clone(),
        addr: listen,
        shutdown: shutdown.clone(),
        pool: Some(pool),
    };
    for _ in 0..shards {
        match ready_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                shutdown.store(true, Ordering::SeqCst);
                let _ = handle.join_inner();
                return Err(error);
            }
            Err(_) => {
                shutdown.store(true, Ordering::SeqCst);
                let _ = handle.join_inner();
                return Err("a shard did not start within 120 s".into());
            }
        }
    }
    tracing::info!(addr = %listen, shards, data_dir = %config.data_dir.display(), "sluice-broker ready");
    Ok(handle)
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    config: BrokerConfig,
    settings: Arc<ShardSettings>,
    metadata: Arc<ArcSwap<NodeMetadata>>,
    meshes: MeshBuilders,
    shutdown: Arc<AtomicBool>,
    listen: SocketAddr,
    view: Option<Arc<ClusterView>>,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let (mesh, inbox) = Mesh::join(meshes).await?;
    let id = ShardId(mesh.shard_index() as u16);
    let wal_config = WalConfig {
        dir: config.data_dir.join(format!("shard-{}", id.0)).join("wal"),
        shard: id,
        segment_bytes: config.segment_bytes,
        tail_cache_bytes: config.tail_cache_bytes,
    };
    let (wal, report) = Wal::open(wal_config)
        .await
        .map_err(|e| format!("shard {id}: cannot open its write-ahead log: {e}"))?;
    tracing::info!(shard = %id, frames = report.frames_scanned, bytes = report.bytes_scanned, checkpoint = report.checkpoint_used, clean = report.clean_shutdown, tail_synced = report.tail_synced, duration_ms = report.duration.as_millis() as u64, "WAL recovered");
    if let Some((segment, position, reason)) = &report.torn_tail {
        tracing::warn!(shard = %id, %segment, position, %reason, "cut a torn WAL tail (never acknowledged)");
    }
    if let Some((first, end, copy)) = &report.quarantined {
        tracing::error!(shard = %id, first, end, copy = %copy.display(), "intact frames after a torn write were cut with it (inside the unsynced window, so never acknowledged); a copy is kept");
    }
    for (log, offset, reason) in &report.corrupt_logs {
        tracing::error!(shard = %id, %log, offset, %reason, "partition log is corrupt; nothing at or past this offset is served");
    }
    sync_logs(&wal, &metadata.load(), id, view.is_some());
    let cluster = view.as_ref().map(|view| {
        let own = view
            .node_address(view.config.node)
            .expect("the view knows this node");
        let transport = PeerTransport::start(view.clone(), &own);
        let host = ReplicaHost::new(
            settings.node_id,
            wal.clone(),
            view.clone(),
            transport.clone(),
        );
        ShardCluster::new(view.clone(), host, transport, id)
    });
    let shard = Shard::new(
        id,
        wal.clone(),
        metadata,
        mesh.clone(),
        settings,
        shutdown,
        cluster,
    );
    let handler_shard = shard.clone();
    mesh.serve(inbox, move |request| {
        let shard = handler_shard.clone();
        async move { shard.execute(request).await }
    });
    let listener =
        crate::net::bind_listener(listen).map_err(|e| bind_error(listen, &e.to_string()))?;
    if let Some(cluster) = shard.cluster.clone() {
        start_cluster_shard(&shard, &cluster).await?;
    }
    glommio::spawn_local(shard.clone().watch_shutdown()).detach();
    glommio::spawn_local(shard.clone().retention_loop()).detach();
    {
        let metrics = shard.settings.metrics.shards[usize::from(id.0)].clone();
        let sync_metrics = metrics.clone();
        wal.set_sync_observer(move |us, appends| {
            sync_metrics.sync_latency.observe(us);
            sync_metrics.appends_per_sync.observe(appends);
        });
        wal.set_stage_observer(move |stages| {
            use crate::metrics::ProduceStage;
            metrics.stage(ProduceStage::WalQueue, stages.queue_us);
            metrics.stage(ProduceStage::WalWrite, stages.write_us);
            metrics.stage(ProduceStage::WalSyncWait, stages.sync_wait_us);
            metrics.stage(ProduceStage::WalSync, stages.sync_us);
        });
    }
    glommio::spawn_local(shard.clone().publish_metrics_loop()).detach();
    glommio::spawn_local(
        shard
            .clone()
            .group_expiry_loop(std::time::Duration::from_millis(250)),
    )
    .detach();
    shard
        .metrics()
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ready.send(Ok(()));
    crate::net::serve(shard.clone(), listener).await;
    shard
        .metrics()
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(cluster) = &shard.cluster {
        cluster.host.close();
        cluster.transport.close();
    }
    wal.close().await;
    if let Err(error) = wal.checkpoint().await {
        tracing::warn!(shard = %id, %error, "cannot write the WAL checkpoint at shutdown (next start rescans)");
    }
    tracing::info!(shard = %id, "shard stopped");
    Ok(())
}

/// Makes the WAL's logs match the metadata: create missing logs, drop deleted ones.
/// In a cluster, partition logs are replicated (their replicas create them) and
/// shard 0 also holds the controller's log.
fn sync_logs(wal: &Wal, metadata: &NodeMetadata, shard: ShardId, cluster: bool) {
    let mut wanted = std::collections::HashSet::new();
    for topic in metadata.topics.values() {
        let here = topic
            .partitions
            .iter()
            .filter(|p| p.shard == shard && p.local);
        for placement in here {
            wanted.insert(placement.log_id);
            if cluster {
                wal.create_replicated_log(placement.log_id);
            } else {
                wal.create_log(placement.log_id);
            }
            wal.set_segment_limit(placement.log_id, topic.config.segment_bytes);
        }
    }
    if cluster && usize::from(shard.0) == crate::shard::CONTROLLER_SHARD {
        wanted.insert(CONTROLLER_LOG);
        wal.create_replicated_log(CONTROLLER_LOG);
    }
    for log in wal.log_ids() {
        if !wanted.contains(&log) {
            wal.delete_log(log);
        }
    }
}

/// Starts a cluster shard: its replicas, the controller (shard 0), the peer
/// listener and the leadership gossip.
async fn start_cluster_shard(shard: &Rc<Shard>, cluster: &Rc<ShardCluster>) -> Result<(), String> {
    if cluster.controller.is_some() {
        cluster.host.set_apply_sink(shard.controller_sink());
        glommio::spawn_local(shard.clone().controller_loop()).detach();
    }
    shard.start_replicas().await;
    glommio::spawn_local(cluster.host.clone().run()).detach();
    glommio::spawn_local(shard.clone().gossip_loop()).detach();
    let peer_listen = cluster.view.config.peer_listen;
    let listener = crate::net::bind_listener(peer_listen).map_err(|e| {
        bind_error(peer_listen, &e.to_string()).replace("--listen", "--peer-listen")
    })?;
    let inbound: Rc<dyn crate::replication::transport::Inbound> =
        Rc::new(ShardInbound(shard.clone()));
    let stopping = shard.clone();
    glommio::spawn_local(crate::replication::transport::serve_peers(
        listener,
        cluster.view.clone(),
        inbound,
        move || stopping.shutting_down(),
    ))
    .detach();
    Ok(())
}

fn bind_error(listen: SocketAddr, error: &str) -> String {
    if error.contains("in use") {
        format!("cannot listen on {listen}: the address is in use (another broker?); choose another with --listen")
    } else {
        format!("cannot listen on {listen}: {error}")
    }
}

/// Resolves port 0 to a free port (all shards must bind the same one), and checks
/// that no live process listens on a given one. Listening sockets a crashed
/// predecessor left behind (see `port`) are waited for briefly, then shared: the
/// kernel drops them when its io_uring teardown ends.
fn resolve_listen(listen: SocketAddr) -> Result<SocketAddr, String> {
    if listen.port() == 0 {
        let probe = StdListener::bind(listen).map_err(|e| bind_error(listen, &e.to_string()))?;
        return probe.local_addr().map_err(|e| e.to_string());
    }
    let deadline = std::time::Instant::now() + ORPHANED_LISTENER_WAIT;
    loop {
        match StdListener::bind(listen) {
            Ok(_) => return Ok(listen),
            Err(error) if error.kind() != std::io::ErrorKind::AddrInUse => {
                return Err(bind_error(listen, &error.to_string()));
            }
            Err(_) => {}
        }
        match crate::port::holder(listen) {
            crate::port::PortHolder::Live(pid) => {
                return Err(format!(
                    "cannot listen on {listen}: the address is in use by process {pid} (another broker?); choose another with --listen"
                ));
            }
            // Free: the conflict went away meanwhile, or is not a listener; the
            // shards' own binds (SO_REUSEADDR and SO_REUSEPORT) decide.
            _ if std::time::Instant::now() >= deadline => {
                tracing::warn!(addr = %listen, "sockets no process holds (a crashed process's, being torn down by the kernel) still hold the port; binding beside them");
                return Ok(listen);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long start-up waits for a crashed predecessor's orphaned listeners to go.
const ORPHANED_LISTENER_WAIT: Duration = Duration::from_millis(800);

/// Checks what can be checked before starting executors, with advice.
fn preflight(config: &BrokerConfig) -> Result<(), String> {
    if config.shards == 0 || config.shards > crate::limits::SHARDS_MAX {
        return Err(format!(
            "--shards must be in 1..={}",
            crate::limits::SHARDS_MAX
        ));
    }
    if let Ok(value) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if value.trim() != "0" {
            return Err(format!(
                "io_uring is disabled on this machine (kernel.io_uring_disabled = {}); Sluice needs it: run `sysctl kernel.io_uring_disabled=0`",
                value.trim()
            ));
        }
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create data dir {}: {e}; choose another with --data-dir",
            config.data_dir.display()
        )
    })?;
    let probe = config.data_dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|e| {
        format!(
            "data dir {} is not writable: {e}; choose another with --data-dir",
            config.data_dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    check_memlock(config)?;
    Ok(())
}

/// glommio locks `io_memory` per shard plus its rings; too little locked memory
/// makes executors fail to register buffers.
fn check_memlock(config: &BrokerConfig) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Ok(());
    }
    let needed = (config.shards * (config.io_memory_bytes + (1 << 20))) as u64;
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= needed {
        return Ok(());
    }
    // Try to raise the soft limit up to the hard limit.
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max.min(needed.max(limit.rlim_cur)),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if (ok && raised.rlim_cur >= needed) || root {
        return Ok(());
    }
    Err(format!(
        "the locked-memory limit (ulimit -l) is {} KiB; {} shards need about {} KiB for io_uring buffers. Raise it (`ulimit -l unlimited`, or LimitMEMLOCK=infinity in a systemd unit) or start fewer --shards",
        limit.rlim_cur / 1024,
        config.shards,
        needed / 1024
    ))
}

fn placement(config: &BrokerConfig) -> Result<PoolPlacement, String> {
    let online = CpuSet::online().map_err(|e| format!("cannot read the online CPUs: {e}"))?;
    if let Some(cpus) = &config.cpus {
        if cpus.len() != config.shards {
            return Err(format!(
                "--cpus lists {} CPUs for {} shards",
                cpus.len(),
                config.shards
            ));
        }
        let sets = cpus
            .iter()
            .map(|cpu| {
                let set = online.clone().filter(|location| location.cpu == *cpu);
                if set.is_empty() {
                    Err(format!("CPU {cpu} is not online"))
                } else {
                    Ok(set)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(PoolPlacement::Custom(sets));
    }
    if config.shards <= online_cpus() {
        Ok(PoolPlacement::MaxSpread(config.shards, Some(online)))
    } else {
        Ok(PoolPlacement::Fenced(config.shards, online))
    }
}

/// Loads (or creates) the metadata and applies the provisioning file.
fn prepare_metadata(config: &BrokerConfig) -> Result<NodeMetadata, String> {
    let mut metadata = NodeMetadata::load_or_create(
        &config.data_dir,
        NodeId(config.node_id),
        config.shards as u16,
    )
    .map_err(|e| e.to_string())?;
    let single_node_topics = metadata.topics.values().any(|t| t.id == 0);
    match (&config.cluster, &metadata.cluster) {
        (Some(_), None) if single_node_topics => {
            return Err(format!(
                "{} holds the topics of a single node; a cluster node starts from an empty data dir (choose another with --data-dir)",
                config.data_dir.display()
            ));
        }
        (None, Some(_)) => {
            return Err(format!(
                "{} belongs to a cluster node; start it with its --peer-listen and --peers",
                config.data_dir.display()
            ));
        }
        _ => {}
    }
    if config.cluster.is_some() && metadata.cluster.is_none() {
        // Mark the data dir as a cluster node's from its first start.
        metadata.cluster = Some(Default::default());
        metadata
            .store(&config.data_dir)
            .map_err(|e| e.to_string())?;
    }
    if metadata.node_id != NodeId(config.node_id) {
        return Err(format!(
            "{} belongs to node {}; start with --node-id {} (or choose another --data-dir)",
            config.data_dir.display(),
            metadata.node_id,
            metadata.node_id
        ));
    }
    let Some(path) = &config.provision else {
        return Ok(metadata);
    };
    if config.cluster.is_some() {
        return Err(
            "--provision creates topics on a single node; in a cluster create them with `sluice topic create` against any node".into(),
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read provisioning file {}: {e}", path.display()))?;
    let topics = parse_provision(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut changed = false;
    for topic in topics {
        if metadata.topics.contains_key(&topic.name) {
            continue;
        }
        let topic_config =
            TopicConfig::from_entries(topic.configs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        metadata
            .add_topic(&topic.name, topic.partitions, topic_config)
            .map_err(|e| e.to_string())?;
        tracing::info!(topic = %topic.name, partitions = topic.partitions, "provisioned topic");
        changed = true;
    }
    if changed {
        metadata
            .store(&config.data_dir)
            .map_err(|e| e.to_string())?;
    }
    Ok(metadata)
}
