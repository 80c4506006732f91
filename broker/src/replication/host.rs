//! The replicas of one shard, driven: the I/O around [`Replica`].
//!
//! One task per shard (`run`) ticks every replica, hands each Ready's messages to
//! the transport, its writes to the shard's WAL, and — once a write is durable, in
//! the order the writes were made — tells the replica and sends the messages that
//! had to wait for it. Proposals and incoming messages step a replica directly
//! (the shard is single-threaded) and mark it for the next round, so one round
//! serves every proposal that arrived meanwhile: many batches, one WAL write, one
//! network write per peer.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use raft::eraftpb::Message;

use crate::cluster::{ClusterView, LeaderInfo};
use crate::partition::raft_log::{FetchRequest, Recovered};
use crate::partition::replica::{
    frame_entry, AckMode, AckSlot, GroupId, Replica, ReplicaConfig, ReplicaError, TICK,
};
use crate::storage::format::BatchInfo;
use crate::storage::Wal;
use crate::sync::{Completion, Notify};
use crate::types::{LogId, NodeId, Offset};

/// Where the host sends messages to other nodes.
pub trait Outbound {
    /// Queues `message` for node `to` (best effort: Raft retries what is lost).
    fn send(&self, to: NodeId, group: GroupId, message: &Message);
}

/// What a state machine (the controller) gets: committed entries' data.
pub type ApplySink = Box<dyn Fn(GroupId, Vec<(u64, Bytes)>)>;

/// A write handed to the WAL (or an empty one waiting its turn).
struct PendingPersist {
    number: u64,
    last_index: u64,
    done: Option<Rc<Completion<crate::storage::Result<()>>>>,
    messages: Vec<Message>,
}

struct Hosted {
    replica: Replica,
    persists: VecDeque<PendingPersist>,
    /// Set when the WAL failed a write: the replica stops until the node restarts.
    failed: Option<String>,
    /// (commit index, high watermark) last told to the WAL.
    told: (u64, Offset),
    /// Leadership as last published to the cluster view.
    published: Option<LeaderInfo>,
}

/// The replicas of one shard.
pub struct ReplicaHost {
    node: NodeId,
    wal: Rc<Wal>,
    cluster: Arc<ClusterView>,
    outbound: Rc<dyn Outbound>,
    replicas: RefCell<HashMap<GroupId, Hosted>>,
    by_log: RefCell<HashMap<LogId, GroupId>>,
    dirty: RefCell<BTreeSet<GroupId>>,
    fetched: RefCell<Vec<(GroupId, FetchRequest, Vec<raft::eraftpb::Entry>)>>,
    wake: Notify,
    /// Wakes long-polling fetches when a high watermark moves.
    pub advanced: Notify,
    apply: RefCell<Option<ApplySink>>,
    closing: Cell<bool>,
}

/// How a local replica is created.
pub struct NewReplica {
    /// The group.
    pub group: GroupId,
    /// Its log in this shard's WAL.
    pub log: LogId,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Campaign at once (the preferred leader of a new group).
    pub campaign: bool,
    /// Already applied to a state machine (the controller: what node.json holds).
    pub applied: Option<u64>,
    /// Hand committed data to the apply sink.
    pub wants_applied: bool,
}

impl ReplicaHost {
    /// A host for one shard.
    pub fn new(
        node: NodeId,
        wal: Rc<Wal>,
        cluster: Arc<ClusterView>,
        outbound: Rc<dyn Outbound>,
    ) -> Rc<ReplicaHost> {
        Rc::new(ReplicaHost {
            node,
            wal,
            cluster,
            outbound,
            replicas: RefCell::new(HashMap::new()),
            by_log: RefCell::new(HashMap::new()),
            dirty: RefCell::new(BTreeSet::new()),
            fetched: RefCell::new(Vec::new()),
            wake: Notify::default(),
            advanced: Notify::default(),
            apply: RefCell::new(None),
            closing: Cell::new(false),
        })
    }

    /// Where committed data of `wants_applied` replicas goes.
    pub fn set_apply_sink(&self, sink: ApplySink) {
        *self.apply.borrow_mut() = Some(sink);
    }

    /// Creates (or recovers) a replica over its log in the WAL. Idempotent.
    pub async fn add(&self, new: NewReplica) -> Result<(), String> {
        if self.replicas.borrow().contains_key(&new.group) {
            return Ok(());
        }
        self.wal.create_replicated_log(new.log);
        let view = self
            .wal
            .replicated_view(new.log)
            .map_err(|e| e.to_string())?;
        let last = view.end_index.saturating_sub(1);
        let before_first = view.first_index.saturating_sub(1);
        // Where the offset is known (commit_index pairs with commit_offset), and
        // how far the durable hard state says is committed (possibly further).
        let point = view.commit_index.clamp(before_first, last);
        let commit = view
            .hard_state
            .commit
            .max(point)
            .min(last)
            .max(before_first);
        // A partition re-applies from the point its offsets are known; a state
        // machine from what it has applied.
        let applied = new.applied.map_or(point, |a| a.clamp(before_first, commit));
        let from = applied + 1;
        let mut uncommitted = Vec::new();
        if from < view.end_index {
            let frames = self
                .wal
                .read_entries(new.log, from, view.end_index, usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            for (index, frame) in frames {
                uncommitted.push(frame_entry(index, frame)?);
            }
        }
        let recovered = Recovered {
            first_index: view.first_index,
            last_index: view.end_index.saturating_sub(1),
            start_term: view.start_term,
            terms: view.terms.clone(),
            hard_state: crate::storage::HardState {
                commit,
                ..view.hard_state
            },
            start_offset: view.log_start,
            uncommitted,
        };
        let replica = Replica::new(ReplicaConfig {
            group: new.group,
            log: new.log,
            node: self.node,
            voters: new.voters,
            recovered,
            next_offset: view.next_offset,
            commit_offset: view.commit_offset,
            applied: Some(applied),
            wants_applied: new.wants_applied,
            campaign: new.campaign,
        })?;
        self.by_log.borrow_mut().insert(new.log, new.group);
        self.replicas.borrow_mut().insert(
            new.group,
            Hosted {
                replica,
                persists: VecDeque::new(),
                failed: None,
                told: (0, 0),
                published: None,
            },
        );
        self.mark(new.group);
        Ok(())
    }

    /// Removes a replica (its topic was deleted); its log stays until the WAL drops it.
    pub fn remove(&self, group: GroupId) {
        if let Some(hosted) = self.replicas.borrow_mut().remove(&group) {
            self.by_log.borrow_mut().remove(&hosted.replica.log);
        }
        self.cluster.forget(group);
    }

    /// The group a local log belongs to, if it is replicated.
    pub fn group_of(&self, log: LogId) -> Option<GroupId> {
        self.by_log.borrow().get(&log).copied()
    }

    /// Runs `f` on a replica.
    pub fn with<T>(&self, group: GroupId, f: impl FnOnce(&Replica) -> T) -> Option<T> {
        self.replicas.borrow().get(&group).map(|h| f(&h.replica))
    }

    /// After retention: tells each replica where its log starts now, so Raft
    /// sends a follower that needs what is gone a snapshot instead.
    pub fn compact_all(&self) {
        let mut replicas = self.replicas.borrow_mut();
        for hosted in replicas.values_mut() {
            if let Ok(view) = self.wal.replicated_view(hosted.replica.log) {
                hosted
                    .replica
                    .compacted(view.first_index, view.start_term, view.log_start);
            }
        }
    }

    /// Groups hosted here.
    pub fn groups(&self) -> Vec<GroupId> {
        self.replicas.borrow().keys().copied().collect()
    }

    fn mark(&self, group: GroupId) {
        self.dirty.borrow_mut().insert(group);
        self.wake.notify_all();
    }

    /// Proposes verified client batches to a group this node leads.
    pub fn propose(
        &self,
        group: GroupId,
        batches: &[(Bytes, BatchInfo)],
        mode: AckMode,
    ) -> Result<AckSlot, ReplicaError> {
        let mut replicas = self.replicas.borrow_mut();
        let hosted = replicas
            .get_mut(&group)
            .ok_or(ReplicaError::NotLeader(None))?;
        if let Some(reason) = &hosted.failed {
            return Err(ReplicaError::Storage(reason.clone()));
        }
        let slot = hosted.replica.propose(batches, mode)?;
        drop(replicas);
        self.mark(group);
        Ok(slot)
    }

    /// Proposes opaque data (the controller's commands); followers forward it.
    pub fn propose_data(&self, group: GroupId, data: Bytes) -> Result<(), ReplicaError> {
        let mut replicas = self.replicas.borrow_mut();
        let hosted = replicas
            .get_mut(&group)
            .ok_or(ReplicaError::NotLeader(None))?;
        hosted.replica.propose_data(data)?;
        drop(replicas);
        self.mark(group);
        Ok(())
    }

    /// Steps a message from a peer.
    pub fn deliver(&self, group: GroupId, message: Message) {
        let mut replicas = self.replicas.borrow_mut();
        let Some(hosted) = replicas.get_mut(&group) else {
            return;
        };
        if hosted.failed.is_some() {
            return;
        }
        if let Err(error) = hosted.replica.step(message) {
            tracing::debug!(%group, %error, "dropped a Raft message");
            return;
        }
        drop(replicas);
        self.mark(group);
    }

    /// Stops the loop.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake.notify_all();
    }

    /// The loop: ticks, Readies, durable writes, entry fetches. Runs until closed.
    pub async fn run(self: Rc<Self>) {
        let mut next_tick = Instant::now() + TICK;
        while !self.closing.get() {
            let now = Instant::now();
            if now >= next_tick {
                self.tick_all();
                next_tick = now + TICK;
            } else if self.dirty.borrow().is_empty() {
                let wait = next_tick - now;
                let _ = glommio::timer::timeout(wait, async {
                    self.wake.wait().await;
                    Ok(())
                })
                .await;
            }
            self.finish_persists();
            self.deliver_fetched();
            let dirty: Vec<GroupId> = std::mem::take(&mut *self.dirty.borrow_mut())
                .into_iter()
                .collect();
            for group in dirty {
                self.drive(group);
            }
            // Let the shard's other tasks (connections, the WAL) run.
            glommio::executor().yield_if_needed().await;
        }
    }

    fn tick_all(&self) {
        let mut replicas = self.replicas.borrow_mut();
        let mut dirty = self.dirty.borrow_mut();
        for (group, hosted) in replicas.iter_mut() {
            if hosted.failed.is_none() {
                hosted.replica.tick();
                dirty.insert(*group);
            }
        }
    }

    /// Handles every Ready of one replica.
    fn drive(self: &Rc<Self>, group: GroupId) {
        let mut applied = Vec::new();
        {
            let mut replicas = self.replicas.borrow_mut();
            let Some(hosted) = replicas.get_mut(&group) else {
                return;
            };
            if hosted.failed.is_some() {
                return;
            }
            while let Some(out) = hosted.replica.ready() {
                for message in &out.messages {
                    self.outbound
                        .send(NodeId(message.to as u32), group, message);
                    if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                        hosted.replica.snapshot_sent(message.to);
                    }
                }
                applied.extend(out.applied);
                let Some(write) = out.write else {
                    continue;
                };
                let last_index = write.frames.last().map_or(0, |f| f.index);
                let done = if write.is_empty() {
                    None
                } else {
                    match self.wal.submit(hosted.replica.log, write) {
                        Ok(done) => Some(done),
                        Err(error) => {
                            self.fail(hosted, group, &error.to_string());
                            return;
                        }
                    }
                };
                if let Some(done) = &done {
                    let (done, host) = (done.clone(), self.clone());
                    glommio::spawn_local(async move {
                        let _ = done.wait_ref().await;
                        host.wake.notify_all();
                    })
                    .detach();
                }
                hosted.persists.push_back(PendingPersist {
                    number: out.number,
                    last_index,
                    done,
                    messages: out.persisted_messages,
                });
            }
            self.publish(group, hosted);
            for request in hosted.replica.fetch_requests() {
                self.spawn_fetch(group, hosted.replica.log, request);
            }
        }
        if !applied.is_empty() {
            if let Some(sink) = self.apply.borrow().as_ref() {
                sink(group, applied);
            }
        }
    }

    fn fail(&self, hosted: &mut Hosted, group: GroupId, reason: &str) {
        tracing::error!(%group, %reason, "the WAL failed a replica's write; the replica stops until the node restarts");
        hosted.replica.persist_failed(reason);
        hosted.failed = Some(reason.to_string());
        hosted.persists.clear();
    }

    /// Tells replicas which of their writes became durable, in order.
    fn finish_persists(&self) {
        let mut replicas = self.replicas.borrow_mut();
        for (group, hosted) in replicas.iter_mut() {
            let mut progressed = false;
            while let Some(front) = hosted.persists.front() {
                let result = match &front.done {
                    None => Ok(()),
                    Some(done) if done.is_complete() => done.take().unwrap_or(Ok(())),
                    Some(_) => break,
                };
                let Some(persist) = hosted.persists.pop_front() else {
                    break;
                };
                if let Err(error) = result {
                    let reason = error.to_string();
                    tracing::error!(%group, %reason, "the WAL failed a replica's write; the replica stops until the node restarts");
                    hosted.replica.persist_failed(&reason);
                    hosted.failed = Some(reason);
                    hosted.persists.clear();
                    break;
                }
                hosted.replica.persisted(persist.number, persist.last_index);
                for message in &persist.messages {
                    self.outbound
                        .send(NodeId(message.to as u32), *group, message);
                }
                progressed = true;
            }
            if progressed {
                self.dirty.borrow_mut().insert(*group);
            }
        }
    }

    /// Moves the WAL's served high watermark and the cluster's view of leadership.
    fn publish(&self, group: GroupId, hosted: &mut Hosted) {
        let replica = &hosted.replica;
        let (_, _, applied) = replica.indexes();
        let high_watermark = replica.high_watermark();
        if (applied, high_watermark) != hosted.told {
            self.wal.set_commit(replica.log, applied, high_watermark);
            hosted.told = (applied, high_watermark);
            self.advanced.notify_all();
        }
        let info = LeaderInfo {
            leader: replica.leader(),
            term: replica.term(),
            high_watermark,
            log_start: self.wal.log_offsets(replica.log).map(|o| o.0).unwrap_or(0),
            in_sync: replica.in_sync(),
            in_sync_mask: replica.in_sync_mask(),
            voters: replica.voters().len() as u16,
            shard: self.wal.config().shard.0,
        };
        let changed = hosted.published.as_ref().is_none_or(|old| {
            old.leader != info.leader
                || old.term != info.term
                || old.in_sync_mask != info.in_sync_mask
        });
        let leader_moved = hosted
            .published
            .as_ref()
            .is_none_or(|old| old.leader != info.leader || old.term != info.term);
        if leader_moved && info.leader == Some(self.node) {
            tracing::info!(%group, term = info.term, "this node now leads the group");
        }
        if changed
            || (replica.is_leader()
                && hosted
                    .published
                    .as_ref()
                    .is_some_and(|o| o.high_watermark != high_watermark))
        {
            self.cluster
                .observe(group, info.clone(), replica.is_leader());
            hosted.published = Some(info);
        }
    }

    fn spawn_fetch(self: &Rc<Self>, group: GroupId, log: LogId, request: FetchRequest) {
        let host = self.clone();
        glommio::spawn_local(async move {
            let max_bytes = usize::try_from(request.max_bytes).unwrap_or(usize::MAX);
            let entries = match host
                .wal
                .read_entries(log, request.low, request.high, max_bytes)
                .await
            {
                Ok(frames) => frames
                    .into_iter()
                    .map(|(index, frame)| frame_entry(index, frame))
                    .collect::<Result<Vec<_>, _>>(),
                Err(error) => Err(error.to_string()),
            };
            match entries {
                Ok(entries) => {
                    host.fetched.borrow_mut().push((group, request, entries));
                    host.wake.notify_all();
                }
                Err(error) => {
                    tracing::warn!(%group, %error, "cannot read old entries for a follower; it will be asked again");
                }
            }
        })
        .detach();
    }

    fn deliver_fetched(&self) {
        let fetched = std::mem::take(&mut *self.fetched.borrow_mut());
        if fetched.is_empty() {
            return;
        }
        let mut replicas = self.replicas.borrow_mut();
        for (group, request, entries) in fetched {
            if let Some(hosted) = replicas.get_mut(&group) {
                hosted.replica.fetched(request, entries);
                self.dirty.borrow_mut().insert(group);
            }
        }
    }
}
