//! `sluice-broker`: one Sluice node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use sluice_broker::cluster::ClusterConfig;
use sluice_broker::runtime::{self, BrokerConfig};
use sluice_broker::types::NodeId;

#[derive(Parser, Debug)]
#[command(name = "sluice-broker", version, about = "A Sluice broker node")]
struct Args {
    /// Data directory (WAL segments, checkpoints, metadata).
    #[arg(long, default_value = "./data", env = "SLUICE_DATA_DIR")]
    data_dir: PathBuf,
    /// Client listen address.
    #[arg(long, default_value = "127.0.0.1:9440", env = "SLUICE_LISTEN")]
    listen: SocketAddr,
    /// Shards (one executor per core). Default: one per online CPU.
    #[arg(long)]
    shards: Option<usize>,
    /// Pin shards to these CPUs (comma-separated, one per shard).
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Node id.
    #[arg(long, default_value_t = 1)]
    node_id: u32,
    /// WAL segment size in MiB.
    #[arg(long, default_value_t = 1024)]
    segment_mib: u64,
    /// Tail cache per shard in MiB.
    #[arg(long, default_value_t = 64)]
    tail_cache_mib: usize,
    /// Create the topics in this file at start-up if missing (`name partitions [k=v ...]` per line).
    #[arg(long)]
    provision: Option<PathBuf>,
    /// Close connections idle for this many seconds.
    #[arg(long, default_value_t = 600)]
    idle_timeout_secs: u64,
    /// A request frame must arrive within this many seconds of its first byte (plus
    /// one second per MiB of its size); slower senders are disconnected.
    #[arg(long, default_value_t = sluice_broker::limits::FRAME_TIMEOUT_SECS_DEFAULT)]
    frame_timeout_secs: u64,
    /// Connections per shard, at most.
    #[arg(long, default_value_t = sluice_broker::limits::CONNECTIONS_PER_SHARD_MAX)]
    max_connections: usize,
    /// How often retention runs, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    retention_check_ms: u64,
    /// Host to advertise to clients (default: the listen IP).
    #[arg(long)]
    advertised_host: Option<String>,
    /// Port to advertise to clients (default: the listen port), e.g. behind a
    /// proxy or a NAT.
    #[arg(long)]
    advertised_port: Option<u16>,
    /// Cluster: where this node listens for other nodes (Raft traffic).
    #[arg(long, requires = "peers")]
    peer_listen: Option<SocketAddr>,
    /// Cluster: every node's peer address, this node's included:
    /// `1=host:port,2=host:port,3=host:port`. Without it the node runs alone.
    #[arg(long, requires = "peer_listen")]
    peers: Option<String>,
    /// Partitions of the internal `__sluice_offsets` topic (consumer groups), used
    /// when this node creates it on the first group request.
    #[arg(long, default_value_t = sluice_schema::groups::OFFSETS_PARTITIONS_DEFAULT)]
    offsets_partitions: u32,
    /// Smallest session timeout a consumer-group member may ask for, in ms.
    #[arg(long, default_value_t = 6000)]
    group_min_session_timeout_ms: u32,
    /// Largest session timeout a consumer-group member may ask for, in ms.
    #[arg(long, default_value_t = 300_000)]
    group_max_session_timeout_ms: u32,
    /// How often consumer-group members heartbeat, in ms (told to every member).
    #[arg(long, default_value_t = 1000)]
    group_heartbeat_interval_ms: u32,
    /// The admin server (REST API, /metrics, /health, web UI): an address, or
    /// `off`.
    #[arg(long, default_value = "127.0.0.1:9644", env = "SLUICE_ADMIN_LISTEN")]
    admin_listen: String,
    /// A file holding the bearer token the admin API's mutating endpoints require
    /// (without it they are open to whoever reaches the admin address).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Admin API requests per second per client IP (0: unlimited); bursts of twice
    /// as many pass.
    #[arg(long, default_value_t = 50)]
    admin_rate_limit: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = BrokerConfig::new(&args.data_dir, args.listen);
    if let Some(shards) = args.shards {
        config.shards = shards;
    } else if let Some(cpus) = &args.cpus {
        config.shards = cpus.len();
    }
    config.cpus = args.cpus.clone();
    config.node_id = args.node_id;
    config.segment_bytes = args.segment_mib << 20;
    config.tail_cache_bytes = args.tail_cache_mib << 20;
    config.provision = args.provision.clone();
    config.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));
    config.connections_max = args.max_connections.max(1);
    config.frame_timeout = Duration::from_secs(args.frame_timeout_secs.max(1));
    config.retention_check = Duration::from_millis(args.retention_check_ms.max(10));
    config.advertised_host = args.advertised_host.clone();
    config.advertised_port = args.advertised_port;
    config.groups = sluice_broker::groups::GroupSettings {
        offsets_partitions: args
            .offsets_partitions
            .clamp(1, sluice_broker::limits::PARTITIONS_PER_TOPIC_MAX),
        session_timeout_min_ms: args.group_min_session_timeout_ms.max(100),
        session_timeout_max_ms: args
            .group_max_session_timeout_ms
            .max(args.group_min_session_timeout_ms.max(100)),
        heartbeat_interval_ms: args.group_heartbeat_interval_ms.clamp(50, 60_000),
    };
    if let (Some(peer_listen), Some(peers)) = (args.peer_listen, &args.peers) {
        match ClusterConfig::new(NodeId(args.node_id), peer_listen, peers) {
            Ok(cluster) => config.cluster = Some(cluster),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    // A panic anywhere is a bug; a node with a dead shard must not limp on half
    // working. Log it and abort: recovery on restart handles the rest.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!(
            "sluice-broker: internal error (a bug); aborting so that a restart recovers cleanly"
        );
        std::process::abort();
    }));
    // Block SIGINT/SIGTERM in every thread (the shards inherit the mask) and take
    // them on one thread that starts the graceful shutdown.
    let signals = block_signals();
    let metrics = sluice_broker::metrics::NodeMetrics::new(config.shards);
    config.metrics = Some(metrics.clone());
    let admin = match start_admin(&args, &config, &metrics) {
        Ok(admin) => admin,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match runtime::start(config) {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let flag = broker.shutdown_flag();
    std::thread::spawn(move || {
        let signal = wait_signal(&signals);
        eprintln!("sluice-broker: signal {signal}, shutting down (finishing in-flight requests)");
        flag.store(true, Ordering::SeqCst);
    });
    let joined = broker.join();
    if let Some(admin) = admin {
        admin.stop();
    }
    match joined {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the admin server (before the shards, so that `/health/ready` answers
/// "not ready" while they recover).
fn start_admin(
    args: &Args,
    config: &BrokerConfig,
    metrics: &sluice_broker::metrics::NodeMetrics,
) -> Result<Option<sluice_admin::AdminHandle>, String> {
    if args.admin_listen.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let listen: std::net::SocketAddr = args.admin_listen.parse().map_err(|e| {
        format!(
            "--admin-listen {:?}: {e} (an address like 127.0.0.1:9644, or off)",
            args.admin_listen
        )
    })?;
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--admin-token-file {}: {e}", path.display()))?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(format!("--admin-token-file {} is empty", path.display()));
            }
            Some(token)
        }
    };
    let mut broker = config.listen;
    if broker.ip().is_unspecified() {
        broker.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let render = metrics.clone();
    let ready = metrics.clone();
    let totals = metrics.clone();
    sluice_admin::start(sluice_admin::AdminConfig {
        listen,
        broker: broker.to_string(),
        token,
        rate_per_second: args.admin_rate_limit,
        rate_burst: args.admin_rate_limit.saturating_mul(2),
        cluster: config.cluster.is_some(),
        render_metrics: std::sync::Arc::new(move |out| render.render(out)),
        shards_ready: std::sync::Arc::new(move || ready.shards_ready()),
        totals: std::sync::Arc::new(move || totals.totals()),
    })
    .map(Some)
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: sigwait reads the set and writes the signal number.
    unsafe {
        libc::sigwait(set, &mut signal);
    }
    signal
}
