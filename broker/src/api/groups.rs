//! Consumer-group requests: heartbeat (join/stay/leave), offset commit and fetch,
//! list, describe, delete. Each is decoded here, routed to the shard that owns
//! the group's `__sluice_offsets` partition (created on first use) and answered
//! with a response-level error field (envelope errors only for malformed
//! requests).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, WIPOffset};
use sluice_schema::groups::{
    group_partition, validate_group_id, OFFSETS_TOPIC, REBALANCE_TIMEOUT_MS_DEFAULT,
    SESSION_TIMEOUT_MS_DEFAULT,
};
use sluice_schema::wire::{self, ErrorCode};

use super::checks::{self, Entries};
use super::locate;
use crate::groups::state::{Committed, Heartbeat, TopicPartition};
use crate::groups::{GroupAnswer, GroupOp, GroupSummary};
use crate::limits::{GROUP_STRING_BYTES_MAX, GROUP_SUBSCRIPTIONS_MAX, RESPONSE_ENVELOPE_BYTES_MAX};
use crate::metadata::{validate_topic_name, NodeMetadata};
use crate::protocol::{cut_message, error_response, ok, Outgoing};
use crate::shard::{Shard, CONTROLLER_SHARD};
use crate::shard_messages::{ApiError, NewTopic, ShardReply, ShardRequest};
use crate::types::ShardId;

type TpList<'a> = Vector<'a, ForwardsUOffset<wire::TopicPartitions<'a>>>;

fn decode_tps(list: Option<TpList<'_>>) -> Result<BTreeSet<TopicPartition>, String> {
    let mut entries = Entries::default();
    let mut out = BTreeSet::new();
    for item in list.iter().flatten() {
        entries.topic(item.topic())?;
        for partition in item.partitions().iter().flatten() {
            entries.partition(item.topic(), partition)?;
            out.insert((item.topic().to_owned(), partition));
        }
    }
    Ok(out)
}

fn build_tps<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    set: &BTreeSet<TopicPartition>,
) -> WIPOffset<Vector<'a, ForwardsUOffset<wire::TopicPartitions<'a>>>> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, partition) in set {
        by_topic.entry(topic).or_default().push(*partition);
    }
    let items: Vec<_> = by_topic
        .into_iter()
        .map(|(topic, partitions)| {
            let topic = fbb.create_string(topic);
            let partitions = fbb.create_vector(&partitions);
            wire::TopicPartitions::create(
                fbb,
                &wire::TopicPartitionsArgs {
                    topic: Some(topic),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

fn bounded(what: &str, value: Option<&str>) -> Result<Option<String>, String> {
    match value {
        Some(v) if v.len() > GROUP_STRING_BYTES_MAX => Err(format!(
            "{what} is {} bytes; at most {GROUP_STRING_BYTES_MAX}",
            v.len()
        )),
        Some("") | None => Ok(None),
        Some(v) => Ok(Some(v.to_owned())),
    }
}

/// Creates `__sluice_offsets` if it does not exist yet and returns metadata that
/// has it.
async fn offsets_topic(shard: &Rc<Shard>) -> Result<Arc<NodeMetadata>, ApiError> {
    let metadata = shard.topics();
    if metadata.topics.contains_key(OFFSETS_TOPIC) {
        return Ok(metadata);
    }
    let topic = NewTopic {
        name: OFFSETS_TOPIC.to_owned(),
        partitions: shard.settings.groups.offsets_partitions,
        configs: vec![("retention.ms".to_owned(), "-1".to_owned())],
        replication_factor: 0,
    };
    let reply = shard
        .route(
            ShardId(CONTROLLER_SHARD as u16),
            ShardRequest::CreateTopics {
                topics: vec![topic],
                validate_only: false,
            },
        )
        .await;
    if let ShardReply::Admin(results) = reply {
        if let Some((_, Some(error))) = results.into_iter().next() {
            if error.code != ErrorCode::TopicAlreadyExists {
                return Err(error);
            }
        }
    }
    // In a cluster the controller's change reaches this node's metadata shortly.
    for _ in 0..50 {
        let metadata = shard.topics();
        if metadata.topics.contains_key(OFFSETS_TOPIC) {
            tracing::info!("created the offsets topic {OFFSETS_TOPIC}");
            return Ok(metadata);
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
    Err(ApiError::new(
        ErrorCode::LeaderNotAvailable,
        format!("{OFFSETS_TOPIC} is being created; retry"),
    ))
}

/// Runs `op` on the coordinator of its group (or of offsets partition `index`).
async fn run(shard: &Rc<Shard>, op: GroupOp, index: Option<u32>) -> Result<GroupAnswer, ApiError> {
    let metadata = offsets_topic(shard).await?;
    let count = metadata.topics[OFFSETS_TOPIC].partitions.len() as u32;
    let partition = match (index, op.group_id()) {
        (Some(index), _) => index,
        (None, Some(group)) => group_partition(group, count),
        (None, None) => 0,
    };
    let (placement, _) = locate(shard, &metadata, OFFSETS_TOPIC, partition)?;
    match shard
        .route(
            placement.shard,
            ShardRequest::Group {
                log: placement.log_id,
                op,
            },
        )
        .await
    {
        ShardReply::Group(result) => result,
        ShardReply::Unavailable(message) => Err(ApiError::new(ErrorCode::Internal, message)),
        _ => Err(ApiError::new(ErrorCode::Internal, "unexpected reply")),
    }
}

fn check_group(group_id: &str) -> Result<(), ApiError> {
    validate_group_id(group_id).map_err(|m| ApiError::new(ErrorCode::InvalidGroupId, m))
}

pub(super) async fn heartbeat(
    shard: &Rc<Shard>,
    id: u32,
    client_id: Option<&str>,
    request: Option<wire::GroupHeartbeatRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(id, ErrorCode::MalformedRequest, "heartbeat without a body");
    };
    let decoded = (|| -> Result<Heartbeat, ApiError> {
        check_group(request.group_id())?;
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
        let settings = &shard.settings.groups;
        let session = match request.session_timeout_ms() {
            0 => SESSION_TIMEOUT_MS_DEFAULT.clamp(
                settings.session_timeout_min_ms,
                settings.session_timeout_max_ms,
            ),
            ms => ms,
        };
        if !(settings.session_timeout_min_ms..=settings.session_timeout_max_ms).contains(&session) {
            return Err(ApiError::new(
                ErrorCode::InvalidSessionTimeout,
                format!(
                    "session timeout {session} ms is outside this broker's [{}, {}] ms",
                    settings.session_timeout_min_ms, settings.session_timeout_max_ms
                ),
            ));
        }
        let rebalance = match request.rebalance_timeout_ms() {
            0 => REBALANCE_TIMEOUT_MS_DEFAULT,
            ms => ms.min(
                settings
                    .session_timeout_max_ms
                    .max(REBALANCE_TIMEOUT_MS_DEFAULT),
            ),
        };
        let subscribed = match request.subscribed_topics() {
            None => None,
            Some(topics) => {
                if topics.len() > GROUP_SUBSCRIPTIONS_MAX {
                    return Err(invalid(format!(
                        "a member subscribes to at most {GROUP_SUBSCRIPTIONS_MAX} topics"
                    )));
                }
                let mut names = Vec::with_capacity(topics.len());
                for topic in topics.iter() {
                    validate_topic_name(topic)
                        .map_err(|m| ApiError::new(ErrorCode::InvalidTopicName, m))?;
                    names.push(topic.to_owned());
                }
                Some(names)
            }
        };
        let owned = match request.owned() {
            None => None,
            Some(list) => Some(decode_tps(Some(list)).map_err(invalid)?),
        };
        let member_id = bounded("member_id", request.member_id()).map_err(invalid)?;
        Ok(Heartbeat {
            group_id: request.group_id().to_owned(),
            member_id: member_id.unwrap_or_default(),
            member_epoch: request.member_epoch(),
            instance_id: bounded("instance_id", request.instance_id()).map_err(invalid)?,
            client_id: bounded("client_id", client_id)
                .map_err(invalid)?
                .unwrap_or_default(),
            session_timeout_ms: session,
            rebalance_timeout_ms: rebalance,
            subscribed,
            assignor: bounded("assignor", request.assignor())
                .map_err(invalid)?
                .unwrap_or_default(),
            owned,
        })
    })();
    let result = match decoded {
        Ok(heartbeat) => run(shard, GroupOp::Heartbeat(heartbeat), None).await,
        Err(error) => Err(error),
    };
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let args = match result {
        Ok(GroupAnswer::Heartbeat(answer, interval)) => {
            let member_id = fbb.create_string(&answer.member_id);
            let assignment = build_tps(&mut fbb, &answer.assignment);
            wire::GroupHeartbeatResponseArgs {
                error: ErrorCode::None,
                message: None,
                member_id: Some(member_id),
                member_epoch: answer.member_epoch,
                heartbeat_interval_ms: interval,
                assignment: Some(assignment),
                leader_node: 0,
            }
        }
        other => {
            let error = unexpected(other);
            let message = fbb.create_string(cut_message(&error.message));
            wire::GroupHeartbeatResponseArgs {
                error: error.code,
                message: Some(message),
                leader_node: error.leader.map_or(0, |n| n.0),
                ..Default::default()
            }
        }
    };
    let body = wire::GroupHeartbeatResponse::create(&mut fbb, &args);
    ok(
        fbb,
        id,
        wire::ResponseBody::GroupHeartbeatResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

/// The error of a failed (or oddly answered) group operation.
fn unexpected(result: Result<GroupAnswer, ApiError>) -> ApiError {
    match result {
        Err(error) => error,
        Ok(_) => ApiError::new(ErrorCode::Internal, "unexpected group answer"),
    }
}

pub(super) async fn commit(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::OffsetCommitRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "offset commit without a body",
        );
    };
    let mut entries = Entries::default();
    let mut offsets = Vec::new();
    let mut names = Vec::new();
    for topic in request.topics().iter().flatten() {
        if let Err(m) = entries.topic(topic.name()) {
            return checks::invalid(id, &m);
        }
        let mut parts = Vec::new();
        for p in topic.partitions().iter().flatten() {
            if let Err(m) = entries.partition(topic.name(), p.partition()) {
                return checks::invalid(id, &m);
            }
            let metadata = match bounded("metadata", p.metadata()) {
                Ok(m) => m.unwrap_or_default(),
                Err(m) => return checks::invalid(id, &m),
            };
            offsets.push((
                (topic.name().to_owned(), p.partition()),
                p.offset(),
                metadata,
            ));
            parts.push(p.partition());
        }
        names.push((topic.name().to_owned(), parts));
    }
    let metadata = shard.topics();
    let mut partition_errors: BTreeMap<TopicPartition, ErrorCode> = BTreeMap::new();
    for ((topic, partition), _, _) in &offsets {
        let known = metadata
            .topics
            .get(topic)
            .map(|t| (*partition as usize) < t.partitions.len());
        match known {
            None => {
                partition_errors.insert((topic.clone(), *partition), ErrorCode::UnknownTopic);
            }
            Some(false) => {
                partition_errors.insert((topic.clone(), *partition), ErrorCode::UnknownPartition);
            }
            Some(true) => {}
        }
    }
    let result = if let Err(error) = check_group(request.group_id()) {
        Err(error)
    } else if let Some(((topic, partition), code)) = partition_errors.iter().next() {
        Err(ApiError::new(
            *code,
            format!("cannot commit partition {partition} of '{topic}': no such partition"),
        ))
    } else {
        let member_id = match bounded("member_id", request.member_id()) {
            Ok(m) => m.unwrap_or_default(),
            Err(m) => return checks::invalid(id, &m),
        };
        run(
            shard,
            GroupOp::Commit {
                group_id: request.group_id().to_owned(),
                member_id,
                member_epoch: request.member_epoch(),
                offsets,
            },
            None,
        )
        .await
    };
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let (error, message, leader) = match result {
        Ok(GroupAnswer::Committed) => (ErrorCode::None, None, 0),
        other => {
            let error = unexpected(other);
            let message = fbb.create_string(cut_message(&error.message));
            (error.code, Some(message), error.leader.map_or(0, |n| n.0))
        }
    };
    let topics: Vec<_> = names
        .iter()
        .map(|(name, parts)| {
            let results: Vec<_> = parts
                .iter()
                .map(|p| {
                    let code = partition_errors
                        .get(&(name.clone(), *p))
                        .copied()
                        .unwrap_or(error);
                    wire::OffsetCommitPartitionResult::create(
                        &mut fbb,
                        &wire::OffsetCommitPartitionResultArgs {
                            partition: *p,
                            error: code,
                        },
                    )
                })
                .collect();
            let results = fbb.create_vector(&results);
            let name = fbb.create_string(name);
            wire::OffsetCommitTopicResult::create(
                &mut fbb,
                &wire::OffsetCommitTopicResultArgs {
                    name: Some(name),
                    partitions: Some(results),
                },
            )
        })
        .collect();
    let topics = fbb.create_vector(&topics);
    let body = wire::OffsetCommitResponse::create(
        &mut fbb,
        &wire::OffsetCommitResponseArgs {
            error,
            message,
            topics: Some(topics),
            leader_node: leader,
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::OffsetCommitResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

fn build_offsets<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    offsets: &[(TopicPartition, Option<Committed>)],
) -> WIPOffset<Vector<'a, ForwardsUOffset<wire::OffsetFetchTopic<'a>>>> {
    let mut by_topic: BTreeMap<&str, Vec<(u32, Option<&Committed>)>> = BTreeMap::new();
    for ((topic, partition), committed) in offsets {
        by_topic
            .entry(topic)
            .or_default()
            .push((*partition, committed.as_ref()));
    }
    let topics: Vec<_> = by_topic
        .into_iter()
        .map(|(topic, parts)| {
            let parts: Vec<_> = parts
                .into_iter()
                .map(|(partition, committed)| {
                    let metadata = committed.map(|c| fbb.create_string(&c.metadata));
                    wire::OffsetFetchPartition::create(
                        fbb,
                        &wire::OffsetFetchPartitionArgs {
                            partition,
                            offset: committed.map_or(-1, |c| c.offset as i64),
                            metadata,
                            commit_timestamp_ms: committed.map_or(-1, |c| c.commit_timestamp_ms),
                        },
                    )
                })
                .collect();
            let parts = fbb.create_vector(&parts);
            let name = fbb.create_string(topic);
            wire::OffsetFetchTopic::create(
                fbb,
                &wire::OffsetFetchTopicArgs {
                    name: Some(name),
                    partitions: Some(parts),
                },
            )
        })
        .collect();
    fbb.create_vector(&topics)
}

/// Rough bytes of an offsets list in a response.
fn offsets_bytes(offsets: &[(TopicPartition, Option<Committed>)]) -> usize {
    offsets
        .iter()
        .map(|((topic, _), c)| 48 + topic.len() + c.as_ref().map_or(0, |c| c.metadata.len()))
        .sum()
}

fn too_large(what: &str, bytes: usize) -> ApiError {
    ApiError::new(
        ErrorCode::ResponseTooLarge,
        format!(
            "{what} would take about {bytes} bytes, over the {RESPONSE_ENVELOPE_BYTES_MAX}-byte response limit; ask for fewer partitions"
        ),
    )
}

pub(super) async fn fetch(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::OffsetFetchRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "offset fetch without a body",
        );
    };
    let wanted = match request.topics() {
        None => None,
        Some(list) => match decode_tps(Some(list)) {
            Ok(set) => Some(set.into_iter().collect()),
            Err(m) => return checks::invalid(id, &m),
        },
    };
    let result = match check_group(request.group_id()) {
        Err(error) => Err(error),
        Ok(()) => {
            run(
                shard,
                GroupOp::Fetch {
                    group_id: request.group_id().to_owned(),
                    partitions: wanted,
                },
                None,
            )
            .await
        }
    };
    let result = match result {
        Ok(GroupAnswer::Offsets(offsets))
            if offsets_bytes(&offsets) > RESPONSE_ENVELOPE_BYTES_MAX / 2 =>
        {
            Err(too_large("the group's offsets", offsets_bytes(&offsets)))
        }
        other => other,
    };
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let args = match result {
        Ok(GroupAnswer::Offsets(offsets)) => {
            let topics = build_offsets(&mut fbb, &offsets);
            wire::OffsetFetchResponseArgs {
                error: ErrorCode::None,
                message: None,
                topics: Some(topics),
                leader_node: 0,
            }
        }
        other => {
            let error = unexpected(other);
            let message = fbb.create_string(cut_message(&error.message));
            wire::OffsetFetchResponseArgs {
                error: error.code,
                message: Some(message),
                topics: None,
                leader_node: error.leader.map_or(0, |n| n.0),
            }
        }
    };
    let body = wire::OffsetFetchResponse::create(&mut fbb, &args);
    ok(
        fbb,
        id,
        wire::ResponseBody::OffsetFetchResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) async fn list(shard: &Rc<Shard>, id: u32) -> Outgoing {
    let mut groups: Vec<GroupSummary> = Vec::new();
    let mut failure = None;
    // Listing creates nothing: without the offsets topic there are no groups.
    let existing = shard.topics();
    let found = existing
        .topics
        .contains_key(OFFSETS_TOPIC)
        .then_some(existing);
    match found {
        None => {}
        Some(metadata) => {
            let topic = &metadata.topics[OFFSETS_TOPIC];
            let local: Vec<u32> = (0..topic.partitions.len() as u32)
                .filter(|p| topic.partitions[*p as usize].local)
                .collect();
            let answers = futures::future::join_all(
                local.iter().map(|p| run(shard, GroupOp::List, Some(*p))),
            )
            .await;
            for answer in answers {
                match answer {
                    Ok(GroupAnswer::Listed(mut list)) => groups.append(&mut list),
                    // Partitions led elsewhere are listed by their leaders.
                    Err(error)
                        if matches!(
                            error.code,
                            ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable
                        ) => {}
                    Err(error) => failure = Some(error),
                    Ok(_) => {}
                }
            }
        }
    }
    groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
    let bytes: usize = groups.iter().map(|g| 64 + g.group_id.len()).sum();
    if bytes > RESPONSE_ENVELOPE_BYTES_MAX / 2 {
        groups.clear();
        failure = Some(too_large("the group list", bytes));
    }
    let mut fbb = FlatBufferBuilder::with_capacity(1024 + bytes);
    let items: Vec<_> = groups
        .iter()
        .map(|g| {
            let group_id = fbb.create_string(&g.group_id);
            let state = fbb.create_string(g.state);
            wire::GroupSummary::create(
                &mut fbb,
                &wire::GroupSummaryArgs {
                    group_id: Some(group_id),
                    state: Some(state),
                    members: g.members,
                    group_epoch: g.group_epoch.max(0) as u64,
                },
            )
        })
        .collect();
    let items = fbb.create_vector(&items);
    let (error, message) = match &failure {
        // Some groups could not be listed: say so, with the ones that could.
        Some(error) => (
            error.code,
            Some(fbb.create_string(cut_message(&error.message))),
        ),
        None => (ErrorCode::None, None),
    };
    let body = wire::ListGroupsResponse::create(
        &mut fbb,
        &wire::ListGroupsResponseArgs {
            error,
            message,
            groups: Some(items),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::ListGroupsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) async fn describe(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::DescribeGroupRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "describe group without a body",
        );
    };
    let result = match check_group(request.group_id()) {
        Err(error) => Err(error),
        Ok(()) => {
            run(
                shard,
                GroupOp::Describe(request.group_id().to_owned()),
                None,
            )
            .await
        }
    };
    let result = match result {
        Ok(GroupAnswer::Described(group, ages)) => {
            let offsets: Vec<_> = group
                .offsets
                .iter()
                .map(|(tp, c)| (tp.clone(), Some(c.clone())))
                .collect();
            let member_bytes: usize = group
                .members
                .values()
                .map(|m| {
                    256 + m.subscribed.iter().map(|t| t.len() + 8).sum::<usize>()
                        + (m.assigned.len() + group.target.get(&m.member_id).map_or(0, |t| t.len()))
                            * 40
                })
                .sum();
            let bytes = member_bytes + offsets_bytes(&offsets);
            if bytes > RESPONSE_ENVELOPE_BYTES_MAX / 2 {
                Err(too_large("the group's description", bytes))
            } else {
                Ok((group, ages, offsets))
            }
        }
        Ok(_) => Err(ApiError::new(
            ErrorCode::Internal,
            "unexpected group answer",
        )),
        Err(error) => Err(error),
    };
    let mut fbb = FlatBufferBuilder::with_capacity(4096);
    let args = match result {
        Ok((group, ages, offsets)) => {
            let empty = BTreeSet::new();
            let members: Vec<_> = group
                .members
                .values()
                .map(|m| {
                    let member_id = fbb.create_string(&m.member_id);
                    let instance_id = m.instance_id.as_deref().map(|i| fbb.create_string(i));
                    let client_id = fbb.create_string(&m.client_id);
                    let subs: Vec<_> = m.subscribed.iter().map(|t| fbb.create_string(t)).collect();
                    let subs = fbb.create_vector(&subs);
                    let owned: BTreeSet<TopicPartition> =
                        m.assigned.difference(&m.revoking).cloned().collect();
                    let assignment = build_tps(&mut fbb, &owned);
                    let target =
                        build_tps(&mut fbb, group.target.get(&m.member_id).unwrap_or(&empty));
                    wire::GroupMemberDescription::create(
                        &mut fbb,
                        &wire::GroupMemberDescriptionArgs {
                            member_id: Some(member_id),
                            instance_id,
                            client_id: Some(client_id),
                            member_epoch: m.member_epoch,
                            subscribed_topics: Some(subs),
                            assignment: Some(assignment),
                            target: Some(target),
                            session_timeout_ms: m.session_timeout_ms,
                            last_heartbeat_ms_ago: ages.get(&m.member_id).copied().unwrap_or(0),
                        },
                    )
                })
                .collect();
            let members = fbb.create_vector(&members);
            let offsets = build_offsets(&mut fbb, &offsets);
            let group_id = fbb.create_string(&group.group_id);
            let state = fbb.create_string(group.state());
            let assignor = fbb.create_string(&group.assignor);
            wire::DescribeGroupResponseArgs {
                error: ErrorCode::None,
                message: None,
                group_id: Some(group_id),
                state: Some(state),
                group_epoch: group.group_epoch.max(0) as u64,
                assignment_epoch: group.assignment_epoch.max(0) as u64,
                assignor: Some(assignor),
                members: Some(members),
                offsets: Some(offsets),
                leader_node: 0,
            }
        }
        Err(error) => {
            let message = fbb.create_string(cut_message(&error.message));
            wire::DescribeGroupResponseArgs {
                error: error.code,
                message: Some(message),
                leader_node: error.leader.map_or(0, |n| n.0),
                ..Default::default()
            }
        }
    };
    let body = wire::DescribeGroupResponse::create(&mut fbb, &args);
    ok(
        fbb,
        id,
        wire::ResponseBody::DescribeGroupResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) async fn delete(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::DeleteGroupRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "delete group without a body",
        );
    };
    let result = match check_group(request.group_id()) {
        Err(error) => Err(error),
        Ok(()) => run(shard, GroupOp::Delete(request.group_id().to_owned()), None).await,
    };
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let args = match result {
        Ok(GroupAnswer::Deleted) => wire::DeleteGroupResponseArgs {
            error: ErrorCode::None,
            message: None,
            leader_node: 0,
        },
        other => {
            let error = unexpected(other);
            let message = fbb.create_string(cut_message(&error.message));
            wire::DeleteGroupResponseArgs {
                error: error.code,
                message: Some(message),
                leader_node: error.leader.map_or(0, |n| n.0),
            }
        }
    };
    let body = wire::DeleteGroupResponse::create(&mut fbb, &args);
    ok(
        fbb,
        id,
        wire::ResponseBody::DeleteGroupResponse,
        body.as_union_value(),
        Vec::new(),
    )
}
