//! Record batches: [`BatchBuilder`] encodes records straight into one buffer and
//! seals it into a batch frame; [`BatchIter`] splits fetched bytes into verified
//! batches and [`RecordIter`] decodes their records.
//!
//! The layout (80-byte header + Kafka v2 style records) is documented byte by byte
//! in `docs/protocol.md` and in [`sluice_schema::batch`]. Decoding never panics:
//! every length is checked against the bytes that remain, and a violation is an
//! [`Error::InvalidBatch`] (or [`Error::CorruptBatch`] for a CRC mismatch).

use bytes::{BufMut, Bytes, BytesMut};
pub use sluice_schema::compression::Compression;
use sluice_schema::compression::RECORDS_BYTES_MAX;
use sluice_schema::{batch, BATCH_BYTES_MAX};

use crate::error::{Error, Result};
use crate::varint;

/// A record header: a UTF-8 key and an optional value.
pub type Header = (String, Option<Bytes>);

/// Bytes of a batch with no records.
pub const HEADER_BYTES: usize = batch::HEADER_BYTES;

/// What a record can take beyond its body without the deltas: the timestamp
/// delta, the offset delta and the record's length, each at its longest.
const RECORD_BYTES_SLACK: usize =
    varint::VARLONG_BYTES_MAX + varint::VARINT_BYTES_MAX + varint::VARINT_BYTES_MAX;

/// The idempotence fields of a batch header: who produced it and the sequence
/// number of its first record in its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerStamp {
    /// Producer id (from InitProducerId).
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence of the batch's first record (per partition, from 0).
    pub base_sequence: i32,
}

/// The sequence after a batch of `record_count` records that starts at
/// `base_sequence`: sequences count records and wrap from `i32::MAX` to 0.
pub fn next_sequence(base_sequence: i32, record_count: u32) -> i32 {
    let modulus = i64::from(i32::MAX) + 1;
    let next = (i64::from(base_sequence.max(0)) + i64::from(record_count)) % modulus;
    next as i32
}

/// Batch buffers to build in again. A producer keeps one: a fresh buffer of a
/// few hundred KiB per batch costs more in page faults (the allocator hands
/// large blocks back to the kernel, and every page is zeroed again when it
/// returns) than encoding its records. A frame finished from a builder that has
/// a pool gives its buffer back when the frame's last reference is dropped
/// (after it is written and, with acks, answered).
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: std::sync::Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    buffers: std::sync::Mutex<Vec<BytesMut>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` buffers.
    pub fn new(keep: usize) -> BufferPool {
        BufferPool {
            inner: std::sync::Arc::new(PoolInner {
                buffers: std::sync::Mutex::new(Vec::new()),
                keep,
            }),
        }
    }

    /// A buffer of at least `capacity` bytes, empty: a kept one if there is one
    /// large enough.
    pub fn take(&self, capacity: usize) -> BytesMut {
        let kept = self
            .inner
            .buffers
            .lock()
            .ok()
            .and_then(|mut buffers| buffers.pop());
        match kept {
            Some(mut buf) if buf.capacity() >= capacity => {
                buf.clear();
                buf
            }
            _ => BytesMut::with_capacity(capacity),
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.inner.buffers.lock().map_or(0, |buffers| buffers.len())
    }

    fn put(&self, buf: BytesMut) {
        if buf.capacity() == 0 {
            return;
        }
        if let Ok(mut buffers) = self.inner.buffers.lock() {
            if buffers.len() < self.inner.keep {
                buffers.push(buf);
            }
        }
    }
}

/// A finished frame's buffer, given back to its pool when the frame's last
/// reference goes.
struct Pooled {
    buf: BytesMut,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// Builds one record batch frame in a single buffer.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    pool: Option<BufferPool>,
    compression: Compression,
    record_count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl BatchBuilder {
    /// A builder whose buffer can hold `capacity_bytes` (header included) before
    /// it must grow.
    pub fn with_capacity(capacity_bytes: usize) -> BatchBuilder {
        BatchBuilder::in_buffer(BytesMut::with_capacity(capacity_bytes.max(HEADER_BYTES)))
    }

    /// A builder that takes its buffer from `pool` (at least `capacity_bytes`)
    /// and whose frame gives it back there.
    pub fn pooled(pool: &BufferPool, capacity_bytes: usize) -> BatchBuilder {
        let mut builder = BatchBuilder::in_buffer(pool.take(capacity_bytes.max(HEADER_BYTES)));
        builder.pool = Some(pool.clone());
        builder
    }

    fn in_buffer(mut buf: BytesMut) -> BatchBuilder {
        buf.clear();
        buf.put_bytes(0, HEADER_BYTES);
        BatchBuilder {
            buf,
            pool: None,
            compression: Compression::None,
            record_count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: i64::MIN,
        }
    }

    /// Compresses the records with `codec` when the batch is finished (the
    /// header stays uncompressed). A batch that `codec` does not shrink is sent
    /// uncompressed.
    pub fn set_compression(&mut self, codec: Compression) {
        self.compression = codec;
    }

    /// Encoded bytes so far (uncompressed), header included.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Records appended so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// `true` when no record was appended yet.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// An upper bound of the bytes a record adds to a batch (exact except for the
    /// timestamp and offset deltas, which are assumed maximal).
    pub fn record_bytes_max(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) -> usize {
        body_bytes_without_deltas(key, value, headers) + RECORD_BYTES_SLACK
    }

    /// Appends one record and returns its index in the batch (its offset delta).
    pub fn append(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> Result<u32> {
        let record_bytes_max = body_bytes_without_deltas(key, value, headers) + RECORD_BYTES_SLACK;
        self.append_sized(timestamp_ms, key, value, headers, record_bytes_max)
    }

    /// [`BatchBuilder::append`] of a record whose
    /// [`BatchBuilder::record_bytes_max`] the caller has computed already.
    pub(crate) fn append_sized(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
        record_bytes_max: usize,
    ) -> Result<u32> {
        if self.record_count >= batch::RECORDS_MAX {
            return Err(Error::InvalidArgument(format!(
                "a batch holds at most {} records",
                batch::RECORDS_MAX
            )));
        }
        if self.record_count == 0 {
            self.first_timestamp_ms = timestamp_ms;
        }
        let timestamp_delta = timestamp_ms.wrapping_sub(self.first_timestamp_ms);
        let offset_delta = i64::from(self.record_count);
        debug_assert_eq!(
            record_bytes_max,
            body_bytes_without_deltas(key, value, headers) + RECORD_BYTES_SLACK
        );
        let body = record_bytes_max - RECORD_BYTES_SLACK
            + varint::encoded_len(timestamp_delta)
            + varint::encoded_len(offset_delta);
        let total = self.buf.len() + varint::encoded_len(body as i64) + body;
        if total > BATCH_BYTES_MAX || body > i32::MAX as usize {
            return Err(Error::RecordTooLarge {
                bytes: total,
                bytes_max: BATCH_BYTES_MAX,
            });
        }
        let before = self.buf.len();
        let buf = &mut self.buf;
        varint::put(buf, body as i64);
        buf.put_i8(0);
        varint::put(buf, timestamp_delta);
        varint::put(buf, offset_delta);
        put_bytes(buf, key);
        put_bytes(buf, value);
        varint::put(buf, headers.len() as i64);
        for (header_key, header_value) in headers {
            put_bytes(buf, Some(header_key.as_bytes()));
            put_bytes(buf, header_value.as_deref());
        }
        debug_assert_eq!(self.buf.len(), total, "record size computed wrongly");
        debug_assert!(self.buf.len() > before);
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let index = self.record_count;
        self.record_count += 1;
        Ok(index)
    }

    /// Fills in the header and returns the finished frame (not idempotent:
    /// producer id, epoch and base sequence -1). Fails on an empty batch.
    pub fn finish(self) -> Result<Bytes> {
        self.finish_stamped(None)
    }

    /// Fills in the header, with the idempotence fields of `stamp` (or -1 for
    /// all three), and returns the finished frame. The fields lie inside the
    /// payload CRC's range, so they are written before it is computed. Fails on
    /// an empty batch.
    pub fn finish_stamped(mut self, stamp: Option<ProducerStamp>) -> Result<Bytes> {
        if self.record_count == 0 {
            return Err(Error::InvalidArgument(
                "a batch needs at least one record".into(),
            ));
        }
        let (mut frame, codec, records_bytes) = self.compressed()?;
        let buf = frame.bytes_mut();
        let frame_bytes = u32::try_from(buf.len()).map_err(|_| Error::RecordTooLarge {
            bytes: buf.len(),
            bytes_max: BATCH_BYTES_MAX,
        })?;
        let header = &mut buf[..HEADER_BYTES];
        write_u32(header, 0, batch::MAGIC);
        write_u32(header, batch::FRAME_BYTES_OFFSET, frame_bytes);
        header[batch::FORMAT_VERSION_OFFSET..][..2]
            .copy_from_slice(&batch::FORMAT_VERSION.to_le_bytes());
        header[batch::ATTRIBUTES_OFFSET..][..2]
            .copy_from_slice(&codec.attribute_bits().to_le_bytes());
        write_u32(header, batch::RECORDS_BYTES_OFFSET, records_bytes);
        write_u32(header, batch::RECORD_COUNT_OFFSET, self.record_count);
        write_u32(
            header,
            batch::LAST_OFFSET_DELTA_OFFSET,
            self.record_count - 1,
        );
        write_u64(
            header,
            batch::FIRST_TIMESTAMP_OFFSET,
            self.first_timestamp_ms as u64,
        );
        write_u64(
            header,
            batch::MAX_TIMESTAMP_OFFSET,
            self.max_timestamp_ms as u64,
        );
        let (producer_id, producer_epoch, base_sequence) = match stamp {
            Some(stamp) => (stamp.producer_id, stamp.producer_epoch, stamp.base_sequence),
            None => (-1, -1, -1),
        };
        write_u64(header, batch::PRODUCER_ID_OFFSET, producer_id as u64);
        header[batch::PRODUCER_EPOCH_OFFSET..][..2].copy_from_slice(&producer_epoch.to_le_bytes());
        write_u32(header, batch::BASE_SEQUENCE_OFFSET, base_sequence as u32);
        let crc = crc32fast::hash(&buf[batch::PAYLOAD_CRC_START..]);
        write_u32(buf, batch::PAYLOAD_CRC_OFFSET, crc);
        Ok(match (frame, self.pool.take()) {
            (FrameBuf::Plain(buf), Some(pool)) => Bytes::from_owner(Pooled { buf, pool }),
            (frame, pool) => {
                // Compressed: the records went to a new buffer, and the
                // builder's own can be used again at once.
                if let Some(pool) = pool {
                    pool.put(std::mem::take(&mut self.buf));
                }
                frame.freeze()
            }
        })
    }

    /// The frame buffer (header not yet filled in), its codec and the
    /// `records_bytes` field: the records compressed into a new buffer, or the
    /// builder's own buffer when there is no codec or it does not shrink them.
    fn compressed(&mut self) -> Result<(FrameBuf, Compression, u32)> {
        let records = &self.buf[HEADER_BYTES..];
        if self.compression == Compression::None {
            let plain = FrameBuf::Plain(std::mem::take(&mut self.buf));
            return Ok((plain, Compression::None, 0));
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + records.len() / 2);
        out.resize(HEADER_BYTES, 0);
        self.compression
            .compress_into(records, &mut out)
            .map_err(|error| Error::InvalidArgument(format!("compression failed: {error}")))?;
        if out.len() >= self.buf.len() {
            let plain = FrameBuf::Plain(std::mem::take(&mut self.buf));
            return Ok((plain, Compression::None, 0));
        }
        let records_bytes = records.len() as u32;
        Ok((FrameBuf::Packed(out), self.compression, records_bytes))
    }
}

/// A finished frame's buffer: the builder's own, or a new one holding the
/// compressed records.
enum FrameBuf {
    Plain(BytesMut),
    Packed(Vec<u8>),
}

impl FrameBuf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            FrameBuf::Plain(buf) => buf,
            FrameBuf::Packed(buf) => buf,
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            FrameBuf::Plain(buf) => buf.freeze(),
            FrameBuf::Packed(buf) => Bytes::from(buf),
        }
    }
}

fn body_bytes_without_deltas(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
) -> usize {
    let mut bytes = 1 + bytes_field_len(key) + bytes_field_len(value);
    bytes += varint::encoded_len(headers.len() as i64);
    for (header_key, header_value) in headers {
        bytes +=
            bytes_field_len(Some(header_key.as_bytes())) + bytes_field_len(header_value.as_deref());
    }
    bytes
}

fn bytes_field_len(field: Option<&[u8]>) -> usize {
    match field {
        None => varint::encoded_len(-1),
        Some(data) => varint::encoded_len(data.len() as i64) + data.len(),
    }
}

fn put_bytes(buf: &mut BytesMut, field: Option<&[u8]>) {
    match field {
        None => varint::put(buf, -1),
        Some(data) => {
            varint::put(buf, data.len() as i64);
            buf.put_slice(data);
        }
    }
}

fn write_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn write_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&buf[at..at + 2]);
    u16::from_le_bytes(raw)
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// The decoded fixed header of a batch frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record (stamped by the broker).
    pub base_offset: u64,
    /// Leader epoch (stamped by the broker).
    pub leader_epoch: u32,
    /// Bytes of the whole frame.
    pub frame_bytes: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// Uncompressed bytes of a compressed batch's records (0 if uncompressed).
    pub records_bytes: u32,
    /// Records in the batch.
    pub record_count: u32,
    /// Offset delta of the last record.
    pub last_offset_delta: u32,
    /// Timestamp of the first record.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
    /// Payload CRC as stored.
    pub payload_crc: u32,
    /// Producer id of an idempotent producer, else -1.
    pub producer_id: i64,
    /// Producer epoch, else -1.
    pub producer_epoch: i16,
    /// Sequence of the first record in its partition, else -1.
    pub base_sequence: i32,
}

impl BatchHeader {
    /// Parses and checks a header (magic, version, lengths). `available` is the
    /// number of bytes present from the header start; the frame must fit in them.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader> {
        if buf.len() < HEADER_BYTES {
            return Err(invalid(format!(
                "{} bytes cannot hold an 80-byte batch header",
                buf.len()
            )));
        }
        let magic = read_u32(buf, 0);
        if magic != batch::MAGIC {
            return Err(invalid(format!("bad magic {magic:#010x}")));
        }
        let version = read_u16(buf, batch::FORMAT_VERSION_OFFSET);
        if version != batch::FORMAT_VERSION {
            return Err(invalid(format!(
                "unsupported batch format version {version}"
            )));
        }
        let header = BatchHeader {
            base_offset: read_u64(buf, batch::BASE_OFFSET_OFFSET),
            leader_epoch: read_u32(buf, batch::LEADER_EPOCH_OFFSET),
            frame_bytes: read_u32(buf, batch::FRAME_BYTES_OFFSET),
            attributes: read_u16(buf, batch::ATTRIBUTES_OFFSET),
            records_bytes: read_u32(buf, batch::RECORDS_BYTES_OFFSET),
            record_count: read_u32(buf, batch::RECORD_COUNT_OFFSET),
            last_offset_delta: read_u32(buf, batch::LAST_OFFSET_DELTA_OFFSET),
            first_timestamp_ms: read_u64(buf, batch::FIRST_TIMESTAMP_OFFSET) as i64,
            max_timestamp_ms: read_u64(buf, batch::MAX_TIMESTAMP_OFFSET) as i64,
            payload_crc: read_u32(buf, batch::PAYLOAD_CRC_OFFSET),
            producer_id: read_u64(buf, batch::PRODUCER_ID_OFFSET) as i64,
            producer_epoch: read_u16(buf, batch::PRODUCER_EPOCH_OFFSET) as i16,
            base_sequence: read_u32(buf, batch::BASE_SEQUENCE_OFFSET) as i32,
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<()> {
        let frame_bytes = self.frame_bytes as usize;
        if !(HEADER_BYTES..=BATCH_BYTES_MAX).contains(&frame_bytes) {
            return Err(invalid(format!("frame_bytes {frame_bytes} out of range")));
        }
        if self.record_count == 0 || self.record_count > batch::RECORDS_MAX {
            return Err(invalid(format!(
                "record_count {} out of range",
                self.record_count
            )));
        }
        if self.last_offset_delta != self.record_count - 1 {
            return Err(invalid(format!(
                "last_offset_delta {} does not match record_count {}",
                self.last_offset_delta, self.record_count
            )));
        }
        let records_bytes_ok = match Compression::from_attributes(self.attributes) {
            Some(Compression::None) => self.records_bytes == 0,
            Some(_) => (1..=RECORDS_BYTES_MAX).contains(&(self.records_bytes as usize)),
            None => {
                return Err(invalid(format!(
                    "unknown compression in attributes {:#x}",
                    self.attributes
                )))
            }
        };
        if !records_bytes_ok {
            return Err(invalid(format!(
                "records_bytes {} does not fit the codec of attributes {:#x}",
                self.records_bytes, self.attributes
            )));
        }
        Ok(())
    }

    /// The batch's compression codec.
    pub fn compression(&self) -> Compression {
        Compression::from_attributes(self.attributes).unwrap_or_default()
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.last_offset_delta))
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.last_offset().saturating_add(1)
    }

    /// `true` for a control batch (its records are not user data).
    pub fn is_control(&self) -> bool {
        self.attributes & batch::ATTRIBUTE_CONTROL != 0
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidBatch(message)
}

/// One verified batch frame (a zero-copy slice of a fetch response).
#[derive(Debug, Clone)]
pub struct Batch {
    /// The parsed header.
    pub header: BatchHeader,
    /// The whole frame, header included.
    pub frame: Bytes,
}

impl Batch {
    /// Checks the header and the payload CRC of one whole frame.
    pub fn verify(frame: Bytes) -> Result<Batch> {
        let header = BatchHeader::parse(&frame)?;
        if header.frame_bytes as usize != frame.len() {
            return Err(invalid(format!(
                "frame_bytes {} but {} bytes given",
                header.frame_bytes,
                frame.len()
            )));
        }
        let crc = crc32fast::hash(&frame[batch::PAYLOAD_CRC_START..]);
        if crc != header.payload_crc {
            return Err(Error::CorruptBatch(format!(
                "payload crc {crc:#010x} does not match stored {:#010x} (batch at offset {})",
                header.payload_crc, header.base_offset
            )));
        }
        Ok(Batch { header, frame })
    }

    /// The records of this batch.
    pub fn records(&self) -> RecordIter {
        RecordIter::new(self)
    }
}

/// Splits a byte range holding whole batch frames back to back into verified
/// [`Batch`]es.
#[derive(Debug)]
pub struct BatchIter {
    data: Bytes,
    failed: bool,
}

impl BatchIter {
    /// Iterates the batches in `data`.
    pub fn new(data: Bytes) -> BatchIter {
        BatchIter {
            data,
            failed: false,
        }
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.data.is_empty() || self.failed {
            return None;
        }
        let result = next_frame(&mut self.data).and_then(Batch::verify);
        self.failed = result.is_err();
        Some(result)
    }
}

fn next_frame(data: &mut Bytes) -> Result<Bytes> {
    let header = BatchHeader::parse(data)?;
    let frame_bytes = header.frame_bytes as usize;
    if frame_bytes > data.len() {
        return Err(invalid(format!(
            "batch of {frame_bytes} bytes truncated to {} bytes",
            data.len()
        )));
    }
    Ok(data.split_to(frame_bytes))
}

/// One decoded record. `key`, `value` and header values are slices of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset (`base_offset + offset_delta`).
    pub offset: u64,
    /// Absolute timestamp (`first_timestamp_ms + timestamp_delta`).
    pub timestamp_ms: i64,
    /// Key, `None` for a null key.
    pub key: Option<Bytes>,
    /// Value, `None` for a null value (tombstone).
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<Header>,
}

/// Decodes the records of one batch, checking every length.
#[derive(Debug)]
pub struct RecordIter {
    data: Bytes,
    pos: usize,
    remaining: u32,
    header: BatchHeader,
    failed: bool,
    /// Why the records cannot be decoded at all (reported once, first).
    error: Option<Error>,
}

impl RecordIter {
    fn new(batch: &Batch) -> RecordIter {
        let mut iter = RecordIter {
            data: batch.frame.clone(),
            pos: HEADER_BYTES,
            remaining: batch.header.record_count,
            header: batch.header,
            failed: false,
            error: None,
        };
        let codec = batch.header.compression();
        if codec != Compression::None {
            // Decompressed once; keys and values are slices of the result.
            let block = &batch.frame[HEADER_BYTES..];
            match codec.decompress(block, batch.header.records_bytes as usize) {
                Ok(records) => {
                    iter.data = Bytes::from(records);
                    iter.pos = 0;
                }
                Err(error) => {
                    iter.error = Some(invalid(format!(
                        "batch at offset {}: {codec} block does not decode: {error}",
                        batch.header.base_offset
                    )));
                }
            }
        }
        iter
    }

    fn decode(&mut self) -> Result<Record> {
        let length =
            varint::get_i32(&self.data, &mut self.pos).ok_or_else(|| truncated("record length"))?;
        let length = usize::try_from(length)
            .map_err(|_| invalid(format!("negative record length {length}")))?;
        let end = self
            .pos
            .checked_add(length)
            .filter(|end| *end <= self.data.len());
        let end = end.ok_or_else(|| truncated("record body"))?;
        let mut cursor = Cursor {
            data: self.data.slice(..end),
            pos: self.pos,
        };
        let record = cursor.record(&self.header)?;
        if cursor.pos != end {
            return Err(invalid(format!(
                "record has {} unread bytes",
                end - cursor.pos
            )));
        }
        self.pos = end;
        Ok(record)
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        if let Some(error) = self.error.take() {
            self.failed = true;
            return Some(Err(error));
        }
        if self.remaining == 0 {
            if self.pos != self.data.len() {
                self.failed = true;
                return Some(Err(invalid("bytes after the last record".into())));
            }
            return None;
        }
        self.remaining -= 1;
        let result = self.decode();
        self.failed = result.is_err();
        Some(result)
    }
}

fn truncated(what: &str) -> Error {
    invalid(format!("{what} runs past the end of the batch"))
}

struct Cursor {
    data: Bytes,
    pos: usize,
}

impl Cursor {
    fn record(&mut self, header: &BatchHeader) -> Result<Record> {
        let _attributes = self.byte()?;
        let timestamp_delta =
            varint::get_i64(&self.data, &mut self.pos).ok_or_else(|| truncated("timestamp"))?;
        let offset_delta =
            varint::get_i32(&self.data, &mut self.pos).ok_or_else(|| truncated("offset delta"))?;
        let offset_delta = u32::try_from(offset_delta)
            .ok()
            .filter(|delta| *delta <= header.last_offset_delta)
            .ok_or_else(|| invalid(format!("offset delta {offset_delta} out of range")))?;
        let key = self.bytes_field("key")?;
        let value = self.bytes_field("value")?;
        let headers = self.headers()?;
        Ok(Record {
            offset: header.base_offset.saturating_add(u64::from(offset_delta)),
            timestamp_ms: header.first_timestamp_ms.wrapping_add(timestamp_delta),
            key,
            value,
            headers,
        })
    }

    fn byte(&mut self) -> Result<u8> {
        let byte = *self
            .data
            .get(self.pos)
            .ok_or_else(|| truncated("attributes"))?;
        self.pos += 1;
        Ok(byte)
    }

    fn bytes_field(&mut self, what: &str) -> Result<Option<Bytes>> {
        let length = varint::get_i32(&self.data, &mut self.pos).ok_or_else(|| truncated(what))?;
        if length == -1 {
            return Ok(None);
        }
        let length =
            usize::try_from(length).map_err(|_| invalid(format!("{what} length {length}")))?;
        let end = self
            .pos
            .checked_add(length)
            .filter(|end| *end <= self.data.len());
        let end = end.ok_or_else(|| truncated(what))?;
        let field = self.data.slice(self.pos..end);
        self.pos = end;
        Ok(Some(field))
    }

    fn headers(&mut self) -> Result<Vec<Header>> {
        let count =
            varint::get_i32(&self.data, &mut self.pos).ok_or_else(|| truncated("header count"))?;
        let count = usize::try_from(count).map_err(|_| invalid(format!("header count {count}")))?;
        // Each header takes at least two bytes: bound the allocation by the input.
        if count > (self.data.len() - self.pos) / 2 {
            return Err(truncated("headers"));
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let key = self
                .bytes_field("header key")?
                .ok_or_else(|| invalid("null header key".into()))?;
            let key = String::from_utf8(key.to_vec())
                .map_err(|_| invalid("header key is not UTF-8".into()))?;
            let value = self.bytes_field("header value")?;
            headers.push((key, value));
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(frame: &Bytes, base_offset: u64) -> Bytes {
        let mut copy = BytesMut::from(&frame[..]);
        write_u64(&mut copy, batch::BASE_OFFSET_OFFSET, base_offset);
        copy.freeze()
    }

    fn sample() -> Bytes {
        let mut builder = BatchBuilder::with_capacity(1024);
        builder.append(1000, Some(b"k1"), Some(b"v1"), &[]).unwrap();
        let headers = vec![
            ("h".to_string(), Some(Bytes::from_static(b"x"))),
            ("n".to_string(), None),
        ];
        builder.append(999, None, None, &headers).unwrap();
        builder.append(1005, Some(b""), Some(b"v3"), &[]).unwrap();
        builder.finish().unwrap()
    }

    #[test]
    fn compressed_batches_round_trip_and_incompressible_ones_go_plain() {
        let text: Vec<Vec<u8>> = (0..300)
            .map(|i| format!("{{\"user\":{},\"action\":\"click\"}}", i % 17).into_bytes())
            .collect();
        for codec in Compression::ALL {
            let mut builder = BatchBuilder::with_capacity(1024);
            for (i, value) in text.iter().enumerate() {
                builder
                    .append(1000 + i as i64, Some(b"k"), Some(value), &[])
                    .unwrap();
            }
            let plain_bytes = builder.bytes();
            builder.set_compression(codec);
            let frame = stamp(&builder.finish().unwrap(), 7);
            let batch = Batch::verify(frame.clone()).unwrap();
            assert_eq!(batch.header.compression(), codec);
            if codec == Compression::None {
                assert_eq!(frame.len(), plain_bytes);
                assert_eq!(batch.header.records_bytes, 0);
            } else {
                assert!(frame.len() * 3 < plain_bytes, "{codec}: {}", frame.len());
                assert_eq!(
                    batch.header.records_bytes as usize,
                    plain_bytes - HEADER_BYTES
                );
            }
            let records: Vec<Record> = batch.records().collect::<Result<_>>().unwrap();
            assert_eq!(records.len(), text.len());
            for (i, record) in records.iter().enumerate() {
                assert_eq!(record.offset, 7 + i as u64);
                assert_eq!(record.timestamp_ms, 1000 + i as i64);
                assert_eq!(record.value.as_deref(), Some(&text[i][..]));
            }
        }
        // Random bytes do not shrink: the batch goes out uncompressed.
        let mut builder = BatchBuilder::with_capacity(1024);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        builder.append(1, None, Some(&noise), &[]).unwrap();
        builder.set_compression(Compression::Lz4);
        let batch = Batch::verify(builder.finish().unwrap()).unwrap();
        assert_eq!(batch.header.compression(), Compression::None);
        assert_eq!(
            batch.records().next().unwrap().unwrap().value.unwrap(),
            noise
        );
    }

    #[test]
    fn a_compressed_block_that_does_not_decode_is_an_error_of_its_batch() {
        let mut builder = BatchBuilder::with_capacity(1024);
        for _ in 0..50 {
            builder
                .append(1, None, Some(b"the same value again"), &[])
                .unwrap();
        }
        builder.set_compression(Compression::Zstd);
        let mut frame = BytesMut::from(&builder.finish().unwrap()[..]);
        let end = frame.len();
        frame[end - 3] ^= 0xff;
        let crc = crc32fast::hash(&frame[batch::PAYLOAD_CRC_START..]);
        write_u32(&mut frame, batch::PAYLOAD_CRC_OFFSET, crc);
        let batch = Batch::verify(frame.freeze()).unwrap();
        let mut records = batch.records();
        let error = records.next().unwrap().unwrap_err();
        assert!(matches!(error, Error::InvalidBatch(_)), "{error}");
        assert!(records.next().is_none());
    }

    #[test]
    fn a_pooled_frame_gives_its_buffer_back_when_its_last_reference_goes() {
        let pool = BufferPool::new(2);
        let mut builder = BatchBuilder::pooled(&pool, 4096);
        builder.append(1, None, Some(b"value"), &[]).unwrap();
        let frame = builder.finish().unwrap();
        let copy = frame.clone();
        assert_eq!(pool.kept(), 0);
        drop(frame);
        assert_eq!(pool.kept(), 0, "a reference is still out");
        let batch = Batch::verify(stamp(&copy, 7)).unwrap();
        assert_eq!(batch.records().count(), 1);
        drop(copy);
        assert_eq!(pool.kept(), 1);
        // The next builder builds in it, from empty.
        let mut builder = BatchBuilder::pooled(&pool, 4096);
        assert_eq!(pool.kept(), 0);
        assert_eq!(builder.bytes(), HEADER_BYTES);
        builder.append(2, None, Some(b"other"), &[]).unwrap();
        let frame = builder.finish().unwrap();
        let batch = Batch::verify(stamp(&frame, 0)).unwrap();
        let values: Vec<_> = batch.records().map(|r| r.unwrap().value).collect();
        assert_eq!(values, vec![Some(Bytes::from_static(b"other"))]);
        // A compressed frame lives in its own buffer: the builder's goes back
        // at once.
        drop(frame);
        let mut builder = BatchBuilder::pooled(&pool, 4096);
        builder.set_compression(Compression::Lz4);
        for _ in 0..50 {
            builder.append(3, None, Some(&[b'a'; 100]), &[]).unwrap();
        }
        let kept = pool.kept();
        let frame = builder.finish().unwrap();
        assert_eq!(
            BatchHeader::parse(&frame).unwrap().compression(),
            Compression::Lz4
        );
        assert_eq!(pool.kept(), kept + 1);
        // It keeps no more than it was told.
        let frames: Vec<Bytes> = (0..4)
            .map(|_| {
                let mut builder = BatchBuilder::pooled(&pool, 4096);
                builder.append(4, None, Some(b"x"), &[]).unwrap();
                builder.finish().unwrap()
            })
            .collect();
        drop(frames);
        assert_eq!(pool.kept(), 2);
    }

    #[test]
    fn roundtrip_with_stamped_offset() {
        let frame = stamp(&sample(), 40);
        let batch = Batch::verify(frame).unwrap();
        assert_eq!(batch.header.record_count, 3);
        assert_eq!(batch.header.max_timestamp_ms, 1005);
        let records: Vec<Record> = batch.records().collect::<Result<_>>().unwrap();
        assert_eq!(records[0].offset, 40);
        assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(records[1].timestamp_ms, 999);
        assert_eq!(records[1].key, None);
        assert_eq!(records[1].headers[0].0, "h");
        assert_eq!(records[1].headers[1].1, None);
        assert_eq!(records[2].offset, 42);
        assert_eq!(records[2].key.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn header_fields_as_specified() {
        let frame = sample();
        assert_eq!(read_u32(&frame, 0), batch::MAGIC);
        assert_eq!(
            read_u32(&frame, batch::FRAME_BYTES_OFFSET) as usize,
            frame.len()
        );
        assert_eq!(read_u32(&frame, batch::LAST_OFFSET_DELTA_OFFSET), 2);
        assert_eq!(read_u64(&frame, batch::PRODUCER_ID_OFFSET) as i64, -1);
        assert_eq!(read_u16(&frame, batch::PRODUCER_EPOCH_OFFSET) as i16, -1);
        assert_eq!(read_u32(&frame, batch::BASE_SEQUENCE_OFFSET) as i32, -1);
        assert_eq!(read_u32(&frame, batch::HEADER_CRC_OFFSET), 0);
        assert_eq!(read_u64(&frame, batch::BASE_OFFSET_OFFSET), 0);
    }

    #[test]
    fn idempotence_fields_are_stamped_inside_the_crc() {
        let mut builder = BatchBuilder::with_capacity(256);
        builder.append(1, Some(b"k"), Some(b"v"), &[]).unwrap();
        builder.append(2, None, Some(b"w"), &[]).unwrap();
        let stamp = ProducerStamp {
            producer_id: 0x0123_4567_89ab,
            producer_epoch: 3,
            base_sequence: 40,
        };
        let frame = builder.finish_stamped(Some(stamp)).unwrap();
        assert_eq!(
            read_u64(&frame, batch::PRODUCER_ID_OFFSET),
            0x0123_4567_89ab
        );
        assert_eq!(read_u16(&frame, batch::PRODUCER_EPOCH_OFFSET), 3);
        assert_eq!(read_u32(&frame, batch::BASE_SEQUENCE_OFFSET), 40);
        let batch = Batch::verify(frame.clone()).unwrap();
        assert_eq!(batch.header.producer_id, 0x0123_4567_89ab);
        assert_eq!(batch.header.producer_epoch, 3);
        assert_eq!(batch.header.base_sequence, 40);
        // Changing a stamped field breaks the CRC: the fields are covered by it.
        let mut copy = BytesMut::from(&frame[..]);
        copy[batch::BASE_SEQUENCE_OFFSET] ^= 1;
        assert!(matches!(
            Batch::verify(copy.freeze()),
            Err(Error::CorruptBatch(_))
        ));
        let plain = Batch::verify(sample()).unwrap();
        assert_eq!(
            (
                plain.header.producer_id,
                plain.header.producer_epoch,
                plain.header.base_sequence
            ),
            (-1, -1, -1)
        );
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(next_sequence(0, 5), 5);
        assert_eq!(next_sequence(i32::MAX - 4, 5), 0);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 5), 3);
        assert_eq!(next_sequence(7, 0), 7);
    }

    #[test]
    fn record_bytes_match_the_documented_example() {
        let mut builder = BatchBuilder::with_capacity(128);
        builder.append(5, Some(b"k"), Some(b"v"), &[]).unwrap();
        let frame = builder.finish().unwrap();
        assert_eq!(
            &frame[HEADER_BYTES..],
            [0x10, 0, 0, 0, 0x02, b'k', 0x02, b'v', 0]
        );
    }

    #[test]
    fn crc_mismatch_is_corrupt() {
        let mut copy = BytesMut::from(&sample()[..]);
        let last = copy.len() - 1;
        copy[last] ^= 0xff;
        assert!(matches!(
            Batch::verify(copy.freeze()),
            Err(Error::CorruptBatch(_))
        ));
    }

    #[test]
    fn bad_magic_and_truncation() {
        let mut copy = BytesMut::from(&sample()[..]);
        copy[0] = b'X';
        assert!(matches!(
            Batch::verify(copy.freeze()),
            Err(Error::InvalidBatch(_))
        ));
        let frame = sample();
        let mut iter = BatchIter::new(frame.slice(..frame.len() - 1));
        assert!(matches!(iter.next(), Some(Err(Error::InvalidBatch(_)))));
        assert!(iter.next().is_none());
    }

    #[test]
    fn two_batches_back_to_back() {
        let mut data = BytesMut::new();
        data.extend_from_slice(&stamp(&sample(), 0));
        data.extend_from_slice(&stamp(&sample(), 3));
        let batches: Vec<Batch> = BatchIter::new(data.freeze())
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1].header.base_offset, 3);
    }

    /// Re-seals a tampered frame (fixing its CRC) so record decoding is exercised.
    fn reseal(mut frame: BytesMut) -> Bytes {
        let crc = crc32fast::hash(&frame[batch::PAYLOAD_CRC_START..]);
        write_u32(&mut frame, batch::PAYLOAD_CRC_OFFSET, crc);
        frame.freeze()
    }

    proptest! {
        #[test]
        fn roundtrip_any(records in proptest::collection::vec(
            (any::<i32>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
             proptest::collection::vec(("[a-z]{0,5}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))), 0..3)),
            1..30)) {
            let mut builder = BatchBuilder::with_capacity(64);
            for (ts, key, value, headers) in &records {
                let headers: Vec<Header> = headers.iter().map(|(k, v)| (k.clone(), v.clone().map(Bytes::from))).collect();
                let bound = BatchBuilder::record_bytes_max(key.as_deref(), value.as_deref(), &headers);
                let before = builder.bytes();
                builder.append(i64::from(*ts), key.as_deref(), value.as_deref(), &headers).unwrap();
                prop_assert!(builder.bytes() - before <= bound);
            }
            let batch = Batch::verify(builder.finish().unwrap()).unwrap();
            let decoded: Vec<Record> = batch.records().collect::<Result<_>>().unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (index, (record, (ts, key, value, headers))) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(record.offset, index as u64);
                prop_assert_eq!(record.timestamp_ms, i64::from(*ts));
                prop_assert_eq!(record.key.as_deref(), key.as_deref());
                prop_assert_eq!(record.value.as_deref(), value.as_deref());
                prop_assert_eq!(record.headers.len(), headers.len());
            }
        }

        #[test]
        fn mutated_batches_never_panic(position in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
            let frame = sample();
            let mut copy = BytesMut::from(&frame[..]);
            let at = position % copy.len();
            copy[at] = byte;
            let cut = cut.min(copy.len() - HEADER_BYTES);
            let len = copy.len() - cut;
            write_u32(&mut copy, batch::FRAME_BYTES_OFFSET, len as u32);
            copy.truncate(len);
            let sealed = reseal(copy);
            for batch in BatchIter::new(sealed).flatten() {
                let _ = batch.records().count();
            }
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            for batch in BatchIter::new(Bytes::from(data)) {
                let _ = batch.map(|batch| batch.records().count());
            }
        }
    }
}
