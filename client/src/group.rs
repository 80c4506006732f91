//! [`GroupConsumer`]: a consumer-group member on top of the partition-addressed
//! [`Consumer`].
//!
//! Two halves:
//!
//! * a **background task** (the membership) joins the group and heartbeats every
//!   `heartbeat_interval_ms` the broker asks for, so a slow record handler does
//!   not lose the session. Each answer carries the member's whole assignment;
//!   the task publishes it (with the member id and epoch) on a watch channel.
//!   A heartbeat answered `UnknownMemberId` or `StaleMemberEpoch` (or no
//!   successful heartbeat for a whole session timeout) means the member is
//!   fenced: the task counts a fence, forgets its partitions and rejoins with
//!   epoch 0 and an empty member id.
//! * the **foreground** ([`GroupConsumer::recv`], or the [`Stream`]) applies
//!   assignment changes before it hands out the next record. The assignment is
//!   cooperative: a partition missing from the latest assignment is revoked —
//!   its delivered position is committed (auto-commit, or
//!   [`GroupConsumerBuilder::commit_on_revoke`]), `on_revoked` runs, the
//!   partition is unassigned (none of its buffered records is delivered after
//!   that) — and the membership task is told at once, so its next heartbeat
//!   (sent right away) reports the smaller owned set. An added partition (the
//!   broker adds only partitions no other member owns) starts at the group's
//!   committed offset, or at [`AutoOffsetReset`] when there is none, and
//!   `on_assigned` runs. After a fence every partition is dropped without
//!   committing (`on_lost`, or `on_revoked` when no `on_lost` is set).
//!
//! Commits (auto-commit every [`GroupConsumerBuilder::auto_commit_interval`],
//! checked inside `recv` and in [`GroupConsumer::close`], or [`GroupConsumer::commit`])
//! store the offset after the last record `recv` returned per partition: records
//! are processed at least once, provided the caller finishes a record before it
//! asks for the next one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use sluice_schema::groups::{
    validate_group_id, JOIN_EPOCH, LEAVE_EPOCH, SESSION_TIMEOUT_MS_DEFAULT, STATIC_LEAVE_EPOCH,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord, SeekTo};
use crate::error::{Error, Result};
use crate::groups::TopicPartition;
use crate::request::{GroupHeartbeatRequest, TopicPartitions};

/// Heartbeat interval until the broker names one.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_millis(1000);
/// Default [`GroupConsumerBuilder::auto_commit_interval`].
pub const AUTO_COMMIT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// Wait before a failed heartbeat (coordinator unreachable or moving) is retried,
/// at most (never longer than the heartbeat interval).
pub const HEARTBEAT_RETRY_WAIT: Duration = Duration::from_millis(200);
/// Wait before partitions whose committed offsets could not be fetched are
/// tried again.
pub const ASSIGN_RETRY_WAIT: Duration = Duration::from_millis(500);

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOffsetReset {
    /// The log start offset.
    #[default]
    Earliest,
    /// The high watermark: only records produced from now on.
    Latest,
}

impl AutoOffsetReset {
    fn seek(self) -> SeekTo {
        match self {
            AutoOffsetReset::Earliest => SeekTo::Beginning,
            AutoOffsetReset::Latest => SeekTo::End,
        }
    }
}

/// A rebalance callback: gets the partitions assigned, revoked or lost.
pub type RebalanceHook = Box<dyn FnMut(&[TopicPartition]) + Send + 'static>;

/// Configures and builds a [`GroupConsumer`].
#[must_use]
pub struct GroupConsumerBuilder {
    client: Client,
    group_id: String,
    topics: Vec<String>,
    instance_id: Option<String>,
    session_timeout: Option<Duration>,
    rebalance_timeout: Option<Duration>,
    assignor: Option<String>,
    auto_commit: bool,
    auto_commit_interval: Duration,
    commit_on_revoke: Option<bool>,
    auto_offset_reset: AutoOffsetReset,
    consumer_config: ConsumerConfig,
    on_assigned: Option<RebalanceHook>,
    on_revoked: Option<RebalanceHook>,
    on_lost: Option<RebalanceHook>,
}

impl std::fmt::Debug for GroupConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumerBuilder")
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("instance_id", &self.instance_id)
            .field("auto_commit", &self.auto_commit)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Option<Duration>) -> u32 {
    duration.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32)
}

impl GroupConsumerBuilder {
    /// The group to join (required).
    pub fn group(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// Topics to consume (at least one).
    pub fn subscribe<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Static membership: a member that comes back with the same instance id
    /// within its session timeout gets its partitions back without a rebalance;
    /// [`GroupConsumer::close`] then leaves only for now (epoch -2).
    pub fn instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// How long the broker keeps the member without a heartbeat (default: the
    /// broker's, 45 s).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }

    /// How long the member may take to give up revoked partitions (default:
    /// the broker's, 60 s).
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.rebalance_timeout = Some(timeout);
        self
    }

    /// `"uniform"` (the broker's default) or `"range"`; the group uses the
    /// assignor of its first member.
    pub fn assignor(mut self, assignor: impl Into<String>) -> Self {
        self.assignor = Some(assignor.into());
        self
    }

    /// Commit delivered positions automatically (default on).
    pub fn auto_commit(mut self, enabled: bool) -> Self {
        self.auto_commit = enabled;
        self
    }

    /// How often auto-commit commits (default 5 s).
    pub fn auto_commit_interval(mut self, interval: Duration) -> Self {
        self.auto_commit_interval = interval;
        self
    }

    /// Commit the delivered positions of revoked partitions before giving them
    /// up (default: on with auto-commit, off without). With manual commits the
    /// records delivered since the last commit of a revoked partition are
    /// delivered again to its next owner unless this is on.
    pub fn commit_on_revoke(mut self, enabled: bool) -> Self {
        self.commit_on_revoke = Some(enabled);
        self
    }

    /// Where a partition without a committed offset starts (default earliest).
    pub fn auto_offset_reset(mut self, reset: AutoOffsetReset) -> Self {
        self.auto_offset_reset = reset;
        self
    }

    /// Fetch settings of the underlying [`Consumer`] (its `start` is not used:
    /// positions come from the committed offsets and [`AutoOffsetReset`]).
    pub fn consumer_config(mut self, config: ConsumerConfig) -> Self {
        self.consumer_config = config;
        self
    }

    /// Called after partitions were added (their positions are set).
    pub fn on_assigned<F>(mut self, hook: F) -> Self
    where
        F: FnMut(&[TopicPartition]) + Send + 'static,
    {
        self.on_assigned = Some(Box::new(hook));
        self
    }

    /// Called when partitions are taken away in a rebalance or at close: after
    /// their positions were committed (auto-commit / commit-on-revoke), before
    /// they are unassigned.
    pub fn on_revoked<F>(mut self, hook: F) -> Self
    where
        F: FnMut(&[TopicPartition]) + Send + 'static,
    {
        self.on_revoked = Some(Box::new(hook));
        self
    }

    /// Called when the member was fenced and its partitions are gone (nothing
    /// was committed for them); without it, `on_revoked` is called.
    pub fn on_lost<F>(mut self, hook: F) -> Self
    where
        F: FnMut(&[TopicPartition]) + Send + 'static,
    {
        self.on_lost = Some(Box::new(hook));
        self
    }

    /// Joins the group (the first heartbeat is sent before this returns, so a
    /// bad group id or timeout fails here) and starts the heartbeat task. Call
    /// inside a tokio runtime.
    pub async fn build(self) -> Result<GroupConsumer> {
        validate_group_id(&self.group_id).map_err(|message| Error::InvalidGroupId {
            message: Some(message),
        })?;
        let mut topics = self.topics.clone();
        topics.sort();
        topics.dedup();
        if topics.is_empty() {
            return Err(Error::InvalidArgument(
                "a group consumer must subscribe to at least one topic".into(),
            ));
        }
        let template = GroupHeartbeatRequest {
            group_id: self.group_id.clone(),
            instance_id: self.instance_id.clone(),
            session_timeout_ms: millis(self.session_timeout),
            rebalance_timeout_ms: millis(self.rebalance_timeout),
            ..GroupHeartbeatRequest::default()
        };
        let session_timeout = self
            .session_timeout
            .unwrap_or(Duration::from_millis(u64::from(SESSION_TIMEOUT_MS_DEFAULT)));
        let (snapshot_tx, snapshots) = watch::channel(Snapshot::default());
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let mut membership = Membership {
            client: self.client.clone(),
            state: MemberState {
                template,
                topics,
                assignor: self.assignor.clone(),
                member_id: String::new(),
                member_epoch: JOIN_EPOCH,
                owned: BTreeSet::new(),
            },
            interval: HEARTBEAT_INTERVAL_DEFAULT,
            session_timeout,
            last_ok: Instant::now(),
            snapshot: snapshot_tx,
            commands,
        };
        membership.join().await?;
        let interval = membership.interval;
        tokio::spawn(membership.run(interval));
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            group_id: self.group_id.clone(),
            commands: commands_tx,
            snapshots: snapshots.clone(),
            progress: Mutex::new(Progress::default()),
        });
        let core = Core {
            shared: shared.clone(),
            consumer: Consumer::new(self.client, self.consumer_config),
            snapshots,
            reconcile_pending: true,
            seen_fences: 0,
            seen_errors: 0,
            errors: VecDeque::new(),
            auto_commit: self.auto_commit.then_some(self.auto_commit_interval),
            next_auto_commit: Instant::now() + self.auto_commit_interval,
            commit_on_revoke: self.commit_on_revoke.unwrap_or(self.auto_commit),
            reset: self.auto_offset_reset,
            assign_retry_at: None,
            on_assigned: self.on_assigned,
            on_revoked: self.on_revoked,
            on_lost: self.on_lost,
            membership_ended: false,
            closed: false,
        };
        Ok(GroupConsumer {
            core: Arc::new(tokio::sync::Mutex::new(core)),
            shared,
            pending: None,
        })
    }
}

/// What the membership task publishes.
#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    /// Empty while not a member (joining, or after a fence).
    member_id: String,
    member_epoch: i32,
    /// Every partition the member may own.
    assignment: BTreeSet<TopicPartition>,
    /// How many times the member was fenced so far.
    fences: u64,
    /// Non-retriable heartbeat failures so far, and the latest.
    errors: u64,
    error: Option<String>,
}

/// From the foreground to the membership task.
enum Command {
    /// The foreground applied `member_id`'s assignment and owns `owned`:
    /// heartbeat now.
    Owned {
        member_id: String,
        owned: BTreeSet<TopicPartition>,
    },
    /// A commit found `member_id` fenced.
    Fenced { member_id: String },
    /// Leave the group and stop.
    Leave { reply: oneshot::Sender<Result<()>> },
}

/// What a member sends in its heartbeats.
#[derive(Debug, Clone)]
struct MemberState {
    /// Group id, instance id and timeouts of every heartbeat.
    template: GroupHeartbeatRequest,
    topics: Vec<String>,
    assignor: Option<String>,
    member_id: String,
    member_epoch: i32,
    /// What the foreground owns (reported in every heartbeat).
    owned: BTreeSet<TopicPartition>,
}

impl MemberState {
    /// The next heartbeat: a join (subscription and assignor) at epoch 0, else
    /// a plain heartbeat; both report the owned partitions.
    fn request(&self) -> GroupHeartbeatRequest {
        let joining = self.member_epoch == JOIN_EPOCH;
        GroupHeartbeatRequest {
            member_id: self.member_id.clone(),
            member_epoch: self.member_epoch,
            subscribed_topics: joining.then(|| self.topics.clone()),
            assignor: if joining { self.assignor.clone() } else { None },
            owned: Some(TopicPartitions::group(
                self.owned
                    .iter()
                    .map(|(topic, partition)| (topic.as_str(), *partition)),
            )),
            ..self.template.clone()
        }
    }

    /// The leave heartbeat (epoch -1, or -2 for a static member); forgets the
    /// membership. `None` when not a member.
    fn leave_request(&mut self) -> Option<GroupHeartbeatRequest> {
        if self.member_id.is_empty() {
            return None;
        }
        let epoch = if self.template.instance_id.is_some() {
            STATIC_LEAVE_EPOCH
        } else {
            LEAVE_EPOCH
        };
        self.member_epoch = JOIN_EPOCH;
        self.owned.clear();
        Some(GroupHeartbeatRequest {
            member_id: std::mem::take(&mut self.member_id),
            member_epoch: epoch,
            ..self.template.clone()
        })
    }

    /// Forgets the membership so the next heartbeat rejoins from scratch.
    fn reset(&mut self) {
        self.member_id.clear();
        self.member_epoch = JOIN_EPOCH;
        self.owned.clear();
    }
}

/// The membership task: joins, heartbeats, rejoins after a fence, leaves.
struct Membership {
    client: Client,
    state: MemberState,
    interval: Duration,
    session_timeout: Duration,
    /// When the latest successful heartbeat was sent.
    last_ok: Instant,
    snapshot: watch::Sender<Snapshot>,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl Membership {
    fn request(&self) -> GroupHeartbeatRequest {
        self.state.request()
    }

    /// The first join (from `build`): errors are returned, not published.
    async fn join(&mut self) -> Result<()> {
        let sent = Instant::now();
        let answer = self.client.group_heartbeat(&self.request()).await?;
        self.accept(sent, answer);
        Ok(())
    }

    fn accept(&mut self, sent: Instant, answer: crate::response::GroupHeartbeatResult) {
        self.last_ok = sent;
        if !answer.member_id.is_empty() {
            self.state.member_id = answer.member_id;
        }
        self.state.member_epoch = answer.member_epoch;
        if answer.heartbeat_interval_ms > 0 {
            self.interval = Duration::from_millis(u64::from(answer.heartbeat_interval_ms));
        }
        let assignment: BTreeSet<TopicPartition> =
            TopicPartitions::pairs(&answer.assignment).collect();
        let (member_id, member_epoch) = (self.state.member_id.clone(), self.state.member_epoch);
        self.snapshot.send_if_modified(|snapshot| {
            let changed = snapshot.member_id != member_id
                || snapshot.member_epoch != member_epoch
                || snapshot.assignment != assignment;
            snapshot.member_id = member_id;
            snapshot.member_epoch = member_epoch;
            snapshot.assignment = assignment;
            changed
        });
    }

    async fn run(mut self, first_wait: Duration) {
        let mut next_at = Instant::now() + first_wait;
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    // The consumer was dropped without `close`: leave anyway.
                    None => {
                        if let Err(error) = self.leave().await {
                            tracing::debug!(%error, "leaving the group failed");
                        }
                        return;
                    }
                    Some(Command::Owned { member_id, owned }) => {
                        if member_id == self.state.member_id && !member_id.is_empty() {
                            self.state.owned = owned;
                            next_at = Instant::now();
                        }
                    }
                    Some(Command::Fenced { member_id }) => {
                        if member_id == self.state.member_id && !member_id.is_empty() {
                            self.fence("an offset commit was refused");
                            next_at = Instant::now();
                        }
                    }
                    Some(Command::Leave { reply }) => {
                        let _ = reply.send(self.leave().await);
                        return;
                    }
                },
                () = tokio::time::sleep_until(next_at) => {
                    next_at = Instant::now() + self.beat().await;
                }
            }
        }
    }

    /// One heartbeat; returns how long to wait before the next.
    async fn beat(&mut self) -> Duration {
        let sent = Instant::now();
        match self.client.group_heartbeat(&self.request()).await {
            Ok(answer) => {
                self.accept(sent, answer);
                self.interval
            }
            Err(error) if error.is_fenced() => {
                self.fence(&error.to_string());
                Duration::ZERO
            }
            Err(error) if error.is_retriable() => {
                tracing::debug!(group = %self.state.template.group_id, %error, "heartbeat failed; retrying");
                if self.state.member_epoch != JOIN_EPOCH
                    && sent.saturating_duration_since(self.last_ok) >= self.session_timeout
                {
                    self.fence("no heartbeat succeeded for a whole session timeout");
                }
                HEARTBEAT_RETRY_WAIT.min(self.interval)
            }
            Err(error) => {
                tracing::warn!(group = %self.state.template.group_id, %error, "heartbeat refused");
                let text = error.to_string();
                self.snapshot.send_modify(|snapshot| {
                    snapshot.errors += 1;
                    snapshot.error = Some(text);
                });
                self.interval.max(HEARTBEAT_INTERVAL_DEFAULT)
            }
        }
    }

    /// The member is gone: forget everything, publish the fence, rejoin.
    fn fence(&mut self, why: &str) {
        tracing::warn!(
            group = %self.state.template.group_id,
            member = %self.state.member_id,
            why,
            "fenced: dropping every partition and rejoining"
        );
        self.state.reset();
        self.snapshot.send_modify(|snapshot| {
            snapshot.member_id.clear();
            snapshot.member_epoch = JOIN_EPOCH;
            snapshot.assignment.clear();
            snapshot.fences += 1;
        });
    }

    async fn leave(&mut self) -> Result<()> {
        let Some(request) = self.state.leave_request() else {
            return Ok(());
        };
        match self.client.group_heartbeat(&request).await {
            Ok(_) => Ok(()),
            // Already gone: nothing to leave.
            Err(error) if error.is_fenced() => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// State both the foreground and spawned commits use.
struct Shared {
    client: Client,
    group_id: String,
    commands: mpsc::UnboundedSender<Command>,
    snapshots: watch::Receiver<Snapshot>,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Owned partitions (exactly the keys) and their positions.
    parts: HashMap<(Arc<str>, u32), PartProgress>,
    /// The member whose assignment `parts` follows, and its epoch then.
    member_id: String,
    member_epoch: i32,
    /// A commit found this member fenced.
    fenced: Option<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PartProgress {
    /// Offset after the last record delivered.
    delivered: Option<u64>,
    /// The offset committed last (or found committed).
    committed: Option<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The member id and epoch to commit with: the member whose partitions the
    /// foreground owns, with its latest epoch. `None` when not a member.
    fn committer(&self) -> Option<(String, i32)> {
        let progress = self.lock();
        if progress.member_id.is_empty() || progress.fenced.as_ref() == Some(&progress.member_id) {
            return None;
        }
        let latest = self.snapshots.borrow();
        let epoch = if latest.member_id == progress.member_id {
            latest.member_epoch
        } else {
            progress.member_epoch
        };
        Some((progress.member_id.clone(), epoch))
    }

    /// Delivered positions not committed yet (of `only`, if given).
    fn uncommitted(&self, only: Option<&BTreeSet<TopicPartition>>) -> Vec<(TopicPartition, u64)> {
        let progress = self.lock();
        let mut offsets: Vec<(TopicPartition, u64)> = progress
            .parts
            .iter()
            .filter_map(|((topic, partition), part)| {
                let delivered = part.delivered?;
                if part.committed == Some(delivered) {
                    return None;
                }
                let key = (topic.to_string(), *partition);
                if only.is_some_and(|only| !only.contains(&key)) {
                    return None;
                }
                Some((key, delivered))
            })
            .collect();
        offsets.sort();
        offsets
    }

    /// Commits `offsets` as the current member; a fence is recorded (the
    /// foreground drops the partitions) and told to the membership task.
    async fn commit(&self, offsets: Vec<(TopicPartition, u64)>) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let Some((member_id, epoch)) = self.committer() else {
            return Err(Error::MembershipEnded(
                "not a group member right now (joining or fenced); nothing was committed".into(),
            ));
        };
        let result = self
            .client
            .commit_offsets(&self.group_id, &member_id, epoch, offsets.iter().cloned())
            .await;
        match result {
            Ok(()) => {
                let mut progress = self.lock();
                if progress.member_id == member_id {
                    for ((topic, partition), offset) in offsets {
                        let key = (Arc::from(topic.as_str()), partition);
                        if let Some(part) = progress.parts.get_mut(&key) {
                            part.committed = Some(offset);
                        }
                    }
                }
                Ok(())
            }
            Err(error) if error.is_fenced() => {
                {
                    let mut progress = self.lock();
                    if progress.member_id == member_id {
                        progress.fenced = Some(member_id.clone());
                    }
                }
                let _ = self.commands.send(Command::Fenced { member_id });
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}

/// The partitions to give up and to take: `owned − target` and `target − owned`.
pub(crate) fn diff(
    owned: &BTreeSet<TopicPartition>,
    target: &BTreeSet<TopicPartition>,
) -> (BTreeSet<TopicPartition>, BTreeSet<TopicPartition>) {
    let revoked = owned.difference(target).cloned().collect();
    let added = target.difference(owned).cloned().collect();
    (revoked, added)
}

/// The foreground state: the partition consumer and the applied assignment.
struct Core {
    shared: Arc<Shared>,
    consumer: Consumer,
    snapshots: watch::Receiver<Snapshot>,
    /// Reconcile before the next record even if no new snapshot arrived.
    reconcile_pending: bool,
    seen_fences: u64,
    seen_errors: u64,
    errors: VecDeque<Error>,
    auto_commit: Option<Duration>,
    next_auto_commit: Instant,
    commit_on_revoke: bool,
    reset: AutoOffsetReset,
    /// Added partitions could not be set up; try again then.
    assign_retry_at: Option<Instant>,
    on_assigned: Option<RebalanceHook>,
    on_revoked: Option<RebalanceHook>,
    on_lost: Option<RebalanceHook>,
    membership_ended: bool,
    closed: bool,
}

impl Core {
    fn owned(&self) -> BTreeSet<TopicPartition> {
        self.shared
            .lock()
            .parts
            .keys()
            .map(|(topic, partition)| (topic.to_string(), *partition))
            .collect()
    }

    fn owns(&self, topic: &Arc<str>, partition: u32) -> bool {
        self.shared
            .lock()
            .parts
            .contains_key(&(topic.clone(), partition))
    }

    fn needs_reconcile(&self) -> bool {
        if self.reconcile_pending || self.snapshots.has_changed().unwrap_or(false) {
            return true;
        }
        if self.assign_retry_at.is_some_and(|at| at <= Instant::now()) {
            return true;
        }
        let progress = self.shared.lock();
        !progress.member_id.is_empty() && progress.fenced.as_ref() == Some(&progress.member_id)
    }

    async fn next(&mut self) -> Option<Result<ConsumerRecord>> {
        loop {
            if let Some(error) = self.errors.pop_front() {
                return Some(Err(error));
            }
            if self.closed {
                return None;
            }
            if self.needs_reconcile() {
                self.reconcile().await;
                continue;
            }
            self.auto_commit_if_due().await;
            let wake_at = match (
                self.auto_commit.map(|_| self.next_auto_commit),
                self.assign_retry_at,
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake = async move {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = self.snapshots.changed(), if !self.membership_ended => {
                    // `changed` marked the snapshot seen: reconcile it next.
                    self.reconcile_pending = true;
                    if changed.is_err() {
                        self.membership_ended = true;
                        self.errors.push_back(Error::MembershipEnded(
                            "the heartbeat task stopped".into(),
                        ));
                    }
                }
                item = self.consumer.recv() => match item {
                    None => return None,
                    Some(Ok(record)) => {
                        if self.delivered(&record) {
                            return Some(Ok(record));
                        }
                    }
                    Some(Err(Error::OffsetOutOfRange { topic, partition, offset, log_start_offset, high_watermark })) => {
                        if self.owns(&Arc::from(topic.as_str()), partition) {
                            tracing::warn!(
                                %topic, partition, offset, log_start_offset, high_watermark,
                                reset = ?self.reset,
                                "position out of range; resetting"
                            );
                            let _ = self.consumer.seek(&topic, partition, self.reset.seek());
                        }
                    }
                    Some(Err(error)) => return Some(Err(error)),
                },
                () = wake => {}
            }
        }
    }

    /// Records a delivery; `false` for a record of a partition not owned (it
    /// is dropped).
    fn delivered(&self, record: &ConsumerRecord) -> bool {
        let mut progress = self.shared.lock();
        match progress
            .parts
            .get_mut(&(record.topic.clone(), record.partition))
        {
            Some(part) => {
                part.delivered = Some(record.offset + 1);
                true
            }
            None => false,
        }
    }

    async fn auto_commit_if_due(&mut self) {
        let Some(interval) = self.auto_commit else {
            return;
        };
        let now = Instant::now();
        if now < self.next_auto_commit {
            return;
        }
        self.next_auto_commit = now + interval;
        let offsets = self.shared.uncommitted(None);
        if offsets.is_empty() || self.shared.committer().is_none() {
            return;
        }
        if let Err(error) = self.shared.commit(offsets).await {
            if error.is_fenced() {
                self.reconcile_pending = true;
            } else {
                tracing::warn!(group = %self.shared.group_id, %error, "auto-commit failed");
            }
        }
    }

    fn call(hook: &mut Option<RebalanceHook>, partitions: &BTreeSet<TopicPartition>) {
        if partitions.is_empty() {
            return;
        }
        if let Some(hook) = hook {
            let list: Vec<TopicPartition> = partitions.iter().cloned().collect();
            hook(&list);
        }
    }

    /// Drops every partition without committing.
    fn lose_all(&mut self) {
        let lost = {
            let mut progress = self.shared.lock();
            progress.member_id.clear();
            let lost: BTreeSet<TopicPartition> = progress
                .parts
                .drain()
                .map(|((topic, partition), _)| (topic.to_string(), partition))
                .collect();
            lost
        };
        for (topic, partition) in &lost {
            let _ = self.consumer.unassign(topic, *partition);
        }
        if !lost.is_empty() {
            tracing::info!(group = %self.shared.group_id, partitions = lost.len(), "partitions lost");
            if self.on_lost.is_some() {
                Core::call(&mut self.on_lost, &lost);
            } else {
                Core::call(&mut self.on_revoked, &lost);
            }
        }
    }

    /// Applies the latest assignment: revoke, then add, then tell the
    /// membership task. Every await comes before the state changes it leads
    /// to, so a cancelled call leaves a consistent state and is simply redone.
    async fn reconcile(&mut self) {
        // Pending until a call runs to its end: one cancelled at an await (the
        // caller stopped waiting for a record) is redone by the next.
        self.reconcile_pending = true;
        self.reconcile_pending = self.reconcile_once().await;
    }

    /// One pass of [`Core::reconcile`]; `true` when another is needed at once.
    async fn reconcile_once(&mut self) -> bool {
        let snapshot = self.snapshots.borrow_and_update().clone();
        if snapshot.errors != self.seen_errors {
            self.seen_errors = snapshot.errors;
            if let Some(error) = snapshot.error.clone() {
                self.errors.push_back(Error::MembershipEnded(error));
            }
        }
        let (commit_fenced, fenced_member, member_id) = {
            let progress = self.shared.lock();
            (
                !progress.member_id.is_empty()
                    && progress.fenced.as_ref() == Some(&progress.member_id),
                progress.fenced.clone(),
                progress.member_id.clone(),
            )
        };
        let member_changed = !member_id.is_empty() && member_id != snapshot.member_id;
        if snapshot.fences != self.seen_fences || commit_fenced || member_changed {
            self.seen_fences = snapshot.fences;
            self.lose_all();
        }
        let valid =
            !snapshot.member_id.is_empty() && fenced_member.as_ref() != Some(&snapshot.member_id);
        if !valid {
            return false;
        }
        {
            let mut progress = self.shared.lock();
            progress.member_id = snapshot.member_id.clone();
            progress.member_epoch = snapshot.member_epoch;
        }
        let owned = self.owned();
        let (revoked, added) = diff(&owned, &snapshot.assignment);
        // A member adopted (first join, or a rejoin after a fence) hears what
        // is owned at once.
        let mut changed = member_id != snapshot.member_id;
        if !revoked.is_empty() {
            if self.commit_on_revoke {
                let offsets = self.shared.uncommitted(Some(&revoked));
                if let Err(error) = self.shared.commit(offsets).await {
                    if error.is_fenced() {
                        self.lose_all();
                        return true;
                    }
                    tracing::warn!(
                        group = %self.shared.group_id, %error,
                        "committing revoked partitions failed; their records since the last commit will be delivered again"
                    );
                }
            }
            tracing::debug!(group = %self.shared.group_id, ?revoked, "revoking");
            Core::call(&mut self.on_revoked, &revoked);
            {
                let mut progress = self.shared.lock();
                for (topic, partition) in &revoked {
                    progress
                        .parts
                        .remove(&(Arc::from(topic.as_str()), *partition));
                }
            }
            for (topic, partition) in &revoked {
                let _ = self.consumer.unassign(topic, *partition);
            }
            // The revocation is complete: heartbeat the smaller set right away.
            self.report_owned(&snapshot.member_id);
            changed = false;
        }
        let retry_due = self.assign_retry_at.is_none_or(|at| at <= Instant::now());
        if !added.is_empty() && retry_due {
            match self.add(&added).await {
                Ok(()) => {
                    self.assign_retry_at = None;
                    tracing::debug!(group = %self.shared.group_id, ?added, "assigned");
                    Core::call(&mut self.on_assigned, &added);
                    changed = true;
                }
                Err(error) => {
                    tracing::warn!(
                        group = %self.shared.group_id, %error,
                        "could not set up assigned partitions; retrying"
                    );
                    self.assign_retry_at = Some(Instant::now() + ASSIGN_RETRY_WAIT);
                }
            }
        } else if added.is_empty() {
            self.assign_retry_at = None;
        }
        if changed {
            self.report_owned(&snapshot.member_id);
        }
        false
    }

    /// Tells the membership task what `member_id` owns now (it heartbeats at
    /// once).
    fn report_owned(&self, member_id: &str) {
        let _ = self.shared.commands.send(Command::Owned {
            member_id: member_id.to_owned(),
            owned: self.owned(),
        });
    }

    /// Starts reading `added` at the group's committed offsets (or the reset
    /// policy). All lookups happen first; nothing changes unless all succeed.
    async fn add(&mut self, added: &BTreeSet<TopicPartition>) -> Result<()> {
        let request = TopicPartitions::group(
            added
                .iter()
                .map(|(topic, partition)| (topic.as_str(), *partition)),
        );
        let committed = self
            .shared
            .client
            .fetch_offsets(&self.shared.group_id, Some(&request))
            .await?;
        let mut routes = BTreeMap::new();
        for entry in &request {
            let route = self.shared.client.topic_route(&entry.topic, true).await?;
            if let Some(partition) = entry
                .partitions
                .iter()
                .find(|partition| **partition >= route.partition_count())
            {
                return Err(Error::UnknownPartition {
                    topic: entry.topic.clone(),
                    partition: *partition,
                });
            }
            routes.insert(entry.topic.clone(), route);
        }
        let mut progress = self.shared.lock();
        for (topic, partition) in added {
            let Some(route) = routes.get(topic) else {
                continue;
            };
            let offset = committed
                .get(&(topic.clone(), *partition))
                .and_then(|committed| committed.offset);
            let start = offset.map_or(self.reset.seek(), SeekTo::Offset);
            self.consumer.assign_route(route, &[*partition], start)?;
            // Already assigned (a partition kept across a fence): move it.
            self.consumer.seek(topic, *partition, start)?;
            progress.parts.insert(
                (route.name.clone(), *partition),
                PartProgress {
                    delivered: None,
                    committed: offset,
                },
            );
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let mut first_error = None;
        if self.auto_commit.is_some() {
            let offsets = self.shared.uncommitted(None);
            if let Err(error) = self.shared.commit(offsets).await {
                if !error.is_fenced() {
                    first_error = Some(error);
                }
            }
        }
        let fenced = {
            let progress = self.shared.lock();
            progress.fenced.is_some() && progress.fenced.as_ref() == Some(&progress.member_id)
        };
        if fenced {
            self.lose_all();
        } else {
            let owned = {
                let mut progress = self.shared.lock();
                let owned: BTreeSet<TopicPartition> = progress
                    .parts
                    .drain()
                    .map(|((topic, partition), _)| (topic.to_string(), partition))
                    .collect();
                owned
            };
            Core::call(&mut self.on_revoked, &owned);
            for (topic, partition) in &owned {
                let _ = self.consumer.unassign(topic, *partition);
            }
        }
        let (reply, answer) = oneshot::channel();
        if self.shared.commands.send(Command::Leave { reply }).is_ok() {
            if let Ok(Err(error)) = answer.await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

type NextRecord = Pin<Box<dyn Future<Output = Option<Result<ConsumerRecord>>> + Send>>;

/// A consumer-group member: [`GroupConsumer::recv`] (or the [`Stream`]) returns
/// records of the partitions the group assigns it. See the module docs.
///
/// ```no_run
/// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
/// use sluice_client::GroupConsumer;
/// let mut consumer = GroupConsumer::builder(client)
///     .group("order-processing")
///     .subscribe(["orders"])
///     .auto_commit(false)
///     .build()
///     .await?;
/// while let Some(record) = consumer.recv().await {
///     let record = record?;
///     println!("{}/{} @ {}", record.topic, record.partition, record.offset);
///     consumer.commit().await?;
/// }
/// consumer.close().await?;
/// # Ok(()) }
/// ```
pub struct GroupConsumer {
    core: Arc<tokio::sync::Mutex<Core>>,
    shared: Arc<Shared>,
    /// The `recv` in progress (kept across polls, so nothing is lost when a
    /// caller stops waiting).
    pending: Option<NextRecord>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group_id", &self.shared.group_id)
            .field("member_id", &self.member_id())
            .finish_non_exhaustive()
    }
}

impl GroupConsumer {
    /// A builder; set at least [`GroupConsumerBuilder::group`] and
    /// [`GroupConsumerBuilder::subscribe`].
    pub fn builder(client: Client) -> GroupConsumerBuilder {
        GroupConsumerBuilder {
            client,
            group_id: String::new(),
            topics: Vec::new(),
            instance_id: None,
            session_timeout: None,
            rebalance_timeout: None,
            assignor: None,
            auto_commit: true,
            auto_commit_interval: AUTO_COMMIT_INTERVAL_DEFAULT,
            commit_on_revoke: None,
            auto_offset_reset: AutoOffsetReset::Earliest,
            consumer_config: ConsumerConfig::default(),
            on_assigned: None,
            on_revoked: None,
            on_lost: None,
        }
    }

    /// The group.
    pub fn group_id(&self) -> &str {
        &self.shared.group_id
    }

    /// The next record of an owned partition (applying assignment changes and
    /// auto-commits first). Cancel-safe. `None` only after the membership
    /// ended for good.
    pub async fn recv(&mut self) -> Option<Result<ConsumerRecord>> {
        poll_fn(|cx| self.poll_record(cx)).await
    }

    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ConsumerRecord>>> {
        let core = &self.core;
        let pending = self.pending.get_or_insert_with(|| {
            let core = core.clone();
            Box::pin(async move {
                let mut core = core.lock_owned().await;
                core.next().await
            })
        });
        match pending.as_mut().poll(cx) {
            Poll::Ready(item) => {
                self.pending = None;
                Poll::Ready(item)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Commits the position after the last record delivered, for every owned
    /// partition whose position moved since its last commit. A fenced member
    /// gets [`Error::UnknownMemberId`] or [`Error::StaleMemberEpoch`] (its
    /// partitions are then dropped and it rejoins).
    pub async fn commit(&self) -> Result<()> {
        let offsets = self.shared.uncommitted(None);
        self.shared.commit(offsets).await
    }

    /// [`GroupConsumer::commit`] in a spawned task.
    pub fn commit_async(&self) -> JoinHandle<Result<()>> {
        let shared = self.shared.clone();
        let offsets = shared.uncommitted(None);
        tokio::spawn(async move { shared.commit(offsets).await })
    }

    /// Commits the given offsets (each the next offset to consume) of owned
    /// partitions.
    pub async fn commit_offsets<I>(&self, offsets: I) -> Result<()>
    where
        I: IntoIterator<Item = (TopicPartition, u64)>,
    {
        let offsets: Vec<(TopicPartition, u64)> = offsets.into_iter().collect();
        self.shared.commit(offsets).await
    }

    /// The partitions owned now, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let mut owned: Vec<TopicPartition> = self
            .shared
            .lock()
            .parts
            .keys()
            .map(|(topic, partition)| (topic.to_string(), *partition))
            .collect();
        owned.sort();
        owned
    }

    /// The offset after the last record delivered of an owned partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.shared
            .lock()
            .parts
            .get(&(Arc::from(topic), partition))
            .and_then(|part| part.delivered)
    }

    /// The member id (empty while joining or rejoining).
    pub fn member_id(&self) -> String {
        self.shared.snapshots.borrow().member_id.clone()
    }

    /// The member epoch of the latest heartbeat.
    pub fn member_epoch(&self) -> i32 {
        self.shared.snapshots.borrow().member_epoch
    }

    /// Commits (with auto-commit), gives up the partitions (`on_revoked`) and
    /// leaves the group (epoch -1; -2 for a static member, whose partitions
    /// wait for it until its session times out).
    pub async fn close(mut self) -> Result<()> {
        self.pending = None;
        let mut core = self.core.lock().await;
        core.close().await
    }
}

impl Stream for GroupConsumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_record(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, u32)]) -> BTreeSet<TopicPartition> {
        pairs
            .iter()
            .map(|(topic, partition)| ((*topic).to_owned(), *partition))
            .collect()
    }

    #[test]
    fn diff_splits_revoked_and_added() {
        let owned = set(&[("a", 0), ("a", 1), ("b", 0)]);
        let target = set(&[("a", 1), ("b", 0), ("b", 1), ("c", 3)]);
        let (revoked, added) = diff(&owned, &target);
        assert_eq!(revoked, set(&[("a", 0)]));
        assert_eq!(added, set(&[("b", 1), ("c", 3)]));
        let (revoked, added) = diff(&target, &target);
        assert!(revoked.is_empty() && added.is_empty());
        let (revoked, added) = diff(&owned, &BTreeSet::new());
        assert_eq!(revoked, owned);
        assert!(added.is_empty());
    }

    #[test]
    fn heartbeat_request_joins_then_stays_then_leaves() {
        let mut state = MemberState {
            template: GroupHeartbeatRequest {
                group_id: "g".into(),
                instance_id: Some("i-1".into()),
                session_timeout_ms: 6000,
                ..GroupHeartbeatRequest::default()
            },
            topics: vec!["orders".into()],
            assignor: Some("range".into()),
            member_id: String::new(),
            member_epoch: JOIN_EPOCH,
            owned: BTreeSet::new(),
        };
        let join = state.request();
        assert_eq!((join.group_id.as_str(), join.member_epoch), ("g", 0));
        assert_eq!(join.member_id, "");
        assert_eq!(join.subscribed_topics, Some(vec!["orders".to_owned()]));
        assert_eq!(join.assignor.as_deref(), Some("range"));
        assert_eq!(join.instance_id.as_deref(), Some("i-1"));
        assert_eq!(join.session_timeout_ms, 6000);
        assert_eq!(join.owned, Some(Vec::new()));
        state.member_id = "m-1".into();
        state.member_epoch = 4;
        state.owned = set(&[("orders", 2), ("orders", 0)]);
        let stay = state.request();
        assert_eq!((stay.member_id.as_str(), stay.member_epoch), ("m-1", 4));
        assert_eq!(stay.subscribed_topics, None);
        assert_eq!(stay.assignor, None);
        assert_eq!(
            stay.owned,
            Some(vec![TopicPartitions {
                topic: "orders".into(),
                partitions: vec![0, 2],
            }])
        );
        let leave = state.clone().leave_request().unwrap();
        assert_eq!(
            (leave.member_id.as_str(), leave.member_epoch),
            ("m-1", STATIC_LEAVE_EPOCH)
        );
        state.template.instance_id = None;
        let leave = state.leave_request().unwrap();
        assert_eq!(leave.member_epoch, LEAVE_EPOCH);
        assert!(state.leave_request().is_none(), "left already");
        state.member_id = "m-2".into();
        state.member_epoch = 9;
        state.owned = set(&[("orders", 1)]);
        state.reset();
        let rejoin = state.request();
        assert_eq!(
            (rejoin.member_id.as_str(), rejoin.member_epoch),
            ("", JOIN_EPOCH)
        );
        assert_eq!(rejoin.owned, Some(Vec::new()));
        assert!(rejoin.subscribed_topics.is_some());
    }
}
