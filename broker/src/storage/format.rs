//! On-disk (and on-wire) record-batch frame and WAL segment header.
//!
//! The layout is documented byte by byte in `docs/storage.md` and in
//! `sluice_schema::batch`; the `zerocopy` structs here are checked against those
//! offsets at compile time. The client computes `payload_crc` over everything the
//! broker never rewrites, so the broker stamps `base_offset`, `log_id` and
//! `leader_epoch` and then computes only the 72-byte `header_crc`.

use sluice_schema::batch;
use sluice_schema::compression::{self, Compression};
use std::mem::{offset_of, size_of};
use zerocopy::little_endian::{I16, I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::types::{Epoch, LogId, Offset, SegmentId, ShardId};

/// The fixed 80-byte header of every record batch.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BatchHeader {
    /// [`batch::MAGIC`].
    pub magic: U32,
    /// CRC-32 of bytes `[8, 80)`, written by the broker after stamping.
    pub header_crc: U32,
    /// Offset of the first record (broker-assigned).
    pub base_offset: U64,
    /// The partition log this batch belongs to (broker-assigned).
    pub log_id: U32,
    /// Leader epoch at append (broker-assigned).
    pub leader_epoch: U32,
    /// CRC-32 of bytes `[28, frame_bytes)`, computed by the client.
    pub payload_crc: U32,
    /// Header plus records, in bytes.
    pub frame_bytes: U32,
    /// [`batch::FORMAT_VERSION`].
    pub format_version: U16,
    /// Compression codec and control bit.
    pub attributes: U16,
    /// Records in the batch (at least 1).
    pub record_count: U32,
    /// `record_count - 1`.
    pub last_offset_delta: U32,
    /// Uncompressed bytes of a compressed batch's records; zero otherwise.
    pub records_bytes: U32,
    /// Create time of the first record, ms since the epoch.
    pub first_timestamp_ms: I64,
    /// Largest record timestamp in the batch.
    pub max_timestamp_ms: I64,
    /// Idempotent producer id, -1 when unused.
    pub producer_id: I64,
    /// Idempotent producer epoch, -1 when unused.
    pub producer_epoch: I16,
    /// Zero.
    pub reserved1: U16,
    /// Idempotent base sequence, -1 when unused.
    pub base_sequence: U32,
}

const _: () = assert!(size_of::<BatchHeader>() == batch::HEADER_BYTES);
const _: () = assert!(offset_of!(BatchHeader, header_crc) == batch::HEADER_CRC_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, base_offset) == batch::BASE_OFFSET_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, log_id) == batch::LOG_ID_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, leader_epoch) == batch::LEADER_EPOCH_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, payload_crc) == batch::PAYLOAD_CRC_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, frame_bytes) == batch::FRAME_BYTES_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, format_version) == batch::FORMAT_VERSION_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, attributes) == batch::ATTRIBUTES_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, record_count) == batch::RECORD_COUNT_OFFSET);
const _: () =
    assert!(offset_of!(BatchHeader, last_offset_delta) == batch::LAST_OFFSET_DELTA_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, records_bytes) == batch::RECORDS_BYTES_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, first_timestamp_ms) == batch::FIRST_TIMESTAMP_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, max_timestamp_ms) == batch::MAX_TIMESTAMP_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, producer_id) == batch::PRODUCER_ID_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, producer_epoch) == batch::PRODUCER_EPOCH_OFFSET);
const _: () = assert!(offset_of!(BatchHeader, base_sequence) == batch::BASE_SEQUENCE_OFFSET);

/// Why a batch frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header, or than `frame_bytes` says.
    #[error("batch truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes required.
        need: usize,
    },
    /// Wrong magic number.
    #[error("bad batch magic {0:#010x}")]
    BadMagic(u32),
    /// A format version this broker does not know.
    #[error("unsupported batch format version {0}")]
    BadVersion(u16),
    /// `frame_bytes` smaller than a header or larger than allowed.
    #[error("batch length {frame_bytes} outside [{min}, {max}]")]
    BadLength {
        /// Declared length.
        frame_bytes: usize,
        /// Smallest valid.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// Record count zero, too large, or inconsistent with `last_offset_delta`.
    #[error("bad record count {record_count} (last offset delta {last_offset_delta})")]
    BadRecordCount {
        /// Declared record count.
        record_count: u32,
        /// Declared last offset delta.
        last_offset_delta: u32,
    },
    /// Attribute bits this broker does not know.
    #[error("unsupported batch attributes {0:#06x}")]
    BadAttributes(u16),
    /// An undefined compression codec, or a `records_bytes` field that does
    /// not fit the codec.
    #[error("batch compression: {0}")]
    BadCompression(String),
    /// The payload CRC does not match.
    #[error("batch payload CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    PayloadCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A record inside the batch is malformed: every consumer would fail to decode
    /// the partition past it, so the batch is refused.
    #[error("record {index}: {reason}")]
    BadRecord {
        /// The record's index in the batch.
        index: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// The header CRC does not match (stored frames only).
    #[error("batch header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
}

impl FrameError {
    /// True for errors that mean the bytes were damaged (as opposed to malformed).
    pub fn is_checksum(&self) -> bool {
        matches!(
            self,
            FrameError::PayloadCrc { .. } | FrameError::HeaderCrc { .. }
        )
    }
}

/// Reads the header at the start of `bytes`, without validating anything.
pub fn header(bytes: &[u8]) -> Result<&BatchHeader, FrameError> {
    BatchHeader::ref_from_prefix(bytes)
        .map(|(header, _)| header)
        .map_err(|_| FrameError::Truncated {
            have: bytes.len(),
            need: batch::HEADER_BYTES,
        })
}

/// Checks the structural fields of a header (not the CRCs); returns `frame_bytes`.
pub fn check_header(header: &BatchHeader, frame_bytes_max: usize) -> Result<usize, FrameError> {
    let magic = header.magic.get();
    if magic != batch::MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = header.format_version.get();
    if version != batch::FORMAT_VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let frame_bytes = header.frame_bytes.get() as usize;
    if frame_bytes < batch::HEADER_BYTES || frame_bytes > frame_bytes_max {
        return Err(FrameError::BadLength {
            frame_bytes,
            min: batch::HEADER_BYTES,
            max: frame_bytes_max,
        });
    }
    let record_count = header.record_count.get();
    let last_offset_delta = header.last_offset_delta.get();
    // A control frame (see `control.rs`) holds no records; a batch at least one.
    let control = header.attributes.get() & batch::ATTRIBUTE_CONTROL != 0;
    let counts_ok = if control {
        record_count == 0 && last_offset_delta == 0
    } else {
        record_count != 0
            && record_count <= batch::RECORDS_MAX
            && last_offset_delta == record_count - 1
    };
    if !counts_ok {
        return Err(FrameError::BadRecordCount {
            record_count,
            last_offset_delta,
        });
    }
    let attributes = header.attributes.get();
    let known = batch::ATTRIBUTE_CONTROL;
    if attributes & !known & !batch::ATTRIBUTE_COMPRESSION_MASK != 0 {
        return Err(FrameError::BadAttributes(attributes));
    }
    let records_bytes = header.records_bytes.get() as usize;
    let bits = attributes & batch::ATTRIBUTE_COMPRESSION_MASK;
    match Compression::from_attributes(attributes) {
        None => {
            return Err(FrameError::BadCompression(format!(
                "undefined codec {bits} (0 none, 2 snappy, 3 lz4, 4 zstd)"
            )))
        }
        Some(Compression::None) if records_bytes != 0 => {
            return Err(FrameError::BadCompression(format!(
                "an uncompressed batch declares records_bytes {records_bytes} (must be 0)"
            )))
        }
        Some(Compression::None) => {}
        Some(_) if control => return Err(FrameError::BadAttributes(attributes)),
        Some(codec) if !(1..=compression::RECORDS_BYTES_MAX).contains(&records_bytes) => {
            return Err(FrameError::BadCompression(format!(
                "a {codec} batch declares records_bytes {records_bytes} (1..={})",
                compression::RECORDS_BYTES_MAX
            )))
        }
        Some(_) => {}
    }
    Ok(frame_bytes)
}

/// The codec of a header that passed [`check_header`].
pub fn codec(header: &BatchHeader) -> Compression {
    Compression::from_attributes(header.attributes.get()).unwrap_or_default()
}

/// CRC-32 over the client-owned part of a frame.
pub fn payload_crc(frame: &[u8]) -> u32 {
    crc32fast::hash(&frame[batch::PAYLOAD_CRC_START..])
}

/// CRC-32 over the header bytes the header CRC covers.
pub fn header_crc(frame: &[u8]) -> u32 {
    crc32fast::hash(&frame[batch::HEADER_CRC_START..batch::HEADER_BYTES])
}

/// What the broker needs to know about a verified client batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    /// Bytes of the whole frame.
    pub frame_bytes: usize,
    /// Records in it.
    pub record_count: u32,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
}

/// Validates one client-encoded batch at the start of `bytes` (structure and payload
/// CRC). `frame_bytes_max` is the topic's `max.message.bytes`.
pub fn verify_client_batch(bytes: &[u8], frame_bytes_max: usize) -> Result<BatchInfo, FrameError> {
    let header = header(bytes)?;
    if header.attributes.get() & batch::ATTRIBUTE_CONTROL != 0 {
        // Control frames are the broker's own (Raft entries and state).
        return Err(FrameError::BadAttributes(header.attributes.get()));
    }
    let frame_bytes = check_header(header, frame_bytes_max)?;
    if bytes.len() < frame_bytes {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: frame_bytes,
        });
    }
    let frame = &bytes[..frame_bytes];
    let computed = payload_crc(frame);
    let stored = header.payload_crc.get();
    if computed != stored {
        return Err(FrameError::PayloadCrc { stored, computed });
    }
    let records = &frame[batch::HEADER_BYTES..];
    match codec(header) {
        Compression::None => check_records(records, header.record_count.get())?,
        // A compressed batch is stored and served as it came, but its records
        // are checked like any others: a block that fails to decode would fail
        // every consumer of the partition.
        compressed => SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let decoded = compressed
                .decompress_into(records, header.records_bytes.get() as usize, &mut scratch)
                .map_err(|error| {
                    FrameError::BadCompression(format!(
                        "the {compressed} block does not decode: {error}"
                    ))
                })
                .and_then(|()| check_records(&scratch, header.record_count.get()));
            if scratch.capacity() > SCRATCH_KEPT_BYTES {
                *scratch = Vec::new();
            }
            decoded
        })?,
    }
    Ok(BatchInfo {
        frame_bytes,
        record_count: header.record_count.get(),
        max_timestamp_ms: header.max_timestamp_ms.get(),
    })
}

thread_local! {
    /// Decompression buffer of the thread's batch checks (kept between batches
    /// up to [`SCRATCH_KEPT_BYTES`]).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A larger decompression buffer is freed after use.
const SCRATCH_KEPT_BYTES: usize = 4 << 20;

/// Walks the records section of a batch (the bytes after its header, decompressed)
/// and checks their framing exactly as a consumer decodes it (docs/protocol.md, "Records"): `record_count` records, each
/// `length | attributes | timestamp delta | offset delta | key | value | headers`
/// with every length inside the record, offset delta = the record's index, keys and
/// values of length -1 (null) or more, a non-negative header count, UTF-8 header
/// keys that are not null, each record consuming exactly its length, and nothing
/// after the last record.
pub fn check_records(records: &[u8], record_count: u32) -> Result<(), FrameError> {
    let mut position = 0;
    for index in 0..record_count {
        let bad = |reason: String| FrameError::BadRecord { index, reason };
        let length = varint_i32(records, &mut position)
            .ok_or_else(|| bad("record length is truncated or not a 32-bit varint".into()))?;
        let length =
            usize::try_from(length).map_err(|_| bad(format!("negative record length {length}")))?;
        let end = position
            .checked_add(length)
            .filter(|end| *end <= records.len())
            .ok_or_else(|| {
                bad(format!(
                    "record length {length} runs past the end of the batch"
                ))
            })?;
        let mut record = Cursor {
            bytes: &records[..end],
            position,
        };
        record.check(index).map_err(bad)?;
        if record.position != end {
            return Err(bad(format!(
                "record has {} bytes after its headers",
                end - record.position
            )));
        }
        position = end;
    }
    if position != records.len() {
        return Err(FrameError::BadRecord {
            index: record_count,
            reason: format!(
                "{} bytes after the last of {record_count} records",
                records.len() - position
            ),
        });
    }
    Ok(())
}

/// Reads a zigzag varint of at most `bytes_max` bytes.
pub(crate) fn varint(bytes: &[u8], position: &mut usize, bytes_max: usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for index in 0..bytes_max {
        let byte = *bytes.get(*position + index)?;
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *position += index + 1;
            return Some(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    None
}

/// A 32-bit varint (at most 5 bytes, value in `i32`).
fn varint_i32(bytes: &[u8], position: &mut usize) -> Option<i32> {
    let mut at = *position;
    let value = i32::try_from(varint(bytes, &mut at, 5)?).ok()?;
    *position = at;
    Some(value)
}

/// The fields of one record, bounded by its length.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Cursor<'_> {
    fn check(&mut self, index: u32) -> Result<(), String> {
        if self.position >= self.bytes.len() {
            return Err("record ends before its attributes".into());
        }
        self.position += 1;
        varint(self.bytes, &mut self.position, 10)
            .ok_or("timestamp delta is truncated or longer than 10 bytes")?;
        let delta = varint_i32(self.bytes, &mut self.position)
            .ok_or("offset delta is truncated or not a 32-bit varint")?;
        if i64::from(delta) != i64::from(index) {
            return Err(format!(
                "offset delta {delta} is not the record's index {index}"
            ));
        }
        self.field("key")?;
        self.field("value")?;
        let count = varint_i32(self.bytes, &mut self.position)
            .ok_or("header count is truncated or not a 32-bit varint")?;
        let count = usize::try_from(count).map_err(|_| format!("negative header count {count}"))?;
        if count > (self.bytes.len() - self.position) / 2 {
            return Err(format!(
                "header count {count} runs past the end of the record"
            ));
        }
        for header in 0..count {
            let key = self
                .field("header key")?
                .ok_or_else(|| format!("header {header} has a null key"))?;
            if std::str::from_utf8(key).is_err() {
                return Err(format!("header {header} key is not UTF-8"));
            }
            self.field("header value")?;
        }
        Ok(())
    }

    /// A length-prefixed field; `None` for a null (-1) one.
    fn field(&mut self, what: &str) -> Result<Option<&[u8]>, String> {
        let length = varint_i32(self.bytes, &mut self.position)
            .ok_or_else(|| format!("{what} length is truncated or not a 32-bit varint"))?;
        if length == -1 {
            return Ok(None);
        }
        let length =
            usize::try_from(length).map_err(|_| format!("{what} length {length} is below -1"))?;
        let end = self
            .position
            .checked_add(length)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("{what} of {length} bytes runs past the end of the record"))?;
        let field = &self.bytes[self.position..end];
        self.position = end;
        Ok(Some(field))
    }
}

/// Writes the broker-owned fields into a frame and seals it with the header CRC.
pub fn stamp(frame: &mut [u8], base_offset: Offset, log_id: LogId, epoch: Epoch) {
    debug_assert!(frame.len() >= batch::HEADER_BYTES);
    let put = |frame: &mut [u8], at: usize, bytes: &[u8]| {
        frame[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(frame, batch::BASE_OFFSET_OFFSET, &base_offset.to_le_bytes());
    put(frame, batch::LOG_ID_OFFSET, &log_id.0.to_le_bytes());
    put(frame, batch::LEADER_EPOCH_OFFSET, &epoch.0.to_le_bytes());
    let crc = header_crc(frame);
    put(frame, batch::HEADER_CRC_OFFSET, &crc.to_le_bytes());
}

/// A stored frame's identity, from its verified header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredFrame {
    /// Partition log.
    pub log_id: LogId,
    /// First offset (a control frame's: the log's next offset).
    pub base_offset: Offset,
    /// One past the last offset (`base_offset` for a control frame).
    pub end_offset: Offset,
    /// Whole frame bytes.
    pub frame_bytes: usize,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
    /// Leader epoch (the Raft term of a replicated log's entry).
    pub epoch: Epoch,
    /// A control frame (no records; see `control.rs`).
    pub control: bool,
}

/// Verifies a stored frame's header at the start of `bytes` (header CRC and
/// structure, not the payload CRC): enough to trust its length and identity, for
/// walking past frames without reading their records. `bytes` need only hold the
/// header; the caller checks that `frame_bytes` are there before using them.
pub fn verify_stored_header(
    bytes: &[u8],
    frame_bytes_max: usize,
) -> Result<StoredFrame, FrameError> {
    let header = header(bytes)?;
    let computed = header_crc(bytes);
    let stored = header.header_crc.get();
    let structure = check_header(header, frame_bytes_max);
    if computed != stored {
        // Garbage reports as garbage (bad magic), not as a CRC error.
        structure?;
        return Err(FrameError::HeaderCrc { stored, computed });
    }
    let frame_bytes = structure?;
    let base_offset = header.base_offset.get();
    let end_offset = base_offset
        .checked_add(u64::from(header.record_count.get()))
        .ok_or(FrameError::BadRecordCount {
            record_count: header.record_count.get(),
            last_offset_delta: header.last_offset_delta.get(),
        })?;
    Ok(StoredFrame {
        log_id: LogId(header.log_id.get()),
        base_offset,
        end_offset,
        frame_bytes,
        max_timestamp_ms: header.max_timestamp_ms.get(),
        epoch: Epoch(header.leader_epoch.get()),
        control: header.attributes.get() & batch::ATTRIBUTE_CONTROL != 0,
    })
}

/// Verifies a stored frame at the start of `bytes` completely (both CRCs).
pub fn verify_stored(bytes: &[u8], frame_bytes_max: usize) -> Result<StoredFrame, FrameError> {
    let frame = verify_stored_header(bytes, frame_bytes_max)?;
    if bytes.len() < frame.frame_bytes {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: frame.frame_bytes,
        });
    }
    let computed = payload_crc(&bytes[..frame.frame_bytes]);
    let stored = header(bytes)?.payload_crc.get();
    if computed != stored {
        return Err(FrameError::PayloadCrc { stored, computed });
    }
    Ok(frame)
}

/// `b"SLWALSEG"` read as a little-endian `u64`.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"SLWALSEG");
/// Version of the WAL layout (segment header + batch frames). Bumped on any change.
pub const WAL_FORMAT_VERSION: u32 = 1;

/// The first bytes of every segment file (the rest of its 4 KiB block is zero).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: U64,
    /// [`WAL_FORMAT_VERSION`].
    pub format_version: U32,
    /// CRC-32 of the other fields of this struct.
    pub header_crc: U32,
    /// The shard that owns this WAL.
    pub shard: U16,
    /// Zero.
    pub reserved: U16,
    /// This segment's sequence number.
    pub segment_id: U32,
    /// File size the segment was pre-allocated to.
    pub segment_bytes: U64,
    /// Creation time, ms since the epoch.
    pub created_ms: I64,
}

const _: () = assert!(size_of::<SegmentHeader>() == 40);

impl SegmentHeader {
    /// A header for a new segment.
    pub fn new(shard: ShardId, segment_id: SegmentId, segment_bytes: u64, created_ms: i64) -> Self {
        let mut header = SegmentHeader {
            magic: SEGMENT_MAGIC.into(),
            format_version: WAL_FORMAT_VERSION.into(),
            header_crc: 0.into(),
            shard: shard.0.into(),
            reserved: 0.into(),
            segment_id: segment_id.0.into(),
            segment_bytes: segment_bytes.into(),
            created_ms: created_ms.into(),
        };
        header.header_crc = header.compute_crc().into();
        header
    }

    fn compute_crc(&self) -> u32 {
        let mut copy = *self;
        copy.header_crc = 0.into();
        crc32fast::hash(copy.as_bytes())
    }

    /// Parses and checks a header read from the start of a segment file.
    pub fn parse(bytes: &[u8]) -> Result<SegmentHeader, String> {
        let (header, _) = SegmentHeader::read_from_prefix(bytes)
            .map_err(|_| "segment header truncated".to_string())?;
        if header.magic.get() != SEGMENT_MAGIC {
            return Err("not a Sluice WAL segment (bad magic)".into());
        }
        if header.compute_crc() != header.header_crc.get() {
            return Err("segment header CRC mismatch".into());
        }
        if header.format_version.get() != WAL_FORMAT_VERSION {
            return Err(format!(
                "segment written by WAL format version {}, this build reads version {}",
                header.format_version.get(),
                WAL_FORMAT_VERSION
            ));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests;
