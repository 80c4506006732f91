//! Per-partition log state and index: which offsets exist and where their batches are.
//!
//! The index is a list of *runs*. A run covers consecutive batches of one log
//! (contiguous offsets) inside one segment; it starts at its first batch and spans at
//! most `INDEX_SPAN_BYTES_MAX` bytes of the WAL to the end of its last batch. Other
//! logs' batches may lie in between (the WAL interleaves a shard's partitions), so a
//! disk read of a run reads its span and keeps the frames of its log. A read finds
//! the run holding an offset with a binary search.
//!
//! Merging runs across writes keeps the index small: a partition costs at most one
//! entry per `INDEX_SPAN_BYTES_MAX` of WAL that holds its data, instead of one per
//! write (see docs/storage.md, "Index memory").

use std::collections::VecDeque;

use crate::limits::INDEX_SPAN_BYTES_MAX;
use crate::types::{Offset, SegmentId};

/// A position in a shard's WAL: segment id in the high 32 bits, byte in the low 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WalPosition(pub u64);

impl WalPosition {
    /// Builds a position.
    pub fn new(segment: SegmentId, byte: u64) -> Self {
        debug_assert!(byte <= u64::from(u32::MAX));
        WalPosition((u64::from(segment.0) << 32) | byte)
    }
    /// The segment.
    pub fn segment(self) -> SegmentId {
        SegmentId((self.0 >> 32) as u32)
    }
    /// The byte within the segment.
    pub fn byte(self) -> u64 {
        self.0 & 0xffff_ffff
    }
}

/// Consecutive batches of one log in one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset of the first record of the first batch.
    pub base_offset: Offset,
    /// Offset of the last record of the last batch.
    pub last_offset: Offset,
    /// Where the first batch starts.
    pub position: WalPosition,
    /// Bytes of this log's batches in the run.
    pub bytes: u32,
    /// WAL bytes from `position` to the end of the last batch (`>= bytes`; equal
    /// when no other log's batch lies in between).
    pub span: u32,
    /// Largest record timestamp in the run.
    pub max_timestamp_ms: i64,
}

impl Run {
    /// One past the last byte of the last batch.
    pub fn end(&self) -> WalPosition {
        WalPosition(self.position.0 + u64::from(self.span))
    }
}

/// One partition log's state inside its shard's WAL.
#[derive(Debug, Default, Clone)]
pub struct LogState {
    /// First offset still stored (advanced by retention).
    pub log_start: Offset,
    /// Offset the next appended record gets (appended, not necessarily durable).
    pub next_offset: Offset,
    /// Every offset below this is durable and may be served.
    pub high_watermark: Offset,
    /// Runs in offset order.
    pub runs: VecDeque<Run>,
    /// Bytes of the runs (all stored batches at or above `log_start`'s run).
    pub stored_bytes: u64,
    /// Largest record timestamp seen.
    pub max_timestamp_ms: i64,
}

impl LogState {
    /// Records a batch written at `position` (after its write completed). It joins
    /// the last run when it continues that run's offsets in the same segment and the
    /// run's span stays within `INDEX_SPAN_BYTES_MAX`.
    pub fn push(
        &mut self,
        base_offset: Offset,
        last_offset: Offset,
        position: WalPosition,
        bytes: u32,
        max_ts: i64,
    ) {
        debug_assert!(last_offset >= base_offset);
        self.stored_bytes += u64::from(bytes);
        self.max_timestamp_ms = self.max_timestamp_ms.max(max_ts);
        let end = position.0 + u64::from(bytes);
        if let Some(last) = self.runs.back_mut() {
            let joins = last.position.segment() == position.segment()
                && last.end() <= position
                && last.last_offset + 1 == base_offset
                && end - last.position.0 <= u64::from(INDEX_SPAN_BYTES_MAX);
            if joins {
                last.last_offset = last_offset;
                last.bytes += bytes;
                last.span = (end - last.position.0) as u32;
                last.max_timestamp_ms = last.max_timestamp_ms.max(max_ts);
                return;
            }
        }
        self.runs.push_back(Run {
            base_offset,
            last_offset,
            position,
            bytes,
            span: bytes,
            max_timestamp_ms: max_ts,
        });
    }

    /// Index of the run that holds `offset`, or the first run after it.
    pub fn find(&self, offset: Offset) -> Option<usize> {
        let index = self.runs.partition_point(|run| run.last_offset < offset);
        (index < self.runs.len()).then_some(index)
    }

    /// First offset whose batch has a timestamp >= `timestamp_ms` (Kafka's
    /// ListOffsets by time uses each batch's max timestamp the same way). Runs are
    /// the granularity: the offset returned is the start of the first run with a
    /// timestamp that recent, so it may lie before the first such batch.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Option<(Offset, i64)> {
        self.runs
            .iter()
            .find(|run| run.max_timestamp_ms >= timestamp_ms && run.last_offset >= self.log_start)
            .filter(|run| run.base_offset < self.high_watermark)
            .map(|run| (run.base_offset.max(self.log_start), run.max_timestamp_ms))
    }

    /// Moves the log start up to `offset` (never down, never past the high
    /// watermark) and drops runs wholly below it.
    pub fn advance_start(&mut self, offset: Offset) {
        let offset = offset.min(self.high_watermark);
        if offset <= self.log_start {
            return;
        }
        self.log_start = offset;
        while let Some(run) = self.runs.front() {
            if run.last_offset >= offset {
                break;
            }
            self.stored_bytes -= u64::from(run.bytes);
            self.runs.pop_front();
        }
    }

    /// Drops runs at or above `offset` (used when an append fails before anything of
    /// it became durable; such runs were pushed by the failed append alone, so a run
    /// never straddles `offset`).
    pub fn truncate_from(&mut self, offset: Offset) {
        while let Some(run) = self.runs.back() {
            if run.base_offset < offset {
                debug_assert!(run.last_offset < offset, "a run straddles a rollback");
                break;
            }
            self.stored_bytes -= u64::from(run.bytes);
            self.runs.pop_back();
        }
        self.next_offset = self.next_offset.min(offset);
    }

    /// Bytes of index memory this log uses (for the index-size measurements).
    pub fn index_bytes(&self) -> usize {
        self.runs.len() * std::mem::size_of::<Run>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(byte: u64) -> WalPosition {
        WalPosition::new(SegmentId(1), byte)
    }

    #[test]
    fn runs_merge_across_writes_within_the_span_limit() {
        let mut log = LogState::default();
        // Batches of 1 KiB every 4 KiB of WAL (other logs in between).
        for i in 0..1024u64 {
            log.push(i * 10, i * 10 + 9, at(4096 + i * 4096), 1024, i as i64);
        }
        // 4 MiB of WAL at 1 MiB per run.
        assert_eq!(log.runs.len(), 4);
        assert!(log.runs.iter().all(|r| r.span <= INDEX_SPAN_BYTES_MAX));
        assert_eq!(log.stored_bytes, 1024 * 1024);
        assert_eq!(log.find(5000), Some(1));
        let run = log.runs[1];
        assert!(run.base_offset <= 5000 && 5000 <= run.last_offset);
    }

    #[test]
    fn runs_do_not_merge_across_segments_or_offset_gaps() {
        let mut log = LogState::default();
        log.push(0, 9, at(4096), 100, 0);
        log.push(10, 19, WalPosition::new(SegmentId(2), 4096), 100, 0);
        log.push(25, 29, WalPosition::new(SegmentId(2), 4196), 100, 0);
        assert_eq!(log.runs.len(), 3);
    }
}
