//! Opening a WAL: load the checkpoint, scan and verify every frame written after it
//! (see `scan.rs` for what counts as the end, a torn write or corruption), rebuild
//! the indexes, cut a torn tail, and refuse corruption.
//!
//! After a crash, the newest segment holding frames may end in writes that were
//! never made durable. Recovery cuts a torn tail there, zeroes the region a crash
//! can leave unsynced past it (so such bytes can never reappear behind later
//! appends), and then `fdatasync`s that segment before anything is served or
//! appended: frames that were written but never synced before the crash are only
//! served once they are durable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::checkpoint::Snapshot;
use super::error::{Result, StorageError};
use super::index::{LogState, WalPosition};
use super::scan::{self, ScanEnd, ScanMode, ScanStats, SegmentBytes};
use super::segment::{self, SegmentFile};
use super::wal::{now_ms, Segment, Wal, WalConfig};
use crate::limits::{RECOVERY_ZERO_BYTES, SECTOR_BYTES, SEGMENT_HEADER_BYTES};
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
    /// Whether the previous run shut down cleanly (its final checkpoint covers
    /// everything).
    pub clean_shutdown: bool,
    /// Bytes of frames scanned and verified.
    pub bytes_scanned: u64,
    /// Frames scanned.
    pub frames_scanned: u64,
    /// A torn tail that was cut: segment, byte, what was found there.
    pub torn_tail: Option<(SegmentId, u64, String)>,
    /// Intact frames that followed a torn write's damage (within the window a crash
    /// can leave unsynced) and were cut with it: their byte range, and the file
    /// holding a copy of the cut bytes.
    pub quarantined: Option<(u64, u64, std::path::PathBuf)>,
    /// Logs marked corrupt, with the offset and reason.
    pub corrupt_logs: Vec<(LogId, Offset, String)>,
    /// The tail segment was `fdatasync`ed before the WAL opened (always after a
    /// crash: frames written but never synced become durable before being served).
    pub tail_synced: bool,
    /// Time taken.
    pub duration: Duration,
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
        report.clean_shutdown = clean;
        let (mut logs, scan_from) = load_checkpoint(&config, &segments, &mut report);
        let mut corrupt = HashMap::new();
        let tail = scan(
            &mut segments,
            &mut logs,
            &mut corrupt,
            scan_from,
            clean,
            &mut report,
        )
        .await?;
        for entry in logs.values_mut() {
            entry.finish_recovery();
        }
        let (write_byte, tail_block) = finish_tail(&segments, tail, clean, &mut report).await?;
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
                entry.log_start = entry.log_start.max(run.end_offset);
            }
        }
    }
    (logs, snapshot.scan_from)
}

/// Scans from `scan_from` to the end of every segment; returns where appends go on.
async fn scan(
    segments: &mut BTreeMap<SegmentId, Segment>,
    logs: &mut HashMap<LogId, LogState>,
    corrupt: &mut HashMap<LogId, (Offset, StorageError)>,
    scan_from: WalPosition,
    clean: bool,
    report: &mut RecoveryReport,
) -> Result<Tail> {
    // Rebuild per-segment contents from the checkpointed runs.
    for (log, entry) in logs.iter() {
        for run in &entry.runs {
            if let Some(segment) = segments.get_mut(&run.position.segment()) {
                segment.logs.insert(*log, run.end_index());
                segment.end = segment.end.max(run.end().byte());
            }
        }
    }
    let ids: Vec<SegmentId> = segments
        .range(scan_from.segment()..)
        .map(|(id, _)| *id)
        .collect();
    // Only the newest segment that holds frames (and any spare after it) can hold
    // writes that never became durable; after a clean shutdown, none can.
    let tail_segment = newest_with_frames(segments, &ids).await?;
    for id in &ids {
        let start = if *id == scan_from.segment() {
            scan_from.byte()
        } else {
            SEGMENT_HEADER_BYTES
        };
        let mode = ScanMode {
            segment: *id,
            start,
            may_be_torn: !clean && tail_segment.is_none_or(|tail| *id >= tail),
            window: RECOVERY_ZERO_BYTES,
        };
        let segment = segments.get_mut(id).expect("listed");
        let mut stats = ScanStats::default();
        let mut source = ScanReader::new(segment.file.clone());
        let end = scan::scan_segment(&mut source, mode, logs, corrupt, &mut stats).await?;
        report.frames_scanned += stats.frames;
        report.bytes_scanned += stats.bytes;
        report.corrupt_logs.extend(stats.corrupt_logs);
        segment.logs.extend(stats.logs_in_segment);
        let (cut, torn) = match end {
            ScanEnd::Clean(at) => (at, None),
            ScanEnd::Torn {
                at,
                reason,
                intact_after,
            } => (at, Some((reason, intact_after))),
        };
        segment.end = segment.end.max(cut);
        if let Some((reason, intact_after)) = torn {
            let path = segment.file.path.clone();
            tracing::warn!(path = %path.display(), position = cut, %reason, "cutting a torn WAL tail (written but never acknowledged)");
            if let Some((first, last_end)) = intact_after {
                let copy = quarantine(&segment.file, cut, last_end).await?;
                tracing::error!(path = %path.display(), position = cut, first_intact = first, intact_end = last_end, copy = %copy.display(),
                    "a torn write left intact frames after its damaged start; they were never acknowledged (within the unsynced window) and are cut, a copy is kept");
                report.quarantined = Some((first, last_end, copy));
            }
            report.torn_tail = Some((*id, cut, reason));
        }
    }
    let active = *segments.keys().next_back().expect("at least one segment");
    Ok(Tail {
        active,
        write_byte: segments[&active].end,
        tail_segment,
    })
}

/// Copies `[from, to)` of a segment into `<wal-dir>/quarantine/` before it is cut.
async fn quarantine(file: &Rc<SegmentFile>, from: u64, to: u64) -> Result<std::path::PathBuf> {
    let dir = file
        .path
        .parent()
        .map(|p| p.join("quarantine"))
        .unwrap_or_default();
    std::fs::create_dir_all(&dir)
        .map_err(|e| StorageError::std("create quarantine dir", &dir, e))?;
    let name = format!(
        "{}-at-{from}.bin",
        file.path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("segment")
    );
    let target = dir.join(name);
    let mut reader = ScanReader::new(file.clone());
    let bytes = reader.get(from, (to - from) as usize).await?.to_vec();
    std::fs::write(&target, bytes)
        .map_err(|e| StorageError::std("write quarantine copy", &target, e))?;
    Ok(target)
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
        if file.zeroed_end() <= SEGMENT_HEADER_BYTES {
            continue;
        }
        let block = file
            .read(SEGMENT_HEADER_BYTES, SECTOR_BYTES as usize)
            .await?;
        if block.iter().take(batch::HEADER_BYTES).any(|b| *b != 0) {
            return Ok(Some(*id));
        }
    }
    Ok(None)
}

/// After a crash: zeroes whatever may follow the last valid frame of the newest
/// segment with frames (stale or torn bytes from writes that were in flight), then
/// makes that segment durable — frames that were written but never synced must be
/// durable before they are served. Returns the write position and the partial last
/// block.
async fn finish_tail(
    segments: &BTreeMap<SegmentId, Segment>,
    tail: Tail,
    clean: bool,
    report: &mut RecoveryReport,
) -> Result<(u64, Vec<u8>)> {
    if let Some(id) = tail.tail_segment.filter(|_| !clean) {
        let segment = &segments[&id];
        zero_after(segment).await?;
        segment.file.sync().await?;
        report.tail_synced = true;
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

/// Zeroes `[end, end + RECOVERY_ZERO_BYTES)` of a segment (within its data) if
/// anything there is not zero, keeping the valid bytes of the block that holds `end`.
async fn zero_after(segment: &Segment) -> Result<()> {
    let file = &segment.file;
    let end = segment.end;
    let limit = (end + RECOVERY_ZERO_BYTES).min(file.zeroed_end());
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
    Ok(())
}

/// Buffered aligned reads over one segment's data.
struct ScanReader {
    file: Rc<SegmentFile>,
    start: u64,
    data: Option<super::aligned::AlignedBuffer>,
}

impl ScanReader {
    fn new(file: Rc<SegmentFile>) -> Self {
        ScanReader {
            file,
            start: 0,
            data: None,
        }
    }
}

impl SegmentBytes for ScanReader {
    async fn get(&mut self, position: u64, bytes: usize) -> Result<&[u8]> {
        let limit = self.file.zeroed_end();
        let position = position.min(limit);
        let end = (position + bytes as u64).min(limit);
        let have = self
            .data
            .as_ref()
            .is_some_and(|d| position >= self.start && end <= self.start + d.len() as u64);
        if !have {
            let start = position / SECTOR_BYTES * SECTOR_BYTES;
            let want =
                ((end - start).div_ceil(SECTOR_BYTES) * SECTOR_BYTES).max(SCAN_READ_BYTES as u64);
            let want = want.min(limit.div_ceil(SECTOR_BYTES) * SECTOR_BYTES - start);
            self.data = Some(self.file.read(start, want as usize).await?);
            self.start = start;
        }
        let data = self.data.as_ref().expect("filled above");
        let from = ((position - self.start) as usize).min(data.len());
        let to = (from + (end - position) as usize).min(data.len());
        Ok(&data[from..to])
    }

    fn limit(&self) -> u64 {
        self.file.zeroed_end()
    }

    fn path(&self) -> std::path::PathBuf {
        self.file.path.clone()
    }
}
