//! A consumer group's state machine (no I/O): membership, epochs, the target
//! assignment and cooperative reconciliation (KIP-848's model: the broker
//! assigns; a member first gives up what moves, and a partition is handed to a
//! member only once no other member owns it), session and rebalance timeouts,
//! static membership, and the rules for committing offsets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sluice_schema::groups::{JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH};
use sluice_schema::wire::ErrorCode;

use super::assign::{assign, Assignor, MemberSubscription};
use crate::shard_messages::ApiError;

/// `(topic, partition)`.
pub type TopicPartition = (String, u32);

/// A committed offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Next offset to consume.
    pub offset: u64,
    /// Client metadata.
    #[serde(default)]
    pub metadata: String,
    /// When it was committed.
    pub commit_timestamp_ms: i64,
}

/// A member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Broker-assigned id.
    pub member_id: String,
    /// `group.instance.id` of a static member.
    pub instance_id: Option<String>,
    /// The client id of its latest join.
    pub client_id: String,
    /// Subscribed topics, sorted.
    pub subscribed: Vec<String>,
    /// Its epoch; equals the group's assignment epoch once reconciled.
    pub member_epoch: i32,
    /// What it owns (told in a response), including what it is revoking.
    pub assigned: BTreeSet<TopicPartition>,
    /// What it has been asked to give up and has not yet confirmed.
    pub revoking: BTreeSet<TopicPartition>,
    /// Session timeout.
    pub session_timeout_ms: u32,
    /// How long it may take to revoke.
    pub rebalance_timeout_ms: u32,
    /// A static member that left with epoch -2; it keeps its partitions until its
    /// session expires.
    #[serde(default)]
    pub departed: bool,
    /// Last heartbeat (monotonic ms; not persisted: a loaded member gets a fresh
    /// session).
    #[serde(skip)]
    pub last_heartbeat_ms: u64,
    /// When the current revocation started (monotonic ms).
    #[serde(skip)]
    pub revoking_since_ms: u64,
}

/// A group.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Group {
    /// Id.
    pub group_id: String,
    /// Bumped on every membership or subscription change.
    pub group_epoch: i32,
    /// The group epoch the target assignment was computed for.
    pub assignment_epoch: i32,
    /// Assignor name.
    pub assignor: String,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// Target assignment by member id.
    pub target: BTreeMap<String, BTreeSet<TopicPartition>>,
    /// Partition counts of subscribed topics when the target was computed.
    pub topics_seen: BTreeMap<String, u32>,
    /// Committed offsets (persisted as records of their own).
    #[serde(skip)]
    pub offsets: BTreeMap<TopicPartition, Committed>,
    /// Ids handed out so far (a counter in member ids).
    #[serde(default)]
    pub members_joined: u64,
}

/// A heartbeat, decoded.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    /// Group.
    pub group_id: String,
    /// Member id (empty on a first join).
    pub member_id: String,
    /// Member epoch (0 join, -1 leave, -2 static leave).
    pub member_epoch: i32,
    /// Static instance id.
    pub instance_id: Option<String>,
    /// Client id of the connection.
    pub client_id: String,
    /// Session timeout (already bounded).
    pub session_timeout_ms: u32,
    /// Rebalance timeout.
    pub rebalance_timeout_ms: u32,
    /// New subscription, if sent.
    pub subscribed: Option<Vec<String>>,
    /// Assignor name (on join).
    pub assignor: String,
    /// Owned partitions, if sent.
    pub owned: Option<BTreeSet<TopicPartition>>,
}

/// What a heartbeat answers.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatAnswer {
    /// Member id.
    pub member_id: String,
    /// Member epoch.
    pub member_epoch: i32,
    /// What the member owns from now on.
    pub assignment: BTreeSet<TopicPartition>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl Group {
    /// An empty group.
    pub fn new(group_id: &str) -> Group {
        Group {
            group_id: group_id.to_owned(),
            assignor: Assignor::Uniform.name().to_owned(),
            ..Group::default()
        }
    }

    /// "empty", "reconciling" (some member does not own exactly its target yet)
    /// or "stable". A member whose partitions do not change takes the new epoch
    /// at its next heartbeat; until then it is stable all the same.
    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.assignment_epoch != self.group_epoch
            || self.members.values().any(|m| {
                !m.revoking.is_empty() || self.target.get(&m.member_id) != Some(&m.assigned)
            })
        {
            "reconciling"
        } else {
            "stable"
        }
    }

    fn bump(&mut self) {
        self.group_epoch = self.group_epoch.saturating_add(1);
    }

    fn new_member_id(&mut self) -> String {
        self.members_joined += 1;
        format!(
            "{}-{}-{:08x}",
            self.group_id.chars().take(32).collect::<String>(),
            self.members_joined,
            rand_u32()
        )
    }

    /// Handles a heartbeat. `partitions` gives the partition count of a topic
    /// (None: no such topic). Returns the answer and whether the group changed
    /// (and must be persisted).
    pub fn heartbeat(
        &mut self,
        request: &Heartbeat,
        now_ms: u64,
        partitions: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(HeartbeatAnswer, bool), ApiError> {
        let mut changed = false;
        let member_id = match request.member_epoch {
            JOIN_EPOCH => self.join(request, now_ms, &mut changed)?,
            LEAVE_EPOCH | STATIC_LEAVE_EPOCH => {
                let static_leave = request.member_epoch == STATIC_LEAVE_EPOCH;
                let Some(member) = self.members.get_mut(&request.member_id) else {
                    return Err(unknown_member(&request.member_id, &self.group_id));
                };
                if static_leave && member.instance_id.is_some() {
                    member.departed = true;
                    member.last_heartbeat_ms = now_ms;
                } else {
                    self.members.remove(&request.member_id);
                    self.target.remove(&request.member_id);
                    self.bump();
                }
                return Ok((
                    HeartbeatAnswer {
                        member_id: request.member_id.clone(),
                        member_epoch: request.member_epoch,
                        assignment: BTreeSet::new(),
                    },
                    true,
                ));
            }
            epoch if epoch > 0 => {
                let Some(member) = self.members.get_mut(&request.member_id) else {
                    return Err(unknown_member(&request.member_id, &self.group_id));
                };
                if epoch > member.member_epoch {
                    return Err(error(
                        ErrorCode::StaleMemberEpoch,
                        format!(
                            "member {} sent epoch {epoch}, but its epoch is {}",
                            request.member_id, member.member_epoch
                        ),
                    ));
                }
                member.last_heartbeat_ms = now_ms;
                if let Some(subscribed) = &request.subscribed {
                    let subscribed = normalized(subscribed);
                    if subscribed != member.subscribed {
                        member.subscribed = subscribed;
                        changed = true;
                        self.group_epoch = self.group_epoch.saturating_add(1);
                    }
                }
                request.member_id.clone()
            }
            epoch => {
                return Err(error(
                    ErrorCode::InvalidRequest,
                    format!("member epoch {epoch} is not valid (0 joins, -1 leaves, -2 leaves a static member for now)"),
                ))
            }
        };
        if let Some(owned) = &request.owned {
            let member = self.members.get_mut(&member_id).expect("member exists");
            if !member.revoking.is_empty() && member.revoking.is_disjoint(owned) {
                let revoked = std::mem::take(&mut member.revoking);
                member.assigned.retain(|tp| !revoked.contains(tp));
                changed = true;
            }
        }
        self.refresh_target(partitions, &mut changed);
        self.reconcile(&member_id, now_ms, &mut changed);
        let member = &self.members[&member_id];
        Ok((
            HeartbeatAnswer {
                member_id,
                member_epoch: member.member_epoch,
                assignment: member
                    .assigned
                    .difference(&member.revoking)
                    .cloned()
                    .collect(),
            },
            changed,
        ))
    }

    fn join(
        &mut self,
        request: &Heartbeat,
        now_ms: u64,
        changed: &mut bool,
    ) -> Result<String, ApiError> {
        let subscribed = normalized(request.subscribed.as_deref().unwrap_or_default());
        if subscribed.is_empty() {
            return Err(error(
                ErrorCode::InvalidRequest,
                "a joining member must subscribe to at least one topic",
            ));
        }
        let assignor = Assignor::parse(&request.assignor)
            .map_err(|message| error(ErrorCode::InvalidRequest, message))?;
        if self.members.is_empty() {
            self.assignor = assignor.name().to_owned();
        }
        *changed = true;
        let new_id = self.new_member_id();
        let previous = request.instance_id.as_ref().and_then(|instance| {
            self.members
                .values()
                .find(|m| m.instance_id.as_ref() == Some(instance))
                .map(|m| m.member_id.clone())
        });
        let mut member = match previous {
            // A static member comes back (or replaces a live predecessor, which is
            // fenced): it takes over the old member's partitions and epoch, with
            // no rebalance unless its subscription changed.
            Some(old_id) => {
                let mut member = self.members.remove(&old_id).expect("found above");
                if let Some(target) = self.target.remove(&old_id) {
                    self.target.insert(new_id.clone(), target);
                }
                member.departed = false;
                member.revoking.clear();
                if member.subscribed != subscribed {
                    self.bump();
                }
                member
            }
            None => {
                if self.members.len() >= crate::limits::GROUP_MEMBERS_MAX {
                    return Err(error(
                        ErrorCode::InvalidRequest,
                        format!(
                            "group {} has {} members, the most a group may have",
                            self.group_id,
                            self.members.len()
                        ),
                    ));
                }
                if !request.member_id.is_empty() && self.members.contains_key(&request.member_id) {
                    // A known member rejoins from scratch: it owns nothing any more.
                    self.members.remove(&request.member_id);
                    self.target.remove(&request.member_id);
                }
                self.bump();
                Member {
                    member_id: String::new(),
                    instance_id: request.instance_id.clone(),
                    client_id: String::new(),
                    subscribed: Vec::new(),
                    member_epoch: 0,
                    assigned: BTreeSet::new(),
                    revoking: BTreeSet::new(),
                    session_timeout_ms: 0,
                    rebalance_timeout_ms: 0,
                    departed: false,
                    last_heartbeat_ms: now_ms,
                    revoking_since_ms: now_ms,
                }
            }
        };
        member.member_id = new_id.clone();
        member.client_id = request.client_id.clone();
        member.subscribed = subscribed;
        member.session_timeout_ms = request.session_timeout_ms;
        member.rebalance_timeout_ms = request.rebalance_timeout_ms;
        member.last_heartbeat_ms = now_ms;
        self.members.insert(new_id.clone(), member);
        Ok(new_id)
    }

    /// Recomputes the target when the group epoch moved or a subscribed topic's
    /// partition count changed.
    fn refresh_target(&mut self, partitions: &dyn Fn(&str) -> Option<u32>, changed: &mut bool) {
        let topics: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|m| m.subscribed.iter())
            .collect();
        let seen: BTreeMap<String, u32> = topics
            .iter()
            .filter_map(|topic| partitions(topic).map(|count| ((*topic).clone(), count)))
            .collect();
        if seen != self.topics_seen {
            self.bump();
        }
        if self.assignment_epoch == self.group_epoch {
            return;
        }
        let assignor = Assignor::parse(&self.assignor).unwrap_or(Assignor::Uniform);
        let subscriptions: Vec<MemberSubscription<'_>> = self
            .members
            .values()
            .map(|m| MemberSubscription {
                id: &m.member_id,
                topics: &m.subscribed,
            })
            .collect();
        self.target = assign(assignor, &subscriptions, &seen, &self.target);
        self.topics_seen = seen;
        self.assignment_epoch = self.group_epoch;
        *changed = true;
    }

    /// Moves one member towards its target: first revoke what moves away; once
    /// that is confirmed, take the new epoch and every target partition no other
    /// member still owns.
    fn reconcile(&mut self, member_id: &str, now_ms: u64, changed: &mut bool) {
        let empty = BTreeSet::new();
        let target = self.target.get(member_id).unwrap_or(&empty).clone();
        let owned_by_others: BTreeSet<TopicPartition> = self
            .members
            .values()
            .filter(|m| m.member_id != member_id)
            .flat_map(|m| m.assigned.iter().cloned())
            .collect();
        let assignment_epoch = self.assignment_epoch;
        let member = self.members.get_mut(member_id).expect("member exists");
        if member.revoking.is_empty() {
            let to_revoke: BTreeSet<TopicPartition> =
                member.assigned.difference(&target).cloned().collect();
            if !to_revoke.is_empty() {
                member.revoking = to_revoke;
                member.revoking_since_ms = now_ms;
                *changed = true;
            }
        }
        if member.revoking.is_empty() {
            let grant: Vec<TopicPartition> = target
                .difference(&member.assigned)
                .filter(|tp| !owned_by_others.contains(*tp))
                .cloned()
                .collect();
            if !grant.is_empty() {
                member.assigned.extend(grant);
                *changed = true;
            }
            if member.member_epoch != assignment_epoch {
                member.member_epoch = assignment_epoch;
                *changed = true;
            }
        }
    }

    /// Removes members whose session expired or whose revocation took longer than
    /// their rebalance timeout. Returns the removed ids.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                now_ms.saturating_sub(m.last_heartbeat_ms) > u64::from(m.session_timeout_ms)
                    || (!m.revoking.is_empty()
                        && now_ms.saturating_sub(m.revoking_since_ms)
                            > u64::from(m.rebalance_timeout_ms))
            })
            .map(|m| m.member_id.clone())
            .collect();
        for id in &expired {
            self.members.remove(id);
            self.target.remove(id);
        }
        if !expired.is_empty() {
            self.bump();
        }
        expired
    }

    /// Checks an offset commit: by a member, for partitions it owns; or without
    /// a member (empty id, epoch -1) while the group has none.
    pub fn check_commit(
        &self,
        member_id: &str,
        member_epoch: i32,
        partitions: &[TopicPartition],
    ) -> Result<(), ApiError> {
        if member_id.is_empty() {
            if member_epoch != -1 {
                return Err(error(
                    ErrorCode::InvalidRequest,
                    "a commit without a member id must have member epoch -1",
                ));
            }
            let active = self.members.values().filter(|m| !m.departed).count();
            if active > 0 || !self.members.is_empty() {
                return Err(error(
                    ErrorCode::GroupNotEmpty,
                    format!(
                        "group {} has {} member(s); only its members may commit while it is active",
                        self.group_id,
                        self.members.len()
                    ),
                ));
            }
            return Ok(());
        }
        let Some(member) = self.members.get(member_id) else {
            return Err(unknown_member(member_id, &self.group_id));
        };
        if member_epoch > member.member_epoch || member_epoch <= 0 {
            return Err(error(
                ErrorCode::StaleMemberEpoch,
                format!(
                    "member {member_id} committed with epoch {member_epoch}, but its epoch is {}",
                    member.member_epoch
                ),
            ));
        }
        if let Some(tp) = partitions.iter().find(|tp| !member.assigned.contains(*tp)) {
            return Err(error(
                ErrorCode::PartitionNotAssigned,
                format!(
                    "member {member_id} does not own partition {} of '{}'",
                    tp.1, tp.0
                ),
            ));
        }
        Ok(())
    }
}

fn unknown_member(member_id: &str, group_id: &str) -> ApiError {
    error(
        ErrorCode::UnknownMemberId,
        format!(
            "group {group_id} has no member {member_id:?} (it left or its session expired); rejoin"
        ),
    )
}

fn normalized(topics: &[String]) -> Vec<String> {
    let set: BTreeSet<&String> = topics.iter().collect();
    set.into_iter().cloned().collect()
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(group: &mut Group, now: u64, instance: Option<&str>) -> HeartbeatAnswer {
        let request = Heartbeat {
            group_id: group.group_id.clone(),
            member_epoch: 0,
            instance_id: instance.map(str::to_owned),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            subscribed: Some(vec!["orders".into()]),
            ..Heartbeat::default()
        };
        group.heartbeat(&request, now, &six).unwrap().0
    }

    fn six(topic: &str) -> Option<u32> {
        (topic == "orders").then_some(6)
    }

    fn beat(group: &mut Group, answer: &HeartbeatAnswer, now: u64) -> HeartbeatAnswer {
        let request = Heartbeat {
            group_id: group.group_id.clone(),
            member_id: answer.member_id.clone(),
            member_epoch: answer.member_epoch,
            owned: Some(answer.assignment.clone()),
            ..Heartbeat::default()
        };
        group.heartbeat(&request, now, &six).unwrap().0
    }

    /// Heartbeats every member until nothing changes; checks that no partition
    /// is ever owned by two members.
    fn settle(group: &mut Group, answers: &mut [HeartbeatAnswer], now: u64) {
        for _ in 0..10 {
            for answer in answers.iter_mut() {
                *answer = beat(group, answer, now);
                let mut seen = BTreeSet::new();
                for m in group.members.values() {
                    for tp in &m.assigned {
                        assert!(seen.insert(tp.clone()), "{tp:?} owned twice");
                    }
                }
            }
        }
        assert_eq!(group.state(), "stable", "{group:?}");
    }

    #[test]
    fn three_members_share_six_partitions_and_a_fourth_moves_only_two() {
        let mut group = Group::new("g");
        let mut answers: Vec<HeartbeatAnswer> = (0..3).map(|_| join(&mut group, 0, None)).collect();
        settle(&mut group, &mut answers, 0);
        assert!(answers.iter().all(|a| a.assignment.len() == 2));
        let before: Vec<BTreeSet<TopicPartition>> =
            answers.iter().map(|a| a.assignment.clone()).collect();
        answers.push(join(&mut group, 1, None));
        settle(&mut group, &mut answers, 1);
        let total: usize = answers.iter().map(|a| a.assignment.len()).sum();
        assert_eq!(total, 6);
        let kept: usize = before
            .iter()
            .zip(&answers)
            .map(|(b, a)| b.intersection(&a.assignment).count())
            .sum();
        assert!(kept >= 4, "only {kept} partitions stayed");
    }

    #[test]
    fn an_expired_member_is_fenced_and_its_partitions_move() {
        let mut group = Group::new("g");
        let mut answers: Vec<HeartbeatAnswer> = (0..2).map(|_| join(&mut group, 0, None)).collect();
        settle(&mut group, &mut answers, 0);
        let zombie = answers.remove(1);
        // Only member 0 heartbeats for 11 s.
        answers[0] = beat(&mut group, &answers[0], 5_000);
        assert_eq!(group.expire(11_000), vec![zombie.member_id.clone()]);
        settle(&mut group, &mut answers, 11_000);
        assert_eq!(answers[0].assignment.len(), 6);
        let tp = zombie.assignment.iter().next().unwrap().clone();
        let refused = group
            .check_commit(&zombie.member_id, zombie.member_epoch, &[tp])
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::UnknownMemberId);
    }

    #[test]
    fn a_static_member_that_returns_gets_its_partitions_without_a_rebalance() {
        let mut group = Group::new("g");
        let mut answers = vec![
            join(&mut group, 0, Some("a")),
            join(&mut group, 0, Some("b")),
        ];
        settle(&mut group, &mut answers, 0);
        let epoch = group.group_epoch;
        let mine = answers[1].assignment.clone();
        let leave = Heartbeat {
            group_id: "g".into(),
            member_id: answers[1].member_id.clone(),
            member_epoch: STATIC_LEAVE_EPOCH,
            ..Heartbeat::default()
        };
        group.heartbeat(&leave, 1_000, &six).unwrap();
        let back = join(&mut group, 2_000, Some("b"));
        assert_eq!(back.assignment, mine);
        assert_eq!(group.group_epoch, epoch);
    }

    #[test]
    fn commits_need_ownership_or_an_empty_group() {
        let mut group = Group::new("g");
        let mut answers = vec![join(&mut group, 0, None)];
        settle(&mut group, &mut answers, 0);
        let refused = group.check_commit("", -1, &[]).unwrap_err();
        assert_eq!(refused.code, ErrorCode::GroupNotEmpty);
        let a = &answers[0];
        group
            .check_commit(&a.member_id, a.member_epoch, &[("orders".into(), 3)])
            .unwrap();
        let refused = group
            .check_commit(&a.member_id, a.member_epoch, &[("other".into(), 0)])
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::PartitionNotAssigned);
    }
}
