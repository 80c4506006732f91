//! The shard's write-ahead log: appends with group commit, reads, retention.
//!
//! # Write path
//!
//! `append` assigns offsets, stamps the batch and queues it, then waits for
//! durability. One *writer* task drains the queue: it lays every queued frame into
//! one aligned buffer (starting with the partial last block, whose earlier bytes are
//! rewritten unchanged) and issues one write. One *syncer* task runs `fdatasync`
//! whenever the writer is ahead of it; everything written while an `fdatasync` was
//! in flight is covered by the next one. So under load, each `fdatasync` commits
//! every append that arrived during the previous one: group commit.
//!
//! Durability order: an append completes only after an `fdatasync` that started
//! after its write completed has returned. The writer never has two writes in
//! flight (a write rewrites the previous write's last block, so two in flight could
//! land in either order); the syncer's `fdatasync` overlaps the next write.
//!
//! Rewriting the partial last block is safe for acknowledged bytes: the rewrite
//! carries the same bytes for them, and devices write a sector atomically, so a torn
//! rewrite leaves each sector either old or new — identical where acknowledged data
//! lives. A torn write can only damage bytes that were never acknowledged.
//!
//! Before a write goes to a new segment, everything in the old one is durable, so
//! only the last segment can ever hold a torn write.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use glommio::task::JoinHandle;

use super::cache::TailCache;
use super::control::{Anchor, Control, HardState};
use super::error::{Result, StorageError};
use super::format::{self, BatchInfo};
use super::index::{IndexedFrame, LogState, WalPosition};
use super::segment::SegmentFile;
use crate::limits::{
    INFLIGHT_BYTES_MAX, SECTOR_BYTES, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES,
    WRITE_BYTES_MAX,
};
use crate::sync::{Completion, Notify};
use crate::types::{Epoch, LogId, Offset, SegmentId, ShardId};

/// How a shard's WAL is laid out and sized.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// `<data-dir>/shard-<k>/wal`.
    pub dir: PathBuf,
    /// The owning shard.
    pub shard: ShardId,
    /// Segment size (pre-allocated); a multiple of 4 KiB.
    pub segment_bytes: u64,
    /// Bytes of recent frames kept in memory for reads.
    pub tail_cache_bytes: usize,
}

impl WalConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes)
            || !self.segment_bytes.is_multiple_of(SECTOR_BYTES)
        {
            return Err(format!(
                "segment size {} must be a multiple of {SECTOR_BYTES} in [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_MAX}]",
                self.segment_bytes
            ));
        }
        Ok(())
    }
}

/// Result of a durable append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record of the first batch.
    pub base_offset: Offset,
    /// Offset of the last record of the last batch.
    pub last_offset: Offset,
    /// The log's start offset when the append was queued.
    pub log_start: Offset,
}

/// A frame queued for the writer.
pub(super) struct Pending {
    pub(super) log: LogId,
    pub(super) frame: Bytes,
    pub(super) base_offset: Offset,
    /// One past the last offset (`base_offset` for a control frame).
    pub(super) end_offset: Offset,
    /// Raft index of an entry frame (plain logs: the frame's ordinal).
    pub(super) index: u64,
    /// Leader epoch / Raft term.
    pub(super) term: u64,
    pub(super) max_timestamp_ms: i64,
    pub(super) kind: PendingKind,
    pub(super) seq: u64,
    /// Set on the last frame of an append call.
    pub(super) completion: Option<Rc<Completion<Result<()>>>>,
    /// When it was queued for the writer.
    pub(super) queued: Instant,
}

/// What a queued frame is to the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PendingKind {
    /// A record batch (an entry with records).
    Batch,
    /// A control frame that is a Raft entry (no records).
    ControlEntry,
    /// A truncation marker (see `control.rs`).
    Truncate {
        index: u64,
        offset: Offset,
        reset: bool,
        prev_term: u64,
    },
    /// A hard-state frame.
    State(HardState),
}

impl PendingKind {
    fn is_entry(self) -> bool {
        matches!(self, PendingKind::Batch | PendingKind::ControlEntry)
    }
}

/// A completed write waiting for the `fdatasync` that covers it.
struct Written {
    seq_end: u64,
    bytes: usize,
    /// When its oldest frame was queued, when the write was issued and when it
    /// completed (for [`WalStages`]).
    queued: Instant,
    issued: Instant,
    completed: Instant,
    /// (log, offset after its last frame in the write) to publish once durable.
    durable_ends: Vec<(LogId, Offset)>,
    completions: Vec<Rc<Completion<Result<()>>>>,
}

/// An entry frame of a replicated log, stamped by the replica layer.
#[derive(Clone, Debug)]
pub struct EntryFrame {
    /// Raft index.
    pub index: u64,
    /// Raft term (= the frame's leader epoch).
    pub term: u64,
    /// First offset.
    pub base_offset: Offset,
    /// One past the last offset (= `base_offset` for a control entry).
    pub end_offset: Offset,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
    /// The whole frame (a record batch or a control frame).
    pub frame: Bytes,
}

/// One Ready's worth of writes to a replicated log, laid out in this order.
#[derive(Clone, Debug, Default)]
pub struct LogWrite {
    /// A [`Control::Truncate`] to apply before the entries.
    pub truncate: Option<Control>,
    /// Entries in index order, continuing the log (after the truncation).
    pub frames: Vec<EntryFrame>,
    /// A [`Control::State`] to write after the entries.
    pub state: Option<Control>,
}

impl LogWrite {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.truncate.is_none() && self.frames.is_empty() && self.state.is_none()
    }
}

/// A segment and what it holds.
pub(super) struct Segment {
    pub file: Rc<SegmentFile>,
    /// End of valid frames.
    pub end: u64,
    /// One past the Raft index (plain logs: ordinal) of each log's last entry frame
    /// in this segment: the segment is dead once every log's first retained entry
    /// is past it.
    pub logs: HashMap<LogId, u64>,
}

/// Counters, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct WalStats {
    /// Batches appended.
    pub appends: u64,
    /// Bytes appended (frames).
    pub append_bytes: u64,
    /// Writes issued.
    pub writes: u64,
    /// `fdatasync` calls.
    pub syncs: u64,
    /// Total time in `fdatasync`, microseconds.
    pub sync_us_total: u64,
    /// Segments rolled.
    pub rolls: u64,
    /// Segment steps the extender zero-filled.
    pub steps_zero_filled: u64,
    /// Segment steps the extender allocated (`fallocate`: large writes).
    pub steps_allocated: u64,
    /// Reads served from the tail cache.
    pub cache_hits: u64,
    /// Reads that went to disk.
    pub cache_misses: u64,
    /// Bytes in the tail cache.
    pub cache_bytes: u64,
}

pub(super) struct State {
    /// Moving average of the bytes per write (how the extender prepares space).
    pub write_bytes_average: f64,
    pub segments: BTreeMap<SegmentId, Segment>,
    pub active: SegmentId,
    /// Next frame byte in the active segment.
    pub write_byte: u64,
    /// Bytes of the active segment from `align_down(write_byte)` to `write_byte`.
    pub tail_block: Vec<u8>,
    pending: VecDeque<Pending>,
    unsynced: VecDeque<Written>,
    pub inflight_bytes: usize,
    next_ticket: u64,
    serving_ticket: u64,
    abandoned_tickets: std::collections::BTreeSet<u64>,
    next_seq: u64,
    written_seq: u64,
    durable_seq: u64,
    pub logs: HashMap<LogId, LogState>,
    /// Per-log cap on bytes in one segment (topic `segment.bytes`).
    pub segment_limits: HashMap<LogId, u64>,
    /// Bytes of each log in the active segment.
    pub active_log_bytes: HashMap<LogId, u64>,
    /// Logs found corrupt at recovery: offsets at and above this are not served.
    pub corrupt: HashMap<LogId, (Offset, StorageError)>,
    pub cache: TailCache,
    failed: Option<StorageError>,
    pub(super) closing: bool,
    pub(super) writer_done: bool,
    /// A zero-filled segment made ahead of need.
    spare: Option<SegmentFile>,
    preparing_spare: bool,
    /// Why the extender last failed to zero-fill more of the active segment (cleared
    /// when it succeeds); the writer fails appends that need the space with it.
    pub(super) extend_error: Option<StorageError>,
    pub stats: WalStats,
}

/// One shard's write-ahead log.
pub struct Wal {
    pub(super) config: WalConfig,
    pub(super) state: RefCell<State>,
    writer_wake: Notify,
    syncer_wake: Notify,
    pub(super) extender_wake: Notify,
    pub(super) extended: Notify,
    space_freed: Notify,
    durable_advanced: Notify,
    tasks: RefCell<Vec<JoinHandle<()>>>,
    /// Told the duration (µs) of every successful fdatasync and how many appends
    /// it made durable (metrics).
    sync_observer: SyncObserver,
    /// Told the stages of every write once it is durable (metrics).
    stage_observer: StageObserver,
}

/// See [`Wal::set_sync_observer`].
type SyncObserver = RefCell<Option<Box<dyn Fn(u64, u64)>>>;

/// See [`Wal::set_stage_observer`].
type StageObserver = RefCell<Option<Box<dyn Fn(WalStages)>>>;

/// Where one write's time went, in microseconds, from its oldest frame's
/// queueing to the fdatasync that made it durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStages {
    /// Queued until the writer issued the write (waiting for an earlier write,
    /// a segment roll or zero-filled space).
    pub queue_us: u64,
    /// The write itself (issued → completed).
    pub write_us: u64,
    /// Written, until the fdatasync covering it was issued (an earlier
    /// fdatasync still running).
    pub sync_wait_us: u64,
    /// The fdatasync covering it.
    pub sync_us: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Wal {
    pub(super) fn from_recovered(
        config: WalConfig,
        segments: BTreeMap<SegmentId, Segment>,
        write_byte: u64,
        tail_block: Vec<u8>,
        logs: HashMap<LogId, LogState>,
        corrupt: HashMap<LogId, (Offset, StorageError)>,
    ) -> Rc<Wal> {
        let active = *segments
            .keys()
            .next_back()
            .expect("recovery always leaves an active segment");
        let cache = TailCache::new(config.tail_cache_bytes);
        let mut active_log_bytes: HashMap<LogId, u64> = HashMap::new();
        for (log, entry) in &logs {
            let bytes: u64 = entry
                .runs
                .iter()
                .filter(|r| r.position.segment() == active)
                .map(|r| u64::from(r.bytes))
                .sum();
            if bytes > 0 {
                active_log_bytes.insert(*log, bytes);
            }
        }
        let wal = Rc::new(Wal {
            config,
            state: RefCell::new(State {
                segments,
                active,
                write_byte,
                tail_block,
                pending: VecDeque::new(),
                unsynced: VecDeque::new(),
                inflight_bytes: 0,
                next_ticket: 0,
                serving_ticket: 0,
                abandoned_tickets: std::collections::BTreeSet::new(),
                next_seq: 1,
                written_seq: 0,
                durable_seq: 0,
                logs,
                segment_limits: HashMap::new(),
                active_log_bytes,
                corrupt,
                cache,
                failed: None,
                closing: false,
                writer_done: false,
                spare: None,
                preparing_spare: false,
                extend_error: None,
                stats: WalStats::default(),
                write_bytes_average: 0.0,
            }),
            writer_wake: Notify::default(),
            syncer_wake: Notify::default(),
            extender_wake: Notify::default(),
            extended: Notify::default(),
            space_freed: Notify::default(),
            durable_advanced: Notify::default(),
            tasks: RefCell::new(Vec::new()),
            sync_observer: RefCell::new(None),
            stage_observer: RefCell::new(None),
        });
        let writer = glommio::spawn_local(writer_loop(wal.clone())).detach();
        let syncer = glommio::spawn_local(syncer_loop(wal.clone())).detach();
        let extender = glommio::spawn_local(super::roll::extender_loop(wal.clone())).detach();
        wal.tasks.borrow_mut().extend([writer, syncer, extender]);
        wal
    }

    /// The configuration.
    pub fn config(&self) -> &WalConfig {
        &self.config
    }

    /// Registers a new, empty log. Idempotent.
    pub fn create_log(&self, log: LogId) {
        self.state.borrow_mut().logs.entry(log).or_default();
    }

    /// Registers a replicated log (a Raft group's: its entries arrive stamped, see
    /// [`Wal::submit`], and its reads stop at the commit point the replica layer
    /// sets). Idempotent; a log recovered with replica state stays as it is.
    pub fn create_replicated_log(&self, log: LogId) {
        let mut state = self.state.borrow_mut();
        let entry = state
            .logs
            .entry(log)
            .or_insert_with(LogState::new_replicated);
        if entry.replicated.is_none() {
            entry.replicated = Some(Default::default());
        }
    }

    /// Caps how many bytes of `log` one segment may hold: the WAL rolls rather than
    /// exceed it (so retention can free that log's space at this granularity).
    pub fn set_segment_limit(&self, log: LogId, bytes: u64) {
        self.state.borrow_mut().segment_limits.insert(log, bytes);
    }

    /// Forgets a log; its batches become dead and their segments reclaimable.
    pub fn delete_log(&self, log: LogId) {
        let mut state = self.state.borrow_mut();
        state.logs.remove(&log);
        state.corrupt.remove(&log);
        state.cache.remove_log(log);
    }

    /// Logs this WAL knows.
    pub fn log_ids(&self) -> Vec<LogId> {
        self.state.borrow().logs.keys().copied().collect()
    }

    /// A copy of a log's offsets: (log start, high watermark, stored bytes).
    pub fn log_offsets(&self, log: LogId) -> Result<(Offset, Offset, u64)> {
        let state = self.state.borrow();
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        Ok((entry.log_start, entry.high_watermark, entry.stored_bytes))
    }

    /// First offset at or after `timestamp_ms` (by batch max timestamp), with that
    /// batch's max timestamp; `None` when no stored batch is that recent.
    pub fn offset_for_timestamp(
        &self,
        log: LogId,
        timestamp_ms: i64,
    ) -> Result<Option<(Offset, i64)>> {
        let state = self.state.borrow();
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        Ok(entry.offset_for_timestamp(timestamp_ms))
    }

    /// The offset from which `log` is corrupt (nothing at or past it is served).
    pub fn corrupt_from(&self, log: LogId) -> Option<Offset> {
        self.state
            .borrow()
            .corrupt
            .get(&log)
            .map(|(offset, _)| *offset)
    }

    /// Bytes of memory the per-log indexes use.
    pub fn index_bytes(&self) -> usize {
        let state = self.state.borrow();
        state.logs.values().map(LogState::index_bytes).sum()
    }

    /// Counters.
    pub fn stats(&self) -> WalStats {
        let state = self.state.borrow();
        let mut stats = state.stats;
        stats.cache_hits = state.cache.hits;
        stats.cache_misses = state.cache.misses;
        stats.cache_bytes = state.cache.bytes() as u64;
        stats
    }

    /// Completes when some log's high watermark may have advanced (long-poll).
    pub async fn durable_advanced(&self) {
        self.durable_advanced.wait().await
    }

    /// Appends verified client batches (see [`format::verify_client_batch`]) to one
    /// log, as one unit: consecutive offsets, in order. Completes once durable.
    pub async fn append(
        &self,
        log: LogId,
        epoch: Epoch,
        batches: &[(Bytes, BatchInfo)],
    ) -> Result<Appended> {
        let bytes: usize = batches.iter().map(|(frame, _)| frame.len()).sum();
        let frame_limit = (self.config.segment_bytes - SEGMENT_HEADER_BYTES) as usize;
        if let Some((frame, _)) = batches.iter().find(|(frame, _)| frame.len() > frame_limit) {
            return Err(StorageError::BatchTooLarge {
                bytes: frame.len(),
                limit: frame_limit,
            });
        }
        self.reserve(bytes).await?;
        let (completion, appended) = self.enqueue(log, epoch, batches, bytes)?;
        self.writer_wake.notify_all();
        self.extender_wake.notify_all();
        completion.wait().await?;
        Ok(appended)
    }

    /// Waits until `bytes` more fit under `INFLIGHT_BYTES_MAX` (backpressure).
    ///
    /// Admission is first come, first served (a ticket queue), so appends are
    /// queued in the order they asked: a small append never overtakes a large one
    /// waiting for space, which keeps a connection's pipelined batches in order.
    async fn reserve(&self, bytes: usize) -> Result<()> {
        let mut ticket = Ticket {
            wal: self,
            number: {
                let mut state = self.state.borrow_mut();
                state.next_ticket += 1;
                state.next_ticket - 1
            },
            served: false,
        };
        loop {
            {
                let mut state = self.state.borrow_mut();
                if let Some(error) = &state.failed {
                    return Err(StorageError::Failed(error.to_string()));
                }
                if state.closing {
                    return Err(StorageError::ShuttingDown);
                }
                let fits =
                    state.inflight_bytes == 0 || state.inflight_bytes + bytes <= INFLIGHT_BYTES_MAX;
                if state.serving_ticket == ticket.number && fits {
                    ticket.served = true;
                    advance_tickets(&mut state);
                    drop(state);
                    self.space_freed.notify_all();
                    return Ok(());
                }
            }
            self.space_freed.wait().await;
        }
    }

    fn enqueue(
        &self,
        log: LogId,
        epoch: Epoch,
        batches: &[(Bytes, BatchInfo)],
        bytes: usize,
    ) -> Result<(Rc<Completion<Result<()>>>, Appended)> {
        let now = Instant::now();
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        if let Some((offset, error)) = state.corrupt.get(&log) {
            return Err(StorageError::Corrupt {
                path: self.config.dir.clone(),
                position: *offset,
                reason: format!(
                    "log {log} is corrupt at offset {offset} and refuses appends: {error}"
                ),
            });
        }
        let entry = state
            .logs
            .get_mut(&log)
            .ok_or(StorageError::UnknownLog(log))?;
        if entry.replicated.is_some() {
            return Err(StorageError::Failed(format!(
                "log {log} is replicated: its entries come through its replica"
            )));
        }
        let completion = Completion::new();
        let base_offset = entry.next_offset;
        for (position, (frame, info)) in batches.iter().enumerate() {
            let first = entry.next_offset;
            let end = first + u64::from(info.record_count);
            entry.next_offset = end;
            let index = entry.next_index;
            entry.next_index += 1;
            let mut stamped = BytesMut::from(&frame[..]);
            format::stamp(&mut stamped, first, log, epoch);
            let seq = state.next_seq;
            state.next_seq += 1;
            state.pending.push_back(Pending {
                log,
                frame: stamped.freeze(),
                base_offset: first,
                end_offset: end,
                index,
                term: u64::from(epoch.0),
                max_timestamp_ms: info.max_timestamp_ms,
                kind: PendingKind::Batch,
                seq,
                completion: (position + 1 == batches.len()).then(|| completion.clone()),
                queued: now,
            });
        }
        state.inflight_bytes += bytes;
        state.stats.appends += batches.len() as u64;
        state.stats.append_bytes += bytes as u64;
        let appended = Appended {
            base_offset,
            last_offset: entry.next_offset - 1,
            log_start: entry.log_start,
        };
        Ok((completion, appended))
    }

    /// Queues one Ready's write to a replicated log: the truncation, the entries
    /// (stamped frames, continuing the log after the truncation) and the hard
    /// state, in that order, all in one unit. The completion fires once all of it
    /// is durable. Never waits for space: a follower must take what its leader
    /// sends (the leader's proposals wait in [`Wal::wait_for_space`]).
    pub fn submit(&self, log: LogId, write: LogWrite) -> Result<Rc<Completion<Result<()>>>> {
        let completion = self.enqueue_write(log, write)?;
        self.writer_wake.notify_all();
        self.extender_wake.notify_all();
        Ok(completion)
    }

    fn enqueue_write(&self, log: LogId, write: LogWrite) -> Result<Rc<Completion<Result<()>>>> {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        if let Some(error) = &state.failed {
            return Err(StorageError::Failed(error.to_string()));
        }
        if state.closing {
            return Err(StorageError::ShuttingDown);
        }
        if let Some((offset, error)) = state.corrupt.get(&log) {
            return Err(StorageError::Corrupt {
                path: self.config.dir.clone(),
                position: *offset,
                reason: format!("log {log} is corrupt at offset {offset}: {error}"),
            });
        }
        let entry = state
            .logs
            .get_mut(&log)
            .ok_or(StorageError::UnknownLog(log))?;
        if entry.replicated.is_none() {
            return Err(StorageError::Failed(format!("log {log} is not replicated")));
        }
        let frame_limit = (self.config.segment_bytes - SEGMENT_HEADER_BYTES) as usize;
        check_write(log, entry, &write, frame_limit)?;
        let now = now_ms();
        let term = write.frames.last().map_or(0, |f| f.term);
        let mut queued: Vec<Pending> = Vec::new();
        if let Some(Control::Truncate {
            index,
            offset,
            reset,
            prev_term,
        }) = write.truncate.clone()
        {
            let frame = Control::Truncate {
                index,
                offset,
                reset,
                prev_term,
            }
            .encode(log, offset, Epoch(term as u32), now);
            queued.push(control_pending(
                log,
                frame,
                offset,
                now,
                PendingKind::Truncate {
                    index,
                    offset,
                    reset,
                    prev_term,
                },
            ));
            entry.next_index = index;
            entry.next_offset = offset;
        }
        for frame in write.frames {
            let kind = if frame.end_offset > frame.base_offset {
                PendingKind::Batch
            } else {
                PendingKind::ControlEntry
            };
            entry.next_index = frame.index + 1;
            entry.next_offset = frame.end_offset;
            queued.push(Pending {
                log,
                base_offset: frame.base_offset,
                end_offset: frame.end_offset,
                index: frame.index,
                term: frame.term,
                max_timestamp_ms: frame.max_timestamp_ms,
                kind,
                seq: 0,
                completion: None,
                frame: frame.frame,
                queued: Instant::now(),
            });
        }
        if let Some(Control::State { hard_state, anchor }) = write.state {
            let frame = Control::State { hard_state, anchor }.encode(
                log,
                entry.next_offset,
                Epoch(hard_state.term as u32),
                now,
            );
            queued.push(control_pending(
                log,
                frame,
                entry.next_offset,
                now,
                PendingKind::State(hard_state),
            ));
        }
        let completion = Completion::new();
        let count = queued.len();
        for (position, mut pending) in queued.into_iter().enumerate() {
            pending.seq = state.next_seq;
            state.next_seq += 1;
            if position + 1 == count {
                pending.completion = Some(completion.clone());
            }
            state.inflight_bytes += pending.frame.len();
            state.stats.append_bytes += pending.frame.len() as u64;
            state.stats.appends += u64::from(pending.kind.is_entry());
            state.pending.push_back(pending);
        }
        if count == 0 {
            completion.complete(Ok(()));
        }
        Ok(completion)
    }

    /// Waits until `bytes` more fit in the WAL's in-flight budget (a leader calls
    /// this before proposing, so clients feel backpressure before Raft does).
    pub async fn wait_for_space(&self, bytes: usize) -> Result<()> {
        self.reserve(bytes).await
    }

    /// Moves a replicated log's commit point (see [`LogState::set_commit`]) and
    /// wakes long-polling reads.
    pub fn set_commit(&self, log: LogId, index: u64, offset: Offset) {
        let mut state = self.state.borrow_mut();
        if let Some(entry) = state.logs.get_mut(&log) {
            let before = entry.high_watermark;
            entry.set_commit(index, offset);
            if entry.high_watermark != before {
                drop(state);
                self.durable_advanced.notify_all();
            }
        }
    }

    /// A replicated log's state as recovered or written: see [`ReplicatedView`].
    pub fn replicated_view(&self, log: LogId) -> Result<ReplicatedView> {
        let state = self.state.borrow();
        let entry = state.logs.get(&log).ok_or(StorageError::UnknownLog(log))?;
        let replicated = entry
            .replicated
            .as_ref()
            .ok_or_else(|| StorageError::Failed(format!("log {log} is not replicated")))?;
        Ok(ReplicatedView {
            first_index: entry.first_index(),
            end_index: entry.next_index,
            next_offset: entry.next_offset,
            start_term: replicated.start_term,
            terms: replicated.terms.clone(),
            hard_state: replicated.hard_state,
            commit_index: replicated.commit_index,
            commit_offset: replicated.commit_offset,
            log_start: entry.log_start,
        })
    }

    /// Stops accepting appends, writes and syncs what is queued, and stops the tasks.
    pub async fn close(&self) {
        self.state.borrow_mut().closing = true;
        self.writer_wake.notify_all();
        self.syncer_wake.notify_all();
        self.extender_wake.notify_all();
        self.extended.notify_all();
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        for task in tasks {
            let _ = task.await;
        }
        // Let a spare segment being zero-filled finish, so no half-made file is left.
        while self.state.borrow().preparing_spare {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        // A finished spare stays on disk and is appended to after the next start.
        drop(self.state.borrow_mut().spare.take());
    }

    /// True when nothing is queued or unsynced.
    pub fn is_idle(&self) -> bool {
        let state = self.state.borrow();
        state.pending.is_empty() && state.unsynced.is_empty()
    }

    /// Fails everything queued and rolls offsets back; `sticky` keeps the WAL failed.
    fn fail_pending(&self, state: &mut State, error: &StorageError) {
        let mut rollback: HashMap<LogId, (Offset, u64)> = HashMap::new();
        for pending in state.pending.drain(..) {
            state.inflight_bytes -= pending.frame.len();
            if pending.kind.is_entry() {
                let first = rollback
                    .entry(pending.log)
                    .or_insert((pending.base_offset, pending.index));
                *first = (first.0.min(pending.base_offset), first.1.min(pending.index));
            }
            if let Some(completion) = pending.completion {
                completion.complete(Err(error.clone()));
            }
        }
        for (log, (offset, index)) in rollback {
            if let Some(entry) = state.logs.get_mut(&log) {
                entry.truncate_from(offset, index);
            }
            state.cache.truncate(log, offset);
        }
        self.space_freed.notify_all();
    }
}

/// Large writes are split into chunks of this size issued concurrently.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
const _: () = assert!((WRITE_CHUNK_BYTES as u64).is_multiple_of(SECTOR_BYTES));

/// Copies `bytes` into the chunk sequence at byte `at`; returns the new end.
fn put(chunks: &mut [glommio::io::DmaBuffer], mut at: usize, mut bytes: &[u8]) -> usize {
    while !bytes.is_empty() {
        let (chunk, offset) = (at / WRITE_CHUNK_BYTES, at % WRITE_CHUNK_BYTES);
        let out = chunks[chunk].as_bytes_mut();
        let n = bytes.len().min(out.len() - offset);
        out[offset..offset + n].copy_from_slice(&bytes[..n]);
        at += n;
        bytes = &bytes[n..];
    }
    at
}

/// Zeroes the chunk bytes from `at` to the end (the padding of the last block).
fn zero_rest(chunks: &mut [glommio::io::DmaBuffer], at: usize) {
    let first = at / WRITE_CHUNK_BYTES;
    for (index, chunk) in chunks.iter_mut().enumerate().skip(first) {
        let from = if index == first {
            at % WRITE_CHUNK_BYTES
        } else {
            0
        };
        chunk.as_bytes_mut()[from..].fill(0);
    }
}

/// A place in the admission queue; an abandoned place (its append was cancelled)
/// is skipped so the queue never stalls.
struct Ticket<'a> {
    wal: &'a Wal,
    number: u64,
    served: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut state = self.wal.state.borrow_mut();
        if state.serving_ticket == self.number {
            advance_tickets(&mut state);
        } else {
            state.abandoned_tickets.insert(self.number);
        }
        drop(state);
        self.wal.space_freed.notify_all();
    }
}

/// Moves the queue past the served ticket and any abandoned ones after it.
fn advance_tickets(state: &mut State) {
    state.serving_ticket += 1;
    while state.abandoned_tickets.remove(&state.serving_ticket) {
        state.serving_ticket += 1;
    }
}

/// Takes queued frames for one write: those that fit in the active segment's
/// zero-filled extent and in `WRITE_BYTES_MAX` (the caller checked that the first
/// one fits).
fn take_batch(state: &mut State) -> Vec<Pending> {
    let capacity = state.segments[&state.active].file.zeroed_end();
    let block_start = state.write_byte / SECTOR_BYTES * SECTOR_BYTES;
    let mut end = state.write_byte;
    let mut taken = Vec::new();
    let mut added: HashMap<LogId, u64> = HashMap::new();
    while let Some(next) = state.pending.front() {
        let next_end = end + next.frame.len() as u64;
        let fits_write = next_end - block_start <= WRITE_BYTES_MAX as u64 || taken.is_empty();
        let already = added.get(&next.log).copied().unwrap_or(0);
        if next_end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES > capacity
            || !fits_write
            || over_log_limit(state, next.log, already, next.frame.len())
        {
            break;
        }
        *added.entry(next.log).or_default() += next.frame.len() as u64;
        end = next_end;
        taken.extend(state.pending.pop_front());
    }
    taken
}

/// True if `bytes` more of `log` (after `pending` bytes already laid out in this
/// write) would take it past its per-segment limit in the active segment. A log
/// with nothing in the segment yet is never over (a batch larger than the limit
/// still gets a segment).
fn over_log_limit(state: &State, log: LogId, pending: u64, bytes: usize) -> bool {
    let Some(limit) = state.segment_limits.get(&log) else {
        return false;
    };
    let have = state.active_log_bytes.get(&log).copied().unwrap_or(0) + pending;
    have > 0 && have + bytes as u64 > *limit
}

async fn writer_loop(wal: Rc<Wal>) {
    loop {
        let wake = wal.writer_wake.wait();
        let action = {
            let state = wal.state.borrow();
            if state.failed.is_some() && !state.pending.is_empty() {
                Some(false)
            } else if state.pending.is_empty() {
                if state.closing {
                    break;
                }
                None
            } else {
                Some(true)
            }
        };
        match action {
            None => wake.await,
            Some(false) => {
                let mut state = wal.state.borrow_mut();
                let error = state.failed.clone().unwrap_or(StorageError::ShuttingDown);
                wal.fail_pending(&mut state, &StorageError::Failed(error.to_string()));
            }
            Some(true) => write_once(&wal).await,
        }
    }
    wal.state.borrow_mut().writer_done = true;
    wal.syncer_wake.notify_all();
    wal.extender_wake.notify_all();
}

/// One write: roll if the next frame does not fit, then lay out and write a batch.
async fn write_once(wal: &Rc<Wal>) {
    let needs_roll = {
        let state = wal.state.borrow();
        let capacity = state.segments[&state.active].file.capacity;
        state.pending.front().is_some_and(|p| {
            state.write_byte + p.frame.len() as u64 > capacity
                || over_log_limit(&state, p.log, 0, p.frame.len())
        })
    };
    if needs_roll {
        if let Err(error) = super::roll::roll(wal).await {
            tracing::error!(shard = %wal.config.shard, %error, "cannot roll WAL segment");
            let mut state = wal.state.borrow_mut();
            if !matches!(error, StorageError::DiskFull { .. }) {
                state.failed = Some(error.clone());
            }
            wal.fail_pending(&mut state, &error);
            return;
        }
    }
    if !wait_for_extent(wal).await {
        return;
    }
    let (taken, file, block_start, buffers, end, new_tail) = {
        let mut state = wal.state.borrow_mut();
        let taken = take_batch(&mut state);
        if taken.is_empty() {
            return;
        }
        let segment = &state.segments[&state.active];
        let file = segment.file.clone();
        let block_start = state.write_byte / SECTOR_BYTES * SECTOR_BYTES;
        let frames_bytes: usize = taken.iter().map(|p| p.frame.len()).sum();
        let end = state.write_byte + frames_bytes as u64;
        let buffer_bytes = ((end - block_start).div_ceil(SECTOR_BYTES) * SECTOR_BYTES) as usize;
        let mut chunks: Vec<_> = (0..buffer_bytes.div_ceil(WRITE_CHUNK_BYTES))
            .map(|i| {
                file.file
                    .alloc_dma_buffer(WRITE_CHUNK_BYTES.min(buffer_bytes - i * WRITE_CHUNK_BYTES))
            })
            .collect();
        let mut at = put(&mut chunks, 0, &state.tail_block);
        for pending in &taken {
            at = put(&mut chunks, at, &pending.frame);
        }
        zero_rest(&mut chunks, at);
        // The new partial last block, which the next write rewrites (a block never
        // straddles two chunks: chunks are whole blocks).
        let new_tail_from = (end / SECTOR_BYTES * SECTOR_BYTES - block_start) as usize;
        let new_tail = if new_tail_from == at {
            // The write ends on a block boundary (possibly a chunk boundary too).
            Vec::new()
        } else {
            let chunk = new_tail_from / WRITE_CHUNK_BYTES;
            let base = chunk * WRITE_CHUNK_BYTES;
            chunks[chunk].as_bytes()[new_tail_from - base..at - base].to_vec()
        };
        (taken, file, block_start, chunks, end, new_tail)
    };
    // The chunks go out concurrently (queue depth for large writes); only the first
    // block overlaps the previous write, which has completed.
    let issued = Instant::now();
    let writes = buffers
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| file.write(chunk, block_start + (i * WRITE_CHUNK_BYTES) as u64));
    let result = futures::future::join_all(writes)
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .map(|_| ());
    let mut state = wal.state.borrow_mut();
    match result {
        Ok(()) => record_write(wal, &mut state, taken, end, new_tail, issued),
        Err(error) => {
            tracing::error!(shard = %wal.config.shard, %error, "WAL write failed");
            // Put the taken frames back in front so they fail (and roll back) together.
            for pending in taken.into_iter().rev() {
                state.pending.push_front(pending);
            }
            if !matches!(error, StorageError::DiskFull { .. }) {
                state.failed = Some(error.clone());
            }
            wal.fail_pending(&mut state, &error);
        }
    }
}

/// Waits until the first queued frame fits in the active segment's zero-filled
/// extent (the extender works ahead of the writer; a burst can outrun it). False
/// when the queued frames were failed instead (the extender could not get space).
async fn wait_for_extent(wal: &Rc<Wal>) -> bool {
    loop {
        let wake = wal.extended.wait();
        {
            let mut state = wal.state.borrow_mut();
            let Some(first) = state.pending.front() else {
                return false;
            };
            let end = state.write_byte + first.frame.len() as u64;
            let zeroed_end = state.segments[&state.active].file.zeroed_end();
            if end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES <= zeroed_end {
                return true;
            }
            if let Some(error) = state.extend_error.take() {
                wal.fail_pending(&mut state, &error);
                return false;
            }
            if state.closing && state.failed.is_some() {
                return false;
            }
        }
        wal.extender_wake.notify_all();
        wake.await;
    }
}

/// Publishes a completed write: index, cache, segment contents, tail block.
fn record_write(
    wal: &Wal,
    state: &mut State,
    taken: Vec<Pending>,
    end: u64,
    new_tail: Vec<u8>,
    issued: Instant,
) {
    let completed = Instant::now();
    let queued = taken.iter().map(|p| p.queued).min().unwrap_or(issued);
    let active = state.active;
    let mut position = state.write_byte;
    let mut durable_ends: Vec<(LogId, Offset)> = Vec::new();
    let mut completions = Vec::new();
    let mut bytes = 0;
    // Writes are numbered in the order they complete (one at a time), so the
    // syncer's "durable up to" is a write number.
    let seq_end = state.written_seq + 1;
    for pending in taken {
        let frame_bytes = pending.frame.len() as u32;
        let at = WalPosition::new(active, position);
        index_pending(state, &pending, at);
        if pending.kind.is_entry() {
            if let Some(segment) = state.segments.get_mut(&active) {
                segment.logs.insert(pending.log, pending.index + 1);
            }
            match durable_ends.iter_mut().find(|(log, _)| *log == pending.log) {
                Some(entry) => entry.1 = pending.end_offset,
                None => durable_ends.push((pending.log, pending.end_offset)),
            }
        }
        *state.active_log_bytes.entry(pending.log).or_default() += u64::from(frame_bytes);
        position += u64::from(frame_bytes);
        bytes += frame_bytes as usize;
        if pending.kind == PendingKind::Batch {
            state.cache.insert(
                pending.log,
                pending.base_offset,
                pending.end_offset - 1,
                pending.frame,
            );
        }
        completions.extend(pending.completion);
    }
    debug_assert_eq!(position, end);
    debug_assert_eq!(new_tail.len() as u64, end % SECTOR_BYTES);
    state.tail_block = new_tail;
    state.write_byte = end;
    if let Some(segment) = state.segments.get_mut(&active) {
        segment.end = end;
    }
    state.written_seq = seq_end;
    state.stats.writes += 1;
    state.write_bytes_average = 0.9 * state.write_bytes_average + 0.1 * bytes as f64;
    state.unsynced.push_back(Written {
        seq_end,
        bytes,
        queued,
        issued,
        completed,
        durable_ends,
        completions,
    });
    wal.syncer_wake.notify_all();
    wal.extender_wake.notify_all();
}

/// Applies one written frame to its log's index (entries), truncation or hard state.
fn index_pending(state: &mut State, pending: &Pending, at: WalPosition) {
    let Some(log) = state.logs.get_mut(&pending.log) else {
        return;
    };
    match pending.kind {
        PendingKind::Batch | PendingKind::ControlEntry => log.push(IndexedFrame {
            base_offset: pending.base_offset,
            end_offset: pending.end_offset,
            index: pending.index,
            term: pending.term,
            position: at,
            bytes: pending.frame.len() as u32,
            max_timestamp_ms: pending.max_timestamp_ms,
        }),
        PendingKind::Truncate {
            index,
            offset,
            reset,
            prev_term,
        } => {
            if reset {
                log.reset_entries(index, offset, prev_term);
            } else {
                log.truncate_entries(index, offset);
            }
            state.cache.truncate(pending.log, offset);
        }
        PendingKind::State(hard_state) => {
            if let Some(replicated) = log.replicated.as_mut() {
                replicated.hard_state = hard_state;
            }
        }
    }
}

/// Puts a hard-state frame for every replicated log at the head of the queue, so
/// a new segment starts with them: each segment tells every replicated log's next
/// Raft index and hard state by itself (see `control.rs`). Called at a roll, when
/// everything written is durable.
pub(super) fn queue_anchors(state: &mut State) {
    let now = now_ms();
    let mut anchors = Vec::new();
    for (log, entry) in &state.logs {
        let Some(replicated) = &entry.replicated else {
            continue;
        };
        let hard_state = HardState {
            commit: replicated.commit_index,
            ..replicated.hard_state
        };
        let anchor = Anchor {
            next_index: entry.end_index,
            next_offset: entry.end_offset,
            prev_term: entry
                .term_of(entry.end_index.saturating_sub(1))
                .unwrap_or(0),
            commit_offset: replicated.commit_offset,
        };
        let frame = Control::State { hard_state, anchor }.encode(
            *log,
            entry.end_offset,
            Epoch(hard_state.term as u32),
            now,
        );
        anchors.push(control_pending(
            *log,
            frame,
            entry.end_offset,
            now,
            PendingKind::State(hard_state),
        ));
    }
    for mut anchor in anchors.into_iter().rev() {
        anchor.seq = state.next_seq;
        state.next_seq += 1;
        state.inflight_bytes += anchor.frame.len();
        state.pending.push_front(anchor);
    }
}

/// A queued control frame that is not an entry.
fn control_pending(
    log: LogId,
    frame: Bytes,
    offset: Offset,
    now: i64,
    kind: PendingKind,
) -> Pending {
    Pending {
        log,
        frame,
        base_offset: offset,
        end_offset: offset,
        index: 0,
        term: 0,
        max_timestamp_ms: now,
        kind,
        seq: 0,
        completion: None,
        queued: Instant::now(),
    }
}

/// Checks a replicated write against the log: a truncation never below what is
/// committed, entries continuing the log in index and offset, frames that fit.
fn check_write(log: LogId, entry: &LogState, write: &LogWrite, frame_limit: usize) -> Result<()> {
    let fail = |reason: String| Err(StorageError::Failed(format!("log {log}: {reason}")));
    let (mut index, mut offset) = (entry.next_index, entry.next_offset);
    let commit = entry.replicated.as_ref().map_or(0, |r| r.commit_index);
    match &write.truncate {
        None => {}
        Some(Control::Truncate {
            index: at,
            offset: to,
            reset,
            ..
        }) => {
            if !reset && (*at <= commit || *at > index) {
                return fail(format!(
                    "truncation at index {at} outside ({commit}, {index}]"
                ));
            }
            index = *at;
            offset = *to;
        }
        Some(other) => return fail(format!("{other:?} is not a truncation")),
    }
    for frame in &write.frames {
        if frame.index != index || frame.base_offset != offset || frame.end_offset < offset {
            return fail(format!(
                "entry {} at offset {} does not continue the log (next: index {index}, offset {offset})",
                frame.index, frame.base_offset
            ));
        }
        if frame.frame.len() > frame_limit {
            return Err(StorageError::BatchTooLarge {
                bytes: frame.frame.len(),
                limit: frame_limit,
            });
        }
        index += 1;
        offset = frame.end_offset;
    }
    if let Some(state) = &write.state {
        if !matches!(state, Control::State { .. }) {
            return fail(format!("{state:?} is not a hard state"));
        }
    }
    Ok(())
}

/// What a replicated log holds, for its replica to start from.
#[derive(Clone, Debug, Default)]
pub struct ReplicatedView {
    /// First entry still stored.
    pub first_index: u64,
    /// One past the last entry.
    pub end_index: u64,
    /// Offset after the last entry.
    pub next_offset: Offset,
    /// Term of `first_index - 1`.
    pub start_term: u64,
    /// Term changes.
    pub terms: Vec<(u64, u64)>,
    /// The newest durable hard state.
    pub hard_state: HardState,
    /// The commit point whose offset is known: entries up to here are committed...
    pub commit_index: u64,
    /// ...and end (their data) before this offset.
    pub commit_offset: Offset,
    /// First retained offset.
    pub log_start: Offset,
}

async fn syncer_loop(wal: Rc<Wal>) {
    loop {
        let wake = wal.syncer_wake.wait();
        let work = {
            let state = wal.state.borrow();
            if state.durable_seq == state.written_seq {
                // The writer has exited only after its last write was recorded.
                if state.writer_done {
                    break;
                }
                None
            } else {
                Some((
                    state.written_seq,
                    state.segments[&state.active].file.clone(),
                ))
            }
        };
        let Some((target, file)) = work else {
            wake.await;
            continue;
        };
        let started = Instant::now();
        let result = file.sync().await;
        let elapsed_us = started.elapsed().as_micros() as u64;
        let mut state = wal.state.borrow_mut();
        state.stats.syncs += 1;
        state.stats.sync_us_total += elapsed_us;
        match result {
            Ok(()) => {
                report_stages(&wal, &state, target, started, elapsed_us);
                let appends = publish_durable(&wal, &mut state, target);
                if let Some(observe) = wal.sync_observer.borrow().as_ref() {
                    observe(elapsed_us, appends);
                }
            }
            Err(error) => {
                // After a failed fdatasync the state of the written pages is unknown
                // (fsyncgate): fail everything and refuse appends until restart.
                tracing::error!(shard = %wal.config.shard, %error, "fdatasync failed; WAL stops accepting appends");
                state.failed = Some(error.clone());
                for written in state.unsynced.drain(..) {
                    for completion in written.completions {
                        completion.complete(Err(error.clone()));
                    }
                }
                state.durable_seq = state.written_seq;
                wal.fail_pending(&mut state, &error);
            }
        }
    }
}

/// Tells the stage observer where the time of each write up to `target` went;
/// `sync_started` is when the fdatasync that covers them was issued.
fn report_stages(wal: &Wal, state: &State, target: u64, sync_started: Instant, sync_us: u64) {
    let observer = wal.stage_observer.borrow();
    let Some(observe) = observer.as_ref() else {
        return;
    };
    let micros = |later: Instant, earlier: Instant| {
        later.saturating_duration_since(earlier).as_micros() as u64
    };
    for written in state.unsynced.iter().take_while(|w| w.seq_end <= target) {
        observe(WalStages {
            queue_us: micros(written.issued, written.queued),
            write_us: micros(written.completed, written.issued),
            sync_wait_us: micros(sync_started, written.completed),
            sync_us,
        });
    }
}

/// Marks writes up to `target` durable; returns how many appends that completed.
fn publish_durable(wal: &Wal, state: &mut State, target: u64) -> u64 {
    let mut appends = 0;
    state.durable_seq = target;
    while state.unsynced.front().is_some_and(|w| w.seq_end <= target) {
        let Some(written) = state.unsynced.pop_front() else {
            break;
        };
        state.inflight_bytes -= written.bytes;
        for (log, end) in written.durable_ends {
            if let Some(entry) = state.logs.get_mut(&log) {
                entry.set_durable(end);
            }
        }
        appends += written.completions.len() as u64;
        for completion in written.completions {
            completion.complete(Ok(()));
        }
    }
    wal.space_freed.notify_all();
    wal.durable_advanced.notify_all();
    appends
}

impl Wal {
    /// Sets the function told the duration (µs) of every successful fdatasync and
    /// the number of appends it made durable.
    pub fn set_sync_observer(&self, observe: impl Fn(u64, u64) + 'static) {
        *self.sync_observer.borrow_mut() = Some(Box::new(observe));
    }

    /// Sets the function told, for every write once it is durable, where its
    /// time went ([`WalStages`]).
    pub fn set_stage_observer(&self, observe: impl Fn(WalStages) + 'static) {
        *self.stage_observer.borrow_mut() = Some(Box::new(observe));
    }

    /// Waits until every write issued so far is durable.
    pub(super) async fn drain(&self) -> Result<()> {
        loop {
            {
                let state = self.state.borrow();
                if let Some(error) = &state.failed {
                    return Err(error.clone());
                }
                if state.durable_seq == state.written_seq {
                    return Ok(());
                }
            }
            self.durable_advanced.wait().await;
        }
    }

    pub(super) fn take_spare(&self) -> Option<SegmentFile> {
        self.state.borrow_mut().spare.take()
    }

    pub(super) fn set_spare(&self, spare: SegmentFile) {
        self.state.borrow_mut().spare = Some(spare);
    }

    pub(super) fn set_preparing_spare(&self, preparing: bool) -> bool {
        let mut state = self.state.borrow_mut();
        let was = state.preparing_spare;
        state.preparing_spare = preparing;
        was
    }

    pub(super) fn is_closed(&self) -> bool {
        let state = self.state.borrow();
        state.closing && state.writer_done && state.durable_seq == state.written_seq
    }

    pub(super) fn is_closing(&self) -> bool {
        self.state.borrow().closing
    }
}
