//! Request handlers, one file per request kind. A handler serves partitions its
//! shard owns and forwards the rest over the mesh.

mod checks;
mod fetch;
mod groups;
mod handshake;
mod list_offsets;
mod metadata;
mod produce;
mod topics;

use std::rc::Rc;

use flatbuffers::VerifierOptions;
use sluice_schema::wire::{self, ErrorCode};

use crate::protocol::{error_response, Frame, Outgoing};
use crate::shard::Shard;

pub use handshake::handshake_response;

/// Flatbuffers verifier bounds for request envelopes.
fn verifier_options() -> VerifierOptions {
    VerifierOptions {
        max_depth: 32,
        max_tables: 200_000,
        max_apparent_size: sluice_schema::ENVELOPE_BYTES_MAX * 2,
        ignore_missing_null_terminator: false,
    }
}

/// Verifies a request envelope.
pub fn parse(envelope: &[u8]) -> Result<wire::Request<'_>, String> {
    flatbuffers::root_with_opts::<wire::Request>(&verifier_options(), envelope)
        .map_err(|e| format!("request envelope failed verification: {e}"))
}

/// Serves one request; `None` when no response is due (produce with acks=0).
/// Counts it, its latency and a request-level error in the shard's metrics.
pub async fn dispatch(shard: &Rc<Shard>, frame: Frame) -> Option<Outgoing> {
    use std::sync::atomic::Ordering::Relaxed;
    let started = std::time::Instant::now();
    // Verified once here; the handlers get the verified request.
    let request = match parse(&frame.envelope) {
        Ok(request) => request,
        Err(message) => return Some(error_response(0, ErrorCode::MalformedRequest, &message)),
    };
    let kind = crate::metrics::kind_index(request.body_type().0);
    if request.body_type() == wire::RequestBody::ProduceRequest {
        shard
            .metrics()
            .stage(crate::metrics::ProduceStage::Receive, frame.receive_us);
    }
    let response = serve(shard, request, &frame).await;
    {
        let metrics = shard.metrics();
        metrics.requests[kind].fetch_add(1, Relaxed);
        metrics.request_latency[kind].observe(started.elapsed().as_micros() as u64);
        if let Some(response) = &response {
            if response.error != ErrorCode::None {
                metrics.request_errors[kind].fetch_add(1, Relaxed);
            }
            if kind == crate::metrics::kind_index(wire::RequestBody::FetchRequest.0) {
                let bytes: usize = response.payload.iter().map(bytes::Bytes::len).sum();
                metrics.fetched_bytes.fetch_add(bytes as u64, Relaxed);
            }
        }
    }
    response
}

async fn serve(shard: &Rc<Shard>, request: wire::Request<'_>, frame: &Frame) -> Option<Outgoing> {
    let id = request.correlation_id();
    if request.version() != 1 {
        let message = format!(
            "request version {} is not supported (this broker speaks version 1)",
            request.version()
        );
        return Some(error_response(id, ErrorCode::UnsupportedVersion, &message));
    }
    if shard.shutting_down() {
        return Some(error_response(
            id,
            ErrorCode::ShuttingDown,
            "the broker is shutting down",
        ));
    }
    use wire::RequestBody as Kind;
    match request.body_type() {
        Kind::HandshakeRequest => match request.body_as_handshake_request() {
            Some(handshake) => Some(handshake::handle(shard, id, handshake)),
            None => Some(error_response(
                id,
                ErrorCode::MalformedRequest,
                "handshake request without a body",
            )),
        },
        Kind::MetadataRequest => {
            Some(metadata::handle(shard, id, request.body_as_metadata_request()).await)
        }
        Kind::CreateTopicsRequest => {
            Some(topics::create(shard, id, request.body_as_create_topics_request()).await)
        }
        Kind::DeleteTopicsRequest => {
            Some(topics::delete(shard, id, request.body_as_delete_topics_request()).await)
        }
        Kind::ListTopicsRequest => Some(topics::list(shard, id)),
        Kind::DescribeTopicsRequest => {
            Some(topics::describe(shard, id, request.body_as_describe_topics_request()).await)
        }
        Kind::ProduceRequest => match request.body_as_produce_request() {
            Some(produce) => produce::handle(shard, id, produce, &frame.payload).await,
            None => Some(error_response(
                id,
                ErrorCode::MalformedRequest,
                "produce request without a body",
            )),
        },
        Kind::FetchRequest => match request.body_as_fetch_request() {
            Some(fetch) => Some(fetch::handle(shard, id, fetch).await),
            None => Some(error_response(
                id,
                ErrorCode::MalformedRequest,
                "fetch request without a body",
            )),
        },
        Kind::ListOffsetsRequest => {
            Some(list_offsets::handle(shard, id, request.body_as_list_offsets_request()).await)
        }
        Kind::GroupHeartbeatRequest => Some(
            groups::heartbeat(
                shard,
                id,
                request.client_id(),
                request.body_as_group_heartbeat_request(),
            )
            .await,
        ),
        Kind::OffsetCommitRequest => {
            Some(groups::commit(shard, id, request.body_as_offset_commit_request()).await)
        }
        Kind::OffsetFetchRequest => {
            Some(groups::fetch(shard, id, request.body_as_offset_fetch_request()).await)
        }
        Kind::ListGroupsRequest => Some(groups::list(shard, id).await),
        Kind::DescribeGroupRequest => {
            Some(groups::describe(shard, id, request.body_as_describe_group_request()).await)
        }
        Kind::DeleteGroupRequest => {
            Some(groups::delete(shard, id, request.body_as_delete_group_request()).await)
        }
        Kind::InitProducerIdRequest => Some(produce::init_producer_id(shard, id)),
        other => Some(error_response(
            id,
            ErrorCode::UnknownRequestKind,
            &format!("unknown request kind {}", other.0),
        )),
    }
}

/// Verifies a request envelope and runs every check its handler makes before it
/// touches a shard (shape, counts, duplicates, response size, topic configs).
/// `Err` holds the refusal a client would get. Used by the fuzz targets.
pub fn check_request(envelope: &[u8]) -> Result<(), String> {
    let request = parse(envelope)?;
    let id = request.correlation_id();
    let refused = |response: Outgoing| format!("refused with a {}-byte response", response.bytes());
    use wire::RequestBody as Kind;
    match request.body_type() {
        Kind::HandshakeRequest => {
            let handshake = request.body_as_handshake_request().ok_or("no body")?;
            let _ = (
                handshake.version_min(),
                handshake.version_max(),
                handshake.client_software(),
            );
        }
        Kind::MetadataRequest => {
            let names = request.body_as_metadata_request().and_then(|r| r.topics());
            checks::names(id, names.iter().flatten()).map_err(refused)?;
        }
        Kind::DescribeTopicsRequest => {
            let names = request
                .body_as_describe_topics_request()
                .and_then(|r| r.names());
            checks::names(id, names.iter().flatten()).map_err(refused)?;
        }
        Kind::DeleteTopicsRequest => {
            let names = request
                .body_as_delete_topics_request()
                .and_then(|r| r.names());
            checks::names(id, names.iter().flatten()).map_err(refused)?;
        }
        Kind::CreateTopicsRequest => {
            let create = request.body_as_create_topics_request().ok_or("no body")?;
            for topic in topics::new_topics(id, &create).map_err(refused)? {
                crate::metadata::validate_topic_name(&topic.name)?;
                let entries = topic.configs.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                crate::metadata::TopicConfig::from_entries(entries)?;
            }
        }
        Kind::ListTopicsRequest => {}
        Kind::ProduceRequest => {
            let produce = request.body_as_produce_request().ok_or("no body")?;
            produce::check_shape(id, &produce).map_err(refused)?;
        }
        Kind::FetchRequest => {
            let fetch = request.body_as_fetch_request().ok_or("no body")?;
            fetch::check_shape(id, &fetch).map_err(refused)?;
        }
        Kind::ListOffsetsRequest => {
            let list = request.body_as_list_offsets_request().ok_or("no body")?;
            list_offsets::check_shape(id, &list).map_err(refused)?;
        }
        other => return Err(format!("unknown request kind {}", other.0)),
    }
    Ok(())
}

/// Looks up (topic, partition) → (shard, log, config) in the metadata snapshot.
/// In a cluster, a partition without a replica on this node is `NotLeader` (with
/// the leader as this node knows it); whether the local replica leads is decided
/// on its shard.
pub(crate) fn locate(
    shard: &Shard,
    metadata: &crate::metadata::NodeMetadata,
    topic: &str,
    partition: u32,
) -> Result<
    (
        crate::metadata::PartitionPlacement,
        crate::metadata::TopicConfig,
    ),
    crate::shard_messages::ApiError,
> {
    use crate::shard_messages::ApiError;
    let found = metadata.topics.get(topic).ok_or_else(|| {
        ApiError::new(ErrorCode::UnknownTopic, format!("unknown topic '{topic}'"))
    })?;
    let placement = found.partitions.get(partition as usize).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownPartition,
            format!(
                "topic '{topic}' has {} partitions; no partition {partition}",
                found.partitions.len()
            ),
        )
    })?;
    if !placement.local {
        let group = found
            .group(partition)
            .unwrap_or(crate::partition::GroupId::CONTROLLER);
        return Err(shard.not_leader(group, &format!("partition {partition} of '{topic}'")));
    }
    Ok((*placement, found.config.clone()))
}
