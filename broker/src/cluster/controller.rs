//! The controller's state machine: cluster metadata as a replicated log.
//!
//! Every node runs a replica of the controller group (Raft group 0, on shard 0,
//! its log in shard 0's WAL), like KRaft's metadata log. A topic operation is a
//! [`Command`] proposed on any node (a follower forwards it to the leader); once
//! committed, every node applies it in log order with [`apply`], which is
//! deterministic: topic ids, log ids and each partition's replicas come out the
//! same everywhere. Only where a local replica lives (its shard) is the node's own
//! choice. The result lands in `node.json` (the local cache of the metadata) with
//! the index it reflects, so a restart re-applies only what came after.

use serde::{Deserialize, Serialize};
use sluice_schema::wire::ErrorCode;

use crate::metadata::{validate_topic_name, NodeMetadata, PartitionPlacement, Topic, TopicConfig};
use crate::types::{LogId, NodeId, ShardId};

/// The controller group's log in shard 0's WAL (partition logs count up from 1).
pub const CONTROLLER_LOG: LogId = LogId(u32::MAX);
/// Largest replication factor.
pub const REPLICATION_FACTOR_MAX: u16 = 5;

/// Identifies a proposal so its proposer can find its result (and a retried
/// proposal is applied once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The proposing node.
    pub node: u32,
    /// Its counter (starts from the time it started, so restarts do not repeat).
    pub serial: u64,
}

/// A change to the cluster metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a topic.
    CreateTopic {
        /// The proposal.
        request: RequestId,
        /// Name.
        name: String,
        /// Partitions.
        partitions: u32,
        /// Replicas per partition.
        replication_factor: u16,
        /// key=value settings.
        configs: Vec<(String, String)>,
    },
    /// Delete a topic.
    DeleteTopic {
        /// The proposal.
        request: RequestId,
        /// Name.
        name: String,
    },
}

impl Command {
    /// The proposal id.
    pub fn request(&self) -> RequestId {
        match self {
            Command::CreateTopic { request, .. } | Command::DeleteTopic { request, .. } => *request,
        }
    }

    /// The bytes of its log entry.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a log entry.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable controller command: {e}"))
    }
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A topic was created.
    Created(Topic),
    /// A topic was deleted.
    Deleted(Topic),
    /// The command was refused (the proposer reports this).
    Refused(ErrorCode, String),
}

/// The cluster part of a node's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The controller log index the metadata reflects.
    pub applied_index: u64,
    /// The next topic id to hand out (ids start at 1).
    pub next_topic_id: u32,
}

/// Checks what can be checked before proposing (the same checks run at apply).
pub fn precheck(
    name: &str,
    partitions: u32,
    replication_factor: u16,
    configs: &[(String, String)],
    nodes: usize,
) -> Result<TopicConfig, (ErrorCode, String)> {
    validate_topic_name(name).map_err(|m| (ErrorCode::InvalidTopicName, m))?;
    if partitions == 0 || partitions > crate::limits::PARTITIONS_PER_TOPIC_MAX {
        return Err((
            ErrorCode::InvalidPartitionCount,
            format!(
                "partition count {partitions} outside [1, {}]",
                crate::limits::PARTITIONS_PER_TOPIC_MAX
            ),
        ));
    }
    let most = (nodes as u16).min(REPLICATION_FACTOR_MAX);
    if replication_factor == 0 || replication_factor > most {
        return Err((
            ErrorCode::InvalidReplicationFactor,
            format!(
                "replication factor {replication_factor} outside [1, {most}] (the cluster has {nodes} nodes; at most {REPLICATION_FACTOR_MAX})"
            ),
        ));
    }
    TopicConfig::from_entries(configs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|m| (ErrorCode::InvalidConfig, m))
}

/// The replicas of partition `partition` of topic `topic_id`: `factor` nodes taken
/// in order from a start that moves with the topic and the partition, so replicas
/// and (their first, the preferred leader) leaders spread over the nodes.
pub fn place_replicas(nodes: &[NodeId], topic_id: u32, partition: u32, factor: u16) -> Vec<NodeId> {
    let count = nodes.len().max(1);
    let start = (topic_id as usize + partition as usize) % count;
    (0..usize::from(factor).min(count))
        .map(|k| nodes[(start + k) % count])
        .collect()
}

/// Applies a committed command to the metadata of node `local`, whose shards are
/// `metadata.shard_count`. `nodes` is every node of the cluster, ascending.
pub fn apply(
    metadata: &mut NodeMetadata,
    index: u64,
    command: &Command,
    nodes: &[NodeId],
    local: NodeId,
) -> Applied {
    let cluster = metadata.cluster.get_or_insert_with(ClusterState::default);
    cluster.applied_index = cluster.applied_index.max(index);
    match command {
        Command::CreateTopic {
            name,
            partitions,
            replication_factor,
            configs,
            ..
        } => {
            if metadata.topics.contains_key(name) {
                return Applied::Refused(
                    ErrorCode::TopicAlreadyExists,
                    format!("topic '{name}' already exists"),
                );
            }
            let config =
                match precheck(name, *partitions, *replication_factor, configs, nodes.len()) {
                    Ok(config) => config,
                    Err((code, message)) => return Applied::Refused(code, message),
                };
            if metadata.topics.len() >= crate::limits::TOPICS_MAX {
                return Applied::Refused(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the cluster already has {} topics",
                        crate::limits::TOPICS_MAX
                    ),
                );
            }
            let Some(first_log) = metadata
                .next_log_id
                .checked_add(*partitions)
                .filter(|end| *end < CONTROLLER_LOG.0)
                .map(|_| metadata.next_log_id)
            else {
                return Applied::Refused(
                    ErrorCode::InvalidRequest,
                    "the cluster has handed out every partition log id (ids are never reused)"
                        .into(),
                );
            };
            let cluster = metadata.cluster.get_or_insert_with(ClusterState::default);
            let topic_id = cluster.next_topic_id.max(1);
            cluster.next_topic_id = topic_id + 1;
            let mut load = local_load(metadata);
            let mut placements = Vec::with_capacity(*partitions as usize);
            let mut replicas = Vec::with_capacity(*partitions as usize);
            for partition in 0..*partitions {
                let set = place_replicas(nodes, topic_id, partition, *replication_factor);
                let local_here = set.contains(&local);
                let shard = if local_here {
                    let (shard, _) = load
                        .iter()
                        .enumerate()
                        .min_by_key(|(index, count)| (**count, *index))
                        .unwrap_or((0, &0));
                    load[shard] += 1;
                    ShardId(shard as u16)
                } else {
                    ShardId(0)
                };
                placements.push(PartitionPlacement {
                    shard,
                    log_id: LogId(first_log + partition),
                    local: local_here,
                });
                replicas.push(set);
            }
            metadata.next_log_id = first_log + *partitions;
            let topic = Topic {
                name: name.clone(),
                config,
                partitions: placements,
                id: topic_id,
                replicas,
            };
            metadata.topics.insert(name.clone(), topic.clone());
            Applied::Created(topic)
        }
        Command::DeleteTopic { name, .. } => match metadata.topics.remove(name) {
            Some(topic) => Applied::Deleted(topic),
            None => Applied::Refused(ErrorCode::UnknownTopic, format!("unknown topic '{name}'")),
        },
    }
}

/// Local partitions per shard.
fn local_load(metadata: &NodeMetadata) -> Vec<u64> {
    let mut load = vec![0u64; usize::from(metadata.shard_count.max(1))];
    for topic in metadata.topics.values() {
        for placement in topic.partitions.iter().filter(|p| p.local) {
            if let Some(count) = load.get_mut(usize::from(placement.shard.0)) {
                *count += 1;
            }
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(serial: u64, name: &str, partitions: u32, factor: u16) -> Command {
        Command::CreateTopic {
            request: RequestId { node: 1, serial },
            name: name.into(),
            partitions,
            replication_factor: factor,
            configs: vec![],
        }
    }

    #[test]
    fn every_node_derives_the_same_topics_and_keeps_its_own_shards() {
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let mut views: Vec<NodeMetadata> = nodes.iter().map(|n| NodeMetadata::new(*n, 2)).collect();
        for (index, command) in [create(1, "a", 6, 3), create(2, "b", 3, 2)]
            .iter()
            .enumerate()
        {
            for (view, node) in views.iter_mut().zip(nodes) {
                assert!(matches!(
                    apply(view, index as u64 + 1, command, &nodes, node),
                    Applied::Created(_)
                ));
            }
        }
        let a: Vec<_> = views
            .iter()
            .map(|v| v.topics["a"].replicas.clone())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]), "replicas agree");
        let logs: Vec<Vec<LogId>> = views
            .iter()
            .map(|v| v.topics["b"].partitions.iter().map(|p| p.log_id).collect())
            .collect();
        assert!(logs.windows(2).all(|w| w[0] == w[1]), "log ids agree");
        // Preferred leaders spread: the 6 partitions of "a" lead on every node.
        let leaders: std::collections::BTreeSet<NodeId> =
            views[0].topics["a"].replicas.iter().map(|r| r[0]).collect();
        assert_eq!(leaders.len(), 3);
        // With factor 2, some partitions of "b" are not on node 1.
        let local: Vec<bool> = views[0].topics["b"]
            .partitions
            .iter()
            .map(|p| p.local)
            .collect();
        assert!(local.contains(&false) && local.contains(&true));
        assert_eq!(views[0].cluster.as_ref().unwrap().applied_index, 2);
    }

    #[test]
    fn refusals_are_typed_and_deterministic() {
        let nodes = [NodeId(1), NodeId(2)];
        let mut view = NodeMetadata::new(NodeId(1), 1);
        assert!(matches!(
            apply(&mut view, 1, &create(1, "t", 1, 1), &nodes, NodeId(1)),
            Applied::Created(_)
        ));
        assert!(matches!(
            apply(&mut view, 2, &create(2, "t", 1, 1), &nodes, NodeId(1)),
            Applied::Refused(ErrorCode::TopicAlreadyExists, _)
        ));
        assert!(matches!(
            apply(&mut view, 3, &create(3, "u", 1, 3), &nodes, NodeId(1)),
            Applied::Refused(ErrorCode::InvalidReplicationFactor, _)
        ));
        let delete = Command::DeleteTopic {
            request: RequestId { node: 1, serial: 4 },
            name: "nope".into(),
        };
        assert!(matches!(
            apply(&mut view, 4, &delete, &nodes, NodeId(1)),
            Applied::Refused(ErrorCode::UnknownTopic, _)
        ));
        assert_eq!(Command::decode(&delete.encode()).unwrap(), delete);
    }
}
