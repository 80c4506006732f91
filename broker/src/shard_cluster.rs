//! A shard in a cluster: its replicas, its peer links, and — on shard 0 — the
//! controller (topic changes proposed to the controller group, applied to the
//! node's metadata in log order).
//!
//! On a single node (no `--peers`) none of this exists and partitions are plain
//! logs; everything here is reached through `Shard::cluster`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::Message;
use sluice_schema::wire::ErrorCode;

use crate::cluster::controller::{self, Applied, Command, RequestId, CONTROLLER_LOG};
use crate::cluster::ClusterView;
use crate::metadata::NodeMetadata;
use crate::partition::GroupId;
use crate::replication::host::{NewReplica, ReplicaHost};
use crate::replication::transport::{Inbound, PeerTransport};
use crate::shard::{Shard, CONTROLLER_SHARD};
use crate::shard_messages::{ApiError, NewTopic, ReplicaSpec, ShardRequest};
use crate::sync::{Completion, Notify};
use crate::types::{LogId, NodeId, ShardId};

/// How long a topic change waits for the controller to commit and apply it.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(15);
/// A dropped proposal (no controller leader yet) is tried again this often.
const CONTROLLER_RETRY: Duration = Duration::from_millis(200);
/// Leaders tell the other nodes about their groups this often.
const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);

/// Topic id -> the shard of each partition's local replica (None: not here).
type GroupShards = HashMap<u32, Vec<Option<ShardId>>>;

/// What a proposer waits for.
type Outcome = Rc<Completion<Result<(), ApiError>>>;

/// The controller's moving parts (shard 0 only).
#[derive(Default)]
pub struct ControllerState {
    /// Committed entries waiting to be applied, in order.
    queue: RefCell<VecDeque<(u64, Bytes)>>,
    wake: Notify,
    waiting: RefCell<HashMap<RequestId, Outcome>>,
    /// Results of recent proposals (a retried proposal learns its first result).
    recent: RefCell<VecDeque<(RequestId, Result<(), ApiError>)>>,
    serial: Cell<u64>,
}

/// A shard's cluster machinery.
pub struct ShardCluster {
    /// The node's view of the cluster.
    pub view: Arc<ClusterView>,
    /// This shard's replicas.
    pub host: Rc<ReplicaHost>,
    /// This shard's peer links.
    pub transport: Rc<PeerTransport>,
    /// The controller (shard 0).
    pub controller: Option<ControllerState>,
    /// topic id -> shard of each partition's local replica, for the metadata
    /// snapshot (by address) it was built from.
    routes: RefCell<(usize, GroupShards)>,
}

impl ShardCluster {
    /// The cluster part of a shard.
    pub fn new(
        view: Arc<ClusterView>,
        host: Rc<ReplicaHost>,
        transport: Rc<PeerTransport>,
        shard: ShardId,
    ) -> ShardCluster {
        let controller = (usize::from(shard.0) == CONTROLLER_SHARD).then(|| ControllerState {
            serial: Cell::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
            ),
            ..ControllerState::default()
        });
        ShardCluster {
            view,
            host,
            transport,
            controller,
            routes: RefCell::new((0, HashMap::new())),
        }
    }
}

/// Delivers what peers send to the shard that owns each group.
pub struct ShardInbound(pub Rc<Shard>);

impl Inbound for ShardInbound {
    fn raft(&self, messages: Vec<(GroupId, Message)>) {
        self.0.deliver_raft(messages);
    }
}

impl Shard {
    pub(crate) fn cluster(&self) -> &ShardCluster {
        self.cluster
            .as_deref()
            .expect("cluster paths run only in a cluster")
    }

    /// The shard holding the local replica of `group`, if this node has one.
    pub fn shard_of_group(&self, group: GroupId) -> Option<ShardId> {
        if group == GroupId::CONTROLLER {
            return Some(ShardId(CONTROLLER_SHARD as u16));
        }
        let cluster = self.cluster.as_deref()?;
        let metadata = self.topics();
        let key = Arc::as_ptr(&metadata) as usize;
        let mut routes = cluster.routes.borrow_mut();
        if routes.0 != key {
            let map = metadata
                .topics
                .values()
                .filter(|t| t.id != 0)
                .map(|t| {
                    let shards = t
                        .partitions
                        .iter()
                        .map(|p| p.local.then_some(p.shard))
                        .collect();
                    (t.id, shards)
                })
                .collect();
            *routes = (key, map);
        }
        let (topic, partition) = group.parts();
        routes
            .1
            .get(&topic)?
            .get(partition as usize)
            .copied()
            .flatten()
    }

    /// Messages from a peer: stepped here or sent to the owning shard.
    pub fn deliver_raft(self: &Rc<Self>, messages: Vec<(GroupId, Message)>) {
        let mut elsewhere: HashMap<ShardId, Vec<(u64, Bytes)>> = HashMap::new();
        for (group, message) in messages {
            match self.shard_of_group(group) {
                Some(target) if target == self.id => self.cluster().host.deliver(group, message),
                Some(target) => {
                    use protobuf::Message as _;
                    if let Ok(bytes) = message.write_to_bytes() {
                        elsewhere
                            .entry(target)
                            .or_default()
                            .push((group.0, bytes.into()));
                    }
                }
                // Not (yet) applied here: the leader sends again.
                None => {}
            }
        }
        for (target, batch) in elsewhere {
            let shard = self.clone();
            glommio::spawn_local(async move {
                shard.route(target, ShardRequest::Raft(batch)).await;
            })
            .detach();
        }
    }

    /// Steps forwarded messages (from the shard that read them).
    pub fn step_forwarded(&self, batch: Vec<(u64, Bytes)>) {
        let Some(cluster) = self.cluster.as_deref() else {
            return;
        };
        for (group, bytes) in batch {
            if let Ok(message) = <Message as protobuf::Message>::parse_from_carllerche_bytes(&bytes)
            {
                cluster.host.deliver(GroupId(group), message);
            }
        }
    }

    /// Creates local replicas of new partitions (on their shards' request).
    pub async fn create_replicas(&self, specs: Vec<ReplicaSpec>) {
        let Some(cluster) = self.cluster.as_deref() else {
            return;
        };
        for spec in specs {
            self.wal.set_segment_limit(spec.log, spec.segment_bytes);
            let new = NewReplica {
                group: GroupId(spec.group),
                log: spec.log,
                voters: spec.voters,
                campaign: spec.campaign,
                applied: None,
                wants_applied: false,
            };
            if let Err(error) = cluster.host.add(new).await {
                tracing::error!(shard = %self.id, group = %GroupId(spec.group), %error, "cannot start a replica");
            }
        }
    }

    /// Drops local replicas of deleted partitions.
    pub fn drop_replicas(&self, groups: Vec<(u64, LogId)>) {
        let Some(cluster) = self.cluster.as_deref() else {
            return;
        };
        for (group, log) in groups {
            cluster.host.remove(GroupId(group));
            self.wal.delete_log(log);
        }
    }

    /// Starts this shard's replicas from the node metadata (at start-up).
    pub async fn start_replicas(&self) {
        let Some(cluster) = self.cluster.as_deref() else {
            return;
        };
        let metadata = self.topics();
        let mut specs = Vec::new();
        for topic in metadata.topics.values() {
            for (index, placement) in topic.partitions.iter().enumerate() {
                if !placement.local || placement.shard != self.id {
                    continue;
                }
                let Some(group) = topic.group(index as u32) else {
                    continue;
                };
                specs.push(ReplicaSpec {
                    group: group.0,
                    log: placement.log_id,
                    segment_bytes: topic.config.segment_bytes,
                    voters: topic.replicas_of(index, self.settings.node_id),
                    campaign: false,
                });
            }
        }
        self.create_replicas(specs).await;
        if cluster.controller.is_some() {
            let applied = metadata.cluster.as_ref().map_or(0, |c| c.applied_index);
            let new = NewReplica {
                group: GroupId::CONTROLLER,
                log: CONTROLLER_LOG,
                voters: cluster.view.config.node_ids(),
                campaign: false,
                applied: Some(applied),
                wants_applied: true,
            };
            if let Err(error) = cluster.host.add(new).await {
                tracing::error!(%error, "cannot start the controller replica");
            }
        }
    }

    /// Leaders tell other nodes about their groups, until shutdown.
    pub async fn gossip_loop(self: Rc<Self>) {
        let Some(cluster) = self.cluster.as_deref() else {
            return;
        };
        while !self.shutting_down() {
            glommio::timer::sleep(GOSSIP_INTERVAL).await;
            let mine: Vec<_> = cluster
                .host
                .groups()
                .into_iter()
                .filter_map(|group| {
                    cluster
                        .host
                        .with(group, |r| r.is_leader())
                        .filter(|leader| *leader)
                        .and_then(|_| cluster.view.info(group))
                        .map(|info| (group, info))
                })
                .collect();
            if !mine.is_empty() {
                cluster.transport.gossip(&mine);
            }
        }
    }

    // ------------------------------------------------------------ controller

    /// Hands committed controller entries to the apply loop (the replica host's sink).
    pub fn controller_sink(self: &Rc<Self>) -> crate::replication::host::ApplySink {
        let shard = Rc::downgrade(self);
        Box::new(move |group, entries| {
            let Some(shard) = shard.upgrade() else {
                return;
            };
            if group != GroupId::CONTROLLER {
                return;
            }
            if let Some(controller) = shard.cluster().controller.as_ref() {
                controller.queue.borrow_mut().extend(entries);
                controller.wake.notify_all();
            }
        })
    }

    /// Applies committed controller entries in order, forever (shard 0).
    pub async fn controller_loop(self: Rc<Self>) {
        let Some(controller) = self.cluster().controller.as_ref() else {
            return;
        };
        while !self.shutting_down() {
            let next = controller.queue.borrow_mut().pop_front();
            let Some((index, data)) = next else {
                let _ = glommio::timer::timeout(Duration::from_millis(100), async {
                    controller.wake.wait().await;
                    Ok(())
                })
                .await;
                continue;
            };
            self.apply_controller_entry(index, &data).await;
        }
    }

    async fn apply_controller_entry(self: &Rc<Self>, index: u64, data: &[u8]) {
        let metadata = self.topics();
        if metadata
            .cluster
            .as_ref()
            .is_some_and(|c| c.applied_index >= index)
        {
            return;
        }
        let command = match Command::decode(data) {
            Ok(command) => command,
            Err(error) => {
                tracing::error!(index, %error, "skipping an unreadable controller entry");
                return;
            }
        };
        let mut next = (*metadata).clone();
        let nodes = self.cluster().view.config.node_ids();
        let applied = controller::apply(&mut next, index, &command, &nodes, self.settings.node_id);
        if let Err(error) = self.store_metadata_now(next.clone()).await {
            // The entry stays committed; a restart re-applies it from the log.
            tracing::error!(index, %error, "cannot store the metadata; the node stops applying controller entries until restart");
            return;
        }
        self.metadata.store(Arc::new(next));
        let result = match applied {
            Applied::Created(topic) => {
                tracing::info!(topic = %topic.name, id = topic.id, partitions = topic.partitions.len(), "topic created");
                self.start_topic_replicas(&topic).await;
                Ok(())
            }
            Applied::Deleted(topic) => {
                tracing::info!(topic = %topic.name, "topic deleted");
                self.stop_topic_replicas(&topic).await;
                Ok(())
            }
            Applied::Refused(code, message) => Err(ApiError::new(code, message)),
        };
        let controller = self.cluster().controller.as_ref().expect("shard 0");
        let request = command.request();
        let mut recent = controller.recent.borrow_mut();
        recent.push_back((request, result.clone()));
        if recent.len() > 1024 {
            recent.pop_front();
        }
        drop(recent);
        if let Some(waiter) = controller.waiting.borrow_mut().remove(&request) {
            waiter.complete(result);
        }
    }

    async fn start_topic_replicas(self: &Rc<Self>, topic: &crate::metadata::Topic) {
        let mut by_shard: HashMap<ShardId, Vec<ReplicaSpec>> = HashMap::new();
        for (index, placement) in topic.partitions.iter().enumerate() {
            if !placement.local {
                continue;
            }
            let Some(group) = topic.group(index as u32) else {
                continue;
            };
            let voters = topic.replicas_of(index, self.settings.node_id);
            by_shard
                .entry(placement.shard)
                .or_default()
                .push(ReplicaSpec {
                    group: group.0,
                    log: placement.log_id,
                    segment_bytes: topic.config.segment_bytes,
                    campaign: voters.first() == Some(&self.settings.node_id),
                    voters,
                });
        }
        for (target, specs) in by_shard {
            self.route(target, ShardRequest::CreateReplicas(specs))
                .await;
        }
    }

    async fn stop_topic_replicas(self: &Rc<Self>, topic: &crate::metadata::Topic) {
        let mut by_shard: HashMap<ShardId, Vec<(u64, LogId)>> = HashMap::new();
        for (index, placement) in topic.partitions.iter().enumerate() {
            if let (true, Some(group)) = (placement.local, topic.group(index as u32)) {
                by_shard
                    .entry(placement.shard)
                    .or_default()
                    .push((group.0, placement.log_id));
            }
        }
        for (target, groups) in by_shard {
            self.route(target, ShardRequest::DropReplicas(groups)).await;
        }
    }

    async fn store_metadata_now(&self, metadata: NodeMetadata) -> Result<(), String> {
        let data_dir = self.settings.data_dir.clone();
        glommio::executor()
            .spawn_blocking(move || metadata.store(&data_dir).map_err(|e| e.to_string()))
            .await
    }

    /// Proposes a command and waits for it to be applied here (shard 0).
    async fn propose_command(
        self: &Rc<Self>,
        make: impl Fn(RequestId) -> Command,
    ) -> Result<(), ApiError> {
        let cluster = self.cluster();
        let controller = cluster.controller.as_ref().expect("shard 0");
        let serial = controller.serial.get() + 1;
        controller.serial.set(serial);
        let request = RequestId {
            node: self.settings.node_id.0,
            serial,
        };
        let command = make(request);
        let data = Bytes::from(command.encode());
        let waiter: Outcome = Completion::new();
        controller
            .waiting
            .borrow_mut()
            .insert(request, waiter.clone());
        let deadline = Instant::now() + CONTROLLER_TIMEOUT;
        let mut proposed = false;
        let result = loop {
            if let Some(result) = controller
                .recent
                .borrow()
                .iter()
                .find(|(id, _)| *id == request)
                .map(|(_, r)| r.clone())
            {
                break result;
            }
            if !proposed {
                proposed = cluster
                    .host
                    .propose_data(GroupId::CONTROLLER, data.clone())
                    .is_ok();
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(ApiError::new(
                    ErrorCode::RequestTimedOut,
                    "the cluster's controller did not commit the change in time (is a majority of nodes up?); retry",
                ));
            }
            let wait = (deadline - now).min(if proposed {
                Duration::from_secs(2)
            } else {
                CONTROLLER_RETRY
            });
            let done = glommio::timer::timeout(wait, async { Ok(waiter.wait().await) }).await;
            match done {
                Ok(result) => break result,
                // A proposal lost to a leader change is proposed again (same id:
                // applied at most once).
                Err(_) => proposed = false,
            }
        };
        controller.waiting.borrow_mut().remove(&request);
        result
    }

    /// CreateTopics in a cluster (shard 0): each topic is a controller command.
    pub async fn cluster_create_topics(
        self: &Rc<Self>,
        topics: Vec<NewTopic>,
        validate_only: bool,
    ) -> Vec<(String, Option<ApiError>)> {
        let nodes = self.cluster().view.config.peers.len();
        let mut results = Vec::new();
        for topic in topics {
            let factor = match topic.replication_factor {
                0 => nodes.min(3) as u16,
                n => n,
            };
            let checked =
                controller::precheck(&topic.name, topic.partitions, factor, &topic.configs, nodes)
                    .map_err(|(code, message)| ApiError::new(code, message));
            let outcome = match checked {
                Err(error) => Err(error),
                Ok(_) if self.topics().topics.contains_key(&topic.name) => Err(ApiError::new(
                    ErrorCode::TopicAlreadyExists,
                    format!("topic '{}' already exists", topic.name),
                )),
                Ok(_) if validate_only => Ok(()),
                Ok(_) => {
                    let (name, partitions, configs) =
                        (topic.name.clone(), topic.partitions, topic.configs.clone());
                    self.propose_command(move |request| Command::CreateTopic {
                        request,
                        name: name.clone(),
                        partitions,
                        replication_factor: factor,
                        configs: configs.clone(),
                    })
                    .await
                }
            };
            results.push((topic.name, outcome.err()));
        }
        results
    }

    /// DeleteTopics in a cluster (shard 0).
    pub async fn cluster_delete_topics(
        self: &Rc<Self>,
        names: Vec<String>,
    ) -> Vec<(String, Option<ApiError>)> {
        let mut results = Vec::new();
        for name in names {
            let outcome = if self.topics().topics.contains_key(&name) {
                let topic = name.clone();
                self.propose_command(move |request| Command::DeleteTopic {
                    request,
                    name: topic.clone(),
                })
                .await
            } else {
                Err(ApiError::new(
                    ErrorCode::UnknownTopic,
                    format!("unknown topic '{name}'"),
                ))
            };
            results.push((name, outcome.err()));
        }
        results
    }
}

impl Shard {
    /// The controller's leader, in a cluster.
    pub fn controller_leader(&self) -> Option<NodeId> {
        self.cluster
            .as_deref()
            .and_then(|c| c.view.leader_of(GroupId::CONTROLLER))
    }
}
