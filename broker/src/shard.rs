//! One shard: its WAL, its view of the node metadata, its mesh end, and how it
//! executes work for itself or for other shards.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_schema::wire::ErrorCode;

use crate::limits::{FETCH_WAITS_PER_SHARD_MAX, SHARD_REQUEST_BYTES_MAX};
use crate::mesh::Mesh;
use crate::metadata::{validate_topic_name, NodeMetadata, Topic, TopicConfig};
use crate::shard_cluster::ShardCluster;
use crate::shard_messages::{ApiError, LogDescription, NewTopic, ShardReply, ShardRequest};
use crate::storage::{Retention, Wal};
use crate::sync::Budget;
use crate::types::{LogId, NodeId, ShardId};

/// Settings every shard shares.
#[derive(Clone, Debug)]
pub struct ShardSettings {
    /// The node.
    pub node_id: NodeId,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Host clients should connect to (Metadata answers).
    pub advertised_host: String,
    /// Port clients should connect to.
    pub advertised_port: u16,
    /// How often retention runs.
    pub retention_check: Duration,
    /// Connections idle this long are closed.
    pub idle_timeout: Duration,
    /// Connections per shard, at most.
    pub connections_max: usize,
    /// A frame must arrive within this long of its first byte (plus time for its
    /// length at `FRAME_BYTES_PER_SECOND_MIN`).
    pub frame_timeout: Duration,
    /// Consumer-group settings.
    pub groups: crate::groups::GroupSettings,
    /// Every shard's metrics (each shard writes its own).
    pub metrics: crate::metrics::NodeMetrics,
}

/// The shard context, shared by the shard's tasks.
pub struct Shard {
    /// This shard.
    pub id: ShardId,
    /// Its WAL.
    pub wal: Rc<Wal>,
    /// The node metadata, shared by all shards (replaced whole on change).
    pub metadata: Arc<ArcSwap<NodeMetadata>>,
    /// Cross-shard lanes.
    pub mesh: Rc<Mesh>,
    /// Shared settings.
    pub settings: Arc<ShardSettings>,
    /// Set when the node is shutting down.
    pub shutdown: Arc<AtomicBool>,
    /// Serializes admin operations (shard 0 only).
    admin_lock: Rc<glommio::sync::Semaphore>,
    /// Bytes of received requests all this shard's connections may hold.
    pub request_budget: Rc<Budget>,
    /// Slots for long-polling fetches (`FETCH_WAITS_PER_SHARD_MAX`).
    pub fetch_waits: Rc<glommio::sync::Semaphore>,
    /// In a cluster: replicas, peer links, the controller (see `shard_cluster`).
    pub cluster: Option<Rc<ShardCluster>>,
    /// The consumer groups this shard coordinates.
    pub groups: crate::groups::Coordinator,
    /// Idempotent producers' recent batches, per log.
    pub producers: crate::idempotence::Producers,
    /// Told once when shutdown starts (see `watch_shutdown`).
    stopping: crate::sync::Notify,
}

/// How often each shard looks at the shutdown flag. The flag is set from outside
/// the shards (a signal, or the embedding program), so one task per shard polls
/// it and wakes everything else that waits for shutdown: loops that would
/// otherwise poll it themselves (every accept loop, every 50 ms) sleep instead.
const SHUTDOWN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The metadata controller lives on shard 0.
pub const CONTROLLER_SHARD: usize = 0;

impl Shard {
    /// Builds the context.
    pub fn new(
        id: ShardId,
        wal: Rc<Wal>,
        metadata: Arc<ArcSwap<NodeMetadata>>,
        mesh: Rc<Mesh>,
        settings: Arc<ShardSettings>,
        shutdown: Arc<AtomicBool>,
        cluster: Option<ShardCluster>,
    ) -> Rc<Shard> {
        Rc::new(Shard {
            id,
            wal,
            metadata,
            mesh,
            settings,
            shutdown,
            admin_lock: Rc::new(glommio::sync::Semaphore::new(1)),
            request_budget: Budget::new(SHARD_REQUEST_BYTES_MAX),
            fetch_waits: Rc::new(glommio::sync::Semaphore::new(
                FETCH_WAITS_PER_SHARD_MAX as u64,
            )),
            cluster: cluster.map(Rc::new),
            groups: crate::groups::Coordinator::default(),
            producers: crate::idempotence::Producers::new(),
            stopping: crate::sync::Notify::default(),
        })
    }

    /// Completes once shutdown has started.
    pub async fn until_stopping(&self) {
        while !self.shutting_down() {
            self.stopping.wait().await;
        }
    }

    /// Polls the shutdown flag every `SHUTDOWN_POLL` and wakes every
    /// `until_stopping` once it is set.
    pub async fn watch_shutdown(self: Rc<Self>) {
        while !self.shutting_down() {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
        }
        self.stopping.notify_all();
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &crate::metrics::ShardMetrics {
        &self.settings.metrics.shards[usize::from(self.id.0)]
    }

    /// True once shutdown started.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Runs `request` on shard `target`: here if local, else over the mesh.
    pub async fn route(self: &Rc<Self>, target: ShardId, request: ShardRequest) -> ShardReply {
        if target == self.id {
            // Boxed: admin requests route again from inside `execute`.
            Box::pin(self.execute(request)).await
        } else {
            use std::sync::atomic::Ordering::Relaxed;
            let metrics = self.metrics();
            metrics.mesh_requests.fetch_add(1, Relaxed);
            metrics.mesh_in_flight.fetch_add(1, Relaxed);
            let reply = self.mesh.call(usize::from(target.0), request).await;
            self.metrics().mesh_in_flight.fetch_sub(1, Relaxed);
            reply
        }
    }

    /// Executes a request on this shard.
    pub async fn execute(self: &Rc<Self>, request: ShardRequest) -> ShardReply {
        match request {
            ShardRequest::Produce { log, batches, acks } => {
                ShardReply::Produced(self.produce(log, &batches, acks).await)
            }
            ShardRequest::ReadMany { reads, budget } => {
                ShardReply::ReadMany(self.read_many(&reads, budget).await)
            }
            ShardRequest::WaitForData {
                log,
                seen_high_watermark,
                wait_ms,
            } => {
                let wait = Duration::from_millis(u64::from(wait_ms));
                self.wait_for_data(log, seen_high_watermark, wait).await;
                ShardReply::Waited
            }
            ShardRequest::ListOffset { log, query } => {
                ShardReply::Offset(self.list_offset(log, query))
            }
            ShardRequest::Describe(logs) => ShardReply::Described(
                logs.iter()
                    .map(|log| {
                        self.partition_state(*log).map(|state| LogDescription {
                            log_start: state.log_start,
                            high_watermark: state.high_watermark,
                            size_bytes: state.size_bytes,
                            corrupt_from: self.wal.corrupt_from(*log),
                        })
                    })
                    .collect(),
            ),
            ShardRequest::CreateLogs(logs) => {
                for (log, segment_bytes) in logs {
                    self.wal.create_log(log);
                    self.wal.set_segment_limit(log, segment_bytes);
                }
                ShardReply::Done
            }
            ShardRequest::DeleteLogs(logs) => {
                for log in logs {
                    self.producers.forget(log);
                    self.groups.forget(log);
                    self.wal.delete_log(log);
                }
                ShardReply::Done
            }
            ShardRequest::CreateTopics {
                topics,
                validate_only,
            } if self.cluster.is_some() => {
                ShardReply::Admin(self.cluster_create_topics(topics, validate_only).await)
            }
            ShardRequest::CreateTopics {
                topics,
                validate_only,
            } => ShardReply::Admin(self.create_topics(topics, validate_only).await),
            ShardRequest::DeleteTopics(names) if self.cluster.is_some() => {
                ShardReply::Admin(self.cluster_delete_topics(names).await)
            }
            ShardRequest::DeleteTopics(names) => ShardReply::Admin(self.delete_topics(names).await),
            ShardRequest::Raft(batch) => {
                self.step_forwarded(batch);
                ShardReply::Done
            }
            ShardRequest::CreateReplicas(specs) => {
                self.create_replicas(specs).await;
                ShardReply::Done
            }
            ShardRequest::DropReplicas(groups) => {
                self.drop_replicas(groups);
                ShardReply::Done
            }
            ShardRequest::Group { log, op } => ShardReply::Group(self.group_op(log, op).await),
        }
    }

    /// Copies the WAL's shard-local figures into this shard's metrics every
    /// `metrics::PUBLISH_INTERVAL`, until shutdown.
    pub async fn publish_metrics_loop(self: Rc<Self>) {
        use std::sync::atomic::Ordering::Relaxed;
        while !self.shutting_down() {
            let stats = self.wal.stats();
            let m = self.metrics();
            m.wal_appends.store(stats.appends, Relaxed);
            m.wal_append_bytes.store(stats.append_bytes, Relaxed);
            m.wal_writes.store(stats.writes, Relaxed);
            m.wal_syncs.store(stats.syncs, Relaxed);
            m.wal_rolls.store(stats.rolls, Relaxed);
            m.cache_hits.store(stats.cache_hits, Relaxed);
            m.cache_misses.store(stats.cache_misses, Relaxed);
            m.cache_bytes.store(stats.cache_bytes, Relaxed);
            let segments = self.wal.segment_ids();
            m.wal_segments.store(segments.len() as u64, Relaxed);
            m.wal_segment_bytes.store(
                segments.len() as u64 * self.wal.config().segment_bytes,
                Relaxed,
            );
            glommio::timer::sleep(crate::metrics::PUBLISH_INTERVAL).await;
        }
    }

    /// The current metadata snapshot.
    pub fn topics(&self) -> Arc<NodeMetadata> {
        self.metadata.load_full()
    }

    async fn create_topics(
        self: &Rc<Self>,
        topics: Vec<NewTopic>,
        validate_only: bool,
    ) -> Vec<(String, Option<ApiError>)> {
        let _permit = self.admin_lock.acquire_permit(1).await;
        let mut metadata = (*self.topics()).clone();
        let mut results = Vec::new();
        let mut created: Vec<Topic> = Vec::new();
        for topic in topics {
            let error = match check_new_topic(&metadata, &topic) {
                Err(error) => Some(error),
                Ok(config) => match metadata.add_topic(&topic.name, topic.partitions, config) {
                    Ok(added) => {
                        created.push(added.clone());
                        None
                    }
                    Err(error) => Some(ApiError::new(ErrorCode::InvalidRequest, error.to_string())),
                },
            };
            results.push((topic.name, error));
        }
        if validate_only || created.is_empty() {
            return results;
        }
        // Durable first: once a client hears "created", a restart keeps the topic.
        if let Err(error) = self.store_metadata(metadata.clone()).await {
            for (name, result) in results.iter_mut() {
                if result.is_none() {
                    *result = Some(ApiError::new(
                        ErrorCode::StorageError,
                        format!("cannot store metadata for '{name}': {error}"),
                    ));
                }
            }
            return results;
        }
        let mut by_shard: HashMap<ShardId, Vec<(LogId, u64)>> = HashMap::new();
        for topic in &created {
            for placement in &topic.partitions {
                by_shard
                    .entry(placement.shard)
                    .or_default()
                    .push((placement.log_id, topic.config.segment_bytes));
            }
        }
        for (shard, logs) in by_shard {
            self.route(shard, ShardRequest::CreateLogs(logs)).await;
        }
        self.metadata.store(Arc::new(metadata));
        results
    }

    async fn delete_topics(self: &Rc<Self>, names: Vec<String>) -> Vec<(String, Option<ApiError>)> {
        let _permit = self.admin_lock.acquire_permit(1).await;
        let mut metadata = (*self.topics()).clone();
        let mut results = Vec::new();
        let mut removed = Vec::new();
        for name in names {
            match metadata.remove_topic(&name) {
                Ok(topic) => {
                    removed.push(topic);
                    results.push((name, None));
                }
                Err(_) => results.push((
                    name.clone(),
                    Some(ApiError::new(
                        ErrorCode::UnknownTopic,
                        format!("unknown topic '{name}'"),
                    )),
                )),
            }
        }
        if removed.is_empty() {
            return results;
        }
        if let Err(error) = self.store_metadata(metadata.clone()).await {
            return results
                .into_iter()
                .map(|(name, result)| {
                    let error = result.or_else(|| {
                        Some(ApiError::new(
                            ErrorCode::StorageError,
                            format!("cannot store metadata: {error}"),
                        ))
                    });
                    (name, error)
                })
                .collect();
        }
        // Stop routing to the topic, then drop its logs (their batches become dead
        // and retention reclaims their segments).
        self.metadata.store(Arc::new(metadata));
        let mut by_shard: HashMap<ShardId, Vec<LogId>> = HashMap::new();
        for topic in &removed {
            for placement in &topic.partitions {
                by_shard
                    .entry(placement.shard)
                    .or_default()
                    .push(placement.log_id);
            }
        }
        for (shard, logs) in by_shard {
            self.route(shard, ShardRequest::DeleteLogs(logs)).await;
        }
        results
    }

    async fn store_metadata(&self, metadata: NodeMetadata) -> Result<(), String> {
        let data_dir = self.settings.data_dir.clone();
        glommio::executor()
            .spawn_blocking(move || metadata.store(&data_dir).map_err(|e| e.to_string()))
            .await
    }

    /// Applies retention to this shard's logs and deletes dead segments, forever
    /// (until shutdown), every `retention_check`.
    pub async fn retention_loop(self: Rc<Self>) {
        while !self.shutting_down() {
            glommio::timer::sleep(self.settings.retention_check).await;
            let metadata = self.topics();
            let mut policies = HashMap::new();
            for topic in metadata.topics.values() {
                for placement in topic.partitions.iter().filter(|p| p.shard == self.id) {
                    policies.insert(
                        placement.log_id,
                        Retention {
                            retention_ms: topic.config.retention_ms,
                            retention_bytes: topic.config.retention_bytes,
                        },
                    );
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let moved = self.wal.apply_retention(&policies, now);
            self.metrics()
                .retention_log_starts_moved
                .fetch_add(moved as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(cluster) = &self.cluster {
                cluster.host.compact_all();
            }
            match self.wal.delete_dead_segments().await {
                Ok(deleted) => {
                    self.metrics()
                        .retention_segments_deleted
                        .fetch_add(deleted.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(shard = %self.id, %error, "retention could not delete segments")
                }
            }
        }
    }
}

/// Validates a topic to create against the current metadata.
fn check_new_topic(metadata: &NodeMetadata, topic: &NewTopic) -> Result<TopicConfig, ApiError> {
    validate_topic_name(&topic.name).map_err(|m| ApiError::new(ErrorCode::InvalidTopicName, m))?;
    if metadata.topics.contains_key(&topic.name) {
        return Err(ApiError::new(
            ErrorCode::TopicAlreadyExists,
            format!("topic '{}' already exists", topic.name),
        ));
    }
    if topic.partitions == 0 || topic.partitions > crate::limits::PARTITIONS_PER_TOPIC_MAX {
        return Err(ApiError::new(
            ErrorCode::InvalidPartitionCount,
            format!(
                "partition count {} outside [1, {}]",
                topic.partitions,
                crate::limits::PARTITIONS_PER_TOPIC_MAX
            ),
        ));
    }
    TopicConfig::from_entries(topic.configs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|m| ApiError::new(ErrorCode::InvalidConfig, m))
}
