//! Offline WAL inspection for `sluice wal inspect`: lists segments and frames,
//! verifies every checksum and reports the first bad frame. Uses plain buffered
//! reads (no executor needed; the broker should not be running on the directory).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::format::{self, SegmentHeader};
use crate::limits::{BATCH_BYTES_MAX, SEGMENT_HEADER_BYTES};
use sluice_schema::batch;

/// One frame as found on disk.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FrameSummary {
    /// Byte position in the segment.
    pub position: u64,
    /// Partition log id.
    pub log_id: u32,
    /// First offset.
    pub base_offset: u64,
    /// Last offset.
    pub last_offset: u64,
    /// Records.
    pub records: u32,
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
    /// Pre-allocated size.
    pub capacity: u64,
    /// Frames found valid.
    pub frames: u64,
    /// Bytes of valid frames.
    pub frame_bytes: u64,
    /// Where valid frames end.
    pub end: u64,
    /// Every frame (only when asked for).
    pub frame_list: Vec<FrameSummary>,
    /// The first invalid frame: position and reason.
    pub bad_frame: Option<(u64, String)>,
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

/// Inspects one segment file.
pub fn inspect_segment(path: &Path, list_frames: bool) -> Result<SegmentSummary, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut block = vec![0u8; SEGMENT_HEADER_BYTES as usize];
    file.read_exact(&mut block)
        .map_err(|e| format!("{}: reading header: {e}", path.display()))?;
    let header = SegmentHeader::parse(&block).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut summary = SegmentSummary {
        path: path.to_path_buf(),
        segment_id: header.segment_id.get(),
        shard: header.shard.get(),
        capacity: size,
        frames: 0,
        frame_bytes: 0,
        end: SEGMENT_HEADER_BYTES,
        frame_list: Vec::new(),
        bad_frame: None,
    };
    let mut position = SEGMENT_HEADER_BYTES;
    let mut frame = vec![0u8; batch::HEADER_BYTES];
    loop {
        if position + batch::HEADER_BYTES as u64 > size {
            break;
        }
        file.seek(SeekFrom::Start(position))
            .map_err(|e| e.to_string())?;
        frame.resize(batch::HEADER_BYTES, 0);
        file.read_exact(&mut frame).map_err(|e| e.to_string())?;
        if frame.iter().all(|b| *b == 0) {
            break;
        }
        let declared = format::header(&frame)
            .map(|h| h.frame_bytes.get() as usize)
            .unwrap_or(0);
        let length = declared.clamp(batch::HEADER_BYTES, BATCH_BYTES_MAX);
        let available = (size - position) as usize;
        frame.resize(length.min(available), 0);
        file.seek(SeekFrom::Start(position))
            .map_err(|e| e.to_string())?;
        file.read_exact(&mut frame).map_err(|e| e.to_string())?;
        match format::verify_stored(&frame, BATCH_BYTES_MAX) {
            Ok(stored) => {
                summary.frames += 1;
                summary.frame_bytes += stored.frame_bytes as u64;
                if list_frames {
                    summary.frame_list.push(FrameSummary {
                        position,
                        log_id: stored.log_id.0,
                        base_offset: stored.base_offset,
                        last_offset: stored.last_offset,
                        records: (stored.last_offset - stored.base_offset + 1) as u32,
                        bytes: stored.frame_bytes as u32,
                        max_timestamp_ms: stored.max_timestamp_ms,
                    });
                }
                position += stored.frame_bytes as u64;
            }
            Err(error) => {
                summary.bad_frame = Some((position, error.to_string()));
                break;
            }
        }
    }
    summary.end = position;
    Ok(summary)
}
