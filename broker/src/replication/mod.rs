//! Quorum replication between nodes: the driver of each partition's Raft group
//! (`host`: persists Readies through the WAL, sends messages, ticks, applies)
//! and the node-to-node transport (`transport`). A partition's own state — its
//! `RawNode`, its log as raft-rs reads it, its high watermark — is the
//! partition layer's (`crate::partition`).
//!
//! What is persisted when, and what an acknowledgement means: docs/replication.md.

// raft-rs's protobuf messages are built field by field, as its own docs do.
#![allow(clippy::field_reassign_with_default)]

pub mod host;
pub mod transport;
