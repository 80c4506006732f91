//! The recovery scan of one segment, over any source of its bytes (a file during
//! recovery; memory in the fuzz target and tests).
//!
//! The scan follows frames from a start position, verifies each one completely and
//! rebuilds the index of every log it meets. Where it finds something that is not a
//! valid frame — an all-zero header, garbage, a bad CRC, a batch that does not
//! continue its log — the question is whether that is the end of the log, a torn
//! write, or damage to durable data. The rules:
//!
//! - **Nothing valid follows** (no intact frame anywhere after it in the segment): a
//!   zero header there is the clean end; anything else is a torn tail in a segment
//!   that may hold unsynced writes (the tail), corruption in any other.
//! - **Intact frames follow**: the bytes were damaged, unless the segment may hold
//!   unsynced writes and every intact frame that follows lies within `window` bytes
//!   (the most a crash can leave unsynced: see `RECOVERY_ZERO_BYTES`). A torn write
//!   can lose its first sectors and keep later ones, so that case is cut like a torn
//!   tail, but the intact frames it drops are reported (and the caller keeps a copy).
//!   An intact frame beyond the window proves the damaged bytes were durable — they
//!   may hold acknowledged records — so that is corruption: the scan fails with the
//!   position, and the broker refuses to start rather than drop them.
//! - **A damaged payload behind an intact header** is attributable: its length and
//!   log are known, so when it is corruption (by the rule above) only that log is
//!   marked corrupt from that batch and the scan goes on.
//! - A valid frame that does not continue its log's offsets is corruption (nothing a
//!   crash does produces one).

use std::collections::HashMap;

use super::control::Control;
use super::error::{Result, StorageError};
use super::format::{self, FrameError};
use super::index::{IndexedFrame, LogState, WalPosition};
use crate::limits::BATCH_BYTES_MAX;
use crate::types::{LogId, Offset, SegmentId};
use sluice_schema::batch;

/// Bytes of one segment, read on demand. Single-threaded by design (a shard's
/// recovery, or an offline tool), so the futures need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait SegmentBytes {
    /// The bytes `[position, position + bytes)`, fewer where the data ends.
    async fn get(&mut self, position: u64, bytes: usize) -> Result<&[u8]>;
    /// Where the segment's data ends.
    fn limit(&self) -> u64;
    /// The file, for error messages.
    fn path(&self) -> std::path::PathBuf;
}

/// A segment held in memory.
pub struct MemoryBytes<'a> {
    /// The whole segment file, header block included.
    pub bytes: &'a [u8],
}

impl SegmentBytes for MemoryBytes<'_> {
    async fn get(&mut self, position: u64, bytes: usize) -> Result<&[u8]> {
        let start = (position as usize).min(self.bytes.len());
        let end = start.saturating_add(bytes).min(self.bytes.len());
        Ok(&self.bytes[start..end])
    }
    fn limit(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn path(&self) -> std::path::PathBuf {
        "<memory>".into()
    }
}

/// How to treat what the scan finds.
#[derive(Clone, Copy, Debug)]
pub struct ScanMode {
    /// The segment's id.
    pub segment: SegmentId,
    /// Where to start (a frame boundary).
    pub start: u64,
    /// The segment may hold writes that were never made durable (the newest segment
    /// with frames, after a crash).
    pub may_be_torn: bool,
    /// How far past durable data unsynced writes can reach.
    pub window: u64,
}

/// How a segment's scan ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Frames end here and nothing valid follows.
    Clean(u64),
    /// A torn write: cut at `at`.
    Torn {
        /// First byte that is not part of a valid frame.
        at: u64,
        /// What was found there.
        reason: String,
        /// Intact frames after the cut (within the window), dropped with it:
        /// `(first frame, end of the last one)`.
        intact_after: Option<(u64, u64)>,
    },
}

/// What the scan learned besides the logs.
#[derive(Clone, Debug, Default)]
pub struct ScanStats {
    /// Frames verified and indexed.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Logs found corrupt: (log, offset, reason).
    pub corrupt_logs: Vec<(LogId, Offset, String)>,
    /// One past the index of each log's last entry frame in this segment.
    pub logs_in_segment: HashMap<LogId, u64>,
}

/// What the bytes at one position are.
pub enum Found {
    /// An all-zero header, or the end of the data.
    Zero,
    /// A completely valid frame.
    Valid(format::StoredFrame),
    /// Header intact, payload damaged.
    DamagedPayload(format::StoredFrame, FrameError),
    /// Not a frame: why.
    Invalid(String),
}

/// Classifies the bytes at `position`.
pub async fn classify<S: SegmentBytes>(source: &mut S, position: u64) -> Result<Found> {
    let limit = source.limit();
    if position + batch::HEADER_BYTES as u64 > limit {
        return Ok(Found::Zero);
    }
    let head = source.get(position, batch::HEADER_BYTES).await?;
    if head.iter().all(|b| *b == 0) {
        return Ok(Found::Zero);
    }
    let header = match format::verify_stored_header(head, BATCH_BYTES_MAX) {
        Ok(header) => header,
        Err(error) => return Ok(Found::Invalid(error.to_string())),
    };
    if position + header.frame_bytes as u64 > limit {
        return Ok(Found::Invalid(format!(
            "frame of {} bytes runs past the segment's data",
            header.frame_bytes
        )));
    }
    let bytes = source.get(position, header.frame_bytes).await?;
    Ok(match format::verify_stored(bytes, BATCH_BYTES_MAX) {
        Ok(frame) => Found::Valid(frame),
        Err(error @ FrameError::PayloadCrc { .. }) => Found::DamagedPayload(header, error),
        Err(error) => Found::Invalid(error.to_string()),
    })
}

/// The first position in `[from, limit)` where a completely valid frame starts.
pub async fn next_valid_frame<S: SegmentBytes>(source: &mut S, from: u64) -> Result<Option<u64>> {
    const CHUNK: usize = 4 << 20;
    let magic = batch::MAGIC.to_le_bytes();
    let limit = source.limit();
    let mut position = from;
    while position + batch::HEADER_BYTES as u64 <= limit {
        let chunk = source.get(position, CHUNK).await?;
        let mut candidates: Vec<u64> = Vec::new();
        let mut from = 0;
        // Jump from one occurrence of the magic's first byte to the next (a
        // vectorized search: zero-filled space goes by fast).
        while let Some(found) = chunk[from..].iter().position(|b| *b == magic[0]) {
            let at = from + found;
            if chunk.get(at..at + magic.len()) == Some(&magic[..]) {
                candidates.push(position + at as u64);
            }
            from = at + 1;
        }
        let scanned = chunk.len().saturating_sub(magic.len() - 1).max(1) as u64;
        for candidate in candidates {
            if matches!(classify(source, candidate).await?, Found::Valid(_)) {
                return Ok(Some(candidate));
            }
        }
        position += scanned;
    }
    Ok(None)
}

/// Scans one segment (see the module doc for the rules); fills `logs` and `corrupt`.
pub async fn scan_segment<S: SegmentBytes>(
    source: &mut S,
    mode: ScanMode,
    logs: &mut HashMap<LogId, LogState>,
    corrupt: &mut HashMap<LogId, (Offset, StorageError)>,
    stats: &mut ScanStats,
) -> Result<ScanEnd> {
    let mut position = mode.start;
    let mut visited = 0u64;
    loop {
        visited += 1;
        if visited.is_multiple_of(4096) {
            futures_lite::future::yield_now().await;
        }
        let found = classify(source, position).await?;
        let frame = match found {
            Found::Valid(frame) => frame,
            Found::Zero => return end_here(source, mode, position, None).await,
            Found::Invalid(reason) => return end_here(source, mode, position, Some(reason)).await,
            Found::DamagedPayload(header, error) => {
                let reason = format!(
                    "{error} in batch at offset {} of log {}",
                    header.base_offset, header.log_id
                );
                if !durable_proven(source, mode, position).await? {
                    return end_here(source, mode, position, Some(reason)).await;
                }
                let log = header.log_id;
                let path = source.path();
                let full = format!("{} byte {position}: {reason}", path.display());
                stats
                    .corrupt_logs
                    .push((log, header.base_offset, full.clone()));
                corrupt.entry(log).or_insert((
                    header.base_offset,
                    StorageError::Corrupt {
                        path,
                        position,
                        reason: full,
                    },
                ));
                position += header.frame_bytes as u64;
                continue;
            }
        };
        if !corrupt.contains_key(&frame.log_id) {
            index_frame(source, mode, position, frame, logs, stats).await?;
        }
        position += frame.frame_bytes as u64;
    }
}

/// Adds a valid frame to its log's index: an entry frame (a batch, or a control
/// entry of a replicated log) continues its log; a truncation marker or a hard
/// state applies to it. A frame that does not continue its log is corruption.
async fn index_frame<S: SegmentBytes>(
    source: &mut S,
    mode: ScanMode,
    position: u64,
    frame: format::StoredFrame,
    logs: &mut HashMap<LogId, LogState>,
    stats: &mut ScanStats,
) -> Result<()> {
    let control = if frame.control {
        let bytes = source.get(position, frame.frame_bytes).await?;
        Some(
            Control::decode(bytes).map_err(|error| StorageError::Corrupt {
                path: source.path(),
                position,
                reason: format!("log {} control frame: {error}", frame.log_id),
            })?,
        )
    } else {
        None
    };
    let fresh = !logs.contains_key(&frame.log_id);
    let entry = logs.entry(frame.log_id).or_default();
    if control.is_some() && entry.replicated.is_none() {
        entry.replicated = Some(Default::default());
    }
    let corrupt = |reason: String| StorageError::Corrupt {
        path: source.path(),
        position,
        reason,
    };
    match control {
        Some(Control::Truncate {
            index,
            offset,
            reset,
            prev_term,
        }) => {
            if reset {
                entry.reset_entries(index, offset, prev_term);
            } else if index > entry.end_index || index < entry.first_index() {
                return Err(corrupt(format!(
                    "log {} truncation at index {index} outside its entries [{}, {})",
                    frame.log_id,
                    entry.first_index(),
                    entry.end_index
                )));
            } else {
                entry.truncate_entries(index, offset);
            }
            entry.next_index = entry.end_index;
            entry.next_offset = entry.end_offset;
            return Ok(());
        }
        Some(Control::State { hard_state, anchor }) => {
            if fresh {
                entry.end_index = anchor.next_index;
                entry.end_offset = anchor.next_offset;
                entry.next_index = anchor.next_index;
                entry.next_offset = anchor.next_offset;
                entry.log_start = anchor.next_offset;
            } else if anchor.next_index != entry.end_index || anchor.next_offset != entry.end_offset
            {
                return Err(corrupt(format!(
                    "log {} hard state says its next entry is index {} at offset {}, its frames say index {} at offset {}; a crash cannot produce this",
                    frame.log_id, anchor.next_index, anchor.next_offset, entry.end_index, entry.end_offset
                )));
            }
            if let Some(replicated) = entry.replicated.as_mut() {
                if fresh {
                    replicated.start_term = anchor.prev_term;
                    replicated.terms.clear();
                }
                replicated.hard_state = hard_state;
                if hard_state.commit >= replicated.commit_index {
                    replicated.commit_index = hard_state.commit;
                    replicated.commit_offset = replicated.commit_offset.max(anchor.commit_offset);
                }
            }
            entry.fold();
            return Ok(());
        }
        Some(Control::Entry { .. }) | None => {}
    }
    if !fresh
        && control.is_none()
        && frame.end_offset <= entry.end_offset
        && frame.base_offset < entry.end_offset
    {
        // Already indexed from the checkpoint.
        return Ok(());
    }
    if !fresh && frame.base_offset != entry.end_offset {
        return Err(corrupt(format!(
            "log {} batch at offset {} does not continue the log (expected offset {}); a crash cannot produce this",
            frame.log_id, frame.base_offset, entry.end_offset
        )));
    }
    if fresh {
        entry.log_start = frame.base_offset;
        entry.end_offset = frame.base_offset;
    }
    let index = entry.end_index;
    entry.push(IndexedFrame {
        base_offset: frame.base_offset,
        end_offset: frame.end_offset,
        index,
        term: u64::from(frame.epoch.0),
        position: WalPosition::new(mode.segment, position),
        bytes: frame.frame_bytes as u32,
        max_timestamp_ms: frame.max_timestamp_ms,
    });
    entry.next_offset = frame.end_offset;
    entry.next_index = entry.end_index;
    entry.set_durable(frame.end_offset);
    stats.logs_in_segment.insert(frame.log_id, entry.end_index);
    stats.frames += 1;
    stats.bytes += frame.frame_bytes as u64;
    Ok(())
}

/// True when the bytes at `position` were durable: the segment holds no unsynced
/// writes, or an intact frame starts at least `window` bytes further on.
async fn durable_proven<S: SegmentBytes>(
    source: &mut S,
    mode: ScanMode,
    position: u64,
) -> Result<bool> {
    if !mode.may_be_torn {
        return Ok(true);
    }
    Ok(
        next_valid_frame(source, position.saturating_add(mode.window))
            .await?
            .is_some(),
    )
}

/// Decides what a non-frame at `position` means (see the module doc).
async fn end_here<S: SegmentBytes>(
    source: &mut S,
    mode: ScanMode,
    position: u64,
    invalid: Option<String>,
) -> Result<ScanEnd> {
    let what = invalid
        .clone()
        .unwrap_or_else(|| "a zero header".to_string());
    let Some(next) = next_valid_frame(source, position + 1).await? else {
        return match invalid {
            None => Ok(ScanEnd::Clean(position)),
            Some(reason) if mode.may_be_torn => Ok(ScanEnd::Torn {
                at: position,
                reason,
                intact_after: None,
            }),
            Some(reason) => Err(StorageError::Corrupt {
                path: source.path(),
                position,
                reason: format!("{reason} (this segment was durable: damage, not a torn write)"),
            }),
        };
    };
    if mode.may_be_torn && next < position.saturating_add(mode.window) {
        if let Some(beyond) = next_valid_frame(source, position.saturating_add(mode.window)).await?
        {
            return Err(corruption(source, position, &what, beyond));
        }
        let intact_end = last_intact_end(source, next).await?;
        return Ok(ScanEnd::Torn {
            at: position,
            reason: what,
            intact_after: Some((next, intact_end)),
        });
    }
    Err(corruption(source, position, &what, next))
}

fn corruption<S: SegmentBytes>(source: &S, position: u64, what: &str, next: u64) -> StorageError {
    StorageError::Corrupt {
        path: source.path(),
        position,
        reason: format!(
            "{what} where a batch should be, and an intact batch follows at byte {next}: the damaged bytes were durable and may hold acknowledged records, so the WAL refuses to open rather than drop them. Restore this node's data from a replica or a backup; to give up the records after the damage instead, move this segment and the newer ones aside (see docs/storage.md, \"Recovery\")"
        ),
    }
}

/// The end of the last valid frame reachable from `from` by resyncing (for the
/// report and the quarantine copy of a cut torn write).
async fn last_intact_end<S: SegmentBytes>(source: &mut S, from: u64) -> Result<u64> {
    let mut end = from;
    let mut position = Some(from);
    while let Some(at) = position {
        match classify(source, at).await? {
            Found::Valid(frame) => {
                end = at + frame.frame_bytes as u64;
                position = Some(end);
            }
            _ => position = next_valid_frame(source, at + 1).await?,
        }
    }
    Ok(end)
}

/// Runs a scan of an in-memory segment to completion (fuzzing and tests): the
/// source is always ready, so this never waits.
pub fn scan_in_memory(
    bytes: &[u8],
    mode: ScanMode,
) -> (Result<ScanEnd>, HashMap<LogId, LogState>, ScanStats) {
    let mut logs = HashMap::new();
    let mut corrupt = HashMap::new();
    let mut stats = ScanStats::default();
    let mut source = MemoryBytes { bytes };
    let result = futures_lite::future::block_on(scan_segment(
        &mut source,
        mode,
        &mut logs,
        &mut corrupt,
        &mut stats,
    ));
    (result, logs, stats)
}
