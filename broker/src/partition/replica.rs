//! One partition replica: a raft-rs `RawNode` over the replica's log, without I/O.
//!
//! The host (`host.rs`) feeds it messages, ticks and proposals, and carries out
//! what a [`ReadyOut`] asks: send these messages now, write this to the WAL, and
//! once that is durable call [`Replica::persisted`] and send those messages. The
//! order is raft-rs's (and Raft's): a follower answers only after what it
//! answers about is durable; a leader may send its entries before its own write
//! finishes (Raft thesis 10.2.1), and counts itself in the quorum only after.
//!
//! Offsets. A data entry's frame is the client's batch, stamped by the leader
//! with its first offset and the term; an entry without records becomes a
//! control frame at the log's next offset. So offset and index advance together
//! along the log, the frames are identical on every replica, and the high
//! watermark (the end offset of the last committed data entry) moves only when a
//! quorum has the entry durable.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, StateRole};

use super::raft_log::{snapshot_start_offset, RaftLog, Recovered};
use crate::storage::format::{self, BatchInfo};
use crate::storage::{Anchor, Control, EntryFrame, HardState, LogWrite};
use crate::sync::Completion;
use crate::types::{Epoch, LogId, NodeId, Offset};

/// Identifies a Raft group cluster-wide: the controller, or a topic's partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u64);

impl GroupId {
    /// The controller group (cluster metadata).
    pub const CONTROLLER: GroupId = GroupId(0);

    /// The group of `partition` of the topic with id `topic_id` (ids start at 1).
    pub fn partition(topic_id: u32, partition: u32) -> GroupId {
        GroupId((u64::from(topic_id) << 32) | u64::from(partition))
    }

    /// (topic id, partition) of a partition group.
    pub fn parts(self) -> (u32, u32) {
        ((self.0 >> 32) as u32, self.0 as u32)
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == GroupId::CONTROLLER {
            return write!(f, "controller");
        }
        let (topic, partition) = self.parts();
        write!(f, "{topic}/{partition}")
    }
}

/// Raft timing, in ticks of [`TICK`].
pub const TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// A follower that hears nothing for 10-20 ticks (0.5-1 s) campaigns.
pub const ELECTION_TICKS: usize = 10;
/// A leader sends heartbeats every 2 ticks (100 ms).
pub const HEARTBEAT_TICKS: usize = 2;
/// Append messages in flight per follower (pipelining). With
/// `APPEND_MESSAGE_BYTES_MAX` this bounds what a follower may be asked to buffer
/// from one leader for one partition (64 MiB).
pub const INFLIGHT_APPENDS_MAX: usize = 64;
/// Bytes of entries per append message.
pub const APPEND_MESSAGE_BYTES_MAX: u64 = 1 << 20;
/// Bytes of proposals not yet committed; more are refused (backpressure).
pub const UNCOMMITTED_BYTES_MAX: u64 = 256 << 20;

/// How a proposal's caller wants to be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// Once the leader has the entries durable (`acks=1`).
    Leader,
    /// Once a quorum has them durable and they are committed (`acks=all`).
    Quorum,
}

/// Why a replica refused or failed a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaError {
    /// This replica is not the leader; the leader if known.
    NotLeader(Option<NodeId>),
    /// Too much is uncommitted; retry later.
    Busy,
    /// The batch is not valid.
    Invalid(String),
    /// The log could not be written.
    Storage(String),
}

/// What a successful proposal gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    /// First offset of the proposal.
    pub base_offset: Offset,
    /// One past the last offset.
    pub end_offset: Offset,
}

/// Where a proposal's answer arrives.
pub type AckSlot = Rc<Completion<Result<Acked, ReplicaError>>>;

/// A proposal waiting for its answer.
struct Waiter {
    last_index: u64,
    term: u64,
    mode: AckMode,
    acked: Acked,
    done: AckSlot,
}

/// Work for the host, from one Ready.
#[derive(Default)]
pub struct ReadyOut {
    /// Send now.
    pub messages: Vec<Message>,
    /// Write to the WAL; when durable, call `persisted(number)` and send
    /// `persisted_messages`.
    pub write: Option<LogWrite>,
    /// The Ready's number.
    pub number: u64,
    /// Send after `write` is durable.
    pub persisted_messages: Vec<Message>,
    /// Data of committed entries for a state machine (the controller's), in order.
    pub applied: Vec<(u64, Bytes)>,
}

/// One replica of one group.
pub struct Replica {
    /// Its group.
    pub group: GroupId,
    /// Its log in the local WAL.
    pub log: LogId,
    node: RawNode<RaftLog>,
    /// Offset after the last entry appended to `RaftLog`.
    next_offset: Offset,
    /// Start offset of each cached entry's frame, parallel to indexes > `offsets_from`.
    offsets: VecDeque<(u64, Offset)>,
    /// End offset of the last applied data entry: what consumers may read.
    high_watermark: Offset,
    /// Highest index durable here.
    persisted_index: u64,
    waiters: VecDeque<Waiter>,
    /// The entries are a state machine's commands (the controller's), delivered
    /// to the host once committed; they are never record batches.
    wants_applied: bool,
    leader: Option<NodeId>,
    /// Writes handed to the host and not yet reported durable.
    writes_in_flight: u64,
}

/// How a replica starts.
pub struct ReplicaConfig {
    /// The group.
    pub group: GroupId,
    /// Local log.
    pub log: LogId,
    /// This node.
    pub node: NodeId,
    /// Voters of the group.
    pub voters: Vec<NodeId>,
    /// What the WAL holds for the log.
    pub recovered: Recovered,
    /// Offset after the last entry recovered.
    pub next_offset: Offset,
    /// End offset of the last committed data entry.
    pub commit_offset: Offset,
    /// Index already applied to a state machine (0: use the commit index).
    pub applied: Option<u64>,
    /// Deliver committed entries' data to the host.
    pub wants_applied: bool,
    /// Campaign at once (the preferred leader of a new group).
    pub campaign: bool,
}

/// raft-rs logs through slog; its messages go to `tracing` at debug level.
fn raft_logger() -> slog::Logger {
    use slog::Drain;
    struct ToTracing;
    impl Drain for ToTracing {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
            match record.level() {
                slog::Level::Critical | slog::Level::Error => {
                    tracing::error!(target: "raft", "{}", record.msg())
                }
                slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
                _ => tracing::debug!(target: "raft", "{}", record.msg()),
            }
            Ok(())
        }
    }
    slog::Logger::root(ToTracing.fuse(), slog::o!())
}

impl Replica {
    /// Builds a replica over what its log recovered.
    pub fn new(config: ReplicaConfig) -> Result<Replica, String> {
        let voters: Vec<u64> = config.voters.iter().map(|n| u64::from(n.0)).collect();
        let commit = config.recovered.hard_state.commit;
        let first_uncommitted = config
            .recovered
            .uncommitted
            .first()
            .map(|e| e.index)
            .unwrap_or(u64::MAX);
        let mut offsets = VecDeque::new();
        let mut at = config.commit_offset;
        for entry in &config.recovered.uncommitted {
            offsets.push_back((entry.index, at));
            at = entry_end_offset(entry, at, config.wants_applied);
        }
        let applied = config.applied.unwrap_or(commit).min(commit);
        // The cache must hold every entry above the applied index (a state machine
        // may have applied less than is committed).
        debug_assert!(first_uncommitted == u64::MAX || first_uncommitted == applied + 1);
        let log = RaftLog::new(&voters, config.recovered, applied);
        let raft_config = raft::Config {
            id: u64::from(config.node.0),
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            max_size_per_msg: APPEND_MESSAGE_BYTES_MAX,
            max_inflight_msgs: INFLIGHT_APPENDS_MAX,
            check_quorum: true,
            pre_vote: true,
            // raft-rs 0.7's batch_append can merge entries into a pending empty
            // MsgAppend whose index no longer matches them (found by `sim.rs`);
            // the transport batches messages per peer anyway.
            batch_append: false,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            ..raft::Config::default()
        };
        raft_config.validate().map_err(|e| e.to_string())?;
        let mut node =
            RawNode::new(&raft_config, log, &raft_logger()).map_err(|e| e.to_string())?;
        if config.campaign && voters.len() > 1 {
            node.campaign().map_err(|e| e.to_string())?;
        } else if voters.len() == 1 {
            // A single voter elects itself at once.
            node.campaign().map_err(|e| e.to_string())?;
        }
        Ok(Replica {
            group: config.group,
            log: config.log,
            node,
            next_offset: config.next_offset,
            offsets,
            high_watermark: config.commit_offset,
            persisted_index: commit,
            waiters: VecDeque::new(),
            wants_applied: config.wants_applied,
            leader: None,
            writes_in_flight: 0,
        })
    }

    /// The high watermark: consumers may read offsets below it.
    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }

    /// Offset after the last entry in the log.
    pub fn log_end(&self) -> Offset {
        self.next_offset
    }

    /// The Raft term (= leader epoch).
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// True when this replica leads its group.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// True when this replica leads and has applied an entry of its own term, so
    /// its high watermark includes everything any earlier leader acknowledged.
    /// From then on it serves for the rest of its term, whether or not it has
    /// applied its latest commits yet: those are entries of its own term, and
    /// refusing produce until they are applied would stall a busy leader
    /// (acks=1 runs far ahead of the commit index, which then advances in jumps).
    pub fn is_serving_leader(&self) -> bool {
        let log = &self.node.raft.raft_log;
        self.is_leader() && log.term(log.applied).ok() == Some(self.node.raft.term)
    }

    /// The leader as far as this replica knows.
    pub fn leader(&self) -> Option<NodeId> {
        match self.node.raft.leader_id {
            0 => None,
            id => Some(NodeId(id as u32)),
        }
    }

    /// Commit index, last index, applied index.
    pub fn indexes(&self) -> (u64, u64, u64) {
        let log = &self.node.raft.raft_log;
        (log.committed, log.last_index(), log.applied)
    }

    /// Progress of every voter as the leader sees it: (node, matched index).
    pub fn progress(&self) -> Vec<(NodeId, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        self.node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (NodeId(*id as u32), pr.matched))
            .collect()
    }

    /// Voters whose log reaches the commit index (the leader's view; 0 elsewhere):
    /// fewer than all voters means the partition is under-replicated.
    pub fn in_sync(&self) -> u16 {
        self.in_sync_mask().count_ones() as u16
    }

    /// Which voters reach the commit index (the leader's view; 0 elsewhere): bit
    /// i for the i-th voter in ascending node id order.
    pub fn in_sync_mask(&self) -> u8 {
        if !self.is_leader() {
            return 0;
        }
        let commit = self.node.raft.raft_log.committed;
        let mut voters = self.voters();
        voters.sort();
        let prs = self.node.raft.prs();
        voters
            .iter()
            .take(8) // a group has at most 5 voters
            .enumerate()
            .filter(|(_, id)| {
                prs.get(u64::from(id.0))
                    .is_some_and(|pr| pr.matched >= commit)
            })
            .fold(0u8, |mask, (bit, _)| mask | (1 << bit))
    }

    /// Voters of the group.
    pub fn voters(&self) -> Vec<NodeId> {
        self.node
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .map(|id| NodeId(id as u32))
            .collect()
    }

    /// Advances the logical clock.
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Steps a message from a peer. Entries are verified first: a damaged one
    /// drops the whole message (the leader sends it again).
    pub fn step(&mut self, message: Message) -> Result<(), String> {
        if message.get_msg_type() == MessageType::MsgAppend && !self.wants_applied {
            for entry in message.get_entries() {
                check_entry(self.log, entry)?;
            }
        }
        self.node.step(message).map_err(|e| e.to_string())
    }

    /// Proposes verified client batches (one entry each) as the leader. Stamps
    /// each with its offsets and the term; returns the completion that answers
    /// per `mode`.
    pub fn propose(
        &mut self,
        batches: &[(Bytes, BatchInfo)],
        mode: AckMode,
    ) -> Result<AckSlot, ReplicaError> {
        if !self.is_leader() {
            return Err(ReplicaError::NotLeader(self.leader()));
        }
        let term = self.node.raft.term;
        let epoch = Epoch(u32::try_from(term).map_err(|_| {
            ReplicaError::Invalid(format!("term {term} does not fit the batch epoch"))
        })?);
        let base = self.proposal_offset();
        let mut at = base;
        let mut entries = Vec::with_capacity(batches.len());
        for (frame, info) in batches {
            let mut stamped = bytes::BytesMut::from(&frame[..]);
            format::stamp(&mut stamped, at, self.log, epoch);
            at += u64::from(info.record_count);
            let mut entry = Entry::default();
            entry.data = stamped.freeze();
            entries.push(entry);
        }
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.node.raft.id;
        message.set_entries(entries.into());
        self.node.raft.step(message).map_err(|error| match error {
            raft::Error::ProposalDropped => ReplicaError::Busy,
            other => ReplicaError::Storage(other.to_string()),
        })?;
        let last_index = self.node.raft.raft_log.last_index();
        let done = Completion::new();
        self.waiters.push_back(Waiter {
            last_index,
            term,
            mode,
            acked: Acked {
                base_offset: base,
                end_offset: at,
            },
            done: done.clone(),
        });
        Ok(done)
    }

    /// Proposes one opaque entry (the controller's commands). Any replica may
    /// propose: a follower forwards it to the leader.
    pub fn propose_data(&mut self, data: Bytes) -> Result<(), ReplicaError> {
        let mut entry = Entry::default();
        entry.data = data;
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.node.raft.id;
        message.set_entries(vec![entry].into());
        self.node.raft.step(message).map_err(|error| match error {
            raft::Error::ProposalDropped => ReplicaError::NotLeader(self.leader()),
            other => ReplicaError::Storage(other.to_string()),
        })
    }

    /// The offset the next proposal starts at: after the log and after entries
    /// raft-rs holds that no Ready has handed over yet.
    fn proposal_offset(&self) -> Offset {
        let mut at = self.next_offset;
        for entry in self.node.raft.raft_log.unstable_entries() {
            if entry.index > self.node.store().last() {
                at = entry_end_offset(entry, at, self.wants_applied);
            }
        }
        at
    }

    /// True when there is work for the host.
    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// Takes the next Ready and turns it into work for the host.
    pub fn ready(&mut self) -> Option<ReadyOut> {
        if !self.node.has_ready() {
            return None;
        }
        let mut ready = self.node.ready();
        let mut out = ReadyOut {
            number: ready.number(),
            messages: ready.take_messages(),
            ..ReadyOut::default()
        };
        if let Some(soft) = ready.ss() {
            self.on_role(soft.raft_state, soft.leader_id);
        }
        let mut write = LogWrite::default();
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone(), &mut write);
        }
        let committed = ready.take_committed_entries();
        self.apply(&committed, &mut out);
        let entries = ready.take_entries();
        if !entries.is_empty() {
            self.append(&entries, &mut write);
        }
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs.clone());
        }
        let has_state = ready.hs().is_some() || !entries.is_empty() || write.truncate.is_some();
        if has_state {
            write.state = Some(self.state_frame());
        }
        out.persisted_messages = ready.take_persisted_messages();
        // `advance_append` declares every earlier Ready persisted: only when no
        // write is in flight may a Ready with nothing to write take that path.
        // Otherwise even an empty write waits its turn behind the others.
        if write.is_empty() && self.writes_in_flight == 0 {
            let mut light = self.node.advance_append(ready);
            out.messages.append(&mut light.take_messages());
            out.messages.append(&mut out.persisted_messages);
            let committed = light.take_committed_entries();
            self.apply(&committed, &mut out);
        } else {
            self.node.advance_append_async(ready);
            self.writes_in_flight += 1;
            out.write = Some(write);
        }
        Some(out)
    }

    /// The write with `number` is durable (writes complete in the order they were
    /// handed out; an empty one completes when those before it have).
    pub fn persisted(&mut self, number: u64, last_index: u64) {
        self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
        self.persisted_index = self.persisted_index.max(last_index);
        self.node.on_persist_ready(number);
        self.answer_waiters();
    }

    /// The write with `number` failed: nothing of it may be counted durable. The
    /// replica steps down (the WAL refuses writes until restart).
    pub fn persist_failed(&mut self, error: &str) {
        let waiters = std::mem::take(&mut self.waiters);
        for waiter in waiters {
            waiter
                .done
                .complete(Err(ReplicaError::Storage(error.to_string())));
        }
    }

    /// Reads raft-rs asked for (entries to send a lagging follower).
    pub fn fetch_requests(&self) -> Vec<super::raft_log::FetchRequest> {
        self.node.store().take_fetch_requests()
    }

    /// Entries read for a fetch request.
    pub fn fetched(&mut self, request: super::raft_log::FetchRequest, entries: Vec<Entry>) {
        self.node.store().set_fetched(entries);
        self.node.on_entries_fetched(request.context);
    }

    /// A snapshot message to `to` went out (the transport does not report
    /// delivery: Raft probes the follower again if it never arrived).
    pub fn snapshot_sent(&mut self, to: u64) {
        self.node.report_snapshot(to, raft::SnapshotStatus::Finish);
    }

    /// Retention dropped entries below `first_index`.
    pub fn compacted(&mut self, first_index: u64, start_term: u64, start_offset: Offset) {
        self.node
            .mut_store()
            .compact_to(first_index, start_term, start_offset);
    }

    fn on_role(&mut self, role: StateRole, leader_id: u64) {
        self.leader = (leader_id != 0).then_some(NodeId(leader_id as u32));
        if role != StateRole::Leader {
            // Entries not yet committed may still commit under the next leader, or
            // be truncated: the client cannot be told which, so it retries.
            let leader = self.leader;
            for waiter in std::mem::take(&mut self.waiters) {
                waiter.done.complete(Err(ReplicaError::NotLeader(leader)));
            }
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot, write: &mut LogWrite) {
        let metadata = snapshot.get_metadata();
        let start_offset = snapshot_start_offset(&snapshot).unwrap_or(self.next_offset);
        tracing::info!(group = %self.group, index = metadata.index + 1, offset = start_offset,
            "the leader no longer has the entries this replica needs: its log restarts from the leader's snapshot");
        write.truncate = Some(Control::Truncate {
            index: metadata.index + 1,
            offset: start_offset,
            reset: true,
            prev_term: metadata.term,
        });
        self.node.mut_store().reset(&snapshot, start_offset);
        self.offsets.clear();
        self.next_offset = start_offset;
        self.high_watermark = self.high_watermark.max(start_offset);
    }

    /// Appends a Ready's entries to the log view and lays out their frames.
    fn append(&mut self, entries: &[Entry], write: &mut LogWrite) {
        let truncated = self.node.mut_store().append(entries);
        if let Some(from) = truncated {
            // A follower's conflicting suffix: drop it, durably, before the new one.
            while self.offsets.back().is_some_and(|(index, _)| *index > from) {
                self.offsets.pop_back();
            }
            let offset = match self.offsets.back() {
                Some((index, offset)) if *index == from => *offset,
                _ => self.high_watermark,
            };
            self.offsets.pop_back();
            self.next_offset = offset;
            write.truncate = Some(Control::Truncate {
                index: from,
                offset,
                reset: false,
                prev_term: 0,
            });
        }
        for entry in entries {
            let at = self.next_offset;
            self.offsets.push_back((entry.index, at));
            let frame = entry_frame(self.log, entry, at, self.wants_applied);
            self.next_offset = frame.end_offset;
            write.frames.push(frame);
        }
    }

    fn state_frame(&self) -> Control {
        let store = self.node.store();
        let hs = store.hard_state();
        let last = store.last();
        Control::State {
            hard_state: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            },
            anchor: Anchor {
                next_index: last + 1,
                next_offset: self.next_offset,
                prev_term: store.term_of(last).unwrap_or(0),
                commit_offset: self.offset_after(hs.commit),
            },
        }
    }

    /// The offset after entry `index`: the high watermark for applied entries, the
    /// next cached entry's start for unapplied ones.
    fn offset_after(&self, index: u64) -> Offset {
        if index <= self.node.raft.raft_log.applied {
            return self.high_watermark;
        }
        match self.offsets.iter().find(|(at, _)| *at == index + 1) {
            Some((_, offset)) => *offset,
            None => self.next_offset,
        }
    }

    /// Applies committed entries: the high watermark moves to the end of the last
    /// data entry; state-machine data goes to the host.
    fn apply(&mut self, committed: &[Entry], out: &mut ReadyOut) {
        for entry in committed {
            if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                if let Some((base, records, _)) = batch_of(entry, self.wants_applied) {
                    let end = base + records;
                    debug_assert!(end >= self.high_watermark, "high watermark moves back");
                    self.high_watermark = self.high_watermark.max(end);
                }
                if self.wants_applied {
                    out.applied.push((entry.index, entry.data.clone()));
                }
            }
            self.node.mut_store().set_applied(entry.index);
            while self
                .offsets
                .front()
                .is_some_and(|(index, _)| *index < entry.index)
            {
                self.offsets.pop_front();
            }
        }
        if let Some(last) = committed.last() {
            self.node.advance_apply_to(last.index);
        }
        self.answer_waiters();
    }

    fn answer_waiters(&mut self) {
        let applied = self.node.raft.raft_log.applied;
        let persisted = self.persisted_index;
        while let Some(waiter) = self.waiters.front() {
            let reached = match waiter.mode {
                AckMode::Leader => persisted >= waiter.last_index,
                AckMode::Quorum => applied >= waiter.last_index,
            };
            if !reached {
                break;
            }
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            let still_ours = self.node.store().term_of(waiter.last_index) == Some(waiter.term)
                || (waiter.last_index < self.node.store().first());
            let result = if still_ours {
                Ok(waiter.acked)
            } else {
                Err(ReplicaError::NotLeader(self.leader()))
            };
            waiter.done.complete(result);
        }
    }

    /// Voters (for a host building a status).
    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }
}

/// Checks an entry a leader sent: a data entry must be a stored frame of this log.
fn check_entry(log: LogId, entry: &Entry) -> Result<(), String> {
    if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
        return Ok(());
    }
    let frame = format::verify_stored(&entry.data, crate::limits::BATCH_BYTES_MAX)
        .map_err(|e| format!("entry {} is damaged: {e}", entry.index))?;
    if frame.log_id != log || frame.frame_bytes != entry.data.len() {
        return Err(format!(
            "entry {} holds a frame of log {} ({} bytes), not of log {log}",
            entry.index,
            frame.log_id,
            entry.data.len()
        ));
    }
    if u64::from(frame.epoch.0) != entry.term {
        return Err(format!(
            "entry {} of term {} holds a batch of epoch {}",
            entry.index, entry.term, frame.epoch
        ));
    }
    Ok(())
}

/// A data entry's batch: (first offset, records, max timestamp). An opaque
/// replica's entries (the controller's commands) are never batches.
fn batch_of(entry: &Entry, opaque: bool) -> Option<(Offset, u64, i64)> {
    if opaque
        || entry.get_entry_type() != EntryType::EntryNormal
        || entry.data.len() < sluice_schema::batch::HEADER_BYTES
    {
        return None;
    }
    let header = format::header(&entry.data).ok()?;
    (header.magic.get() == sluice_schema::batch::MAGIC && header.record_count.get() > 0).then(
        || {
            (
                header.base_offset.get(),
                u64::from(header.record_count.get()),
                header.max_timestamp_ms.get(),
            )
        },
    )
}

/// The offset after `entry` when it starts at `at`.
fn entry_end_offset(entry: &Entry, at: Offset, opaque: bool) -> Offset {
    batch_of(entry, opaque).map_or(at, |(base, records, _)| base + records)
}

/// The WAL frame for an entry starting at offset `at`.
fn entry_frame(log: LogId, entry: &Entry, at: Offset, opaque: bool) -> EntryFrame {
    let term = entry.term;
    if let Some((base, records, max_timestamp_ms)) = batch_of(entry, opaque) {
        debug_assert_eq!(base, at, "a data entry starts at the log's next offset");
        return EntryFrame {
            index: entry.index,
            term,
            base_offset: base,
            end_offset: base + records,
            max_timestamp_ms,
            frame: entry.data.clone(),
        };
    }
    let control = Control::Entry {
        entry_type: entry.get_entry_type() as u8,
        data: entry.data.clone(),
        context: entry.context.clone(),
    };
    let now = crate::storage::now_ms();
    EntryFrame {
        index: entry.index,
        term,
        base_offset: at,
        end_offset: at,
        max_timestamp_ms: now,
        frame: control.encode(log, at, Epoch(term as u32), now),
    }
}

/// Rebuilds the raft-rs entry a stored frame holds (for sending old entries).
pub fn frame_entry(index: u64, frame: Bytes) -> Result<Entry, String> {
    let stored = format::verify_stored_header(&frame, crate::limits::BATCH_BYTES_MAX)
        .map_err(|e| e.to_string())?;
    let mut entry = Entry::default();
    entry.index = index;
    entry.term = u64::from(stored.epoch.0);
    if stored.control {
        match Control::decode(&frame).map_err(|e| e.to_string())? {
            Control::Entry {
                entry_type,
                data,
                context,
            } => {
                entry.set_entry_type(match entry_type {
                    1 => EntryType::EntryConfChange,
                    2 => EntryType::EntryConfChangeV2,
                    _ => EntryType::EntryNormal,
                });
                entry.data = data;
                entry.context = context;
            }
            other => {
                return Err(format!(
                    "index {index} names a {other:?} frame, not an entry"
                ))
            }
        }
    } else {
        entry.data = frame;
    }
    Ok(entry)
}
