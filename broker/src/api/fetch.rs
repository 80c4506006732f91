//! Fetch: stored batches as they are (never re-encoded), up to the high watermark,
//! long-polling until `min_bytes` are available or `max_wait_ms` passes. Waiting
//! sleeps on the owning shards' durability notifications — no busy polling.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use futures::FutureExt;
use sluice_schema::wire::{self, ErrorCode};

use super::locate;
use crate::limits::{FETCH_WAIT_MS_MAX, READ_BYTES_MAX};
use crate::metadata::PartitionPlacement;
use crate::protocol::{error_response, ok, Outgoing};
use crate::shard::Shard;
use crate::shard_messages::{ApiError, ShardReply, ShardRequest};
use crate::storage::ReadBatches;

/// Response payload budget when the request gives none.
const FETCH_BYTES_DEFAULT: usize = 32 << 20;
/// Largest response payload.
const FETCH_BYTES_MAX: usize = crate::limits::FRAME_BYTES_MAX - (2 << 20);

struct Wanted {
    topic: String,
    partition: u32,
    offset: u64,
    max_bytes: usize,
    target: Result<PartitionPlacement, ApiError>,
}

pub(super) async fn handle(
    shard: &Rc<Shard>,
    id: u32,
    request: wire::FetchRequest<'_>,
) -> Outgoing {
    let wait = Duration::from_millis(u64::from(request.max_wait_ms().min(FETCH_WAIT_MS_MAX)));
    let min_bytes = request.min_bytes() as usize;
    let max_bytes = match request.max_bytes() as usize {
        0 => FETCH_BYTES_DEFAULT,
        n => n.min(FETCH_BYTES_MAX),
    };
    let metadata = shard.topics();
    let mut wanted = Vec::new();
    for topic in request.topics().iter().flatten() {
        for partition in topic.partitions().iter().flatten() {
            let target = locate(&metadata, topic.name(), partition.partition())
                .map(|(placement, _)| placement);
            wanted.push(Wanted {
                topic: topic.name().to_string(),
                partition: partition.partition(),
                offset: partition.offset(),
                max_bytes: (partition.max_bytes() as usize).clamp(1, READ_BYTES_MAX),
                target,
            });
        }
    }
    if wanted.is_empty() {
        return error_response(id, ErrorCode::InvalidRequest, "fetch names no partition");
    }
    let deadline = Instant::now() + wait;
    loop {
        let results = read_all(shard, &wanted).await;
        let available: usize = results
            .iter()
            .map(|r| r.as_ref().map(|b| b.bytes).unwrap_or(0))
            .sum();
        let any_error = results.iter().any(Result::is_err);
        let now = Instant::now();
        if any_error || available >= min_bytes.max(1) || now >= deadline || shard.shutting_down() {
            return respond(id, &wanted, results, max_bytes);
        }
        wait_any(shard, &wanted, deadline - now).await;
    }
}

async fn read_all(shard: &Rc<Shard>, wanted: &[Wanted]) -> Vec<Result<ReadBatches, ApiError>> {
    let reads = wanted.iter().map(|want| {
        let shard = shard.clone();
        let target = want.target.clone();
        let (offset, max_bytes) = (want.offset, want.max_bytes);
        async move {
            let placement = target?;
            let request = ShardRequest::Read {
                log: placement.log_id,
                offset,
                max_bytes,
            };
            match shard.route(placement.shard, request).await {
                ShardReply::Read(result) => result,
                _ => Err(ApiError::new(ErrorCode::Internal, "shard unavailable")),
            }
        }
    });
    futures::future::join_all(reads).await
}

/// Waits until any wanted partition gets data past its offset, or `wait` passes.
async fn wait_any(shard: &Rc<Shard>, wanted: &[Wanted], wait: Duration) {
    let wait_ms = wait.as_millis().min(u128::from(FETCH_WAIT_MS_MAX)) as u32;
    let waits: Vec<_> = wanted
        .iter()
        .filter_map(|want| {
            want.target
                .as_ref()
                .ok()
                .map(|placement| (*placement, want.offset))
        })
        .map(|(placement, offset)| {
            let shard = shard.clone();
            async move {
                if placement.shard == shard.id {
                    shard
                        .wait_for_data(
                            placement.log_id,
                            offset,
                            Duration::from_millis(u64::from(wait_ms)),
                        )
                        .await;
                } else {
                    let request = ShardRequest::WaitForData {
                        log: placement.log_id,
                        offset,
                        wait_ms,
                    };
                    shard.route(placement.shard, request).await;
                }
            }
            .boxed_local()
        })
        .collect();
    if waits.is_empty() {
        glommio::timer::sleep(wait).await;
        return;
    }
    futures::future::select_all(waits).await;
}

fn respond(
    id: u32,
    wanted: &[Wanted],
    results: Vec<Result<ReadBatches, ApiError>>,
    max_bytes: usize,
) -> Outgoing {
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 96 * wanted.len());
    let mut payload: Vec<Bytes> = Vec::new();
    let mut payload_bytes = 0usize;
    let mut topics: Vec<(String, Vec<_>)> = Vec::new();
    for (want, result) in wanted.iter().zip(results) {
        let start = payload_bytes;
        let args = match result {
            Ok(read) => {
                for frame in read.frames {
                    // The response budget: whole batches only, but always at least one.
                    if payload_bytes > 0 && payload_bytes + frame.len() > max_bytes {
                        break;
                    }
                    payload_bytes += frame.len();
                    payload.push(frame);
                }
                wire::FetchPartitionResultArgs {
                    partition: want.partition,
                    error: ErrorCode::None,
                    high_watermark: read.high_watermark,
                    log_start_offset: read.log_start,
                    payload_offset: start as u32,
                    payload_bytes: (payload_bytes - start) as u32,
                    message: None,
                }
            }
            Err(error) => {
                let message = Some(fbb.create_string(&error.message));
                wire::FetchPartitionResultArgs {
                    partition: want.partition,
                    error: error.code,
                    high_watermark: error.high_watermark,
                    log_start_offset: error.log_start,
                    payload_offset: start as u32,
                    payload_bytes: 0,
                    message,
                }
            }
        };
        let result = wire::FetchPartitionResult::create(&mut fbb, &args);
        match topics.last_mut() {
            Some((last, list)) if *last == want.topic => list.push(result),
            _ => topics.push((want.topic.clone(), vec![result])),
        }
    }
    let topics: Vec<_> = topics
        .into_iter()
        .map(|(name, partitions)| {
            let name = fbb.create_string(&name);
            let partitions = fbb.create_vector(&partitions);
            wire::FetchTopicResult::create(
                &mut fbb,
                &wire::FetchTopicResultArgs {
                    name: Some(name),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    let topics = fbb.create_vector(&topics);
    let body = wire::FetchResponse::create(
        &mut fbb,
        &wire::FetchResponseArgs {
            topics: Some(topics),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::FetchResponse,
        body.as_union_value(),
        payload,
    )
}
