//! `sluice-broker`: one Sluice node.
//!
//! Layers, bottom up (a module uses only the layers below it):
//! `limits`/`types` → `storage` → `partition` → `protocol`/`api` → `mesh` → `net` →
//! `runtime`. See `../shared/DESIGN.md` in the project's planning documents and
//! `docs/storage.md`.

#![deny(missing_docs)]

pub mod api;
pub mod cluster;
pub mod fuzzing;
pub mod groups;
pub mod idempotence;
pub mod limits;
pub mod mesh;
pub mod metadata;
pub mod metrics;
pub mod net;
pub mod partition;
pub mod port;
pub mod protocol;
pub mod replication;
pub mod runtime;
pub mod shard;
pub mod shard_cluster;
pub mod shard_messages;
pub mod storage;
pub mod sync;
pub mod types;
