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
    Disk(Rc<SegmentFile>, Run),
}

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
                Source::Disk(file, run) => read_run(&file, &run).await?,
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
                    plan.push(Source::Disk(segment.file.clone(), *run));
                }
            }
        }
        Ok((plan, high_watermark, log_start))
    }
}

/// Reads one run from disk and splits it into verified frames.
async fn read_run(file: &SegmentFile, run: &Run) -> Result<Vec<Bytes>> {
    let start = run.position.byte();
    let aligned = start / SECTOR_BYTES * SECTOR_BYTES;
    let end = start + u64::from(run.bytes);
    let aligned_end = end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
    let data = file.read(aligned, (aligned_end - aligned) as usize).await?;
    let skip = (start - aligned) as usize;
    if data.len() < skip + run.bytes as usize {
        return Err(StorageError::Corrupt {
            path: file.path.clone(),
            position: end,
            reason: "segment shorter than its index says".into(),
        });
    }
    let bytes = Bytes::copy_from_slice(&data[skip..skip + run.bytes as usize]);
    let mut frames = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let frame = format::verify_stored(&bytes[at..], BATCH_BYTES_MAX).map_err(|error| {
            StorageError::Corrupt {
                path: file.path.clone(),
                position: start + at as u64,
                reason: error.to_string(),
            }
        })?;
        frames.push(bytes.slice(at..at + frame.frame_bytes));
        at += frame.frame_bytes;
    }
    Ok(frames)
}
