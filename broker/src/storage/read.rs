//! Reads: a log's stored batches from an offset on, from the tail cache or with
//! aligned direct reads, verified after reading from disk.

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

/// Where a run's bytes come from.
enum Source {
    Cached(Vec<Bytes>),
    /// Runs of one segment read with one direct read spanning them all.
    Disk(Rc<SegmentFile>, Vec<Run>),
}

/// Runs of one log in one segment closer than this are read with one read (the
/// bytes between them belong to other partitions and are skipped).
const COALESCE_GAP_BYTES: u64 = 1 << 20;

impl Wal {
    /// Reads batches of `log` from `offset` on, up to about `max_bytes` (at least one
    /// whole batch when any is available), never past the high watermark.
    pub async fn read(&self, log: LogId, offset: Offset, max_bytes: usize) -> Result<ReadBatches> {
        let max_bytes = max_bytes.clamp(1, READ_BYTES_MAX);
        let (plan, high_watermark, log_start) = self.plan_read(log, offset, max_bytes)?;
        let mut out = ReadBatches {
            high_watermark,
            log_start,
            ..ReadBatches::default()
        };
        for source in plan {
            let frames = match source {
                Source::Cached(frames) => frames,
                Source::Disk(file, runs) => read_runs(&file, &runs).await?,
            };
            for frame in frames {
                let header =
                    format::header(&frame).map_err(|e| StorageError::Failed(e.to_string()))?;
                let base = header.base_offset.get();
                let last = base + u64::from(header.last_offset_delta.get());
                if last < offset {
                    continue;
                }
                if base >= high_watermark || (out.bytes > 0 && out.bytes + frame.len() > max_bytes)
                {
                    return Ok(out);
                }
                out.bytes += frame.len();
                out.frames.push(frame);
            }
        }
        Ok(out)
    }

    fn plan_read(
        &self,
        log: LogId,
        offset: Offset,
        max_bytes: usize,
    ) -> Result<(Vec<Source>, Offset, Offset)> {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        let (log_start, high_watermark) = (entry.log_start, entry.high_watermark);
        if let Some((corrupt_offset, error)) = state.corrupt.get(&log) {
            if offset >= *corrupt_offset {
                return Err(error.clone());
            }
        }
        if offset < log_start || offset > high_watermark {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start,
                high_watermark,
            });
        }
        let mut plan = Vec::new();
        let Some(first) = entry.find(offset) else {
            return Ok((plan, high_watermark, log_start));
        };
        let mut planned = 0usize;
        for run in entry.runs.range(first..) {
            if run.base_offset >= high_watermark || planned >= max_bytes {
                break;
            }
            planned += run.bytes as usize;
            match state.cache.get_run(run.position, run.bytes) {
                Some(frames) => plan.push(Source::Cached(frames)),
                None => {
                    let segment = state.segments.get(&run.position.segment()).ok_or_else(|| {
                        StorageError::Corrupt {
                            path: self.config.dir.clone(),
                            position: run.position.byte(),
                            reason: format!(
                                "index of log {log} points into missing segment {}",
                                run.position.segment()
                            ),
                        }
                    })?;
                    if let Some(Source::Disk(file, runs)) = plan.last_mut() {
                        let last = runs.last().copied().unwrap_or(*run);
                        let near = run.position.segment() == last.position.segment()
                            && run.position.0 >= last.end().0
                            && run.position.0 - last.end().0 <= COALESCE_GAP_BYTES
                            && run.end().0 - runs[0].position.0 <= READ_BYTES_MAX as u64;
                        if near && Rc::ptr_eq(file, &segment.file) {
                            runs.push(*run);
                            continue;
                        }
                    }
                    plan.push(Source::Disk(segment.file.clone(), vec![*run]));
                }
            }
        }
        Ok((plan, high_watermark, log_start))
    }
}

/// Reads runs of one segment with one aligned direct read and splits them into
/// verified frames.
async fn read_runs(file: &SegmentFile, runs: &[Run]) -> Result<Vec<Bytes>> {
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Ok(Vec::new());
    };
    let start = first.position.byte();
    let end = last.end().byte();
    let aligned = start / SECTOR_BYTES * SECTOR_BYTES;
    let aligned_end = end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
    let data = file.read(aligned, (aligned_end - aligned) as usize).await?;
    if (data.len() as u64) < end - aligned {
        return Err(StorageError::Corrupt {
            path: file.path.clone(),
            position: end,
            reason: "segment shorter than its index says".into(),
        });
    }
    let mut frames = Vec::new();
    for run in runs {
        let from = (run.position.byte() - aligned) as usize;
        let bytes = Bytes::copy_from_slice(&data[from..from + run.bytes as usize]);
        let mut at = 0usize;
        while at < bytes.len() {
            let frame = format::verify_stored(&bytes[at..], BATCH_BYTES_MAX).map_err(|error| {
                StorageError::Corrupt {
                    path: file.path.clone(),
                    position: run.position.byte() + at as u64,
                    reason: error.to_string(),
                }
            })?;
            frames.push(bytes.slice(at..at + frame.frame_bytes));
            at += frame.frame_bytes;
        }
    }
    Ok(frames)
}
