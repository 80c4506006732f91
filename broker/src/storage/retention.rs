//! Retention: advancing log start offsets by time and size, and deleting segments
//! that no longer hold a live batch.

use std::collections::HashMap;

use super::checkpoint::Snapshot;
use super::error::{Result, StorageError};
use super::segment;
use super::wal::Wal;
use crate::types::{LogId, Offset, SegmentId};

/// A log's retention limits (`None` = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Batches whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// Oldest batches are deleted while the log holds more than this.
    pub retention_bytes: Option<u64>,
}

impl Wal {
    /// Moves a log's start offset up (e.g. a DeleteRecords call); never past the
    /// high watermark.
    pub fn advance_log_start(&self, log: LogId, offset: Offset) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let entry = state
            .logs
            .get_mut(&log)
            .ok_or(StorageError::UnknownLog(log))?;
        entry.advance_start(offset);
        Ok(())
    }

    /// Applies retention to every log at time `now_ms`. Returns how many log starts
    /// moved.
    pub fn apply_retention(&self, policies: &HashMap<LogId, Retention>, now_ms: i64) -> usize {
        let mut state = self.state.borrow_mut();
        let mut moved = 0;
        for (log, entry) in state.logs.iter_mut() {
            let Some(policy) = policies.get(log) else {
                continue;
            };
            let mut new_start = entry.log_start;
            let mut remaining = entry.stored_bytes;
            for run in &entry.runs {
                if run.end_offset > entry.high_watermark {
                    break;
                }
                let too_old = policy
                    .retention_ms
                    .is_some_and(|ms| now_ms.saturating_sub(run.max_timestamp_ms) > ms as i64);
                let too_big = policy
                    .retention_bytes
                    .is_some_and(|bytes| remaining > bytes);
                if !(too_old || too_big) {
                    break;
                }
                remaining -= u64::from(run.bytes);
                new_start = run.end_offset;
            }
            if new_start > entry.log_start {
                entry.advance_start(new_start);
                moved += 1;
            }
        }
        moved
    }

    /// Segments (never the active one) in which no live batch remains.
    pub fn dead_segments(&self) -> Vec<SegmentId> {
        let state = self.state.borrow();
        state
            .segments
            .iter()
            .filter(|(id, _)| **id != state.active)
            .filter(|(_, segment)| {
                segment
                    .logs
                    .iter()
                    .all(|(log, end_index)| match state.logs.get(log) {
                        None => true,
                        Some(entry) => *end_index <= entry.first_index(),
                    })
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Deletes dead segments. A checkpoint recording the new log starts is written
    /// first, so that a restart never looks for a deleted segment's batches.
    pub async fn delete_dead_segments(&self) -> Result<Vec<SegmentId>> {
        let dead = self.dead_segments();
        if dead.is_empty() {
            return Ok(dead);
        }
        self.drain().await?;
        // The checkpoint may only cover durable writes; take it right after a drain.
        Snapshot::take(self).write(self.config()).await?;
        for id in &dead {
            let removed = self.state.borrow_mut().segments.remove(id);
            if let Some(segment) = removed {
                let path = segment.file.path.clone();
                drop(segment);
                std::fs::remove_file(&path)
                    .map_err(|e| StorageError::std("delete segment", &path, e))?;
                tracing::info!(path = %path.display(), "deleted WAL segment: no live batch left");
            }
        }
        segment::sync_directory(&self.config.dir).await?;
        Ok(dead)
    }

    /// Segment ids present, oldest first.
    pub fn segment_ids(&self) -> Vec<SegmentId> {
        self.state.borrow().segments.keys().copied().collect()
    }
}
