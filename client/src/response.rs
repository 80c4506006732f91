//! Response parsers: [`decode_response`] verifies a `Response` envelope with the
//! flatbuffers verifier and converts it into owned Rust types. Fetch payload
//! ranges become zero-copy [`Bytes`] slices of the received frame, bounds-checked.

use bytes::Bytes;
use flatbuffers::{ForwardsUOffset, Vector};
use sluice_schema::wire;

use crate::error::{Code, Error, Result};
use crate::frame::Frame;

/// Handshake outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// Negotiated protocol version.
    pub version: u16,
    /// Broker node id.
    pub node_id: u32,
    /// Shard owning this connection.
    pub shard: u16,
    /// Shards of the node.
    pub shard_count: u16,
    /// Largest frame the broker accepts (prefix included).
    pub frame_bytes_max: u32,
    /// Broker software string.
    pub broker_software: Option<String>,
}

/// A broker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    /// Node id.
    pub node_id: u32,
    /// Host.
    pub host: String,
    /// Client port.
    pub port: u16,
    /// Shards.
    pub shard_count: u16,
    /// The answering node heard from it recently.
    pub reachable: bool,
}

/// Where a partition lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMetadata {
    /// Partition.
    pub partition: u32,
    /// Leader node.
    pub leader_node: u32,
    /// Shard of the leader that owns it.
    pub shard: u16,
    /// Per-partition error.
    pub error: Code,
    /// Nodes holding a replica.
    pub replicas: Vec<u32>,
    /// Leader epoch (Raft term; 0 on a single node).
    pub leader_epoch: u64,
}

/// Layout of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    /// Name.
    pub name: String,
    /// Topic error (e.g. `UnknownTopic`).
    pub error: Code,
    /// Partitions, sorted by partition number.
    pub partitions: Vec<PartitionMetadata>,
}

/// Cluster metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Brokers.
    pub brokers: Vec<BrokerInfo>,
    /// Topics.
    pub topics: Vec<TopicMetadata>,
    /// The node leading the cluster's controller (0: unknown, or a single node).
    pub controller_node: u32,
    /// The node that answered.
    pub node_id: u32,
}

/// Outcome for one topic of a create/delete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicResult {
    /// Name.
    pub name: String,
    /// Error code.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
}

/// A topic in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
}

/// State of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDescription {
    /// Partition.
    pub partition: u32,
    /// Leader node.
    pub leader_node: u32,
    /// Owning shard.
    pub shard: u16,
    /// First offset in the log.
    pub log_start_offset: u64,
    /// Offset of the next record.
    pub high_watermark: u64,
    /// Bytes of live batches.
    pub size_bytes: u64,
    /// Per-partition error.
    pub error: Code,
    /// Nodes holding a replica.
    pub replicas: Vec<u32>,
    /// Replicas caught up with the commit point (as the leader last reported).
    pub in_sync: u16,
    /// Leader epoch (Raft term).
    pub leader_epoch: u64,
}

/// Full description of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    /// Name.
    pub name: String,
    /// Topic error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Effective configs.
    pub configs: Vec<(String, String)>,
    /// Partitions.
    pub partitions: Vec<PartitionDescription>,
}

/// Produce outcome for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartitionResult {
    /// Partition.
    pub partition: u32,
    /// Error code.
    pub error: Code,
    /// Offset of the first record of the first batch.
    pub base_offset: u64,
    /// Log start offset.
    pub log_start_offset: u64,
    /// Explanation.
    pub message: Option<String>,
}

/// Fetch outcome for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionResult {
    /// Partition.
    pub partition: u32,
    /// Error code.
    pub error: Code,
    /// High watermark.
    pub high_watermark: u64,
    /// Log start offset.
    pub log_start_offset: u64,
    /// Whole batches, back to back (a slice of the response frame).
    pub records: Bytes,
    /// Explanation.
    pub message: Option<String>,
}

/// ListOffsets outcome for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOffsetsPartitionResult {
    /// Partition.
    pub partition: u32,
    /// Error code.
    pub error: Code,
    /// The offset found.
    pub offset: u64,
    /// Max timestamp of the batch found (timestamp queries), else -1.
    pub timestamp_ms: i64,
    /// Log start offset.
    pub log_start_offset: u64,
    /// High watermark.
    pub high_watermark: u64,
}

/// Per-topic results of a partitioned request.
pub type TopicResults<T> = Vec<(String, Vec<T>)>;

/// The body of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body (request-level error).
    None,
    /// Handshake.
    Handshake(HandshakeInfo),
    /// Metadata.
    Metadata(Metadata),
    /// CreateTopics.
    CreateTopics(Vec<TopicResult>),
    /// DeleteTopics.
    DeleteTopics(Vec<TopicResult>),
    /// ListTopics.
    ListTopics(Vec<TopicSummary>),
    /// DescribeTopics.
    DescribeTopics(Vec<TopicDescription>),
    /// Produce.
    Produce(TopicResults<ProducePartitionResult>),
    /// Fetch.
    Fetch(TopicResults<FetchPartitionResult>),
    /// ListOffsets.
    ListOffsets(TopicResults<ListOffsetsPartitionResult>),
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Correlation id of the request it answers.
    pub correlation_id: u32,
    /// Request-level error.
    pub error: Code,
    /// Explanation of the request-level error.
    pub message: Option<String>,
    /// Body.
    pub body: ResponseBody,
}

impl Response {
    /// The body, or the request-level error.
    pub fn into_result(self) -> Result<ResponseBody> {
        if self.error.is_ok() {
            Ok(self.body)
        } else {
            Err(Error::from_code(self.error, self.message.as_deref()))
        }
    }
}

fn malformed(message: impl Into<String>) -> Error {
    Error::MalformedResponse(message.into())
}

/// Verifies and decodes a response frame.
pub fn decode_response(frame: &Frame) -> Result<Response> {
    let envelope = flatbuffers::root::<wire::Response>(&frame.envelope)
        .map_err(|error| malformed(format!("envelope failed verification: {error}")))?;
    let body = decode_body(&envelope, &frame.payload)?;
    Ok(Response {
        correlation_id: envelope.correlation_id(),
        error: Code::from_wire(envelope.error()),
        message: envelope.message().map(str::to_owned),
        body,
    })
}

fn decode_body(envelope: &wire::Response<'_>, payload: &Bytes) -> Result<ResponseBody> {
    let kind = envelope.body_type();
    let body = match kind {
        wire::ResponseBody::NONE => Some(ResponseBody::None),
        wire::ResponseBody::HandshakeResponse => {
            envelope.body_as_handshake_response().map(handshake)
        }
        wire::ResponseBody::MetadataResponse => envelope.body_as_metadata_response().map(metadata),
        wire::ResponseBody::CreateTopicsResponse => envelope
            .body_as_create_topics_response()
            .map(|body| ResponseBody::CreateTopics(topic_results(body.results()))),
        wire::ResponseBody::DeleteTopicsResponse => envelope
            .body_as_delete_topics_response()
            .map(|body| ResponseBody::DeleteTopics(topic_results(body.results()))),
        wire::ResponseBody::ListTopicsResponse => {
            envelope.body_as_list_topics_response().map(list_topics)
        }
        wire::ResponseBody::DescribeTopicsResponse => {
            envelope.body_as_describe_topics_response().map(describe)
        }
        wire::ResponseBody::ProduceResponse => envelope.body_as_produce_response().map(produce),
        wire::ResponseBody::FetchResponse => match envelope.body_as_fetch_response() {
            Some(body) => Some(fetch(body, payload)?),
            None => None,
        },
        wire::ResponseBody::ListOffsetsResponse => {
            envelope.body_as_list_offsets_response().map(list_offsets)
        }
        other => return Err(malformed(format!("unknown response kind {}", other.0))),
    };
    body.ok_or_else(|| malformed(format!("response kind {kind:?} without a body")))
}

fn opt_vec<'a, T: flatbuffers::Follow<'a> + 'a>(
    vector: Option<Vector<'a, ForwardsUOffset<T>>>,
) -> impl Iterator<Item = <T as flatbuffers::Follow<'a>>::Inner> {
    vector.into_iter().flat_map(|vector| vector.iter())
}

fn handshake(body: wire::HandshakeResponse<'_>) -> ResponseBody {
    ResponseBody::Handshake(HandshakeInfo {
        version: body.version(),
        node_id: body.node_id(),
        shard: body.shard(),
        shard_count: body.shard_count(),
        frame_bytes_max: body.frame_bytes_max(),
        broker_software: body.broker_software().map(str::to_owned),
    })
}

fn metadata(body: wire::MetadataResponse<'_>) -> ResponseBody {
    let brokers = opt_vec(body.brokers())
        .map(|broker| BrokerInfo {
            node_id: broker.node_id(),
            host: broker.host().to_owned(),
            port: broker.port(),
            shard_count: broker.shard_count(),
            reachable: broker.reachable(),
        })
        .collect();
    let topics = opt_vec(body.topics())
        .map(|topic| {
            let mut partitions: Vec<PartitionMetadata> = opt_vec(topic.partitions())
                .map(|partition| PartitionMetadata {
                    partition: partition.partition(),
                    leader_node: partition.leader_node(),
                    shard: partition.shard(),
                    error: Code::from_wire(partition.error()),
                    replicas: partition
                        .replicas()
                        .map_or(Vec::new(), |r| r.iter().collect()),
                    leader_epoch: partition.leader_epoch(),
                })
                .collect();
            partitions.sort_by_key(|partition| partition.partition);
            TopicMetadata {
                name: topic.name().to_owned(),
                error: Code::from_wire(topic.error()),
                partitions,
            }
        })
        .collect();
    ResponseBody::Metadata(Metadata {
        brokers,
        topics,
        controller_node: body.controller_node(),
        node_id: body.node_id(),
    })
}

fn topic_results(
    results: Option<Vector<'_, ForwardsUOffset<wire::TopicResult<'_>>>>,
) -> Vec<TopicResult> {
    opt_vec(results)
        .map(|result| TopicResult {
            name: result.name().to_owned(),
            error: Code::from_wire(result.error()),
            message: result.message().map(str::to_owned),
        })
        .collect()
}

fn list_topics(body: wire::ListTopicsResponse<'_>) -> ResponseBody {
    let topics = opt_vec(body.topics())
        .map(|topic| TopicSummary {
            name: topic.name().to_owned(),
            partitions: topic.partitions(),
        })
        .collect();
    ResponseBody::ListTopics(topics)
}

fn describe(body: wire::DescribeTopicsResponse<'_>) -> ResponseBody {
    let topics = opt_vec(body.topics())
        .map(|topic| {
            let configs = opt_vec(topic.configs())
                .map(|entry| (entry.key().to_owned(), entry.value().to_owned()))
                .collect();
            let mut partitions: Vec<PartitionDescription> = opt_vec(topic.partitions())
                .map(|partition| PartitionDescription {
                    partition: partition.partition(),
                    leader_node: partition.leader_node(),
                    shard: partition.shard(),
                    log_start_offset: partition.log_start_offset(),
                    high_watermark: partition.high_watermark(),
                    size_bytes: partition.size_bytes(),
                    error: Code::from_wire(partition.error()),
                    replicas: partition
                        .replicas()
                        .map_or(Vec::new(), |r| r.iter().collect()),
                    in_sync: partition.in_sync(),
                    leader_epoch: partition.leader_epoch(),
                })
                .collect();
            partitions.sort_by_key(|partition| partition.partition);
            TopicDescription {
                name: topic.name().to_owned(),
                error: Code::from_wire(topic.error()),
                message: topic.message().map(str::to_owned),
                configs,
                partitions,
            }
        })
        .collect();
    ResponseBody::DescribeTopics(topics)
}

fn produce(body: wire::ProduceResponse<'_>) -> ResponseBody {
    let topics = opt_vec(body.topics())
        .map(|topic| {
            let partitions = opt_vec(topic.partitions())
                .map(|partition| ProducePartitionResult {
                    partition: partition.partition(),
                    error: Code::from_wire(partition.error()),
                    base_offset: partition.base_offset(),
                    log_start_offset: partition.log_start_offset(),
                    message: partition.message().map(str::to_owned),
                })
                .collect();
            (topic.name().to_owned(), partitions)
        })
        .collect();
    ResponseBody::Produce(topics)
}

fn fetch(body: wire::FetchResponse<'_>, payload: &Bytes) -> Result<ResponseBody> {
    let mut topics = Vec::new();
    for topic in opt_vec(body.topics()) {
        let mut partitions = Vec::new();
        for partition in opt_vec(topic.partitions()) {
            let start = partition.payload_offset() as usize;
            let end = start.checked_add(partition.payload_bytes() as usize);
            let records = match end {
                Some(end) if end <= payload.len() => payload.slice(start..end),
                _ => {
                    return Err(malformed(format!(
                        "fetch range {start}+{} outside a payload of {} bytes",
                        partition.payload_bytes(),
                        payload.len()
                    )))
                }
            };
            partitions.push(FetchPartitionResult {
                partition: partition.partition(),
                error: Code::from_wire(partition.error()),
                high_watermark: partition.high_watermark(),
                log_start_offset: partition.log_start_offset(),
                records,
                message: partition.message().map(str::to_owned),
            });
        }
        topics.push((topic.name().to_owned(), partitions));
    }
    Ok(ResponseBody::Fetch(topics))
}

fn list_offsets(body: wire::ListOffsetsResponse<'_>) -> ResponseBody {
    let topics = opt_vec(body.topics())
        .map(|topic| {
            let partitions = opt_vec(topic.partitions())
                .map(|partition| ListOffsetsPartitionResult {
                    partition: partition.partition(),
                    error: Code::from_wire(partition.error()),
                    offset: partition.offset(),
                    timestamp_ms: partition.timestamp_ms(),
                    log_start_offset: partition.log_start_offset(),
                    high_watermark: partition.high_watermark(),
                })
                .collect();
            (topic.name().to_owned(), partitions)
        })
        .collect();
    ResponseBody::ListOffsets(topics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatbuffers::FlatBufferBuilder;

    fn fetch_frame(payload_offset: u32, payload_bytes: u32, payload: &'static [u8]) -> Frame {
        let mut fbb = FlatBufferBuilder::new();
        let partition = wire::FetchPartitionResult::create(
            &mut fbb,
            &wire::FetchPartitionResultArgs {
                partition: 3,
                high_watermark: 10,
                payload_offset,
                payload_bytes,
                ..Default::default()
            },
        );
        let partitions = fbb.create_vector(&[partition]);
        let name = fbb.create_string("t");
        let topic = wire::FetchTopicResult::create(
            &mut fbb,
            &wire::FetchTopicResultArgs {
                name: Some(name),
                partitions: Some(partitions),
            },
        );
        let topics = fbb.create_vector(&[topic]);
        let body = wire::FetchResponse::create(
            &mut fbb,
            &wire::FetchResponseArgs {
                topics: Some(topics),
            },
        );
        let response = wire::Response::create(
            &mut fbb,
            &wire::ResponseArgs {
                correlation_id: 77,
                body_type: wire::ResponseBody::FetchResponse,
                body: Some(body.as_union_value()),
                ..Default::default()
            },
        );
        fbb.finish(response, None);
        Frame {
            envelope: Bytes::copy_from_slice(fbb.finished_data()),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn fetch_ranges_are_sliced_and_checked() {
        let response = decode_response(&fetch_frame(1, 3, b"abcdef")).unwrap();
        assert_eq!(response.correlation_id, 77);
        let ResponseBody::Fetch(topics) = response.body else {
            panic!("not a fetch response");
        };
        assert_eq!(&topics[0].1[0].records[..], b"bcd");
        assert!(decode_response(&fetch_frame(4, 3, b"abcdef")).is_err());
        assert!(decode_response(&fetch_frame(u32::MAX, 3, b"abcdef")).is_err());
    }

    #[test]
    fn garbage_envelope_is_an_error() {
        let frame = Frame {
            envelope: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            payload: Bytes::new(),
        };
        assert!(matches!(
            decode_response(&frame),
            Err(Error::MalformedResponse(_))
        ));
    }

    #[test]
    fn request_encodes_and_verifies() {
        let mut fbb = FlatBufferBuilder::new();
        let body = crate::request::RequestBody::Metadata {
            topics: vec!["a".into()],
        };
        let envelope = crate::request::encode_request(&mut fbb, 5, "me", &body);
        let request = flatbuffers::root::<wire::Request>(envelope).unwrap();
        assert_eq!(request.correlation_id(), 5);
        assert_eq!(request.client_id(), Some("me"));
        let topics = request
            .body_as_metadata_request()
            .unwrap()
            .topics()
            .unwrap();
        assert_eq!(topics.get(0), "a");
    }
}
