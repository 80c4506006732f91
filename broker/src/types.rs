//! Newtypes for the identifiers that would otherwise all be integers.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $inner:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A shard: one core's executor, 0-based.
    ShardId,
    u16
);
id_type!(
    /// A node of the cluster.
    NodeId,
    u32
);
id_type!(
    /// A partition's log inside a shard's WAL; unique per node, never reused.
    LogId,
    u32
);
id_type!(
    /// A WAL segment's sequence number within its shard.
    SegmentId,
    u32
);
id_type!(
    /// Leader epoch stamped into every batch.
    Epoch,
    u32
);

/// A record offset within a partition.
pub type Offset = u64;
