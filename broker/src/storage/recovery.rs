//! Opening a WAL: load the checkpoint, scan and verify every frame written after it,
//! rebuild the indexes, cut a torn tail, and refuse corruption anywhere else.
//!
//! The scan reads segments with large aligned direct reads. A frame is *valid* when
//! its header CRC, structure and payload CRC check out and its offsets continue its
//! log. At the first invalid frame:
//! - in the newest segment that holds frames, it is a torn tail: bytes from there on
//!   were never acknowledged (an append completes only after its write and an
//!   `fdatasync` covering it), so they are cut and zeroed;
//! - anywhere else it is corruption: opening fails with the file and position.
//!
//! A frame whose header is intact but whose payload CRC fails, in an older segment,
//! marks only its log as corrupt from that offset (its length is trustworthy, so the
//! scan continues with the other logs).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::checkpoint::Snapshot;
use super::error::{Result, StorageError};
use super::format::{self, FrameError};
use super::index::{LogState, WalPosition};
use super::segment::{self, SegmentFile};
use super::wal::{now_ms, Segment, Wal, WalConfig};
use crate::limits::{BATCH_BYTES_MAX, RECOVERY_ZERO_BYTES, SECTOR_BYTES, SEGMENT_HEADER_BYTES};
use crate::types::{LogId, Offset, SegmentId};
use sluice_schema::batch;

/// Bytes per scan read.
const SCAN_READ_BYTES: usize = 8 << 20;

/// What recovery found.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Segments present.
    pub segments: usize,
    /// Whether a valid checkpoint was used.
    pub checkpoint_used: bool,
    /// Why a checkpoint was ignored, if one was.
    pub checkpoint_error: Option<String>,
    /// Bytes of frames scanned and verified.
    pub bytes_scanned: u64,
    /// Frames scanned.
    pub frames_scanned: u64,
    /// Bytes cut from a torn tail (from the first invalid frame to the end of the
    /// zeroed region).
    pub torn_tail: Option<(SegmentId, u64, String)>,
    /// Logs marked corrupt, with the offset and reason.
    pub corrupt_logs: Vec<(LogId, Offset, String)>,
    /// Time taken.
    pub duration: Duration,
}

/// How the scan of one segment ended.
enum ScanEnd {
    /// A zero header or the end of the segment.
    Clean(u64),
    /// An invalid frame at this byte.
    Invalid(u64, String),
}

impl Wal {
    /// Opens (creating if needed) the WAL in `config.dir` and recovers it.
    pub async fn open(mut config: WalConfig) -> Result<(Rc<Wal>, RecoveryReport)> {
        // glommio's directory calls fail with EBADF on relative paths.
        config.dir = std::path::absolute(&config.dir)
            .map_err(|e| StorageError::std("resolve WAL directory", &config.dir, e))?;
        config
            .validate()
            .map_err(|reason| StorageError::Incompatible {
                path: config.dir.clone(),
                reason,
            })?;
        let started = Instant::now();
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| StorageError::std("create WAL directory", &config.dir, e))?;
        let mut report = RecoveryReport::default();
        let ids = list_segments(&config.dir)?;
        let mut segments = BTreeMap::new();
        let ids = remove_unfinished_spare(&config.dir, ids)?;
        for id in &ids {
            let (file, _) = SegmentFile::open(&config.dir, config.shard, *id).await?;
            segments.insert(
                *id,
                Segment {
                    file: Rc::new(file),
                    end: SEGMENT_HEADER_BYTES,
                    logs: HashMap::new(),
                },
            );
        }
        report.segments = segments.len();
        if segments.is_empty() {
            let file = SegmentFile::create(
                &config.dir,
                config.shard,
                SegmentId(1),
                config.segment_bytes,
                now_ms(),
            )
            .await?;
            segments.insert(
                SegmentId(1),
                Segment {
                    file: Rc::new(file),
                    end: SEGMENT_HEADER_BYTES,
                    logs: HashMap::new(),
                },
            );
        }
        let clean = take_clean_marker(&config.dir).await?;
        let (mut logs, scan_from) = load_checkpoint(&config, &segments, &mut report);
        let mut corrupt = HashMap::new();
        let tail = scan(
            &config,
            &mut segments,
            &mut logs,
            &mut corrupt,
            scan_from,
            &mut report,
        )
        .await?;
        // After a clean shutdown with nothing written since the checkpoint, no write
        // can have been in flight: skip zeroing the region after the tail.
        let zero = !(clean && report.frames_scanned == 0 && report.torn_tail.is_none());
        let (write_byte, tail_block) = finish_tail(&segments, tail, zero).await?;
        report.duration = started.elapsed();
        let wal = Wal::from_recovered(config, segments, write_byte, tail_block, logs, corrupt);
        super::roll::prepare_spare(wal.clone());
        Ok((wal, report))
    }
}

/// A newest segment whose header block is all zeros was being created when the
/// process stopped (the header is written last); it holds nothing: remove it.
fn remove_unfinished_spare(dir: &Path, mut ids: Vec<SegmentId>) -> Result<Vec<SegmentId>> {
    use std::io::Read;
    let Some(last) = ids.last().copied() else {
        return Ok(ids);
    };
    let path = dir.join(segment::file_name(last));
    let mut header = vec![0u8; 64];
    let read = std::fs::File::open(&path)
        .and_then(|mut file| file.read(&mut header))
        .map_err(|e| StorageError::std("read segment header", &path, e))?;
    if header[..read].iter().all(|b| *b == 0) {
        tracing::warn!(path = %path.display(), "removing a segment whose creation did not finish");
        std::fs::remove_file(&path)
            .map_err(|e| StorageError::std("remove unfinished segment", &path, e))?;
        ids.pop();
    }
    Ok(ids)
}

fn list_segments(dir: &Path) -> Result<Vec<SegmentId>> {
    let mut ids = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| StorageError::std("list WAL directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::std("list WAL directory", dir, e))?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// Loads the checkpoint if it is valid and matches the segments; returns the logs
/// and where to start scanning.
fn load_checkpoint(
    config: &WalConfig,
    segments: &BTreeMap<SegmentId, Segment>,
    report: &mut RecoveryReport,
) -> (HashMap<LogId, LogState>, WalPosition) {
    let first = *segments.keys().next().expect("at least one segment");
    let from_start = WalPosition::new(first, SEGMENT_HEADER_BYTES);
    let snapshot = match Snapshot::read(&config.dir) {
        None => return (HashMap::new(), from_start),
        Some(Err(error)) => {
            report.checkpoint_error = Some(error);
            return (HashMap::new(), from_start);
        }
        Some(Ok(snapshot)) => snapshot,
    };
    if snapshot.shard != config.shard || !segments.contains_key(&snapshot.scan_from.segment()) {
        report.checkpoint_error = Some("checkpoint does not match the segments present".into());
        return (HashMap::new(), from_start);
    }
    report.checkpoint_used = true;
    let mut logs = snapshot.logs;
    for entry in logs.values_mut() {
        // Runs in segments that retention already deleted are gone: start after them.
        while entry
            .runs
            .front()
            .is_some_and(|run| !segments.contains_key(&run.position.segment()))
        {
            if let Some(run) = entry.runs.pop_front() {
                entry.stored_bytes -= u64::from(run.bytes);
                entry.log_start = entry.log_start.max(run.last_offset + 1);
            }
        }
    }
    (logs, snapshot.scan_from)
}

/// Scans from `scan_from` to the end; returns the segment and byte where valid
/// frames end, and the invalid-frame reason if the scan stopped at one.
async fn scan(
    config: &WalConfig,
    segments: &mut BTreeMap<SegmentId, Segment>,
    logs: &mut HashMap<LogId, LogState>,
    corrupt: &mut HashMap<LogId, (Offset, StorageError)>,
    scan_from: WalPosition,
    report: &mut RecoveryReport,
) -> Result<Tail> {
    // Rebuild per-segment contents from the checkpointed runs.
    for (log, entry) in logs.iter() {
        for run in &entry.runs {
            if let Some(segment) = segments.get_mut(&run.position.segment()) {
                segment.logs.insert(*log, run.last_offset);
                segment.end = segment.end.max(run.end().byte());
            }
        }
    }
    let ids: Vec<SegmentId> = segments
        .range(scan_from.segment()..)
        .map(|(id, _)| *id)
        .collect();
    let tail_segment = newest_with_frames(segments, &ids).await?;
    let mut ends = Vec::new();
    for id in &ids {
        let start = if *id == scan_from.segment() {
            scan_from.byte()
        } else {
            SEGMENT_HEADER_BYTES
        };
        let segment = segments.get_mut(id).expect("listed");
        let is_tail = Some(*id) == tail_segment;
        let end = scan_segment(segment, *id, start, is_tail, logs, corrupt, report).await?;
        ends.push((*id, end));
    }
    // The newest segment holding frames may end torn; any other invalid end is corruption.
    let last_with_frames = ends
        .iter()
        .rev()
        .find(|(id, end)| {
            let byte = match end {
                ScanEnd::Clean(byte) | ScanEnd::Invalid(byte, _) => *byte,
            };
            byte > SEGMENT_HEADER_BYTES
                || matches!(end, ScanEnd::Invalid(..))
                || segments[id].end > SEGMENT_HEADER_BYTES
        })
        .map(|(id, _)| *id);
    for (id, end) in &ends {
        if let ScanEnd::Invalid(byte, reason) = end {
            let path = segments[id].file.path.clone();
            if Some(*id) != last_with_frames {
                return Err(StorageError::Corrupt {
                    path,
                    position: *byte,
                    reason: reason.clone(),
                });
            }
            tracing::warn!(path = %path.display(), position = byte, %reason, "cutting torn WAL tail");
            report.torn_tail = Some((*id, *byte, reason.clone()));
        }
    }
    let active = *segments.keys().next_back().expect("at least one segment");
    let _ = config;
    Ok(Tail {
        active,
        write_byte: segments[&active].end,
        tail_segment,
    })
}

/// Where appends continue after recovery, and the newest segment holding frames.
struct Tail {
    active: SegmentId,
    write_byte: u64,
    tail_segment: Option<SegmentId>,
}

/// Name of the marker written after the final checkpoint of a clean shutdown.
pub(super) const CLEAN_MARKER: &str = "clean-shutdown";

/// Removes the clean-shutdown marker (durably, before any new write) and says
/// whether it was there.
async fn take_clean_marker(dir: &Path) -> Result<bool> {
    let path = dir.join(CLEAN_MARKER);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            segment::sync_directory(dir).await?;
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(StorageError::std(
            "remove clean-shutdown marker",
            &path,
            error,
        )),
    }
}

/// The newest of `ids` whose first frame slot is not zero (a zero-filled spare
/// segment may follow the one appends were going to).
async fn newest_with_frames(
    segments: &BTreeMap<SegmentId, Segment>,
    ids: &[SegmentId],
) -> Result<Option<SegmentId>> {
    for id in ids.iter().rev() {
        let file = &segments[id].file;
        let block = file
            .read(SEGMENT_HEADER_BYTES, SECTOR_BYTES as usize)
            .await?;
        if block.iter().take(batch::HEADER_BYTES).any(|b| *b != 0) {
            return Ok(Some(*id));
        }
    }
    Ok(None)
}

/// Follows frame headers (header CRC and length only) from `start`; true if the
/// chain of intact headers reaches `limit`.
async fn chain_reaches(
    reader: &mut ScanReader,
    file: &SegmentFile,
    start: u64,
    limit: u64,
) -> Result<bool> {
    let mut position = start;
    while position < limit {
        if position + batch::HEADER_BYTES as u64 > file.capacity {
            return Ok(false);
        }
        let bytes = reader
            .get(file, position, batch::HEADER_BYTES, file.capacity)
            .await?;
        let Ok(header) = format::header(bytes) else {
            return Ok(false);
        };
        if header.magic.get() != batch::MAGIC
            || format::header_crc(bytes) != header.header_crc.get()
        {
            return Ok(false);
        }
        position += u64::from(header.frame_bytes.get()).max(batch::HEADER_BYTES as u64);
    }
    Ok(true)
}

/// Scans one segment from `start`; updates logs and the segment's contents.
///
/// In the tail segment, a frame with an intact header but a bad payload is a torn
/// write when it lies in the region a crash can tear (within RECOVERY_ZERO_BYTES of
/// where intact frames end); past that region it is corruption, as elsewhere.
async fn scan_segment(
    segment: &mut Segment,
    id: SegmentId,
    start: u64,
    is_tail: bool,
    logs: &mut HashMap<LogId, LogState>,
    corrupt: &mut HashMap<LogId, (Offset, StorageError)>,
    report: &mut RecoveryReport,
) -> Result<ScanEnd> {
    let file = segment.file.clone();
    let capacity = file.capacity;
    let mut reader = ScanReader::default();
    let mut position = start;
    let mut previous: Option<LogId> = None;
    loop {
        if position + batch::HEADER_BYTES as u64 > capacity {
            segment.end = position;
            return Ok(ScanEnd::Clean(position));
        }
        let header_bytes = reader
            .get(&file, position, batch::HEADER_BYTES, capacity)
            .await?;
        if header_bytes.iter().all(|b| *b == 0) {
            segment.end = position;
            return Ok(ScanEnd::Clean(position));
        }
        let declared = format::header(header_bytes)
            .map(|h| h.frame_bytes.get() as usize)
            .unwrap_or(0);
        let frame_bytes = declared.clamp(batch::HEADER_BYTES, BATCH_BYTES_MAX);
        if position + frame_bytes as u64 > capacity {
            segment.end = position;
            return Ok(ScanEnd::Invalid(
                position,
                format!("frame of {declared} bytes runs past the segment end"),
            ));
        }
        let bytes = reader.get(&file, position, frame_bytes, capacity).await?;
        let frame = match format::verify_stored(bytes, BATCH_BYTES_MAX) {
            Ok(frame) => frame,
            Err(error @ FrameError::PayloadCrc { .. })
                if !is_tail
                    || chain_reaches(
                        &mut reader,
                        &file,
                        position,
                        position + RECOVERY_ZERO_BYTES,
                    )
                    .await? =>
            {
                // Header intact: the length is trustworthy. Mark the log and go on.
                let bytes = reader.get(&file, position, frame_bytes, capacity).await?;
                let header = format::header(bytes).expect("checked above");
                let log = LogId(header.log_id.get());
                let offset = header.base_offset.get();
                let reason = format!(
                    "{error} in batch at offset {offset} ({} byte {position})",
                    file.path.display()
                );
                report.corrupt_logs.push((log, offset, reason.clone()));
                corrupt.entry(log).or_insert((
                    offset,
                    StorageError::Corrupt {
                        path: file.path.clone(),
                        position,
                        reason,
                    },
                ));
                position += frame_bytes as u64;
                continue;
            }
            Err(error) => {
                segment.end = position;
                return Ok(ScanEnd::Invalid(position, error.to_string()));
            }
        };
        if corrupt.contains_key(&frame.log_id) {
            position += frame.frame_bytes as u64;
            continue;
        }
        let entry = logs.entry(frame.log_id).or_default();
        if frame.last_offset < entry.next_offset && entry.next_offset > 0 {
            // Already known from the checkpoint.
            position += frame.frame_bytes as u64;
            continue;
        }
        if frame.base_offset != entry.next_offset
            && !(entry.next_offset == 0 && entry.runs.is_empty())
        {
            segment.end = position;
            return Ok(ScanEnd::Invalid(
                position,
                format!(
                    "log {} batch at offset {} does not continue the log (expected offset {})",
                    frame.log_id, frame.base_offset, entry.next_offset
                ),
            ));
        }
        if entry.runs.is_empty() && entry.next_offset == 0 {
            entry.log_start = frame.base_offset;
        }
        let same_write = previous == Some(frame.log_id);
        entry.push(
            frame.base_offset,
            frame.last_offset,
            WalPosition::new(id, position),
            frame.frame_bytes as u32,
            frame.max_timestamp_ms,
            same_write,
        );
        entry.next_offset = frame.last_offset + 1;
        entry.high_watermark = entry.next_offset;
        segment.logs.insert(frame.log_id, frame.last_offset);
        previous = Some(frame.log_id);
        position += frame.frame_bytes as u64;
        report.bytes_scanned += frame.frame_bytes as u64;
        report.frames_scanned += 1;
        glommio::yield_if_needed().await;
    }
}

/// Zeroes whatever may follow the last valid frame of the active segment (stale or
/// torn bytes from writes that were in flight) and returns the write position and
/// the partial last block.
async fn finish_tail(
    segments: &BTreeMap<SegmentId, Segment>,
    tail: Tail,
    zero: bool,
) -> Result<(u64, Vec<u8>)> {
    // Only the newest segment holding frames can end in bytes that were never
    // durable (every older segment was durable before its successor got a write,
    // and a spare after it was never written).
    if let Some(id) = tail.tail_segment.filter(|_| zero) {
        zero_after(&segments[&id]).await?;
    }
    let Tail {
        active, write_byte, ..
    } = tail;
    let segment = &segments[&active];
    let block_start = write_byte / SECTOR_BYTES * SECTOR_BYTES;
    let keep = (write_byte - block_start) as usize;
    let tail_block = if keep > 0 {
        let block = segment
            .file
            .read(block_start, SECTOR_BYTES as usize)
            .await?;
        block[..keep].to_vec()
    } else {
        Vec::new()
    };
    Ok((write_byte, tail_block))
}

/// Zeroes `[end, end + RECOVERY_ZERO_BYTES)` of a segment if anything there is not
/// zero, keeping the valid bytes of the block that holds `end`.
async fn zero_after(segment: &Segment) -> Result<()> {
    let file = &segment.file;
    let end = segment.end;
    let limit = (end + RECOVERY_ZERO_BYTES).min(file.capacity);
    if end >= limit {
        return Ok(());
    }
    let block_start = end / SECTOR_BYTES * SECTOR_BYTES;
    let region_end = limit.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
    let region = file
        .read(block_start, (region_end - block_start) as usize)
        .await?;
    let keep = (end - block_start) as usize;
    if region.len() <= keep || region[keep..].iter().all(|b| *b == 0) {
        return Ok(());
    }
    let mut block = file.file.alloc_dma_buffer(SECTOR_BYTES as usize);
    block.as_bytes_mut()[..keep].copy_from_slice(&region[..keep]);
    block.as_bytes_mut()[keep..].fill(0);
    file.write(block, block_start).await?;
    if block_start + SECTOR_BYTES < region_end {
        file.zero_fill(block_start + SECTOR_BYTES, region_end)
            .await?;
    }
    file.sync().await
}

/// Buffered aligned reads over one segment.
#[derive(Default)]
struct ScanReader {
    start: u64,
    data: Option<super::aligned::AlignedBuffer>,
}

impl ScanReader {
    async fn get(
        &mut self,
        file: &SegmentFile,
        position: u64,
        bytes: usize,
        capacity: u64,
    ) -> Result<&[u8]> {
        let end = position + bytes as u64;
        let have = self
            .data
            .as_ref()
            .is_some_and(|d| position >= self.start && end <= self.start + d.len() as u64);
        if !have {
            let start = position / SECTOR_BYTES * SECTOR_BYTES;
            let want =
                ((end - start).div_ceil(SECTOR_BYTES) * SECTOR_BYTES).max(SCAN_READ_BYTES as u64);
            let want = want.min(capacity - start);
            self.data = Some(file.read(start, want as usize).await?);
            self.start = start;
        }
        let data = self.data.as_ref().expect("filled above");
        let from = (position - self.start) as usize;
        let to = (from + bytes).min(data.len());
        Ok(&data[from..to])
    }
}
