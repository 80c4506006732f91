//! Messages between shards (all `Send`: they cross threads on the mesh).

use bytes::Bytes;
use sluice_schema::wire::ErrorCode;

use crate::storage::format::BatchInfo;
use crate::storage::{Appended, ReadBatches, StorageError};
use crate::types::{LogId, NodeId, Offset};

/// An error as the API reports it: a wire code, a message, and for out-of-range
/// errors the valid range.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// Wire error code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// Log start offset, when known.
    pub log_start: Offset,
    /// High watermark, when known.
    pub high_watermark: Offset,
    /// With `NotLeader`: the leader, if known.
    pub leader: Option<NodeId>,
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            log_start: 0,
            high_watermark: 0,
            leader: None,
        }
    }

    /// This node does not lead `what`; `leader` (at `address`) does, if known.
    pub fn not_leader(what: &str, leader: Option<NodeId>, address: Option<String>) -> Self {
        let (code, message) = match (leader, address) {
            (Some(node), Some(address)) => (
                ErrorCode::NotLeader,
                format!("this node does not lead {what}: node {node} at {address} does"),
            ),
            (Some(node), None) => (
                ErrorCode::NotLeader,
                format!("this node does not lead {what}: node {node} does"),
            ),
            (None, _) => (
                ErrorCode::LeaderNotAvailable,
                format!("{what} has no leader right now (an election is in progress); retry"),
            ),
        };
        ApiError {
            leader,
            ..ApiError::new(code, message)
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        let code = match &error {
            StorageError::DiskFull { .. } => ErrorCode::DiskFull,
            StorageError::Corrupt { .. } => ErrorCode::CorruptLog,
            StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            StorageError::UnknownLog(_) => ErrorCode::UnknownPartition,
            StorageError::ShuttingDown => ErrorCode::ShuttingDown,
            StorageError::BatchTooLarge { .. } => ErrorCode::RecordTooLarge,
            StorageError::Io { .. }
            | StorageError::Failed(_)
            | StorageError::Incompatible { .. } => ErrorCode::StorageError,
        };
        let mut api = ApiError::new(code, error.to_string());
        if let StorageError::OffsetOutOfRange {
            log_start,
            high_watermark,
            ..
        } = error
        {
            api.log_start = log_start;
            api.high_watermark = high_watermark;
        }
        api
    }
}

/// Which offset a ListOffsets asks for.
#[derive(Clone, Copy, Debug)]
pub enum OffsetQuery {
    /// Log start.
    Earliest,
    /// High watermark.
    Latest,
    /// First batch with max timestamp >= this.
    Timestamp(i64),
}

/// A resolved offset.
#[derive(Clone, Copy, Debug)]
pub struct ListedOffset {
    /// The offset.
    pub offset: Offset,
    /// Batch max timestamp (timestamp queries), else -1.
    pub timestamp_ms: i64,
    /// Log start.
    pub log_start: Offset,
    /// High watermark.
    pub high_watermark: Offset,
}

/// A partition's offsets and size.
#[derive(Clone, Copy, Debug)]
pub struct LogDescription {
    /// Log start.
    pub log_start: Offset,
    /// High watermark.
    pub high_watermark: Offset,
    /// Bytes stored.
    pub size_bytes: u64,
    /// The offset from which the log is corrupt (nothing at or past it is served).
    pub corrupt_from: Option<Offset>,
}

/// A topic to create.
#[derive(Clone, Debug)]
pub struct NewTopic {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// key=value configs.
    pub configs: Vec<(String, String)>,
    /// Replicas per partition (0: the default).
    pub replication_factor: u16,
}

/// One partition of a multi-partition read.
#[derive(Clone, Copy, Debug)]
pub struct PartitionRead {
    /// The log.
    pub log: LogId,
    /// From offset.
    pub offset: Offset,
    /// The partition's own byte budget.
    pub max_bytes: usize,
    /// Where the read stops (a pipelined fetch's range).
    pub range: crate::storage::ReadRange,
}

/// Work one shard asks another to do.
pub enum ShardRequest {
    /// Read several logs of this shard in order within a shared byte budget.
    ReadMany {
        /// The reads, in order.
        reads: Vec<PartitionRead>,
        /// Bytes all of them may return together (the first non-empty read
        /// returns at least one whole batch).
        budget: usize,
    },
    /// Append verified batches to a log.
    Produce {
        /// Target log.
        log: LogId,
        /// Verified client batches.
        batches: Vec<(Bytes, BatchInfo)>,
        /// The request's acks (a replicated log answers -1 on quorum, 0/1 on the
        /// leader's own durability).
        acks: i8,
    },
    /// Reply once the log's high watermark passes `seen_high_watermark`, or after
    /// `wait_ms`.
    WaitForData {
        /// Log.
        log: LogId,
        /// The high watermark the fetch last saw.
        seen_high_watermark: Offset,
        /// Longest wait.
        wait_ms: u32,
    },
    /// Resolve an offset.
    ListOffset {
        /// Log.
        log: LogId,
        /// Which.
        query: OffsetQuery,
    },
    /// Offsets and sizes of logs.
    Describe(Vec<LogId>),
    /// Register new, empty logs, each with its per-segment byte limit.
    CreateLogs(Vec<(LogId, u64)>),
    /// Forget logs.
    DeleteLogs(Vec<LogId>),
    /// Create topics (shard 0, the metadata controller).
    CreateTopics {
        /// Topics.
        topics: Vec<NewTopic>,
        /// Validate only.
        validate_only: bool,
    },
    /// Delete topics (shard 0).
    DeleteTopics(Vec<String>),
    /// Raft messages from a peer for groups this shard hosts (fire and forget).
    Raft(Vec<(u64, Bytes)>),
    /// Create local replicas (and their logs) of new partitions.
    CreateReplicas(Vec<ReplicaSpec>),
    /// Drop local replicas (and their logs) of deleted partitions.
    DropReplicas(Vec<(u64, LogId)>),
    /// A consumer-group operation for the coordinator of offsets partition `log`.
    Group {
        /// The `__sluice_offsets` partition's log.
        log: LogId,
        /// The operation.
        op: crate::groups::GroupOp,
    },
}

/// A local replica to create.
#[derive(Clone, Debug)]
pub struct ReplicaSpec {
    /// Raft group id.
    pub group: u64,
    /// Its log in the shard's WAL.
    pub log: LogId,
    /// Per-segment byte limit of the log.
    pub segment_bytes: u64,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Campaign at once (the preferred leader, for a new group).
    pub campaign: bool,
}

impl ShardRequest {
    /// A request that may wait long on the serving shard (a fetch's long-poll).
    pub fn is_long_poll(&self) -> bool {
        matches!(self, ShardRequest::WaitForData { .. })
    }
}

/// The answer.
pub enum ShardReply {
    /// Produce result.
    Produced(Result<Appended, ApiError>),
    /// ReadMany results, in request order.
    ReadMany(Vec<Result<ReadBatches, ApiError>>),
    /// WaitForData finished (data or timeout).
    Waited,
    /// ListOffset result.
    Offset(Result<ListedOffset, ApiError>),
    /// Describe results, in request order.
    Described(Vec<Result<LogDescription, ApiError>>),
    /// CreateLogs / DeleteLogs done.
    Done,
    /// Per-topic admin results, in request order.
    Admin(Vec<(String, Option<ApiError>)>),
    /// A consumer-group operation's answer.
    Group(Result<crate::groups::GroupAnswer, ApiError>),
    /// The target shard could not be reached.
    Unavailable(String),
}
