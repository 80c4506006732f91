//! Offline WAL inspection for `sluice wal inspect`: lists segments and frames,
//! verifies every checksum and reports every bad region, continuing past damage
//! (resyncing on the next intact frame) while the segment header is intact. Uses
//! plain reads (no executor; the broker should not be running on the directory).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{Result as StorageResult, StorageError};
use super::format::SegmentHeader;
use super::scan::{self, Found, SegmentBytes};
use crate::limits::SEGMENT_HEADER_BYTES;

/// One frame as found on disk.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FrameSummary {
    /// Byte position in the segment.
    pub position: u64,
    /// Partition log id.
    pub log_id: u32,
    /// First offset.
    pub base_offset: u64,
    /// One past the last offset (= `base_offset` for a control frame).
    pub end_offset: u64,
    /// Records.
    pub records: u32,
    /// Leader epoch (Raft term).
    pub epoch: u32,
    /// A control frame (Raft entry without records, truncation or hard state).
    pub control: bool,
    /// Frame bytes.
    pub bytes: u32,
    /// Max record timestamp.
    pub max_timestamp_ms: i64,
}

/// One segment's summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentSummary {
    /// File.
    pub path: PathBuf,
    /// Segment id from the header.
    pub segment_id: u32,
    /// Shard from the header.
    pub shard: u16,
    /// File size.
    pub capacity: u64,
    /// Frames found valid.
    pub frames: u64,
    /// Bytes of valid frames.
    pub frame_bytes: u64,
    /// Where the last valid frame ends.
    pub end: u64,
    /// A segment whose creation did not finish (its header block is still zero):
    /// recovery removes it; it holds nothing.
    pub unfinished: bool,
    /// Every frame (only when asked for).
    pub frame_list: Vec<FrameSummary>,
    /// Every bad region: where it starts, and what was found there. Scanning goes
    /// on at the next intact frame.
    pub bad_frames: Vec<(u64, String)>,
}

/// Inspects every segment in a WAL directory (or a data dir: all shards' WALs).
pub fn inspect_dir(dir: &Path, list_frames: bool) -> Result<Vec<SegmentSummary>, String> {
    let mut wal_dirs = Vec::new();
    if dir.join("wal").is_dir() {
        wal_dirs.push(dir.join("wal"));
    } else if has_segments(dir) {
        wal_dirs.push(dir.to_path_buf());
    } else {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut shards: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("shard-"))
            })
            .map(|p| p.join("wal"))
            .filter(|p| p.is_dir())
            .collect();
        shards.sort();
        wal_dirs.extend(shards);
    }
    if wal_dirs.is_empty() {
        return Err(format!(
            "{}: no WAL segments found (expected a data dir, a shard dir or a wal dir)",
            dir.display()
        ));
    }
    let mut out = Vec::new();
    for wal_dir in wal_dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
            .map_err(|e| format!("{}: {e}", wal_dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        files.sort();
        for file in files {
            out.push(inspect_segment(&file, list_frames)?);
        }
    }
    Ok(out)
}

fn has_segments(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "wal"))
        })
        .unwrap_or(false)
}

/// A segment file read with positioned reads.
struct FileBytes {
    file: File,
    path: PathBuf,
    size: u64,
    buffer: Vec<u8>,
}

impl SegmentBytes for FileBytes {
    async fn get(&mut self, position: u64, bytes: usize) -> StorageResult<&[u8]> {
        let end = position.saturating_add(bytes as u64).min(self.size);
        let len = end.saturating_sub(position) as usize;
        self.buffer.resize(len, 0);
        self.file
            .read_exact_at(&mut self.buffer, position)
            .map_err(|e| StorageError::std("read segment", &self.path, e))?;
        Ok(&self.buffer)
    }
    fn limit(&self) -> u64 {
        self.size
    }
    fn path(&self) -> PathBuf {
        self.path.clone()
    }
}

/// Inspects one segment file.
pub fn inspect_segment(path: &Path, list_frames: bool) -> Result<SegmentSummary, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut block = vec![0u8; (SEGMENT_HEADER_BYTES.min(size)) as usize];
    file.read_exact_at(&mut block, 0)
        .map_err(|e| format!("{}: reading header: {e}", path.display()))?;
    let mut summary = SegmentSummary {
        path: path.to_path_buf(),
        segment_id: 0,
        shard: 0,
        capacity: size,
        frames: 0,
        frame_bytes: 0,
        end: SEGMENT_HEADER_BYTES,
        unfinished: false,
        frame_list: Vec::new(),
        bad_frames: Vec::new(),
    };
    if block.iter().all(|b| *b == 0) {
        // The header is written last when a segment is created.
        summary.unfinished = true;
        summary.segment_id = super::segment::parse_file_name(
            &path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        )
        .map(|id| id.0)
        .unwrap_or(0);
        return Ok(summary);
    }
    let header = SegmentHeader::parse(&block).map_err(|e| format!("{}: {e}", path.display()))?;
    summary.segment_id = header.segment_id.get();
    summary.shard = header.shard.get();
    let mut source = FileBytes {
        file,
        path: path.to_path_buf(),
        size,
        buffer: Vec::new(),
    };
    futures_lite::future::block_on(walk(&mut source, &mut summary, list_frames))
        .map_err(|e| e.to_string())?;
    Ok(summary)
}

/// Inspects a segment held in memory (the whole file, header block included).
pub fn inspect_bytes(bytes: &[u8]) -> Result<SegmentSummary, String> {
    let header_block = &bytes[..bytes.len().min(SEGMENT_HEADER_BYTES as usize)];
    let mut summary = SegmentSummary {
        path: PathBuf::from("<memory>"),
        segment_id: 0,
        shard: 0,
        capacity: bytes.len() as u64,
        frames: 0,
        frame_bytes: 0,
        end: SEGMENT_HEADER_BYTES,
        unfinished: header_block.iter().all(|b| *b == 0),
        frame_list: Vec::new(),
        bad_frames: Vec::new(),
    };
    if summary.unfinished {
        return Ok(summary);
    }
    let header = SegmentHeader::parse(header_block)?;
    summary.segment_id = header.segment_id.get();
    summary.shard = header.shard.get();
    let mut source = scan::MemoryBytes { bytes };
    futures_lite::future::block_on(walk(&mut source, &mut summary, true))
        .map_err(|e| e.to_string())?;
    Ok(summary)
}

/// Follows frames from the first slot to the end of the data, noting bad regions.
async fn walk<S: SegmentBytes>(
    source: &mut S,
    summary: &mut SegmentSummary,
    list_frames: bool,
) -> StorageResult<()> {
    let mut position = Some(SEGMENT_HEADER_BYTES);
    while let Some(at) = position {
        let skip_from = match scan::classify(source, at).await? {
            Found::Valid(frame) => {
                summary.frames += 1;
                summary.frame_bytes += frame.frame_bytes as u64;
                summary.end = at + frame.frame_bytes as u64;
                if list_frames {
                    summary.frame_list.push(FrameSummary {
                        position: at,
                        log_id: frame.log_id.0,
                        base_offset: frame.base_offset,
                        end_offset: frame.end_offset,
                        records: (frame.end_offset - frame.base_offset) as u32,
                        epoch: frame.epoch.0,
                        control: frame.control,
                        bytes: frame.frame_bytes as u32,
                        max_timestamp_ms: frame.max_timestamp_ms,
                    });
                }
                position = Some(summary.end);
                continue;
            }
            Found::DamagedPayload(header, error) => {
                summary.bad_frames.push((
                    at,
                    format!(
                        "{error} (batch at offset {} of log {})",
                        header.base_offset, header.log_id
                    ),
                ));
                position = Some(at + header.frame_bytes as u64);
                continue;
            }
            Found::Zero => None,
            Found::Invalid(reason) => Some(reason),
        };
        let next = scan::next_valid_frame(source, at + 1).await?;
        match next {
            None => {
                // Nothing valid follows: the end (a torn tail if it is not zero).
                if let Some(reason) = skip_from {
                    summary.bad_frames.push((
                        at,
                        format!("{reason} (nothing valid follows: a torn tail if this is the newest segment)"),
                    ));
                }
                position = None;
            }
            Some(next) => {
                let what = skip_from.unwrap_or_else(|| "zero bytes".into());
                summary.bad_frames.push((
                    at,
                    format!("{what}; an intact frame follows at byte {next}"),
                ));
                position = Some(next);
            }
        }
    }
    Ok(())
}
