//! CreateTopics, DeleteTopics, ListTopics, DescribeTopics. Changes go to the
//! metadata controller (shard 0); descriptions ask each owning shard for offsets.

use std::collections::HashMap;
use std::rc::Rc;

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use sluice_schema::wire::{self, ErrorCode};

use super::checks;
use crate::protocol::{cut_message, error_response, ok, Outgoing, ResponseSize};

/// A config entry in a response at worst: a table and two short strings.
const CONFIG_ENTRY_BYTES: usize = ResponseSize::TABLE_BYTES + 128;
use crate::limits::CONFIGS_PER_TOPIC_MAX;
use crate::shard::{Shard, CONTROLLER_SHARD};
use crate::shard_messages::{ApiError, LogDescription, NewTopic, ShardReply, ShardRequest};
use crate::types::ShardId;

fn results<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    results: &[(String, Option<ApiError>)],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::TopicResult<'a>>>> {
    let items: Vec<_> = results
        .iter()
        .map(|(name, error)| {
            let name = fbb.create_string(name);
            let message = error
                .as_ref()
                .map(|e| fbb.create_string(cut_message(&e.message)));
            wire::TopicResult::create(
                fbb,
                &wire::TopicResultArgs {
                    name: Some(name),
                    error: error.as_ref().map(|e| e.code).unwrap_or(ErrorCode::None),
                    message,
                },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

async fn to_controller(
    shard: &Rc<Shard>,
    request: ShardRequest,
) -> Result<Vec<(String, Option<ApiError>)>, String> {
    match shard.route(ShardId(CONTROLLER_SHARD as u16), request).await {
        ShardReply::Admin(results) => Ok(results),
        ShardReply::Unavailable(message) => Err(message),
        _ => Err("unexpected reply from the metadata controller".into()),
    }
}

pub(super) async fn create(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::CreateTopicsRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "create-topics request without a body",
        );
    };
    let topics = match new_topics(id, &request) {
        Ok(topics) => topics,
        Err(response) => return response,
    };
    let outcome = to_controller(
        shard,
        ShardRequest::CreateTopics {
            topics,
            validate_only: request.validate_only(),
        },
    )
    .await;
    let list = match outcome {
        Ok(list) => list,
        Err(message) => return error_response(id, ErrorCode::Internal, &message),
    };
    let mut fbb = FlatBufferBuilder::with_capacity(512);
    let results = results(&mut fbb, &list);
    let body = wire::CreateTopicsResponse::create(
        &mut fbb,
        &wire::CreateTopicsResponseArgs {
            results: Some(results),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::CreateTopicsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

/// The topics of a CreateTopics request, checked for count, duplicates and the
/// number of configs each.
pub(super) fn new_topics(
    id: u32,
    request: &wire::CreateTopicsRequest<'_>,
) -> Result<Vec<NewTopic>, Outgoing> {
    let mut entries = checks::Entries::default();
    let mut topics = Vec::new();
    for topic in request.topics().iter().flatten() {
        entries
            .topic(topic.name())
            .map_err(|m| checks::invalid(id, &m))?;
        let configs = topic.configs().map_or(0, |c| c.len());
        if configs > CONFIGS_PER_TOPIC_MAX {
            let message = format!(
                "topic '{}' has {configs} configs; at most {CONFIGS_PER_TOPIC_MAX}",
                topic.name()
            );
            return Err(checks::invalid(id, &message));
        }
        topics.push(NewTopic {
            name: topic.name().to_string(),
            partitions: topic.partitions(),
            configs: topic
                .configs()
                .iter()
                .flatten()
                .map(|e| (e.key().to_string(), e.value().to_string()))
                .collect(),
            replication_factor: topic.replication_factor(),
        });
    }
    Ok(topics)
}

pub(super) async fn delete(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::DeleteTopicsRequest<'_>>,
) -> Outgoing {
    let names = match checks::names(id, request.and_then(|r| r.names()).iter().flatten()) {
        Ok(names) => names,
        Err(response) => return response,
    };
    if names
        .iter()
        .any(|name| name == sluice_schema::groups::OFFSETS_TOPIC)
    {
        return checks::invalid(
            id,
            &format!(
                "{} is internal (consumer groups' state and committed offsets); it cannot be deleted",
                sluice_schema::groups::OFFSETS_TOPIC
            ),
        );
    }
    let list = match to_controller(shard, ShardRequest::DeleteTopics(names)).await {
        Ok(list) => list,
        Err(message) => return error_response(id, ErrorCode::Internal, &message),
    };
    let mut fbb = FlatBufferBuilder::with_capacity(512);
    let results = results(&mut fbb, &list);
    let body = wire::DeleteTopicsResponse::create(
        &mut fbb,
        &wire::DeleteTopicsResponseArgs {
            results: Some(results),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::DeleteTopicsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) fn list(shard: &Rc<Shard>, id: u32) -> Outgoing {
    let metadata = shard.topics();
    let mut size = ResponseSize::new();
    for name in metadata.topics.keys() {
        size.add(
            1,
            ResponseSize::TABLE_BYTES + name.len() + ResponseSize::STRING_OVERHEAD_BYTES,
        );
    }
    if let Err(response) = size.check(id, "ListTopics") {
        return response;
    }
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let items: Vec<_> = metadata
        .topics
        .values()
        .map(|topic| {
            let name = fbb.create_string(&topic.name);
            wire::TopicSummary::create(
                &mut fbb,
                &wire::TopicSummaryArgs {
                    name: Some(name),
                    partitions: topic.partitions.len() as u32,
                },
            )
        })
        .collect();
    let topics = fbb.create_vector(&items);
    let body = wire::ListTopicsResponse::create(
        &mut fbb,
        &wire::ListTopicsResponseArgs {
            topics: Some(topics),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::ListTopicsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) async fn describe(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::DescribeTopicsRequest<'_>>,
) -> Outgoing {
    let metadata = shard.topics();
    let names: Vec<String> = match request.and_then(|r| r.names()) {
        Some(list) if !list.is_empty() => match checks::names(id, list.iter()) {
            Ok(names) => names,
            Err(response) => return response,
        },
        _ => metadata.topics.keys().cloned().collect(),
    };
    let mut size = ResponseSize::new();
    for name in &names {
        let topic = metadata.topics.get(name);
        let partitions = topic.map_or(0, |t| t.partitions.len());
        let configs = topic.map_or(0, |t| t.config.entries().len());
        size.add(1, ResponseSize::item_with_message(name.len()))
            .add(configs, CONFIG_ENTRY_BYTES)
            .add(partitions, ResponseSize::TABLE_BYTES);
    }
    if let Err(response) = size.check(id, "this DescribeTopics request") {
        return response;
    }
    // Ask each owning shard for the offsets of its logs, all shards at once.
    let mut by_shard: HashMap<ShardId, Vec<crate::types::LogId>> = HashMap::new();
    for name in &names {
        if let Some(topic) = metadata.topics.get(name) {
            for placement in topic.partitions.iter().filter(|p| p.local) {
                by_shard
                    .entry(placement.shard)
                    .or_default()
                    .push(placement.log_id);
            }
        }
    }
    let queries = by_shard.into_iter().map(|(target, logs)| {
        let shard = shard.clone();
        async move {
            let reply = shard
                .route(target, ShardRequest::Describe(logs.clone()))
                .await;
            let described = match reply {
                ShardReply::Described(list) => list,
                _ => logs
                    .iter()
                    .map(|_| Err(ApiError::new(ErrorCode::Internal, "shard unavailable")))
                    .collect(),
            };
            logs.into_iter().zip(described).collect::<Vec<_>>()
        }
    });
    let offsets: HashMap<crate::types::LogId, Result<LogDescription, ApiError>> =
        futures::future::join_all(queries)
            .await
            .into_iter()
            .flatten()
            .collect();
    let mut fbb = FlatBufferBuilder::with_capacity(2048);
    let mut items = Vec::new();
    for name in &names {
        let name_offset = fbb.create_string(name);
        let Some(topic) = metadata.topics.get(name) else {
            let message = fbb.create_string(&format!("unknown topic '{name}'"));
            items.push(wire::TopicDescription::create(
                &mut fbb,
                &wire::TopicDescriptionArgs {
                    name: Some(name_offset),
                    error: ErrorCode::UnknownTopic,
                    message: Some(message),
                    configs: None,
                    partitions: None,
                },
            ));
            continue;
        };
        let configs: Vec<_> = topic
            .config
            .entries()
            .iter()
            .map(|(key, value)| {
                let key = fbb.create_string(key);
                let value = fbb.create_string(value);
                wire::ConfigEntry::create(
                    &mut fbb,
                    &wire::ConfigEntryArgs {
                        key: Some(key),
                        value: Some(value),
                    },
                )
            })
            .collect();
        let configs = fbb.create_vector(&configs);
        let partitions: Vec<_> = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(index, placement)| {
                let view = shard.partition_view(topic, index);
                let empty = LogDescription {
                    log_start: 0,
                    high_watermark: 0,
                    size_bytes: 0,
                    corrupt_from: None,
                };
                let local = offsets.get(&placement.log_id).filter(|_| placement.local);
                let (mut offsets, mut error) = match local {
                    Some(Ok(d)) if d.corrupt_from.is_some() => (*d, ErrorCode::CorruptLog),
                    Some(Ok(d)) => (*d, ErrorCode::None),
                    Some(Err(e)) => (empty, e.code),
                    None if placement.local => (empty, ErrorCode::Internal),
                    None => (empty, ErrorCode::None),
                };
                // Another node leads: its numbers are the ones that count.
                if let Some((high_watermark, log_start)) = view.reported {
                    offsets.high_watermark = high_watermark;
                    offsets.log_start = log_start;
                }
                if view.leader.is_none() && error == ErrorCode::None {
                    error = ErrorCode::LeaderNotAvailable;
                }
                let replicas: Vec<u32> = view.replicas.iter().map(|n| n.0).collect();
                let replicas = fbb.create_vector(&replicas);
                let in_sync: Vec<u32> = view.in_sync_replicas.iter().map(|n| n.0).collect();
                let in_sync_replicas = fbb.create_vector(&in_sync);
                wire::PartitionDescription::create(
                    &mut fbb,
                    &wire::PartitionDescriptionArgs {
                        partition: index as u32,
                        leader_node: view.leader.map_or(0, |n| n.0),
                        shard: view.leader_shard,
                        log_start_offset: offsets.log_start,
                        high_watermark: offsets.high_watermark,
                        size_bytes: offsets.size_bytes,
                        error,
                        replicas: Some(replicas),
                        in_sync: view.in_sync,
                        leader_epoch: view.epoch,
                        in_sync_replicas: Some(in_sync_replicas),
                    },
                )
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        items.push(wire::TopicDescription::create(
            &mut fbb,
            &wire::TopicDescriptionArgs {
                name: Some(name_offset),
                error: ErrorCode::None,
                message: None,
                configs: Some(configs),
                partitions: Some(partitions),
            },
        ));
    }
    let topics = fbb.create_vector(&items);
    let body = wire::DescribeTopicsResponse::create(
        &mut fbb,
        &wire::DescribeTopicsResponseArgs {
            topics: Some(topics),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::DescribeTopicsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}
