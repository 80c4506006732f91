//! Quorum replication: one Raft group per partition (and one for the cluster's
//! controller), on raft-rs's sans-I/O `RawNode`.
//!
//! - `raft_log`: the replica's log as raft-rs reads it (`raft::Storage`): bounds,
//!   terms and the newest entries in memory; older entries fetched from the WAL.
//! - `replica`: one replica, without I/O: proposals stamped with offsets and the
//!   term, Readies turned into WAL writes and messages, the high watermark moved
//!   on commit, producers answered per `acks`.
//!
//! What is persisted when, and what an acknowledgement means: docs/replication.md.

// raft-rs's protobuf messages are built field by field, as its own docs do.
#![allow(clippy::field_reassign_with_default)]

pub mod host;
pub mod raft_log;
pub mod replica;
#[cfg(test)]
mod sim;
pub mod transport;

pub use replica::{AckMode, Acked, GroupId, ReadyOut, Replica, ReplicaConfig, ReplicaError};
