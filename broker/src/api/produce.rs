//! Produce: verify every batch (structure, CRC, size limit), then append each
//! partition's batches on its owning shard — directly when local, over the mesh
//! otherwise (the batches are zero-copy slices of the received frame). With
//! acks=1/all the response waits until the WAL has `fdatasync`'d them; with acks=0
//! there is no response.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use sluice_schema::wire::{self, ErrorCode};

use super::{checks, locate};
use crate::metrics::ProduceStage;
use crate::protocol::{cut_message, error_response, ok, Outgoing};
use crate::shard::Shard;
use crate::shard_messages::{ApiError, ShardReply, ShardRequest};
use crate::storage::format::{self, BatchInfo, FrameError};
use crate::storage::Appended;

/// One partition of the request, checked.
struct PartitionPlan {
    partition: u32,
    target: Result<(crate::metadata::PartitionPlacement, Vec<(Bytes, BatchInfo)>), ApiError>,
}

pub(super) async fn handle(
    shard: &Rc<Shard>,
    id: u32,
    request: wire::ProduceRequest<'_>,
    payload: &Bytes,
) -> Option<Outgoing> {
    let started = std::time::Instant::now();
    let acks = request.acks();
    if !(-1..=1).contains(&acks) {
        return Some(error_response(
            id,
            ErrorCode::InvalidRequest,
            &format!("acks must be 0, 1 or -1 (all), not {acks}"),
        ));
    }
    let timeout = Duration::from_millis(u64::from(
        request
            .timeout_ms()
            .clamp(1, crate::limits::PRODUCE_TIMEOUT_MS_MAX),
    ));
    if let Err(response) = check_shape(id, &request) {
        return Some(response);
    }
    let metadata = shard.topics();
    let mut plan: Vec<(String, Vec<PartitionPlan>)> = Vec::new();
    for topic in request.topics().iter().flatten() {
        let partitions = topic
            .partitions()
            .iter()
            .flatten()
            .map(|partition| PartitionPlan {
                partition: partition.partition(),
                target: check_partition(shard, &metadata, topic.name(), partition, payload),
            })
            .collect();
        plan.push((topic.name().to_string(), partitions));
    }
    let verified = std::time::Instant::now();
    shard.metrics().stage(
        ProduceStage::Verify,
        (verified - started).as_micros() as u64,
    );
    // Appends start in request order (join_all polls in order), so batches of one
    // partition keep their order within and across requests on this connection.
    let appends = plan
        .iter()
        .flat_map(|(_, partitions)| partitions)
        .map(|partition| {
            let shard = shard.clone();
            let target = partition
                .target
                .as_ref()
                .map(|(placement, batches)| (*placement, batches.clone()))
                .map_err(Clone::clone);
            async move {
                let (placement, batches) = target?;
                match shard
                    .route(
                        placement.shard,
                        ShardRequest::Produce {
                            log: placement.log_id,
                            batches,
                            acks,
                        },
                    )
                    .await
                {
                    ShardReply::Produced(result) => result,
                    ShardReply::Unavailable(message) => {
                        Err(ApiError::new(ErrorCode::Internal, message))
                    }
                    _ => Err(ApiError::new(ErrorCode::Internal, "unexpected reply")),
                }
            }
        });
    let outcome = glommio::timer::timeout(timeout, async {
        Ok(futures::future::join_all(appends).await)
    })
    .await;
    shard
        .metrics()
        .stage(ProduceStage::Append, verified.elapsed().as_micros() as u64);
    if acks == 0 {
        return None;
    }
    let results: Vec<Result<Appended, ApiError>> = match outcome {
        Ok(results) => results,
        Err(_) => {
            let count = plan.iter().map(|(_, p)| p.len()).sum();
            let timed_out = ApiError::new(
                ErrorCode::RequestTimedOut,
                format!("not durable within {} ms", timeout.as_millis()),
            );
            vec![Err(timed_out); count]
        }
    };
    Some(respond(id, &plan, results))
}

/// Counts and duplicates of the request's entries, and the worst-case response.
pub(super) fn check_shape(id: u32, request: &wire::ProduceRequest<'_>) -> Result<(), Outgoing> {
    let topics = request.topics().into_iter().flatten().map(|topic| {
        let partitions = topic.partitions().into_iter().flatten();
        (topic.name(), partitions.map(|p| p.partition()))
    });
    checks::partition_entries(id, "this Produce request", topics)
}

/// Checks one partition entry: payload range, topic and partition, and every batch.
fn check_partition(
    shard: &Shard,
    metadata: &crate::metadata::NodeMetadata,
    topic: &str,
    partition: wire::ProducePartition<'_>,
    payload: &Bytes,
) -> Result<(crate::metadata::PartitionPlacement, Vec<(Bytes, BatchInfo)>), ApiError> {
    let start = partition.payload_offset() as usize;
    let end = start
        .checked_add(partition.payload_bytes() as usize)
        .filter(|end| *end <= payload.len())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "payload range {}+{} outside a payload of {} bytes",
                    start,
                    partition.payload_bytes(),
                    payload.len()
                ),
            )
        })?;
    if topic == sluice_schema::groups::OFFSETS_TOPIC {
        // Group state is the coordinator's: records from elsewhere would be read
        // back as members and offsets.
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{topic} is internal: only the group coordinator writes to it"),
        ));
    }
    let (placement, config) = locate(shard, metadata, topic, partition.partition())?;
    let batches = split_batches(payload.slice(start..end), config.max_message_bytes as usize)?;
    Ok((placement, batches))
}

/// Splits a partition's payload into verified batches; any bad batch refuses all.
pub(crate) fn split_batches(
    bytes: Bytes,
    max_message_bytes: usize,
) -> Result<Vec<(Bytes, BatchInfo)>, ApiError> {
    let mut batches = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let info =
            format::verify_client_batch(&bytes[at..], max_message_bytes).map_err(|error| {
                let code = match &error {
                    FrameError::PayloadCrc { .. } => ErrorCode::CorruptBatch,
                    FrameError::BadLength {
                        frame_bytes, max, ..
                    } if frame_bytes > max => ErrorCode::RecordTooLarge,
                    _ => ErrorCode::InvalidBatch,
                };
                let message = match code {
                    ErrorCode::RecordTooLarge => {
                        format!("{error} (the topic's max.message.bytes is {max_message_bytes})")
                    }
                    _ => format!("batch at payload byte {at}: {error}"),
                };
                ApiError::new(code, message)
            })?;
        batches.push((bytes.slice(at..at + info.frame_bytes), info));
        at += info.frame_bytes;
    }
    if batches.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidBatch,
            "no record batch for the partition",
        ));
    }
    Ok(batches)
}

fn respond(
    id: u32,
    plan: &[(String, Vec<PartitionPlan>)],
    results: Vec<Result<Appended, ApiError>>,
) -> Outgoing {
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 64 * results.len());
    let mut results = results.into_iter();
    let mut topics = Vec::with_capacity(plan.len());
    for (name, partitions) in plan {
        let items: Vec<_> = partitions
            .iter()
            .map(|partition| {
                let result = results
                    .next()
                    .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "missing result")));
                let (error, base_offset, log_start_offset, message, leader) = match result {
                    Ok(appended) => (
                        ErrorCode::None,
                        appended.base_offset,
                        appended.log_start,
                        None,
                        None,
                    ),
                    Err(error) => (
                        error.code,
                        0,
                        error.log_start,
                        Some(error.message),
                        error.leader,
                    ),
                };
                let message = message.map(|m| fbb.create_string(cut_message(&m)));
                wire::ProducePartitionResult::create(
                    &mut fbb,
                    &wire::ProducePartitionResultArgs {
                        partition: partition.partition,
                        error,
                        base_offset,
                        log_start_offset,
                        message,
                        leader_node: leader.map_or(0, |n| n.0),
                    },
                )
            })
            .collect();
        let name = fbb.create_string(name);
        let partitions = fbb.create_vector(&items);
        topics.push(wire::ProduceTopicResult::create(
            &mut fbb,
            &wire::ProduceTopicResultArgs {
                name: Some(name),
                partitions: Some(partitions),
            },
        ));
    }
    let topics = fbb.create_vector(&topics);
    let body = wire::ProduceResponse::create(
        &mut fbb,
        &wire::ProduceResponseArgs {
            topics: Some(topics),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::ProduceResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

/// Producer ids: this node's id in the top 16 bits, then a counter that starts at
/// the wall clock in ms when the process starts (so ids are not reused across
/// restarts unless a node hands out more than one per ms for its whole life).
static NEXT_PRODUCER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// InitProducerId: a fresh producer id, epoch 0.
pub(super) fn init_producer_id(shard: &Rc<Shard>, id: u32) -> Outgoing {
    use std::sync::atomic::Ordering;
    let start = crate::storage::now_ms().max(1) as u64;
    let _ = NEXT_PRODUCER_ID.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    let counter = NEXT_PRODUCER_ID.fetch_add(1, Ordering::Relaxed) & ((1 << 47) - 1);
    let node = u64::from(shard.settings.node_id.0) & 0xffff;
    let producer_id = ((node << 47) | counter) as i64;
    let mut fbb = FlatBufferBuilder::with_capacity(128);
    let body = wire::InitProducerIdResponse::create(
        &mut fbb,
        &wire::InitProducerIdResponseArgs {
            error: ErrorCode::None,
            message: None,
            producer_id,
            producer_epoch: 0,
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::InitProducerIdResponse,
        body.as_union_value(),
        Vec::new(),
    )
}
