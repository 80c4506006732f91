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
    /// Those replicas (ascending node ids).
    pub in_sync_replicas: Vec<NodeId>,
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
                in_sync_replicas: replicas.clone(),
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
            in_sync_replicas: in_sync_replicas(
                &replicas,
                info.as_ref().map_or(0, |i| i.in_sync_mask),
            ),
            replicas,
            reported: (!leader_is_here)
                .then(|| info.as_ref().map(|i| (i.high_watermark, i.log_start)))
                .flatten(),
        }
    }
}

/// The replicas a leader's in-sync mask names (bit i: the i-th voter in ascending
/// node id order; the voters are the replicas).
fn in_sync_replicas(replicas: &[NodeId], mask: u8) -> Vec<NodeId> {
    let mut sorted = replicas.to_vec();
    sorted.sort();
    sorted
        .into_iter()
        .take(8)
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, node)| node)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_names_replicas_in_ascending_order() {
        let replicas = [NodeId(3), NodeId(1), NodeId(2)];
        assert_eq!(
            in_sync_replicas(&replicas, 0b111),
            vec![NodeId(1), NodeId(2), NodeId(3)]
        );
        assert_eq!(
            in_sync_replicas(&replicas, 0b101),
            vec![NodeId(1), NodeId(3)]
        );
        assert_eq!(in_sync_replicas(&replicas, 0), Vec::<NodeId>::new());
    }
}
