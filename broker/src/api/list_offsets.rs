//! ListOffsets: earliest, latest, or by timestamp.

use std::rc::Rc;

use flatbuffers::FlatBufferBuilder;
use sluice_schema::wire::{self, ErrorCode};

use super::{checks, locate};
use crate::protocol::{error_response, ok, Outgoing};
use crate::shard::Shard;
use crate::shard_messages::{ApiError, ListedOffset, OffsetQuery, ShardReply, ShardRequest};

/// Counts and duplicates of the request's entries, and the worst-case response.
pub(super) fn check_shape(id: u32, request: &wire::ListOffsetsRequest<'_>) -> Result<(), Outgoing> {
    let topics = request.topics().into_iter().flatten().map(|topic| {
        let partitions = topic.partitions().into_iter().flatten();
        (topic.name(), partitions.map(|p| p.partition()))
    });
    checks::partition_entries(id, "this ListOffsets request", topics)
}

pub(super) async fn handle(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::ListOffsetsRequest<'_>>,
) -> Outgoing {
    let Some(request) = request else {
        return error_response(
            id,
            ErrorCode::MalformedRequest,
            "list-offsets request without a body",
        );
    };
    if let Err(response) = check_shape(id, &request) {
        return response;
    }
    let metadata = shard.topics();
    let mut asks = Vec::new();
    for topic in request.topics().iter().flatten() {
        for partition in topic.partitions().iter().flatten() {
            let query = match partition.spec() {
                wire::OffsetSpec::Earliest => Ok(OffsetQuery::Earliest),
                wire::OffsetSpec::Latest => Ok(OffsetQuery::Latest),
                wire::OffsetSpec::Timestamp => Ok(OffsetQuery::Timestamp(partition.timestamp_ms())),
                other => Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown offset spec {}", other.0),
                )),
            };
            let target = query.and_then(|q| {
                locate(shard, &metadata, topic.name(), partition.partition()).map(|(p, _)| (p, q))
            });
            asks.push((topic.name().to_string(), partition.partition(), target));
        }
    }
    let lookups = asks.iter().map(|(_, _, target)| {
        let shard = shard.clone();
        let target = target.clone();
        async move {
            let (placement, query) = target?;
            match shard
                .route(
                    placement.shard,
                    ShardRequest::ListOffset {
                        log: placement.log_id,
                        query,
                    },
                )
                .await
            {
                ShardReply::Offset(result) => result,
                _ => Err(ApiError::new(ErrorCode::Internal, "shard unavailable")),
            }
        }
    });
    let answers: Vec<Result<ListedOffset, ApiError>> = futures::future::join_all(lookups).await;
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let mut topics: Vec<(String, Vec<_>)> = Vec::new();
    for ((name, partition, _), answer) in asks.iter().zip(answers) {
        let args = match answer {
            Ok(listed) => wire::ListOffsetsPartitionResultArgs {
                partition: *partition,
                error: ErrorCode::None,
                offset: listed.offset,
                timestamp_ms: listed.timestamp_ms,
                log_start_offset: listed.log_start,
                high_watermark: listed.high_watermark,
                leader_node: 0,
            },
            Err(error) => wire::ListOffsetsPartitionResultArgs {
                partition: *partition,
                error: error.code,
                offset: 0,
                timestamp_ms: -1,
                log_start_offset: error.log_start,
                high_watermark: error.high_watermark,
                leader_node: error.leader.map_or(0, |n| n.0),
            },
        };
        let result = wire::ListOffsetsPartitionResult::create(&mut fbb, &args);
        match topics.last_mut() {
            Some((last, list)) if last == name => list.push(result),
            _ => topics.push((name.clone(), vec![result])),
        }
    }
    let topics: Vec<_> = topics
        .into_iter()
        .map(|(name, partitions)| {
            let name = fbb.create_string(&name);
            let partitions = fbb.create_vector(&partitions);
            wire::ListOffsetsTopicResult::create(
                &mut fbb,
                &wire::ListOffsetsTopicResultArgs {
                    name: Some(name),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    let topics = fbb.create_vector(&topics);
    let body = wire::ListOffsetsResponse::create(
        &mut fbb,
        &wire::ListOffsetsResponseArgs {
            topics: Some(topics),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::ListOffsetsResponse,
        body.as_union_value(),
        Vec::new(),
    )
}
