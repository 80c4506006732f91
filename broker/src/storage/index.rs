//! Per-partition log state and index: which offsets exist and where their batches are.
//!
//! The index is a list of *runs*. A run covers consecutive entry frames of one log
//! (contiguous offsets and, for a replicated log, contiguous Raft indexes) inside
//! one segment; it starts at its first frame and spans at most
//! `INDEX_SPAN_BYTES_MAX` bytes of the WAL to the end of its last frame. Other
//! logs' frames may lie in between (the WAL interleaves a shard's partitions), so a
//! disk read of a run reads its span and keeps the frames of its log. A read finds
//! the run holding an offset (or an index) with a binary search.
//!
//! Merging runs across writes keeps the index small: a partition costs at most one
//! entry per `INDEX_SPAN_BYTES_MAX` of WAL that holds its data, instead of one per
//! write (see docs/storage.md, "Index memory"). A replicated log merges only what
//! is committed: entries above the commit index may still be truncated (a
//! follower's conflicting suffix), so each keeps a run of its own until the commit
//! index passes it, and a truncation drops whole runs.

use std::collections::VecDeque;

use super::control::HardState;
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

/// Consecutive entry frames of one log in one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset of the first record of the first frame.
    pub base_offset: Offset,
    /// One past the offset of the last record (= `base_offset` when the run holds
    /// only control entries).
    pub end_offset: Offset,
    /// Raft index of the first frame (a plain log counts its frames from 1).
    pub first_index: u64,
    /// Entry frames in the run.
    pub entries: u32,
    /// Where the first frame starts.
    pub position: WalPosition,
    /// Bytes of this log's entry frames in the run.
    pub bytes: u32,
    /// WAL bytes from `position` to the end of the last frame (`>= bytes`).
    pub span: u32,
    /// Largest record timestamp in the run.
    pub max_timestamp_ms: i64,
    /// The run follows a truncation of its log: the truncated frames lie between
    /// it and the run before, so the two must never merge.
    pub after_truncation: bool,
}

impl Run {
    /// One past the last byte of the last frame.
    pub fn end(&self) -> WalPosition {
        WalPosition(self.position.0 + u64::from(self.span))
    }

    /// One past the Raft index of the last frame.
    pub fn end_index(&self) -> u64 {
        self.first_index + u64::from(self.entries)
    }
}

/// An entry frame written at a position, as the index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedFrame {
    /// First offset.
    pub base_offset: Offset,
    /// One past the last offset.
    pub end_offset: Offset,
    /// Raft index (plain logs: the frame's ordinal).
    pub index: u64,
    /// Its term (leader epoch).
    pub term: u64,
    /// Where it starts.
    pub position: WalPosition,
    /// Its bytes.
    pub bytes: u32,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
}

/// What a replicated log keeps beyond a plain one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replicated {
    /// Term of entry `first_index - 1` (raft-rs's `term(first_index - 1)`).
    pub start_term: u64,
    /// `(first index, term)` of every term among the written entries.
    pub terms: Vec<(u64, u64)>,
    /// The newest hard state written.
    pub hard_state: HardState,
    /// Entries at or below this index are committed (and may merge).
    pub commit_index: u64,
    /// One past the last offset of the last committed data entry.
    pub commit_offset: Offset,
    /// The next run may not merge with the last (a truncation came between).
    pub sealed: bool,
}

/// One partition log's state inside its shard's WAL.
#[derive(Debug, Clone)]
pub struct LogState {
    /// First offset still stored (advanced by retention).
    pub log_start: Offset,
    /// Offset the next appended record gets (queued, not necessarily written).
    pub next_offset: Offset,
    /// Raft index the next queued entry gets.
    pub next_index: u64,
    /// Reads may serve offsets below this: durable, and for a replicated log also
    /// committed.
    pub high_watermark: Offset,
    /// One past the last offset written and made durable.
    pub durable_end: Offset,
    /// Runs in offset order.
    pub runs: VecDeque<Run>,
    /// One past the index of the last entry frame written (recorded in `runs`).
    pub end_index: u64,
    /// One past the offset of the last entry frame written.
    pub end_offset: Offset,
    /// Bytes of the runs (all stored batches at or above `log_start`'s run).
    pub stored_bytes: u64,
    /// Largest record timestamp seen.
    pub max_timestamp_ms: i64,
    /// Set for a replicated log (a Raft group's).
    pub replicated: Option<Replicated>,
}

impl Default for LogState {
    /// A new, empty plain log (Raft indexes start at 1).
    fn default() -> LogState {
        LogState {
            log_start: 0,
            next_offset: 0,
            next_index: 1,
            high_watermark: 0,
            durable_end: 0,
            runs: VecDeque::new(),
            end_index: 1,
            end_offset: 0,
            stored_bytes: 0,
            max_timestamp_ms: 0,
            replicated: None,
        }
    }
}

impl LogState {
    /// A new, empty plain log.
    pub fn new() -> LogState {
        LogState::default()
    }

    /// A new, empty replicated log.
    pub fn new_replicated() -> LogState {
        LogState {
            replicated: Some(Replicated::default()),
            ..LogState::new()
        }
    }

    /// Index of the first entry still stored (`end_index` when none is).
    pub fn first_index(&self) -> u64 {
        self.runs.front().map_or(self.end_index, |r| r.first_index)
    }

    /// True when `index` is committed (plain logs: always).
    fn committed(&self, index: u64) -> bool {
        self.replicated
            .as_ref()
            .is_none_or(|r| index <= r.commit_index)
    }

    /// Records an entry frame written at `frame.position` (after its write
    /// completed). It joins the last run when it continues that run in the same
    /// segment within `INDEX_SPAN_BYTES_MAX`, and (replicated logs) both are
    /// committed and no truncation came between.
    pub fn push(&mut self, frame: IndexedFrame) {
        debug_assert!(frame.end_offset >= frame.base_offset);
        self.stored_bytes += u64::from(frame.bytes);
        self.max_timestamp_ms = self.max_timestamp_ms.max(frame.max_timestamp_ms);
        self.end_index = frame.index + 1;
        self.end_offset = frame.end_offset;
        let sealed = match self.replicated.as_mut() {
            Some(replicated) => {
                if replicated
                    .terms
                    .last()
                    .is_none_or(|(_, t)| *t != frame.term)
                {
                    replicated.terms.push((frame.index, frame.term));
                }
                std::mem::take(&mut replicated.sealed)
            }
            None => false,
        };
        let end = frame.position.0 + u64::from(frame.bytes);
        let committed = self.committed(frame.index);
        if let Some(last) = self.runs.back_mut() {
            if !sealed && committed && joins(last, &frame, end) {
                extend(last, &frame, end);
                return;
            }
        }
        self.runs.push_back(Run {
            base_offset: frame.base_offset,
            end_offset: frame.end_offset,
            first_index: frame.index,
            entries: 1,
            position: frame.position,
            bytes: frame.bytes,
            span: frame.bytes,
            max_timestamp_ms: frame.max_timestamp_ms,
            after_truncation: sealed,
        });
    }

    /// Index of the run that holds `offset`, or the first run after it.
    pub fn find(&self, offset: Offset) -> Option<usize> {
        let index = self.runs.partition_point(|run| run.end_offset <= offset);
        (index < self.runs.len()).then_some(index)
    }

    /// Index of the run that holds Raft index `index`.
    pub fn find_index(&self, index: u64) -> Option<usize> {
        let at = self.runs.partition_point(|run| run.end_index() <= index);
        (at < self.runs.len() && self.runs[at].first_index <= index).then_some(at)
    }

    /// First offset whose batch has a timestamp >= `timestamp_ms` (Kafka's
    /// ListOffsets by time uses each batch's max timestamp the same way). Runs are
    /// the granularity: the offset returned is the start of the first run with a
    /// timestamp that recent, so it may lie before the first such batch.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Option<(Offset, i64)> {
        self.runs
            .iter()
            .find(|run| {
                run.max_timestamp_ms >= timestamp_ms
                    && run.end_offset > self.log_start
                    && run.end_offset > run.base_offset
            })
            .filter(|run| run.base_offset < self.high_watermark)
            .map(|run| (run.base_offset.max(self.log_start), run.max_timestamp_ms))
    }

    /// Moves the log start up to `offset` (never down, never past the high
    /// watermark) and drops runs wholly below it (for a replicated log, only
    /// committed ones).
    pub fn advance_start(&mut self, offset: Offset) {
        let offset = offset.min(self.high_watermark);
        if offset <= self.log_start {
            return;
        }
        self.log_start = offset;
        while let Some(run) = self.runs.front() {
            if run.end_offset > offset || !self.committed(run.end_index() - 1) {
                break;
            }
            let dropped_last = run.end_index() - 1;
            self.stored_bytes -= u64::from(run.bytes);
            self.runs.pop_front();
            if let Some(replicated) = self.replicated.as_mut() {
                replicated.start_term =
                    term_at(&replicated.terms, dropped_last).unwrap_or(replicated.start_term);
                let first = self.runs.front().map_or(self.end_index, |r| r.first_index);
                while replicated.terms.len() > 1 && replicated.terms[1].0 <= first {
                    replicated.terms.remove(0);
                }
            }
        }
    }

    /// Drops runs at or above `offset` (used when an append fails before anything of
    /// it became durable; such runs were pushed by the failed append alone, so a run
    /// never straddles `offset`).
    pub fn truncate_from(&mut self, offset: Offset, index: u64) {
        while let Some(run) = self.runs.back() {
            if run.base_offset < offset {
                debug_assert!(run.end_offset <= offset, "a run straddles a rollback");
                break;
            }
            self.stored_bytes -= u64::from(run.bytes);
            self.end_index = run.first_index;
            self.end_offset = run.base_offset;
            self.runs.pop_back();
        }
        self.next_offset = self.next_offset.min(offset);
        self.next_index = self.next_index.min(index);
    }

    /// Drops the entries of a replicated log from Raft index `index` on (a
    /// follower's conflicting suffix, never committed ones); the next entry is
    /// `index` at `offset`. Whole runs go: uncommitted entries never share one.
    pub fn truncate_entries(&mut self, index: u64, offset: Offset) {
        while let Some(run) = self.runs.back() {
            if run.end_index() <= index {
                break;
            }
            debug_assert!(
                run.first_index >= index,
                "a truncation at index {index} splits a run from index {}",
                run.first_index
            );
            self.stored_bytes -= u64::from(run.bytes);
            self.runs.pop_back();
        }
        self.end_index = index;
        self.end_offset = offset;
        if let Some(replicated) = self.replicated.as_mut() {
            while replicated
                .terms
                .last()
                .is_some_and(|(first, _)| *first >= index)
            {
                replicated.terms.pop();
            }
            replicated.sealed = true;
        }
    }

    /// Drops every entry of a replicated log: it restarts at `index` and `offset`
    /// (a snapshot replaced it); `prev_term` is the term of `index - 1`.
    pub fn reset_entries(&mut self, index: u64, offset: Offset, prev_term: u64) {
        self.runs.clear();
        self.stored_bytes = 0;
        self.end_index = index;
        self.end_offset = offset;
        self.log_start = offset;
        self.high_watermark = self.high_watermark.max(offset);
        self.durable_end = self.durable_end.max(offset);
        if let Some(replicated) = self.replicated.as_mut() {
            replicated.terms.clear();
            replicated.start_term = prev_term;
            replicated.commit_index = replicated.commit_index.max(index.saturating_sub(1));
            replicated.commit_offset = replicated.commit_offset.max(offset);
            replicated.sealed = true;
        }
    }

    /// Moves a replicated log's commit point: entries up to `index` are committed,
    /// offsets below `offset` may be served once durable. Committed runs merge.
    pub fn set_commit(&mut self, index: u64, offset: Offset) {
        let Some(replicated) = self.replicated.as_mut() else {
            return;
        };
        if index <= replicated.commit_index && offset <= replicated.commit_offset {
            return;
        }
        replicated.commit_index = replicated.commit_index.max(index);
        replicated.commit_offset = replicated.commit_offset.max(offset);
        self.high_watermark = self
            .high_watermark
            .max(replicated.commit_offset.min(self.durable_end));
        self.fold();
    }

    /// Publishes durability up to `end` (offsets below it are on disk).
    pub fn set_durable(&mut self, end: Offset) {
        self.durable_end = self.durable_end.max(end);
        let servable = match &self.replicated {
            Some(replicated) => replicated.commit_offset.min(self.durable_end),
            None => self.durable_end,
        };
        self.high_watermark = self.high_watermark.max(servable);
    }

    /// After recovery: what was scanned is durable; recompute what may be served
    /// and merge what is committed.
    pub fn finish_recovery(&mut self) {
        self.durable_end = self.end_offset;
        self.next_offset = self.end_offset;
        self.next_index = self.end_index;
        self.set_durable(self.end_offset);
        self.fold();
    }

    /// Merges trailing runs that are now committed.
    pub(super) fn fold(&mut self) {
        let Some(commit) = self.replicated.as_ref().map(|r| r.commit_index) else {
            return;
        };
        // Uncommitted runs hold one entry each; walk back to the first of them.
        let mut first = self.runs.len();
        while first > 0 && self.runs[first - 1].entries == 1 {
            first -= 1;
        }
        let mut at = first.max(1);
        while at < self.runs.len() {
            let current = self.runs[at];
            let previous = self.runs[at - 1];
            if current.end_index() - 1 > commit {
                break;
            }
            let end = current.end().0;
            let mergeable = !current.after_truncation
                && previous.end_index() - 1 <= commit
                && previous.position.segment() == current.position.segment()
                && previous.end() <= current.position
                && previous.end_offset == current.base_offset
                && previous.end_index() == current.first_index
                && end - previous.position.0 <= u64::from(INDEX_SPAN_BYTES_MAX);
            if mergeable {
                let merged = &mut self.runs[at - 1];
                merged.end_offset = current.end_offset;
                merged.entries += current.entries;
                merged.bytes += current.bytes;
                merged.span = (end - merged.position.0) as u32;
                merged.max_timestamp_ms = merged.max_timestamp_ms.max(current.max_timestamp_ms);
                self.runs.remove(at);
            } else {
                at += 1;
            }
        }
    }

    /// Term of Raft index `index`, if the log knows it.
    pub fn term_of(&self, index: u64) -> Option<u64> {
        let replicated = self.replicated.as_ref()?;
        let first = self.first_index();
        if index + 1 == first {
            return Some(replicated.start_term);
        }
        if index < first || index >= self.end_index {
            return None;
        }
        term_at(&replicated.terms, index)
    }

    /// Bytes of index memory this log uses (for the index-size measurements).
    pub fn index_bytes(&self) -> usize {
        self.runs.len() * std::mem::size_of::<Run>()
            + self.replicated.as_ref().map_or(0, |r| r.terms.len() * 16)
    }
}

/// The term of `index` in a term list.
fn term_at(terms: &[(u64, u64)], index: u64) -> Option<u64> {
    let at = terms.partition_point(|(first, _)| *first <= index);
    at.checked_sub(1).map(|i| terms[i].1)
}

fn joins(last: &Run, frame: &IndexedFrame, end: u64) -> bool {
    last.position.segment() == frame.position.segment()
        && last.end() <= frame.position
        && last.end_offset == frame.base_offset
        && last.end_index() == frame.index
        && end - last.position.0 <= u64::from(INDEX_SPAN_BYTES_MAX)
}

fn extend(last: &mut Run, frame: &IndexedFrame, end: u64) {
    last.end_offset = frame.end_offset;
    last.entries += 1;
    last.bytes += frame.bytes;
    last.span = (end - last.position.0) as u32;
    last.max_timestamp_ms = last.max_timestamp_ms.max(frame.max_timestamp_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(byte: u64) -> WalPosition {
        WalPosition::new(SegmentId(1), byte)
    }

    fn frame(
        base: u64,
        records: u64,
        index: u64,
        position: WalPosition,
        bytes: u32,
    ) -> IndexedFrame {
        IndexedFrame {
            base_offset: base,
            end_offset: base + records,
            index,
            term: 1,
            position,
            bytes,
            max_timestamp_ms: index as i64,
        }
    }

    #[test]
    fn runs_merge_across_writes_within_the_span_limit() {
        let mut log = LogState::new();
        // Batches of 1 KiB every 4 KiB of WAL (other logs in between).
        for i in 0..1024u64 {
            log.push(frame(i * 10, 10, i + 1, at(4096 + i * 4096), 1024));
        }
        // 4 MiB of WAL at 1 MiB per run.
        assert_eq!(log.runs.len(), 4);
        assert!(log.runs.iter().all(|r| r.span <= INDEX_SPAN_BYTES_MAX));
        assert_eq!(log.stored_bytes, 1024 * 1024);
        assert_eq!(log.find(5000), Some(1));
        let run = log.runs[1];
        assert!(run.base_offset <= 5000 && 5000 < run.end_offset);
        let found = log.find_index(600).unwrap();
        let run = log.runs[found];
        assert!(run.first_index <= 600 && 600 < run.end_index());
    }

    #[test]
    fn runs_do_not_merge_across_segments_or_offset_gaps() {
        let mut log = LogState::new();
        log.push(frame(0, 10, 1, at(4096), 100));
        log.push(frame(10, 10, 2, WalPosition::new(SegmentId(2), 4096), 100));
        log.push(frame(25, 5, 3, WalPosition::new(SegmentId(2), 4196), 100));
        assert_eq!(log.runs.len(), 3);
    }

    #[test]
    fn a_replicated_log_merges_only_committed_entries_and_truncates_whole_runs() {
        let mut log = LogState::new_replicated();
        for i in 0..10u64 {
            log.push(frame(i * 5, 5, i + 1, at(4096 + i * 200), 100));
        }
        assert_eq!(log.runs.len(), 10, "nothing committed yet");
        log.set_durable(50);
        log.set_commit(6, 30);
        assert_eq!(log.high_watermark, 30);
        assert_eq!(log.runs.len(), 5, "entries 1-6 merged");
        // A new leader replaces entries 8.. (uncommitted).
        log.truncate_entries(8, 35);
        assert_eq!(log.end_index, 8);
        assert_eq!(log.runs.len(), 2, "entries 1-6, then 7");
        log.push(frame(35, 7, 8, at(4096 + 3000), 100));
        assert!(log.runs.back().unwrap().after_truncation);
        log.set_durable(42);
        log.set_commit(8, 42);
        // 7 joins 1-6 once committed; the run after the truncation never merges
        // with the one before it.
        assert_eq!(log.runs.len(), 2);
        assert_eq!(log.high_watermark, 42);
        assert_eq!(log.term_of(8), Some(1));
        assert_eq!(log.term_of(0), Some(0));
    }

    #[test]
    fn retention_keeps_uncommitted_entries_of_a_replicated_log() {
        let mut log = LogState::new_replicated();
        for i in 0..4u64 {
            log.push(frame(i * 5, 5, i + 1, at(4096 + i * 200), 100));
        }
        log.set_durable(20);
        log.set_commit(2, 10);
        log.advance_start(20);
        assert_eq!(log.log_start, 10, "never past the high watermark");
        assert_eq!(log.first_index(), 3);
        assert_eq!(log.term_of(2), Some(1));
    }
}
