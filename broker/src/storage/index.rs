//! Per-partition log state and index: which offsets exist and where their batches are.
//!
//! The index is a list of *runs*: batches of one log that sit back to back in the
//! WAL, written by the same write. A read finds the run holding its offset with a
//! binary search and walks the frames inside it. Runs are capped at
//! `INDEX_RUN_BYTES_MAX`, which bounds the bytes a read from the middle of a run
//! must skip.

use std::collections::VecDeque;

use crate::limits::INDEX_RUN_BYTES_MAX;
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

/// Consecutive batches of one log, contiguous in one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset of the first record of the first batch.
    pub base_offset: Offset,
    /// Offset of the last record of the last batch.
    pub last_offset: Offset,
    /// Where the first batch starts.
    pub position: WalPosition,
    /// Bytes of all the batches.
    pub bytes: u32,
    /// Largest record timestamp in the run.
    pub max_timestamp_ms: i64,
}

impl Run {
    /// One past the last byte.
    pub fn end(&self) -> WalPosition {
        WalPosition(self.position.0 + u64::from(self.bytes))
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
    /// Timestamp index: running maximum of `max_timestamp_ms` up to each run is
    /// derived on demand; kept here is the largest seen.
    pub max_timestamp_ms: i64,
}

impl LogState {
    /// Records a batch written at `position` (after it was laid out in a write).
    pub fn push(
        &mut self,
        base_offset: Offset,
        last_offset: Offset,
        position: WalPosition,
        bytes: u32,
        max_ts: i64,
        same_write: bool,
    ) {
        debug_assert!(last_offset >= base_offset);
        self.stored_bytes += u64::from(bytes);
        self.max_timestamp_ms = self.max_timestamp_ms.max(max_ts);
        if same_write {
            if let Some(last) = self.runs.back_mut() {
                if last.end() == position
                    && last.last_offset + 1 == base_offset
                    && last.bytes + bytes <= INDEX_RUN_BYTES_MAX
                {
                    last.last_offset = last_offset;
                    last.bytes += bytes;
                    last.max_timestamp_ms = last.max_timestamp_ms.max(max_ts);
                    return;
                }
            }
        }
        self.runs.push_back(Run {
            base_offset,
            last_offset,
            position,
            bytes,
            max_timestamp_ms: max_ts,
        });
    }

    /// Index of the run that holds `offset`, or the first run after it.
    pub fn find(&self, offset: Offset) -> Option<usize> {
        let index = self.runs.partition_point(|run| run.last_offset < offset);
        (index < self.runs.len()).then_some(index)
    }

    /// First offset whose batch has a timestamp >= `timestamp_ms` (Kafka's
    /// ListOffsets by time uses each batch's max timestamp the same way).
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
    /// it became durable).
    pub fn truncate_from(&mut self, offset: Offset) {
        while let Some(run) = self.runs.back() {
            if run.base_offset < offset {
                break;
            }
            self.stored_bytes -= u64::from(run.bytes);
            self.runs.pop_back();
        }
        self.next_offset = self.next_offset.min(offset);
    }
}
