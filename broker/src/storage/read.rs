//! Reads: a log's stored batches from an offset on, from the tail cache or with
//! aligned direct reads of the index's runs, verified after reading from disk.
//!
//! A disk read checks what it finds against the index entry that sent it there:
//! every frame's header and, for the log's own frames, payload CRC; that the run
//! starts with the log's batch at the run's base offset, that the log's batches in
//! it continue each other, and that the last one ends the run. Any mismatch (a
//! damaged frame, or a checkpointed index that does not match the segment) marks the
//! log corrupt from that offset, loudly; reads below it go on being served.

use std::rc::Rc;

use bytes::Bytes;

use super::error::{Result, StorageError};
use super::format;
use super::index::Run;
use super::segment::SegmentFile;
use super::wal::Wal;
use crate::limits::{BATCH_BYTES_MAX, READ_BYTES_MAX, SECTOR_BYTES};
use crate::types::{LogId, Offset};

/// Batches read from a log.
#[derive(Clone, Debug, Default)]
pub struct ReadBatches {
    /// Whole stamped batch frames, in offset order. The first may start below the
    /// requested offset (it contains it).
    pub frames: Vec<Bytes>,
    /// Bytes in `frames`.
    pub bytes: usize,
    /// The log's high watermark when read.
    pub high_watermark: Offset,
    /// The log's start offset when read.
    pub log_start: Offset,
}

/// Where a read may go beyond its start offset and byte budget.
#[derive(Clone, Copy, Debug)]
pub struct ReadRange {
    /// No batch starting at or past this is returned.
    pub end: Offset,
    /// Only batches starting at or past the read's offset (skip the one that
    /// holds it if it starts below).
    pub whole_batches: bool,
}

impl Default for ReadRange {
    fn default() -> Self {
        ReadRange {
            end: Offset::MAX,
            whole_batches: false,
        }
    }
}

/// The next piece of a read.
enum Step {
    /// Frames from the tail cache.
    Cached(Vec<Bytes>),
    /// Runs of one segment, read with one direct read spanning them all.
    Disk(Rc<SegmentFile>, Vec<Run>),
    /// Nothing stored from the offset on.
    Nothing,
}

/// Runs of one log in one segment closer than this are read with one read (the
/// bytes between them belong to other partitions and are skipped).
const COALESCE_GAP_BYTES: u64 = 1 << 20;

impl Wal {
    /// Reads batches of `log` from `offset` on, up to about `max_bytes` (at least one
    /// whole batch when any is available), never past the high watermark.
    pub async fn read(&self, log: LogId, offset: Offset, max_bytes: usize) -> Result<ReadBatches> {
        self.read_below(log, offset, max_bytes, Offset::MAX).await
    }

    /// `read`, and never a batch at or past `upper` either: the partition layer
    /// passes the high watermark it answers with, so the read and the answer
    /// agree even if the log's own high watermark moves meanwhile. The answer's
    /// `high_watermark` is the lower of the two.
    pub async fn read_below(
        &self,
        log: LogId,
        offset: Offset,
        max_bytes: usize,
        upper: Offset,
    ) -> Result<ReadBatches> {
        self.read_range(log, offset, max_bytes, upper, ReadRange::default())
            .await
    }

    /// `read_below`, within `range`: no batch that starts at or past
    /// `range.end`, and with `range.whole_batches` none that starts below
    /// `offset` either (a pipelined read that continues another one, which
    /// already returned the batch holding `offset`).
    pub async fn read_range(
        &self,
        log: LogId,
        offset: Offset,
        max_bytes: usize,
        upper: Offset,
        range: ReadRange,
    ) -> Result<ReadBatches> {
        let max_bytes = max_bytes.clamp(1, READ_BYTES_MAX);
        let (high_watermark, log_start) = self.check_read(log, offset)?;
        let high_watermark = high_watermark.min(upper);
        // Batches are served below this (the answer still reports the log's
        // high watermark).
        let stop = high_watermark.min(range.end);
        let mut out = ReadBatches {
            high_watermark,
            log_start,
            ..ReadBatches::default()
        };
        let mut next = offset;
        while next < stop && out.bytes < max_bytes {
            let budget = max_bytes - out.bytes;
            let (frames, damage) = match self.plan_step(log, next, stop, budget)? {
                Step::Cached(frames) => (frames, None),
                Step::Disk(file, runs) => self.read_runs(log, &file, &runs).await?,
                Step::Nothing => break,
            };
            let before = next;
            for frame in frames {
                let header =
                    format::header(&frame).map_err(|e| StorageError::Failed(e.to_string()))?;
                let base = header.base_offset.get();
                let records = u64::from(header.record_count.get());
                if records == 0 {
                    // A control frame: the broker's own, never served.
                    continue;
                }
                let last = base + records - 1;
                if last < next {
                    continue;
                }
                if range.whole_batches && base < offset {
                    // The batch holding `offset`, already served to the reader.
                    next = last + 1;
                    continue;
                }
                if base >= stop || (out.bytes > 0 && out.bytes + frame.len() > max_bytes) {
                    return Ok(out);
                }
                out.bytes += frame.len();
                out.frames.push(frame);
                next = last + 1;
            }
            if let Some(error) = damage {
                // The log is now marked corrupt from the damage on: serve what came
                // before it, or the error when nothing did.
                return if out.frames.is_empty() {
                    Err(error)
                } else {
                    Ok(out)
                };
            }
            if next == before {
                break;
            }
        }
        Ok(out)
    }

    /// Reads the entry frames of a replicated log with Raft indexes in
    /// `[low, high)`, up to about `max_bytes` (at least one frame): what a leader
    /// sends a follower that fell behind its in-memory entries. Every frame is
    /// verified as a read from disk is.
    pub async fn read_entries(
        &self,
        log: LogId,
        low: u64,
        high: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>> {
        let mut out: Vec<(u64, Bytes)> = Vec::new();
        let mut bytes = 0usize;
        let mut next = low;
        while next < high && (out.is_empty() || bytes < max_bytes) {
            let Some((file, runs)) = self.plan_entries(log, next)? else {
                break;
            };
            let (found, damage) = self.read_run_entries(log, &file, &runs).await?;
            let before = next;
            for entry in found {
                if entry.index < next {
                    continue;
                }
                if entry.index >= high || (!out.is_empty() && bytes + entry.frame.len() > max_bytes)
                {
                    return Ok(out);
                }
                bytes += entry.frame.len();
                next = entry.index + 1;
                out.push((entry.index, entry.frame));
            }
            if let Some(error) = damage {
                return if out.is_empty() { Err(error) } else { Ok(out) };
            }
            if next == before {
                break;
            }
        }
        Ok(out)
    }

    /// The runs of one segment from the one holding Raft index `index` on.
    fn plan_entries(&self, log: LogId, index: u64) -> Result<Option<(Rc<SegmentFile>, Vec<Run>)>> {
        let state = self.state.borrow();
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        let Some(first) = entry.find_index(index) else {
            return Ok(None);
        };
        let mut runs: Vec<Run> = Vec::new();
        for run in entry.runs.range(first..) {
            if let Some(last) = runs.last() {
                let near = run.position.segment() == last.position.segment()
                    && run.position.0 >= last.end().0
                    && run.position.0 - last.end().0 <= COALESCE_GAP_BYTES
                    && run.end().0 - runs[0].position.0 <= READ_BYTES_MAX as u64;
                if !near {
                    break;
                }
            }
            runs.push(*run);
        }
        let Some(first_run) = runs.first() else {
            return Ok(None);
        };
        match state.segments.get(&first_run.position.segment()) {
            Some(segment) => Ok(Some((segment.file.clone(), runs))),
            None => Err(StorageError::Failed(format!(
                "the index of log {log} points into segment {}, which is missing",
                first_run.position.segment()
            ))),
        }
    }

    /// Checks that `offset` may be read; returns (high watermark, log start).
    fn check_read(&self, log: LogId, offset: Offset) -> Result<(Offset, Offset)> {
        let state = self.state.borrow();
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        let (log_start, high_watermark) = (entry.log_start, entry.high_watermark);
        if let Some((corrupt_offset, error)) = state.corrupt.get(&log) {
            if offset >= *corrupt_offset {
                return Err(error.clone());
            }
        }
        // A replicated log's end may be past its high watermark (appended, not yet
        // committed): reading there is waiting, not out of range.
        let end = match entry.replicated {
            Some(_) => entry.next_offset.max(high_watermark),
            None => high_watermark,
        };
        if offset < log_start || offset > end {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start,
                high_watermark,
            });
        }
        Ok((high_watermark, log_start))
    }

    /// The next piece of a read from `offset`: cached frames if the cache holds the
    /// batch with `offset`, else the runs of one segment up to the cached part.
    fn plan_step(&self, log: LogId, offset: Offset, limit: Offset, budget: usize) -> Result<Step> {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        if let Some(frames) = state.cache.get(log, offset, limit, budget) {
            return Ok(Step::Cached(frames));
        }
        let cached_from = state.cache.first_offset(log).unwrap_or(Offset::MAX);
        let limit = match state.corrupt.get(&log) {
            Some((corrupt_offset, _)) => limit.min(*corrupt_offset),
            None => limit,
        };
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        let Some(first) = entry.find(offset) else {
            return Ok(Step::Nothing);
        };
        let mut runs: Vec<Run> = Vec::new();
        let mut planned = 0usize;
        for run in entry.runs.range(first..) {
            if run.base_offset >= limit || run.base_offset >= cached_from || planned >= budget {
                break;
            }
            if let Some(last) = runs.last() {
                let near = run.position.segment() == last.position.segment()
                    && run.position.0 >= last.end().0
                    && run.position.0 - last.end().0 <= COALESCE_GAP_BYTES
                    && run.end().0 - runs[0].position.0 <= READ_BYTES_MAX as u64;
                if !near {
                    break;
                }
            }
            planned += run.bytes as usize;
            runs.push(*run);
        }
        let Some(first_run) = runs.first() else {
            return Ok(Step::Nothing);
        };
        let segment = first_run.position.segment();
        match state.segments.get(&segment) {
            Some(found) => Ok(Step::Disk(found.file.clone(), runs)),
            None => {
                let reason = format!(
                    "the index of log {log} points into segment {segment}, which is missing"
                );
                Err(self.mark_corrupt_locked(state, log, first_run.base_offset, 0, reason))
            }
        }
    }

    /// Reads runs of one segment with one aligned direct read; returns the log's
    /// frames in them, each verified against the run that named it, and, if a run
    /// did not check out, the error (the log is marked corrupt from there and the
    /// frames stop before it).
    async fn read_runs(
        &self,
        log: LogId,
        file: &SegmentFile,
        runs: &[Run],
    ) -> Result<(Vec<Bytes>, Option<StorageError>)> {
        let (found, damage) = self.read_run_entries(log, file, runs).await?;
        let frames = found
            .into_iter()
            .filter(|f| !f.control)
            .map(|f| f.frame)
            .collect();
        Ok((frames, damage))
    }

    /// Reads runs of one segment with one aligned direct read; returns every entry
    /// frame of `log` in them (control entries too), checked as `read_runs` does.
    async fn read_run_entries(
        &self,
        log: LogId,
        file: &SegmentFile,
        runs: &[Run],
    ) -> Result<(Vec<FoundEntry>, Option<StorageError>)> {
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
            return Ok((Vec::new(), None));
        };
        let start = first.position.byte();
        let end = last.end().byte();
        let aligned = start / SECTOR_BYTES * SECTOR_BYTES;
        let aligned_end = end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        let data = file.read(aligned, (aligned_end - aligned) as usize).await?;
        let mut frames = Vec::new();
        for run in runs {
            let from = (run.position.byte() - aligned) as usize;
            let to = from + run.span as usize;
            let Some(span) = data.get(from..to) else {
                let reason = "the segment is shorter than its index says".to_string();
                let error = self.mark_corrupt(log, run.base_offset, run.position.byte(), reason);
                return Ok((frames, Some(error)));
            };
            let span = Bytes::copy_from_slice(span);
            let (found, damage) = frames_of_log(log, run, &span);
            frames.extend(found);
            if let Some((offset, at, reason)) = damage {
                let reason = format!("{} byte {}: {reason}", file.path.display(), at);
                return Ok((frames, Some(self.mark_corrupt(log, offset, at, reason))));
            }
        }
        Ok((frames, None))
    }

    /// Marks `log` corrupt from `offset` (keeping an earlier mark) and returns the
    /// error reads at or past it get from now on.
    fn mark_corrupt(
        &self,
        log: LogId,
        offset: Offset,
        position: u64,
        reason: String,
    ) -> StorageError {
        let mut state = self.state.borrow_mut();
        self.mark_corrupt_locked(&mut state, log, offset, position, reason)
    }

    fn mark_corrupt_locked(
        &self,
        state: &mut super::wal::State,
        log: LogId,
        offset: Offset,
        position: u64,
        reason: String,
    ) -> StorageError {
        let error = StorageError::Corrupt {
            path: self.config.dir.clone(),
            position,
            reason: format!("log {log} at offset {offset}: {reason}"),
        };
        let first = state
            .corrupt
            .entry(log)
            .or_insert_with(|| (offset, error.clone()));
        if offset < first.0 {
            *first = (offset, error.clone());
        }
        tracing::error!(shard = %self.config.shard, %log, offset, %error, "partition log is corrupt; nothing at or past this offset is served");
        error
    }
}

/// What went wrong in a run: (offset from which the log is unreliable, byte
/// position in the segment, reason).
type Damage = (Offset, u64, String);

/// An entry frame found in a run: its Raft index, whether it is a control entry,
/// and its bytes.
pub(super) struct FoundEntry {
    pub index: u64,
    pub control: bool,
    pub frame: Bytes,
}

/// Walks the frames of `span` (which holds `run`) and returns the entry frames of
/// `log`, checking them against the run, up to the first mismatch (if any). The
/// log's other control frames (hard state, truncation) in the span are skipped.
fn frames_of_log(log: LogId, run: &Run, span: &Bytes) -> (Vec<FoundEntry>, Option<Damage>) {
    let base = run.position.byte();
    let mut frames = Vec::new();
    let mut expected = run.base_offset;
    let mut index = run.first_index;
    let mut at = 0usize;
    while at < span.len() {
        let bytes = &span[at..];
        let fail = |reason: String| Some((expected, base + at as u64, reason));
        let header = match format::verify_stored_header(bytes, BATCH_BYTES_MAX) {
            Ok(header) => header,
            Err(error) => return (frames, fail(error.to_string())),
        };
        if header.log_id != log {
            if at == 0 {
                let reason = format!(
                    "the index names a batch of this log here, the segment holds one of log {}",
                    header.log_id
                );
                return (frames, fail(reason));
            }
            at += header.frame_bytes;
            continue;
        }
        let frame = match format::verify_stored(bytes, BATCH_BYTES_MAX) {
            Ok(frame) => frame,
            Err(error) => return (frames, fail(error.to_string())),
        };
        let whole = &bytes[..frame.frame_bytes];
        if frame.control && !super::control::is_entry_frame(whole) {
            if at == 0 {
                return (
                    frames,
                    fail(
                        "the index names an entry here, the segment holds a control record".into(),
                    ),
                );
            }
            at += frame.frame_bytes;
            continue;
        }
        if frame.base_offset != expected {
            let reason = format!(
                "batch at offset {} where the index expects offset {expected}",
                frame.base_offset
            );
            return (frames, fail(reason));
        }
        expected = frame.end_offset;
        frames.push(FoundEntry {
            index,
            control: frame.control,
            frame: span.slice(at..at + frame.frame_bytes),
        });
        index += 1;
        at += frame.frame_bytes;
    }
    if at != span.len() || expected != run.end_offset || index != run.end_index() {
        let reason = format!(
            "the index says the run ends before offset {} and index {} (byte {}), the segment before offset {expected} and index {index} (byte {})",
            run.end_offset,
            run.end_index(),
            base + u64::from(run.span),
            base + at as u64
        );
        return (frames, Some((expected, base + at as u64, reason)));
    }
    (frames, None)
}
