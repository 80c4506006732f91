//! Sluice wire protocols: the flatbuffers schemas (`fbs/sluice.fbs` for clients,
//! `fbs/peer.fbs` between nodes), the Rust code
//! `flatc` generates from it (committed; `tools/gen-schema.sh` regenerates it and CI
//! fails on drift), and the wire constants both ends share.
//!
//! The only logic here is the batch compression codecs (`compression`), which
//! both ends must apply identically. The framing and the record-batch layout are described
//! byte by byte in `docs/protocol.md` and `docs/storage.md`; the constants below are
//! the single source of truth for the numbers in those documents.

#![deny(missing_docs)]

#[allow(
    missing_docs,
    unused_imports,
    dead_code,
    clippy::all,
    clippy::unwrap_used,
    non_camel_case_types,
    unsafe_op_in_unsafe_fn,
    mismatched_lifetime_syntaxes
)]
#[rustfmt::skip]
mod generated;

pub mod compression;

/// Generated flatbuffers types (`sluice.wire` namespace).
pub use generated::sluice_generated::sluice::wire;

/// Generated flatbuffers types of the node-to-node protocol (`sluice.peer`).
pub use generated::peer_generated::sluice::peer;

/// The node-to-node protocol version (exchanged in `peer::Hello`).
pub const PEER_PROTOCOL_VERSION: u16 = 1;

/// The protocol versions this build speaks (negotiated by the Handshake request).
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u16 = 1;

/// Default client port of a broker.
pub const DEFAULT_PORT: u16 = 9440;

/// Bytes of the frame length prefix (`u32` little-endian, counting what follows it).
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Bytes of the envelope length field that follows the frame prefix.
pub const ENVELOPE_LENGTH_BYTES: usize = 4;
/// Largest frame (prefix included) a broker accepts by default and a client sends.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest flatbuffers envelope in a request frame.
pub const ENVELOPE_BYTES_MAX: usize = 1024 * 1024;
/// Largest flatbuffers envelope in a response frame. A broker answers a request
/// whose worst-case response would be larger with `ResponseTooLarge`.
pub const RESPONSE_ENVELOPE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Record-batch frame layout (identical on the wire and in the broker's WAL).
///
/// ```text
/// offset size field              written by
///   0     4  magic               client   BATCH_MAGIC
///   4     4  header_crc          broker   crc32(bytes[8..80]) after stamping
///   8     8  base_offset         broker   offset of the first record
///  16     4  log_id              broker   broker-internal partition log id
///  20     4  leader_epoch        broker
///  24     4  payload_crc         client   crc32(bytes[28..frame_bytes])
///  28     4  frame_bytes         client   header + records
///  32     2  format_version      client   BATCH_FORMAT_VERSION
///  34     2  attributes          client   bits 0-2 compression (0 = none), bit 4 control
///  36     4  record_count        client
///  40     4  last_offset_delta   client   record_count - 1
///  44     4  records_bytes       client   uncompressed bytes of the records; 0 if none
///  48     8  first_timestamp_ms  client
///  56     8  max_timestamp_ms    client
///  64     8  producer_id         client   -1 when not idempotent
///  72     2  producer_epoch      client   -1
///  74     2  reserved            client   0
///  76     4  base_sequence       client   -1
///  80     .  records             client   varint-framed records, or their
///                                          compressed block (see `compression`)
/// ```
///
/// All integers are little-endian. CRCs are CRC-32 (IEEE, as `crc32fast`).
pub mod batch {
    /// `b"SLB1"` read as a little-endian `u32`.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"SLB1");
    /// Version of the batch layout above.
    pub const FORMAT_VERSION: u16 = 1;
    /// Bytes of the fixed header.
    pub const HEADER_BYTES: usize = 80;
    /// Offset of `header_crc`.
    pub const HEADER_CRC_OFFSET: usize = 4;
    /// The header CRC covers `[HEADER_CRC_START, HEADER_BYTES)`.
    pub const HEADER_CRC_START: usize = 8;
    /// Offset of `base_offset`.
    pub const BASE_OFFSET_OFFSET: usize = 8;
    /// Offset of `log_id`.
    pub const LOG_ID_OFFSET: usize = 16;
    /// Offset of `leader_epoch`.
    pub const LEADER_EPOCH_OFFSET: usize = 20;
    /// Offset of `payload_crc`.
    pub const PAYLOAD_CRC_OFFSET: usize = 24;
    /// The payload CRC covers `[PAYLOAD_CRC_START, frame_bytes)`.
    pub const PAYLOAD_CRC_START: usize = 28;
    /// Offset of `frame_bytes`.
    pub const FRAME_BYTES_OFFSET: usize = 28;
    /// Offset of `format_version`.
    pub const FORMAT_VERSION_OFFSET: usize = 32;
    /// Offset of `attributes`.
    pub const ATTRIBUTES_OFFSET: usize = 34;
    /// Offset of `record_count`.
    pub const RECORD_COUNT_OFFSET: usize = 36;
    /// Offset of `last_offset_delta`.
    pub const LAST_OFFSET_DELTA_OFFSET: usize = 40;
    /// Offset of `records_bytes` (uncompressed length of a compressed batch's
    /// records; 0 in an uncompressed batch).
    pub const RECORDS_BYTES_OFFSET: usize = 44;
    /// Offset of `first_timestamp_ms`.
    pub const FIRST_TIMESTAMP_OFFSET: usize = 48;
    /// Offset of `max_timestamp_ms`.
    pub const MAX_TIMESTAMP_OFFSET: usize = 56;
    /// Offset of `producer_id`.
    pub const PRODUCER_ID_OFFSET: usize = 64;
    /// Offset of `producer_epoch`.
    pub const PRODUCER_EPOCH_OFFSET: usize = 72;
    /// Offset of `base_sequence`.
    pub const BASE_SEQUENCE_OFFSET: usize = 76;
    /// Attribute bits holding the compression codec (see [`crate::compression`]).
    pub const ATTRIBUTE_COMPRESSION_MASK: u16 = 0b111;
    /// Attribute bit marking a control batch.
    pub const ATTRIBUTE_CONTROL: u16 = 1 << 4;
    /// Records in one batch, at most.
    pub const RECORDS_MAX: u32 = 1 << 20;
}

/// Largest batch frame a broker accepts (topics may set a lower `max.message.bytes`).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

const _: () = assert!(BATCH_BYTES_MAX + ENVELOPE_BYTES_MAX < FRAME_BYTES_MAX);
const _: () = assert!(ENVELOPE_BYTES_MAX <= RESPONSE_ENVELOPE_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX + RESPONSE_ENVELOPE_BYTES_MAX < FRAME_BYTES_MAX);
const _: () = assert!(batch::HEADER_BYTES.is_multiple_of(8));
const _: () = assert!(batch::BASE_SEQUENCE_OFFSET + 4 == batch::HEADER_BYTES);

/// Consumer groups: the internal offsets topic and how a group finds its
/// coordinator.
pub mod groups {
    /// The internal, compacted-by-key topic holding every group's state and
    /// committed offsets. Created by the broker on the first group request.
    pub const OFFSETS_TOPIC: &str = "__sluice_offsets";
    /// Partitions of [`OFFSETS_TOPIC`] when the broker creates it (the
    /// `--offsets-partitions` default).
    pub const OFFSETS_PARTITIONS_DEFAULT: u32 = 8;
    /// Longest group id, in bytes.
    pub const GROUP_ID_BYTES_MAX: usize = 249;
    /// Session timeout when a member asks for none.
    pub const SESSION_TIMEOUT_MS_DEFAULT: u32 = 45_000;
    /// Rebalance timeout when a member asks for none.
    pub const REBALANCE_TIMEOUT_MS_DEFAULT: u32 = 60_000;
    /// Member epoch of a heartbeat that joins.
    pub const JOIN_EPOCH: i32 = 0;
    /// Member epoch of a heartbeat that leaves the group.
    pub const LEAVE_EPOCH: i32 = -1;
    /// Member epoch of a static member's heartbeat that leaves for now (its
    /// partitions wait for it until its session timeout).
    pub const STATIC_LEAVE_EPOCH: i32 = -2;

    /// The partition of [`OFFSETS_TOPIC`] whose leader coordinates `group_id`.
    pub fn group_partition(group_id: &str, partitions: u32) -> u32 {
        crc32fast::hash(group_id.as_bytes()) % partitions.max(1)
    }

    /// Checks a group id: 1..=249 bytes of `[a-zA-Z0-9._-]`.
    pub fn validate_group_id(group_id: &str) -> Result<(), String> {
        if group_id.is_empty() || group_id.len() > GROUP_ID_BYTES_MAX {
            return Err(format!(
                "group id must be 1..={GROUP_ID_BYTES_MAX} bytes, got {}",
                group_id.len()
            ));
        }
        if let Some(bad) = group_id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "group id {group_id:?} contains {bad:?}; allowed are [a-zA-Z0-9._-]"
            ));
        }
        Ok(())
    }
}
