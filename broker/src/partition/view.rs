//! What this node can tell a client about a partition, hosted here or not.

use crate::shard::Shard;
use crate::types::NodeId;

/// What this node can say about one partition (Metadata, DescribeTopics).
#[derive(Clone, Debug)]
pub struct PartitionView {
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// The leader's shard that owns the partition (as last reported).
    pub leader_shard: u16,
    /// Leader epoch (Raft term; 0 on a single node).
    pub epoch: u64,
    /// Replicas.
    pub replicas: Vec<NodeId>,
    /// Replicas caught up with the commit point (as the leader last reported).
    pub in_sync: u16,
    /// The leader's high watermark and log start, when this node is not the one
    /// to ask its own log (a cluster view: possibly a little stale).
    pub reported: Option<(u64, u64)>,
}

impl Shard {
    /// This node's view of partition `index` of `topic`.
    pub fn partition_view(&self, topic: &crate::metadata::Topic, index: usize) -> PartitionView {
        let node = self.settings.node_id;
        let placement = topic.partitions.get(index);
        let local_shard = placement.map_or(0, |p| p.shard.0);
        let replicas = topic.replicas_of(index, node);
        let (Some(cluster), Some(group)) = (self.cluster.as_deref(), topic.group(index as u32))
        else {
            return PartitionView {
                leader: Some(node),
                leader_shard: local_shard,
                epoch: 0,
                in_sync: 1,
                replicas,
                reported: None,
            };
        };
        let info = cluster.view.info(group);
        let leader = info.as_ref().and_then(|i| i.leader);
        let leader_is_here = leader == Some(node);
        PartitionView {
            leader,
            leader_shard: if leader_is_here {
                local_shard
            } else {
                info.as_ref().map_or(0, |i| i.shard)
            },
            epoch: info.as_ref().map_or(0, |i| i.term),
            in_sync: info.as_ref().map_or(0, |i| i.in_sync),
            replicas,
            reported: (!leader_is_here)
                .then(|| info.as_ref().map(|i| (i.high_watermark, i.log_start)))
                .flatten(),
        }
    }
}
