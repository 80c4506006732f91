//! Consumer-group coordination. A group lives on the shard (and, in a cluster,
//! the node) that leads partition `crc32(group) % N` of `__sluice_offsets`; its
//! state is rebuilt from that partition when the shard first serves it (or after
//! a leadership change) and every change is appended to it, durably (acks=all),
//! before it is answered. See `state` for the rules and `store` for the records.

pub mod assign;
pub mod state;
pub mod store;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sluice_schema::wire::ErrorCode;

use crate::shard::Shard;
use crate::shard_messages::{ApiError, ShardReply, ShardRequest};
use crate::storage::format;
use crate::types::LogId;
use state::{Committed, Group, Heartbeat, HeartbeatAnswer, TopicPartition};
use store::Entry;

/// Group settings every shard shares.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    /// Partitions of `__sluice_offsets` when this node creates it.
    pub offsets_partitions: u32,
    /// Smallest session timeout a member may ask for.
    pub session_timeout_min_ms: u32,
    /// Largest.
    pub session_timeout_max_ms: u32,
    /// How often members heartbeat (told in every answer).
    pub heartbeat_interval_ms: u32,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            offsets_partitions: sluice_schema::groups::OFFSETS_PARTITIONS_DEFAULT,
            session_timeout_min_ms: 6_000,
            session_timeout_max_ms: 300_000,
            heartbeat_interval_ms: 1_000,
        }
    }
}

/// A group operation, decoded (crosses shards on the mesh).
#[derive(Clone, Debug)]
pub enum GroupOp {
    /// Join, stay or leave.
    Heartbeat(Heartbeat),
    /// Commit offsets.
    Commit {
        /// Group.
        group_id: String,
        /// Member (empty: a commit outside membership).
        member_id: String,
        /// Its epoch.
        member_epoch: i32,
        /// `(partition, offset, metadata)`.
        offsets: Vec<(TopicPartition, u64, String)>,
    },
    /// Read committed offsets (None: all of the group's).
    Fetch {
        /// Group.
        group_id: String,
        /// Which.
        partitions: Option<Vec<TopicPartition>>,
    },
    /// Everything about a group.
    Describe(String),
    /// Remove an empty group and its offsets.
    Delete(String),
    /// Summaries of every group of this offsets partition.
    List,
}

impl GroupOp {
    /// The group the operation is about (None for List).
    pub fn group_id(&self) -> Option<&str> {
        match self {
            GroupOp::Heartbeat(h) => Some(&h.group_id),
            GroupOp::Commit { group_id, .. } | GroupOp::Fetch { group_id, .. } => Some(group_id),
            GroupOp::Describe(id) | GroupOp::Delete(id) => Some(id),
            GroupOp::List => None,
        }
    }
}

/// A group summary.
#[derive(Clone, Debug)]
pub struct GroupSummary {
    /// Id.
    pub group_id: String,
    /// State name.
    pub state: &'static str,
    /// Members.
    pub members: u32,
    /// Group epoch.
    pub group_epoch: i32,
}

/// What a group operation answers.
#[derive(Clone, Debug)]
pub enum GroupAnswer {
    /// Heartbeat answer and the heartbeat interval.
    Heartbeat(HeartbeatAnswer, u32),
    /// Offsets committed.
    Committed,
    /// Committed offsets (None: nothing committed).
    Offsets(Vec<(TopicPartition, Option<Committed>)>),
    /// The group (with offsets) and ms since each member's heartbeat.
    Described(Box<Group>, BTreeMap<String, u64>),
    /// Deleted.
    Deleted,
    /// Summaries.
    Listed(Vec<GroupSummary>),
}

/// The groups of one offsets partition, as loaded from its log.
struct Loaded {
    /// The Raft term it was loaded in (0 on a single node).
    term: u64,
    groups: BTreeMap<String, Group>,
    /// Records appended since the log was last compacted (or loaded).
    records: u64,
}

/// One offsets partition this shard coordinates.
struct OffsetsPartition {
    /// Serializes operations (each change is written before the next starts).
    lock: Rc<glommio::sync::Semaphore>,
    state: RefCell<Option<Loaded>>,
}

/// The shard's coordinator: the offsets partitions it serves, by log.
#[derive(Default)]
pub struct Coordinator {
    partitions: RefCell<HashMap<LogId, Rc<OffsetsPartition>>>,
    epoch: RefCell<Option<Instant>>,
    /// Told when this shard starts coordinating an offsets partition (the
    /// expiry loop sleeps on it while there is none: an idle shard stays asleep).
    added: crate::sync::Notify,
}

/// Heartbeat interval told to members while their group reconciles.
const RECONCILING_HEARTBEAT_MS: u32 = 100;
/// Records per batch when the coordinator rewrites a partition's live state.
const COMPACTION_BATCH_RECORDS: usize = 256;
/// Compact once the log holds this many records more than 4x the live keys.
const COMPACTION_SLACK_RECORDS: u64 = 10_000;

impl Coordinator {
    fn now_ms(&self) -> u64 {
        let mut epoch = self.epoch.borrow_mut();
        let start = *epoch.get_or_insert_with(Instant::now);
        start.elapsed().as_millis() as u64
    }

    fn partition(&self, log: LogId) -> Rc<OffsetsPartition> {
        let mut added = false;
        let part = self
            .partitions
            .borrow_mut()
            .entry(log)
            .or_insert_with(|| {
                added = true;
                Rc::new(OffsetsPartition {
                    lock: Rc::new(glommio::sync::Semaphore::new(1)),
                    state: RefCell::new(None),
                })
            })
            .clone();
        if added {
            self.added.notify_all();
        }
        part
    }

    /// Forgets a partition (its log was deleted, or leadership moved away).
    pub fn forget(&self, log: LogId) {
        self.partitions.borrow_mut().remove(&log);
    }
}

impl Shard {
    /// Runs a group operation on the offsets partition `log` (owned by this shard).
    pub async fn group_op(
        self: &Rc<Self>,
        log: LogId,
        op: GroupOp,
    ) -> Result<GroupAnswer, ApiError> {
        let part = self.groups.partition(log);
        let _permit =
            part.lock.acquire_permit(1).await.map_err(|_| {
                ApiError::new(ErrorCode::ShuttingDown, "the coordinator is closing")
            })?;
        self.serving(log)?;
        self.ensure_loaded(log, &part).await?;
        let now = self.groups.now_ms();
        let result = self.apply_group_op(log, &part, op, now).await;
        if result.is_err() {
            // A failed write leaves memory ahead of the log: reload next time.
            if let Err(error) = &result {
                if matches!(
                    error.code,
                    ErrorCode::StorageError
                        | ErrorCode::DiskFull
                        | ErrorCode::RequestTimedOut
                        | ErrorCode::NotLeader
                        | ErrorCode::LeaderNotAvailable
                        | ErrorCode::ShuttingDown
                        | ErrorCode::Internal
                ) {
                    part.state.borrow_mut().take();
                }
            }
        }
        result
    }

    async fn ensure_loaded(&self, log: LogId, part: &OffsetsPartition) -> Result<(), ApiError> {
        let term = self.leader_term(log);
        if part
            .state
            .borrow()
            .as_ref()
            .is_some_and(|loaded| loaded.term == term)
        {
            return Ok(());
        }
        let started = Instant::now();
        let state = self.serving(log)?;
        let (start, high_watermark) = (state.log_start, state.high_watermark);
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        let mut offset = start;
        let mut records = 0u64;
        let mut skipped = 0u64;
        let now = self.groups.now_ms();
        while offset < high_watermark {
            let read = self
                .wal
                .read_below(log, offset, 4 << 20, high_watermark)
                .await?;
            if read.frames.is_empty() {
                break;
            }
            for frame in &read.frames {
                let Ok(header) = format::header(frame) else {
                    continue;
                };
                let next = header.base_offset.get() + u64::from(header.record_count.get());
                for (record_offset, key, value) in store::records(frame) {
                    if record_offset < offset {
                        continue;
                    }
                    records += 1;
                    match Entry::decode(key, value) {
                        Ok(entry) => apply_entry(&mut groups, entry, now),
                        Err(_) => skipped += 1,
                    }
                }
                offset = offset.max(next);
            }
        }
        tracing::info!(
            log = log.0,
            groups = groups.len(),
            records,
            skipped,
            ms = started.elapsed().as_millis() as u64,
            "loaded consumer groups from the offsets partition"
        );
        *part.state.borrow_mut() = Some(Loaded {
            term,
            groups,
            records,
        });
        Ok(())
    }

    async fn write_entries(self: &Rc<Self>, log: LogId, entries: &[Entry]) -> Result<(), ApiError> {
        let records: Vec<_> = entries.iter().map(Entry::encode).collect();
        let mut batches = Vec::new();
        for chunk in records.chunks(COMPACTION_BATCH_RECORDS) {
            let frame = store::encode_batch(chunk, crate::storage::now_ms());
            let info = format::verify_client_batch(&frame, crate::limits::BATCH_BYTES_MAX)
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("group record: {e}")))?;
            batches.push((frame, info));
        }
        let reply = Box::pin(self.execute(ShardRequest::Produce {
            log,
            batches,
            acks: -1,
        }))
        .await;
        match reply {
            ShardReply::Produced(result) => result.map(|_| ()),
            _ => Err(ApiError::new(ErrorCode::Internal, "unexpected reply")),
        }
    }

    async fn apply_group_op(
        self: &Rc<Self>,
        log: LogId,
        part: &OffsetsPartition,
        op: GroupOp,
        now: u64,
    ) -> Result<GroupAnswer, ApiError> {
        let metadata = self.topics();
        let partitions = |topic: &str| -> Option<u32> {
            metadata
                .topics
                .get(topic)
                .map(|t| t.partitions.len() as u32)
        };
        let interval = self.settings.groups.heartbeat_interval_ms;
        {
            let state = part.state.borrow();
            let loaded = state.as_ref().expect("loaded");
            if let Some(group_id) = op.group_id() {
                if !loaded.groups.contains_key(group_id)
                    && loaded.groups.len() >= crate::limits::GROUPS_PER_OFFSETS_PARTITION_MAX
                    && matches!(op, GroupOp::Heartbeat(_) | GroupOp::Commit { .. })
                {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "this coordinator already has {} groups, the most one offsets partition may hold; delete unused groups",
                            loaded.groups.len()
                        ),
                    ));
                }
            }
        }
        match op {
            GroupOp::Heartbeat(request) => {
                let (answer, snapshot, reconciling) = {
                    let mut state = part.state.borrow_mut();
                    let loaded = state.as_mut().expect("loaded");
                    let group = loaded
                        .groups
                        .entry(request.group_id.clone())
                        .or_insert_with(|| Group::new(&request.group_id));
                    let mut before = group.clone();
                    let result = group.heartbeat(&request, now, &partitions);
                    match result {
                        Ok((answer, changed)) => (
                            answer,
                            changed.then(|| group.clone()),
                            group.state() == "reconciling",
                        ),
                        Err(error) => {
                            std::mem::swap(group, &mut before);
                            if group.members.is_empty()
                                && group.offsets.is_empty()
                                && group.group_epoch == 0
                            {
                                loaded.groups.remove(&request.group_id);
                            }
                            return Err(error);
                        }
                    }
                };
                if let Some(group) = snapshot {
                    self.write_entries(log, &[Entry::Group(group.group_id.clone(), Some(group))])
                        .await?;
                    self.note_records(part, 1);
                }
                // While the group reconciles, members come back sooner, so that
                // a rebalance takes a fraction of the steady heartbeat interval.
                let interval = if reconciling {
                    interval.min(RECONCILING_HEARTBEAT_MS)
                } else {
                    interval
                };
                Ok(GroupAnswer::Heartbeat(answer, interval))
            }
            GroupOp::Commit {
                group_id,
                member_id,
                member_epoch,
                offsets,
            } => {
                let tps: Vec<TopicPartition> =
                    offsets.iter().map(|(tp, _, _)| tp.clone()).collect();
                {
                    let state = part.state.borrow();
                    let loaded = state.as_ref().expect("loaded");
                    match loaded.groups.get(&group_id) {
                        Some(group) => group.check_commit(&member_id, member_epoch, &tps)?,
                        None if member_id.is_empty() => {}
                        None => {
                            return Err(ApiError::new(
                                ErrorCode::UnknownMemberId,
                                format!("group {group_id} has no member {member_id:?}; rejoin"),
                            ))
                        }
                    }
                }
                let ts = crate::storage::now_ms();
                let entries: Vec<Entry> = offsets
                    .iter()
                    .map(|(tp, offset, metadata)| {
                        Entry::Offset(
                            group_id.clone(),
                            tp.clone(),
                            Some(Committed {
                                offset: *offset,
                                metadata: metadata.clone(),
                                commit_timestamp_ms: ts,
                            }),
                        )
                    })
                    .collect();
                self.write_entries(log, &entries).await?;
                {
                    let mut state = part.state.borrow_mut();
                    let loaded = state.as_mut().expect("loaded");
                    for entry in entries {
                        apply_entry(&mut loaded.groups, entry, now);
                    }
                }
                self.note_records(part, offsets.len() as u64);
                Ok(GroupAnswer::Committed)
            }
            GroupOp::Fetch {
                group_id,
                partitions: wanted,
            } => {
                let state = part.state.borrow();
                let loaded = state.as_ref().expect("loaded");
                let group = loaded.groups.get(&group_id);
                let offsets = match wanted {
                    Some(wanted) => wanted
                        .into_iter()
                        .map(|tp| {
                            let committed = group.and_then(|g| g.offsets.get(&tp).cloned());
                            (tp, committed)
                        })
                        .collect(),
                    None => group
                        .map(|g| {
                            g.offsets
                                .iter()
                                .map(|(tp, c)| (tp.clone(), Some(c.clone())))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                Ok(GroupAnswer::Offsets(offsets))
            }
            GroupOp::Describe(group_id) => {
                let state = part.state.borrow();
                let loaded = state.as_ref().expect("loaded");
                let group = loaded.groups.get(&group_id).ok_or_else(|| {
                    ApiError::new(ErrorCode::UnknownGroup, format!("no group {group_id}"))
                })?;
                let ages = group
                    .members
                    .values()
                    .map(|m| (m.member_id.clone(), now.saturating_sub(m.last_heartbeat_ms)))
                    .collect();
                Ok(GroupAnswer::Described(Box::new(group.clone()), ages))
            }
            GroupOp::Delete(group_id) => {
                let entries = {
                    let state = part.state.borrow();
                    let loaded = state.as_ref().expect("loaded");
                    let group = loaded.groups.get(&group_id).ok_or_else(|| {
                        ApiError::new(ErrorCode::UnknownGroup, format!("no group {group_id}"))
                    })?;
                    if !group.members.is_empty() {
                        return Err(ApiError::new(
                            ErrorCode::GroupNotEmpty,
                            format!(
                                "group {group_id} has {} member(s); it can be deleted once they leave",
                                group.members.len()
                            ),
                        ));
                    }
                    let mut entries: Vec<Entry> = group
                        .offsets
                        .keys()
                        .map(|tp| Entry::Offset(group_id.clone(), tp.clone(), None))
                        .collect();
                    entries.push(Entry::Group(group_id.clone(), None));
                    entries
                };
                let count = entries.len() as u64;
                self.write_entries(log, &entries).await?;
                {
                    let mut state = part.state.borrow_mut();
                    let loaded = state.as_mut().expect("loaded");
                    loaded.groups.remove(&group_id);
                }
                self.note_records(part, count);
                Ok(GroupAnswer::Deleted)
            }
            GroupOp::List => {
                let state = part.state.borrow();
                let loaded = state.as_ref().expect("loaded");
                Ok(GroupAnswer::Listed(
                    loaded
                        .groups
                        .values()
                        .map(|g| GroupSummary {
                            group_id: g.group_id.clone(),
                            state: g.state(),
                            members: g.members.len() as u32,
                            group_epoch: g.group_epoch,
                        })
                        .collect(),
                ))
            }
        }
    }

    fn note_records(&self, part: &OffsetsPartition, count: u64) {
        if let Some(loaded) = part.state.borrow_mut().as_mut() {
            loaded.records += count;
        }
    }

    /// Every `tick`: removes expired members of the groups this shard serves (and
    /// persists the change), and compacts offsets partitions that hold mostly
    /// superseded records. Runs until shutdown.
    pub async fn group_expiry_loop(self: Rc<Self>, tick: Duration) {
        while !self.shutting_down() {
            if self.groups.partitions.borrow().is_empty() {
                let added = self.groups.added.wait();
                futures::pin_mut!(added);
                let stopping = self.until_stopping();
                futures::pin_mut!(stopping);
                futures::future::select(added, stopping).await;
                continue;
            }
            glommio::timer::sleep(tick).await;
            let logs: Vec<(LogId, Rc<OffsetsPartition>)> = self
                .groups
                .partitions
                .borrow()
                .iter()
                .map(|(log, part)| (*log, part.clone()))
                .collect();
            for (log, part) in logs {
                if self.serving(log).is_err() {
                    continue;
                }
                let Ok(_permit) = part.lock.acquire_permit(1).await else {
                    return;
                };
                if self.ensure_loaded(log, &part).await.is_err() {
                    continue;
                }
                let now = self.groups.now_ms();
                let changed: Vec<Group> = {
                    let mut state = part.state.borrow_mut();
                    let Some(loaded) = state.as_mut() else {
                        continue;
                    };
                    loaded
                        .groups
                        .values_mut()
                        .filter_map(|group| {
                            let expired = group.expire(now);
                            for member in &expired {
                                tracing::info!(
                                    group = %group.group_id,
                                    member = %member,
                                    "consumer group member removed: session or rebalance timeout"
                                );
                            }
                            (!expired.is_empty()).then(|| group.clone())
                        })
                        .collect()
                };
                if !changed.is_empty() {
                    let entries: Vec<Entry> = changed
                        .into_iter()
                        .map(|g| Entry::Group(g.group_id.clone(), Some(g)))
                        .collect();
                    let count = entries.len() as u64;
                    if let Err(error) = self.write_entries(log, &entries).await {
                        tracing::warn!(log = log.0, %error.message, "could not persist expired members; reloading");
                        part.state.borrow_mut().take();
                        continue;
                    }
                    self.note_records(&part, count);
                }
                if let Err(error) = self.compact_offsets(log, &part).await {
                    tracing::warn!(log = log.0, %error.message, "offsets compaction failed; reloading");
                    part.state.borrow_mut().take();
                }
            }
        }
    }

    /// Rewrites the live records of an offsets partition and moves its log start
    /// past the old ones, when most of its records are superseded. Single-node
    /// logs only: a replicated log's start moves only through retention.
    async fn compact_offsets(
        self: &Rc<Self>,
        log: LogId,
        part: &OffsetsPartition,
    ) -> Result<(), ApiError> {
        if self.partition_state(log)?.group.is_some() {
            return Ok(());
        }
        let entries: Vec<Entry> = {
            let state = part.state.borrow();
            let Some(loaded) = state.as_ref() else {
                return Ok(());
            };
            let live: u64 = loaded
                .groups
                .values()
                .map(|g| 1 + g.offsets.len() as u64)
                .sum();
            if loaded.records <= 4 * live + COMPACTION_SLACK_RECORDS {
                return Ok(());
            }
            loaded
                .groups
                .values()
                .flat_map(|g| {
                    let mut group = g.clone();
                    let offsets = std::mem::take(&mut group.offsets);
                    std::iter::once(Entry::Group(g.group_id.clone(), Some(group))).chain(
                        offsets
                            .into_iter()
                            .map(|(tp, c)| Entry::Offset(g.group_id.clone(), tp, Some(c))),
                    )
                })
                .collect()
        };
        // The new log start: where the rewritten live entries begin.
        let start = self.partition_state(log)?.high_watermark;
        self.write_entries(log, &entries).await?;
        self.wal.advance_log_start(log, start)?;
        tracing::info!(
            log = log.0,
            live = entries.len(),
            new_start = start,
            "compacted an offsets partition"
        );
        if let Some(loaded) = part.state.borrow_mut().as_mut() {
            loaded.records = entries.len() as u64;
        }
        Ok(())
    }
}

fn apply_entry(groups: &mut BTreeMap<String, Group>, entry: Entry, now: u64) {
    match entry {
        Entry::Group(id, Some(mut group)) => {
            group.offsets = groups.remove(&id).map(|g| g.offsets).unwrap_or_default();
            for member in group.members.values_mut() {
                member.last_heartbeat_ms = now;
                member.revoking_since_ms = now;
            }
            group.group_id = id.clone();
            groups.insert(id, group);
        }
        Entry::Group(id, None) => {
            groups.remove(&id);
        }
        Entry::Offset(id, tp, Some(committed)) => {
            groups
                .entry(id.clone())
                .or_insert_with(|| Group::new(&id))
                .offsets
                .insert(tp, committed);
        }
        Entry::Offset(id, tp, None) => {
            if let Some(group) = groups.get_mut(&id) {
                group.offsets.remove(&tp);
            }
        }
    }
}
