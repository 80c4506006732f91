//! Fetch: stored batches as they are (never re-encoded), up to the high watermark,
//! long-polling until `min_bytes` are available or `max_wait_ms` passes.
//!
//! The response budget (`max_bytes`) is applied before reading: each owning shard
//! reads its partitions in request order within its share of the budget, so a fetch
//! never reads much more than it can send (at most one batch per shard beyond its
//! share, so that a batch larger than the budget still makes progress).
//!
//! A partition fetched within a range (`end_offset`) that ends at or below its
//! high watermark answers at once: nothing it waits for can come.
//!
//! Waiting sleeps until a partition's high watermark moves past what this fetch
//! last saw, or the wait ends — never until "the watermark is past the fetch
//! offset", which is already true when some but not `min_bytes` are there (that
//! busy loop froze a shard). Long-polls per shard are bounded; a fetch that finds
//! no slot answers with what it has.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use futures::FutureExt;
use sluice_schema::wire::{self, ErrorCode};

use super::{checks, locate};
use crate::limits::{BATCH_BYTES_MAX, FETCH_WAIT_MS_MAX, FRAME_BYTES_MAX, READ_BYTES_MAX};
use crate::metadata::PartitionPlacement;
use crate::protocol::{cut_message, error_response, ok, Outgoing};
use crate::shard::Shard;
use crate::shard_messages::{ApiError, PartitionRead, ShardReply, ShardRequest};
use crate::storage::{ReadBatches, ReadRange};
use crate::types::{Offset, ShardId};

/// Response payload budget when the request gives none (`max_bytes` = 0).
const FETCH_BYTES_DEFAULT: usize = 32 << 20;
/// Largest response payload: with the envelope and one batch over the budget, the
/// response stays within a frame.
const FETCH_BYTES_MAX: usize =
    FRAME_BYTES_MAX - BATCH_BYTES_MAX - crate::limits::RESPONSE_ENVELOPE_BYTES_MAX;
const _: () = assert!(FETCH_BYTES_MAX >= FETCH_BYTES_DEFAULT);

struct Wanted {
    topic: String,
    partition: u32,
    offset: Offset,
    max_bytes: usize,
    range: ReadRange,
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
    let wanted = match wanted(shard, id, &request) {
        Ok(wanted) => wanted,
        Err(response) => return response,
    };
    let deadline = Instant::now() + wait;
    let mut slot = None;
    loop {
        let results = read_all(shard, &wanted, max_bytes).await;
        let available: usize = results
            .iter()
            .map(|r| r.as_ref().map(|b| b.bytes).unwrap_or(0))
            .sum();
        let any_error = results.iter().any(Result::is_err);
        // A range that ends at or below the high watermark has all it will
        // ever have (a consumer's piece of a range it is behind on, which may
        // even be empty): waiting for more would stall the pieces after it.
        let any_complete = results.iter().zip(&wanted).any(|(result, want)| {
            result
                .as_ref()
                .is_ok_and(|read| want.range.end <= read.high_watermark)
        });
        let now = Instant::now();
        if any_error
            || any_complete
            || available >= min_bytes
            || now >= deadline
            || shard.shutting_down()
        {
            return respond(id, &wanted, results, max_bytes);
        }
        if slot.is_none() {
            // A bounded number of fetches long-poll per shard at once.
            let permit = glommio::timer::timeout(deadline - now, async {
                Ok(shard.fetch_waits.acquire_static_permit(1).await)
            })
            .await;
            match permit {
                Ok(Ok(permit)) => slot = Some(permit),
                _ => return respond(id, &wanted, results, max_bytes),
            }
        }
        let seen: Vec<Offset> = results
            .iter()
            .zip(&wanted)
            .map(|(result, want)| result.as_ref().map_or(want.offset, |r| r.high_watermark))
            .collect();
        wait_any(
            shard,
            &wanted,
            &seen,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await;
    }
}

/// Counts and duplicates of the request's entries, and the worst-case response.
pub(super) fn check_shape(id: u32, request: &wire::FetchRequest<'_>) -> Result<(), Outgoing> {
    let topics = request.topics().into_iter().flatten().map(|topic| {
        let partitions = topic.partitions().into_iter().flatten();
        (topic.name(), partitions.map(|p| p.partition()))
    });
    checks::partition_entries(id, "this Fetch request", topics)
}

/// The request's partitions, checked and located.
fn wanted(
    shard: &Rc<Shard>,
    id: u32,
    request: &wire::FetchRequest<'_>,
) -> Result<Vec<Wanted>, Outgoing> {
    check_shape(id, request)?;
    let metadata = shard.topics();
    let mut wanted = Vec::new();
    for topic in request.topics().iter().flatten() {
        for partition in topic.partitions().iter().flatten() {
            let range = ReadRange {
                end: match partition.end_offset() {
                    0 => Offset::MAX,
                    end => end,
                },
                whole_batches: partition.whole_batches(),
            };
            let target = if range.end <= partition.offset() {
                Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "end_offset {} is not past offset {}",
                        range.end,
                        partition.offset()
                    ),
                ))
            } else {
                locate(shard, &metadata, topic.name(), partition.partition())
                    .map(|(placement, _)| placement)
            };
            wanted.push(Wanted {
                topic: topic.name().to_string(),
                partition: partition.partition(),
                offset: partition.offset(),
                max_bytes: (partition.max_bytes() as usize).clamp(1, READ_BYTES_MAX),
                range,
                target,
            });
        }
    }
    if wanted.is_empty() {
        return Err(error_response(
            id,
            ErrorCode::InvalidRequest,
            "fetch names no partition",
        ));
    }
    Ok(wanted)
}

/// Reads every wanted partition: one request per owning shard, each with its share
/// of `max_bytes` (by partition count), reading its partitions in request order.
async fn read_all(
    shard: &Rc<Shard>,
    wanted: &[Wanted],
    max_bytes: usize,
) -> Vec<Result<ReadBatches, ApiError>> {
    let mut groups: BTreeMap<ShardId, Vec<usize>> = BTreeMap::new();
    for (index, want) in wanted.iter().enumerate() {
        if let Ok(placement) = &want.target {
            groups.entry(placement.shard).or_default().push(index);
        }
    }
    let total = wanted.len();
    let reads = groups.into_iter().map(|(target, indexes)| {
        let shard = shard.clone();
        let budget = (max_bytes * indexes.len() / total).max(1);
        let reads: Vec<PartitionRead> = indexes
            .iter()
            .map(|index| {
                let want = &wanted[*index];
                let log = want.target.as_ref().map(|p| p.log_id).unwrap_or_default();
                PartitionRead {
                    log,
                    offset: want.offset,
                    max_bytes: want.max_bytes,
                    range: want.range,
                }
            })
            .collect();
        async move {
            let count = reads.len();
            let results = match shard
                .route(target, ShardRequest::ReadMany { reads, budget })
                .await
            {
                ShardReply::ReadMany(results) if results.len() == count => results,
                _ => (0..count)
                    .map(|_| Err(ApiError::new(ErrorCode::Internal, "shard unavailable")))
                    .collect(),
            };
            indexes.into_iter().zip(results).collect::<Vec<_>>()
        }
    });
    let mut results: Vec<Option<Result<ReadBatches, ApiError>>> = wanted
        .iter()
        .map(|want| want.target.as_ref().err().map(|error| Err(error.clone())))
        .collect();
    for (index, result) in futures::future::join_all(reads).await.into_iter().flatten() {
        results[index] = Some(result);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "no result"))))
        .collect()
}

/// Waits until any wanted partition's high watermark moves past what this fetch
/// saw (`seen`, in `wanted` order), or `wait` passes.
async fn wait_any(shard: &Rc<Shard>, wanted: &[Wanted], seen: &[Offset], wait: Duration) {
    let wait_ms = wait.as_millis().min(u128::from(FETCH_WAIT_MS_MAX)) as u32;
    let waits: Vec<_> = wanted
        .iter()
        .zip(seen)
        .filter_map(|(want, seen)| {
            want.target
                .as_ref()
                .ok()
                .map(|placement| (*placement, *seen))
        })
        .map(|(placement, seen_high_watermark)| {
            let shard = shard.clone();
            async move {
                if placement.shard == shard.id {
                    shard
                        .wait_for_data(
                            placement.log_id,
                            seen_high_watermark,
                            Duration::from_millis(u64::from(wait_ms)),
                        )
                        .await;
                } else {
                    let request = ShardRequest::WaitForData {
                        log: placement.log_id,
                        seen_high_watermark,
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
                    leader_node: 0,
                }
            }
            Err(error) => {
                let message = Some(fbb.create_string(cut_message(&error.message)));
                wire::FetchPartitionResultArgs {
                    partition: want.partition,
                    error: error.code,
                    high_watermark: error.high_watermark,
                    log_start_offset: error.log_start,
                    payload_offset: start as u32,
                    payload_bytes: 0,
                    message,
                    leader_node: error.leader.map_or(0, |n| n.0),
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
