//! Every bound in the broker, as a named constant, related by compile-time asserts.

/// Direct-I/O block size. Every WAL write and read is aligned to it; a device whose
/// logical block is larger is refused at open.
pub const SECTOR_BYTES: u64 = 4096;

/// Default WAL segment size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest WAL segment size accepted (tests use small segments).
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest WAL segment size: positions inside a segment are `u32`.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;

/// Bytes at the start of every segment reserved for the segment header block.
pub const SEGMENT_HEADER_BYTES: u64 = SECTOR_BYTES;

/// Largest single write the WAL issues (one group commit may issue several).
pub const WRITE_BYTES_MAX: usize = 4 << 20;

/// Bytes appended but not yet durable, at most; appenders wait beyond it (backpressure).
pub const INFLIGHT_BYTES_MAX: usize = 64 << 20;

/// After a crash, bytes past the last valid frame that may hold frames from writes
/// that completed but were never made durable (at most INFLIGHT_BYTES_MAX of
/// unsynced appends, plus the write in flight); recovery zeroes this much past the
/// tail so that such frames can never reappear behind later appends.
pub const RECOVERY_ZERO_BYTES: u64 = INFLIGHT_BYTES_MAX as u64 + 2 * WRITE_BYTES_MAX as u64;

/// Default bytes of recent writes kept in memory per shard for reads from the tail.
pub const TAIL_CACHE_BYTES_DEFAULT: usize = 64 << 20;

/// Index runs (contiguous batches of one partition) are capped at this many bytes,
/// which bounds how much a read from the middle of a run reads and skips.
pub const INDEX_RUN_BYTES_MAX: u32 = 1 << 20;

/// Largest batch frame the broker accepts (topics may set less).
pub const BATCH_BYTES_MAX: usize = sluice_schema::BATCH_BYTES_MAX;

/// Largest read the WAL issues for one fetch of one partition.
pub const READ_BYTES_MAX: usize = 16 << 20;

/// Partitions of one topic, at most.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;
/// Topics on one node, at most.
pub const TOPICS_MAX: usize = 100_000;
/// Shards (cores) on one node, at most.
pub const SHARDS_MAX: usize = 256;
/// Topic name length, at most (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

/// Largest frame the broker reads (prefix included).
pub const FRAME_BYTES_MAX: usize = sluice_schema::FRAME_BYTES_MAX;
/// Client connections per shard, at most.
pub const CONNECTIONS_PER_SHARD_MAX: usize = 4096;
/// Requests being served on one connection at once (pipelining depth).
pub const INFLIGHT_REQUESTS_PER_CONNECTION_MAX: usize = 128;
/// Cross-shard channel capacity (requests and replies each).
pub const MESH_CHANNEL_CAPACITY: usize = 1024;
/// Longest long-poll a fetch may ask for.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

const _: () = assert!(SEGMENT_BYTES_DEFAULT.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(SEGMENT_BYTES_MIN.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64 + 1);
const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!((WRITE_BYTES_MAX as u64).is_multiple_of(SECTOR_BYTES));
const _: () = assert!(SEGMENT_HEADER_BYTES + SECTOR_BYTES <= SEGMENT_BYTES_MIN);
const _: () = assert!(BATCH_BYTES_MAX <= INFLIGHT_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX as u64 <= SEGMENT_BYTES_MAX - SEGMENT_HEADER_BYTES);
const _: () = assert!(
    RECOVERY_ZERO_BYTES >= INFLIGHT_BYTES_MAX as u64 + WRITE_BYTES_MAX as u64 + SECTOR_BYTES
);
