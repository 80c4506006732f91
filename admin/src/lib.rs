//! The admin server of a Sluice node: the REST API of the seed documents
//! (`/api/kafka/topics` ...), consumer groups, the cluster, health checks,
//! Prometheus metrics and a small web UI, served on a thread of its own (a
//! current-thread tokio runtime), off the shard cores.
//!
//! It keeps no state of its own about topics or groups: every answer comes from
//! the node's client port through `sluice-client` (the same request paths as any
//! client), plus the node's metrics, which the broker hands over as closures.

mod api;
mod limit;
mod prometheus;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_client::{Client, ClientConfig};
use tokio::sync::Mutex;

/// Renders the node's own metrics (Prometheus text) into a string.
pub type RenderMetrics = Arc<dyn Fn(&mut String) + Send + Sync>;
/// Whether each shard of the node has recovered and serves.
pub type ShardsReady = Arc<dyn Fn() -> Vec<bool> + Send + Sync>;
/// Node-wide totals for the UI's rates (name, value).
pub type Totals = Arc<dyn Fn() -> Vec<(&'static str, f64)> + Send + Sync>;

/// Admin server settings.
#[derive(Clone)]
pub struct AdminConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// The node's client address (`host:port`).
    pub broker: String,
    /// When set, mutating endpoints need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Requests per second per client IP on `/api/` (0: unlimited).
    pub rate_per_second: u32,
    /// Burst allowance of the rate limit.
    pub rate_burst: u32,
    /// The node runs in a cluster.
    pub cluster: bool,
    /// The node's metrics.
    pub render_metrics: RenderMetrics,
    /// Shard readiness.
    pub shards_ready: ShardsReady,
    /// Totals for rates.
    pub totals: Totals,
}

/// A running admin server.
pub struct AdminHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it and waits for its thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// What handlers share.
pub(crate) struct State {
    pub config: AdminConfig,
    client: Mutex<Option<Client>>,
    pub limiter: limit::RateLimiter,
    pub started: Instant,
}

impl State {
    /// A connected client to the node (connected on first use; dropped and
    /// reconnected after a connection failure).
    pub async fn client(&self) -> Result<Client, sluice_client::Error> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let mut config = ClientConfig::new([self.config.broker.clone()]);
        config.client_id = "sluice-admin".into();
        config.request_timeout = Duration::from_secs(10);
        config.connect_timeout = Duration::from_secs(3);
        let client = Client::connect(config).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the client after a connection-level failure.
    pub async fn reset_client(&self) {
        self.client.lock().await.take();
    }
}

/// Binds `config.listen` and serves on a new thread.
pub fn start(config: AdminConfig) -> Result<AdminHandle, String> {
    let listener = std::net::TcpListener::bind(config.listen).map_err(|e| {
        format!(
            "the admin server cannot listen on {}: {e} (choose another with --admin-listen, or --admin-listen off)",
            config.listen
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("admin listener: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("admin listener: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state = Arc::new(State {
        limiter: limit::RateLimiter::new(config.rate_per_second, config.rate_burst),
        config,
        client: Mutex::new(None),
        started: Instant::now(),
    });
    let thread = std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "admin server: cannot build its runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, "admin server: cannot use its listener");
                        return;
                    }
                };
                let app = api::router(state);
                let served = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
                if let Err(error) = served {
                    tracing::error!(%error, "admin server stopped");
                }
            });
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    tracing::info!(%addr, "admin server listening (REST API, /metrics, /health, UI at /)");
    Ok(AdminHandle {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
