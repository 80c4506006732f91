//! The partition layer (DESIGN.md layer 3): a partition's state over storage,
//! and every operation on a partition — append, read, wait for data, offsets —
//! whether the partition is a plain local log (a single node) or the log of a
//! Raft group (a cluster).
//!
//! - `PartitionState`: log start, log end, high watermark (the Raft commit point
//!   mapped to an offset on a replicated log; what is durable on a local one),
//!   leader epoch (the Raft term) and this replica's role.
//! - `append`: produce (idempotent producers deduplicated, then a local append or
//!   a proposal to the partition's group, answered per `acks`).
//! - `read`: fetches bounded by the high watermark, long-polling fetches waiting
//!   on it, offset lookups.
//! - `replica` and `raft_log`: the partition's `RawNode` without I/O, and its log
//!   as raft-rs reads it (`raft::Storage`). `replication::host` drives them
//!   (persists Readies through the WAL, sends messages, ticks);
//!   `replication::transport` carries their messages between nodes.
//! - `view`: what this node can tell a client about a partition it may not host.
//!
//! Everything about a partition runs on its owning shard. This layer calls
//! `storage` (the shard's WAL) and, for a replicated partition, the shard's
//! replica host; it knows nothing of connections or frames (`api` calls it).

// raft-rs's protobuf messages are built field by field, as its own docs do.
#![allow(clippy::field_reassign_with_default)]

mod append;
pub mod raft_log;
mod read;
pub mod replica;
#[cfg(test)]
mod sim;
mod view;

pub use replica::{AckMode, Acked, GroupId, ReadyOut, Replica, ReplicaConfig, ReplicaError};
pub use view::PartitionView;

use sluice_schema::wire::ErrorCode;

use crate::shard::Shard;
use crate::shard_messages::ApiError;
use crate::types::{LogId, NodeId};

/// What this replica is for its partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A plain local log (single node, or a topic not replicated).
    Local,
    /// Leader of the partition's group that has committed an entry of its term:
    /// it serves reads and writes.
    Leader,
    /// Leader of its group, not yet serving (has not committed in its term).
    CatchingUp,
    /// Follower of the given leader (if known).
    Follower(Option<NodeId>),
}

/// A partition's state on this shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionState {
    /// The log.
    pub log: LogId,
    /// Its Raft group, if it is replicated.
    pub group: Option<GroupId>,
    /// This replica's role.
    pub role: Role,
    /// Leader epoch: the Raft term (0 for a local log).
    pub epoch: u64,
    /// First offset still stored.
    pub log_start: u64,
    /// Offset after the last record in the log, committed or not (on a local
    /// log: after the last record appended, durable or not yet).
    pub log_end: u64,
    /// Offset after the last record consumers may see: committed by a quorum on
    /// a replicated log, durable on a local one. Never above `log_end`.
    pub high_watermark: u64,
    /// Bytes stored.
    pub size_bytes: u64,
}

impl PartitionState {
    /// True when this replica answers produce and fetch.
    pub fn serves(&self) -> bool {
        matches!(self.role, Role::Local | Role::Leader)
    }
}

impl Shard {
    /// The state of `log`'s partition on this shard.
    pub fn partition_state(&self, log: LogId) -> Result<PartitionState, ApiError> {
        let (log_start, high_watermark, size_bytes) = self.wal.log_offsets(log)?;
        let local = PartitionState {
            log,
            group: None,
            role: Role::Local,
            epoch: 0,
            log_start,
            log_end: high_watermark,
            high_watermark,
            size_bytes,
        };
        let Some(cluster) = self.cluster.as_deref() else {
            return Ok(local);
        };
        let Some(group) = cluster.host.group_of(log) else {
            return Ok(local);
        };
        let replica = cluster.host.with(group, |r| {
            let role = if r.is_serving_leader() {
                Role::Leader
            } else if r.is_leader() {
                Role::CatchingUp
            } else {
                Role::Follower(r.leader())
            };
            (role, r.term(), r.log_end())
        });
        let Some((role, epoch, log_end)) = replica else {
            return Err(self.not_leader(group, &format!("partition {group}")));
        };
        Ok(PartitionState {
            group: Some(group),
            role,
            epoch,
            log_end: log_end.max(high_watermark),
            ..local
        })
    }

    /// The state of `log`'s partition if this replica serves produce and fetch
    /// for it; otherwise `NotLeader` (with the leader's address when known) or
    /// `LeaderNotAvailable` while a new leader catches up.
    pub fn serving(&self, log: LogId) -> Result<PartitionState, ApiError> {
        let state = self.partition_state(log)?;
        match (state.role, state.group) {
            (Role::Local | Role::Leader, _) => Ok(state),
            (Role::CatchingUp, Some(group)) => Err(ApiError::new(
                ErrorCode::LeaderNotAvailable,
                format!("partition {group}: the new leader is catching up; retry"),
            )),
            (_, group) => {
                let group = group.unwrap_or(GroupId(0));
                Err(self.not_leader(group, &format!("partition {group}")))
            }
        }
    }

    /// The leader epoch of `log` (the Raft term; 0 for a local log).
    pub fn leader_term(&self, log: LogId) -> u64 {
        self.partition_state(log).map_or(0, |s| s.epoch)
    }

    /// The leader of `group` as this node knows it, with its client address.
    pub fn leader_hint(&self, group: GroupId) -> (Option<NodeId>, Option<String>) {
        let Some(cluster) = self.cluster.as_deref() else {
            return (Some(self.settings.node_id), None);
        };
        let leader = cluster
            .host
            .with(group, |r| r.leader())
            .flatten()
            .or_else(|| cluster.view.leader_of(group));
        let address = leader
            .and_then(|node| cluster.view.node_address(node))
            .map(|a| format!("{}:{}", a.host, a.port));
        (leader, address)
    }

    /// `NotLeader` (or `LeaderNotAvailable`) for a partition group.
    pub fn not_leader(&self, group: GroupId, what: &str) -> ApiError {
        let (leader, address) = self.leader_hint(group);
        let leader = leader.filter(|l| *l != self.settings.node_id);
        ApiError::not_leader(what, leader, address)
    }
}
